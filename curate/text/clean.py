"""Canonical text cleanup: Unicode composition, stray control characters and whitespace, fast on clean text.

Both the content id and the normalize stage use it, so normalizing a record never changes its id.
Real data is mostly clean already: a few C-speed checks (`isascii`, `bytes.translate`, substring
search) prove that, and only the rare text that needs work pays for the regular expressions.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import pyarrow as pa

from curate.text.utf8 import (
    HIGH,
    as_words,
    copy_bytes,
    decode_utf8,
    has_below,
    has_byte,
    packed,
    repeated,
    string_buffers,
)

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


# Whole columns ------------------------------------------------------------------------------------
#
# `clean_column` gives the same strings as `clean_text` on every element of an Arrow string array,
# without a Python call per string. A compiled pass notes what each string needs: most real text
# needs nothing and is copied as is; the byte-level steps (control characters, CR, spaces before a
# newline, blank lines, trimming) run compiled, in clean_text's order; only Unicode composition,
# and the rare non-ASCII text holding control characters, go through Python. tests/test_clean.py
# holds the column equal to clean_text on fuzzed text and on all of raw/.

_IS_CONTROL = np.zeros(256, np.bool_)
_IS_CONTROL[list(_ASCII_CONTROL)] = True
# the code points str.isspace() accepts: none lies above U+3000 (a test checks this)
PYTHON_WHITESPACE = [c for c in range(0x3001) if chr(c).isspace()]
_IS_SPACE = np.zeros(0x3001, np.bool_)
_IS_SPACE[PYTHON_WHITESPACE] = True

# what a string needs, as bits; _UNSTABLE: a code point the quick check below cannot vouch for,
# so Python's unicodedata decides whether the text is already composed
_CONTROL, _CR, _SPACE_NL, _BLANK_LINES, _EDGE, _UNSTABLE = 1, 2, 4, 8, 16, 32
_FORM_BITS = {"NFC": 1, "NFKC": 2, "none": 0}
_STABLE_LIMIT = 0x20000  # the table covers planes 0 and 1; code points above it are left to Python
_WHITESPACE_STEPS = _CR | _SPACE_NL | _BLANK_LINES | _EDGE
# how a string is produced
_COPY, _STEPS, _FROM_PYTHON, _STEPS_ON_PYTHON = 0, 1, 2, 3


@functools.cache
def stable_code_points() -> np.ndarray:
    """Per code point below _STABLE_LIMIT: bit 1 when NFC leaves any text made only of such code
    points as it is, bit 2 likewise for NFKC.

    That is UAX #15's quick check: a code point qualifies when its canonical combining class is 0,
    its quick-check value is Yes (normalizing it alone gives it back, and it is not the second part
    of any canonical composition, i.e. not "Maybe"). Built from this Python's unicodedata, so it
    follows the same Unicode version as `clean_text`.
    """
    chars = [chr(c) for c in range(_STABLE_LIMIT)]
    combining = np.fromiter(map(unicodedata.combining, chars), np.int64, _STABLE_LIMIT)
    decompositions = list(map(unicodedata.decomposition, chars))
    table = np.where(combining == 0, 3, 0).astype(np.uint8)
    table[0xD800:0xE000] = 0  # surrogates never occur in UTF-8 text
    # Hangul vowels and trailing consonants compose with a preceding syllable by rule, not by table
    table[0x1161:0x1176] = table[0x11A8:0x11C3] = 0
    for code, decomposition in enumerate(decompositions):
        if not decomposition:
            continue
        parts = decomposition.split()
        if parts[0].startswith("<"):
            table[code] &= ~np.uint8(2)  # a compatibility decomposition: NFKC changes it
            continue
        if len(parts) == 2:
            table[int(parts[1], 16)] = 0  # may compose with what precedes it ("Maybe")
        char = chars[code]
        for bit, form in ((1, "NFC"), (2, "NFKC")):
            if unicodedata.normalize(form, char) != char:
                table[code] &= ~np.uint8(bit)
    return table


@numba.njit(inline="always")
def _space_at(data, i):
    """Whether the code point starting at byte i is whitespace to str.isspace(), and its length."""
    cp, size = decode_utf8(data, i)
    return cp < 0x3001 and _IS_SPACE[cp], size


@numba.njit(inline="always")
def _last_start(data, start, end):
    """Byte where the last code point of data[start:end] starts."""
    k = end - 1
    while k > start and (data[k] & 0xC0) == 0x80:
        k -= 1
    return k


_SPACES = repeated(0x20)
_DELETES = repeated(0x7F)


@numba.njit(inline="always")
def _plain_word(x):
    """Whether all 8 bytes of x are printable ASCII (0x20..0x7E): nothing in them needs a look."""
    return (has_below(x, _SPACES) | has_byte(x, _DELETES) | (x & HIGH)) == 0


@numba.njit(cache=True)
def _triage(data, words, offsets, stable, form_bit, needs):
    """What each string needs, as bits: one pass over the bytes (8 at a time where they are plain).

    `stable` is `stable_code_points()`, read for the bit of the Unicode form (0: no form, no look).
    """
    for i in range(len(offsets) - 1):
        start, end = offsets[i], offsets[i + 1]
        bits = 0
        prev = prev2 = 0
        j = start
        while j < end:
            if (j & 7) == 0 and j + 8 <= end:
                x = words[j >> 3]
                if _plain_word(x):
                    prev2 = (x >> np.uint64(48)) & np.uint64(0xFF)
                    prev = x >> np.uint64(56)
                    j += 8
                    continue
            c = data[j]
            if c >= 0x80:
                if c == 0xC2 and j + 1 < end and 0x80 <= data[j + 1] <= 0x9F:
                    bits |= _CONTROL  # C1 control characters, U+0080..U+009F
                if form_bit:
                    cp, size = decode_utf8(data, j)
                    if cp >= _STABLE_LIMIT or not (stable[cp] & form_bit):
                        bits |= _UNSTABLE
                    prev2 = prev
                    prev = c
                    j += size
                    continue
            elif _IS_CONTROL[c]:
                bits |= _CONTROL
            elif c == 13:
                bits |= _CR
            elif c == 10:
                if prev == 32 or prev == 9:
                    bits |= _SPACE_NL
                elif prev == 10 and prev2 == 10:
                    bits |= _BLANK_LINES
            prev2 = prev
            prev = c
            j += 1
        if end > start and (_space_at(data, start)[0] or _space_at(data, _last_start(data, start, end))[0]):
            bits |= _EDGE
        needs[i] = bits


@numba.njit(cache=True)
def _steps(src, words, start, end, bits, strip_control, strip_whitespace, out, o):
    """clean_text's byte-level steps on src[start:end], written at out[o:]; returns the new end.

    One pass does what clean_text does in sequence: drop control characters; CRLF and CR -> LF;
    drop spaces and tabs before a newline; at most two newlines in a row (counted in the text
    those steps leave); then the trim. Text that only needs trimming is copied once, and runs of
    printable ASCII are copied 8 bytes at a time (`words` is src seen as uint64).
    """
    if not (bits & (_CONTROL | _CR | _SPACE_NL | _BLANK_LINES)):
        if strip_whitespace:
            start, end = _trimmed(src, start, end)
        return copy_bytes(src, start, end, out, o)
    w = o
    run = -1  # where the spaces and tabs just written start, or -1
    newlines = 0  # newlines just written
    after_cr = False
    j = start
    while j < end:
        if (j & 7) == 0 and j + 8 <= end and _plain_word(words[j >> 3]):
            copy_bytes(src, j, j + 8, out, w)
            if src[j + 7] == 32:  # the word ends in spaces: where do they start?
                k = 7
                while k >= 0 and src[j + k] == 32:
                    k -= 1
                if k >= 0:
                    run = w + k + 1
                    newlines = 0
                elif run < 0:
                    run = w
            else:
                run = -1
                newlines = 0
            after_cr = False
            w += 8
            j += 8
            continue
        c = src[j]
        if strip_control:
            if c == 0xC2 and j + 1 < end and 0x80 <= src[j + 1] <= 0x9F:
                j += 2
                continue
            if _IS_CONTROL[c]:
                j += 1
                continue
        j += 1
        if strip_whitespace:
            if after_cr:
                after_cr = False
                if c == 10:
                    continue
            if c == 13:
                c = 10
                after_cr = True
            if c == 32 or c == 9:
                if run < 0:
                    run = w
            elif c == 10:
                if run >= 0:
                    w = run
                    run = -1
                if newlines >= 2:
                    continue
                newlines += 1
            else:
                run = -1
                newlines = 0
        out[w] = c
        w += 1
    if not strip_whitespace:
        return w
    first, end = _trimmed(out, o, w)
    return copy_bytes(out, first, end, out, o)  # moves left: a forward copy is safe


@numba.njit(inline="always")
def _trimmed(data, start, end):
    """data[start:end] without leading and trailing whitespace, as str.strip() sees it: (start, end)."""
    while start < end:
        space, size = _space_at(data, start)
        if not space:
            break
        start += size
    while end > start:
        last = _last_start(data, start, end)
        if not _space_at(data, last)[0]:
            break
        end = last
    return start, end


@numba.njit(inline="always")
def _cleaned_into(i, p, data, words, offsets, needs, how, py, py_words, py_offsets, control, space, out, o):
    """String i of a planned cleanup, written at out[o:]: (its end, the next Python string's index).

    Strings are taken in order; `p` counts the strings Python produced (see `CleanupPlan`).
    """
    src, src_words = data, words
    start, end = offsets[i], offsets[i + 1]
    if how[i] == _FROM_PYTHON or how[i] == _STEPS_ON_PYTHON:
        src, src_words = py, py_words
        start, end = py_offsets[p], py_offsets[p + 1]
        p += 1
    if how[i] == _STEPS or how[i] == _STEPS_ON_PYTHON:
        return _steps(src, src_words, start, end, needs[i], control, space, out, o), p
    return copy_bytes(src, start, end, out, o), p


@numba.njit(cache=True)
def _assemble(data, words, offsets, needs, how, py, py_words, py_offsets, control, space, out, out_offsets):
    """The cleaned column, string by string, from the source or from Python's result."""
    o = 0
    p = 0
    for i in range(len(offsets) - 1):
        out_offsets[i] = o
        o, p = _cleaned_into(
            i, p, data, words, offsets, needs, how, py, py_words, py_offsets, control, space, out, o
        )
    out_offsets[len(offsets) - 1] = o


@numba.njit(cache=True)
def _blank(data, offsets, out):
    for i in range(len(offsets) - 1):
        start, end = offsets[i], offsets[i + 1]
        while start < end:
            space, size = _space_at(data, start)
            if not space:
                break
            start += size
        out[i] = start == end


def blank_column(array: pa.Array) -> np.ndarray:
    """Which strings hold no text: null, empty, or only what `str.isspace()` calls whitespace."""
    data, offsets = string_buffers(array)
    out = np.empty(len(array), np.bool_)
    _blank(data, offsets, out)
    return out


@dataclass
class CleanupPlan:
    """What `clean_text` would do to each string of a column, worked out without doing it.

    The compiled kernels read it: `_assemble` builds the cleaned column from it, and the content
    id writes its keys straight from it (curate.records.record_ids).
    """

    data: np.ndarray  # the column's UTF-8 bytes and int64 offsets
    offsets: np.ndarray
    needs: np.ndarray  # what each string needs, as bits
    how: np.ndarray  # how each string is produced: copied, stepped, or from Python's result
    py: np.ndarray  # the strings Python produced, in column order, as bytes and offsets
    py_offsets: np.ndarray
    changed: np.ndarray  # which strings the cleanup changes
    strip_control: bool
    strip_whitespace: bool

    def kernel_args(self) -> tuple:
        """The arguments `_cleaned_into` takes after the string and Python indices."""
        return (
            self.data,
            as_words(self.data),
            self.offsets,
            self.needs,
            self.how,
            self.py,
            as_words(self.py),
            self.py_offsets,
            self.strip_control,
            self.strip_whitespace,
        )


def plan_cleanup(
    array: pa.Array,
    unicode_form: UnicodeForm = "NFC",
    strip_control: bool = True,
    strip_whitespace: bool = True,
) -> CleanupPlan:
    """The `CleanupPlan` of an Arrow string array (nulls read as empty text)."""
    data, offsets = string_buffers(array)
    needs = np.empty(len(offsets) - 1, np.uint8)
    _triage(data, as_words(data), offsets, stable_code_points(), _FORM_BITS[unicode_form], needs)
    work = _WHITESPACE_STEPS if strip_whitespace else 0
    if strip_control:
        work |= _CONTROL
    how = np.where(needs & work, _STEPS, _COPY).astype(np.uint8)
    changed = how == _STEPS  # every step the triage asks for changes the text
    py_parts = []
    unstable = np.flatnonzero(needs & _UNSTABLE)
    texts = array.take(pa.array(unstable, pa.int64())).to_pylist() if len(unstable) else []
    for i, text in zip(unstable, texts, strict=True):
        if strip_control and needs[i] & _CONTROL:
            # controls go before composition (dropping one can make a letter and its accent meet)
            cleaned = clean_text(text, unicode_form, strip_control, strip_whitespace)
            how[i], changed[i] = _FROM_PYTHON, True  # a control character was removed, at least
            py_parts.append(cleaned.encode("utf-8"))
        elif unicode_form != "none" and not unicodedata.is_normalized(unicode_form, text):
            # composition can make new whitespace (NFKC turns U+00A0 into a space): every step runs
            how[i] = _STEPS_ON_PYTHON if strip_whitespace else _FROM_PYTHON
            needs[i] = _WHITESPACE_STEPS
            changed[i] = True
            py_parts.append(unicodedata.normalize(unicode_form, text).encode("utf-8"))
    py, py_offsets = packed(py_parts)
    return CleanupPlan(data, offsets, needs, how, py, py_offsets, changed, strip_control, strip_whitespace)


def clean_column(
    array: pa.Array,
    unicode_form: UnicodeForm = "NFC",
    strip_control: bool = True,
    strip_whitespace: bool = True,
) -> tuple[pa.Array, np.ndarray]:
    """`clean_text` on every string of an Arrow string array: (cleaned array, which strings changed).

    Nulls stay null; the result has the input's type (string or large_string).
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    plan = plan_cleanup(array, unicode_form, strip_control, strip_whitespace)
    if not plan.changed.any():
        return array, plan.changed
    out = np.empty(len(plan.data) + len(plan.py), np.uint8)
    out_offsets = np.empty(len(array) + 1, np.int64)
    _assemble(*plan.kernel_args(), out, out_offsets)
    validity = array.is_valid().buffers()[1] if array.null_count else None
    cleaned = pa.Array.from_buffers(
        pa.large_string(),
        len(array),
        [validity, pa.py_buffer(out_offsets), pa.py_buffer(out[: out_offsets[-1]])],
        array.null_count,
    )
    return (cleaned if array.type == pa.large_string() else cleaned.cast(array.type)), plan.changed


@numba.njit(cache=True)
def _id_keys(
    turns, role, role_offsets, tool_calls, tool_offsets, name, name_offsets, cleanup, out, key_offsets
):
    """Each record's id key: per turn role, cleaned content, tool calls and name joined by 0x1F,
    turns joined by 0x1E (the key `curate.records.record_id` hashes), written in one pass."""
    data, words, offsets, needs, how, py, py_words, py_offsets, control, space = cleanup
    o = 0
    p = 0
    for r in range(len(turns) - 1):
        key_offsets[r] = o
        for t in range(turns[r], turns[r + 1]):
            if t > turns[r]:
                out[o] = 0x1E
                o += 1
            o = copy_bytes(role, role_offsets[t], role_offsets[t + 1], out, o)
            out[o] = 0x1F
            o, p = _cleaned_into(
                t, p, data, words, offsets, needs, how, py, py_words, py_offsets, control, space, out, o + 1
            )
            out[o] = 0x1F
            o = copy_bytes(tool_calls, tool_offsets[t], tool_offsets[t + 1], out, o + 1)
            out[o] = 0x1F
            o = copy_bytes(name, name_offsets[t], name_offsets[t + 1], out, o + 1)
    key_offsets[len(turns) - 1] = o


def id_keys(turns: np.ndarray, role: pa.Array, content: pa.Array, tool_calls: pa.Array, name: pa.Array):
    """The id key of every record (see `_id_keys`) as one buffer and int64 offsets; `turns` are the
    records' turn offsets, the arrays hold all turns (nulls read as empty text)."""
    plan = plan_cleanup(content)
    fields = [string_buffers(a) for a in (role, tool_calls, name)]
    size = sum(len(d) for d, _ in fields) + len(plan.data) + len(plan.py) + 4 * (len(plan.offsets) - 1)
    out = np.empty(size, np.uint8)
    key_offsets = np.empty(len(turns), np.int64)
    (role_data, role_offsets), (tool_data, tool_offsets), (name_data, name_offsets) = fields
    _id_keys(
        turns,
        role_data,
        role_offsets,
        tool_data,
        tool_offsets,
        name_data,
        name_offsets,
        plan.kernel_args(),
        out,
        key_offsets,
    )
    return out, key_offsets
