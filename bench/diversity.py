"""Benchmark: the diversity stage's embeddings and selection on ../shared/data/raw.

1. Embedding backends on the CPU: records/s on a fixed sample of first user turns (fresh, no
   cache; each backend warmed up, two alternating rounds, the faster counts), and how much each
   changes the selection: k-center's coverage radius measured in MiniLM space (the full model at
   128 tokens), relative to the radius of MiniLM's own selection, and the overlap of the chosen sets.
   The default candidate (static) is compared on all records with k = 5,000; every backend on a
   random subset of 10,000 with k = 500. MiniLM's vectors of all records take about 15 minutes on
   two cores the first time, then come from the embedding cache.
2. Selection time for k = 5,000: k-center and k-means (the `cluster` method's clustering) over the
   85,669 records and over 1,028,028 (twelve copies of the vectors, each moved by a little noise).
3. `curate run` of normalize + diversity over raw/, twice: the stage fresh, then from the cache.

    python bench/diversity.py [--sample 2000] [--subset 10000]
    python bench/diversity.py --gpu      # on a GPU machine: MiniLM over all of raw/, records/s
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import io
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from curate import selection
from curate.embed import Embedder

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE = Path(tempfile.gettempdir()) / "curate-bench-embeddings"  # MiniLM vectors kept between runs
K = 5000


def first_user_texts(path: Path | None = None) -> list[str]:
    """The first user turn of every record of raw/, as the diversity stage embeds them; from a file
    written by --write-texts when `path` is given (the GPU machine has no polars)."""
    if path is not None:
        with gzip.open(path, "rt") as fh:
            return json.load(fh)
    import polars as pl

    from curate.formats import InputSpec, read_input
    from curate.records import to_table
    from curate.text.conversation import conversation_text

    records = [
        r for b in read_input(InputSpec.from_recipe({"path": "raw"}, "bench"), DATA) for r in b.records
    ]
    return conversation_text(pl.from_arrow(to_table(records)), "first_user").to_list()


class Int8MiniLM(Embedder):
    """MiniLM with its linear layers quantized to int8 by torch (dynamic quantization): measured
    as an option, not offered by curate (see the results)."""

    def _load(self):
        if self._model is None:
            import torch

            model = super()._load()
            with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
                warnings.simplefilter("ignore")
                self._model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear}, dtype=torch.qint8
                )
        return self._model


class OnnxEncoder:
    """MiniLM exported to ONNX (torch's exporter) and run by onnxruntime, optionally with int8
    weights (onnxruntime's dynamic quantization): mean pooling and normalisation as
    sentence-transformers does them. Measured as an option (needs onnx, onnxscript, onnxruntime)."""

    def __init__(self, folder: Path, work: Path, max_seq_length: int, int8: bool) -> None:
        import onnxruntime
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.max_seq_length = max_seq_length
        work.mkdir(parents=True, exist_ok=True)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        path = work / ("minilm-int8.onnx" if int8 else "minilm.onnx")
        fp32 = work / "minilm.onnx"
        if not fp32.exists():
            model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()

            class Hidden(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.model = model

                def forward(self, ids, mask, types):
                    out = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types)
                    return out.last_hidden_state

            sample = self.tokenizer(["a text", "a longer text"], padding=True, return_tensors="pt")
            axes = {0: "batch", 1: "tokens"}
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    Hidden(),
                    (sample["input_ids"], sample["attention_mask"], sample["token_type_ids"]),
                    str(fp32),
                    input_names=["ids", "mask", "types"],
                    dynamic_shapes=(axes, axes, axes),
                    dynamo=True,
                )
        if int8 and not path.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def encode(self, texts, batch_size=64, **_ignored) -> np.ndarray:
        order = np.argsort([len(t) for t in texts])  # batches of similar length pad less
        out = np.zeros((len(texts), 384), np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_seq_length,
                return_tensors="np",
            )
            hidden = self.session.run(
                None, {"ids": enc["input_ids"], "mask": enc["attention_mask"], "types": enc["token_type_ids"]}
            )[0]
            mask = enc["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


class OnnxMiniLM(Embedder):
    """The Embedder (cache and all) with ONNX Runtime in place of sentence-transformers."""

    def __init__(self, cache_dir: Path, int8: bool) -> None:
        super().__init__("", cache_dir, max_seq_length=128)
        self.int8 = int8
        self._onnx = None

    def _encode_transformer(self, texts: list[str]) -> np.ndarray:
        if self._onnx is None:
            self._onnx = OnnxEncoder(self.source, self.root, 128, self.int8)
        cut = [t[: 128 * 8] for t in texts]
        return self._onnx.encode(cut, batch_size=self.batch_size)


def backends(tmp: Path) -> dict[str, Embedder]:
    """Fresh embedders (their cache in `tmp`, empty), by name."""
    return {
        "MiniLM, 256 tokens": Embedder("", tmp, max_seq_length=256),
        "MiniLM, 128 tokens": Embedder("", tmp, max_seq_length=128),
        "MiniLM, 64 tokens": Embedder("", tmp, max_seq_length=64),
        "MiniLM int8 (torch), 128 tokens": Int8MiniLM("", tmp / "int8", max_seq_length=128),
        "MiniLM ONNX, 128 tokens": OnnxMiniLM(tmp / "onnx", int8=False),
        "MiniLM ONNX int8, 128 tokens": OnnxMiniLM(tmp / "onnx-int8", int8=True),
        "static (MiniLM distilled), 128 tokens": Embedder("static", CACHE, max_seq_length=128),
    }


def speed(texts: list[str], sample: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    chosen = [texts[i] for i in rng.choice(len(texts), sample, replace=False)]
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = backends(Path(tmp))
        for model in models.values():
            model.encode(["warm up the model " * 8] * 64)
        for round_ in range(2):
            names = list(models) if round_ == 0 else list(reversed(models))
            for name in names:
                model = models[name]
                model.cache_path.unlink(missing_ok=True)  # fresh cache each round: every text is encoded
                started = time.perf_counter()
                model.encode(chosen)
                rate = len(chosen) / (time.perf_counter() - started)
                best[name] = max(best.get(name, 0.0), rate)
    return best


def kcenter_radius(reference: np.ndarray, picks: np.ndarray) -> tuple[float, float]:
    """(max, mean) cosine distance in the reference space from every record to its nearest pick."""
    _, distance = selection.nearest(reference, np.sort(picks))
    return float(distance.max()), float(distance.mean())


def quality(texts: list[str], k: int, models: dict[str, Embedder], speeds: dict[str, float]) -> None:
    """k-center of each backend's vectors, judged in MiniLM-128 space against MiniLM's own."""
    reference = Embedder("", CACHE, max_seq_length=128).encode(texts)
    own, _, _ = selection.kcenter(reference, k, 0)
    own_max, own_mean = kcenter_radius(reference, own)
    print(f"\nselection quality: k-center k={k:,} over {len(texts):,} records, radius in MiniLM-128 space")
    header = ("records/s", 10), ("radius max", 12), ("vs MiniLM", 10), ("radius mean", 12), ("overlap", 9)
    print(f"{'backend':<40}" + "".join(f"{title:>{width}}" for title, width in header))
    print(
        f"{'MiniLM, 128 tokens (reference)':<40}{speeds['MiniLM, 128 tokens']:>10,.0f}{own_max:>12.4f}"
        f"{1.0:>10.3f}{own_mean:>12.4f}{1.0:>9.3f}"
    )
    for name, model in models.items():
        picks, _, _ = selection.kcenter(model.encode(texts), k, 0)
        r_max, r_mean = kcenter_radius(reference, picks)
        overlap = np.intersect1d(picks, own).size / k
        ratio = r_max / own_max
        print(f"{name:<40}{speeds[name]:>10,.0f}{r_max:>12.4f}{ratio:>10.3f}{r_mean:>12.4f}{overlap:>9.3f}")
    picks = np.random.default_rng(0).choice(len(texts), k, replace=False)
    r_max, r_mean = kcenter_radius(reference, picks)
    print(f"{'random sample (for scale)':<40}{'':>10}{r_max:>12.4f}{r_max / own_max:>10.3f}{r_mean:>12.4f}")


def selection_times(texts: list[str]) -> None:
    X = Embedder("static", CACHE, max_seq_length=128).encode(texts)
    rng = np.random.default_rng(0)
    copies = [X] + [X + rng.normal(0, 0.02, X.shape).astype(np.float32) for _ in range(11)]
    big = np.concatenate(copies)
    big /= np.maximum(np.linalg.norm(big, axis=1, keepdims=True), 1e-12)
    selection.kcenter(X[:5000], 100, 0)  # warm-up
    print(f"\nselection time, k = {K:,} (static vectors, {X.shape[1]} dimensions, {os.cpu_count()} cores)")
    for label, data in (("85,669 records", X), (f"{big.shape[0]:,} records", big)):
        started = time.perf_counter()
        selection.kcenter(data, K, 0)
        kc = time.perf_counter() - started
        started = time.perf_counter()
        selection.kmeans(data, round(K**0.5), 0)
        km = time.perf_counter() - started
        print(f"  {label:<18} k-center {kc:6.1f} s   k-means ({round(K**0.5)} clusters) {km:6.1f} s")


def stage_run() -> None:
    """`curate run` of normalize + diversity (k-center, k = 5,000, the default static model) over
    all of raw/, then the same recipe again: the diversity stage's seconds fresh and from the cache."""
    from curate.pipeline import run_recipe
    from curate.recipe import recipe_from_dict

    raw = {
        "inputs": [{"path": str(DATA / "raw")}],
        "stages": [{"normalize": {}}, {"diversity": {"method": "kcenter", "k": K}}],
    }
    print(f"\ncurate run: normalize + diversity (kcenter, k={K:,}, static) over all of raw/")
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("first run", "re-run (cached)"):
            started = time.perf_counter()
            run = run_recipe(recipe_from_dict(raw, Path(tmp)), Path(tmp) / "out")
            total = time.perf_counter() - started
            entry = next(s for s in run.manifest["stages"] if s["name"] == "diversity")
            this_run = next(s for s in run.run["stages"] if s["name"] == "diversity")
            report = entry["report"]
            stage = "from the cache" if this_run["cached"] else f"{this_run['seconds']:.1f} s"
            print(
                f"  {label:<16} whole run {total:5.1f} s, diversity stage {stage}, kept {entry['out']:,} of"
                f" {entry['in']:,},"
                f" radius mean {report['coverage_radius_mean']:.4f} max {report['coverage_radius_max']:.4f},"
                f" clusters covered {report['clusters_covered']} of {report['clusters']}"
            )


def gpu(texts: list[str], folder: str) -> None:
    """MiniLM at 128 tokens on the GPU: curate's Embedder (encode and fill the cache, then a cached
    re-run), then curate's batching (tokenized on all cores) against sentence-transformers' own
    encode (tokenized on one), in float32 and float16, at two batch sizes."""
    import torch

    def timed(encode) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        encode()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    name = torch.cuda.get_device_name(0)
    print(f"MiniLM, 128 tokens, on {name}, {len(texts):,} first user turns of raw/ ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        model = Embedder(folder, Path(tmp), max_seq_length=128)  # its default batch on a GPU: 1024
        model.encode(texts[:4096])  # warm-up
        fresh = []
        for _ in range(2):  # the better of two
            model.cache_path.unlink()
            fresh.append(timed(lambda: model.encode(texts)))
        fresh, cached = min(fresh), timed(lambda: model.encode(texts))
        for label, seconds in (("fresh cache", fresh), ("cached re-run", cached)):
            print(f"  curate Embedder, {label:<24}{len(texts) / seconds:>10,.0f} records/s ({seconds:.1f} s)")
        st = model._load()
        cut = [t[:1024] for t in texts]

        def encoder(path: str, batch: int):
            if path == "curate":
                model.batch_size = batch
                return functools.partial(model._encode_transformer, cut)
            return functools.partial(st.encode, cut, batch_size=batch, normalize_embeddings=True)

        variants = [
            (p, d, b) for d in (torch.float32, torch.float16) for b in (256, 1024) for p in ("curate", "st")
        ]
        rates: dict[tuple, float] = {}
        for round_ in range(2):  # alternate the order; the faster round counts
            for path, dtype, batch in variants if round_ == 0 else list(reversed(variants)):
                st.to(dtype)
                seconds = timed(encoder(path, batch))
                rates[path, dtype, batch] = max(rates.get((path, dtype, batch), 0.0), len(texts) / seconds)
        for (path, dtype, batch), rate in rates.items():
            label = "curate batching" if path == "curate" else "sentence-transformers"
            print(f"  {label:<22} {str(dtype)[6:]:<8} batch {batch:<5}{rate:>10,.0f} records/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=2000, help="texts timed per backend")
    parser.add_argument(
        "--subset", type=int, default=10_000, help="records on which every backend's selection is compared"
    )
    parser.add_argument("--gpu", action="store_true", help="only MiniLM on the GPU over all of raw/")
    parser.add_argument("--model", default="", help="--gpu: the MiniLM folder (default: the bundled one)")
    parser.add_argument("--texts", type=Path, help="read the texts from this file (see --write-texts)")
    parser.add_argument("--write-texts", type=Path, help="write the texts to this file, stop")
    args = parser.parse_args()
    texts = first_user_texts(args.texts)
    if args.write_texts:
        with gzip.open(args.write_texts, "wt") as fh:
            json.dump(texts, fh)
        return
    if args.gpu:
        gpu(texts, args.model)
        return
    speeds = speed(texts, args.sample)
    print(f"embedding speed on the CPU ({os.cpu_count()} cores), {args.sample:,} first user turns of raw/:")
    for name, rate in speeds.items():
        print(f"  {name:<40}{rate:>10,.0f} records/s   all of raw/ in {len(texts) / rate / 60:6.1f} min")
    minilm = Embedder("", CACHE, max_seq_length=128)
    minilm.encode(texts)  # fills the cache the first time (about 15 minutes on two cores)
    started = time.perf_counter()
    minilm.encode(texts)
    seconds = time.perf_counter() - started
    print(f"  {'cached vectors (any model), a lookup':<40}{len(texts) / seconds:>10,.0f} records/s")
    with tempfile.TemporaryDirectory() as tmp:
        models = backends(Path(tmp))
        static = "static (MiniLM distilled), 128 tokens"
        quality(texts, K, {static: models[static]}, speeds)
        subset = [texts[i] for i in np.random.default_rng(1).choice(len(texts), args.subset, replace=False)]
        others = {name: m for name, m in models.items() if name != "MiniLM, 128 tokens"}
        quality(subset, args.subset // 20, others, speeds)
    selection_times(texts)
    stage_run()


if __name__ == "__main__":
    main()
