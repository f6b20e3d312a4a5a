"""Where a training step's time goes: step time, GPU busy fraction and the top operators, per variant.

`bench/train_speed.py` says how fast curate trains against TRL; this says why. Each variant is a curate
configuration (micro batch, checkpointing, kernels) with, optionally, one change to what runs in a step
(`PATCHES`), trained for a few dozen steps on the same rows as train_speed, twice in mirrored order
after a discarded warm-up training. It prints, per variant: the median step time after warm-up,
tokens per step, tokens/s, memory as the loop starts and at its peak, the GPU's kernel time per step
and its share of the step (low = the host is the bottleneck: Python, kernel launches, syncs), the
operators that take the most GPU and the most host time, and (on a GPU) each place where one step's
host waited for the GPU.

  here:    python bench/train_gpu.py build      # stages the version (.gpu-data/version)
  on GPU:  python bench/train_profile.py --model $CURATE_GPU_MODEL --workload smollm2
  check:   python bench/train_profile.py --model DIR --workload smollm2 --smoke   # tiny, on CPU
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import llama3_8b_shape, recipe_for, subset_version  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from curate.train.trainer import run_training  # noqa: E402


@contextlib.contextmanager
def trl_loss():
    """TRL's own compute_loss, with its per-step metrics (entropy, token accuracy, token count: three
    host syncs a step), as curate trained until it computed the loss alone."""
    import curate.train.trainer as trainer_module

    original = trainer_module._trainer_class

    def with_trl_loss(base: type, model_loss: bool) -> type:
        class WithTRLLoss(original(base, model_loss)):
            lm_head_outputs = ("log_probs", "entropy", "is_top1")
            compute_loss = base.compute_loss

        return WithTRLLoss

    trainer_module._trainer_class = with_trl_loss
    try:
        yield
    finally:
        trainer_module._trainer_class = original


@contextlib.contextmanager
def dequantized_once():
    """Every 4-bit layer multiplies by its weight dequantized once and kept (the same bf16 values
    bitsandbytes makes on every call), to see what dequantizing per call costs; it costs the memory of
    a bf16 copy of the base."""
    import bitsandbytes as bnb
    import torch

    original = bnb.nn.Linear4bit.forward

    def forward(self, x):
        weight = getattr(self, "_dequantized", None)
        if weight is None:
            weight = bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)
            self._dequantized = weight.to(self.compute_dtype or x.dtype)
            weight = self._dequantized
        return torch.nn.functional.linear(x.to(weight.dtype), weight, self.bias).to(x.dtype)

    bnb.nn.Linear4bit.forward = forward
    try:
        yield
    finally:
        bnb.nn.Linear4bit.forward = original


@contextlib.contextmanager
def concatenated_rows():
    """TRL's padding-free collator: a micro-batch's packed rows concatenated into one row, which SDPA
    attends over whole, as curate did until it kept the rows apart (curate.train.collate)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    import curate.train.collate as collate

    original = collate.PackedRowCollator
    collate.PackedRowCollator = lambda pad: DataCollatorForLanguageModeling(pad, padding_free=True)
    try:
        yield
    finally:
        collate.PackedRowCollator = original


@contextlib.contextmanager
def host_syncs():
    """transformers' own step, which reads values back from the GPU (a wait for the GPU each): the
    loss's NaN check, the token count, packed rows' attention mask derived from position ids, and the
    loss and gradient norm at every log; batches copied to the GPU with a wait. curate's step reads
    none of these (`curate.train.trainer._trainer_class`); TRL's head and the compiled code still read
    a few."""
    from transformers import Trainer

    import curate.train.trainer as trainer_module

    original_class, original_config = trainer_module._trainer_class, trainer_module._sft_config

    def with_syncs(base: type, model_loss: bool, compile_layers: bool = False) -> type:
        class WithSyncs(original_class(base, model_loss, compile_layers)):
            _maybe_log_save_evaluate = Trainer._maybe_log_save_evaluate
            _track_num_input_tokens = Trainer._track_num_input_tokens

            def _model_inputs(self, inputs: dict) -> dict:
                return {**{k: v for k, v in inputs.items() if k != "num_tokens"}, "use_cache": False}

        return WithSyncs

    def config_with_syncs(*args, **kwargs):
        config = original_config(*args, **kwargs)
        config.logging_nan_inf_filter = True
        config.accelerator_config.non_blocking = False
        return config

    trainer_module._trainer_class, trainer_module._sft_config = with_syncs, config_with_syncs
    try:
        yield
    finally:
        trainer_module._trainer_class, trainer_module._sft_config = original_class, original_config


