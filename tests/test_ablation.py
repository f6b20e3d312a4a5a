"""`curate ablate`: the paired interval and verdicts, and a tiny CPU ablation end to end (2 arms x 2
seeds, stories260K): an equal token budget, a contaminated arm flagged with its items named, a
report written, and a second call that trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from curate.train.ablation import memorisation_interval, paired_interval, verdict
from tests.conftest import EXAMPLES, REPO


def test_the_paired_interval_is_the_bootstrap_of_item_differences():
    rng = np.random.default_rng(1)
    base = rng.normal(2.0, 0.5, 300)
    arm = base - 0.1 + rng.normal(0, 0.05, 300)  # better by 0.1 on every item, a little noise
    got = paired_interval(arm, base, 2000, seed=7)
    draws = np.random.default_rng(7).integers(0, 300, size=(2000, 300))
    means = [float(np.mean((arm - base)[d])) for d in draws]  # one resample at a time
    assert got["low"] == pytest.approx(np.percentile(means, 2.5)) and got["high"] == pytest.approx(
        np.percentile(means, 97.5)
    )
    assert got["mean"] == pytest.approx(-0.1, abs=0.01) and got["items"] == 300
    assert verdict(got) == "better"
    assert verdict(paired_interval(base + 0.1, base, 500)) == "worse"
    same = paired_interval(base, base, 500)
    assert (same["low"], same["high"]) == (0.0, 0.0) and verdict(same) == "no detectable difference"
    noisy = paired_interval(base + rng.normal(0, 1.0, 300), base, 2000)
    assert noisy["low"] < 0 < noisy["high"] and verdict(noisy) == "no detectable difference"


def test_the_interval_holds_the_noise_between_seeds():
    """Three seeds per arm: items drawn once for both sides, seeds drawn for each side apart. An arm
    whose seeds scatter widely is no detectable difference even when its seed average sits below the
    baseline on every item (the item-only interval of the averages would call it better)."""
    rng = np.random.default_rng(3)
    items = 200
    base = rng.normal(2.0, 0.5, items) + rng.normal(0, 0.01, (3, items))
    arm = base.mean(axis=0) - 0.05 + np.array([[-0.3], [0.0], [0.15]])  # seed offsets of +-0.3
    got = paired_interval(arm, base, 2000, seed=5)
    reference = np.random.default_rng(5)
    draws = reference.integers(0, items, size=(2000, items))
    arm_seeds = reference.integers(0, 3, size=(2000, 3))
    base_seeds = reference.integers(0, 3, size=(2000, 3))
    means = [  # one resample at a time
        float(np.mean(arm[arm_seeds[r]].mean(axis=0)[draws[r]] - base[base_seeds[r]].mean(axis=0)[draws[r]]))
        for r in range(2000)
    ]
    assert (got["low"], got["high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert got["mean"] == pytest.approx(float(arm.mean() - base.mean())) and got["seeds"] == 3
    assert verdict(got) == "no detectable difference"
    assert verdict(paired_interval(arm.mean(axis=0), base.mean(axis=0), 2000)) == "better"
    steady = base.mean(axis=0) - 0.05 + rng.normal(0, 0.005, (3, items))  # the same gain in every seed
    assert verdict(paired_interval(steady, base, 2000)) == "better"


def test_memorisation_is_the_trained_items_extra_gain_not_their_own_loss():
    """Memorisation is what the trained items gained over the baseline beyond the clean items' gain.
    Trained items that were simply easier (lower loss in both arms) show no memorisation; items that
    gained more than the rest do."""
    rng = np.random.default_rng(3)
    hardness = rng.uniform(1.0, 2.0, 200)
    hardness[:50] -= 0.5  # the planted items happen to be easier
    trained = np.arange(200) < 50
    base = hardness + rng.normal(0, 0.02, (3, 200))
    learned_the_kind = base - 0.3 + rng.normal(0, 0.02, (3, 200))  # every item gains the same
    gap = memorisation_interval(learned_the_kind, base, trained, 2000)
    assert learned_the_kind[:, trained].mean() < learned_the_kind[:, ~trained].mean() - 0.4  # a raw "gap"
    assert gap["low"] < 0 < gap["high"] and abs(gap["mean"]) < 0.01
    memorised = learned_the_kind - 0.1 * trained  # the trained items gain 0.1 more
    gap = memorisation_interval(memorised, base, trained, 2000)
    assert gap["high"] < 0 and gap["mean"] == pytest.approx(-0.1, abs=0.01)
    assert (gap["trained"], gap["clean"]) == (50, 150)


def _version(tmp_path: Path, name: str, extra: list[dict]) -> Path:
    from curate.pipeline import run_recipe
    from curate.recipe import recipe_from_dict

    inputs = [{"path": str(EXAMPLES / "raw" / "alpaca.json"), "name": "alpaca"}]  # 95 records: quick
    if extra:
        rows = tmp_path / f"{name}-extra.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in extra))
        inputs.append({"path": str(rows), "name": "extra"})
    recipe = {
        "name": name,
        "inputs": inputs,
        "stages": [{"normalize": {"system_prompt": "You are a helpful assistant."}}, {"filter": {}}],
    }
    return run_recipe(recipe_from_dict(recipe, tmp_path), tmp_path / name).folder


def test_a_tiny_ablation_runs_flags_contamination_and_resumes(tmp_path):
    items = [json.loads(line) for line in (EXAMPLES / "eval" / "demo_eval.jsonl").read_text().splitlines()]
    planted = items[:10]  # the contaminated arm trains on ten eval items, answers included
    clean = _version(tmp_path, "clean", [])
    dirty = _version(
        tmp_path, "dirty", [{"instruction": i["question"], "output": i["answer"]} for i in planted]
    )
    spec = {
        "name": "tiny",
        "train": str(REPO / "train" / "tiny-cpu.yaml"),
        "arms": [{"name": "clean", "version": str(clean)}, {"name": "dirty", "version": str(dirty)}],
        "seeds": 2,
        "eval_sets": [
            {
                "name": "demo_eval",
                "path": str(EXAMPLES / "eval" / "demo_eval.jsonl"),
                "fields": {"question": "question", "answer": "answer", "id": "id"},
            }
        ],
        "set": {"eval_steps": 100, "gates.max_new_tokens": 2, "gates.max_items": 8, "micro_batch_size": 4},
        "bootstrap": 500,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "ablation"
    args = ["ablate", str(tmp_path / "spec.yaml"), "--out", str(out), "--json"]
    ran = CliRunner().invoke(__import__("curate.cli").cli.main, args, catch_exceptions=False)
    report = json.loads(ran.stdout)

    budget = report["tokens_per_run"]
    seen = [t for runs in report["tokens_seen"].values() for t in runs]
    assert len(seen) == 4 and all(
        budget <= t < budget + 4 * 512 for t in seen
    )  # one micro batch over at most
    assert report["baseline"] == "clean" and report["seeds"] == [0, 1]
    flagged = report["contamination"]["dirty"]
    assert sorted(c["eval_id"] for c in flagged) == sorted(i["id"] for i in planted)
    assert "clean" not in report["contamination"]
    comparison = report["comparisons"]["demo_eval"]
    assert comparison["items"] == len(items)
    entry = comparison["arms"]["dirty"]
    assert entry["verdict"] in ("better", "worse", "no detectable difference")
    assert sorted(entry["contaminated"]["items"]) == sorted(i["id"] for i in planted)
    (line,) = report["verdicts"]
    assert line.startswith(f"dirty vs clean on demo_eval: {entry['verdict']}") and "CONTAMINATED" in line
    memorised = entry["contaminated"]["memorisation"]
    assert (memorised["trained"], memorised["clean"]) == (len(planted), len(items) - len(planted))
    assert ("; memorisation: the items it trained on gained more" in line) == (memorised["high"] < 0)
    assert f"trained items minus clean ones: {memorised['mean']:+.4f}" in line
    taught = entry["contaminated"]["clean_verdict"] == "better"
    assert ("also taught it the set's kind of item" in line) == taught
    assert line.endswith(". A result on a set it trained on is not evidence")
    assert all(i["id"] in line for i in planted)
    clean_part = entry["contaminated"]["clean_difference"]
    assert clean_part["items"] == len(items) - len(planted)  # judged again on the items it never saw
    assert (
        f"on the {clean_part['items']} items it did not train on: {entry['contaminated']['clean_verdict']}"
        in line
    )
    for name in ("report.md", "report.json", "ablation.png", "report.html"):
        assert (out / name).is_file()
    assert "## Verdicts" in (out / "report.md").read_text() and "## Runs" in (out / "report.md").read_text()
    timings = [r for runs in report["runs"].values() for r in runs]
    assert len(timings) == 4 and all(r["train_seconds"] < r["wall_seconds"] for r in timings)
    page = (out / "report.html").read_text()
    assert line.replace('"', "&quot;").replace("'", "&#x27;") in page and "data:image/png;base64," in page
    stamps = {p: p.stat().st_mtime for p in out.glob("*/seed-*/metrics.json")}
    assert len(stamps) == 4

    again = CliRunner().invoke(__import__("curate.cli").cli.main, args, catch_exceptions=False)
    assert json.loads(again.stdout)["verdicts"] == report["verdicts"]
    assert {p: p.stat().st_mtime for p in out.glob("*/seed-*/metrics.json")} == stamps  # nothing retrained


def test_an_eval_item_copied_into_several_records_counts_once():
    from curate.train.ablation import _contamination_lines

    copies = [
        {"eval_set": "gsm8k", "eval_id": str(i), "record": f"r{i}{k}"} for i in range(3) for k in range(4)
    ]
    once = [{"eval_set": "gsm8k", "eval_id": "7", "record": "r7"}]
    assert _contamination_lines({"contamination": {"copied": copies, "once": once}}) == [
        "copied: 3 eval items in its training data in 12 records (gsm8k:0, gsm8k:1, gsm8k:2)",
        "once: 1 eval item in its training data (gsm8k:7)",
    ]


def _gate_means(report: dict) -> dict:
    """Every gate's mean per arm, less latency (a clock, not a result)."""
    return {
        arm: {name: v["mean"] for name, v in gates.items() if not name.startswith("latency")}
        for arm, gates in report["gates"].items()
    }


