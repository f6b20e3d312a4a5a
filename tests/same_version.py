"""What every engine test asks of two runs of one recipe: the same version, byte for byte."""

from __future__ import annotations

from pathlib import Path

from curate.recipe import recipe_from_dict

RAW = [{"path": "raw/*.gz"}, {"path": "raw/t0_train_50k/*.jsonl.gz", "name": "t0"}]
VOLATILE = ("created", "run", "seconds", "recipe_path")  # when and by which run: not the content


def raw_recipe(shared_data: Path, stages: list[dict], inputs: list[dict] | None = None):
    """A recipe over ../shared/data (all of raw/ unless `inputs`), judged against two eval sets."""
    return recipe_from_dict(
        {
            "name": "engines",
            "inputs": RAW if inputs is None else inputs,
            "eval_sets": [
                {"name": "alpaca_eval", "path": "eval/alpaca_eval_text_davinci_003_outputs.json.gz"},
                {"name": "gsm8k", "path": "eval/gsm8k_test.jsonl.gz"},
            ],
            "stages": stages,
        },
        base_dir=shared_data,
    )


def assert_same_version(a, b) -> None:
    """Same id, the same files with the same bytes, the same manifest but for when and which run."""
    assert a.manifest["version"] == b.manifest["version"]
    names = sorted(p.name for p in a.folder.iterdir())
    assert names == sorted(p.name for p in b.folder.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (a.folder / name).read_bytes() == (b.folder / name).read_bytes(), name

    def content(manifest: dict) -> dict:
        stages = [
            {k: v for k, v in s.items() if k not in ("seconds", "run", "cached")} for s in manifest["stages"]
        ]
        files = {k: v for k, v in manifest["files"].items() if k != "manifest.json"}
        return {**{k: v for k, v in manifest.items() if k not in VOLATILE}, "stages": stages, "files": files}

    assert content(a.manifest) == content(b.manifest)
