"""The language a text is written in: CLD2 (pycld2), compiled, offline, about 17 µs a text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pycld2

UNKNOWN = "un"


def language_of(text: str) -> str:
    """The ISO 639-1 code of the text's main language, or "un" when CLD2 is not sure."""
    try:
        reliable, _, details = pycld2.detect(text[:4000])
    except pycld2.error:  # text CLD2 cannot read (e.g. lone surrogates)
        return UNKNOWN
    return details[0][1] if reliable else UNKNOWN


def language_shares(texts: Iterable[str]) -> dict[str, float]:
    """Each language's share of the texts, largest first."""
    counts = Counter(language_of(t) for t in texts)
    total = sum(counts.values())
    return {code: round(n / total, 4) for code, n in counts.most_common()} if total else {}
