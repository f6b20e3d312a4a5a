"""`curate train`: QLoRA fine-tuning of a base model on a dataset version with TRL's SFTTrainer.

The data is tokenized here (labels from the rendered template's trained spans), so TRL only packs
(best-fit, padding-free: position ids restart per example, so attention never crosses examples),
batches and trains. The run writes adapter/, metrics.json, loss.png and train_recipe.json, then
runs the evaluation gates on the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curate.errors import CurateError
from curate.templates import TEMPLATE_NAMES
from curate.train.data import Version, encode_all, eval_references, load_version, split_holdout
from curate.train.recipe import TrainRecipe, load_recipe
from curate.versions import write_atomic

if TYPE_CHECKING:
    from curate.train.session import BaseModels

# Eval-set loss is cheap next to generation, so it reads this many times the gates' max_items.
EVAL_LOSS_ITEMS_PER_GATE_ITEM = 4


def resolve_template(recipe: TrainRecipe, version: Version | None, tokenizer_path: str) -> str:
    """The recipe's template, else the version's normalize template, else the tokenizer's own, else chatml."""
    chosen = recipe.template or (version.template if version else None)
    if chosen in (None, "tokenizer"):
        from transformers import AutoTokenizer

        has_own = bool(getattr(AutoTokenizer.from_pretrained(tokenizer_path), "chat_template", None))
        if chosen == "tokenizer" and not has_own:
            raise CurateError(
                "template: tokenizer, but the tokenizer has no chat template", hint="use chatml"
            )
        return "tokenizer" if has_own else "chatml"
    if chosen not in TEMPLATE_NAMES:
        return recipe.path(chosen) or chosen
    return chosen


def template_object(template: str, tokenizer: Any) -> Any:
    """What `render` takes: a template name, or the (prepared) tokenizer for its own chat template."""
    return tokenizer if template == "tokenizer" else template


def eval_set_conversations(
    recipe: TrainRecipe, version: Version | None
) -> dict[str, list[tuple[str, list[dict]]]]:
    """Each eval set with references as (item id, question -> answer conversation), for eval loss."""
    out = {}
    for name, items in eval_references(recipe, version):
        if items:
            items = items[: recipe.gates.max_items * EVAL_LOSS_ITEMS_PER_GATE_ITEM]
            out[name] = [
                (
                    str(it["id"]),
                    [
                        {"role": "user", "content": str(it["question"])},
                        {"role": "assistant", "content": str(it["answer"])},
                    ],
                )
                for it in items
            ]
    return out


def _dataset(rows: list[dict]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows)


def run_training(
    recipe_path: str | Path | None,
    data_version: str | Path,
    out_dir: str | Path,
    overrides: dict | None = None,
    show_progress: bool = True,
    verbose: bool = False,
    bases: BaseModels | None = None,
    callbacks: list | None = None,
) -> dict:
    """Train a QLoRA adapter on a version; returns metrics.json's content (gates included).

    The terminal shows one progress display (none with show_progress=False); the libraries' own
    logs, bars and warnings only with verbose (curate.train.console). Runs given the same `bases`
    share the loaded base model and its measured figures (curate.train.session). `callbacks`
    (transformers TrainerCallbacks) see the training loop, e.g. to profile steps."""
    from curate.train.console import TrainConsole

    with TrainConsole(show_progress, verbose) as console:
        return _train(recipe_path, data_version, out_dir, overrides, console, bases, callbacks or [])


