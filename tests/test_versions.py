"""train.jsonl: the compiled writer gives exactly the bytes json.dumps gives, on fuzz and on raw/."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa

from curate.records import MESSAGES_TYPE, train_messages, train_tools
from curate.text.jsonl import chat_lines
from curate.versions import train_lines


def expected_line(messages: list[dict], tools: str | None = None) -> str:
    line = {"messages": train_messages(messages), "tools": train_tools(tools)}
    return json.dumps(line, ensure_ascii=False) + "\n"


def test_chat_lines_equal_json_dumps_on_fuzzed_text():
    rng = random.Random(3)
    alphabet = 'ab "\\/\n\r\t\b\f\x00\x01\x1f\x7f\u00e9\u2028\ud55c\U0001f600' + "plain text " * 4
    conversations = []
    for _ in range(3000):
        turns = []
        for _ in range(rng.randint(0, 4)):
            content = (
                None
                if rng.random() < 0.05
                else "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
            )
            turns.append(
                {
                    "role": rng.choice(["user", "assistant", 'we"ird\\']),
                    "content": content,
                    "tool_calls": None,
                    "name": None,
                }
            )
        conversations.append(turns)
    given = {7: '{"messages": [], "tools": [1]}', 2999: "{}"}
    got = bytes(chat_lines(pa.array(conversations, MESSAGES_TYPE), given)).decode("utf-8")
    want = "".join(given[i] + "\n" if i in given else expected_line(c) for i, c in enumerate(conversations))
    assert got == want


def test_train_jsonl_equals_json_dumps_on_raw(raw_table, tmp_path: Path):
    (tmp_path / "train.jsonl").write_bytes(train_lines(raw_table))
    rows = raw_table.select(["messages", "tools"]).to_pylist()
    assert sum(1 for r in rows if r["tools"]) > 100  # the tool-calling sets take the Python path
    want = "".join(expected_line(r["messages"], r["tools"]) for r in rows)
    assert (tmp_path / "train.jsonl").read_bytes() == want.encode("utf-8")
