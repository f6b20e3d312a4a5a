"""GPU benchmark of `curate train`: SmolLM2-135M-Instruct QLoRA on a real version, with its gates.

Two steps, because the GPU machine has no polars and no network:

  here:     python bench/train_gpu.py build          # runs the pipeline on ../shared/data into .gpu-data/
  on GPU:   python bench/train_gpu.py train --model $CURATE_GPU_MODEL --out $OUT

`train` prints one table: eval loss before and after, tokens/s, peak GPU memory, wall time and every
gate beside the base model's figure. The reference, measured in the same run on the same records and
GPU: TRL 1.16 SFTTrainer out of the box (messages dataset, its own tokenization, packing, the same
QLoRA config and batch), with its default gradient checkpointing and with it off like our recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
STAGE = REPO / ".gpu-data"  # git-ignored through .git/info/exclude; carried to the GPU machine

PIPELINE = f"""
name: train-bench
seed: 0
inputs:
  - {{path: {DATA}/raw/llamafactory_alpaca_en_demo.json.gz, name: alpaca_en}}
  - {{path: {DATA}/raw/code_alpaca_2k.json.gz, name: code_alpaca}}
  - {{path: {DATA}/raw/gpteacher_roleplay.json.gz, name: roleplay}}
stages:
  - dedup: {{exact: true}}
  - normalize: {{system_prompt: "You are a helpful assistant.", template: chatml}}
  - filter: {{min_assistant_chars: 1, drop_refusals: true}}
"""

RECIPE = {
    "name": "smollm2-135m-qlora-bench",
    "template": "chatml",
    "load_in_4bit": True,
    "lora": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
    "sequence_len": 1024,
    "micro_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 0.0002,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.03,
    "num_epochs": 1,
    "seed": 0,
    "packing": True,
    "gradient_checkpointing": False,
    "fully_masked": "drop",  # counted in metrics.json; none expected at 1024 tokens
    "holdout": {"fraction": 0.05, "max_records": 300},
    "eval_sets": [{"name": "gsm8k", "path": "gsm8k_test.jsonl.gz"}],
    "gates": {"max_new_tokens": 200, "max_items": 50, "batch_size": 32},
}


def build() -> None:
    """Run the pipeline here and stage the version's files (and GSM8K) for the GPU machine."""
    import tempfile

    git_path = subprocess.run(
        ["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, capture_output=True, text=True
    )
    exclude = REPO / git_path.stdout.strip()
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if "/.gpu-data/" not in (exclude.read_text() if exclude.exists() else ""):
        with open(exclude, "a") as fh:
            fh.write("/.gpu-data/\n")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "bench.yaml"
        recipe.write_text(PIPELINE)
        subprocess.run(
            [sys.executable, "-m", "curate", "run", str(recipe), "--out", f"{tmp}/runs"], check=True
        )
        version = (Path(tmp) / "runs" / "latest").resolve()
        if not version.is_dir():
            version = Path(tmp) / "runs" / (Path(tmp) / "runs" / "latest").read_text().strip()
        shutil.rmtree(STAGE, ignore_errors=True)
        (STAGE / "version").mkdir(parents=True)
        for name in ("train.jsonl", "data.parquet", "manifest.json"):
            shutil.copy(version / name, STAGE / "version" / name)
    shutil.copy(DATA / "eval" / "gsm8k_test.jsonl.gz", STAGE / "gsm8k_test.jsonl.gz")
    print("staged", sum(1 for _ in open(STAGE / "version" / "train.jsonl")), "records in", STAGE)


def trl_reference(model_path: str, steps: int, checkpointing: bool, out: Path) -> dict:
    """TRL SFTTrainer as a user would call it on train.jsonl: tokens/s and peak memory over `steps` steps."""
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(STAGE / "version" / "train.jsonl", encoding="utf-8")]
    on_gpu = torch.cuda.is_available()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0} if on_gpu else "cpu"
    )
    lora = RECIPE["lora"]
    config = SFTConfig(
        output_dir=str(out / "trl-reference"),
        max_length=RECIPE["sequence_len"],
        packing=True,
        per_device_train_batch_size=RECIPE["micro_batch_size"],
        gradient_checkpointing=checkpointing,
        learning_rate=RECIPE["learning_rate"],
        max_steps=steps,
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="all",
        use_cpu=not on_gpu,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    tokens = trainer.state.num_input_tokens_seen
    peak = torch.cuda.max_memory_allocated() / 1e9 if on_gpu else 0.0
    del trainer, model
    if on_gpu:
        torch.cuda.empty_cache()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "peak_gpu_memory_gb": peak,
    }


