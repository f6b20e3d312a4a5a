"""Shared test fixtures: where the real third-party data lives (../shared beside the checkout)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_MODELS = SHARED / "models"
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data is missing: expected {SHARED_DATA} (../shared beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def raw_batches(shared_data: Path) -> list:
    """All of raw/ read once, as read_input's batches, for the tests that check what comes after
    reading (tests/test_formats.py checks the reading itself on them)."""
    from curate.formats import InputSpec, read_input

    return list(read_input(InputSpec(path="raw"), shared_data))


@pytest.fixture(scope="session")
def raw_table(raw_batches: list):
    """All of raw/ as one Arrow table of records (85,669 rows)."""
    import pyarrow as pa

    return pa.concat_tables(b.table for b in raw_batches)


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory) -> Path:
    """The demo as users run it, `curate run pipelines/demo.yaml --out DIR --json`, once per session:
    the output folder, for the tests that read its version with other commands."""
    from click.testing import CliRunner

    from curate.cli import main

    out = tmp_path_factory.mktemp("demo-cli") / "out"
    args = ["run", str(REPO / "pipelines" / "demo.yaml"), "--out", str(out), "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(autouse=True, scope="session")
def _private_shared_cache(tmp_path_factory):
    """Tests write LLM answers and embeddings to a cache of their own, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CURATE_CACHE_DIR", str(tmp_path_factory.mktemp("shared-cache")))
    # the kernels are compiled by the first test that needs them; a warm-up process per recipe
    # would only compete with the tests for the cores (tests/test_warm.py turns it on)
    mp.setenv("CURATE_WARM", "0")
    yield
    mp.undo()


@pytest.fixture
def serve():
    """Start local fake OpenAI/Anthropic servers (tests/llm_server.py) for a test; all stop after it."""
    from tests.llm_server import FakeLLM

    started = []

    def make(**kw):
        fake = FakeLLM(**kw).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()
