"""`curate run` killed with SIGKILL at 20 seeded random moments of real runs over ../shared/data/raw:
the earlier version stays byte for byte, no partial version ever appears, `latest` always names a
complete version, and a re-run finishes with the same version id and bytes as an uninterrupted run,
reusing what the killed runs finished. Two runs into one output folder: the second refuses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FILES = [
    "gpteacher_toolformer.json.gz",
    "code_alpaca_2k.json.gz",
    "foundry_dolly_hhrlhf_train_small.jsonl.gz",
    "llamafactory_alpaca_en_demo.json.gz",
]


def recipe(folder: Path, shared: Path, threshold: float) -> Path:
    raw = {
        "name": "crash",
        "inputs": [{"path": str(shared / "raw" / f)} for f in FILES],
        "eval_sets": [{"name": "gsm8k", "path": str(shared / "eval" / "gsm8k_test.jsonl.gz")}],
        "stages": [
            {"normalize": {}},
            {"filter": {}},
            {"dedup": {"exact": True, "minhash": {"threshold": threshold}}},
            {"decontaminate": {"methods": ["exact", "ngram"]}},
        ],
    }
    path = folder / f"recipe-{threshold}.yaml"
    path.write_text(json.dumps(raw))
    return path


def start(recipe_path: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "curate", "run", str(recipe_path), "--out", str(out), "--json"]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(recipe_path: Path, out: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    process = start(recipe_path, out)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    return json.loads(stdout), time.perf_counter() - started


def hashes(folder: Path) -> dict[str, str]:
    """Every data file's sha256; the manifest by its version, counts and stages (it also names its
    run, time and parent, and the card names the parent)."""
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    assert out.pop("README.md")
    manifest = json.loads((folder / "manifest.json").read_text())
    out["manifest.json"] = json.dumps(
        [manifest["version"], manifest["counts"], manifest["stages"][-1]["out"]]
    )
    return out


def check_folder(out: Path, earlier: tuple[str, dict], target: tuple[str, dict]) -> None:
    """Only complete versions are visible, the earlier one unchanged, latest names a complete one;
    hidden work folders of killed runs are at most those of the last one (the next run clears them)."""
    assert len([p for p in out.glob(".tmp-*")]) <= 1
    for entry in out.iterdir():
        if entry.name.startswith(".") or entry.name == "latest":
            continue
        assert (entry / "manifest.json").is_file(), f"partial version visible: {entry.name}"
        assert entry.name in (earlier[0], target[0]), entry.name
        expected = earlier[1] if entry.name == earlier[0] else target[1]
        assert hashes(entry) == expected, f"{entry.name} differs from an uninterrupted run"
    assert (out / "latest" / "manifest.json").is_file()


def committed_entries(out: Path) -> list[Path]:
    """The stage cache's sealed entries: an entry's done.json is written in its hidden work folder
    just before the rename that seals it, so those folders are not counted."""
    return [p for p in (out / ".cache").glob("stages/*/done.json") if not p.parent.name.startswith(".")]


def test_sigkill_at_random_points_loses_nothing(tmp_path: Path, shared_data: Path):
    earlier_recipe = recipe(tmp_path, shared_data, 0.9)
    target_recipe = recipe(tmp_path, shared_data, 0.8)
    # references: the target version from an uninterrupted run, fresh and cached
    reference, full_seconds = finish(target_recipe, tmp_path / "reference")
    _, cached_seconds = finish(target_recipe, tmp_path / "reference")
    target = (reference["version"], hashes(Path(reference["path"])))

    out = tmp_path / "out"
    first, _ = finish(earlier_recipe, out)
    earlier = (first["version"], hashes(Path(first["path"])))
    rng = random.Random(20261201)
    killed_mid_run = 0
    for attempt in range(20):
        fresh = attempt % 2 == 0  # even: no stage cache, the whole run; odd: cached stages, assembly
        if fresh:
            shutil.rmtree(out / ".cache", ignore_errors=True)
        if (out / target[0]).exists():  # a killed run that had finished: undo, as a user deleting it
            shutil.rmtree(out / target[0])
            os.symlink(earlier[0], out / "undo")
            os.replace(out / "undo", out / "latest")
        process = start(target_recipe, out)
        time.sleep(rng.uniform(0.3, full_seconds if fresh else cached_seconds))
        killed_mid_run += process.poll() is None
        with contextlib.suppress(ProcessLookupError):  # it may have finished (and its group with it)
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        check_folder(out, earlier, target)
    assert killed_mid_run >= 15  # most kills land inside a run, not after it

    # one more, killed as soon as two steps (ingest and a stage) are in the cache: their work stays
    shutil.rmtree(out / ".cache", ignore_errors=True)  # under load the last kills may precede any cache
    process = start(target_recipe, out)
    while len(committed_entries(out)) < 2 and process.poll() is None:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    check_folder(out, earlier, target)

    final, _ = finish(target_recipe, out)
    assert final["version"] == target[0]
    assert hashes(Path(final["path"])) == target[1]
    assert hashes(out / earlier[0]) == earlier[1]
    assert final["this_run"]["stages"][0]["cached"]  # the killed run's finished stage is reused


def test_a_second_run_into_the_same_folder_refuses(tmp_path: Path, shared_data: Path):
    target_recipe = recipe(tmp_path, shared_data, 0.8)
    out = tmp_path / "out"
    first = start(target_recipe, out)
    deadline = time.time() + 120
    while f"pid {first.pid}" not in ((out / ".lock").read_text() if (out / ".lock").exists() else ""):
        assert time.time() < deadline and first.poll() is None, "the first run never took the folder"
        time.sleep(0.05)
    second = start(target_recipe, out)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 1
    assert f"in use by another curate run (pid {first.pid})" in stderr and "Traceback" not in stderr
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert (Path(json.loads(stdout)["path"]) / "manifest.json").is_file()
