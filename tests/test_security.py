"""Security: recipes are data (no YAML tags run code), an API key reaches no file or message a run
writes, and a version's files are checked against the checksums written with it."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.versions import verify_version
from tests.test_decontaminate import _FakeOpenAI

KEY = "sk-curate-test-9f3a7c1e-do-not-leak"


def test_yaml_tags_do_not_run_code(tmp_path: Path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.yaml").write_text(
        f"inputs: !!python/object/apply:os.system ['touch {marker}']\nstages: []\n"
    )
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "evil.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert not marker.exists()


def test_an_api_key_is_written_nowhere(tmp_path: Path, shared_data: Path, monkeypatch):
    """A run whose LLM judge is called with a key: every file under the output folder and the
    shared cache, and everything printed, is free of it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shared = tmp_path / "shared"
    monkeypatch.setenv("CURATE_CACHE_DIR", str(shared))
    monkeypatch.setenv("CURATE_TEST_KEY", KEY)
    _FakeOpenAI.requests = []
    rows = [
        {"instruction": "How did the United States acquire the Oregon Territory?", "output": "By treaty."}
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = {
        "methods": ["embedding"],
        "judge": True,
        "judge_model": "judge-1",
        "judge_base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
        "judge_api_key_env": "CURATE_TEST_KEY",
    }
    recipe = {
        "inputs": [{"path": "rows.jsonl"}],
        "eval_sets": [
            {"name": "history", "path": str(shared_data / "eval" / "mmlu_high_school_us_history_test.csv.gz")}
        ],
        "stages": [{"normalize": {}}, {"decontaminate": judge}],
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    try:
        runs = [
            CliRunner().invoke(
                main, ["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), *flag]
            )
            for flag in ([], ["--json"])
        ]
        report = CliRunner().invoke(main, ["report", str(tmp_path / "out")])
    finally:
        server.shutdown()
    assert _FakeOpenAI.requests and _FakeOpenAI.requests[0]["auth"] == f"Bearer {KEY}"  # the key was used
    assert all(r.exit_code == 0 for r in [*runs, report]), [r.output for r in runs]
    written = [
        p for p in [*tmp_path.rglob("*"), *shared.rglob("*")] if p.is_file() and p.name != "recipe.yaml"
    ]
    assert len(written) > 10
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path
    for result in [*runs, report]:
        assert KEY not in result.output


def test_verify_names_a_changed_file_and_training_refuses_it(tmp_path: Path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    (tmp_path / "recipe.yaml").write_text(json.dumps({"inputs": [{"path": "rows.jsonl"}], "stages": []}))
    result = CliRunner().invoke(
        main, ["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--json"]
    )
    folder = Path(json.loads(result.output)["path"])
    ok = CliRunner().invoke(main, ["verify", str(folder)])
    assert ok.exit_code == 0 and "every file is as written" in ok.output
    assert set(json.loads((folder / "manifest.json").read_text())["files"]) >= {
        "data.parquet",
        "train.jsonl",
        "dropped.parquet",
        "README.md",
    }
    data = bytearray((folder / "data.parquet").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "data.parquet").write_bytes(bytes(data))
    bad = CliRunner().invoke(main, ["verify", str(folder)])
    assert bad.exit_code == 1 and "data.parquet: changed since the version was written" in bad.output
    assert verify_version(folder, ["train.jsonl"]) == []

    from curate.errors import CurateError
    from curate.train.data import load_version

    with pytest.raises(CurateError, match="data.parquet: changed"):
        load_version(folder)


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "x\\y"])
def test_a_recipe_name_cannot_lead_the_output_elsewhere(tmp_path: Path, name: str):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "rows.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(json.dumps({"name": name, "inputs": [{"path": "rows.jsonl"}], "stages": []}))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1 and "is not a plain name" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]  # nothing written anywhere


def test_no_code_runs_from_data():
    """The package never evaluates or unpickles: no eval/exec/compile, no pickle, marshal or
    unsafe YAML loading, and torch.load only with weights_only=True (an AST scan of curate/)."""
    import ast

    forbidden_calls = {"eval", "exec", "compile", "__import__"}
    forbidden_attrs = {("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"), ("yaml", "load")}
    forbidden_attrs |= {("yaml", "unsafe_load"), ("yaml", "full_load"), ("dill", "load"), ("dill", "loads")}
    found = []
    for path in sorted((Path(__file__).resolve().parents[1] / "curate").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            where = f"{path.name}:{node.lineno}"
            if isinstance(fn, ast.Name) and fn.id in forbidden_calls:
                found.append(f"{where} {fn.id}()")
            if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
                if (fn.value.id, fn.attr) in forbidden_attrs:
                    found.append(f"{where} {fn.value.id}.{fn.attr}()")
                if (fn.value.id, fn.attr) == ("torch", "load"):
                    safe = any(
                        k.arg == "weights_only" and getattr(k.value, "value", None) is True
                        for k in node.keywords
                    )
                    if not safe:
                        found.append(f"{where} torch.load() without weights_only=True")
    assert found == []
