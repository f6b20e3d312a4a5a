"""The Ray engine writes the local engine's version, byte for byte, on real recipes over raw/.

One local Ray cluster of two CPUs serves the module (`ray.init(num_cpus=2)`); the engine joins it
and leaves it running. Generating stages send their LLM requests from generation workers (actors)
to a local fake server (tests/llm_server.py). A last test starts a cluster of two nodes with
`ray start` (a head and a worker on 127.0.0.1) and runs `curate run --engine ray --address`
against it. Ray is in the `all` extra, so CI runs all of this (about two minutes on two cores).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
import yaml

from curate.dataset import FeatureTable, RecordFiles, read_part, write_part
from curate.decisions import apply_decisions
from curate.engines import LocalEngine
from curate.engines.ray import RayEngine, RayShuffle
from curate.errors import CurateError
from curate.pipeline import RunResult, run_recipe
from curate.recipe import load_recipe, recipe_from_dict
from curate.stages.base import StageContext
from curate.stages.dedup import DedupConfig, DedupStage
from curate.text import lsh_shuffle
from curate.text.minhash import MinHashConfig
from curate.versions import read_manifest
from tests.conftest import EXAMPLES
from tests.llm_server import FakeLLM
from tests.same_version import assert_same_version, raw_recipe
from tests.test_generation import KEY, RAW, llm, responder, write_recipe
from tests.test_llm_fanout import most_in_flight


class WatchedShuffle(RayShuffle):
    """Ray's shuffle, noting how many rows each round gave."""

    def __init__(self, partitions: int, counts: list[int]) -> None:
        super().__init__(partitions)
        self.counts = counts

    def __call__(self, rows, columns, emit, reduce):
        result = super().__call__(rows, columns, emit, reduce)
        self.counts.append(result.dataset.count())
        return result