@contextlib.contextmanager
def bitsandbytes_ops():
    """The compiled layers multiply through bitsandbytes' own 4-bit operators, as curate did until its
    compiled layers dequantized with torch operations in the graph (`curate.train.nf4`)."""
    import curate.train.compile as compile_module

    original = compile_module.torch_dequantized

    @contextlib.contextmanager
    def unswapped(modules):
        yield 0

    compile_module.torch_dequantized = unswapped
    try:
        yield
    finally:
        compile_module.torch_dequantized = original


PATCHES = {
    "none": contextlib.nullcontext,
    "bitsandbytes_ops": bitsandbytes_ops,
    "host_syncs": host_syncs,
    "trl_loss": trl_loss,
    "dequantized_once": dequantized_once,
    "concatenated_rows": concatenated_rows,
}


def config(micro_batch: int, checkpointing: bool, kernels: str = "auto", **more) -> dict:
    return {
        "micro_batch_size": micro_batch,
        "gradient_checkpointing": checkpointing,
        "kernels": kernels,
        **more,
    }


MATCHED = config(1, True)  # train_speed's `matched`: about TRL's tokens per step and memory
SMOL = {
    "matched": (MATCHED, "none"),
    "matched+trl_loss": (MATCHED, "trl_loss"),
    "matched+dequantized_once": (MATCHED, "dequantized_once"),
    "matched-liger": (config(1, True, "none"), "none"),
    "seq1536": (config(1, True, sequence_len=1536), "none"),
    "mb4+ckpt": (config(4, True), "none"),
    "mb8+ckpt": (config(8, True), "none"),
    "mb1-ckpt": (config(1, False), "none"),
    "mb8-ckpt": (config(8, False), "none"),  # the ablation's and train_speed's fast_lr setting
    "mb8-ckpt+concatenated": (config(8, False), "concatenated_rows"),
    "mb8+ckpt+concatenated": (config(8, True), "concatenated_rows"),
    "seq1536-liger": (config(1, True, "none", sequence_len=1536), "none"),
    "seq1536+compile": (config(1, True, sequence_len=1536, compile=True), "none"),
    "seq1536+compile+host_syncs": (config(1, True, sequence_len=1536, compile=True), "host_syncs"),
    "seq1536+compile+bnb_ops": (config(1, True, sequence_len=1536, compile=True), "bitsandbytes_ops"),
    "seq1536+compile+liger": (config(1, True, "liger", sequence_len=1536, compile=True), "none"),
    "mb8-ckpt+compile": (config(8, False, compile=True), "none"),
}
BIG = {
    "matched": (MATCHED, "none"),
    "matched+trl_loss": (MATCHED, "trl_loss"),
    "matched+log10": (config(1, True, logging_steps=10), "none"),
    "seq1536": (config(1, True, sequence_len=1536), "none"),
    "mb2+ckpt": (config(2, True), "none"),
    "mb2+ckpt+concatenated": (config(2, True), "concatenated_rows"),
    "matched+dequantized_once": (MATCHED, "dequantized_once"),
    "mb4-ckpt": (config(4, False), "none"),
    "seq1536-liger": (config(1, True, "none", sequence_len=1536), "none"),
    "seq1536+compile": (config(1, True, sequence_len=1536, compile=True), "none"),
    "seq1536+compile+host_syncs": (config(1, True, sequence_len=1536, compile=True), "host_syncs"),
    "seq1536+compile+bnb_ops": (config(1, True, sequence_len=1536, compile=True), "bitsandbytes_ops"),
    "seq1536+compile+liger": (config(1, True, "liger", sequence_len=1536, compile=True), "none"),
    "mb4-ckpt+compile": (config(4, False, compile=True), "none"),
    "mb8-ckpt+compile": (config(8, False, compile=True), "none"),  # train_speed's fast8+compile
}
WORKLOADS = {"smollm2": (1024, 800, SMOL), "llama3-8b-shape": (2048, 300, BIG)}


