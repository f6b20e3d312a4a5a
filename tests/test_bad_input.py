"""Bad input, generated here: every case ends in a version that accounts for every row (kept, dropped
or quarantined with file, line and reason) or in a clear one-line error naming the file; never a
traceback, and never a row lost."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from click.testing import CliRunner

from curate.cli import main

GOOD = [
    {"instruction": "Name a primary colour.", "output": "Red."},
    {"instruction": "Translate 'good morning' to French.", "output": "Bonjour."},
    {"instruction": "What is 2 + 3?", "output": "5"},
]


def lines(rows: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def run(folder: Path) -> tuple[int, str, dict | None]:
    recipe = {
        "inputs": [{"path": "in"}],
        "stages": [{"normalize": {}}, {"filter": {}}, {"dedup": {"exact": True}}],
    }
    (folder / "recipe.yaml").write_text(json.dumps(recipe))
    result = CliRunner().invoke(
        main, ["run", str(folder / "recipe.yaml"), "--out", str(folder / "out"), "--json"]
    )
    manifest = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, result.output, manifest


def quarantine(manifest: dict) -> list[dict]:
    text = Path(manifest["path"], "quarantine.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def accounted(manifest: dict) -> None:
    """Conservation, and every quarantine entry names its file, line and reason."""
    c = manifest["counts"]
    assert c["input"] == c["kept"] + c["dropped"] + c["quarantined"] - c["synthetic"]
    entries = quarantine(manifest)
    assert len(entries) == c["quarantined"]
    for e in entries:
        assert e["file"] and isinstance(e["line"], int) and e["error"]


def truncated(compress: Callable[[bytes], bytes]) -> bytes:
    data = compress(lines(GOOD * 200))
    return data[: len(data) * 2 // 3]


# name -> (files under in/, expected: "kept N quarantined M" or "error: TEXT")
CASES: dict[str, tuple[dict[str, bytes], str]] = {
    "invalid json lines": (
        {"a.jsonl": lines(GOOD[:2]) + b'{"instruction": "x", "output": \n' + b"not json\n" + lines(GOOD[2:])},
        "kept 3 quarantined 2",
    ),
    "utf-8 bom": ({"a.jsonl": b"\xef\xbb\xbf" + lines(GOOD)}, "kept 3 quarantined 0"),
    "crlf line ends": ({"a.jsonl": lines(GOOD).replace(b"\n", b"\r\n")}, "kept 3 quarantined 0"),
    "invalid utf-8": (
        {"a.jsonl": lines(GOOD[:2]) + b'{"instruction": "caf\xe9", "output": "ok"}\n' + lines(GOOD[2:])},
        "kept 3 quarantined 1",
    ),
    "nul bytes": (
        {
            "a.jsonl": lines(GOOD[:2])
            + b'{"instruction": "a\x00b", "output": "ok"}\n\x00\x00\n'
            + lines(GOOD[2:])
        },
        "kept 3 quarantined 2",  # a raw NUL inside a JSON string is invalid JSON, as is a line of NULs
    ),
    "lone surrogates": (
        {
            "a.jsonl": lines(GOOD) + b'{"instruction": "bad \\ud800 text", "output": "x"}\n',
            "b.json": b'[{"instruction": "bad \\udfff", "output": "x"}, '
            b'{"instruction": "Fine?", "output": "Yes."}]',
        },
        "kept 4 quarantined 2",
    ),
    "nan and infinity": (
        {
            "a.jsonl": lines(GOOD)
            + b'{"instruction": "x", "output": NaN}\n{"instruction": Infinity, "output": "y"}\n'
        },
        "kept 3 quarantined 2",
    ),
    "nested 100,000 deep": (
        {
            "a.jsonl": lines(GOOD)
            + b'{"instruction": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b', "output": "x"}\n'
        },
        "kept 3 quarantined 1",
    ),
    "wrong types": (
        {
            "a.jsonl": lines(GOOD)
            + lines(
                [
                    {"instruction": 7, "output": "x"},
                    {"instruction": ["a"], "output": "x"},
                    {"instruction": {"a": 1}, "output": "x"},
                    {"instruction": "a", "output": None},
                    {"instruction": "a", "output": True},
                ]
            ),
            "b.jsonl": lines(
                [
                    {"messages": "hello"},
                    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
                    {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
                    {"messages": [{"role": 3, "content": "q"}, {"role": "assistant", "content": "x"}]},
                    {
                        "messages": [
                            {"role": "user", "content": "Fine?"},
                            {"role": "assistant", "content": "Yes."},
                        ]
                    },
                ]
            ),
            "c.jsonl": lines(
                [
                    {"conversations": {"from": "human"}},
                    {"conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]},
                    {
                        "conversations": [
                            {"from": "human", "value": "Hi?"},
                            {"from": "gpt", "value": "Hello."},
                        ]
                    },
                ]
            ),
        },
        "accounted",
    ),
    "empty files": (
        {"a.jsonl": b"", "b.json": b"", "c.csv": b"", "d.jsonl": lines(GOOD)},
        "kept 3 quarantined 0",
    ),
    "empty conversations": (
        {"a.jsonl": lines(GOOD + [{"messages": []}, {"conversations": []}])},
        "accounted",
    ),
    "unknown roles": (
        {
            "a.jsonl": lines(
                GOOD[:1]
                + [{"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]}]
            )
        },
        "accounted",
    ),
    "json array named .jsonl": ({"a.jsonl": json.dumps(GOOD, indent=2).encode()}, "kept 3 quarantined 0"),
    "jsonl named .json": ({"a.json": lines(GOOD)}, "kept 3 quarantined 0"),
    "csv with embedded newlines and quotes": (
        {"a.csv": b'instruction,output\n"Say ""hi""\non two lines",Hi\n"A, B",C\n'},
        "kept 2 quarantined 0",
    ),
    "a json document that does not parse": (
        {"a.json": b'{"instruction": "a", "output": "b"},\n{"instruction": "c", "output": "d"}]'},
        "error: a.json: not valid JSON",
    ),
    "latin-1 json": (
        {"a.json": '[{"instruction": "caf\u00e9?", "output": "x"}]'.encode("latin-1")},
        "error: a.json: not UTF-8 text",
    ),
    "latin-1 csv": (
        {"a.csv": "instruction,output\ncaf\u00e9?,x\n".encode("latin-1")},
        "error: a.csv: not UTF-8",
    ),
    "parquet with a broken footer": (
        {"a.parquet": b"PAR1" + b"\x00" * 64 + b"PAR1", "b.jsonl": lines(GOOD)},
        "error: a.parquet",
    ),
    "truncated gzip": ({"a.jsonl.gz": truncated(gzip.compress)}, "error: a.jsonl.gz"),
    "truncated zstd": ({"a.jsonl.zst": truncated(zstandard.ZstdCompressor().compress)}, "error: a.jsonl.zst"),
    "truncated xz": ({"a.jsonl.xz": truncated(lzma.compress)}, "error: a.jsonl.xz"),
    "truncated bz2": ({"a.jsonl.bz2": truncated(bz2.compress)}, "error: a.jsonl.bz2"),
    "a 100 MB line": (
        {
            "a.jsonl": lines(GOOD)
            + json.dumps({"instruction": "long", "output": "x" * 100_000_000}).encode()
            + b"\n"
        },
        "accounted",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, tmp_path: Path):
    files, expected = CASES[case]
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    code, output, manifest = run(tmp_path)
    assert "Traceback" not in output
    if expected.startswith("error: "):
        assert code == 1, output
        assert expected.removeprefix("error: ") in output and "error" in output
        return
    assert code == 0, output
    accounted(manifest)
    if expected != "accounted":
        _, kept, _, quarantined = expected.split()
        assert (manifest["counts"]["kept"], manifest["counts"]["quarantined"]) == (
            int(kept),
            int(quarantined),
        )


def test_a_mixed_folder_and_a_symlink_loop(tmp_path: Path):
    folder = tmp_path / "in"
    (folder / "deep" / "deeper").mkdir(parents=True)
    (folder / "a.jsonl").write_bytes(lines(GOOD[:1]))
    (folder / "deep" / "b.json").write_text(json.dumps(GOOD[1:2]))
    pq.write_table(pa.Table.from_pylist(GOOD[2:]), folder / "deep" / "deeper" / "c.parquet")
    (folder / "deep" / "notes.txt").write_text("not data")
    os.symlink(folder, folder / "deep" / "loop")
    code, output, manifest = run(tmp_path)
    assert "Traceback" not in output
    assert code == 0, output
    accounted(manifest)
    assert manifest["counts"]["kept"] == 3


def test_a_file_that_vanishes_mid_run_is_one_clear_error(tmp_path: Path, monkeypatch):
    import curate.formats

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (folder / name).write_bytes(lines(GOOD))
    original = curate.formats.iter_file

    def vanishing(path: Path, *args):
        if path.name == "b.jsonl":  # listed and hashed, then gone when its turn to be read comes
            path.unlink()
        return original(path, *args)

    monkeypatch.setattr(curate.formats, "iter_file", vanishing)
    code, output, _ = run(tmp_path)
    assert code == 1 and "Traceback" not in output
    assert "b.jsonl: could not be read (No such file or directory)" in output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("v*"))


def test_a_recipe_that_is_not_utf8_is_one_clear_error(tmp_path: Path):
    (tmp_path / "r.yaml").write_bytes("name: caf\u00e9\ninputs: []\nstages: []\n".encode("latin-1"))
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1 and "not UTF-8 text" in result.output and "Traceback" not in result.output
