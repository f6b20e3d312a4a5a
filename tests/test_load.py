"""Load: a run over a million records (../shared/data/raw and 11 perturbed copies of it, read as real
files) completes, loses nothing, and stays under the memory bound the README states.

Marked `long`: CI runs it in its own step after the rest (see the README's test command). The
inputs and the measurement are bench/memory.py's; the figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO

PEAK_BOUND_MIB = 2048  # README, "Reliability": a 1M-record run stays under 2 GB (process tree)


def _bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module  # its input writers run in worker processes, found by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.long
def test_a_million_records_run_within_the_memory_bound(tmp_path_factory, shared_data):
    bench = _bench_memory()
    root = tmp_path_factory.mktemp("load")
    folders = bench.make_inputs(root / "inputs", 12)
    result = bench.measure(REPO, bench.recipe(folders), root)
    assert "failed" not in result, result
    c = result["counts"]
    print(
        f"\n1M-record run: {c['input']:,} input rows in {result['seconds']:.1f} s, "
        f"peak {result['tree_peak_mib']:,.0f} MiB (process tree), {result['main_peak_mib']:,.0f} MiB (runner)"
    )
    assert c["input"] > 1_000_000
    assert c["input"] == c["kept"] + c["dropped"] + c["quarantined"] - c["synthetic"]
    assert result["tree_peak_mib"] < PEAK_BOUND_MIB