def _train(
    recipe_path: str | Path | None,
    data_version: str | Path,
    out_dir: str | Path,
    overrides: dict | None,
    console: Any,
    bases: BaseModels | None,
    callbacks: list,
) -> dict:
    import torch
    from transformers import set_seed
    from trl import SFTTrainer

    from curate.train import gates as gate_mod
    from curate.train.metrics import Laps, RunLog, library_versions, peak_memory, plot_loss
    from curate.train.model import device, lora_config, resolve_base
    from curate.train.session import BaseModels

    wall0 = time.perf_counter()
    laps = Laps()
    recipe = load_recipe(recipe_path, overrides)
    version = load_version(data_version)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases = bases or BaseModels(out / ".base")
    base = resolve_base(recipe, bases.cache_dir)
    template = resolve_template(recipe, version, base.tokenizer_path)
    loaded = bases.get(base, template, recipe)
    tokenizer, added = loaded.tokenizer, loaded.added
    tmpl = template_object(template, tokenizer)
    laps("load")

    # the seeds of an ablation arm train on the same rows: encoded once per loaded base
    encoding = (
        str(version.path),
        version.manifest.get("version"),
        template,
        recipe.sequence_len,
        recipe.fully_masked,
        repr((recipe.holdout, recipe.eval_sets, recipe.base_dir)),
    )
    if encoding not in loaded.encoded:
        loaded.encoded[encoding] = _encode_splits(recipe, version, tokenizer, tmpl)
    train_rows, held_rows, eval_data, eval_rows, dropped = loaded.encoded[encoding]
    laps("encode")
    if not held_rows:
        raise CurateError(
            "the held-out split is empty", hint="raise holdout.fraction or use a larger version"
        )

    # TRL wraps the model with the adapter, enables checkpointing and keeps the adapter in bf16 for
    # QLoRA; peft's prepare_model_for_kbit_training is not used: its fp32 copies of the embeddings
    # and LM head raised peak memory from 10.8 to 13.2 GB in bench/results/train_gpu.md.
    try:
        model = loaded.model
        peft_config = lora_config(recipe, model, tokenizer, added)

        on_gpu = device() == "cuda"
        config = _sft_config(recipe, out, tokenizer, train_rows, on_gpu)
        resume = resume_point(out / "checkpoints", _run_fingerprint(recipe, version, base), console)
        log = RunLog(recipe.max_tokens)
        trainer_cls = _trainer_class(SFTTrainer, model_loss=bool(added), compile_layers=recipe.compile)
        set_seed(recipe.seed)  # here, after any load: a run on a reused base starts its adapter alike
        trainer = trainer_cls(
            model=model,
            peft_config=peft_config,
            args=config,
            train_dataset=_dataset(train_rows),
            eval_dataset=eval_data,
            processing_class=tokenizer,
            callbacks=[
                log,
                *([] if recipe.save_steps else [_checkpoint_clock(recipe.checkpoint_minutes)]),
                *callbacks,
            ],
        )
        model = trainer.model
        trainer.scored = {"heldout": held_rows, **{name: rows for name, (_, rows) in eval_rows.items()}}
        trainer.scoring_tokens = gate_mod.scoring_tokens(recipe)
        console.prepare(trainer)
        laps("setup")
        before = trainer.evaluate(base_cache=loaded.base_losses)
        laps("eval_before")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.eval_seconds = 0.0
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
        train_seconds = time.perf_counter() - t0 - trainer.eval_seconds  # periodic evals are not training
        memory = peak_memory()
        laps("train")
        after = trainer.evaluate()
        laps("eval_after")

        _save_adapter(model, tokenizer, out / "adapter")
        saved = {
            **recipe.raw,
            "base_model": base.model_path,
            "tokenizer": base.tokenizer_path,
            "template": template,
        }
        (out / "train_recipe.json").write_text(
            json.dumps(
                {"recipe": saved, "base_dir": str(recipe.base_dir), "version": str(version.path)}, indent=1
            )
        )
        if recipe.merge:
            _write_merged(base.model_path, recipe, tokenizer, out)

        tokens = int(trainer.state.num_input_tokens_seen)
        trained_labels = sum(sum(1 for t in r["labels"] if t != -100) for r in train_rows)
        metrics: dict[str, Any] = {
            "recipe": recipe.name,
            "version": str(version.path),
            "version_id": version.manifest.get("version", version.path.name),
            "base_model": recipe.base_model,
            "template": template,
            "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
            "records": {
                "train": len(train_rows),
                "heldout": len(held_rows),
                "fully_masked_dropped": dropped,
                "eval_sets": {k: len(v) for k, v in eval_data.items() if k != "heldout"},
            },
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "tokens_seen": tokens,
            "trained_label_tokens_per_epoch": trained_labels,
            "resumed_from_step": resume[0] if resume else None,
            "train_seconds": train_seconds,
            "periodic_eval_seconds": trainer.eval_seconds,
            "tokens_per_second": tokens / train_seconds if train_seconds else None,
            "train_loss_mean": result.training_loss,
            "eval_loss_before": {k[5:-5]: v for k, v in before.items() if k.endswith("_loss")},
            "eval_loss_after": {k[5:-5]: v for k, v in after.items() if k.endswith("_loss")},
            "train_loss": log.train,
            "eval_loss": log.eval,
            **memory,
            "versions": library_versions(),
        }
        plot_loss(log, out / "loss.png", f"{recipe.name} on {metrics['version_id']}")
        model.eval()
        laps("save")
        # each eval item's own loss after training, for comparisons paired by item (curate ablate)
        metrics["item_losses"] = {
            name: dict(zip(ids, gate_mod.row_means(trainer.sums[name]), strict=True))
            for name, (ids, _) in eval_rows.items()
        }
        held = (metrics["eval_loss_after"]["heldout"], metrics["eval_loss_before"]["heldout"])
        metrics["gates"] = gate_mod.evaluate(model, loaded, tmpl, recipe, held_rows, version, console, held)
        laps("gates")
        metrics["seconds"] = laps.seconds
        metrics["wall_seconds"] = time.perf_counter() - wall0
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=1, default=str))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the run is complete: nothing to resume
    except BaseException:  # the base may hold half a run: the next run loads it afresh
        bases.drop()
        raise
    loaded.reclaim(model)
    return metrics


CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def _run_fingerprint(recipe: TrainRecipe, version: Version, base: Any) -> dict:
    """What a checkpoint must have been made with to be resumed: the recipe as run, the data
    version and the base model."""
    return {
        "recipe": recipe.raw,
        "version": version.manifest.get("version", str(version.path)),
        "base_model": base.model_path,
    }


def _checkpoint_clock(minutes: float) -> Any:
    """A callback that asks for a checkpoint once `minutes` passed since the start or the last one:
    a killed run loses at most that much, and a run shorter than that (an ablation's) writes none."""
    from transformers import TrainerCallback

    class CheckpointClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.monotonic() - self.last >= 60 * minutes:
                control.should_save = True
                self.last = time.monotonic()

    return CheckpointClock()


def resume_point(folder: Path, fingerprint: dict, console: Any) -> tuple[int, Path] | None:
    """(step, checkpoint) to resume from, when a killed run of the same recipe, version and base
    left a complete checkpoint; otherwise None, and the folder is made ready for this run. Either
    way the console says which."""
    stamp = folder / "run.json"
    same = stamp.is_file() and json.loads(stamp.read_text()) == json.loads(
        json.dumps(fingerprint, default=str)
    )
    complete = []
    if same:
        for path in folder.glob("checkpoint-*"):
            if all((path / name).is_file() for name in CHECKPOINT_FILES) and path.name[11:].isdigit():
                complete.append((int(path.name[11:]), path))
    if complete:
        step, path = max(complete)
        console.note(
            f"resuming from step {step}: a checkpoint an interrupted run of this recipe left ({path})"
        )
        return step, path
    if folder.exists():
        why = "none is complete" if same else "they were made with another recipe, version or base model"
        console.note(f"starting over: an interrupted run left checkpoints, but {why}")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    stamp.write_text(json.dumps(fingerprint, default=str))
    return None


