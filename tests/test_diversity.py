"""The diversity stage on ../shared/data/raw: deterministic selection, coverage better than chance,
semantic duplicates merged, and every dropped record pointing at a kept neighbour."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curate import selection
from curate.embed import Embedder
from curate.errors import RecipeError
from curate.evalsets import load_eval_sets
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
from curate.records import make_record, message, to_table
from curate.stages.base import StageContext, build_config
from curate.stages.diversity import DiversityStage


def stage(base: Path, seed: int = 0, **options) -> DiversityStage:
    config = build_config(DiversityStage.Config, options, "stages[0].diversity")
    return DiversityStage(config, StageContext(base_dir=base, seed=seed))


@pytest.fixture(scope="module")
def vectors(raw_table, shared_data) -> np.ndarray:
    features = stage(shared_data, k=1).features(raw_table)
    return np.asarray(features["vector"].combine_chunks().values).reshape(raw_table.num_rows, -1)


def test_kcenter_is_deterministic_per_seed_and_every_drop_names_its_nearest_kept(
    raw_table, vectors, shared_data
):
    first = stage(shared_data, method="kcenter", k=2000).apply(raw_table)
    again = stage(shared_data, method="kcenter", k=2000).apply(raw_table)
    other = stage(shared_data, seed=1, method="kcenter", k=2000).apply(raw_table)
    assert first.kept.num_rows == 2000 and first.rows_in == raw_table.num_rows == 85_669
    assert first.kept["id"].to_pylist() == again.kept["id"].to_pylist()
    assert first.kept["id"].to_pylist() != other.kept["id"].to_pylist()

    # evidence: the nearest kept record by id and source, at the distance a brute-force search finds
    kept_rows = np.setdiff1d(np.arange(raw_table.num_rows), first.drop_rows)
    index, distance = selection.nearest(vectors, kept_rows)
    ids = raw_table["id"].to_pylist()
    refs = [f"{s['path']}:{s['row']}" for s in raw_table["source"].to_pylist()]
    verdicts = first.verdicts()
    for row in first.drop_rows[::97]:  # a spread of ~830 of the 83,669 drops
        evidence = verdicts[row].evidence
        nearest = int(kept_rows[index[row]])
        assert verdicts[row].reason == "not_selected"
        assert evidence["nearest_kept_source"] == refs[nearest]
        assert evidence["nearest_kept"] == ids[nearest]
        assert evidence["distance"] == pytest.approx(distance[row], abs=1e-3)
    kept_ids = set(first.kept["id"].to_pylist())
    assert all(verdicts[r].evidence["nearest_kept"] in kept_ids for r in first.drop_rows)
    report = first.report
    assert report["kept"] == 2000 and report["clusters"] == 100
    assert report["coverage_radius_max"] == pytest.approx(float(distance.max()), abs=1e-3)


def test_kcenter_covers_raw_better_than_a_random_sample(vectors):
    picks, owner, distance = selection.kcenter(vectors, 2000, 0)
    # its own bookkeeping equals a brute-force nearest search
    _, brute = selection.nearest(vectors, np.sort(picks))
    assert np.allclose(brute, distance, atol=1e-5)
    assert np.array_equal(picks[owner[picks]], picks)  # every pick is its own nearest
    random_rows = np.random.default_rng(0).choice(vectors.shape[0], 2000, replace=False)
    _, chance = selection.nearest(vectors, np.sort(random_rows))
    # k-center's largest gap is under 75% of a random sample's (measured: 0.50 vs 0.75)
    assert distance.max() < 0.75 * chance.max()


def test_kcenter_equals_the_one_pick_at_a_time_greedy(vectors):
    sample = vectors[::40]
    picks, _, distance = selection.kcenter(sample, 300, 5)
    d2 = np.maximum(0.0, 2.0 - 2.0 * sample @ sample[5])
    greedy = [5]
    for _ in range(299):
        nxt = int(np.argmax(d2))
        greedy.append(nxt)
        d2 = np.minimum(d2, np.maximum(0.0, 2.0 - 2.0 * sample @ sample[nxt]))
    assert picks.tolist() == greedy
    assert np.allclose(distance, d2 / 2.0, atol=1e-5)


def test_semdedup_merges_mmlu_rephrases_with_their_originals(shared_data, tmp_path):
    originals, rephrased = [], []
    for subject in (
        "abstract_algebra",
        "sociology",
    ):  # self-contained questions (history ones lean on a passage)
        items = load_eval_sets([{"name": "m", "path": f"eval/mmlu_{subject}_test.csv.gz"}], shared_data)[
            0
        ].items
        path = (
            shared_data / f"contamination/llmdecon_{subject}_test_rephrase_english_filtered_question.jsonl.gz"
        )
        with gzip.open(path, "rt") as fh:
            for row, line in enumerate(fh):
                text = json.loads(line)["text"]
                if text.strip():
                    originals.append(items[row].question)
                    rephrased.append(text)
    n = len(originals)
    assert n == 293
    texts = originals + rephrased
    records = [
        make_record([message("user", t), message("assistant", "-")], {"name": "m", "path": "m", "row": i})
        for i, t in enumerate(texts)
    ]
    applied = stage(shared_data, method="semdedup", model="", threshold=0.8).apply(to_table(records))
    verdicts = applied.verdicts()
    row_of = {r["id"]: i for i, r in enumerate(records)}
    merged = sum(
        1
        for r in range(2 * n)
        if verdicts[r] is not None and row_of[verdicts[r].evidence["nearest_kept"]] == (r + n) % (2 * n)
    )
    both_kept = sum(1 for r in range(n) if verdicts[r] is None and verdicts[r + n] is None)
    # measured with MiniLM at 0.8: 231 of 293 pairs merged, 53 with both kept (docs/diversity.md)
    assert merged >= 0.7 * n, merged
    assert both_kept <= 0.25 * n, both_kept
    assert applied.kept.num_rows <= 2 * n - merged


def test_curate_batching_equals_sentence_transformers(raw_table, tmp_path):
    """The embedder tokenizes with the Rust tokenizer on all cores instead of letting
    sentence-transformers tokenize on one: the vectors must be the library's."""
    rows = np.random.default_rng(2).choice(raw_table.num_rows, 150, replace=False)
    texts = [m[0]["content"][:1024] for m in raw_table.take(rows)["messages"].to_pylist()]
    texts += ["", "x", "Übersetze: 这是一个测试。 " * 200]  # empty, one letter, long and non-Latin
    embedder = Embedder("", tmp_path, max_seq_length=128)
    ours = embedder.encode(texts)
    library = embedder._load().encode(texts, batch_size=16, normalize_embeddings=True)
    assert np.abs(ours - library).max() < 2e-3  # float16 in the cache
    assert (ours * library).sum(1).min() > 0.9999
    assert embedder.encoded == len(set(texts))
    again = Embedder("", tmp_path, max_seq_length=128)
    assert np.array_equal(again.encode(texts), ours) and again.encoded == 0 and again._model is None


