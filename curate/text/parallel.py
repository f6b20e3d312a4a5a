"""Compiled kernels on every core: a kernel does one chunk of the work and releases the GIL (numba's
`nogil=True`), and a pool of threads runs the chunks.

numba's own `parallel=True` compiles each kernel twice over (a serial and a parallel form, plus its
threading layer) and doubled the first run's compile time (29 s for the demo on 2 cores, half of
it the MinHash kernel); chunks on threads run as fast and compile once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache


def threads() -> int:
    """CURATE_THREADS if set, else every core."""
    return max(1, int(os.environ.get("CURATE_THREADS") or os.cpu_count() or 1))


def chunks_for(n: int) -> int:
    """How many interleaved chunks a kernel deals n records into, so that long ones spread out."""
    return max(1, min(n, 64 * threads()))


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads(), thread_name_prefix="curate-kernel")


def each_chunk(kernel: Callable, chunks: int, *args) -> None:
    """kernel(c, *args) for every chunk c in range(chunks), on all cores."""
    if chunks <= 1 or threads() == 1:
        for c in range(chunks):
            kernel(c, *args)
        return
    for _ in _pool().map(lambda c: kernel(c, *args), range(chunks)):
        pass
