"""UTF-8 text as the compiled kernels see it: Arrow string buffers, code points, 8-byte words.

Every kernel in curate.text reads a column of text as one byte buffer plus int64 offsets
(`string_buffers`), decodes code points with `decode_utf8`, and skips runs of bytes that need no
look 8 at a time with the word tests below (the classic bit tricks on little-endian uint64 words).
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa

ONES = np.uint64(0x0101010101010101)
HIGH = np.uint64(0x8080808080808080)


def repeated(byte: int) -> np.uint64:
    """A word of 8 copies of `byte`, for `has_byte` and `has_below`."""
    return np.uint64(0x0101010101010101 * byte)


@numba.njit(inline="always")
def has_byte(x, pattern):
    """Non-zero when a byte of x equals the byte `pattern` repeats."""
    d = x ^ pattern
    return (d - ONES) & ~d & HIGH


@numba.njit(inline="always")
def has_below(x, pattern):
    """Non-zero when a byte of x is below the byte `pattern` repeats (which must be at most 0x80)."""
    return (x - pattern) & ~x & HIGH


@numba.njit(inline="always")
def copy_bytes(src, start, end, out, o):
    """out[o:o + end - start] = src[start:end], at memcpy speed; returns the end in out.

    Unsigned indices spare numba its negative-index checks, so LLVM turns the loop into a block
    copy: about 5x faster than the slice assignment here.
    """
    n = np.uint64(end - start)
    src_at, out_at = np.uint64(start), np.uint64(o)
    for k in range(n):
        out[out_at + k] = src[src_at + k]
    return o + (end - start)


def as_words(data: np.ndarray) -> np.ndarray:
    """The bytes seen as little-endian uint64 words (a tail under 8 bytes left out)."""
    return data[: len(data) // 8 * 8].view(np.uint64)


def string_buffers(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes, int64 offsets) of a string or binary array, zero-copy where Arrow allows; nulls
    are empty texts."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if array.null_count:
        array = array.fill_null(
            b"" if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type) else ""
        )
    if array.type != pa.large_binary():
        array = array.cast(pa.large_binary())
    _, off_buf, data_buf = array.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(1, np.uint8)
    return data, offsets


def list_of_struct(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[pa.Array]]:
    """A list<struct> column taken apart: each list's offsets (int64, from 0) and one array per
    struct field over all items (a messages column: turns, then role, content, ...)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], column.flatten().flatten()


def packed(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings made in Python as one buffer and int64 offsets, the shape the kernels read."""
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return np.frombuffer(b"".join(parts), np.uint8) if parts else np.zeros(0, np.uint8), offsets


@numba.njit(inline="always")
def decode_utf8(data, i):
    """The code point at byte i of UTF-8 `data`, and its length in bytes."""
    b0 = np.int64(data[i])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xE0:
        return ((b0 & 0x1F) << 6) | (np.int64(data[i + 1]) & 0x3F), 2
    if b0 < 0xF0:
        return ((b0 & 0x0F) << 12) | ((np.int64(data[i + 1]) & 0x3F) << 6) | (np.int64(data[i + 2]) & 0x3F), 3
    return (
        ((b0 & 0x07) << 18)
        | ((np.int64(data[i + 1]) & 0x3F) << 12)
        | ((np.int64(data[i + 2]) & 0x3F) << 6)
        | (np.int64(data[i + 3]) & 0x3F)
    ), 4


@numba.njit(inline="always")
def fmix64(h):
    """MurmurHash3's 64-bit finalizer: spreads every input bit over the whole word."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))
