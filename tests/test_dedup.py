"""The dedup stage on real data: known cross-file copies, edited copies, keep policies, scopes, reference."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from datasketch import LeanMinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from curate.errors import RecipeError
from curate.formats import InputSpec, read_input
from curate.records import make_record, message, to_table
from curate.stages.base import Drop, StageContext, build_config
from curate.stages.dedup import DedupStage
from curate.text.conversation import conversation_text
from curate.text.lsh import clusters
from curate.text.minhash import MinHashConfig, signatures
from curate.text.shingles import shingles

CODEGEN = "raw/gpteacher_codegen.json.gz"
NEW_CODEALPACA = "raw/new_codealpaca.json.gz"


def _records(shared_data: Path, *paths: str) -> list[dict]:
    out: list[dict] = []
    for path in paths:
        for batch in read_input(InputSpec(path=path), shared_data):
            out.extend(batch.records)
    return out


def _table(records: list[dict]) -> pl.DataFrame:
    return pl.from_arrow(to_table(records))


def _run(records: list[dict], base_dir: Path, **options) -> list[Drop | None]:
    config = build_config(DedupStage.Config, options, "stages[0].dedup")
    stage = DedupStage(config, StageContext(base_dir=base_dir))
    verdicts = stage.apply(to_table(records)).verdicts()
    assert len(verdicts) == len(records)
    return verdicts


def _edited(text: str, changes: int) -> str:
    """The text with `changes` words, evenly spaced, replaced by another word."""
    words = text.split(" ")
    step = max(1, len(words) // changes)
    return " ".join("zebra" if i % step == step // 2 else w for i, w in enumerate(words))


@pytest.fixture(scope="module")
def codegen_pair(shared_data: Path) -> list[dict]:
    return _records(shared_data, CODEGEN, NEW_CODEALPACA)


@pytest.fixture(scope="module")
def dolly(shared_data: Path) -> list[dict]:
    return _records(shared_data, "raw/foundry_dolly_hhrlhf_train_small.jsonl.gz")


def test_new_codealpaca_is_found_as_a_copy_of_gpteacher(codegen_pair: list[dict], shared_data: Path) -> None:
    verdicts = _run(codegen_pair, shared_data, exact=True)
    drops = [(r, v) for r, v in zip(codegen_pair, verdicts, strict=True) if v is not None]
    assert len(codegen_pair) == 9070
    assert len(drops) == 4535
    assert {r["source"]["path"] for r, _ in drops} == {NEW_CODEALPACA}
    for record, drop in drops:
        assert drop.reason == "exact_duplicate"
        # the copy sits at the same row of the other file and, being the same conversation, has the same id
        assert drop.evidence["duplicate_of_source"] == f"{CODEGEN}:{record['source']['row']}"
        assert drop.evidence["duplicate_of"] == record["id"]
        assert drop.evidence["cluster_size"] == 2


def test_near_dedup_on_the_code_sets_adds_the_two_codegen_near_copies(
    codegen_pair: list[dict], shared_data: Path
) -> None:
    verdicts = _run(codegen_pair, shared_data, minhash={"threshold": 0.8})
    reasons = Counter(
        (r["source"]["path"], v.reason) for r, v in zip(codegen_pair, verdicts, strict=True) if v
    )
    assert reasons == {(NEW_CODEALPACA, "exact_duplicate"): 4535, (CODEGEN, "near_duplicate"): 2}
    for record, drop in zip(codegen_pair, verdicts, strict=True):
        if drop is not None and drop.reason == "near_duplicate":
            kept = next(r for r in codegen_pair if r["id"] == drop.evidence["duplicate_of"])
            assert drop.evidence["jaccard"] >= 0.8
            assert kept["source"]["row"] < record["source"]["row"]


def test_light_edit_is_merged_and_heavy_edit_and_unrelated_records_are_not(
    dolly: list[dict], shared_data: Path
) -> None:
    base = _run(dolly, shared_data, exact=False, minhash=True)
    original = max(dolly, key=lambda r: len(r["messages"][-1]["content"].split()))
    answer = original["messages"][-1]["content"]
    light = _edited(answer, 3)  # a few words changed
    heavy = _edited(answer, answer.count(" ") // 3)  # a third of the words changed
    assert answer.count(" ") > 150
    copies = [
        make_record(
            [*original["messages"][:-1], message("assistant", text)], {"name": "edits", "path": "x", "row": i}
        )
        for i, text in enumerate((light, heavy))
    ]
    verdicts = _run(dolly + copies, shared_data, exact=False, minhash=True)
    assert verdicts[: len(dolly)] == base  # the copies change nothing for the real records
    light_drop, heavy_drop = verdicts[len(dolly) :]
    assert heavy_drop is None
    assert light_drop.reason == "near_duplicate"
    assert light_drop.evidence["duplicate_of"] == original["id"]
    assert light_drop.evidence["jaccard"] >= 0.8
    a = set(shingles(conversation_text(_table([original]))[0]))
    b = set(shingles(conversation_text(_table([copies[0]]))[0]))
    assert len(a & b) / len(a | b) >= 0.8  # it truly is above the threshold
    exact = _run(dolly + copies, shared_data, exact=False, minhash={"verify": "exact"})
    assert exact[len(dolly)].evidence["jaccard_exact"] == round(len(a & b) / len(a | b), 4)
    assert exact[len(dolly) + 1] is None


def test_unchecked_lsh_matches_datasketch_index_clusters(dolly: list[dict], shared_data: Path) -> None:
    """verify: none drops exactly the non-first members of the clusters MinHashLSH queries give."""
    verdicts = _run(dolly, shared_data, exact=False, minhash={"verify": "none"})
    sigs = signatures(conversation_text(_table(dolly)))
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    lean = [LeanMinHash(seed=1, hashvalues=row, scheme="affine32") for row in sigs]
    for i, m in enumerate(lean):
        lsh.insert(i, m)
    pairs = np.array([(i, j) for i, m in enumerate(lean) for j in lsh.query(m) if j < i] or [(0, 0)])
    roots = clusters(len(dolly), pairs[:, 0], pairs[:, 1])
    expected = {i for i in range(len(dolly)) if roots[i] != i}
    assert {i for i, v in enumerate(verdicts) if v} == expected
    assert len(expected) > 0


def _conv(user: str, answer: str, source: str, row: int, **meta) -> dict:
    return make_record(
        [message("user", user), message("assistant", answer)],
        {"name": source, "path": f"{source}.jsonl", "row": row},
        meta=meta or None,
    )


def test_keep_policies(tmp_path: Path) -> None:
    question = "Explain how a binary search over a sorted array finds its target quickly."
    records = [
        _conv(question, "It halves the range each step.", "a", 0, quality=0.2),
        _conv(question, "It halves the search range at each step, comparing with the middle.", "a", 1),
        _conv(question, "Halving.", "a", 2, quality=0.9),
    ]
    by_user = {"key": "user"}
    assert [v is None for v in _run(records, tmp_path, **by_user)] == [True, False, False]
    assert [v is None for v in _run(records, tmp_path, keep="longest", **by_user)] == [False, True, False]
    scored = _run(records, tmp_path, keep="score", score_column="quality", **by_user)
    assert [v is None for v in scored] == [False, False, True]
    assert scored[0].evidence["duplicate_of"] == records[2]["id"]


def test_scopes(tmp_path: Path) -> None:
    text = "Write a haiku about the autumn moon rising over quiet water tonight."
    records = [
        _conv(text, "Moon on still water.", "a", 0),
        _conv(text, "Moon on still water.", "a", 1),  # a repeat inside source a
        _conv(text, "Moon on still water.", "b", 0),  # a copy in source b
        _conv("Something else entirely, about trains.", "Trains run.", "b", 1),
    ]
    scopes = ("all", "within_source", "across_sources")
    dropped = {scope: [v is not None for v in _run(records, tmp_path, scope=scope)] for scope in scopes}
    assert dropped == {
        "all": [False, True, True, False],
        "within_source": [False, True, False, False],
        "across_sources": [False, False, True, False],
    }
    for scope, expected in dropped.items():
        near = _run(records, tmp_path, exact=False, minhash=True, scope=scope)
        assert [v is not None for v in near] == expected, scope
        assert all(v.reason == "near_duplicate" for v in near if v is not None)


def test_reference_version_drops_what_it_already_holds(
    codegen_pair: list[dict], dolly: list[dict], tmp_path: Path
) -> None:
    codegen = [r for r in codegen_pair if r["source"]["path"] == CODEGEN]
    new = [r for r in codegen_pair if r["source"]["path"] == NEW_CODEALPACA]
    version = tmp_path / "runs" / "v1"
    version.mkdir(parents=True)
    _table(codegen).write_parquet(version / "data.parquet")
    original = max(dolly[:200], key=lambda r: len(r["messages"][-1]["content"]))
    _table([original]).write_parquet(tmp_path / "one.parquet")
    verdicts = _run(new[:300] + dolly[:200], tmp_path, reference="runs/v1", minhash=True)
    assert [v.reason if v else None for v in verdicts[:300]] == ["exact_duplicate"] * 300
    assert all(v.evidence["reference"] == "runs/v1" for v in verdicts[:300])
    assert verdicts[0].evidence["duplicate_of_source"] == f"{CODEGEN}:0"
    assert verdicts[300:] == _run(dolly[:200], tmp_path, minhash=True)
    edited = make_record(
        [*original["messages"][:-1], message("assistant", _edited(original["messages"][-1]["content"], 3))],
        {"name": "edits", "path": "x", "row": 0},
    )
    near = _run([edited], tmp_path, reference="one.parquet", minhash=True)
    assert near[0].reason == "near_duplicate" and near[0].evidence["duplicate_of"] == original["id"]
    with pytest.raises(Exception, match="no dataset version"):
        _run(new[:3], tmp_path, reference="runs/missing")


def test_same_input_same_verdicts(dolly: list[dict], shared_data: Path) -> None:
    first = _run(dolly, shared_data, minhash=True)
    assert first == _run(dolly, shared_data, minhash=True)
    assert any(v is not None for v in first)


def test_recipe_options_validate() -> None:
    assert build_config(DedupStage.Config, {"minhash": False}, "d").minhash is None
    assert build_config(DedupStage.Config, {"minhash": True}, "d").minhash == MinHashConfig()
    cfg = build_config(DedupStage.Config, {"minhash": {"threshold": 0.7, "num_perm": 64, "ngram": 3}}, "d")
    assert (cfg.minhash.threshold, cfg.minhash.num_perm, cfg.minhash.band_shape()) == (
        0.7,
        64,
        _optimal_param(0.7, 64, 0.5, 0.5),
    )
    with pytest.raises(RecipeError, match="did you mean 'threshold'"):
        build_config(DedupStage.Config, {"minhash": {"treshold": 0.8}}, "d")
    with pytest.raises(RecipeError, match="score_column"):
        build_config(DedupStage.Config, {"keep": "score"}, "d")
    with pytest.raises(RecipeError, match="bands"):
        build_config(DedupStage.Config, {"minhash": {"bands": 20, "rows": 10}}, "d")
    with pytest.raises(RecipeError, match="scope"):
        build_config(DedupStage.Config, {"scope": "everywhere"}, "d")


def test_tiny_and_empty_inputs(tmp_path: Path) -> None:
    one = [_conv("Only one record here, nothing to compare.", "Fine.", "a", 0)]
    assert _run(one, tmp_path, minhash=True) == [None]
    blank = [_conv("", "", "a", i) for i in range(3)]  # no text to compare: never judged here
    assert _run(blank, tmp_path, minhash=True) == [None, None, None]
    punct = [_conv("?!", "...", "a", i) for i in range(2)]  # text without words: exact copies only
    verdicts = _run(punct, tmp_path, minhash=True)
    assert verdicts[0] is None and verdicts[1].reason == "exact_duplicate"
    assert _run(punct, tmp_path, exact=False, minhash=True) == [None, None]


@pytest.mark.parametrize("across", [False, True])
def test_duplicate_clusters_equal_polars_window_functions(across: bool) -> None:
    """lsh.duplicates (one sort) against the same rules written with polars windows: the kept record
    is the best-ranked of its cluster, clusters are numbered by their first row."""
    from curate.text.lsh import duplicates

    rng = np.random.default_rng(3)
    n = 20_000
    df = pl.DataFrame(
        {
            "row": np.arange(n),
            "k0": rng.integers(0, 2_000, n),
            "k1": rng.integers(0, 3, n),
            "rank": rng.permutation(n),
            "group": rng.integers(0, 4, n),
        }
    )
    part = ["k0", "k1"]
    ref = df.with_columns(size=pl.len().over(part)).filter(pl.col("size") > 1)
    ref = ref.with_columns(
        kept=pl.col("row").sort_by("rank").first().over(part),
        kept_group=pl.col("group").sort_by("rank").first().over(part),
        cluster=pl.col("row").min().over(part).rank("dense") - 1,
    ).filter(pl.col("row") != pl.col("kept"))
    if across:
        ref = ref.filter(pl.col("group") != pl.col("kept_group"))
    ref = ref.sort("row")
    got = duplicates(
        [df["k0"].to_numpy(), df["k1"].to_numpy()], df["rank"].to_numpy(), df["group"].to_numpy(), across
    )
    assert got.rows.tolist() == ref["row"].to_list() and len(got.rows) > 1000
    assert got.kept.tolist() == ref["kept"].to_list()
    assert got.cluster.tolist() == ref["cluster"].to_list()
    assert got.size.tolist() == ref["size"].to_list()
