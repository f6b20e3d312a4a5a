"""clean_text: equal to the plain regex pipeline it shortcuts, idempotent, and a no-op on clean text."""

from __future__ import annotations

import random
import re
import unicodedata

from curate.text.clean import clean_text

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