def memory_at_peak(profiler, device: str) -> tuple[int, dict[str, int]]:
    """The bytes live at the traced step's memory peak, by what the profiler says each tensor is
    (parameter, optimizer state, gradient, activation, temporary, ...). torch's allocator history
    (`torch.cuda.memory._record_memory_history`) would name the line, but on torch 2.11 it breaks
    autograd Functions under activation checkpointing (pytorch/pytorch#179536)."""
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    _, sizes = MemoryProfileTimeline(profiler._memory_profile())._coalesce_timeline(device)
    peak = max(sizes, key=sum)
    names = [category.name.lower() if category else "unknown" for category in _CATEGORY_TO_INDEX]
    return sum(peak), {name: peak[i + 1] for i, name in enumerate(names) if peak[i + 1]}


class StepClock(TrainerCallback):
    """The wall time and tokens of every step, a torch profiler over a few steps and, optionally, a
    memory profile of one step (what is live at its peak, by kind)."""

    def __init__(self, profile_from: int | None, profile_steps: int, memory_step: int | None = None) -> None:
        import torch

        self.times: list[float] = []
        self.tokens: list[int] = []
        self.profile_from, self.profile_steps = profile_from, profile_steps
        self.profiler = None
        self.cuda = torch.cuda.is_available()
        self.start_memory_gb = 0.0
        self.memory_step = memory_step if self.cuda else None
        self.memory_profiler = None
        self.memory_peak: tuple[int, dict[str, int]] | None = None
        self.sync_catcher = None
        self.syncs: list = []

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        import torch

        if self.cuda and self.profile_from is not None and state.global_step == self.profile_from - 1:
            # one whole step, logging included, with every host read of a GPU value reported
            torch.cuda.set_sync_debug_mode("warn")
            self.sync_catcher = warnings.catch_warnings(record=True)
            self.syncs = self.sync_catcher.__enter__()
            warnings.simplefilter("always")
        elif self.sync_catcher is not None:
            torch.cuda.set_sync_debug_mode(0)
            self.sync_catcher.__exit__(None, None, None)
            self.sync_catcher = None
        if state.global_step == self.memory_step:
            self.memory_profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                profile_memory=True,
                record_shapes=True,
                with_stack=True,
            )
            self.memory_profiler.__enter__()

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        import torch

        if self.cuda:  # base, adapter and optimizer as the loop starts; the rest of the peak is the step's
            self.start_memory_gb = torch.cuda.memory_allocated() / 1e9

    def on_step_end(self, args, state, control, **kwargs) -> None:
        import torch

        self.times.append(time.perf_counter())
        self.tokens.append(int(state.num_input_tokens_seen))
        step = state.global_step
        if self.memory_step is not None and step == self.memory_step + 1:
            torch.cuda.synchronize()
            self.memory_profiler.__exit__(None, None, None)
            try:  # a private API of torch's: a failure here must not cost the run
                self.memory_peak = memory_at_peak(self.memory_profiler, f"cuda:{torch.cuda.current_device()}")
            except Exception as error:  # noqa: BLE001
                print(f"memory categories failed: {error!r}", flush=True)
        if step == self.profile_from:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                torch.cuda.synchronize()
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        elif self.profiler is not None and step == self.profile_from + self.profile_steps:
            if self.cuda:
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)


