"""Canonical text cleanup: Unicode composition, stray control characters and whitespace, fast on clean text.

Both the content id and the normalize stage use it, so normalizing a record never changes its id.
Real data is mostly clean already: a few C-speed checks (`isascii`, `bytes.translate`, substring
search) prove that, and only the rare text that needs work pays for the regular expressions.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

UnicodeForm = Literal["NFC", "NFKC", "none"]

# C0/C1 control characters except tab and newline: they break tokenizers and renderers.
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
_CONTROL_RE = re.compile(CONTROL_CHARS)
_ASCII_CONTROL = bytes(range(0x00, 0x09)) + b"\x0b\x0c" + bytes(range(0x0E, 0x20)) + b"\x7f"
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(
    text: str, unicode_form: UnicodeForm = "NFC", strip_control: bool = True, strip_whitespace: bool = True
) -> str:
    """Text in one canonical form; idempotent, and returns `text` itself when nothing needs doing."""
    if text.isascii():
        if strip_control and len(text.encode("ascii").translate(None, _ASCII_CONTROL)) != len(text):
            text = _CONTROL_RE.sub("", text)
    else:
        # controls go first: removing one between a letter and its accent can make text composable
        if strip_control and _CONTROL_RE.search(text) is not None:
            text = _CONTROL_RE.sub("", text)
        if unicode_form != "none" and not unicodedata.is_normalized(unicode_form, text):
            text = unicodedata.normalize(unicode_form, text)
    if not strip_whitespace:
        return text
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("\n", text)
    if "\n\n\n" in text:
        text = _MANY_BLANK_LINES.sub("\n\n", text)
    if text[:1].isspace() or text[-1:].isspace():
        text = text.strip()
    return text
