"""Readers and detection on files written here: compression, CSV, Parquet, globs, folders, HF, errors."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from curate.errors import FormatError, RecipeError
from curate.formats import InputSpec, input_files, read_input, readers
from curate.records import meta_of

ALPACA = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "category": "math"},
]


def read(spec: InputSpec | str, base: Path, **kw) -> tuple[list[dict], list[dict]]:
    spec = InputSpec(path=spec) if isinstance(spec, str) else spec
    batches = list(read_input(spec, base, **kw))
    return [r for b in batches for r in b.records], [q for b in batches for q in b.quarantined]


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def turns(record: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in record["messages"]]


@pytest.mark.parametrize(
    "suffix, compress",
    [
        ("", lambda b: b),
        (".gz", gzip.compress),
        (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
        (".xz", lzma.compress),
        (".bz2", bz2.compress),
    ],
)
def test_compressed_jsonl_reads_the_same(tmp_path: Path, suffix: str, compress):
    (tmp_path / f"alpaca.jsonl{suffix}").write_bytes(compress(jsonl(ALPACA)))
    records, quarantined = read(f"alpaca.jsonl{suffix}", tmp_path)
    assert quarantined == []
    assert [turns(r) for r in records] == [
        [("user", "Name a primary colour."), ("assistant", "Red.")],
        [("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour.")],
        [("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")],
    ]
    assert [r["source"] for r in records][1] == {
        "name": "alpaca",
        "path": f"alpaca.jsonl{suffix}",
        "row": 2,
        "format": "alpaca",
    }
    assert meta_of(records[2]) == {"category": "math"}


@pytest.mark.parametrize("library", ["isal", "zlib"])
def test_gzip_members_padding_and_damage(tmp_path: Path, monkeypatch, library):
    """Every member of a multi-member gzip is read (as `gzip.decompress` does), across read steps;
    damaged or cut gzip data is a FormatError naming the file, never a silent short read. Both
    inflaters: ISA-L, and zlib where isal has no wheel."""
    if library == "zlib":
        monkeypatch.setattr(readers, "inflate_lib", zlib)
    else:
        assert readers.inflate_lib.__name__ == "isal.isal_zlib"  # a core dependency: never the fallback
    monkeypatch.setattr(readers, "_BLOCK", 64)  # members and outputs straddle many read steps
    rows = [{"prompt": f"question {i} " + "x" * (i % 50), "completion": f"answer {i}"} for i in range(300)]
    whole = jsonl(rows)
    members = gzip.compress(whole[:5000]) + b"\x00" * 10 + gzip.compress(whole[5000:])
    (tmp_path / "multi.jsonl.gz").write_bytes(members)
    assert b"".join(readers.read_blocks(tmp_path / "multi.jsonl.gz")) == gzip.decompress(members) == whole
    records, quarantined = read("multi.jsonl.gz", tmp_path)
    assert len(records) == 300 and quarantined == []
    (tmp_path / "cut.jsonl.gz").write_bytes(members[: len(members) - 40])
    with pytest.raises(FormatError, match=r"cut.jsonl.gz: the gzip data ends early"):
        read("cut.jsonl.gz", tmp_path)
    damaged = bytearray(gzip.compress(whole))
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "bad.jsonl.gz").write_bytes(bytes(damaged))
    with pytest.raises(FormatError, match=r"bad.jsonl.gz: damaged gzip data"):
        read("bad.jsonl.gz", tmp_path)


def test_blank_lines_count_as_lines_but_not_rows(tmp_path: Path):
    text = jsonl(ALPACA[:1]) + b"\n   \n" + jsonl(ALPACA[1:2]) + b"[1,  2]\n" + b'{"instruction": \n'
    (tmp_path / "a.jsonl").write_bytes(text)
    records, quarantined = read("a.jsonl", tmp_path)
    assert [r["source"]["row"] for r in records] == [1, 4]
    assert [(q["line"], q["error"][:20], q["raw"]) for q in quarantined] == [
        (5, "row is list, expecte", "[1,  2]"),
        (6, "invalid JSON: Expect", '{"instruction": '),
    ]


def test_json_array_streams_across_chunk_boundaries(tmp_path: Path, shared_data: Path, monkeypatch):
    """A tiny chunk size forces every element to straddle reads: the result must equal json.load."""
    name = "llamafactory_glaive_toolcall_en_demo.json.gz"
    expected, _ = read(f"raw/{name}", shared_data)
    monkeypatch.setattr(readers, "_CHUNK", 97)
    got, _ = read(f"raw/{name}", shared_data)
    assert got == expected and len(got) == 300
    (tmp_path / "n.json").write_text(
        ' [ {"prompt": "a", "completion": "1234"} ,{"prompt": "b", "completion": 56}]'
    )
    records, _ = read("n.json", tmp_path)
    assert [turns(r)[1][1] for r in records] == ["1234", "56"]
    (tmp_path / "empty.json").write_text("[]")
    batches = list(read_input(InputSpec(path="empty.json"), tmp_path))
    assert [(b.files, b.records, b.quarantined) for b in batches] == [
        ([{"path": "empty.json", "format": "empty", "records": 0, "quarantined": 0}], [], [])
    ]


def test_broken_json_array_is_a_file_error(tmp_path: Path):
    (tmp_path / "bad.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": ]')
    with pytest.raises(FormatError, match=r"bad.json: invalid JSON in array element 1"):
        read("bad.json", tmp_path)


def test_json_documents_other_than_arrays(tmp_path: Path):
    (tmp_path / "lines.json").write_bytes(jsonl(ALPACA))  # JSON Lines under a .json name
    assert [r["source"]["row"] for r in read("lines.json", tmp_path)[0]] == [1, 2, 3]
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": ALPACA}, indent=2))
    records, _ = read("wrapped.json", tmp_path)
    assert [r["source"]["row"] for r in records] == [0, 1, 2]


def test_csv_and_tsv(tmp_path: Path):
    (tmp_path / "qa.csv").write_text(
        'question,answer,topic\n"What is 2+2?\nShow work.",4,math\n"Capital of France?","Paris, France",geo\n'
    )
    records, _ = read("qa.csv", tmp_path)
    assert [turns(r) for r in records] == [
        [("user", "What is 2+2?\nShow work."), ("assistant", "4")],
        [("user", "Capital of France?"), ("assistant", "Paris, France")],
    ]
    # a CSV record's row is the file line it starts on, as an editor shows it (the header is line 1)
    assert [r["source"]["row"] for r in records] == [2, 4] and meta_of(records[1]) == {"topic": "geo"}
    (tmp_path / "bad.csv").write_text("question,answer\nq1,a1\nq2,a2,extra\nq3,a3\n")
    records, quarantined = read("bad.csv", tmp_path)
    assert [r["source"]["row"] for r in records] == [2, 4]
    assert [(q["line"], q["error"]) for q in quarantined] == [(3, "more cells than header columns")]
    (tmp_path / "a.tsv.gz").write_bytes(gzip.compress(b"instruction\tinput\toutput\nSay hi.\t\tHi!\n"))
    records, _ = read("a.tsv.gz", tmp_path)
    assert turns(records[0]) == [("user", "Say hi."), ("assistant", "Hi!")]


def test_parquet_with_nested_messages(tmp_path: Path):
    rows = [
        {
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "id": i,
        }
        for i in range(10)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet", row_group_size=3)
    records, _ = read("chat.parquet", tmp_path, batch_size=4)
    assert [r["source"]["row"] for r in records] == list(range(10))
    assert turns(records[7]) == [("user", "q7"), ("assistant", "a7")]
    assert meta_of(records[7]) == {"id": 7} and records[7]["source"]["format"] == "openai"
    assert [len(b.records) for b in read_input(InputSpec(path="chat.parquet"), tmp_path, batch_size=4)] == [
        4,
        4,
        2,
    ]


def test_globs_and_folders_are_sorted_and_skip_hidden_files(tmp_path: Path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "b.jsonl").write_bytes(jsonl(ALPACA[:1]))
    (data / "a.jsonl.gz").write_bytes(gzip.compress(jsonl(ALPACA[1:2])))
    (data / "sub" / "c.json").write_text(json.dumps(ALPACA[2:]))
    (data / ".hidden.jsonl").write_bytes(jsonl(ALPACA))
    (data / "notes.txt").write_text("not data")
    names = [p.relative_to(tmp_path).as_posix() for p in input_files(InputSpec(path="data"), tmp_path)]
    assert names == ["data/a.jsonl.gz", "data/b.jsonl", "data/sub/c.json"]
    records, _ = read("data/*.jsonl*", tmp_path)
    assert [(r["source"]["name"], r["source"]["path"]) for r in records] == [
        ("a", "data/a.jsonl.gz"),
        ("b", "data/b.jsonl"),
    ]
    records, _ = read(InputSpec(path="data/**/*.json", name="mix"), tmp_path)
    assert [(r["source"]["name"], r["source"]["path"]) for r in records] == [("mix", "data/sub/c.json")]
    with pytest.raises(FormatError, match="the pattern matched nothing") as exc:
        read("data/*.parquet", tmp_path)
    assert str(tmp_path / "data" / "*.parquet") in exc.value.hint  # where it looked
    (tmp_path / "data" / "notes.txt").write_text("not data")
    with pytest.raises(FormatError, match=r"matched 1 path\(s\) \(notes.txt\), none of them a data file"):
        read("data/*.txt", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="no data files found in the folder"):
        read("empty", tmp_path)
    with pytest.raises(FormatError, match="no such file or folder"):
        read("missing.jsonl", tmp_path)


def test_source_path_is_relative_even_outside_the_recipe_folder(tmp_path: Path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "a.jsonl").write_bytes(jsonl(ALPACA[:1]))
    recipe_dir = tmp_path / "project" / "recipes"
    recipe_dir.mkdir(parents=True)
    absolute = str(tmp_path / "shared" / "a.jsonl")
    for path in ("../../shared/a.jsonl", absolute):
        records, _ = read(path, recipe_dir)
        assert records[0]["source"]["path"] == "../../shared/a.jsonl"


def test_save_to_disk_folders(tmp_path: Path):
    import datasets

    rows = {"instruction": ["Say hi.", "Count to 3."], "input": ["", ""], "output": ["Hi!", "1 2 3"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    records, _ = read("saved", tmp_path)
    assert [turns(r) for r in records] == [
        [("user", "Say hi."), ("assistant", "Hi!")],
        [("user", "Count to 3."), ("assistant", "1 2 3")],
    ]
    assert records[1]["source"] == {"name": "saved", "path": "saved", "row": 1, "format": "alpaca"}
    both = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows),
            "test": datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}),
        }
    )
    both.save_to_disk(str(tmp_path / "dict"))
    records, _ = read(InputSpec(path="dict", split="test"), tmp_path)
    assert [turns(r) for r in records] == [[("user", "q"), ("assistant", "a")]]
    assert len(read("dict", tmp_path)[0]) == 2  # default split: train
    with pytest.raises(FormatError, match="no split 'dev'"):
        read(InputSpec(path="dict", split="dev"), tmp_path)
    (tmp_path / "more.jsonl").write_bytes(jsonl(ALPACA[:1]))
    # a folder holding saved datasets reads each as one input, never their own json files
    names = [p.relative_to(tmp_path).as_posix() for p in input_files(InputSpec(path="."), tmp_path)]
    assert names == ["dict", "more.jsonl", "saved"]
    with pytest.raises(
        FormatError, match="none of them a data file"
    ):  # every .json here is dataset internals
        input_files(InputSpec(path="**/*.json"), tmp_path)


def test_hf_name_missing_from_the_cache_fails_clearly(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    with pytest.raises(FormatError) as err:
        read("hf:curate-tests/no-such-dataset", tmp_path)
    assert "hf:curate-tests/no-such-dataset: not found in the local Hugging Face cache" in str(err.value)
    assert "save_to_disk" in err.value.hint


def test_hf_name_loads_through_datasets(tmp_path: Path, monkeypatch):
    """`hf:` goes through datasets.load_dataset; a local data folder stands in for a cached hub name."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_bytes(jsonl(ALPACA))
    (tmp_path / "hub" / "test.jsonl").write_bytes(jsonl(ALPACA[:1]))
    spec = InputSpec(path=f"hf:{tmp_path / 'hub'}", name="hub", split="test")
    records, _ = read(spec, tmp_path)
    assert [turns(r) for r in records] == [[("user", "Name a primary colour."), ("assistant", "Red.")]]
    assert records[0]["source"] == {
        "name": "hub",
        "path": f"hf:{tmp_path / 'hub'}:test",
        "row": 0,
        "format": "alpaca",
    }
    assert len(read(InputSpec(path=f"hf:{tmp_path / 'hub'}"), tmp_path)[0]) == 3


