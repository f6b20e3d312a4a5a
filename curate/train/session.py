"""A base model loaded once and trained on many times: the fixed costs of an ablation, paid once.

`curate ablate` trains one recipe on several versions and seeds. Loading the 4-bit base, answering
the gates' prompts with the base model and scoring its capability are the same work in every run,
so a `BaseModel` keeps them: each run wraps the loaded base in a fresh adapter and hands it back
without one (`reclaim`), and the base model's answers and scores are computed on first use only.

Generation goes through a `Decoder`: a plain copy of the base whose weights are the 4-bit weights
dequantized (the same numbers the 4-bit layers compute with), with a run's LoRA deltas folded in
for the tuned answers and taken out after. Decoding through unmerged 4-bit + LoRA layers costs about
three times the base's time per step (143 vs 46 ms in bench/results/train_gpu.md); through plain
layers, a tuned model decodes as fast as its base.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from curate.train.model import Base, device, load_model, load_tokenizer
from curate.train.recipe import TrainRecipe

# the plain copy is made when free GPU memory holds it this many times over (KV caches, activations)
DECODER_HEADROOM = 2.0


@dataclass(frozen=True)
class BaseKey:
    """What a loaded base depends on: runs that agree on it can share one."""

    model_path: str
    tokenizer_path: str
    template: str
    load_in_4bit: bool
    quant_type: str
    double_quant: bool
    compute_dtype: str

    @classmethod
    def of(cls, base: Base, template: str, recipe: TrainRecipe) -> BaseKey:
        return cls(
            base.model_path,
            base.tokenizer_path,
            template,
            recipe.load_in_4bit,
            recipe.bnb_4bit_quant_type,
            recipe.bnb_4bit_use_double_quant,
            recipe.bnb_4bit_compute_dtype,
        )


class BaseModel:
    """The base model and tokenizer of a run, and what the gates measure of the base alone."""

    def __init__(self, key: BaseKey, recipe: TrainRecipe, model: Any, tokenizer: Any, added: list[str]):
        self.key, self.recipe = key, recipe
        self.model, self.tokenizer, self.added = model, tokenizer, added
        self.base_answers: dict[tuple, list[dict]] = {}  # (prompts, max_new, batch) -> answers
        self.base_scores: dict[str, dict] = {}  # capability set -> scores
        self.base_losses: dict[tuple, tuple] = {}  # (eval set, rows digest, batch) -> per-row losses
        self.encoded: dict[tuple, tuple] = {}  # (version, encoding settings) -> token rows of its splits
        self._decoder: Decoder | None | bool = False  # False: not decided yet; None: decode unmerged

    @classmethod
    def load(cls, base: Base, template: str, recipe: TrainRecipe) -> BaseModel:
        tokenizer, added = load_tokenizer(base.tokenizer_path, template)
        model = load_model(base.model_path, recipe, tokenizer)
        return cls(BaseKey.of(base, template, recipe), recipe, model, tokenizer, added)

    def reclaim(self, trained: Any) -> None:
        """Take the base back from a run's adapter-wrapped model, as it was loaded: adapter layers
        removed (not merged), TRL's patched forward and the trainer's gradient hooks dropped."""
        model = trained.unload() if hasattr(trained, "unload") else trained
        model.__dict__.pop("forward", None)  # TRL sets a fused-LM-head forward on the instance
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        if hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
        self.model = model

    def decoder(self) -> Decoder | None:
        """The plain copy used for generation, made on first use; None when the GPU has no room for
        it (generation then goes through the adapter-wrapped 4-bit model)."""
        if self._decoder is False:
            self._decoder = Decoder.build(self) if _room_for_plain_copy(self.model) else None
        return self._decoder  # type: ignore[return-value]


class Decoder:
    """A plain (dequantized) copy of the base for generation."""

    def __init__(self, model: Any):
        self.model = model

    @classmethod
    def build(cls, base: BaseModel) -> Decoder:
        model = load_model(base.key.model_path, base.recipe, base.tokenizer)
        if base.recipe.load_in_4bit:
            model = model.dequantize()
        for param in model.parameters():
            param.requires_grad_(False)
        return cls(model.eval())

    @contextmanager
    def tuned(self, trained: Any) -> Iterator[Any]:
        """The copy with a run's adapter folded in (LoRA deltas added to their layers, trained token
        rows written into the embeddings); every touched weight is restored on exit."""
        import torch
        from peft.tuners.lora import LoraLayer
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        saved: list[tuple[Any, Any]] = []
        try:
            with torch.no_grad():
                for name, module in trained.get_base_model().named_modules():
                    if isinstance(module, LoraLayer):
                        target = self.model.get_submodule(name).weight
                        saved.append((target, target.data.clone()))
                        for adapter in module.active_adapters:
                            if adapter in module.lora_A:
                                target.data += module.get_delta_weight(adapter).to(target.dtype)
                    elif isinstance(module, TrainableTokensLayer):
                        target = self.model.get_submodule(name.rsplit(".", 1)[0]).weight
                        saved.append((target, target.data.clone()))
                        target.data.copy_(module.get_merged_weights(module.active_adapters).to(target.dtype))
            yield self.model
        finally:
            with torch.no_grad():
                for target, original in saved:
                    target.data.copy_(original)


def _room_for_plain_copy(model: Any) -> bool:
    if device() != "cuda":
        return True
    import torch

    plain_bytes = 2 * model.num_parameters()  # bf16; num_parameters counts packed 4-bit weights unpacked
    return torch.cuda.mem_get_info()[0] > DECODER_HEADROOM * plain_bytes


class BaseModels:
    """The loaded base of the current runs, kept while runs agree on it (a different one replaces it)."""

    def __init__(self, cache_dir: Any):
        self.cache_dir = cache_dir  # where llama2.c checkpoints are converted, once
        self.current: BaseModel | None = None

    def get(self, base: Base, template: str, recipe: TrainRecipe) -> BaseModel:
        key = BaseKey.of(base, template, recipe)
        if self.current is None or self.current.key != key:
            self.drop()
            self.current = BaseModel.load(base, template, recipe)
        return self.current

    def drop(self) -> None:
        """Forget the loaded base (after a failed run its state is unknown), freeing its memory."""
        self.current = None
        gc.collect()
        if device() == "cuda":
            import torch

            torch.cuda.empty_cache()
