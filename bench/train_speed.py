"""Training speed: curate's trainer against a plain TRL SFTTrainer with its default settings.

Both sides train QLoRA (NF4 + double quantization, bf16 compute, LoRA r=16/alpha=32/dropout 0.05 on
q/k/v/o) on the same token rows (curate's encoding of the same records: the same input ids and the
same loss masks), for one epoch, at the same learning rate and schedule; what differs is what each
does with them. TRL's defaults: a batch of 8 examples padded to the longest, no packing, gradient
checkpointing on, the model's own layers. curate packs padding-free rows, in several configurations
(`workloads`): `matched` and `trl_steps` train at about TRL's memory, `trl_steps` with about its
tokens per optimizer step, so its loss is comparable at the same learning rate; `fast` spends memory
on speed (bigger micro batch, no checkpointing). Each reports non-padding tokens per second of
training, peak GPU memory, and the held-out loss after training, computed by the same function on the
same held-out rows.

Workloads: (a) SmolLM2-135M-Instruct on 1,024-token rows; (b) a randomly initialised model of
Llama-3-8B shape (same FLOPs and memory as the real one) on 2,048-token rows.

The first training in a process runs 25-35% slower whoever goes first, so each side first trains a
few discarded steps, then every side runs twice in mirrored order (curate configurations, TRL, TRL,
the configurations reversed) and each side's figure is the mean of its two runs.

  here:    python bench/train_gpu.py build      # stages the version (.gpu-data/version)
  on GPU:  python bench/train_speed.py --model $CURATE_GPU_MODEL --out $OUT
  check:   python bench/train_speed.py --model DIR --out /tmp/speed --smoke   # tiny, on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / ".gpu-data"
H200_BF16_DENSE_FLOPS = 989.4e12  # NVIDIA's figure for H100/H200 SXM, dense (no sparsity)

LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
SCHEDULE = {"learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.03}


def workloads(smoke: bool) -> dict:
    """Per workload: rows, records, and curate's configurations. `matched` trains one packed row per
    step with gradient checkpointing, about TRL's memory; `trl_steps` packs rows of 1,536 tokens, about
    the 1,490-1,520 real tokens of TRL's padded batches of 8, so both make about as many optimizer steps
    and their losses compare at the same learning rate; `rows4_lr` (SmolLM2) and `rows2_lr` (8B shapes)
    keep checkpointing but train several rows a step, which a host-bound step takes in about the same
    time, with a learning rate raised for their fewer steps: the candidates for more speed at TRL's
    memory; `fast` spends memory on speed (several rows a step, no checkpointing), with a larger
    learning rate for its fewer steps on SmolLM2 (`fast_lr`); `fast8` (8B shapes) trains the 8 rows a
    step that an H200 holds without checkpointing, the largest micro batch that fits."""
    checkpointed = {"micro_batch_size": 1, "gradient_checkpointing": True, "kernels": "auto"}
    smol = {
        "matched": checkpointed,
        "trl_steps": {**checkpointed, "sequence_len": 1536},
        "rows4_lr": {**checkpointed, "micro_batch_size": 4, "learning_rate": 6e-4},
        "fast_lr": {
            "micro_batch_size": 8,
            "gradient_checkpointing": False,
            "kernels": "auto",
            "learning_rate": 6e-4,
        },
    }
    big = {
        "matched": checkpointed,
        "trl_steps": {**checkpointed, "sequence_len": 1536},
        "rows2_lr": {**checkpointed, "micro_batch_size": 2, "learning_rate": 4e-4},
        "fast": {"micro_batch_size": 4, "gradient_checkpointing": False, "kernels": "auto"},
        "fast8": {"micro_batch_size": 8, "gradient_checkpointing": False, "kernels": "auto"},
    }
    for configs in (smol, big):  # each with its decoder layers compiled (curate.train.compile)
        configs.update({f"{k}+compile": {**v, "compile": True} for k, v in list(configs.items())})
    # TRL reads its row length and schedule from `matched`, whichever configurations run
    if smoke:
        return {
            "smollm2": {
                "sequence_len": 256,
                "records": 48,
                "reference": checkpointed,
                "curate": {"fast": smol["fast_lr"]},
            },
            "llama3-8b-shape": {
                "sequence_len": 256,
                "records": 24,
                "reference": checkpointed,
                "curate": {"matched": big["matched"], "matched+compile": big["matched+compile"]},
            },
        }
    return {
        "smollm2": {"sequence_len": 1024, "records": 800, "reference": checkpointed, "curate": smol},
        "llama3-8b-shape": {"sequence_len": 2048, "records": 300, "reference": checkpointed, "curate": big},
    }


def llama3_8b_shape(tokenizer_dir: str, out: Path, smoke: bool) -> Path:
    """A randomly initialised model of Llama-3-8B shape, saved once (with --smoke: a tiny one of the
    same family, on the CPU)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = out / "llama3-8b-shape"
    if folder.is_dir():  # built in a side folder and renamed into place whole
        return folder
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
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(partial)
    partial.rename(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def subset_version(records: int, out: Path) -> Path:
    """The first `records` conversations of the staged version, as a version of their own."""
    folder = out / f"version-{records}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(STAGE / "version" / "train.jsonl", encoding="utf-8") as src:
        lines = [line for _, line in zip(range(records), src, strict=False)]
    (folder / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps({"version": f"first-{records}"}))
    return folder


def recipe_for(model: str, sequence_len: int, curate: dict, max_steps: int | None = None) -> dict:
    """curate's recipe for one configuration (`curate`: micro batch, checkpointing, kernels)."""
    return {
        "name": "train-speed",
        "base_model": model,
        "template": "chatml",
        "lora": LORA,
        "sequence_len": sequence_len,
        "gradient_accumulation_steps": 1,
        "packing": True,
        "num_epochs": 1,
        "max_steps": max_steps,
        "eval_steps": 10**6,  # no periodic evals: both sides train without them
        "fully_masked": "drop",
        "holdout": {"fraction": 0.05, "max_records": 64},
        "gates": {
            "max_new_tokens": 4,
            "max_items": 2,
            "min_format_compliance": None,
            "min_refusal_rate": None,
            "min_stop_rate": None,
        },
        **SCHEDULE,
        **curate,
    }


def rows_for(recipe: dict, version: Path) -> tuple[list[dict], list[dict], object]:
    """curate's train and held-out token rows of a version, and the tokenizer that made them."""
    from curate.train.data import load_version
    from curate.train.model import load_tokenizer
    from curate.train.recipe import load_recipe
    from curate.train.trainer import _encode_splits, template_object

    r = load_recipe(recipe)
    tokenizer, _ = load_tokenizer(r.base_model, "chatml")
    train, held = _encode_splits(r, load_version(version), tokenizer, template_object("chatml", tokenizer))[
        :2
    ]
    return train, held, tokenizer


def run_curate(recipe: dict, version: Path, out: Path) -> dict:
    from curate.train.trainer import run_training

    shutil.rmtree(out, ignore_errors=True)
    m = run_training(recipe, version, out, show_progress=False)
    return {
        "tokens": m["tokens_seen"],
        "seconds": m["train_seconds"],
        "tokens_per_second": m["tokens_per_second"],
        "peak_gpu_memory_gb": m["peak_gpu_memory_gb"] or 0.0,
        "heldout_loss": m["eval_loss_after"]["heldout"],
        "steps": m["steps"],
    }


def run_trl(recipe: dict, train: list[dict], held: list[dict], tokenizer, out: Path, steps: int = -1) -> dict:
    """TRL SFTTrainer + peft + bitsandbytes as TRL's documentation sets QLoRA up, with TRL's defaults for
    everything but the schedule (the same learning rate, scheduler and warmup as curate's)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from curate.train.gates import heldout_loss

    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        recipe["base_model"],
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16,
        device_map={"": 0} if on_gpu else "cpu",
    )
    config = SFTConfig(
        output_dir=str(out),
        max_length=recipe["sequence_len"],
        learning_rate=recipe["learning_rate"],
        lr_scheduler_type=recipe["lr_scheduler"],
        warmup_steps=recipe["warmup_ratio"],  # a float below 1 is a ratio of the steps
        num_train_epochs=1,
        max_steps=steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not on_gpu,
        bf16=on_gpu,
        **({"seed": recipe["seed"]} if "seed" in recipe else {}),  # else TRL's default (42)
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(train),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1e9 if on_gpu else 0.0
    trainer.model.eval()
    loss = heldout_loss(trainer.model, held, tokenizer.pad_token_id, 8 * recipe["sequence_len"])
    result = {
        "tokens": int(trainer.state.num_input_tokens_seen),
        "seconds": seconds,
        "tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
        "peak_gpu_memory_gb": peak,
        "heldout_loss": loss,
        "steps": trainer.state.global_step,
    }
    del trainer, model
    _free()
    return result


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_flops_per_token(config, lora_r: int, lora_modules: int) -> dict:
    """FLOPs of one trained token, less attention: the base is frozen, so its matmuls run forward (2N)
    and backward for the input gradient only (2N): 4N; the LoRA matrices train fully (6 per
    parameter). Recomputation under gradient checkpointing is not counted (it is not model work)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size) + config.vocab_size * d
    lora = layers * lora_r * (2 * (d + d) + 2 * (d + kv))  # q, o: d->d; k, v: d->kv
    return {"linear_params": linear, "lora_params": lora, "per_token": 4 * linear + 6 * lora}