class WatchedRayEngine(RayEngine):
    """The Ray engine, noting which steps used the shuffle and the model pool."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.shuffled: list[int] = []
        self.model_pools = 0

    def shuffler(self) -> RayShuffle:
        return WatchedShuffle(super().shuffler().partitions, self.shuffled)

    def _map(self, fn, tasks, decode, uses_model=False, prepared=None):
        self.model_pools += bool(uses_model and tasks)
        return super()._map(fn, tasks, decode, uses_model, prepared)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_the_ray_engine_writes_the_local_engines_version(cluster, shared_data: Path, tmp_path: Path):
    recipe = raw_recipe(
        shared_data,
        [
            {"normalize": {"system_prompt": "You are a helpful assistant."}},
            {"filter": {"min_chars": 10}},
            {"dedup": {"minhash": {"threshold": 0.8}}},
            {"decontaminate": {"methods": ["exact", "ngram", "minhash"]}},
            {"diversity": {"k": 5000}},
        ],
    )
    local = run_recipe(recipe, tmp_path / "local", engine=LocalEngine(workers=2))
    engine = WatchedRayEngine()
    on_ray = run_recipe(recipe, tmp_path / "ray", engine=engine)
    assert (local.run["engine"], on_ray.run["engine"]) == ("local", "ray")
    assert_same_version(local, on_ray)
    assert ray.is_initialized()  # the engine joined the module's cluster and left it running
    stages = {s["name"]: s for s in on_ray.manifest["stages"]}
    assert stages["dedup"]["dropped"]["near_duplicate"] > 100
    assert stages["decontaminate"]["dropped"]["eval_overlap"] >= 252
    assert on_ray.manifest["counts"]["kept"] == 5000
    assert (on_ray.folder / "diversity-map.png").is_file()
    # dedup's buckets met in the shuffle (its edges joined every near-duplicate to its cluster), the
    # components took rounds of shuffles (large-star, then small-star and large-star pairs), and the
    # clusters' kept records were picked in one more; diversity embedded in the actor pool
    near = stages["dedup"]["dropped"]["near_duplicate"]
    edges, *rounds, picked = engine.shuffled
    assert edges >= near and len(rounds) % 2 == 1 and len(rounds) <= 15, engine.shuffled
    assert picked >= near
    assert engine.model_pools == 1


def test_dedup_across_sources_with_exact_jaccard_on_ray(cluster, shared_data: Path, tmp_path: Path):
    names = [  # sets that share prompts: the same instructions, or conversations in two layouts
        "selfinstruct_text-davinci-003_predictions.jsonl.gz",
        "selfinstruct_user_oriented_instructions.jsonl.gz",
        "oasst_en_100_message.jsonl.gz",
        "oasst_en_100_tree.jsonl.gz",
        "instructionwild_seed_prompts_en.jsonl.gz",
        "instructionwild_v2_user_1.jsonl.gz",
        "instructionwild_v2_user_2.jsonl.gz",
        "code_alpaca_2k.json.gz",
        "new_codealpaca.json.gz",
    ]
    inputs = [{"path": f"raw/{name}", "name": name.split(".")[0]} for name in names]
    dedup = {
        "key": "user",
        "exact": False,
        "scope": "across_sources",
        "keep": "longest",
        "minhash": {"threshold": 0.7, "verify": "exact"},
    }
    recipe = raw_recipe(shared_data, [{"normalize": {}}, {"dedup": dedup}, {"decontaminate": {}}], inputs)
    local = run_recipe(recipe, tmp_path / "local", engine=LocalEngine(workers=1))
    on_ray = run_recipe(recipe, tmp_path / "ray", engine=RayEngine())
    assert_same_version(local, on_ray)
    assert local.manifest["stages"][1]["dropped"]["near_duplicate"] >= 700


def test_generation_fans_out_to_workers_and_writes_the_local_version(
    cluster, shared_data: Path, tmp_path: Path, monkeypatch
):
    """normalize, evol, respond and blend over raw/ files: the local engine, then Ray with two
    generation workers of concurrency 2 each (the cluster started before the key was set: it
    reaches the workers with the shards), each run with a request cache of its own; Ray again on
    the Ray run's cache; then respond alone again, with a budget it passes, and with a key the
    server refuses."""
    monkeypatch.setenv("CURATE_GEN_KEY", KEY)
    with FakeLLM(responder=responder, latency=0.02) as server:
        evol = llm(server, seeds=20, rounds=2, concurrency=2, prices={"input": 1.0, "output": 2.0})
        respond = llm(server, concurrency=2)
        inputs = [
            {"path": str(shared_data / RAW), "name": "alpaca"},
            {"path": str(shared_data / "raw/instructionwild_v2_user_3.jsonl.gz"), "name": "wild"},
        ]
        stages = [
            {"normalize": {"system_prompt": "You are a helpful assistant."}},
            {"filter": {"keep_prompt_only": True}},
            {"evol": evol},
            {"respond": respond},
            {"blend": {}},
        ]

        def run(respond_options: dict, out: str, cache: str, engine):
            stages[3] = {"respond": {**respond, **respond_options}}
            monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / cache))
            return run_recipe(
                load_recipe(write_recipe(tmp_path, stages, inputs)), tmp_path / out, engine=engine
            )

        local = run({}, "local", "cache-local", LocalEngine(workers=1))
        sent = server.requests
        on_ray = run({}, "ray", "cache-ray", RayEngine(generation_workers=2))
        assert_same_version(local, on_ray)  # the version, and every stage's report and LLM usage
        assert server.requests == 2 * sent
        first_version = on_ray.manifest["version"]
        first = {s["name"]: s for s in on_ray.manifest["stages"]}
        made = first["evol"]["report"]
        assert made["seeds"] == 20 and made["kept"] > 10 and made["eliminated"] and made["failed"] == 0
        assert first["respond"]["report"]["prompts"] == 198 and first["respond"]["llm"]["failed"] == 0
        # two workers sent at once, never more than 2 x 2 requests in flight
        assert 2 < most_in_flight(server.log[sent:]) <= 4

        # again on Ray, in a new output folder: every answer from the request cache the workers wrote
        again = run({}, "again", "cache-ray", RayEngine(generation_workers=2))
        assert server.requests == 2 * sent
        assert again.manifest["version"] == local.manifest["version"]
        for name in ("data.parquet", "dropped.parquet", "train.jsonl", "edits.parquet"):
            assert (again.folder / name).read_bytes() == (local.folder / name).read_bytes()
        for stage in ("evol", "respond"):
            usage = next(s for s in again.manifest["stages"] if s["name"] == stage)["llm"]
            assert usage["requests"] == 0 and usage["cached"] >= first[stage]["llm"]["answered"] > 0

        # respond with a budget of 150 requests, on fresh caches (evol comes from the stage cache):
        # one budget over both workers, the first 150 requests in order, as the local engine sends
        budget = {"budget": {"requests": 150, "allow_partial": True}}
        local = run(budget, "local", "cache-budget-local", LocalEngine(workers=1))
        sent = server.requests
        on_ray = run(budget, "ray", "cache-budget-ray", RayEngine(generation_workers=2))
        assert local.manifest["parent"] == on_ray.manifest["parent"] == first_version
        # the same manifests but for where their parents are (each output folder's first version)
        assert_same_version(
            *(dataclasses.replace(r, manifest={**r.manifest, "parent_path": None}) for r in (local, on_ray))
        )
        assert server.requests - sent == 150
        spent = next(s for s in on_ray.manifest["stages"] if s["name"] == "respond")
        assert spent["llm"]["answered"] == 150 and spent["llm"]["budget_exhausted"] is True
        # 198 prompts, two of them alike (one request): the first 150 requests answer 151 prompts
        assert spent["report"]["unsent_budget"] == spent["llm"]["unsent"] == 47
        assert spent["dropped"]["unanswered"] >= 47

        # a key refused in a worker ends the run with curate's message, not Ray's wrapper
        server.faults.extend([{"status": 401, "message": "Incorrect API key"}] * 8)
        with pytest.raises(CurateError, match=r"was refused \(401\): check CURATE_GEN_KEY") as refused:
            run({"max_tokens": 100}, "ray", "cache-refused", RayEngine(generation_workers=2))
        assert type(refused.value) is CurateError and "Incorrect API key" in refused.value.message
        assert len(list((tmp_path / "ray").glob("v*"))) == 2


class InProcessShuffle:
    """The Shuffle contract without Ray: every part (or earlier result) emitted, rows split by key,
    each share reduced."""

    def __init__(self, partitions: int = 3) -> None:
        self.partitions = partitions

    def __call__(self, rows, columns, emit, reduce) -> pa.Table:
        if isinstance(rows, pa.Table):
            keyed = emit(rows, 0)
        else:
            keyed = pa.concat_tables(
                emit(read_part(p.path, columns), int(start))
                for p, start in zip(rows.parts, rows.starts, strict=False)
            )
        share = keyed["key"].to_numpy() % np.uint64(self.partitions)
        return pa.concat_tables(reduce(keyed.filter(pa.array(share == i))) for i in range(self.partitions))

    def collect(self, result: pa.Table) -> pa.Table:
        return result

    def total(self, result: pa.Table, column: str) -> int:
        return int(pc.sum(result[column]).as_py() or 0)


@pytest.fixture(scope="module")
def two_sources(shared_data: Path, tmp_path_factory) -> pa.Table:
    """Two code instruction sets, normalized, then near copies of some of their records: a word
    added to every turn, in a third source (a copy across sources) or in their own (within)."""
    out = tmp_path_factory.mktemp("two-sources")
    inputs = [{"path": "raw/code_alpaca_2k.json.gz"}, {"path": "raw/new_codealpaca.json.gz"}]
    recipe = recipe_from_dict({"name": "two", "inputs": inputs, "stages": [{"normalize": {}}]}, shared_data)
    table = pl.read_parquet(run_recipe(recipe, out, engine=LocalEngine(workers=1)).folder / "data.parquet")
    table = table.to_arrow()
    copies = []
    for i, record in enumerate(table.slice(0, 3000).to_pylist()):
        for m in record["messages"]:
            m["content"] = (m["content"] or "") + " again"
        if i % 2:
            record["source"] = {**record["source"], "name": "copies"}
        copies.append(record)
    return pa.concat_tables([table, pa.Table.from_pylist(copies, schema=table.schema)])


@pytest.mark.parametrize("scope", ["all", "within_source", "across_sources"])
@pytest.mark.parametrize("verify", ["none", "estimate", "exact"])
def test_shuffled_buckets_make_the_clusters_of_one_process(
    two_sources: pa.Table, shared_data: Path, tmp_path: Path, scope: str, verify: str
):
    """dedup decided with a shuffle (here in this process) drops the same records with the same
    evidence as dedup sorting every bucket itself, for every scope and check (and both ways to
    choose the kept record)."""
    minhash = MinHashConfig(threshold=0.6, num_perm=64, verify=verify)
    keep = "longest" if verify == "estimate" else "first"
    config = DedupConfig(key="user", exact=False, scope=scope, minhash=minhash, keep=keep)
    stage = DedupStage(config, StageContext(base_dir=shared_data))
    record_parts, feature_parts = [], []
    for i, lo in enumerate(range(0, two_sources.num_rows, 1000)):
        batch = two_sources.slice(lo, 1000)
        record_parts.append(write_part(tmp_path / f"records-{i}.arrow", batch))
        feature_parts.append(write_part(tmp_path / f"features-{i}.arrow", stage.features(batch)))
    records, features = RecordFiles(record_parts), RecordFiles(feature_parts)
    here = apply_decisions("dedup", two_sources, stage.process(FeatureTable(features, records)))
    shuffled = stage.process(FeatureTable(features, records, InProcessShuffle()))
    shuffled = apply_decisions("dedup", two_sources, shuffled)
    assert here.dropped.num_rows > 50
    assert shuffled.dropped.equals(here.dropped)
    assert shuffled.kept.equals(here.kept)


def _graph(seed: int) -> tuple[pa.Table, dict[int, int]]:
    """Edges of chains (the worst case for label propagation: one round per link), stars, cycles,
    isolated pairs and a few random clumps, on sparse node numbers, each edge in a random direction
    and some twice; and the lowest node of each node's component, by networkx."""
    import networkx as nx

    rng = np.random.default_rng(seed)
    labels = iter(rng.choice(10**9, 40_000, replace=False))
    graph = nx.Graph()
    ascending = sorted(next(labels) for _ in range(2_000))  # one chain whose labels rise along it
    nx.add_path(graph, ascending)
    for length in (2_000, 500, 50, 3):
        nx.add_path(graph, [next(labels) for _ in range(length)])
    for size in (1_000, 20, 2):
        nx.add_star(graph, [next(labels) for _ in range(size)])
    for size in (300, 3):
        nx.add_cycle(graph, [next(labels) for _ in range(size)])
    for _ in range(500):
        graph.add_edge(next(labels), next(labels))
    for _ in range(5):
        clump = [next(labels) for _ in range(40)]
        graph.add_edges_from(zip(rng.choice(clump, 120), rng.choice(clump, 120), strict=True))
    graph.remove_edges_from(nx.selfloop_edges(graph))
    edges = np.array(graph.edges(), np.int64)
    flip = rng.random(len(edges)) < 0.5
    edges[flip] = edges[flip][:, ::-1]
    edges = np.concatenate([edges, edges[rng.random(len(edges)) < 0.1]])
    edges = edges[rng.permutation(len(edges))]
    lowest = {int(n): int(min(c)) for c in nx.connected_components(graph) for n in c}
    return pa.table({"left": edges[:, 0], "right": edges[:, 1]}), lowest


