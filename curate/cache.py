"""Where results are kept between runs, and what a cached result is keyed by.

Two caches, for two kinds of result:

- The **stage cache** lives under the output folder (`OUT/.cache/stages/<key>/`). An entry is one
  stage's output (the parts of its kept, added, dropped and edited records) and `done.json`
  (counts, parts, the run that computed it). It is content-addressed: the key is a digest of
  everything the output depends on, built by the runner (`stage_key`), never by a stage. It is
  bounded: past a size limit, the least recently used entries go (`prune`).
- The **shared cache** (`shared_cache_dir()`) holds paid LLM answers and slow embeddings. It is
  per user, shared by every run and output folder, and never removed with a stage cache.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import curate
from curate.dataset import Part, RecordFiles
from curate.errors import CurateError

DEFAULT_MAX_BYTES = 20 << 30  # stage cache limit per output folder, unless the recipe or CLI says


def shared_cache_dir(configured: str | Path | None = None) -> Path:
    """The user-level cache folder: the recipe's `cache.shared_dir`, else $CURATE_CACHE_DIR, else
    $XDG_CACHE_HOME/curate, else ~/.cache/curate."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("CURATE_CACHE_DIR"):
        return Path(os.environ["CURATE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "curate"


def parse_size(text: str | int) -> int:
    """Bytes from `20GB`, `500 MiB`, `1.5G` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = str(text).strip().lower().replace(" ", "").removesuffix("ib").removesuffix("b")
    number = raw.rstrip("kmgt")
    try:
        return int(float(number) * units[raw[len(number) :]])
    except (ValueError, KeyError):
        raise CurateError(f"not a size: {text!r}", hint="e.g. 20GB, 500MB or a number of bytes") from None


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# keys --------------------------------------------------------------------------------------------


def digest(*parts: Any) -> str:
    """A short digest of JSON-able parts (the cache keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


def _read_source(path: Path) -> bytes:
    return path.read_bytes()


@functools.cache
def module_fingerprint(module: str) -> str:
    """Digest of a module's source and of every curate module it imports, directly or through
    others, at the top or inside functions: what a cached result computed by its code depends on.
    Editing any other module (the CLI, the trainer) leaves it unchanged."""
    h = hashlib.blake2b(digest_size=10)
    for path in sorted(_closure(module), key=str):
        h.update(str(_relative(path)).encode())
        h.update(_read_source(path))
    return h.hexdigest()


def _closure(module: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_imported(path))
    return seen


def _module_file(module: str) -> Path | None:
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__file__", None):
        return Path(loaded.__file__).resolve()
    if module != "curate" and not module.startswith("curate."):
        return None
    base = Path(curate.__file__).resolve().parent.joinpath(*module.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path) -> list[str]:
    """The curate modules a source file imports (names imported from a package that are modules
    themselves count as those modules)."""
    package = _package_of(path)
    found = []
    for node in ast.walk(ast.parse(_read_source(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "curate"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            if base.split(".")[0] != "curate":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(sub if _module_file(sub) is not None else base)
    return found


def _package_of(path: Path) -> str:
    rel = _relative(path)
    parts = ["curate", *rel.with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def _relative(path: Path) -> Path:
    root = Path(curate.__file__).resolve().parent
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


class FileDigests:
    """Content digests of files and folders, remembered by (size, mtime) so that unchanged inputs
    and model folders are not read again on every run (a memo in the cache folder)."""

    def __init__(self, memo: Path | None) -> None:
        self.memo = memo
        self._known: dict[str, list] = {}
        if memo is not None and memo.is_file():
            try:
                self._known = json.loads(memo.read_text())
            except (OSError, ValueError):
                self._known = {}
        self._dirty = False

    def sha256(self, path: Path) -> str:
        """The SHA-256 of a file's bytes."""
        stat = path.stat()
        key = str(path.resolve())
        seen = self._known.get(key)
        if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns:
            return seen[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self._known[key] = [stat.st_size, stat.st_mtime_ns, h.hexdigest()]
        self._dirty = True
        return h.hexdigest()

    def tree(self, path: Path) -> str:
        """A digest of a file, or of every file under a folder (names and contents)."""
        h = hashlib.blake2b(digest_size=16)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            h.update(self.sha256(f).encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.memo is None or not self._dirty:
            return
        try:
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo.with_name(f".{self.memo.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self._known))
            os.replace(tmp, self.memo)
        except OSError:
            pass  # a memo that cannot be saved only costs a re-read next time


# the stage cache ----------------------------------------------------------------------------------


@dataclass
class Entry:
    """One cached stage output."""

    key: str
    folder: Path
    done: dict

    def _parts(self, kind: str) -> list[Part]:
        return [Part(str(self.folder / name), rows) for name, rows in self.done["parts"][kind]]

    @property
    def records(self) -> RecordFiles:
        """The stage's output records: kept, then added."""
        from curate.records import RECORD_SCHEMA

        return RecordFiles(self._parts("records") + self._parts("added"), RECORD_SCHEMA)

    @property
    def dropped(self) -> list[Part]:
        return self._parts("dropped")

    @property
    def edits(self) -> list[Part]:
        return self._parts("edits")

    @property
    def artifacts(self) -> list[Path]:
        """Files the stage made for the version folder (a plot), named `<stage>-<name>`."""
        return [self.folder / name for name in self.done.get("artifacts", [])]


class StageCache:
    """Content-addressed stage outputs under `root`, least recently used first out past `max_bytes`."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    @property
    def entries_dir(self) -> Path:
        return self.root / "stages"

    def get(self, key: str) -> Entry | None:
        folder = self.entries_dir / key
        done = folder / "done.json"
        if not done.is_file():
            return None
        try:
            entry = Entry(key, folder, json.loads(done.read_text()))
            os.utime(done)  # used now: the last to be evicted
        except (OSError, ValueError):
            return None
        return entry

    def begin(self, key: str) -> Path:
        """A fresh private folder to write an entry into; `commit` makes it the entry."""
        tmp = self.entries_dir / f".tmp-{key}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, key: str, tmp: Path, done: dict) -> Entry:
        """Seal an entry: done.json last, then one rename, so a crash never leaves a half entry."""
        done = {**done, "bytes": sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())}
        (tmp / "done.json").write_text(json.dumps(done))
        final = self.entries_dir / key
        try:
            os.replace(tmp, final)
        except OSError:  # another run committed the same key meanwhile: its entry is as good
            shutil.rmtree(tmp, ignore_errors=True)
            found = self.get(key)
            if found is None:
                raise
            return found
        return Entry(key, final, done)

    def entries(self) -> list[dict]:
        """Every entry with its stage, size, last use and the run that computed it."""
        out = []
        if not self.entries_dir.is_dir():
            return out
        for folder in self.entries_dir.iterdir():
            done = folder / "done.json"
            if folder.name.startswith(".") or not done.is_file():
                continue
            try:
                info = json.loads(done.read_text())
                used = done.stat().st_mtime
            except (OSError, ValueError):
                continue
            out.append(
                {
                    "key": folder.name,
                    "stage": info.get("result", {}).get("name", "?"),
                    "bytes": info.get("bytes", 0),
                    "used": used,
                    "run": info.get("run"),
                }
            )
        return sorted(out, key=lambda e: e["used"], reverse=True)

    def info(self) -> dict:
        entries = self.entries()
        by_stage: dict[str, dict] = {}
        for e in entries:
            item = by_stage.setdefault(e["stage"], {"entries": 0, "bytes": 0})
            item["entries"] += 1
            item["bytes"] += e["bytes"]
        return {
            "path": str(self.entries_dir),
            "entries": len(entries),
            "bytes": sum(e["bytes"] for e in entries),
            "max_bytes": self.max_bytes,
            "stages": by_stage,
            "newest": entries[0]["used"] if entries else None,
            "oldest": entries[-1]["used"] if entries else None,
        }

    def prune(self, max_bytes: int | None = None, protect: frozenset[str] = frozenset()) -> dict:
        """Remove least recently used entries until the rest fit in `max_bytes` (default: the limit);
        entries in `protect` (the current run's) stay. Also clears leftovers of crashed writes."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        removed, freed = 0, 0
        entries = self.entries()
        total = sum(e["bytes"] for e in entries)
        for e in reversed(entries):  # oldest first
            if total <= limit:
                break
            if e["key"] in protect:
                continue
            shutil.rmtree(self.entries_dir / e["key"], ignore_errors=True)
            total -= e["bytes"]
            freed += e["bytes"]
            removed += 1
        if self.entries_dir.is_dir():
            for leftover in self.entries_dir.glob(".tmp-*"):
                if (
                    not _alive(leftover.name.rsplit("-", 1)[-1])
                    or time.time() - leftover.stat().st_mtime > 86400
                ):
                    shutil.rmtree(leftover, ignore_errors=True)
        return {"removed": removed, "freed_bytes": freed, "bytes": total, "max_bytes": limit}


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
