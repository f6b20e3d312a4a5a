"""The durable request cache: a request's answer stored under a hash of everything that shapes it.

The key covers provider, endpoint, model, messages and sampling parameters, never the API key, so
the same paid request is answered from disk in any later run, and no secret is ever written.
SQLite commits each answer as it arrives: a crash loses at most the request in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing
from pathlib import Path


def request_key(request: dict) -> str:
    """Stable hash of a request (canonical JSON: sorted keys, no whitespace)."""
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RequestCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path)) as db, db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS answers "
                "(key TEXT PRIMARY KEY, request TEXT NOT NULL, answer TEXT NOT NULL)"
            )

    def get(self, request: dict) -> dict | None:
        with closing(sqlite3.connect(self.path)) as db:
            row = db.execute("SELECT answer FROM answers WHERE key = ?", (request_key(request),)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, request: dict, answer: dict) -> None:
        with closing(sqlite3.connect(self.path)) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO answers (key, request, answer) VALUES (?, ?, ?)",
                (request_key(request), json.dumps(request, sort_keys=True), json.dumps(answer)),
            )