def attention_flops(config, lengths: list[int]) -> float:
    """Causal attention over each example (packed rows never attend across examples): forward QK^T and
    AV are 2 * len^2 * d per layer (half the square is masked), backward twice that."""
    return 6.0 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths)


def measure(name: str, model: str, settings: dict, out: Path, smoke: bool) -> dict:
    version = subset_version(settings["records"], out)
    configs = {
        f"curate:{k}": recipe_for(model, settings["sequence_len"], v) for k, v in settings["curate"].items()
    }
    reference = recipe_for(model, settings["sequence_len"], settings["reference"])
    train, held, tokenizer = rows_for(reference, version)
    warm = 2 if smoke else 4
    # one warm-up per kernel choice, and per compiled configuration (each compiles its own graphs). A
    # compiled one trains a whole discarded run: a few steps may not meet every graph a run needs (packed
    # rows of one example attend without a mask, rows of several with one: two compilations), and a
    # compilation left for a measured run would be counted as its training time
    groups: dict[tuple, list[str]] = {}  # configurations that share a warm-up
    for k, c in settings["curate"].items():
        groups.setdefault((c["kernels"], c.get("compile") and k), []).append(f"curate:{k}")
    warmups: dict[str, float] = {}
    failed: dict[str, str] = {}
    for sides in groups.values():
        curate = settings["curate"][sides[0].removeprefix("curate:")]
        steps = None if curate.get("compile") else warm
        recipe = recipe_for(model, settings["sequence_len"], curate, max_steps=steps)
        try:
            warmups[sides[0]] = run_curate(recipe, version, out / "warm")["seconds"]
        except Exception as exc:  # reported with its traceback; the other configurations are still measured
            traceback.print_exc()
            for side in sides:  # those that share its warm-up would fail alike
                failed[side] = f"{type(exc).__name__}: {exc}"
                configs.pop(side)
            _free()
            continue
        print(f"[{name}] warm-up {sides[0]}: {warmups[sides[0]]:.1f} s", flush=True)
    run_trl(reference, train, held, tokenizer, out / "warm-trl", steps=warm)
    order = [*configs, "trl", "trl", *reversed(configs)]  # every side once early and once late
    runs: dict[str, list[dict]] = {side: [] for side in ["trl", *configs]}
    for side in order:
        print(f"[{name}] {side} ...", flush=True)
        if side == "trl":
            runs[side].append(run_trl(reference, train, held, tokenizer, out / "trl"))
        else:
            runs[side].append(run_curate(configs[side], version, out / "curate"))
        print(f"[{name}] {side}: {json.dumps(runs[side][-1])}", flush=True)  # kept if a later run dies
        _free()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    flops = model_flops_per_token(config, LORA["r"], 4)
    lengths = [len(r["input_ids"]) for r in train]
    per_token = flops["per_token"] + attention_flops(config, lengths) / max(sum(lengths), 1)
    summary: dict = {
        "workload": name,
        "records": settings["records"],
        "train_rows": len(train),
        "settings": settings,
        "warmup_seconds": warmups,  # a compiled configuration's includes its compilations
        "failed": failed,  # configuration -> the error its warm-up raised
        "sides": {},
    }
    for side, results in runs.items():
        tps = statistics.fmean(r["tokens_per_second"] for r in results)
        summary["sides"][side] = {
            "runs": results,
            "tokens_per_second": tps,
            "peak_gpu_memory_gb": max(r["peak_gpu_memory_gb"] for r in results),
            "heldout_loss": statistics.fmean(r["heldout_loss"] for r in results),
            "mfu": tps * per_token / H200_BF16_DENSE_FLOPS,
            "vs_trl": tps / statistics.fmean(r["tokens_per_second"] for r in runs["trl"]),
        }
    summary["flops"] = {**flops, "per_token_with_attention": per_token}
    return summary