def test_per_record_detection_in_a_mixed_file(tmp_path: Path):
    rows = [
        *ALPACA[:1],
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
                {"role": "assistant", "content": "AB"},
            ]
        },
        {"prompt": "2+2=", "completion": "4<|endoftext|>"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
        {"instruction": "Write a haiku."},
        {"strange": "shape"},
    ]
    (tmp_path / "mixed.jsonl").write_bytes(jsonl(rows))
    records, quarantined = read("mixed.jsonl", tmp_path)
    assert [r["source"]["format"] for r in records] == [
        "alpaca",
        "sharegpt",
        "openai",
        "prompt_completion",
        "hh",
        "instructions",
    ]
    assert turns(records[2]) == [("user", "A\nB"), ("assistant", "AB")]
    assert turns(records[3])[1] == ("assistant", "4")
    assert turns({"messages": records[4]["rejected"]}) == [("assistant", "Go away")]
    assert meta_of(records[5]) == {"needs_response": True}
    assert [(q["line"], q["error"]) for q in quarantined] == [(7, "unknown record shape; keys: strange")]


def test_broken_content_in_a_known_shape_is_quarantined(tmp_path: Path):
    rows = [
        *ALPACA[:1],
        {"instruction": "List.", "input": "", "output": ["not", "text"]},
        {"instruction": "", "input": "", "output": ""},
        {"instruction": "Fine.", "output": "Yes."},
    ]
    (tmp_path / "a.jsonl").write_bytes(jsonl(rows))
    records, quarantined = read("a.jsonl", tmp_path)
    assert [r["source"]["row"] for r in records] == [1, 4]
    assert [(q["line"], q["error"]) for q in quarantined] == [
        (2, "alpaca: output is list, expected text"),
        (3, "alpaca: no text in any turn"),
    ]
    assert json.loads(quarantined[0]["raw"]) == rows[1]


