"""SHA-1 of byte ranges inside numba kernels: datasketch's default shingle hash, minus a Python call each.

datasketch hashes every shingle with `sha1_hash32` (the first 4 digest bytes read little-endian) or,
for its 64-bit scheme, `sha1_hash64` (the first 8). Calling hashlib once per shingle costs about a
microsecond of interpreter overhead, which is most of datasketch's time; this is the same function
compiled, checked against hashlib in tests/test_minhash.py.
"""

from __future__ import annotations

import numba
import numpy as np

_M32 = np.uint64(0xFFFFFFFF)
_K0 = np.uint64(0x5A827999)
_K1 = np.uint64(0x6ED9EBA1)
_K2 = np.uint64(0x8F1BBCDC)
_K3 = np.uint64(0xCA62C1D6)
_H0 = np.uint64(0x67452301)
_H1 = np.uint64(0xEFCDAB89)
_H2 = np.uint64(0x98BADCFE)
_H3 = np.uint64(0x10325476)
_H4 = np.uint64(0xC3D2E1F0)
_FF00 = np.uint64(0xFF00)
_FF = np.uint64(0xFF)


@numba.njit(inline="always")
def _rotl(x, k):
    return ((x << k) | (x >> (32 - k))) & _M32


@numba.njit(inline="always")
def _bswap32(x):
    return ((x & _FF) << 24) | ((x & _FF00) << 8) | ((x >> 8) & _FF00) | (x >> 24)


@numba.njit(cache=True)
def _compress(state, w):
    """One SHA-1 block: `w[:16]` holds the big-endian message words; `state` is updated in place."""
    for t in range(16, 80):
        w[t] = _rotl(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1)
    a = state[0]
    b = state[1]
    c = state[2]
    d = state[3]
    e = state[4]
    for t in range(20):
        f = (b & c) | ((b ^ _M32) & d)
        tmp = (_rotl(a, 5) + f + e + _K0 + w[t]) & _M32
        e = d
        d = c
        c = _rotl(b, 30)
        b = a
        a = tmp
    for t in range(20, 40):
        tmp = (_rotl(a, 5) + (b ^ c ^ d) + e + _K1 + w[t]) & _M32
        e = d
        d = c
        c = _rotl(b, 30)
        b = a
        a = tmp
    for t in range(40, 60):
        f = (b & c) | (b & d) | (c & d)
        tmp = (_rotl(a, 5) + f + e + _K2 + w[t]) & _M32
        e = d
        d = c
        c = _rotl(b, 30)
        b = a
        a = tmp
    for t in range(60, 80):
        tmp = (_rotl(a, 5) + (b ^ c ^ d) + e + _K3 + w[t]) & _M32
        e = d
        d = c
        c = _rotl(b, 30)
        b = a
        a = tmp
    state[0] = (state[0] + a) & _M32
    state[1] = (state[1] + b) & _M32
    state[2] = (state[2] + c) & _M32
    state[3] = (state[3] + d) & _M32
    state[4] = (state[4] + e) & _M32


