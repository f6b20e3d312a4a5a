"""The durable request cache: each answer stored under a hash of everything that shapes it.

The key covers provider, endpoint, model, messages, sampling parameters and the sample index (so n
samples of one prompt at temperature > 0 stay n answers), never the API key: a paid request is
answered from disk in any later run, and no secret is written. One SQLite connection per process
and file, in WAL mode: the engine writes the answers that arrived together in one transaction, each
committed before the requests after it are sent, so a killed run loses no answer it received.
Failures are never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path


def request_key(request: dict) -> str:
    """Stable hash of a request (canonical JSON: sorted keys, no whitespace)."""
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RequestCache:
    _open: dict[tuple[int, str], RequestCache] = {}
    _lock = threading.Lock()

    @classmethod
    def at(cls, path: Path) -> RequestCache:
        """The cache at `path`, opened once per process (a forked or spawned worker opens its own)."""
        key = (os.getpid(), str(Path(path).resolve()))
        with cls._lock:
            if key not in cls._open:
                cls._open[key] = cls(path)
            return cls._open[key]

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a process crash loses nothing committed
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers "
                "(key TEXT PRIMARY KEY, request TEXT NOT NULL, answer TEXT NOT NULL)"
            )
        self._write = threading.Lock()

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        """The stored answers of those keys that have one."""
        found: dict[str, dict] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk)
            found.update((k, json.loads(a)) for k, a in rows)
        return found

    def get(self, key: str) -> dict | None:
        return self.get_many([key]).get(key)

    def put_many(self, items: list[tuple[str, dict, dict]]) -> None:
        """(key, request, answer) triples, committed in one transaction."""
        if not items:
            return
        rows = [(k, json.dumps(r, sort_keys=True, ensure_ascii=False), json.dumps(a)) for k, r, a in items]
        with self._write, self._db:
            self._db.executemany("INSERT OR REPLACE INTO answers (key, request, answer) VALUES (?,?,?)", rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
