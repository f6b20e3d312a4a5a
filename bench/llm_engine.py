"""Requests/s through curate's LLM request engine against a local OpenAI-compatible server whose
every answer takes 200 ms, at several concurrency limits, beside the ideal (concurrency / latency).

The server (tests/llm_server.py) runs in its own process, so its work does not share the engine's
interpreter. Each level runs after a warm-up, with fresh prompts and no request cache, so every
request really goes out. The engine drives the official openai SDK (async client), as a run does.

    python bench/llm_engine.py [--latency 0.2] [--levels 1,16,64,256] [--provider openai|anthropic]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curate.llm import LLMConfig, Request, RequestEngine, make_provider  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "llm_server.py"), "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = server.stdout.readline().strip()
    if not line.startswith("READY "):
        raise SystemExit(f"the server did not start: {line!r}")
    return server, line.split(" ", 1)[1]


def measure(url: str, provider: str, concurrency: int, n: int, tag: str) -> tuple[float, dict]:
    base = url + "/v1" if provider == "openai" else url
    cfg = LLMConfig(
        provider=provider, model="bench", base_url=base, api_key_env="CURATE_BENCH_KEY",
        concurrency=concurrency, max_tokens=64, timeout=30,
    )  # fmt: skip
    engine = RequestEngine(make_provider(cfg, Path("/tmp")), cfg, cache=None)
    requests = [Request([{"role": "user", "content": f"{tag} question {i}"}]) for i in range(n)]
    started = time.perf_counter()
    answers = engine.run(requests)
    seconds = time.perf_counter() - started
    failed = sum(not hasattr(a, "text") for a in answers)
    if failed:
        raise SystemExit(f"{failed} of {n} requests failed at concurrency {concurrency}")
    return n / seconds, engine.usage.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--provider", default="openai", choices=["openai", "anthropic"])
    parser.add_argument("--seconds", type=float, default=4.0, help="Ideal duration of each measurement.")
    args = parser.parse_args()
    os.environ.setdefault("CURATE_BENCH_KEY", "sk-bench-not-a-key")
    server, url = start_server(args.latency)
    try:
        levels = [int(x) for x in args.levels.split(",")]
        measure(url, args.provider, max(levels), max(levels) * 2, "warm-up")
        rows = []
        for c in levels:
            ideal = c / args.latency
            n = max(c * 2, int(ideal * args.seconds))
            rates = [measure(url, args.provider, c, n, f"c{c}r{r}")[0] for r in range(2)]
            best = max(rates)
            rows.append((c, n, ideal, best, best / ideal))
            print(f"concurrency {c:>4}: {best:8.1f} req/s, ideal {ideal:8.1f}", flush=True)
    finally:
        server.kill()
    print("\n| concurrency | requests | ideal req/s | measured req/s | of ideal |")
    print("|---:|---:|---:|---:|---:|")
    for c, n, ideal, best, share in rows:
        print(f"| {c} | {n} | {ideal:,.0f} | {best:,.0f} | {share:.0%} |")
    latency = f"{args.latency * 1000:.0f} ms"
    print(f"\n{args.provider} SDK, latency {latency}, {os.cpu_count()} cores; best of 2 runs per level")


if __name__ == "__main__":
    main()