def test_unknown_shape_names_the_file_keys_and_fix(tmp_path: Path):
    (tmp_path / "odd.jsonl").write_bytes(jsonl([{"q": "Why?", "a": "Because.", "score": 3}]))
    with pytest.raises(FormatError) as err:
        read("odd.jsonl", tmp_path)
    assert err.value.message == "odd.jsonl: unknown record shape; keys seen: q, a, score"
    assert "`format: NAME`" in err.value.hint and "fields: {user: q, assistant: a}" in err.value.hint
    long = "What is the capital of France and of the country next to it?"
    (tmp_path / "headless.csv").write_text(f"{long},Paris\nWhat is 2+2?,4\n")
    with pytest.raises(FormatError) as err:
        read("headless.csv", tmp_path)
    assert (
        err.value.message
        == "headless.csv: unknown record shape; keys seen: What is the capital of France and of ..., Paris"
    )
    assert err.value.hint.startswith("these keys look like data: does the file lack a header row?")


def test_field_mapping(tmp_path: Path):
    rows = [
        {"q": "Why?", "ctx": "Sky.", "a": "Because.", "sys": "Be brief.", "bad": "No.", "ok": True, "n": 1},
        {"q": "How?", "ctx": "", "a": "So.", "sys": None, "bad": "Never.", "ok": False, "n": 2},
    ]
    (tmp_path / "odd.jsonl").write_bytes(jsonl(rows))
    entry = {
        "path": "odd.jsonl",
        "fields": {"user": ["q", "ctx"], "assistant": "a", "system": "sys", "rejected": "bad", "label": "ok"},
    }
    records, quarantined = read(InputSpec.from_recipe(entry, "inputs[0]"), tmp_path)
    assert quarantined == []
    assert turns(records[0]) == [("system", "Be brief."), ("user", "Why?\n\nSky."), ("assistant", "Because.")]
    assert turns(records[1]) == [("user", "How?"), ("assistant", "So.")]
    assert turns({"messages": records[0]["rejected"]}) == [("assistant", "No.")]
    assert [r["label"] for r in records] == [True, False]
    assert meta_of(records[0]) == {"n": 1} and records[0]["source"]["format"] == "fields"
    prompt_only = InputSpec.from_recipe({"path": "odd.jsonl", "fields": {"user": "q"}}, "inputs[0]")
    assert meta_of(read(prompt_only, tmp_path)[0][0])["needs_response"] is True
    wrong = InputSpec.from_recipe({"path": "odd.jsonl", "fields": {"user": "question"}}, "inputs[0]")
    with pytest.raises(FormatError, match="names keys the rows do not have: question"):
        read(wrong, tmp_path)


