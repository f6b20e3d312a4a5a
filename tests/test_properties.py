"""Property tests (hypothesis): records of every common shape, with any text and with corrupted
fields and lines, go through the readers, normalize and filter into a version where every input
line is accounted for, and every train.jsonl line parses and round-trips to the version's data.
(JSONL lines end at "\n" only: texts may hold U+2028 and other characters str.splitlines splits at.)"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.errors import FormatError
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
from curate.records import train_messages

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # any Unicode but surrogates
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.lists(TEXT, max_size=2),
    st.dictionaries(TEXT, TEXT, max_size=2),
)  # fmt: skip


def turns(roles: tuple[str, str], key: str, value: str) -> st.SearchStrategy:
    return st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3).map(
        lambda pairs: [{key: r, value: t} for pair in pairs for r, t in zip(roles, pair, strict=True)]
    )


SHAPES = st.one_of(
    st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT}),
    st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT}),
    st.fixed_dictionaries({"conversations": turns(("human", "gpt"), "from", "value")}),
    st.fixed_dictionaries({"messages": turns(("user", "assistant"), "role", "content")}),
)


@st.composite
def line(draw) -> bytes:
    """A JSONL line: a record, maybe with one field replaced by junk, maybe cut or with bad bytes."""
    record = draw(SHAPES)
    if draw(st.integers(0, 4)) == 0:
        record[draw(st.sampled_from(sorted(record)))] = draw(JUNK)
    data = json.dumps(record, ensure_ascii=draw(st.booleans())).encode()
    damage = draw(st.integers(0, 9))
    if damage == 0:
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == 1:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\x00", b"\xc3", b"\r"])) + data[at:]
    return data.replace(b"\n", b" ")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(line(), min_size=1, max_size=12), st.booleans())
def test_every_line_is_accounted_for_and_train_jsonl_round_trips(tmp_path: Path, lines, crlf):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # one per example (hypothesis replays examples)
    (folder / "a.jsonl").write_bytes((b"\r\n" if crlf else b"\n").join(lines) + b"\n")
    raw = {"inputs": [{"path": "a.jsonl"}], "stages": [{"normalize": {}}, {"filter": {}}]}
    try:
        run = run_recipe(recipe_from_dict(raw, folder), folder / "out", engine="serial")
    except FormatError as exc:  # no line of the file has a shape curate knows: a file error, by design
        assert str(exc).startswith("a.jsonl: unknown record shape") and exc.hint
        return
    counts = run.manifest["counts"]
    blank = sum(1 for ln in lines if not ln.strip(b" \r\t"))
    assert counts["input"] + blank == len(lines)  # blank lines are lines, not rows
    assert counts["input"] == counts["kept"] + counts["dropped"] + counts["quarantined"]
    quarantine = [json.loads(x) for x in (run.folder / "quarantine.jsonl").read_text().split("\n") if x]
    assert len(quarantine) == counts["quarantined"]
    assert all(
        q["file"].endswith("a.jsonl") and 1 <= q["line"] <= len(lines) and q["error"] for q in quarantine
    )

    import pyarrow.parquet as pq

    data = [train_messages(m) for m in pq.read_table(run.folder / "data.parquet")["messages"].to_pylist()]
    written = [
        json.loads(x) for x in (run.folder / "train.jsonl").read_text(encoding="utf-8").split("\n") if x
    ]
    assert sorted(json.dumps(w["messages"], sort_keys=True) for w in written) == sorted(
        json.dumps(m, sort_keys=True) for m in data
    )
