"""curate's torch-operation dequantization of bitsandbytes' 4-bit weights (curate.train.nf4), which the
compiled decoder layers use: the same weights as bitsandbytes, bit for bit, and the same products."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from curate.train.nf4 import bitsandbytes_forward, dequantize_4bit, torch_dequantized  # noqa: E402

# (rows, columns): whole blocks of 64; a partial last block; an odd number of weights (half a byte)
SHAPES = [(96, 128), (33, 50), (7, 9)]


def linear(shape: tuple[int, int], quant_type: str, nested: bool, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        shape[1], shape[0], bias=True, compute_dtype=dtype, quant_type=quant_type, compress_statistics=nested
    )
    weight = torch.randn(shape) * torch.logspace(-3, 1, shape[0])[:, None]  # blocks of very different scales
    layer.weight = bnb.nn.Params4bit(
        weight.to(dtype), requires_grad=False, quant_type=quant_type, compress_statistics=nested
    )
    layer.bias = torch.nn.Parameter(torch.randn(shape[0], dtype=dtype), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False  # as curate loads them (curate.train.model)
    return layer.to("cpu")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_weight_is_bitsandbytes_own_bit_for_bit(shape, quant_type, nested, dtype):
    layer = linear(shape, quant_type, nested, dtype)
    state = layer.weight.quant_state
    assert state.nested == nested and tuple(state.shape) == shape
    reference = bnb.functional.dequantize_4bit(layer.weight.data, state)
    absmax = state.absmax
    if nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ours = dequantize_4bit(layer.weight.data, state.code, absmax.float(), state.blocksize, shape, state.dtype)
    assert ours.dtype == reference.dtype == dtype
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_swapped_linears_multiply_as_bitsandbytes_and_are_restored_unchanged(quant_type):
    """Inside the block the linears' forward is torch operations, with the same outputs and input
    gradients as bitsandbytes' forward; after it, the modules are bitsandbytes' again with nothing
    added, and no state dict ever sees the block's buffers."""
    first, second = (
        linear((64, 48), quant_type, True, torch.float32),
        linear((40, 64), quant_type, False, torch.float32, 1),
    )
    model = torch.nn.Sequential(first, second)
    keys = list(model.state_dict())
    x = torch.randn(5, 48, requires_grad=True)
    reference = model(x)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), x)
    with torch_dequantized([model]) as swapped:
        assert swapped == 2 and all(type(m).__name__ == "TorchDequantizedLinear4bit" for m in model)
        assert list(model.state_dict()) == keys
        out = model(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        with bitsandbytes_forward([model]):
            assert all(type(m) is bnb.nn.Linear4bit for m in model)
            torch.testing.assert_close(model(x), reference, atol=0, rtol=0)
        assert all(type(m).__name__ == "TorchDequantizedLinear4bit" for m in model)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)  # the product's summation order
    torch.testing.assert_close(grad, reference_grad, atol=1e-5, rtol=1e-5)
    assert all(type(m) is bnb.nn.Linear4bit and not hasattr(m, "packed_4bit") for m in model)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), reference, atol=0, rtol=0)


def test_a_compiled_step_calls_no_bitsandbytes_operator():
    """Compiled, the swapped linears are part of the graph: a forward and backward run no bitsandbytes
    operator (each one split the compiled graph and cost ~235 us of host time a call on an H200)."""
    model = torch.nn.Sequential(linear((64, 48), "nf4", True, torch.float32), torch.nn.GELU())
    x = torch.randn(4, 48, requires_grad=True)
    reference = model(x)
    with torch_dequantized([model]):
        compiled = torch.compile(model)
        compiled(x).sum().backward()  # compiles
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = compiled(x)
            out.sum().backward()
    names = {event.name for event in prof.events()}
    assert not any(name.startswith("bitsandbytes::") for name in names)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)


class MLPLayer(torch.nn.Module):
    """A decoder layer's MLP as QLoRA trains it: a norm in float32, three 4-bit linears (SwiGLU), a
    LoRA pair with dropout on one of them, bf16 activations and a residual."""

    def __init__(self, width: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(width)
        self.gate = linear((hidden, width), "nf4", True, torch.bfloat16, 1)
        self.up = linear((hidden, width), "nf4", True, torch.bfloat16, 2)
        self.down = linear((width, hidden), "nf4", True, torch.bfloat16, 3)
        self.lora_a = torch.nn.Linear(width, 8, bias=False, dtype=torch.bfloat16)
        self.lora_b = torch.nn.Linear(8, hidden, bias=False, dtype=torch.bfloat16)
        self.dropout = torch.nn.Dropout(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x.float()).to(x.dtype)
        gate = self.gate(h) + 2 * self.lora_b(self.lora_a(self.dropout(h)))
        return x + self.down(torch.nn.functional.silu(gate) * self.up(h))


def kept_for_backward(layer: torch.nn.Module, x: torch.Tensor) -> list[tuple]:
    """(shape, bytes) of what one forward keeps for its backward, less the layer's own parameters and
    buffers (kept, not made)."""
    own = {t.data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    kept: list[tuple] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in own:
            kept.append((tuple(tensor.shape), tensor.numel() * tensor.element_size()))
        return tensor

    layer(x).float().sum().backward()  # compiles, where compiled
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = layer(x)
    out.float().sum().backward()
    return kept


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_dequantized_weight_lives_no_longer_than_its_layers_activations(checkpointed):
    """Outside gradient checkpointing, a compiled layer keeps no more for its backward than bitsandbytes'
    eager layer: the backward dequantizes again, rather than keep every dequantized weight from the
    forward (a bf16 copy of the base) or the indices the dequantization was made with (8 bytes per
    weight, when it indexed element by element). Inside checkpointing, the recomputed forward's weights
    are kept, one layer's at a time, for its backward."""
    torch.manual_seed(0)
    layer = MLPLayer()
    layer.gradient_checkpointing = checkpointed  # transformers' flag on a checkpointed decoder layer
    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    eager = kept_for_backward(layer, x)
    with torch_dequantized([layer]):
        layer.compile()
        compiled = kept_for_backward(layer, x)
    layer._compiled_call_impl = None
    weights = {(256, 128), (128, 256)}
    assert not weights & {shape for shape, _ in eager}  # bitsandbytes' backward dequantizes again
    if checkpointed:
        assert weights <= {shape for shape, _ in compiled}
    else:
        assert not weights & {shape for shape, _ in compiled}
        assert sum(size for _, size in compiled) <= sum(size for _, size in eager)