def table(results: list[dict]) -> str:
    lines = [
        "| workload | trainer | tokens/s (early, late) | vs TRL | peak GPU GB | held-out loss | steps "
        "| MFU |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in results:
        for side, r in s["sides"].items():
            each = ", ".join(f"{x['tokens_per_second']:,.0f}" for x in r["runs"])
            lines.append(
                f"| {s['workload']} | {'TRL defaults' if side == 'trl' else side} | "
                f"{r['tokens_per_second']:,.0f} ({each}) | {r['vs_trl']:.2f}x | "
                f"{r['peak_gpu_memory_gb']:.2f} | "
                f"{r['heldout_loss']:.4f} | {r['runs'][0]['steps']} | {100 * r['mfu']:.1f}% |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="SmolLM2-135M-Instruct folder (its tokenizer serves both)"
    )
    parser.add_argument("--out", type=Path, required=True, help="train_speed.json goes here")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/train-speed-work"), help="models and runs (removed after)"
    )
    parser.add_argument("--only", choices=["smollm2", "llama3-8b-shape"], help="one workload")
    parser.add_argument(
        "--configs", help="comma-separated curate configurations to run (default: all of the workload's)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="seed of every side, for the loss's seed noise (default: each side's own, TRL 42, curate 0)",
    )
    parser.add_argument(
        "--records",
        type=int,
        help="records of the workload (default: 800 for SmolLM2, 300 for the 8B shapes); more records "
        "make more steps, so a run's start weighs less in its tokens/s",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny runs of both workloads on the CPU, to check the script"
    )
    args = parser.parse_args()
    results = []
    for name, settings in workloads(args.smoke).items():
        if args.only and name != args.only:
            continue
        if args.configs:
            chosen = args.configs.split(",")
            unknown = set(chosen) - set(settings["curate"])
            if unknown:
                parser.error(
                    f"{name} has no configuration {sorted(unknown)}; it has {sorted(settings['curate'])}"
                )
            settings = {**settings, "curate": {k: settings["curate"][k] for k in chosen}}
        if args.records:
            settings = {**settings, "records": args.records}
        if args.seed is not None:
            seeded = {"seed": args.seed}
            settings = {
                **settings,
                "reference": {**settings["reference"], **seeded},
                "curate": {k: {**v, **seeded} for k, v in settings["curate"].items()},
            }
        model = args.model if name == "smollm2" else str(llama3_8b_shape(args.model, args.work, args.smoke))
        results.append(measure(name, model, settings, args.work / name, args.smoke))
        print(table(results), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_speed.json").write_text(json.dumps(results, indent=1))  # kept if a later one dies
    from curate.train.metrics import library_versions

    print(json.dumps(library_versions()))
    print(
        "\nMFU = tokens/s x FLOPs per token / 989.4 TFLOPS (H200 bf16 dense). FLOPs per token = 4 x "
        "frozen linear parameters (forward + input gradient; no weight gradient for a frozen base) + 6 x "
        "LoRA parameters + attention 6 x layers x hidden x sum(len^2) / tokens (causal, per example)."
    )
    for s in results:
        f = s["flops"]
        print(
            f"{s['workload']}: linear params {f['linear_params']:,}, LoRA params {f['lora_params']:,}, "
            f"FLOPs/token {f['per_token_with_attention'] / 1e9:.2f} G"
        )
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
