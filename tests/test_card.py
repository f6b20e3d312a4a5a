"""The dataset card written beside every version: Hugging Face front matter that `datasets` itself
follows to load the version, and the counts and sources of the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
from curate.report.card import size_category


def test_card_front_matter_loads_the_version_with_datasets(tmp_path: Path, shared_data):
    raw = {
        "name": "card",
        "inputs": [{"path": str(shared_data / "raw" / "alpaca_seed_tasks.jsonl.gz"), "name": "seed | tasks"}],
        "stages": [{"normalize": {}}, {"dedup": {"exact": True}}],
    }
    folder = run_recipe(recipe_from_dict(raw, tmp_path), tmp_path / "out").folder
    manifest = json.loads((folder / "manifest.json").read_text())
    card = (folder / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    kept = manifest["counts"]["kept"]
    assert meta["size_categories"] == [size_category(kept)] == ["n<1K"]
    assert meta["language"] == ["en"] and "Languages (CLD2 on a sample of" in body
    assert f"{kept:,} conversations" in body and "seed \\| tasks" in body  # a | cannot break the table
    assert yaml.safe_load(body.split("```yaml\n")[1].split("```")[0]) == manifest["recipe"]

    import datasets

    loaded = datasets.load_dataset(str(folder))  # follows the card's configs to train.jsonl only
    assert list(loaded) == ["train"] and loaded["train"].num_rows == kept


def test_size_categories_follow_hugging_face_bounds():
    assert [size_category(n) for n in (0, 999, 1000, 99_999, 100_000, 10**6, 10**9)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "n>100M",
    ]  # fmt: skip