def test_given_format_that_does_not_fit_is_an_error(tmp_path: Path):
    (tmp_path / "a.jsonl").write_bytes(jsonl(ALPACA))
    with pytest.raises(FormatError) as err:
        read(InputSpec(path="a.jsonl", format="sharegpt"), tmp_path)
    assert "`format: sharegpt` does not fit its rows" in err.value.message
    assert "look like 'alpaca'" in err.value.hint
    records, _ = read(InputSpec(path="a.jsonl", format="alpaca"), tmp_path)
    assert len(records) == 3


def test_preference_and_kto_variants(tmp_path: Path):
    rows = [
        {  # TRL / UltraFeedback: prompt text, full conversations as chosen and rejected
            "prompt": "Hi",
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "What."}],
            "score_chosen": 9.0,
        },
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Hi", "completion": "Hello!", "label": False},
        {
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
            "kto_tag": True,
        },
    ]
    (tmp_path / "p.jsonl").write_bytes(jsonl(rows))
    records, _ = read("p.jsonl", tmp_path)
    assert [r["source"]["format"] for r in records] == ["preference", "preference", "kto", "kto"]
    assert turns(records[0]) == [("user", "Hi"), ("assistant", "Hello!")]
    assert turns({"messages": records[0]["rejected"]}) == [("assistant", "What.")]
    assert meta_of(records[0]) == {"score_chosen": 9.0}
    assert turns(records[1]) == [("user", "2+2?"), ("assistant", "4")]
    assert [r["label"] for r in records] == [None, None, False, True]
    assert turns(records[3]) == [("user", "Hi"), ("assistant", "Yo")]


