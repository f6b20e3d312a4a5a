"""train.jsonl lines written by a compiled kernel, byte for byte what `json.dumps` writes.

A version's train.jsonl holds one `{"messages": [{"role", "content", "tool_calls", "name"}, ...],
"tools": ...}` line per record: every line and every turn with the same keys, null where a record
has nothing, since `datasets` refuses a file whose rows differ in shape.
Encoding hundreds of thousands of them with `json.dumps` (or polars' JSON encoder) costs seconds;
the kernel escapes and assembles them in one pass over the text. Records that carry tool calls,
tool names or tool definitions are encoded by Python and handed in, to keep their parsed JSON
exact. tests/test_versions.py holds the output equal to `json.dumps(..., ensure_ascii=False)`.
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa

from curate.text.utf8 import (
    as_words,
    copy_bytes,
    has_below,
    has_byte,
    list_of_struct,
    packed,
    repeated,
    string_buffers,
)

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
# json.dumps' short escapes; other characters below 0x20 become \u00XX
_SHORT = np.zeros(256, np.uint8)
for _char, _letter in zip(b'"\\\b\f\n\r\t', b'"\\bfnrt', strict=True):
    _SHORT[_char] = _letter
_OPEN = np.frombuffer(b'{"messages": [', np.uint8)
_ROLE = np.frombuffer(b'{"role": "', np.uint8)
_CONTENT = np.frombuffer(b'", "content": ', np.uint8)
_EMPTY = np.frombuffer(b'""', np.uint8)
_CLOSE_TURN = np.frombuffer(b', "tool_calls": null, "name": null}', np.uint8)
_COMMA = np.frombuffer(b", ", np.uint8)
_CLOSE = np.frombuffer(b'], "tools": null}\n', np.uint8)


@numba.njit(inline="always")
def _put(out, o, piece):
    return copy_bytes(piece, 0, len(piece), out, o)


_SPACES = repeated(0x20)
_QUOTES = repeated(0x22)
_BACKSLASHES = repeated(0x5C)
_UNICODE_ESCAPE = np.frombuffer(b"\\u00", np.uint8)


@numba.njit(inline="always")
def _verbatim_word(x):
    """Whether none of the 8 bytes of x needs escaping (no control character, quote or backslash)."""
    return (has_below(x, _SPACES) | has_byte(x, _QUOTES) | has_byte(x, _BACKSLASHES)) == 0


@numba.njit(inline="always")
def _escaped(data, words, start, end, out, o):
    j = start
    while j < end:
        if (j & 7) == 0 and j + 8 <= end and _verbatim_word(words[j >> 3]):
            o = copy_bytes(data, j, j + 8, out, o)
            j += 8
            continue
        c = data[j]
        j += 1
        if c >= 0x20 and c != 0x22 and c != 0x5C:
            out[o] = c
            o += 1
        elif _SHORT[c]:
            out[o] = 0x5C
            out[o + 1] = _SHORT[c]
            o += 2
        else:
            for k in range(4):
                out[o + k] = _UNICODE_ESCAPE[k]
            out[o + 4] = _HEX[c >> 4]
            out[o + 5] = _HEX[c & 15]
            o += 6
    return o


@numba.njit(cache=True)
def _lines(
    turns,
    role,
    role_words,
    role_off,
    content,
    content_words,
    content_off,
    content_null,
    given,
    given_off,
    use_given,
    out,
):
    o = 0
    g = 0
    for r in range(len(turns) - 1):
        if use_given[r]:
            o = _put(out, o, given[given_off[g] : given_off[g + 1]])
            g += 1
            continue
        o = _put(out, o, _OPEN)
        for t in range(turns[r], turns[r + 1]):
            if t > turns[r]:
                o = _put(out, o, _COMMA)
            o = _put(out, o, _ROLE)
            o = _escaped(role, role_words, role_off[t], role_off[t + 1], out, o)
            o = _put(out, o, _CONTENT)
            if content_null[t]:  # a template concatenates content: text, never null
                o = _put(out, o, _EMPTY)
            else:
                out[o] = 0x22
                o = _escaped(content, content_words, content_off[t], content_off[t + 1], out, o + 1)
                out[o] = 0x22
                o += 1
            o = _put(out, o, _CLOSE_TURN)
        o = _put(out, o, _CLOSE)
    return o


def chat_lines(messages: pa.Array, given: dict[int, str]) -> memoryview:
    """One JSON line per conversation of a messages column whose turns are role and content only (a
    null content as ""), as `json.dumps` writes `{"messages": [{"role", "content", "tool_calls": None,
    "name": None}, ...], "tools": None}` with ensure_ascii=False; rows in `given` get that text."""
    turns, (role, content, *_) = list_of_struct(messages)
    role_data, role_off = string_buffers(role)
    content_data, content_off = string_buffers(content)
    content_null = content.is_null().to_numpy(zero_copy_only=False)
    use_given = np.zeros(len(messages), np.bool_)
    use_given[list(given)] = True
    given_data, given_off = packed([(given[r] + "\n").encode("utf-8") for r in sorted(given)])
    # worst case: every byte escaped as \u00XX, plus the fixed framing of each turn and record
    size = 6 * (len(role_data) + len(content_data)) + 40 * len(content) + 20 * len(messages) + len(given_data)
    out = np.empty(size, np.uint8)
    n = _lines(
        turns,
        role_data,
        as_words(role_data),
        role_off,
        content_data,
        as_words(content_data),
        content_off,
        content_null,
        given_data,
        given_off,
        use_given,
        out,
    )
    return memoryview(out[:n])
