"""Micro-batches of packed rows in which every packed row stays a row of its own, built so that a
training step does not wait for the GPU to tell the host what the host already knew."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PackedRowCollator:
    """Stacks a micro-batch's packed rows (TRL's best-fit-decreasing packing: several conversations to
    a row, their lengths in `seq_lengths`) as B rows, position ids restarting at each conversation.

    TRL's padding-free collator concatenates the B rows into one row of B·L tokens. That costs nothing
    with flash attention's variable-length kernels, but curate trains with SDPA, which receives the
    conversations' boundaries as a dense mask and computes attention over the whole row: (B·L)² scores
    where B·L² are needed. Rows apart keep the same conversations apart with the same mask inside each
    row, so the loss is the same at 1/B of the attention work (8 rows of 512 tokens on a 2-core CPU: a
    step went from 10.4 to 3.4 s; tests/test_train.py checks the loss equal).

    What the host knows goes with the batch, so that nothing needs reading back from the GPU:
    - `num_tokens`, the batch's tokens without padding (a Python int, which the trainer counts;
      transformers would sum a mask on the GPU and read the sum, a sync every step);
    - whether a row holds several conversations. Only then do `position_ids` go with the batch, and
      the trainer turns them into the attention mask on the GPU (`packed_attention_mask`). When every
      row holds one, no position ids go: the model counts from 0 and plain causal attention is right
      (a shorter row's pads come after its conversation, carry no label, and nothing attends to them).
      transformers, given position ids and no mask, asks the GPU whether they restart (a sync)."""

    pad_token_id: int
    _padded: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self._padded = DataCollatorForLanguageModeling(self.pad_token_id, return_position_ids=True)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._padded(examples)
        del batch["attention_mask"]  # with one, transformers would let a row's conversations see each other
        batch["labels"][batch["position_ids"] == 0] = -100  # a conversation's first token follows no other
        if all(len(example.get("seq_lengths") or [0]) == 1 for example in examples):
            del batch["position_ids"]
        batch["num_tokens"] = sum(len(example["input_ids"]) for example in examples)  # last: accelerate
        return batch  # finds the batch size from the first entry, which must be a tensor


def packed_attention_mask(position_ids: Any) -> Any:
    """SDPA's boolean mask (B, 1, L, L) for rows whose conversations restart the position ids at 0:
    each token sees the earlier tokens of its own conversation. The same mask that transformers makes
    from position ids, computed on the device without reading a value back (a pad, at position 0, is a
    conversation of its own, as there)."""
    import torch

    conversation = (position_ids == 0).cumsum(-1)
    same = conversation[:, :, None] == conversation[:, None, :]
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]
