"""Custom stages come only from installed packages' `curate.stages` entry points: one that declares
a stage makes it usable in a recipe (listed, validated, run, cached); a broken one is named in a
clear error and breaks nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PLUGIN = '''
from dataclasses import dataclass

from curate.stages.base import Decisions, Stage, option


@dataclass
class ShoutConfig:
    word: str = option("ERROR", help="Drop records whose text holds this word.")


class ShoutStage(Stage):
    """Drop records that mention a word (a plugin's stage)."""

    name = "shout"
    Config = ShoutConfig
    compiles = False

    def process(self, table):
        decisions = Decisions(table.num_rows)
        for row, messages in enumerate(table["messages"].to_pylist()):
            if any(self.config.word in (m["content"] or "") for m in messages):
                decisions.drop(row, "shouted", {"word": self.config.word})
        return decisions
'''


def install(site: Path, name: str, entry: str, code: str) -> None:
    """A package on `site` with a dist-info declaring `entry` in the curate.stages group."""
    (site / f"{name}.py").write_text(code)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[curate.stages]\n{entry}\n")


def curate(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-m", "curate", *args], env=env, capture_output=True, text=True)


def test_an_entry_point_stage_runs_and_a_broken_one_is_named(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install(site, "curate_shout", "shout = curate_shout:ShoutStage", PLUGIN)
    install(site, "curate_broken", "broken = curate_broken:Missing", "raise ImportError('no such thing')\n")
    rows = [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Log it.", "output": "ERROR: disk"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"inputs": [{"path": "rows.jsonl"}], "stages": [{"normalize": {}}, {"shout": {"word": "ERROR"}}]}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))

    listed = curate(site, "stages", "shout")
    assert listed.returncode == 0 and "Drop records whose text holds this word" in listed.stdout
    ran = curate(site, "run", str(tmp_path / "recipe.yaml"), "--json")
    assert ran.returncode == 0, ran.stderr
    manifest = json.loads(ran.stdout)
    assert manifest["stages"][1] == {**manifest["stages"][1], "name": "shout", "dropped": {"shouted": 1}}
    assert manifest["counts"]["kept"] == 1

    recipe["stages"].append({"broken": {}})
    (tmp_path / "broken.yaml").write_text(json.dumps(recipe))
    refused = curate(site, "validate", str(tmp_path / "broken.yaml"))
    assert refused.returncode == 1 and "Traceback" not in refused.stdout + refused.stderr
    assert "'broken' is installed but could not be loaded" in refused.stdout + refused.stderr
    assert "ImportError: no such thing" in refused.stdout + refused.stderr

    without = subprocess.run(  # the plugin is not installed: the stage is unknown, nothing else changes
        [sys.executable, "-m", "curate", "validate", str(tmp_path / "recipe.yaml")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert without.returncode == 1 and "shout" in without.stdout + without.stderr
