"""Format detection: once per file from its first rows, per row only where a file mixes shapes.

Detectors are tried in priority order (specific shapes such as OASST trees and HH transcripts
before loose ones such as bare instruction lists). A file whose first rows match no format is an
error that names the keys it saw and the recipe fix.
"""

from __future__ import annotations

from collections import Counter

from curate.errors import FormatError
from curate.formats.base import FORMATS, Format

HEAD_ROWS = 32  # rows looked at to choose a file's format


_order: list[Format] = []


def _ordered() -> list[Format]:
    # Formats register on import; the order is rebuilt only when one was added since.
    if len(_order) != len(FORMATS) - ("fields" in FORMATS):
        _order[:] = sorted((f for f in FORMATS.values() if f.name != "fields"), key=lambda f: f.priority)
    return _order


def detect_row(row: dict) -> Format | None:
    """The first format whose detector accepts the row, or None."""
    for fmt in _ordered():
        if fmt.detect(row):
            return fmt
    return None


def detect_file(rows: list[dict]) -> tuple[Format | None, Counter]:
    """The most common format among a file's first rows (ties: higher priority), and all the counts."""
    counts: Counter = Counter()
    for row in rows:
        fmt = detect_row(row)
        counts[fmt.name if fmt else None] += 1
    known = [(n, -FORMATS[name].priority, name) for name, n in counts.items() if name is not None]
    if not known:
        return None, counts
    return FORMATS[max(known)[2]], counts


def keys_seen(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def unknown_shape(path: str, rows: list[dict]) -> FormatError:
    """The error for a file no format recognises: what it saw and the two ways to fix the recipe."""
    keys = keys_seen(rows)
    text_keys = [k for k in keys if rows and isinstance(rows[0].get(k), str)]
    guess = ", ".join(f"{role}: {key}" for role, key in zip(("user", "assistant"), text_keys, strict=False))
    names = ", ".join(f.name for f in _ordered())
    shown = ", ".join(k if len(k) <= 40 else k[:37] + "..." for k in keys) or "(none)"
    hint = (
        f"give the format in the recipe input (`format: NAME`, one of {names}) "
        f"or map the fields to roles, e.g. `fields: {{{guess or 'user: KEY, assistant: KEY'}}}`"
    )
    if any(len(k) > 40 for k in keys):
        hint = f"these keys look like data: does the file lack a header row? Otherwise {hint}"
    return FormatError(f"{path}: unknown record shape; keys seen: {shown}", hint=hint)


def format_names() -> list[str]:
    return sorted(FORMATS)