@numba.njit(cache=True)
def sha1_prefix64(data, start, end, state, w, tail):
    """The first 8 bytes of SHA-1(data[start:end]) read little-endian (datasketch's `sha1_hash64`).

    `sha1_hash32` is the low 32 bits of this value. `state` (uint64[5]), `w` (uint64[80]) and
    `tail` (uint8[128]) are scratch buffers owned by the caller, so the hot loop allocates nothing.
    """
    state[0] = _H0
    state[1] = _H1
    state[2] = _H2
    state[3] = _H3
    state[4] = _H4
    length = end - start
    full = length // 64
    for blk in range(full):
        base = start + blk * 64
        for t in range(16):
            p = base + 4 * t
            w[t] = (
                (np.uint64(data[p]) << 24)
                | (np.uint64(data[p + 1]) << 16)
                | (np.uint64(data[p + 2]) << 8)
                | np.uint64(data[p + 3])
            )
        _compress(state, w)
    # The rest of the message, the 0x80 marker and the bit length fill one or two padded blocks.
    rest = length - full * 64
    base = start + full * 64
    for i in range(rest):
        tail[i] = data[base + i]
    tail[rest] = 0x80
    nbytes = 64 if rest < 56 else 128
    for i in range(rest + 1, nbytes - 8):
        tail[i] = 0
    bits = np.uint64(length) * np.uint64(8)
    for i in range(8):
        tail[nbytes - 1 - i] = (bits >> np.uint64(8 * i)) & np.uint64(_FF)
    for blk in range(nbytes // 64):
        for t in range(16):
            p = blk * 64 + 4 * t
            w[t] = (
                (np.uint64(tail[p]) << 24)
                | (np.uint64(tail[p + 1]) << 16)
                | (np.uint64(tail[p + 2]) << 8)
                | np.uint64(tail[p + 3])
            )
        _compress(state, w)
    return _bswap32(state[0]) | (_bswap32(state[1]) << 32)


LANES = 32  # messages hashed side by side, so the compiler can run the rounds as SIMD vectors
SHORT = 55  # longest message that fits one padded block


@numba.njit(inline="always")
def _round_ch(w, t, ra, rb, rc, rd, re, k):
    # e += rotl(a, 5) + f(b, c, d) + k + w[t]; b = rotl(b, 30): the caller rotates the row roles
    # instead of moving five values per round.
    for lane in range(LANES):
        va = w[ra, lane]
        vb = w[rb, lane]
        vc = w[rc, lane]
        vd = w[rd, lane]
        w[re, lane] = np.uint32(
            ((va << 5) | (va >> 27)) + ((vb & vc) | (~vb & vd)) + w[re, lane] + k + w[t, lane]
        )
        w[rb, lane] = (vb << 30) | (vb >> 2)


@numba.njit(inline="always")
def _round_par(w, t, ra, rb, rc, rd, re, k):
    # e += rotl(a, 5) + f(b, c, d) + k + w[t]; b = rotl(b, 30): the caller rotates the row roles
    # instead of moving five values per round.
    for lane in range(LANES):
        va = w[ra, lane]
        vb = w[rb, lane]
        vc = w[rc, lane]
        vd = w[rd, lane]
        w[re, lane] = np.uint32(((va << 5) | (va >> 27)) + (vb ^ vc ^ vd) + w[re, lane] + k + w[t, lane])
        w[rb, lane] = (vb << 30) | (vb >> 2)


@numba.njit(inline="always")
def _round_maj(w, t, ra, rb, rc, rd, re, k):
    # e += rotl(a, 5) + f(b, c, d) + k + w[t]; b = rotl(b, 30): the caller rotates the row roles
    # instead of moving five values per round.
    for lane in range(LANES):
        va = w[ra, lane]
        vb = w[rb, lane]
        vc = w[rc, lane]
        vd = w[rd, lane]
        w[re, lane] = np.uint32(
            ((va << 5) | (va >> 27)) + ((vb & vc) | (vb & vd) | (vc & vd)) + w[re, lane] + k + w[t, lane]
        )
        w[rb, lane] = (vb << 30) | (vb >> 2)


@numba.njit(cache=True)
def big_endian_words(buf, length, be32):
    """be32[p] = the big-endian 32-bit word at byte p of buf, for p < length (for `sha1_short_lanes`)."""
    for p in range(length):
        be32[p] = (
            (np.uint32(buf[p]) << 24)
            | (np.uint32(buf[p + 1]) << 16)
            | (np.uint32(buf[p + 2]) << 8)
            | np.uint32(buf[p + 3])
        )


@numba.njit(cache=True)
def sha1_short_lanes(be32, starts, ends, w, out):
    """`sha1_prefix64` of up to LANES messages of at most SHORT bytes each, computed lane-parallel.

    Messages are byte ranges of a buffer given as `big_endian_words(buf)`, which must cover 64
    bytes past every start. `w` is uint32[85, LANES] scratch: rows 0-79 the message schedule, rows
    80-84 the working state (one array, so the compiler sees that rows never overlap and vectorizes
    the rounds without runtime alias checks); `out[l]` receives lane l's value.
    """
    count = starts.size
    for lane in range(LANES):
        s = starts[lane] if lane < count else 0
        n = ends[lane] - s if lane < count else 0
        for t in range(15):
            # keep the message bytes of word t, then the 0x80 marker right after the last one
            rest = n - 4 * t
            keep = min(max(rest, 0), 4)
            mask = (np.uint64(0xFFFFFFFF00000000) >> np.uint64(8 * keep)) & _M32
            marker = np.uint64(0x80) << np.uint64(24 - 8 * rest) if 0 <= rest < 4 else np.uint64(0)
            w[t, lane] = (np.uint64(be32[s + 4 * t]) & mask) | marker
        w[15, lane] = np.uint32(n * 8)
    for t in range(16, 80):
        for lane in range(LANES):
            x = np.uint32(w[t - 3, lane] ^ w[t - 8, lane] ^ w[t - 14, lane] ^ w[t - 16, lane])
            w[t, lane] = (x << 1) | (x >> 31)
    for lane in range(LANES):
        w[80, lane] = _H0
        w[81, lane] = _H1
        w[82, lane] = _H2
        w[83, lane] = _H3
        w[84, lane] = _H4
    for t in range(0, 20, 5):
        _round_ch(w, t + 0, 80, 81, 82, 83, 84, _K0)
        _round_ch(w, t + 1, 84, 80, 81, 82, 83, _K0)
        _round_ch(w, t + 2, 83, 84, 80, 81, 82, _K0)
        _round_ch(w, t + 3, 82, 83, 84, 80, 81, _K0)
        _round_ch(w, t + 4, 81, 82, 83, 84, 80, _K0)
    for t in range(20, 40, 5):
        _round_par(w, t + 0, 80, 81, 82, 83, 84, _K1)
        _round_par(w, t + 1, 84, 80, 81, 82, 83, _K1)
        _round_par(w, t + 2, 83, 84, 80, 81, 82, _K1)
        _round_par(w, t + 3, 82, 83, 84, 80, 81, _K1)
        _round_par(w, t + 4, 81, 82, 83, 84, 80, _K1)
    for t in range(40, 60, 5):
        _round_maj(w, t + 0, 80, 81, 82, 83, 84, _K2)
        _round_maj(w, t + 1, 84, 80, 81, 82, 83, _K2)
        _round_maj(w, t + 2, 83, 84, 80, 81, 82, _K2)
        _round_maj(w, t + 3, 82, 83, 84, 80, 81, _K2)
        _round_maj(w, t + 4, 81, 82, 83, 84, 80, _K2)
    for t in range(60, 80, 5):
        _round_par(w, t + 0, 80, 81, 82, 83, 84, _K3)
        _round_par(w, t + 1, 84, 80, 81, 82, 83, _K3)
        _round_par(w, t + 2, 83, 84, 80, 81, 82, _K3)
        _round_par(w, t + 3, 82, 83, 84, 80, 81, _K3)
        _round_par(w, t + 4, 81, 82, 83, 84, 80, _K3)
    for lane in range(LANES):
        h0 = np.uint64(np.uint32(w[80, lane] + np.uint32(0x67452301)))
        h1 = np.uint64(np.uint32(w[81, lane] + np.uint32(0xEFCDAB89)))
        out[lane] = _bswap32(h0) | (_bswap32(h1) << 32)