def test_runs_spread_over_two_devices_give_the_same_report(tmp_path):
    """Two devices (CPU stand-ins: a worker process per device that sees one CUDA_VISIBLE_DEVICES id
    and trains run after run on one loaded base): two runs at a time, each device used, the same
    figures as one device in one process, and a lost run is the only one trained again."""
    clean = _version(tmp_path, "clean", [])
    other = _version(tmp_path, "other", [{"instruction": "Name a prime number.", "output": "Seven."}] * 3)
    spec = {
        "name": "devices",
        "train": str(REPO / "train" / "tiny-cpu.yaml"),
        "arms": [{"name": "clean", "version": str(clean)}, {"name": "other", "version": str(other)}],
        "seeds": 2,
        "tokens": 8192,
        "set": {"eval_steps": 100, "gates.max_new_tokens": 2, "gates.max_items": 4, "micro_batch_size": 4},
        "bootstrap": 300,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    main = __import__("curate.cli").cli.main

    def ablate(out: str, *more: str) -> dict:
        args = ["ablate", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / out), "--json", *more]
        return json.loads(CliRunner().invoke(main, args, catch_exceptions=False).stdout)

    one = ablate("one")
    two = ablate("two", "--devices", "0,1")
    assert all(p is None for runs in one["devices"].values() for p in runs)
    placed = [p for runs in two["devices"].values() for p in runs]
    assert len(placed) == 4 and {p["device"] for p in placed} == {"0", "1"}
    for device in ("0", "1"):  # one process (one loaded base) per device, whatever it trained
        assert len({p["process"] for p in placed if p["device"] == device}) == 1
    assert not any(p["failed"] for p in placed)
    spans = sorted((p["started"], p["ended"]) for p in placed)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # two ran at once
    # a worker trains its runs on one loaded base, a fresh adapter each: the same figures as the
    # ablation's own process on one device
    assert two["comparisons"] == one["comparisons"]
    assert _gate_means(two) == _gate_means(one) and len(_gate_means(one)["clean"]) >= 5
    assert two["tokens_seen"] == one["tokens_seen"]

    lost = tmp_path / "two" / "other" / "seed-1" / "metrics.json"
    lost.unlink()
    kept = {p: p.stat().st_mtime for p in (tmp_path / "two").glob("*/seed-*/metrics.json")}
    again = ablate("two", "--devices", "0,1")
    assert {p: p.stat().st_mtime for p in kept} == kept and lost.is_file()
    assert again["comparisons"] == two["comparisons"]

    # a run that fails stops the ablation with its name and the end of its log; finished runs stay
    (other / "data.parquet").write_bytes(b"not parquet")
    for seed in (0, 1):
        (tmp_path / "two" / "other" / f"seed-{seed}" / "metrics.json").unlink()
    args = ["ablate", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "two"), "--devices", "0,1"]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code != 0
    assert "ablation run other seed" in failed.output and "only as written" in failed.output
    assert all((tmp_path / "two" / "clean" / f"seed-{seed}" / "metrics.json").is_file() for seed in (0, 1))