def _save_adapter(model: Any, tokenizer: Any, folder: Path) -> None:
    """The adapter written beside its final place and moved there whole: a killed run never leaves
    a half-written adapter that looks finished."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _encode_splits(recipe: TrainRecipe, version: Version, tokenizer: Any, template: Any) -> tuple:
    """Token rows of the train and held-out splits, eval-set datasets, and ids of dropped examples."""
    train_idx, held_idx = split_holdout(
        version, recipe.holdout.fraction, recipe.holdout.max_records, recipe.holdout.salt
    )

    def encode(idx: list[int]) -> tuple:
        convs, ids = version.conversations, version.ids
        return encode_all(
            [convs[i] for i in idx],
            [ids[i] for i in idx],
            tokenizer,
            template,
            recipe.sequence_len,
            recipe.fully_masked,
        )

    train_rows, train_empty = encode(train_idx)
    held_rows, held_empty = encode(held_idx)
    eval_data = {"heldout": _dataset(held_rows)} if held_rows else {}
    eval_rows = {}  # per eval set: (item ids, rows), for each item's own loss after training
    for name, pairs in eval_set_conversations(recipe, version).items():
        item_ids = [item for item, _ in pairs]
        rows, empty = encode_all(
            [c for _, c in pairs], item_ids, tokenizer, template, recipe.sequence_len, "drop"
        )
        if rows:
            eval_data[name] = _dataset(rows)
            eval_rows[name] = ([i for i in item_ids if i not in set(empty)], rows)
    return train_rows, held_rows, eval_data, eval_rows, train_empty + held_empty


def _sft_config(recipe: TrainRecipe, out: Path, tokenizer: Any, train_rows: list[dict], on_gpu: bool) -> Any:
    """TRL's SFTConfig from the recipe; warmup and eval interval from the expected number of steps."""
    import torch
    from trl import SFTConfig

    train_tokens = sum(len(r["input_ids"]) for r in train_rows)
    epochs = recipe.num_epochs
    if recipe.max_tokens is not None:  # enough passes to spend the budget; the budget callback stops
        epochs = max(epochs, math.ceil(recipe.max_tokens / max(train_tokens, 1)))
    per_step = recipe.micro_batch_size * recipe.gradient_accumulation_steps
    if recipe.packing:
        steps = math.ceil(train_tokens * epochs / (recipe.sequence_len * per_step))
    else:
        steps = math.ceil(len(train_rows) * epochs / per_step)
    if recipe.max_tokens is not None:
        steps = min(steps, math.ceil(recipe.max_tokens / (recipe.sequence_len * per_step)))
    steps = max(1, recipe.max_steps or steps)
    bf16 = recipe.bnb_4bit_compute_dtype == "bfloat16" and (not on_gpu or torch.cuda.is_bf16_supported())
    return SFTConfig(
        output_dir=str(out / "checkpoints"),
        max_length=recipe.sequence_len,
        packing=recipe.packing,
        packing_strategy="bfd",
        per_device_train_batch_size=recipe.micro_batch_size,
        per_device_eval_batch_size=recipe.micro_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=int(recipe.warmup_ratio * steps),
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        num_train_epochs=epochs,
        max_steps=recipe.max_steps or -1,
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=bf16,
        gradient_checkpointing=recipe.gradient_checkpointing,
        eval_strategy="steps",
        eval_steps=recipe.eval_steps or max(1, steps // 10),
        logging_steps=recipe.logging_steps,
        save_strategy="steps" if recipe.save_steps else "no",  # else by the clock: CheckpointClock
        save_steps=recipe.save_steps or 500,
        save_total_limit=1,
        save_only_model=False,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # its check reads the loss back every step; a NaN loss is logged as NaN
        accelerator_config={"non_blocking": on_gpu},  # batches copy to the GPU from pinned memory, unwaited
        optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        use_liger_kernel=use_liger(recipe.kernels, on_gpu, recipe.compile),
        dataloader_num_workers=0,
        use_cpu=not on_gpu,
    )


def use_liger(kernels: str, on_gpu: bool, compiled: bool = False) -> bool:
    """Whether to train with Liger's kernels: `liger` asks for them (an error without a GPU or the
    package), `auto` takes them when both are there and the layers are not compiled (the compiler fuses
    the same norms, rotations and activations itself). TRL applies the layer kernels (RMSNorm, RoPE,
    SwiGLU) only; it keeps its own chunked LM-head loss, which never materializes the logits."""
    import importlib.util

    have = importlib.util.find_spec("liger_kernel") is not None
    if kernels == "liger" and not (have and on_gpu):
        raise CurateError(
            "kernels: liger needs a CUDA GPU and the liger-kernel package",
            hint="pip install liger-kernel, or set kernels: auto",
        )
    return kernels == "liger" or (kernels == "auto" and have and on_gpu and not compiled)


def _trainer_class(base: type, model_loss: bool, compile_layers: bool = False) -> type:
    """SFTTrainer whose evaluation scores every eval set row by row (see `evaluate`) and is timed apart
    (so tokens/s counts training alone), and whose step computes the loss and nothing else (see
    `compute_loss`). When tokens were added for the template, it trains with the model's own loss:
    TRL's fused LM head reads `lm_head.weight` directly and would skip the trained rows of the added
    tokens. With `compile_layers`, the decoder layers train compiled (curate.train.compile).

    A step does not wait for the GPU to read back what the host knew or could read later, so the host
    can queue the next kernels while the GPU works. transformers' loop reads back, each a wait for all
    queued work: the loss's NaN check (`logging_nan_inf_filter`, off), the token count (the collator
    counts on the host), whether packed rows' position ids restart (the mask is made on the GPU,
    `_model_inputs`) and, at every log, the loss and gradient norm (copied back without waiting and
    logged once arrived: `_maybe_log_save_evaluate`). Left: TRL's head picks the trained positions,
    and rows of one conversation let transformers check that they are (it keeps flash attention). On
    a host-bound step this changes nothing (bench/results/train_profile.md, run 7); it counts where
    the GPU is the bottleneck."""
    from collections import deque

    import torch
    from transformers import Trainer
    from trl.trainer.utils import add_fused_lm_head

    from curate.train.collate import PackedRowCollator, packed_attention_mask
    from curate.train.compile import compiled_layers, decoder_layers, eager_layers
    from curate.train.gates import mean_loss, summed_losses

    class CurateSFTTrainer(base):
        eval_seconds = 0.0
        scored: dict[str, list[dict]] = {}  # eval set -> token rows that `evaluate` scores
        scoring_tokens = 0  # padded tokens per scoring pass
        sums: dict[str, tuple] = {}  # the last evaluation's (summed loss, trained tokens) per row, per set
        lm_head_outputs: tuple[str, ...] = ("log_probs",)  # what the fused LM head computes per token

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.padding_free:  # packed rows stay rows: SDPA's attention would span all of them
                self.data_collator = PackedRowCollator(self.processing_class.pad_token_id)
            if not (self.args.bf16 or self.args.fp16):  # TRL casts QLoRA adapters to bf16 whatever the
                for param in self.model.parameters():  # compute dtype: float32 training keeps them float32
                    if param.requires_grad:
                        param.data = param.data.float()
            if not model_loss:  # TRL's head also computes entropy and top-1 hits, for metrics we skip
                inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                inner.__dict__.pop("forward", None)
                add_fused_lm_head(inner, outputs=self.lm_head_outputs)

        def train(self, *args: Any, **kwargs: Any) -> Any:
            self._unread_logs: deque[tuple] = deque()
            with compiled_layers(self.model, compile_layers):
                out = super().train(*args, **kwargs)
            self._log_arrived(wait=True)
            return out

        def _track_num_input_tokens(self, inputs: dict) -> None:
            """The collator's host-side count (transformers would sum on the GPU and read it back)."""
            if "num_tokens" in inputs and self.args.world_size == 1:
                self.state.num_input_tokens_seen += inputs["num_tokens"]
            else:
                super()._track_num_input_tokens(inputs)

        def _maybe_log_save_evaluate(self, tr_loss: Any, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
            """transformers' logging reads the loss and gradient norm with `.item()`, which waits for the
            whole step. Here they are copied to the host without waiting and logged, under the step they
            belong to, once the copy has arrived (by the next step, as a rule); an evaluation, a
            checkpoint and the end of training wait for every earlier log, so the logs stay in order."""
            state, control = self.state, self.control
            if control.should_log and state.global_step > self._globalstep_last_logged:
                steps = state.global_step - self._globalstep_last_logged
                values = [(tr_loss.detach() / steps).to("cpu", non_blocking=True)]
                if isinstance(grad_norm, torch.Tensor):
                    values.append(grad_norm.detach().to("cpu", non_blocking=True))
                arrived = None
                if tr_loss.is_cuda:
                    arrived = torch.cuda.Event()
                    arrived.record()
                rate = kwargs.get("learning_rate")
                rate = self._get_learning_rate() if rate is None else rate
                at = (state.global_step, state.num_input_tokens_seen, state.epoch)
                self._unread_logs.append((at, steps, values, arrived, rate))
                tr_loss -= tr_loss  # after the copy on the same stream, so the copy holds the sum
                self._globalstep_last_logged = state.global_step
                control.should_log = False
            ends = control.should_training_stop or state.global_step >= state.max_steps
            self._log_arrived(wait=ends or control.should_evaluate or control.should_save)
            super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

        def _log_arrived(self, wait: bool) -> None:
            """Logs the queued losses whose copies have arrived (with `wait`, all of them), each under
            its own step and token count, as transformers would have logged it then."""
            state, queue = self.state, self._unread_logs
            while queue and (wait or queue[0][3] is None or queue[0][3].query()):
                at, steps, values, arrived, rate = queue.popleft()
                if arrived is not None:
                    arrived.synchronize()  # that log's copy only, not the work queued since
                loss = values[0].item()
                self._total_loss_scalar += loss * steps
                logs = {"loss": loss, "learning_rate": rate}
                if len(values) > 1:
                    logs["grad_norm"] = values[1].item()
                now = (state.global_step, state.num_input_tokens_seen, state.epoch)
                state.global_step, state.num_input_tokens_seen, state.epoch = at
                try:
                    self.log(logs)
                finally:
                    state.global_step, state.num_input_tokens_seen, state.epoch = now

        def _model_inputs(self, inputs: dict) -> dict:
            """The batch as the model takes it: without the collator's token count and, for rows of
            several conversations, with their attention mask made on the GPU from the position ids."""
            inputs = {k: v for k, v in inputs.items() if k != "num_tokens"}
            inputs["use_cache"] = False
            sdpa = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
            if sdpa and "position_ids" in inputs and inputs.get("attention_mask") is None:
                inputs["attention_mask"] = packed_attention_mask(inputs["position_ids"])
            return inputs

        def evaluate(self, *args: Any, base_cache: dict | None = None, **kwargs: Any) -> dict:
            """Each eval set's loss per trained token, from every row's own loss (kept in `sums` for
            the per-item comparisons of `curate ablate`). TRL's loop would score the rows packed and
            weight batches, not tokens. Before training the adapter changes nothing, so `base_cache`
            (a loaded base's) keeps what one run measured for the next run on the same rows."""
            t0 = time.perf_counter()
            model = self.model
            training = model.training
            model.eval()
            pad = self.processing_class.pad_token_id
            self.sums = {}
            for name, rows in self.scored.items():
                key = (name, _rows_digest(rows), self.scoring_tokens)
                if base_cache is not None and key in base_cache:
                    self.sums[name] = base_cache[key]
                    continue
                with eager_layers(decoder_layers(model)):  # mid-training, the layers may be compiled
                    self.sums[name] = summed_losses(model, rows, pad, self.scoring_tokens, not model_loss)
                if base_cache is not None:
                    base_cache[key] = self.sums[name]
            metrics = {f"eval_{name}_loss": mean_loss(sums) for name, sums in self.sums.items()}
            self.log(dict(metrics))  # in eval mode, so TRL adds no training metrics to it
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            model.train(training)
            self.eval_seconds += time.perf_counter() - t0
            return metrics

        if model_loss:

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs = self._model_inputs(inputs)
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        else:

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                """TRL's fused LM-head loss without TRL's per-step metrics: its entropy, token accuracy
                and token count cost three host syncs a step, which stall the GPU until the host
                catches up (on 8B shapes the step took 0.60 s with them, 0.42 s without:
                bench/results/train_profile.md)."""
                outputs = model(**self._model_inputs(inputs), fused_lm_head=True)
                count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
                loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * self.accelerator.num_processes  # DDP averages; the count spans ranks
                return (loss, outputs) if return_outputs else loss

    return CurateSFTTrainer


def _rows_digest(rows: list[dict]) -> str:
    """A fingerprint of token rows (ids and labels), to know a loss already measured on them."""
    digest = hashlib.blake2b(digest_size=16)
    for row in rows:
        digest.update(repr((row["input_ids"], row["labels"])).encode())
    return digest.hexdigest()


def _write_merged(model_path: str, recipe: TrainRecipe, tokenizer: Any, out: Path) -> None:
    """Full weights with the adapter folded in, on an unquantized copy of the base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from curate.train.model import grow_embeddings

    base = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, recipe.bnb_4bit_compute_dtype)
    )
    grow_embeddings(base, len(tokenizer))
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
