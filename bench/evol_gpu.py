"""GPU benchmark of the `evol` stage (Evol-Instruct) with the local provider: SmolLM2-135M-Instruct over
seed instructions from ../shared/data/raw.

    python bench/evol_gpu.py --model $CURATE_GPU_MODEL --raw /tmp/raw --seeds 500 --rounds 1 --batch-size 256

writes a recipe (inputs: the Alpaca seed tasks, the Self-Instruct user-oriented tasks and the
InstructionWild English seed prompts, 856 prompt-only instructions; stages: evol, blend) to a temporary
folder, runs it with a fresh request cache (so no answer comes from an earlier run), and prints a
Markdown report: hardware, model, wall seconds of the evol stage, requests and tokens, evolutions/s,
kept records/s and generated tokens/s, eliminations per rule, survivors per operation, five evolved
examples and a few eliminated ones.

The GPU machine has no network and lacks polars and other curate dependencies: how they and the model
travel there (three calls) is written at the top of bench/results/evol_gpu.md.

Besides the manifest it times the local provider itself (model load and `generate` calls, wrapped here,
not changed) and counts the batches whose requests asked for different temperatures or max_tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RAW = REPO.parent / "shared" / "data" / "raw"
INPUTS = [
    ("alpaca_seed_tasks.jsonl.gz", "alpaca_seed"),
    ("selfinstruct_user_oriented_instructions.jsonl.gz", "selfinstruct_user"),
    ("instructionwild_seed_prompts_en.jsonl.gz", "instructionwild_en"),
]


def recipe_text(args: argparse.Namespace, raw: Path, out_dir: Path) -> str:
    inputs = "\n".join(
        f"  - {{path: {json.dumps(str(raw / name))}, name: {name_}, fields: {{user: instruction}}}}"
        for name, name_ in INPUTS
    )
    evol = {
        "provider": "local",
        "model": args.model,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "batch_size": args.batch_size,
        "judge": not args.no_judge,
    }
    return (
        "name: evol-gpu-bench\n"
        "seed: 0\n"
        f"inputs:\n{inputs}\n"
        "stages:\n"
        f"  - evol: {json.dumps(evol)}\n"
        "  - blend: {min_real_fraction: 0.2}\n"
        f"output: {{dir: {json.dumps(str(out_dir))}}}\n"
    )


class ProviderTimer:
    """Wraps LocalProvider._load and .generate (the class is not changed) to time them and to count
    batches that mix sampling settings."""

    def __init__(self) -> None:
        self.load_s = 0.0
        self.generate_s = 0.0
        self.batches = 0
        self.prompts = 0
        self.mixed_temperature = 0
        self.mixed_max_tokens = 0
        self.judge_in_sampled = 0  # judge-like requests (temperature 0) generated with sampling
        self.kinds: Counter = Counter()  # evolve / answer / judge requests generated
        self.cut: Counter = Counter()  # of those, cut off at max_tokens
        self.verdicts: Counter = Counter()  # the judge's first word

    def install(self) -> None:
        from curate.llm.providers import LocalProvider

        load, generate, timer = LocalProvider._load, LocalProvider.generate, self

        def timed_load(provider):
            t = time.perf_counter()
            try:
                return load(provider)
            finally:
                timer.load_s += time.perf_counter() - t

        def timed_generate(provider, requests, params):
            temps = {p["temperature"] for p in params}
            timer.batches += 1
            timer.prompts += len(requests)
            timer.mixed_temperature += len(temps) > 1
            timer.mixed_max_tokens += len({p["max_tokens"] for p in params}) > 1
            if params[0]["temperature"] > 0:
                timer.judge_in_sampled += sum(p["temperature"] == 0 for p in params)
            t = time.perf_counter()
            try:
                answers = generate(provider, requests, params)
            finally:
                _sync()
                timer.generate_s += time.perf_counter() - t
            for request, answer in zip(requests, answers, strict=True):
                kind = _kind(request.messages[-1]["content"])
                timer.kinds[kind] += 1
                timer.cut[kind] += answer.finish == "length"
                if kind == "judge":
                    word = (answer.text.split() or ["(empty)"])[0].strip(".,:!*\"'").lower()
                    timer.verdicts[word if word in ("same", "different") else "other"] += 1
            return answers

        LocalProvider._load, LocalProvider.generate = timed_load, timed_generate


def _kind(prompt: str) -> str:
    """Which of the stage's requests a prompt is (by curate's own templates)."""
    if prompt.startswith("Compare two instructions"):
        return "judge"
    return "evolve" if "<<<" in prompt else "answer"


def _sync() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


def hardware() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        cpu = platform.processor() or platform.machine()
        return f"CPU only: {cpu}, {os.cpu_count()} cores (torch {torch.__version__})"
    except ImportError:
        return "no torch"


def first_user(messages: list[dict]) -> str:
    return next((m["content"] for m in messages if m["role"] == "user" and m["content"]), "")


def answer_of(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")


def cell(text: str, limit: int) -> str:
    """Text for one Markdown table cell: one line, pipes escaped, cut at `limit` characters."""
    text = " ".join((text or "").split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def quote(text: str, limit: int) -> str:
    text = (text or "").strip()
    text = text if len(text) <= limit else text[:limit] + " […]"
    return "\n".join("> " + line if line else ">" for line in text.splitlines()) or "> (empty)"


def report(args, result, seconds_total: float, timer: ProviderTimer, peak_gb: float | None) -> str:
    import pyarrow.parquet as pq

    manifest = result.manifest
    stage = next(s for s in manifest["stages"] if s["name"] == "evol")
    rep, llm = stage["report"], stage.get("llm", {})
    seconds = stage["seconds"]
    eliminated = rep["eliminated"]
    attempts = rep["kept"] + sum(eliminated.values())
    out_tokens = llm.get("output_tokens", 0)
    in_tokens = llm.get("input_tokens", 0)
    gen_s = timer.generate_s or float("nan")

    rows = pq.read_table(result.folder / "data.parquet").to_pylist()
    by_id = {r["id"]: r for r in rows}
    dropped_path = result.folder / "dropped.parquet"
    dropped = pq.read_table(dropped_path).to_pylist() if dropped_path.exists() else []
    dropped = [d for d in dropped if d.get("stage") == "evol"]
    parents = {**by_id, **{d["id"]: d for d in dropped}}
    kept = [r for r in rows if r["origin"] == "synthetic"]

    lines = [
        "## Evol-Instruct with the local provider",
        "",
        "| | |",
        "| --- | --- |",
        f"| hardware | {hardware()} |",
        f"| model | `{args.model}` |",
        f"| inputs | {', '.join(n for n, _ in INPUTS)} ({manifest['counts']['input']:,} records) |",
        f"| seeds, rounds | {rep['seeds']:,}, {rep['rounds']} |",
        f"| max_tokens, temperature, batch_size, judge | {args.max_tokens}, {args.temperature}, "
        f"{args.batch_size}, {not args.no_judge} |",
        f"| evol stage wall seconds | {seconds:.1f} (model load {timer.load_s:.1f}, "
        f"generate calls {timer.generate_s:.1f}) |",
        f"| whole run wall seconds | {seconds_total:.1f} |",
        f"| requests | {llm.get('requests', 0):,} (answered {llm.get('answered', 0):,}, "
        f"failed {llm.get('failed', 0):,}, cached {llm.get('cached', 0):,}) in {timer.batches:,} batches |",
        f"| tokens | {in_tokens:,} prompt, {out_tokens:,} generated |",
        f"| evolutions (attempts) | {attempts:,}: kept {rep['kept']:,} ({_pct(rep['kept'], attempts)}), "
        f"eliminated {attempts - rep['kept']:,} |",
        f"| evolutions/s | {attempts / seconds:.2f} |",
        f"| kept records/s | {rep['kept'] / seconds:.2f} |",
        f"| generated tokens/s (stage wall / generate calls only) | {out_tokens / seconds:,.0f} / "
        f"{out_tokens / gen_s:,.0f} |",
        f"| batches mixing temperatures / max_tokens | {timer.mixed_temperature} / {timer.mixed_max_tokens} "
        f"(judge requests sampled at the batch's temperature: {timer.judge_in_sampled}) |",
    ]
    for kind in ("evolve", "answer", "judge"):
        if timer.kinds[kind]:
            lines.append(
                f"| {kind} replies cut off at max_tokens | {timer.cut[kind]:,} of {timer.kinds[kind]:,} "
                f"({_pct(timer.cut[kind], timer.kinds[kind])}) |"
            )
    if timer.verdicts:
        lines.append(
            f"| judge's first word | {', '.join(f'{k} {v:,}' for k, v in timer.verdicts.most_common())} |"
        )
    if peak_gb is not None:
        lines.append(f"| peak GPU memory | {peak_gb:.2f} GB |")
    lines += [
        "",
        "### Eliminations per rule",
        "",
        "| rule | evolutions | share of attempts |",
        "| --- | ---: | ---: |",
    ]
    for reason, n in sorted(eliminated.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {reason} | {n:,} | {_pct(n, attempts)} |")
    lines.append(f"| **all** | {sum(eliminated.values()):,} | {_pct(sum(eliminated.values()), attempts)} |")
    judged_same = Counter(
        "judge" if "judge" in json.loads(d["evidence"] or "{}") else "identical"
        for d in dropped
        if d["reason"] == "no_new_information"
    )
    if judged_same:
        lines += [
            "",
            f"no_new_information: {judged_same.get('judge', 0)} by the LLM judge, "
            f"{judged_same.get('identical', 0)} identical to the parent.",
        ]

    lines += ["", "### Kept by operation", "", "| operation | kept |", "| --- | ---: |"]
    for op, n in sorted(rep["kept_by_operation"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {op} | {n:,} |")

    lines += ["", "### Five kept evolutions", ""]
    picked, ops = [], set()
    for r in kept:  # one per operation first, then any
        op = json.loads(r["meta"])["evol"]["op"]
        if op not in ops:
            picked.append(r)
            ops.add(op)
    picked += [r for r in kept if r not in picked]
    for i, r in enumerate(picked[:5], 1):
        meta = json.loads(r["meta"])["evol"]
        parent = parents.get(r["parent_id"])
        lines += [
            f"**{i}. {meta['op']}, round {meta['round']}** (`{r['id']}` from `{r['parent_id']}`)",
            "",
            "parent instruction:",
            "",
            quote(first_user(parent["messages"]) if parent else "(not found)", 400),
            "",
            "evolved instruction:",
            "",
            quote(first_user(r["messages"]), 600),
            "",
            "answer (first 300 characters):",
            "",
            quote(answer_of(r["messages"]), 300),
            "",
        ]

    lines += ["### Eliminated evolutions", ""]
    shown, reasons = [], set()
    for d in dropped:
        if d["reason"] not in reasons:
            shown.append(d)
            reasons.add(d["reason"])
    for d in shown[:3]:
        evidence = json.loads(d["evidence"] or "{}")
        parent = parents.get(d["parent_id"])
        ev = {k: v for k, v in evidence.items() if k not in ("root_id", "instruction", "answer", "parent")}
        lines += [
            f"**{d['reason']}** ({evidence.get('op')}, round {evidence.get('round')}; evidence "
            f"`{cell(json.dumps(ev), 160)}`)",
            "",
            "parent instruction:",
            "",
            quote(first_user(parent["messages"]) if parent else "(not found)", 300),
            "",
            "evolution:",
            "",
            quote(first_user(d["messages"]), 400),
            "",
        ]
        if answer_of(d["messages"]):
            lines += ["answer (first 300 characters):", "", quote(answer_of(d["messages"]), 300), ""]
    return "\n".join(lines)


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("CURATE_GPU_MODEL") or "smollm2")
    ap.add_argument("--seeds", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument(
        "--no-judge", action="store_true", help="Only identical text counts as no new information."
    )
    ap.add_argument("--raw", type=Path, default=RAW, help="Folder holding the raw seed files.")
    ap.add_argument(
        "--out", type=Path, default=None, help="Output folder of the run (default: a temp folder)."
    )
    args = ap.parse_args(argv)
    if args.model not in ("smollm2",):
        args.model = str(Path(args.model).expanduser().resolve())

    work = Path(tempfile.mkdtemp(prefix="evol-gpu-"))
    os.environ["CURATE_CACHE_DIR"] = str(work / "cache")  # fresh: no answer from an earlier run
    out_dir = (args.out or work / "runs").resolve()
    recipe_path = work / "evol.yaml"
    recipe_path.write_text(recipe_text(args, args.raw.resolve(), out_dir))

    from curate.pipeline import run_recipe
    from curate.recipe import load_recipe

    timer = ProviderTimer()
    timer.install()
    started = time.perf_counter()
    result = run_recipe(load_recipe(recipe_path))
    total = time.perf_counter() - started
    peak = None
    try:
        import torch

        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 1e9
    except ImportError:
        pass
    print(report(args, result, total, timer, peak))
    stage = next(s for s in result.manifest["stages"] if s["name"] == "evol")
    print("\n<details><summary>evol stage entry of the manifest</summary>\n\n```json")
    print(json.dumps({k: stage[k] for k in stage if k in ("seconds", "report", "llm", "added")}, indent=1))
    print("```\n</details>")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