@pytest.mark.parametrize("engine", ["in_process", "ray"])
def test_components_in_shuffles_are_networkx_components(engine: str, tmp_path: Path, request):
    """Large-star and small-star rounds give every node with an edge its component's lowest node,
    as networkx does, in few rounds even on a chain of 2,000 links; nodes without edges are absent."""
    edges, lowest = _graph(seed=7)
    parts = [
        write_part(tmp_path / f"edges-{i}.arrow", edges.slice(lo, 4_000))
        for i, lo in enumerate(range(0, edges.num_rows, 4_000))
    ]
    if engine == "ray":
        request.getfixturevalue("cluster")
        shuffle = RayEngine().shuffler()  # the engine's settings: the sort shuffle, 2 partitions a CPU
    else:
        shuffle = InProcessShuffle(4)
    stars, rounds = lsh_shuffle.components(shuffle, RecordFiles(parts))
    stars = shuffle.collect(stars).filter(pc.field("left") >= 0)
    node, root = stars["left"].to_numpy(), stars["right"].to_numpy()
    assert np.unique(node).size == node.size  # one edge per node that is not its star's centre
    found = {int(r): int(r) for r in root} | dict(zip(node.tolist(), root.tolist(), strict=True))
    assert found == lowest
    assert rounds <= 25, rounds


