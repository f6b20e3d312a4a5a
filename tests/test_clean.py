"""clean_text: equal to the plain regex pipeline it shortcuts, idempotent, and a no-op on clean text."""

from __future__ import annotations

import random
import re
import unicodedata

import pyarrow as pa
import pytest

from curate.text.clean import PYTHON_WHITESPACE, blank_column, clean_column, clean_text, stable_code_points

# Besides controls and whitespace: letters that compose with a following accent, Hangul jamo that
# compose by rule, a vowel sign that composes although its combining class is 0 (U+0B3E), singletons
# (U+2126), a non-starter decomposition (U+0344), a composition exclusion (U+0958), compatibility
# characters (U+FB01, U+1E9B), an emoji and a code point above the quick-check table (U+20000).
ALPHABET = (
    "ab \t\n\r\x00\x07\x1f\x7f\x85\x9f\u00a0e\u0301\u00e9\u2028\u3000\ufb01中"
    "\u1100\u1161\uac00\u11a8\u0b47\u0b3e\u2126\u0344\u0958\u1e9b\U0001f600\U00020000"
)


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


def test_clean_column_equals_clean_text_on_raw(raw_batches):
    tables = [b.table for b in raw_batches]
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


@pytest.mark.parametrize(("form", "bit"), [("NFC", 1), ("NFKC", 2)])
def test_text_of_stable_code_points_is_already_normalized(form, bit):
    """The quick-check table vouches only for code points the form leaves alone in any company."""
    table = stable_code_points()
    stable = [chr(c) for c in range(len(table)) if table[c] & bit]
    assert all(unicodedata.normalize(form, c) == c and not unicodedata.combining(c) for c in stable)
    for unstable in ("\u0301", "\u1161", "\u11a8", "\u0b3e", "\u2126", "\u0958", "\u3099"):
        assert not table[ord(unstable)] & bit
    assert not table[0xFB01] & 2 and table[0xFB01] & 1  # a ligature: NFKC splits it, NFC does not
    # every pair of stable code points next to each other stays as it is, around the composing ranges
    near = [
        c
        for c in stable
        if 0x0041 <= ord(c) <= 0x0500 or 0x0900 <= ord(c) <= 0x0D80 or 0x1100 <= ord(c) <= 0x1200
    ]
    near += [c for c in stable if 0xAC00 <= ord(c) <= 0xAC40 or 0x3040 <= ord(c) <= 0x30FF]
    rng = random.Random(2)
    for _ in range(50_000):
        text = "".join(rng.choice(near) for _ in range(rng.randint(2, 4)))
        assert unicodedata.is_normalized(form, text), (form, text)


def test_blank_column_is_str_strip_on_every_string():
    rng = random.Random(4)
    texts = _texts(rng, ALPHABET, 6, 20_000) + ["", " \x1c\u3000\x85", "\u200b"]  # U+200B is not space
    expected = [t is None or not t.strip() for t in texts]
    assert blank_column(pa.array(texts)).tolist() == expected
    assert 1000 < sum(expected) < 19_000