def test_recipe_entries_are_validated(tmp_path: Path):
    spec = InputSpec.from_recipe({"path": "x.jsonl", "options": {"oasst_paths": "all"}}, "inputs[0]")
    assert spec.format == "auto" and spec.options == {"oasst_paths": "all"}
    assert InputSpec.from_recipe("x.jsonl", "inputs[1]").path == "x.jsonl"
    bad = [
        ({"path": "x", "fromat": "alpaca"}, "inputs[0]: unknown key 'fromat'", "did you mean 'format'?"),
        (
            {"path": "x", "format": "alpacca"},
            "inputs[0].format: unknown format 'alpacca'",
            "did you mean 'alpaca'?",
        ),
        (
            {"path": "x", "format": "alpaca", "fields": {"user": "q"}},
            "cannot be combined",
            "leave `format:` out",
        ),
        ({"path": "x", "fields": {"assistant": "a"}}, "inputs[0].fields.user: required", ""),
        (
            {"path": "x", "fields": {"user": "q", "usr": "a"}},
            "inputs[0].fields: unknown part 'usr'",
            "did you mean",
        ),
        ({"path": "x", "fields": {"user": 3}}, "inputs[0].fields.user: expected string or array, got 3", ""),
        ({"path": "x", "options": {"oasst_paths": "some"}}, "'some' is not one of best, all", ""),
        ({"path": "x", "options": {"paths": "all"}}, "unknown option 'paths'", "oasst_paths"),
        ({"name": "x"}, "inputs[0].path: required", ""),
    ]
    for entry, message, hint in bad:
        with pytest.raises(RecipeError) as err:
            InputSpec.from_recipe(entry, "inputs[0]")
        assert message in err.value.message and hint in err.value.hint
    (tmp_path / "a.jsonl").write_bytes(jsonl(ALPACA))
    for spec in (InputSpec(path="a.jsonl", format="fields"), InputSpec(path="a.jsonl", format="alpacca")):
        with pytest.raises(RecipeError):  # specs built in code, not from a recipe, are checked too
            read(spec, tmp_path)


