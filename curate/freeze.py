"""Frozen eval sets: records taken out of a version, once, to judge every later change on.

`freeze_records` picks N records of a version, stratified by source (each source gives its share
of N, largest remainders first) and, within a source, by a seeded hash of the record ids, so the
same version, N and seed always freeze the same records. `write_frozen` writes them as JSONL (one
item per line: id, question = the first user turn, answer = the last assistant turn, the whole
conversation and its source) with a sidecar `<file>.json` holding the file's sha256, the version,
N, the seed and the counts per source. A frozen file is never rewritten with other content.

The file is an eval set like any other: listed in a recipe's `eval_sets` (with `fields: {question:
question, answer: answer, id: id}`), decontaminate drops those records from every later version,
the runner refuses to write a version that still holds one, and the trainer's gates judge on them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from xxhash import xxh3_64_intdigest

from curate.errors import CurateError
from curate.versions import now_iso, read_manifest, resolve_version, write_atomic


def shares(sizes: dict[str, int], n: int) -> dict[str, int]:
    """n split over groups in proportion to their sizes (largest remainders; none above its size)."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    exact = {k: n * v / total for k, v in sizes.items()}
    given = {k: min(sizes[k], int(x)) for k, x in exact.items()}
    order = sorted(sizes, key=lambda k: (-(exact[k] - int(exact[k])), k))
    while sum(given.values()) < n:
        for k in order:
            if sum(given.values()) == n:
                break
            if given[k] < sizes[k]:
                given[k] += 1
    return given


def freeze_records(version: str | Path, n: int = 200, seed: int = 0) -> tuple[list[dict], dict]:
    """The frozen items of a version and what describes them (the sidecar, without the hash)."""
    folder = resolve_version(version)
    table = pq.read_table(folder / "data.parquet", columns=["id", "messages", "source"])
    ids = table["id"].to_pylist()
    names = [(s or {}).get("name") or (s or {}).get("path") or "" for s in table["source"].to_pylist()]
    by_source: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        by_source.setdefault(name, []).append(row)
    quota = shares({k: len(v) for k, v in by_source.items()}, n)
    picked = []
    for name in sorted(by_source):
        rows = by_source[name]
        rank = np.array([xxh3_64_intdigest(ids[r].encode(), seed=seed) for r in rows], np.uint64)
        picked += [rows[i] for i in np.argsort(rank, kind="stable")[: quota[name]]]
    picked.sort()
    records = table.take(picked).to_pylist()
    items = []
    for record in records:
        turns = record["messages"]
        question = next((m["content"] for m in turns if m["role"] == "user"), "") or ""
        answer = next((m["content"] for m in reversed(turns) if m["role"] == "assistant"), None)
        messages = [{"role": m["role"], "content": m["content"]} for m in turns]
        items.append(
            {
                "id": record["id"],
                "question": question,
                "answer": answer,
                "messages": messages,
                "source": record["source"],
            }
        )
    info = {
        "version": read_manifest(folder).get("version", folder.name),
        "version_path": str(folder.resolve()),
        "n": len(items),
        "seed": seed,
        "per_source": {k: v for k, v in sorted(quota.items()) if v},
        "created": now_iso(),
    }
    return items, info


def write_frozen(path: str | Path, items: list[dict], info: dict) -> dict:
    """Write the frozen file and its sidecar; refuse to replace a frozen file by other content."""
    path = Path(path)
    text = "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise CurateError(
            f"{path} is a frozen eval set already, with other records",
            hint="a frozen set stays as it is: give another --out (and judge every arm on one set)",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    sidecar = {**info, "file": path.name, "sha256": digest}
    sidecar_path = path.with_name(path.name + ".json")
    if sidecar_path.exists():  # the same records frozen again: the first freeze's record stands
        return json.loads(sidecar_path.read_text())
    write_atomic(sidecar_path, json.dumps(sidecar, indent=1))
    return sidecar
