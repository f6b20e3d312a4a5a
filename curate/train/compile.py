"""torch.compile of a model's decoder layers, for its training steps only (regional compilation).

A QLoRA step on a small model, or on a large one at a few thousand tokens a step, is host-bound: each
decoder layer runs Python for every 4-bit layer (dequantize, then multiply), every LoRA pair (dropout,
two small products, scale, add), the norms, RoPE and the MLP, in the forward, in checkpointing's
second forward and in the backward (bench/results/train_profile.md: the GPU was busy 12% of a SmolLM2
step). Compiled, a layer is one graph whose elementwise work is fused, its 4-bit dequantization
included: bitsandbytes' operators would split the graph and cost host time at every call, so the
compiled layers dequantize with torch operations instead (curate.train.nf4: the same weights, bit for
bit).

Only the layers are compiled: they hold nearly all the work and share one code object, so one
compilation serves every layer and every later run in the process (the compiler caches by code and
guards, not by module). A run makes a few graphs: packed rows of one example attend causally without
a mask, rows of several with one, and the first new row length makes the graph dynamic. Compiling
dynamic from the first call saved no graph and compiled more slowly (the CPU compile test: 57 and
53.5 s against 39 and 44 s, in both orders). The rest of a step (the packed rows' attention mask
built from position ids, TRL's chunked LM-head loss over the trained positions) has data-dependent
shapes that would make the compiler break graphs or recompile. Evaluation and generation run the
layers eager: their shapes, no-grad mode and KV cache would each be another compilation, for code
that runs a few times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from curate.train.nf4 import bitsandbytes_forward, torch_dequantized

RECOMPILE_LIMIT = 64


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks, under any PEFT or trainer wrapping: the ModuleList of the layer class
    that transformers names in `_no_split_modules` (a causal LM's decoder layer), else the largest
    ModuleList whose modules are all of one class. The class name comes first because a mixture of
    experts can hold a longer list of experts inside each layer."""
    import torch

    named = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    lists = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) and all(type(x) is type(m[0]) for x in m)
    ]
    return list(max(lists, key=lambda m: (type(m[0]).__name__ in named, len(m)))) if lists else []


@contextlib.contextmanager
def compiled_layers(model: Any, enabled: bool = True) -> Iterator[list[Any]]:
    """Within the block, each decoder layer runs compiled (`nn.Module.compile`: in place, so parameter
    names, and with them checkpoints and saved adapters, are unchanged); after it, eager again."""
    import torch._dynamo

    layers = decoder_layers(model) if enabled else []
    if layers:  # each training setting (rows a step, checkpointing) is a compilation of its own; past the
        # limit (8) the compiler would run the layers eager without a word, in a process that trains several
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for layer in layers:
        layer.compile()
    try:
        with torch_dequantized(layers):
            yield layers
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what `nn.Module.compile` set: the layer calls forward again


@contextlib.contextmanager
def eager_layers(layers: list[Any]) -> Iterator[None]:
    """The layers run eager within the block (an evaluation in the middle of training), whether or
    not they were compiled."""
    compiled = [layer._compiled_call_impl for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        with bitsandbytes_forward(layers):
            yield
    finally:
        for layer, call in zip(layers, compiled, strict=True):
            layer._compiled_call_impl = call
