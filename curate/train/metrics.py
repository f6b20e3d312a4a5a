"""What a training run measures (loss per step, tokens, speed, memory, versions) and its loss-curve plot."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class Laps:
    """Where a run's wall time goes: `laps("phase")` adds the seconds since the previous call (or since
    the start) to that phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 3)
        self._last = now


class RunLog(TrainerCallback):
    """Collects train and eval loss per step with tokens seen, and stops at the recipe's token budget."""

    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens
        self.train: list[dict] = []
        self.eval: list[dict] = []
        self.started = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.max_tokens is not None and state.num_input_tokens_seen >= self.max_tokens:
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        at = {"step": state.global_step, "tokens": int(state.num_input_tokens_seen)}
        if "loss" in logs:
            self.train.append(
                {**at, "loss": float(logs["loss"]), "seconds": time.perf_counter() - self.started}
            )
        evals = {k[5:-5]: float(v) for k, v in logs.items() if k.startswith("eval_") and k.endswith("_loss")}
        if evals and self.eval and self.eval[-1]["step"] == at["step"]:
            self.eval[-1]["loss"].update(evals)  # each eval set logs on its own; one entry per step
        elif evals:
            self.eval.append({**at, "loss": evals})


def peak_memory() -> dict:
    """Peak GPU memory (GB) when CUDA ran, and this process's peak resident memory (GB)."""
    import torch

    gpu = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    return {"peak_gpu_memory_gb": gpu, "peak_rss_gb": rss}


def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def plot_loss(log: RunLog, path: Path, title: str) -> None:
    """Train loss per step and eval loss per eval set, on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if log.train:
        ax.plot([p["step"] for p in log.train], [p["loss"] for p in log.train], label="train", lw=1)
    names = sorted({k for p in log.eval for k in p["loss"]})
    for name in names:
        pts = [(p["step"], p["loss"][name]) for p in log.eval if name in p["loss"]]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=f"eval {name}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
