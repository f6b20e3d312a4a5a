"""bitsandbytes' 4-bit weights dequantized with torch operations, so that a compiled decoder layer is
one graph with its dequantization in it.

Compiled, a QLoRA layer was still host-bound on the Llama-3-8B shapes (bench/results/train_profile.md,
run 7: the host busy the whole 0.44 s step, the GPU 28-34% of it). The largest single cost was
bitsandbytes' 4-bit product: 448 calls a step at 235 us of host time each, through its Python
operators and ctypes (double-quantized absmax, then the 4-bit weight, then the product), and each of
them split the layer's compiled graph. Written as torch operations, the same dequantization compiles
into a kernel of the layer's graph, launched from the compiled code.

The weight is the one `bitsandbytes.functional.dequantize_4bit` makes, bit for bit
(tests/test_nf4.py): each element is its 4-bit code's value times its block's absmax, in float32, then
rounded to the weight's dtype. A double-quantized absmax is dequantized once, by bitsandbytes itself,
when the layers are swapped in (float32, 4 bytes per block of 64 weights: 0.47 GB on the 8B shapes).
Computing it in the graph instead would let the compiler fuse its multiply and add into one rounding,
and the weights would no longer be bitsandbytes' own.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from typing import Any


def dequantize_4bit(packed: Any, code: Any, absmax: Any, blocksize: int, shape: tuple, dtype: Any) -> Any:
    """The weight of `shape` from its packed 4-bit codes (two a byte, the first in the high nibble), the
    16 values of the codes (`code`: NF4 or FP4) and one float32 absmax per block of `blocksize`.

    Written with reshapes and broadcasts, not with an index per element: the compiled graph kept such
    indices for the backward (int64 on the CPU, 8 bytes a weight), and on the 8B shapes a step's peak
    rose from 48 to 92 GB on the H200. The two nibbles of a byte come from one `where` over a (bytes,
    2) broadcast, which the compiler fuses with the lookup and the scaling (in the CPU compile: one
    kernel; a `stack` of the two made a kernel of its own and a uint8 copy of the weight)."""
    import torch

    size, blocks = shape[0] * shape[1], absmax.numel()
    byte = packed.reshape(-1, 1)
    high = torch.arange(2, device=packed.device) == 0  # the first code of a byte is its high nibble
    nibble = torch.where(high, byte >> 4, byte & 15).reshape(-1)[:size]  # odd size: half a byte spare
    value = torch.nn.functional.pad(code[nibble.long()], (0, blocks * blocksize - size))  # partial last block
    return (value.view(blocks, blocksize) * absmax[:, None]).reshape(-1)[:size].to(dtype).view(shape)


def _weight(
    blocksize: int, shape: tuple, dtype: Any, compute_dtype: Any, packed: Any, code: Any, absmax: Any
) -> Any:
    """The weight as bitsandbytes' product takes it: dequantized to its dtype, then to the input's."""
    return dequantize_4bit(packed, code, absmax, blocksize, shape, dtype).to(compute_dtype)


@functools.cache
def _torch_dequantized_class() -> type:
    import bitsandbytes as bnb
    import torch

    class TorchDequantizedLinear4bit(bnb.nn.Linear4bit):
        """bitsandbytes' Linear4bit whose forward dequantizes with torch operations (same weight, same
        product: `bitsandbytes.matmul_4bit` multiplies by `dequantize_4bit(...).to(x.dtype)`)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inp_dtype = x.dtype
            if self.compute_dtype is not None:
                x = x.to(self.compute_dtype)
            weight_of = functools.partial(_weight, *self.layout_4bit, x.dtype)
            state = (self.packed_4bit, self.code_4bit, self.absmax_4bit)
            if self.recompute_4bit:  # the compiler recomputes what a checkpoint holds, in the backward
                weight = torch.utils.checkpoint.checkpoint(weight_of, *state, use_reentrant=False)
            else:
                weight = weight_of(*state)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, weight, bias).to(inp_dtype)

    return TorchDequantizedLinear4bit


def _swappable(module: Any) -> bool:
    import bitsandbytes as bnb

    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return (
        type(module) is bnb.nn.Linear4bit
        and state is not None
        and len(state.shape) == 2
        and not getattr(state, "packing_format_for_cpu", False)  # bitsandbytes' CPU inference layout
        and (not state.nested or state.state2.blocksize == 256)
    )


@contextlib.contextmanager
def torch_dequantized(modules: list[Any]) -> Iterator[int]:
    """Within the block, every bitsandbytes 4-bit linear inside `modules` dequantizes with torch
    operations; after it, they are bitsandbytes' own again, unchanged. Yields how many were swapped.
    The packed weights are shared, not copied; the extra tensors are buffers that no state dict saves.

    A dequantized weight lives no longer than its layer's activations. In a module that gradient
    checkpointing recomputes, the compiler keeps it from the recomputed forward to the backward: one
    layer's weights at a time (on the 8B shapes a step's peak is 7.12 GB against 6.71 with
    bitsandbytes' operators, the float32 absmax included). Elsewhere it
    would keep every layer's from the forward to the backward, a bf16 copy of the base (the peak of 4
    rows of 2,048 a step rose from 48.4 to 62.8 GB), so there the backward dequantizes again: 48.9 GB
    on the H200, at the same tokens/s (bench/results/train_speed.md, seventh session)."""
    if importlib.util.find_spec("bitsandbytes") is None:  # then no module holds a 4-bit weight
        yield 0
        return
    import bitsandbytes as bnb

    swapped = [  # each linear, and whether its layer is checkpointed (transformers' flag on the layer)
        (sub, bool(getattr(module, "gradient_checkpointing", False)))
        for module in modules
        for sub in module.modules()
        if _swappable(sub)
    ]
    torch_class = _torch_dequantized_class()
    for linear, layer_checkpointed in swapped:
        state = linear.weight.quant_state
        absmax = state.absmax
        if state.nested:
            absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        linear.register_buffer("packed_4bit", linear.weight.data, persistent=False)
        linear.register_buffer("code_4bit", state.code.to(linear.weight.device), persistent=False)
        linear.register_buffer("absmax_4bit", absmax.float(), persistent=False)
        linear.layout_4bit = (state.blocksize, tuple(state.shape), state.dtype)
        linear.recompute_4bit = not layer_checkpointed
        linear.__class__ = torch_class
    try:
        yield len(swapped)
    finally:
        for linear, _ in swapped:
            linear.__class__ = bnb.nn.Linear4bit
            for name in ("packed_4bit", "code_4bit", "absmax_4bit", "layout_4bit", "recompute_4bit"):
                delattr(linear, name)


@contextlib.contextmanager
def bitsandbytes_forward(modules: list[Any]) -> Iterator[None]:
    """Within the block, the swapped linears inside `modules` run bitsandbytes' own forward (eager
    code: uncompiled, the torch operations would run a kernel per operation and materialize the
    weight's codes and float32 values, where bitsandbytes runs one kernel)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        yield
        return
    import bitsandbytes as bnb

    torch_class = _torch_dequantized_class()
    swapped = [sub for module in modules for sub in module.modules() if type(sub) is torch_class]
    for linear in swapped:
        linear.__class__ = bnb.nn.Linear4bit
    try:
        yield
    finally:
        for linear in swapped:
            linear.__class__ = torch_class