def test_without_ray_the_engine_says_how_to_install_it(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"inputs": [str(EXAMPLES / "raw")], "stages": [{"normalize": {}}]}))
    code = "import sys; sys.modules['ray'] = None; from curate.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "run", str(recipe), "--engine", "ray"], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "the ray engine needs Ray, which is not installed" in done.stderr + done.stdout
    assert "pip install 'curate[ray]'" in done.stderr + done.stdout
    assert not (tmp_path / "runs").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_curate_run_joins_a_cluster_of_two_nodes_by_address(shared_data: Path, tmp_path: Path):
    """`ray start --head` and a second node on 127.0.0.1, then `curate run --engine ray --address`."""
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", "--block"]
    # a folder of its own (a short path: Ray's socket paths must fit 107 bytes), so that its address
    # is not left in /tmp/ray for later `ray.init()` calls on this machine
    ray_tmp = tempfile.mkdtemp(prefix="curate-ray-", dir="/tmp")
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            f"--port={port}",
            f"--temp-dir={ray_tmp}",
            "--include-dashboard=false",
            *common,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = subprocess.Popen(
        ["ray", "start", f"--address=127.0.0.1:{port}", *common],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        recipe_file = tmp_path / "recipe.yaml"
        recipe_file.write_text(
            yaml.safe_dump(
                {
                    "name": "nodes",
                    "engine": "ray",
                    "inputs": [{"path": str(shared_data / "raw/new_codealpaca.json.gz")}],
                    "eval_sets": [{"name": "gsm8k", "path": str(shared_data / "eval/gsm8k_test.jsonl.gz")}],
                    "stages": [
                        {"normalize": {}},
                        {"filter": {}},
                        {"dedup": {"minhash": True}},
                        {"decontaminate": {}},
                    ],
                }
            )
        )
        _wait_for_nodes(f"127.0.0.1:{port}", env, 2)
        done = subprocess.run(
            [sys.executable, "-m", "curate", "run", str(recipe_file), "--address", f"127.0.0.1:{port}"]
            + ["--json", "--out", str(tmp_path / "ray")],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        printed = json.loads(done.stdout)
        assert printed["this_run"]["engine"] == "ray"
        local = run_recipe(load_recipe(recipe_file), tmp_path / "local", engine=LocalEngine(workers=1))
        on_ray = RunResult(Path(printed["path"]), read_manifest(Path(printed["path"])), printed["this_run"])
        assert_same_version(local, on_ray)
    finally:
        for node in (worker, head):
            node.terminate()  # `ray start --block` stops its node's processes as it exits
        for node in (worker, head):
            node.wait(timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_for_nodes(address: str, env: dict, count: int) -> None:
    """Until the cluster at `address` has `count` live nodes (asked from a process of its own)."""
    code = (
        f"import ray, logging; ray.init(address={address!r}, logging_level=logging.ERROR, "
        "log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    )
    alive = 0
    for _ in range(120):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        alive = int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else 0
        if alive >= count:
            return
        time.sleep(1)
    raise AssertionError(f"the cluster at {address} has {alive} live nodes, not {count}")
