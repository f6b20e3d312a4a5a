"""The fuzz target (fuzz/fuzz_inputs.py: any bytes as an input file of each kind, or as a recipe)
runs for a bounded time from the demo's files as seeds; a crash fails the test and leaves the input
that caused it in the test's folder."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed here")
def test_readers_and_recipe_loader_survive_30_seconds_of_fuzzing(tmp_path: Path):
    corpus = tmp_path / "corpus"  # libFuzzer adds the inputs it finds to the first folder it is given
    shutil.copytree(ROOT / "examples" / "raw", corpus)
    command = [
        sys.executable,
        str(ROOT / "fuzz" / "fuzz_inputs.py"),
        "-max_total_time=30",
        "-rss_limit_mb=4096",
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("leak-*")) + list(tmp_path.glob("oom-*"))
    assert done.returncode == 0 and not crashes, done.stderr[-3000:]
    assert "DONE" in done.stderr