def test_batches_split_large_files(shared_data: Path):
    batches = list(read_input(InputSpec(path="raw/code_alpaca_2k.json.gz"), shared_data, batch_size=500))
    assert [len(b.records) for b in batches] == [500, 500, 500, 500, 17]
    assert [b.files for b in batches] == [
        [{"path": "raw/code_alpaca_2k.json.gz", "format": "alpaca", "records": n, "quarantined": 0}]
        for n in (500, 500, 500, 500, 17)
    ]


def test_oasst_best_path_prefers_rank_then_quality(tmp_path: Path):
    def msg(mid, role, text, replies=(), **kw):
        return {
            "message_id": mid,
            "parent_id": None,
            "text": text,
            "role": role,
            "replies": list(replies),
            **kw,
        }

    tree = msg(
        "r",
        "prompter",
        "Q",
        [
            msg("a1", "assistant", "second", rank=1),
            msg(
                "a0",
                "assistant",
                "first",
                rank=0,
                replies=[
                    msg(
                        "p1",
                        "prompter",
                        "plain follow-up",
                        labels={"quality": {"value": 0.2, "count": 3}},
                        replies=[msg("x", "assistant", "X")],
                    ),
                    msg(
                        "p2",
                        "prompter",
                        "good follow-up",
                        labels={"quality": {"value": 0.9, "count": 3}},
                        replies=[msg("y", "assistant", "Y", deleted=True), msg("z", "assistant", "Z")],
                    ),
                    msg("p3", "prompter", "unanswered", labels={"quality": {"value": 1.0, "count": 3}}),
                ],
            ),
        ],
    )
    (tmp_path / "t.jsonl").write_bytes(jsonl([tree]))
    (best,), _ = read("t.jsonl", tmp_path)
    assert turns(best) == [
        ("user", "Q"),
        ("assistant", "first"),
        ("user", "good follow-up"),
        ("assistant", "Z"),
    ]
    assert meta_of(best)["message_ids"] == ["r", "a0", "p2", "z"]
    spec = InputSpec(path="t.jsonl", options={"oasst_paths": "all"})
    every, _ = read(spec, tmp_path)
    assert [meta_of(r)["message_ids"][1:] for r in every] == [["a1"], ["a0", "p1", "x"], ["a0", "p2", "z"]]


def test_reading_streams_instead_of_loading_whole_files(tmp_path: Path, monkeypatch):
    """The first batch arrives after reading a small part of the file, for JSONL and JSON arrays."""
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(50_000)]
    (tmp_path / "big.jsonl").write_bytes(jsonl(rows))
    (tmp_path / "big.json").write_text(json.dumps(rows))
    read_sizes: list[int] = []

    class Counting(io.RawIOBase):
        def __init__(self, stream):
            self.stream = stream

        def readable(self):
            return True

        def readinto(self, buffer):
            data = self.stream.read(len(buffer))
            buffer[: len(data)] = data
            read_sizes.append(len(data))
            return len(data)

    original = readers.open_binary
    monkeypatch.setattr(readers, "open_binary", lambda path: io.BufferedReader(Counting(original(path))))
    monkeypatch.setattr(readers, "_CHUNK", 1 << 14)
    monkeypatch.setattr(readers, "WHOLE_ARRAY_BYTES", 1 << 14)  # arrays above it stream
    for name in ("big.jsonl", "big.json"):
        read_sizes.clear()
        batches = read_input(InputSpec(path=name), tmp_path, batch_size=100)
        assert len(next(batches).records) == 100
        size = (tmp_path / name).stat().st_size
        assert sum(read_sizes) < size / 2, (name, sum(read_sizes), size)
        assert sum(len(b.records) for b in batches) == 49_900