def report(name: str, clock: StepClock, metrics: dict, skip: int, top: int) -> dict:
    steps = [b - a for a, b in zip(clock.times[skip:], clock.times[skip + 1 :], strict=False)]
    tokens = [b - a for a, b in zip(clock.tokens[skip:], clock.tokens[skip + 1 :], strict=False)]
    step = statistics.median(steps) if steps else float("nan")
    per_step = statistics.fmean(tokens) if tokens else 0.0
    row = {
        "variant": name,
        "step_seconds": step,
        "tokens_per_step": per_step,
        "peak_gpu_memory_gb": metrics.get("peak_gpu_memory_gb") or 0.0,
        "start_gpu_memory_gb": clock.start_memory_gb,
        "gpu_ms_per_step": None,
    }
    prof = clock.profiler
    if prof is None:
        return row
    if clock.cuda:
        where = collections.Counter(
            f"{Path(w.filename).name}:{w.lineno}" for w in clock.syncs if "synchroniz" in str(w.message)
        )
        listed = ", ".join(f"{place} x{n}" for place, n in where.most_common()) or "none"
        print(f"\n=== {name}: host waits for the GPU in one step: {sum(where.values())} ({listed}) ===")
    averages = prof.key_averages()
    device_key = "self_device_time_total"
    if not hasattr(averages[0], device_key):  # torch before 2.4
        device_key = "self_cuda_time_total"
    if clock.cuda:  # kernel time per step against the unprofiled step: the profiler slows the host
        kernel_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type.name == "CUDA")
        row["gpu_ms_per_step"] = kernel_us / 1e3 / clock.profile_steps
    print(f"\n=== {name}: top operators by GPU time ({clock.profile_steps} steps) ===")
    if clock.cuda:
        print(averages.table(sort_by=device_key, row_limit=top, max_name_column_width=60))
    print(f"\n=== {name}: top operators by host time ===")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    if clock.memory_peak is not None:
        peak, categories = clock.memory_peak
        shares = ", ".join(
            f"{kind} {size / 1e9:.2f}" for kind, size in sorted(categories.items(), key=lambda c: -c[1])
        )
        print(f"\n=== {name}: memory at one step's peak: {peak / 1e9:.2f} GB ({shares}) ===")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="SmolLM2-135M-Instruct folder (its tokenizer serves both)"
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="smollm2")
    parser.add_argument("--variants", help="comma-separated names (default: all of the workload's)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per variant")
    parser.add_argument("--top", type=int, default=12, help="operators listed per table")
    parser.add_argument("--work", type=Path, default=Path("/tmp/train-profile-work"))
    parser.add_argument("--smoke", action="store_true", help="tiny rows and steps, on the CPU")
    parser.add_argument(
        "--memory", action="store_true", help="profile one step's memory: what is live at its peak (GPU)"
    )
    args = parser.parse_args()
    sequence_len, records, variants = WORKLOADS[args.workload]
    if args.smoke:
        sequence_len, records, args.steps = 128, 48, 6
    model = args.model
    if args.workload != "smollm2":
        model = str(llama3_8b_shape(args.model, args.work, args.smoke))
    version = subset_version(records, args.work)
    names = args.variants.split(",") if args.variants else list(variants)
    skip = max(2, args.steps // 3)
    if args.memory and not args.smoke and args.steps < skip + 5:  # 3 profiled steps, then the traced one
        parser.error(f"--memory needs --steps of at least {skip + 5}")

    def train(name: str, steps: int, profile: bool) -> tuple[StepClock, dict]:
        settings, patch = variants[name]
        profile_steps = 3 if not args.smoke else 2
        memory_step = skip + profile_steps + 1 if profile and args.memory else None
        clock = StepClock(skip if profile else None, profile_steps, memory_step)
        recipe = recipe_for(model, sequence_len, settings, max_steps=steps)
        with PATCHES[patch]():
            metrics = run_training(recipe, version, args.work / "run", show_progress=False, callbacks=[clock])
        return clock, metrics

    # the first training in a process runs slower whoever goes first: a discarded one, then every
    # variant twice in mirrored order (each once early and once late), profiled on its first run
    train(names[0], skip + 2, profile=False)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for name in [*names, *reversed(names)]:
        print(f"[{args.workload}] {name} ...", flush=True)
        clock, metrics = train(name, args.steps, profile=not runs[name])
        runs[name].append(report(name, clock, metrics, skip, args.top))
    print(
        f"\n{args.workload}: median step after {skip} warm-up steps, the mean of two runs in mirrored "
        "order (each run's in brackets); GPU ms = kernel time per profiled step; GPU busy = GPU ms / step"
    )
    print("| variant | step s (runs) | tokens/step | tokens/s | GB at start | peak GB | GPU ms | GPU busy |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, results in runs.items():
        step = statistics.fmean(r["step_seconds"] for r in results)
        per_step = statistics.fmean(r["tokens_per_step"] for r in results)
        gpu_ms = results[0]["gpu_ms_per_step"]
        busy = "- | -" if gpu_ms is None else f"{gpu_ms:.0f} | {100 * gpu_ms / 1e3 / step:.0f}%"
        each = ", ".join(f"{r['step_seconds']:.3f}" for r in results)
        print(
            f"| {name} | {step:.3f} ({each}) | {per_step:,.0f} | {per_step / step:,.0f} | "
            f"{results[0]['start_gpu_memory_gb']:.2f} | "
            f"{max(r['peak_gpu_memory_gb'] for r in results):.2f} | {busy} |"
        )


if __name__ == "__main__":
    main()
