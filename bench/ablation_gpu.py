"""A real ablation on one GPU: does dedup help, and does curate catch a win bought by contamination?

Four arms, each a version built by the curate runner from the same mix of ../shared/data/raw:

  1. raw            the mix, normalized and filtered, no dedup
  2. dedup          (1) with exact and MinHash dedup
  3. raw+gsm8k      (1) with the first 100 GSM8K test questions and answers mixed in (`--copies N`
                    of each: at this token budget a single copy is trained at most once, too little
                    for a 135M model to memorise it; copies show whether the memorisation check fires)
  4. decontaminated (3) decontaminated against GSM8K test (exact, n-gram, MinHash)

Before any arm, 200 records of the mix are frozen (`curate freeze`): every arm's recipe
decontaminates against them, and every arm is judged on them and on the first 200 GSM8K test
items (100 of which arm 3 trained on). SmolLM2-135M-Instruct, 3 seeds, an equal token budget.

  here:    python bench/ablation_gpu.py build [--copies N]   # versions, frozen set, spec: .gpu-data/ablation
  on GPU:  python bench/ablation_gpu.py run --model $CURATE_GPU_MODEL --out $OUT/ablation [--compile]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
STAGE = REPO / ".gpu-data" / "ablation"  # git-ignored; carried to the GPU machine

MIX = [
    "llamafactory_alpaca_en_demo.json.gz",
    "code_alpaca_2k.json.gz",
    "gpteacher_roleplay.json.gz",
    "foundry_dolly_hhrlhf_train_small.jsonl.gz",
]
GSM8K_MIXED = 100  # test items arm 3 trains on
FIELDS = {"question": "question", "answer": "answer", "id": "id"}
TOKENS = 450_000  # training tokens per run: about two thirds of an epoch of the smallest arm
JUDGED = 200  # items of each eval set every run is scored on

TRAIN = {
    "name": "smollm2-ablation",
    "base_model": "SMOLLM2",  # replaced on the GPU machine by --model
    "template": "chatml",
    "lora": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
    "sequence_len": 1024,
    "micro_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 0.0005,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.03,
    "num_epochs": 1,
    "packing": True,
    "gradient_checkpointing": False,
    "kernels": "auto",  # Liger's layer kernels where installed (on the GPU)
    "fully_masked": "drop",
    "eval_steps": 1000000,  # the loss curve's periodic evals are not needed to compare arms
    "holdout": {"fraction": 0.02, "max_records": 100},
    "gates": {
        "max_new_tokens": 128,
        "max_items": 50,
        "generate_batch_size": 256,
        "batch_size": 64,
        "min_format_compliance": None,
        "min_refusal_rate": None,
        "min_stop_rate": None,
    },
}


def _pipeline(name: str, inputs: list[dict], stages: list[dict], eval_sets: list[dict]) -> dict:
    return {"name": name, "seed": 0, "inputs": inputs, "eval_sets": eval_sets, "stages": stages}


def _run(recipe: dict, folder: Path) -> Path:
    path = folder / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = folder / "runs" / recipe["name"]
    subprocess.run([sys.executable, "-m", "curate", "run", str(path), "--out", str(out)], check=True)
    return (out / "latest").resolve()


def build(copies: int = 1) -> None:
    """Build the four arm versions, the frozen set and the ablation spec here (polars, no GPU); arm 3
    holds `copies` copies of each planted GSM8K test item (its version is not deduplicated)."""
    shutil.rmtree(STAGE, ignore_errors=True)
    STAGE.mkdir(parents=True)
    work = STAGE / "work"
    work.mkdir()
    inputs = [{"path": str(DATA / "raw" / name), "name": name.split(".")[0]} for name in MIX]
    with gzip.open(DATA / "eval" / "gsm8k_test.jsonl.gz", "rt", encoding="utf-8") as fh:
        gsm8k = [json.loads(line) for _, line in zip(range(JUDGED), fh, strict=False)]
    mixed = work / "gsm8k_test_mixed.jsonl"
    mixed.write_text(
        "".join(
            json.dumps({"instruction": i["question"], "output": i["answer"]}) + "\n"
            for i in gsm8k[:GSM8K_MIXED]
            for _ in range(copies)
        )
    )
    judged = STAGE / "gsm8k_test_judged.jsonl"
    judged.write_text("".join(json.dumps({"id": f"gsm8k_test-{n}", **i}) + "\n" for n, i in enumerate(gsm8k)))
    normalize = [
        {"normalize": {"system_prompt": "You are a helpful assistant.", "template": "chatml"}},
        {"filter": {}},
    ]

    pool = _run(_pipeline("pool", inputs, normalize, []), work)
    frozen = STAGE / "frozen.jsonl"
    subprocess.run(
        [sys.executable, "-m", "curate", "freeze", str(pool), "--out", str(frozen), "-n", "200"], check=True
    )
    frozen_set = {"name": "frozen", "path": str(frozen)}
    gsm8k_set = {"name": "gsm8k", "path": str(DATA / "eval" / "gsm8k_test.jsonl.gz")}
    # the frozen records are records of the mix: exact copies are what must never be trained on (this
    # run predates ngram_max_items, when their 13-grams caught Dolly's shared boilerplate sentence)
    decon_frozen = {"decontaminate": {"methods": ["exact"], "eval_sets": ["frozen"]}}
    dedup = {"dedup": {"exact": True, "minhash": True}}
    with_gsm8k = [*inputs, {"path": str(mixed), "name": "gsm8k_test_mixed"}]
    arms = {
        "raw": _run(_pipeline("raw", inputs, [*normalize, decon_frozen], [frozen_set]), work),
        "dedup": _run(_pipeline("dedup", inputs, [*normalize, dedup, decon_frozen], [frozen_set]), work),
        "raw_gsm8k": _run(_pipeline("raw_gsm8k", with_gsm8k, [*normalize, decon_frozen], [frozen_set]), work),
        "decontaminated": _run(
            _pipeline(
                "decontaminated",
                with_gsm8k,
                [
                    *normalize,
                    decon_frozen,
                    {"decontaminate": {"methods": ["exact", "ngram", "minhash"], "eval_sets": ["gsm8k"]}},
                ],
                [frozen_set, gsm8k_set],
            ),
            work,
        ),
    }
    for name, version in arms.items():  # only what training reads travels
        target = STAGE / "versions" / name
        target.mkdir(parents=True)
        for file in ("data.parquet", "train.jsonl", "manifest.json"):
            shutil.copy(version / file, target / file)
        print(f"{name}: {sum(1 for _ in open(target / 'train.jsonl', encoding='utf-8'))} records")
    (STAGE / "train.yaml").write_text(yaml.safe_dump(TRAIN, sort_keys=False))
    spec = {
        "name": "smollm2: dedup and contamination",
        "train": "train.yaml",
        "arms": [{"name": name, "version": f"versions/{name}"} for name in arms],
        "baseline": "raw",
        "seeds": 3,
        "tokens": TOKENS,
        "eval_sets": [
            {"name": "gsm8k_test", "path": judged.name, "fields": FIELDS},
            {"name": "frozen", "path": frozen.name, "fields": FIELDS},
        ],
    }
    (STAGE / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.rmtree(work)
    print("staged in", STAGE)


def run(model: str, out: Path, compile_layers: bool) -> None:
    """`curate ablate` on the staged spec with the model given; prints the wall time and the report."""
    train = {
        **yaml.safe_load((STAGE / "train.yaml").read_text()),
        "base_model": model,
        "compile": compile_layers,
    }
    (STAGE / "train.yaml").write_text(yaml.safe_dump(train, sort_keys=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out.parent / "ablation_report.json", "w") as fh:
        subprocess.run(
            [sys.executable, "-m", "curate", "ablate", str(STAGE / "spec.yaml"), "--out", str(out), "--json"],
            check=True,
            stdout=fh,
        )
    wall = time.perf_counter() - t0
    print(f"\nwall time of the ablation (4 arms x 3 seeds, one process, imports included): {wall:.1f} s")
    print((out / "report.md").read_text())
    report = json.loads((out / "report.json").read_text())
    phases = sorted({k for runs in report["runs"].values() for r in runs for k in r.get("seconds") or {}})
    print("\nwhere each run's time went (s):\n| arm | seed | wall | " + " | ".join(phases) + " |")
    for arm, runs in report["runs"].items():
        for r in runs:
            cells = [f"{(r.get('seconds') or {}).get(k, 0):.1f}" for k in phases]
            print(f"| {arm} | {r['seed']} | {r['wall_seconds']:.1f} | " + " | ".join(cells) + " |")
    inside = sum(r["wall_seconds"] for runs in report["runs"].values() for r in runs)
    print(f"runs {inside:.1f} s; outside them (start, imports, contamination, report) {wall - inside:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--copies", type=int, default=1, help="copies of each planted GSM8K item in arm 3")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--compile", action="store_true", help="train with the decoder layers compiled")
    args = parser.parse_args()
    if args.cmd == "build":
        build(args.copies)
    else:
        run(args.model, args.out, args.compile)


if __name__ == "__main__":
    main()
