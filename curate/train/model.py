"""Base model and tokenizer for training and gates: 4-bit loading, template tokens, a pad that is not EOS.

The tokenizer's EOS becomes the template's end-of-turn token, so generation stops where training
taught the model to stop; the pad token is always a different token, so padding never hides the
end-of-turn label and token counts skip padding only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.templates import TEMPLATE_NAMES, end_of_turn, special_tokens
from curate.train.recipe import TrainRecipe

PAD_CANDIDATES = ("<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<unk>")


@dataclass
class Base:
    """Where the base model and its tokenizer are read from, after any llama2.c conversion."""

    model_path: str
    tokenizer_path: str


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_base(recipe: TrainRecipe, cache_dir: Path) -> Base:
    """Paths of the base model and tokenizer; a llama2.c checkpoint is converted once into cache_dir."""
    model = recipe.path(recipe.base_model)
    tokenizer = recipe.path(recipe.tokenizer) if recipe.tokenizer else model
    if Path(model).is_file() and model.endswith(".bin"):
        from curate.train.llama2c import convert

        if not (tokenizer and Path(tokenizer).is_file()):
            raise CurateError(
                f"base_model {model} is a llama2.c checkpoint; it needs its tokenizer .bin",
                hint="set tokenizer: path/to/tok512.bin in the recipe",
            )
        key = hashlib.blake2b(f"{Path(model).resolve()}|{Path(tokenizer).resolve()}".encode(), digest_size=6)
        out = Path(cache_dir) / f"llama2c-{key.hexdigest()}"
        if not (out / "config.json").is_file():
            convert(Path(model), Path(tokenizer), out)
        return Base(str(out), str(out))
    return Base(model, tokenizer)


def load_tokenizer(path: str, template: str) -> tuple[Any, list[str]]:
    """The tokenizer set up for `template`: its special tokens known, EOS = end-of-turn, pad != EOS.

    Returns it with the tokens that had to be added (their embeddings must be trained).
    """
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "is_fast", False):
        raise CurateError(f"tokenizer {path} is not a fast tokenizer", hint="loss masks need offset mappings")
    vocab = tok.get_vocab()
    added = [t for t in special_tokens(template) if t not in vocab]
    if added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    eot = end_of_turn(template if template in TEMPLATE_NAMES else tok)
    tok.eos_token = eot
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        vocab = tok.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocab and t != eot), None)
        if pad is None:
            pad = "<|pad|>"
            tok.add_tokens([AddedToken(pad, special=True, normalized=False)], special_tokens=True)
        tok.pad_token = pad
    tok.padding_side = "right"
    return tok, added


def load_model(path: str, recipe: TrainRecipe, tokenizer: Any) -> Any:
    """The base model, in 4-bit NF4 when the recipe asks, its embeddings sized to the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dev = device()
    dtype = getattr(torch, recipe.bnb_4bit_compute_dtype)
    kwargs: dict = {"dtype": dtype, "device_map": {"": 0} if dev == "cuda" else "cpu"}
    if recipe.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=recipe.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    if dev == "cuda":
        kwargs["attn_implementation"] = "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise CurateError(
            f"cannot load base model {path}: {exc}", hint="a Hugging Face causal LM folder or id"
        ) from None
    grow_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        *[e for e in eos if e != tokenizer.eos_token_id],
    ]
    if dev == "cpu":
        _plain_cpu_4bit(model)
    return model


def grow_embeddings(model: Any, size: int) -> None:
    """Room for added tokens; new rows start at the mean of the old ones, the same in every load, so the
    base model's figures do not change between training and a later `curate eval`."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if old >= size:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for emb in {
            id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
        }.values():
            emb.weight[old:] = emb.weight[:old].float().mean(0).to(emb.weight.dtype)


def _plain_cpu_4bit(model: Any) -> None:
    # bitsandbytes repacks 4-bit weights for its AVX512-bf16 inference kernel on first eval-mode use,
    # which needs output sizes divisible by 32 and rewrites weights between training and evaluation.
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(recipe: TrainRecipe, model: Any, tokenizer: Any, added: list[str]) -> Any:
    """peft LoRA config from the recipe; tokens added for the template get trainable embedding rows."""
    from peft import LoraConfig

    trainable = None
    if added:
        ids = tokenizer.convert_tokens_to_ids(added)
        emb = _module_name(model, model.get_input_embeddings())
        trainable = {emb: ids}
        if not getattr(model.config, "tie_word_embeddings", False):
            trainable[_module_name(model, model.get_output_embeddings())] = ids
    return LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules,
        trainable_token_indices=trainable,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _module_name(model: Any, module: Any) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name.rsplit(".", 1)[-1]
    raise CurateError("cannot find the embedding module of the base model")