def test_cluster_shares_and_score_order(raw_table, vectors, shared_data):
    assert selection.quotas(np.array([5, 100, 100, 0]), 90, "equal").tolist() == [5, 43, 42, 0]
    assert selection.quotas(np.array([10, 30, 60]), 10, "proportional").tolist() == [1, 3, 6]
    # cluster: each of the 20 k-means clusters gives its equal share, chosen inside it
    applied = stage(shared_data, method="cluster", k=500, clusters=20).apply(raw_table)
    labels, _ = selection.kmeans(vectors, 20, 0)  # the stage's own clustering (same vectors, seed)
    kept = np.setdiff1d(np.arange(raw_table.num_rows), applied.drop_rows)
    sizes = np.bincount(labels, minlength=20)
    assert np.bincount(labels[kept], minlength=20).tolist() == selection.quotas(sizes, 500, "equal").tolist()

    # score: the highest-scored record first, no two kept closer than min_distance, the budget met
    sample = raw_table.slice(0, 3000)
    scores = np.random.default_rng(3).random(sample.num_rows)
    meta = pa.array([json.dumps({"quality": float(s)}) for s in scores])
    scored = sample.set_column(sample.schema.get_field_index("meta"), "meta", meta)
    applied = stage(shared_data, method="score", k=300, score_column="quality", min_distance=0.2).apply(
        scored
    )
    kept = np.setdiff1d(np.arange(scored.num_rows), applied.drop_rows)
    assert kept.size == 300 and int(np.argmax(scores)) in kept
    X = vectors[:3000][kept]
    sims = X @ X.T
    np.fill_diagonal(sims, -1)
    assert sims.max() < 0.8 + 1e-6


def test_a_run_writes_the_map_and_the_report(tmp_path: Path, shared_data):
    raw = {
        "inputs": [{"path": str(shared_data / "raw" / "alpaca_seed_tasks.jsonl.gz")}],
        "stages": [{"normalize": {}}, {"diversity": {"method": "kcenter", "k": 40}}],
    }
    run = run_recipe(recipe_from_dict(raw, tmp_path), tmp_path / "out")
    manifest = run.manifest
    entry = next(s for s in manifest["stages"] if s["name"] == "diversity")
    assert entry["out"] == 40 and entry["dropped"] == {"not_selected": entry["in"] - 40}
    assert entry["report"]["model"] == "static:all-MiniLM-L6-v2"
    assert 0 < entry["report"]["coverage_radius_mean"] <= entry["report"]["coverage_radius_max"] <= 1
    png = (run.folder / "diversity-map.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    dropped = pl.read_parquet(run.folder / "dropped.parquet")
    assert dropped.height == entry["in"] - 40 and set(dropped["reason"]) == {"not_selected"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "kcenter"}, "needs a budget"),
        ({"method": "kcenter", "k": 5, "fraction": 0.5}, "needs a budget"),
        ({"method": "semdedup", "k": 5}, "give no k or fraction"),
        ({"method": "score", "k": 5}, "score_column"),
    ],
)
def test_config_errors_name_the_problem(tmp_path: Path, options, message):
    raw = {"inputs": [{"path": "a.jsonl"}], "stages": [{"diversity": options}]}
    (tmp_path / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(raw, tmp_path)
