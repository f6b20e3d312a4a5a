"""Convert a llama2.c checkpoint (model .bin + tokenizer .bin) into a Hugging Face Llama folder.

The tiny llama2.c story models (stories260K and friends) train in seconds on a CPU, which makes
them the base model of the CPU test recipe. The weights map one-to-one onto `LlamaForCausalLM`
(query and key rows are permuted from llama2.c's interleaved rotary pairs to Hugging Face's
half-split layout); the tokenizer file's pieces and scores become a byte-fallback BPE for the
`tokenizers` library, so neither sentencepiece nor protobuf is needed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from curate.errors import CurateError

_HEADER = struct.Struct("7i")


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """The llama2.c header as a dict and its weights as float32 numpy arrays, by llama2.c name."""
    import numpy as np

    blob = Path(path).read_bytes()
    if len(blob) < _HEADER.size:
        raise CurateError(f"{path}: too short for a llama2.c checkpoint")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack_from(blob)
    shared = vocab > 0
    vocab = abs(vocab)
    cfg = dict(
        dim=dim, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, seq_len=seq_len
    )
    head = dim // heads
    kv_dim = kv_heads * head
    shapes = [
        ("tok_embeddings", (vocab, dim)),
        ("rms_att", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("rms_ffn", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis", (seq_len, head)),  # real and imaginary halves; unused by the converted model
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    floats = np.frombuffer(blob, dtype="<f4", offset=_HEADER.size)
    weights, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        if at + n > floats.size:
            raise CurateError(f"{path}: truncated llama2.c checkpoint (ends inside {name})")
        weights[name] = floats[at : at + n].reshape(shape)
        at += n
    weights.setdefault("wcls", weights["tok_embeddings"])
    cfg["shared_classifier"] = shared
    return cfg, weights


def read_tokenizer(path: Path, vocab_size: int) -> list[tuple[str, float]]:
    """Pieces (with the sentencepiece word marker restored) and scores from a llama2.c tokenizer .bin."""
    blob = Path(path).read_bytes()
    at, pieces = 4, []
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fi", blob, at)
        text = blob[at + 8 : at + 8 + n].decode("utf-8", errors="replace")
        at += 8 + n
        pieces.append((text, score))
    # llama2.c's exporter writes BOS/EOS as "\n<s>\n" and spaces for the "▁" word marker.
    pieces[0] = ("<unk>", 0.0)
    pieces[1] = ("<s>", 0.0)
    pieces[2] = ("</s>", 0.0)
    return [
        (p if i < 3 or p.startswith("<0x") else p.replace(" ", "\u2581"), s)
        for i, (p, s) in enumerate(pieces)
    ]


def _bpe_tokenizer(pieces: list[tuple[str, float]]):
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    # sentencepiece BPE merges the pair whose result scores highest; list merges in that order.
    merges = []
    for piece, score in pieces:
        if len(piece) < 2 or piece.startswith("<0x") or piece in ("<unk>", "<s>", "</s>"):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    model = BPE(
        vocab=vocab,
        merges=[(m[3], m[4]) for m in merges],
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def convert(checkpoint: Path, tokenizer: Path, out_dir: Path) -> Path:
    """Write `out_dir` as a Hugging Face Llama model + fast tokenizer; returns `out_dir`."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg, w = read_checkpoint(checkpoint)
    head = cfg["dim"] // cfg["heads"]
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["dim"],
        intermediate_size=cfg["hidden"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=cfg["seq_len"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=cfg["shared_classifier"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )

    def rope_rows(mat: np.ndarray, n_heads: int) -> np.ndarray:
        # llama2.c rotates interleaved pairs (0,1),(2,3)...; Hugging Face rotates halves (i, i+head/2).
        rows, cols = mat.shape
        return mat.reshape(n_heads, head // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)

    state = {
        "model.embed_tokens.weight": w["tok_embeddings"],
        "model.norm.weight": w["rms_final"],
        "lm_head.weight": w["wcls"],
    }
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = w["rms_att"][i]
        state[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        state[p + "self_attn.q_proj.weight"] = rope_rows(w["wq"][i], cfg["heads"])
        state[p + "self_attn.k_proj.weight"] = rope_rows(w["wk"][i], cfg["kv_heads"])
        state[p + "self_attn.v_proj.weight"] = w["wv"][i]
        state[p + "self_attn.o_proj.weight"] = w["wo"][i]
        state[p + "mlp.gate_proj.weight"] = w["w1"][i]
        state[p + "mlp.down_proj.weight"] = w["w2"][i]
        state[p + "mlp.up_proj.weight"] = w["w3"][i]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, strict=False
    )
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise CurateError(f"llama2.c conversion mismatch: missing {missing}, unexpected {unexpected}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(read_tokenizer(tokenizer, cfg["vocab"])),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        model_max_length=cfg["seq_len"],
    )
    fast.save_pretrained(out_dir)
    (out_dir / "curate_source.json").write_text(
        json.dumps({"llama2c_checkpoint": str(checkpoint), "tokenizer": str(tokenizer)}, indent=1)
    )
    return out_dir