def train(model: str, out: Path, smoke: bool, reference_steps: int) -> None:
    from curate.train.trainer import run_training

    out.mkdir(parents=True, exist_ok=True)
    recipe = {**RECIPE, "base_model": model}
    if smoke:  # a CPU check of this script: two steps, two prompts per gate set
        recipe.update(max_steps=2, sequence_len=256, holdout={"fraction": 0.01, "max_records": 4})
        recipe["gates"] = {**recipe["gates"], "max_items": 2, "max_new_tokens": 4}
    recipe_path = STAGE / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))  # JSON is YAML; eval-set paths resolve against .gpu-data
    metrics = run_training(recipe_path, STAGE / "version", out / "run")
    for name in ("metrics.json", "loss.png"):
        shutil.copy(out / "run" / name, out / name)
    rows = [
        ("records (train / held out)", f"{metrics['records']['train']} / {metrics['records']['heldout']}"),
        ("optimizer steps", metrics["steps"]),
        ("tokens seen", f"{metrics['tokens_seen']:,}"),
        (
            "eval loss held out, before -> after",
            f"{metrics['eval_loss_before']['heldout']:.4f} -> {metrics['eval_loss_after']['heldout']:.4f}",
        ),
    ]
    if "gsm8k" in metrics["eval_loss_before"]:
        rows.append(
            (
                "eval loss gsm8k, before -> after",
                f"{metrics['eval_loss_before']['gsm8k']:.4f} -> {metrics['eval_loss_after']['gsm8k']:.4f}",
            )
        )
    tps = metrics["tokens_per_second"]
    refs = {
        "TRL defaults (gradient checkpointing on)": trl_reference(model, reference_steps, True, out),
        "TRL defaults, gradient checkpointing off": trl_reference(model, reference_steps, False, out),
    }
    rows += [
        ("train seconds (periodic evals excluded)", f"{metrics['train_seconds']:.1f}"),
        ("tokens/s", f"{tps:,.0f}"),
        ("peak GPU memory (GB)", f"{metrics['peak_gpu_memory_gb'] or 0:.2f}"),
        ("wall seconds (load, train, gates)", f"{metrics['wall_seconds']:.1f}"),
        ("device", metrics["device"]),
        ("versions", json.dumps(metrics["versions"])),
    ]
    print("| figure | value |\n| --- | --- |")
    for name, ref in refs.items():
        rows.append(
            (
                f"reference: {name}, {reference_steps} steps, tokens/s",
                f"{ref['tokens_per_second']:,.0f} (curate / reference {tps / ref['tokens_per_second']:.2f}x)",
            )
        )
        rows.append((f"reference: {name}, peak GPU memory (GB)", f"{ref['peak_gpu_memory_gb']:.2f}"))
    for k, v in rows:
        print(f"| {k} | {v} |")
    (out / "references.json").write_text(json.dumps(refs, indent=1))
    print("\n| gate | tuned | base | threshold | worse than base | passed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for g in metrics["gates"]["gates"]:

        def fmt(x):
            return "-" if x is None else f"{x:.4g}"

        print(
            f"| {g['name']} | {fmt(g['value'])} | {fmt(g['base'])} | {fmt(g['threshold'])} | "
            f"{g.get('worse_than_base')} | {g['passed']} |"
        )
    print("\nall gates passed:", metrics["gates"]["passed"], "| failed:", metrics["gates"]["failed"])
    print("samples:", json.dumps(metrics["gates"]["samples"], indent=1)[:3000])


def scale(tokenizer_dir: str, out: Path, steps: int, smoke: bool) -> None:
    """train/qlora-default.yaml on a randomly initialised model of Llama-3-8B shape (same FLOPs and
    memory as the real one, no weights needed): does the 7-8B recipe fit one 24 GB GPU, and how fast."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from curate.train.trainer import run_training

    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)
    if smoke:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(
        **shape,
        num_key_value_heads=8 if not smoke else 2,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model_dir = out / "llama3-8b-shape"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    overrides = {
        "base_model": str(model_dir),
        "template": "chatml",
        "max_steps": steps,
        "eval_steps": steps,
        "holdout.max_records": 32,
        "gates.max_new_tokens": 8,
        "gates.max_items": 4,
        "gates.batch_size": 32,
    }
    if smoke:
        overrides.update(
            sequence_len=256, micro_batch_size=1, gradient_accumulation_steps=2, fully_masked="drop"
        )
    m = run_training(REPO / "train" / "qlora-default.yaml", STAGE / "version", out / "scale", overrides)
    shutil.rmtree(model_dir)
    print("| figure (qlora-default.yaml, Llama-3-8B shape, random weights) | value |\n| --- | --- |")
    for k, v in [
        (
            "recipe",
            "NF4 + double quant, r=16/alpha=32 qkvo, sequence_len 2048 packed, "
            "micro batch 2 x 8 accumulation, gradient checkpointing",
        ),
        ("optimizer steps", m["steps"]),
        ("tokens seen", f"{m['tokens_seen']:,}"),
        ("train seconds (periodic evals excluded)", f"{m['train_seconds']:.1f}"),
        ("tokens/s", f"{m['tokens_per_second']:,.0f}"),
        ("peak GPU memory (GB)", f"{m['peak_gpu_memory_gb'] or 0:.2f}"),
        ("wall seconds (load, train, gates)", f"{m['wall_seconds']:.1f}"),
    ]:
        print(f"| {k} | {v} |")
    (out / "scale_metrics.json").write_text(
        json.dumps({k: v for k, v in m.items() if k != "gates"}, default=str)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    t = sub.add_parser("train")
    t.add_argument("--model", required=True, help="Hugging Face folder of SmolLM2-135M-Instruct")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--smoke", action="store_true", help="two steps on CPU, to check the script")
    t.add_argument(
        "--reference-steps", type=int, default=40, help="optimizer steps of each TRL reference run"
    )
    sc = sub.add_parser("scale")
    sc.add_argument("--tokenizer", required=True, help="tokenizer folder (SmolLM2's: chatml tokens built in)")
    sc.add_argument("--out", type=Path, required=True)
    sc.add_argument("--steps", type=int, default=6)
    sc.add_argument("--smoke", action="store_true", help="a tiny model of the same family, on CPU")
    args = parser.parse_args()
    if args.cmd == "build":
        build()
    elif args.cmd == "scale":
        scale(args.tokenizer, args.out, args.steps, args.smoke)
    else:
        train(args.model, args.out, args.smoke, 2 if args.smoke else args.reference_steps)


if __name__ == "__main__":
    main()
