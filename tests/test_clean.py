"""clean_text: equal to the plain regex pipeline it shortcuts, idempotent, and a no-op on clean text."""

from __future__ import annotations

import random
import re
import unicodedata

import pyarrow as pa
import pytest

from curate.formats import InputSpec, read_input
from curate.text.clean import PYTHON_WHITESPACE, clean_column, clean_text

ALPHABET = "ab \t\n\r\x00\x07\x1f\x7f\x85\x9f\u00a0e\u0301\u00e9\u2028\u3000\ufb01中"


def reference(text: str, form: str = "NFC") -> str:
    """Every step, unconditionally, in the documented order."""
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", "", text)
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def test_equals_the_reference_and_is_idempotent():
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))
        for form in ("NFC", "NFKC"):
            once = clean_text(text, form)
            assert once == reference(text, form), (text, form)
            assert clean_text(once, form) == once, (text, form)


def test_clean_text_is_returned_unchanged():
    text = "A tidy answer.\n\nWith two paragraphs and caf\u00e9."
    assert clean_text(text) is text
    assert clean_text("x\r\ny  \n\n\n\nz ") == "x\ny\n\nz"
    assert clean_text("keep\x07me", strip_control=False) == "keep\x07me"
    assert clean_text("  as is \n", strip_whitespace=False) == "  as is \n"


OPTIONS = [
    ("NFC", True, True),
    ("NFKC", True, True),
    ("none", True, True),
    ("none", False, True),
    ("NFC", True, False),
    ("NFC", False, False),
]


def _texts(rng: random.Random, alphabet: str, longest: int, n: int) -> list[str | None]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest))) for _ in range(n)] + [None]


@pytest.mark.parametrize("options", OPTIONS)
def test_clean_column_equals_clean_text_on_fuzzed_text(options):
    rng = random.Random(1)
    # short texts hit every character class; long mostly-plain ones hit the 8-bytes-at-a-time copy
    texts = _texts(rng, ALPHABET, 12, 20_000) + _texts(rng, "abcdefgh" * 6 + "  \n\t\r\x07\u00e9", 300, 3_000)
    column, changed = clean_column(pa.array(texts), *options)
    expected = [None if t is None else clean_text(t, *options) for t in texts]
    assert column.to_pylist() == expected
    assert changed.tolist() == [t is not None and e != t for t, e in zip(texts, expected, strict=True)]


def test_clean_column_equals_clean_text_on_raw(shared_data):
    tables = [b.table for b in read_input(InputSpec(path="raw"), shared_data)]
    contents = pa.concat_arrays([t["messages"].combine_chunks().flatten().field("content") for t in tables])
    texts = contents.to_pylist()
    for options in OPTIONS[:3]:
        column, changed = clean_column(contents, *options)
        expected = [clean_text(t, *options) for t in texts]
        assert column.to_pylist() == expected
        assert int(changed.sum()) == sum(e != t for t, e in zip(texts, expected, strict=True))


def test_the_whitespace_table_is_complete():
    """clean_column's trim knows str.isspace() only up to U+3000: nothing above may be whitespace."""
    assert not [c for c in range(0x3001, 0x110000) if chr(c).isspace()]
    assert len(PYTHON_WHITESPACE) == 29 and 0x85 in PYTHON_WHITESPACE and 0x1C in PYTHON_WHITESPACE
