"""`curate ablate SPEC`: train one recipe on several dataset versions (arms) and seeds, on an equal
token budget, and say which arm is better, by how much, with the noise shown.

Every arm is judged on the same items: the spec's eval sets (a frozen set from `curate freeze`,
benchmarks) go into every run, and each item's own loss is kept, so arms are compared item by item:
the difference of the per-item losses (averaged over seeds) against the baseline arm, with a paired
bootstrap interval over items. An interval wholly below zero is "better", wholly above "worse",
else "no detectable difference". Before judging, every arm's version is checked for exact copies of
the eval items: an arm that trained on eval items is flagged, the items are named, their loss is
shown beside the clean items', and memorisation is measured as how much more the trained items
gained over the baseline than the clean ones did (each item against itself, so hard and easy items do
not pass for a gap). The arm is judged again on the clean items alone, so a "win" bought by
contamination is called what it is.

Finished runs (a metrics.json in their folder) are not run again: an interrupted ablation resumes.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from curate.errors import CurateError, RecipeError

_ARM = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "version"],
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"}, "version": {"type": "string"}},
}
SPEC_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["train", "arms"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "train": {"type": "string", "description": "The training recipe every arm runs."},
        "arms": {"type": "array", "minItems": 2, "items": _ARM},
        "baseline": {
            "type": "string",
            "description": "The arm the others are compared with (default: first).",
        },
        "seeds": {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            ],
            "description": "How many seeds (0, 1, ...) or which; default 3.",
        },
        "tokens": {
            "type": ["integer", "null"],
            "minimum": 1,
            "description": "Training tokens per run (default: the smallest arm's one epoch).",
        },
        "eval_sets": {"type": "array", "items": {"type": "object"}, "description": "Judged on these."},
        "set": {"type": "object", "description": "Overrides of the training recipe (dotted keys)."},
        "bootstrap": {"type": "integer", "minimum": 100, "default": 2000},
        "out": {"type": "string"},
    },
}


@dataclass
class Spec:
    name: str
    train: Path
    arms: list[tuple[str, Path]]
    baseline: str
    seeds: list[int]
    tokens: int | None
    eval_sets: list[dict] | None
    overrides: dict
    bootstrap: int
    out: Path
    base_dir: Path = field(default_factory=Path.cwd)


def load_spec(path: str | Path, out: str | Path | None = None) -> Spec:
    """A checked ablation spec; paths resolve against its folder."""
    import jsonschema

    path = Path(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    errors = sorted(jsonschema.Draft202012Validator(SPEC_SCHEMA).iter_errors(raw), key=lambda e: list(e.path))
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise RecipeError(
            f"ablation spec {path}, {where}: {errors[0].message}", hint="see curate ablate --help"
        )
    base = path.parent.resolve()
    arms = [(a["name"], (base / a["version"]).resolve()) for a in raw["arms"]]
    names = [n for n, _ in arms]
    if len(set(names)) != len(names):
        raise RecipeError(f"ablation spec {path}: arm names must be unique, got {names}")
    baseline = raw.get("baseline", names[0])
    if baseline not in names:
        raise RecipeError(f"ablation spec {path}: baseline {baseline!r} is not an arm ({', '.join(names)})")
    seeds = raw.get("seeds", 3)
    eval_sets = raw.get("eval_sets")
    if eval_sets is not None:  # absolute, so the training recipe (elsewhere) finds them
        eval_sets = [{**e, "path": str((base / e["path"]).resolve())} for e in eval_sets]
    return Spec(
        name=raw.get("name", path.stem),
        train=(base / raw["train"]).resolve(),
        arms=arms,
        baseline=baseline,
        seeds=list(range(seeds)) if isinstance(seeds, int) else list(seeds),
        tokens=raw.get("tokens"),
        eval_sets=eval_sets,
        overrides=dict(raw.get("set") or {}),
        bootstrap=int(raw.get("bootstrap", 2000)),
        out=Path(out).resolve() if out else (base / raw.get("out", f"runs/ablations/{path.stem}")).resolve(),
        base_dir=base,
    )


# the statistics ------------------------------------------------------------------------------------


def paired_interval(arm: np.ndarray, base: np.ndarray, resamples: int, seed: int = 0) -> dict:
    """Mean of arm - base over paired items, and a 95% percentile bootstrap interval.

    `arm` and `base` are each item's loss, one row per seed (seeds x items; a 1-D array is one seed).
    Each resample draws the items with replacement (the same draw for both sides: the pairing) and,
    for each side apart, its seeds with replacement, so the interval holds the seed-to-seed noise as
    well as the items': two arms trained on the same data do not come out "different" because one
    seed's data order happened to suit a few items."""
    arm2, base2 = np.atleast_2d(np.asarray(arm, np.float64)), np.atleast_2d(np.asarray(base, np.float64))
    items = arm2.shape[1]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, items, size=(resamples, items))
    diff = _seed_means(arm2, rng, resamples) - _seed_means(base2, rng, resamples)
    means = np.take_along_axis(diff, draws, axis=1).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    mean = float(arm2.mean() - base2.mean())
    return {"mean": mean, "low": float(low), "high": float(high), "items": items, "seeds": arm2.shape[0]}


def _seed_means(losses: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Per resample, each item's loss averaged over seeds drawn with replacement (resamples x items)."""
    picked = rng.integers(0, losses.shape[0], size=(resamples, losses.shape[0]))
    return losses[picked].mean(axis=1)


def memorisation_interval(
    arm: np.ndarray, base: np.ndarray, trained: np.ndarray, resamples: int, seed: int = 0
) -> dict:
    """How much more an arm gained (arm - base, lower is better) on the eval items it trained on than
    on the clean ones, with a 95% bootstrap interval: items drawn with replacement within each group,
    seeds within each side. Comparing the trained items' loss with the clean items' own loss would
    confound memorisation with how hard the items are; against the baseline on the same items, each
    item is its own control. `trained` marks the trained items (a boolean per item)."""
    arm2, base2 = np.atleast_2d(np.asarray(arm, np.float64)), np.atleast_2d(np.asarray(base, np.float64))
    trained = np.asarray(trained, bool)
    dirty, clean = np.flatnonzero(trained), np.flatnonzero(~trained)
    rng = np.random.default_rng(seed)
    diff = _seed_means(arm2, rng, resamples) - _seed_means(base2, rng, resamples)  # (resamples, items)
    on_dirty = np.take_along_axis(diff, rng.choice(dirty, size=(resamples, dirty.size)), axis=1)
    on_clean = np.take_along_axis(diff, rng.choice(clean, size=(resamples, clean.size)), axis=1)
    low, high = np.percentile(on_dirty.mean(axis=1) - on_clean.mean(axis=1), [2.5, 97.5])
    gain = (arm2 - base2).mean(axis=0)
    mean = float(gain[dirty].mean() - gain[clean].mean())
    return {"mean": mean, "low": float(low), "high": float(high), "trained": dirty.size, "clean": clean.size}


def verdict(interval: dict) -> str:
    """For a loss difference (arm - baseline): lower is better."""
    if interval["high"] < 0:
        return "better"
    if interval["low"] > 0:
        return "worse"
    return "no detectable difference"


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "seeds": len(values),
    }


# running -------------------------------------------------------------------------------------------


def one_epoch_tokens(spec: Spec, version: Path, overrides: dict, work: Path) -> int:
    """Tokens of one pass over a version's training split, as the trainer encodes it."""
    from curate.train.data import load_version
    from curate.train.model import load_tokenizer, resolve_base
    from curate.train.recipe import load_recipe
    from curate.train.trainer import _encode_splits, resolve_template, template_object

    recipe = load_recipe(spec.train, overrides)
    loaded = load_version(version)
    base = resolve_base(recipe, work / ".base")
    template = resolve_template(recipe, loaded, base.tokenizer_path)
    tokenizer, _ = load_tokenizer(base.tokenizer_path, template)
    train_rows = _encode_splits(recipe, loaded, tokenizer, template_object(template, tokenizer))[0]
    return sum(len(r["input_ids"]) for r in train_rows)


def default_devices() -> list[str]:
    """One entry per GPU when there are several (a run each at a time), else none: runs go in this
    process, one after another."""
    import torch

    count = torch.cuda.device_count()
    return [str(i) for i in range(count)] if count > 1 else []


def run_ablation(spec: Spec, show_progress: bool = True, say=print, devices: list[str] | None = None) -> dict:
    """Every arm and seed trained (or found finished), then compared; writes report.json, report.md,
    report.html and ablation.png under spec.out and returns the report. With `devices` (CUDA device ids), each
    device trains one run at a time in a process of its own, as many at once as there are devices."""
    import time

    from curate.train.session import BaseModels
    from curate.train.trainer import run_training

    started = time.perf_counter()
    devices = default_devices() if devices is None else devices
    spec.out.mkdir(parents=True, exist_ok=True)
    overrides = dict(spec.overrides)
    if spec.eval_sets is not None:
        overrides["eval_sets"] = spec.eval_sets
    tokens = spec.tokens
    if tokens is None:
        counts = {name: one_epoch_tokens(spec, version, overrides, spec.out) for name, version in spec.arms}
        tokens = min(counts.values())
        say(f"equal budget: {tokens:,} training tokens per run (one epoch of the smallest arm; {counts})")
    todo = []
    for name, version in spec.arms:
        for seed in spec.seeds:
            folder = spec.out / name / f"seed-{seed}"
            if (folder / "metrics.json").is_file():
                say(f"{name} seed {seed}: finished earlier, not run again")
            else:
                todo.append((name, version, seed, folder))
    settings = {**overrides, "max_tokens": tokens}
    if len(devices) > 1 and todo:
        schedule(spec, todo, settings, devices, say)
    else:  # in this process, on one loaded base: each run adds a fresh adapter and takes it off after
        bases = BaseModels(spec.out / ".base")
        for name, version, seed, folder in todo:
            say(f"{name} seed {seed}: training on {version}")
            run_training(spec.train, version, folder, {**settings, "seed": seed}, show_progress, bases=bases)
        bases.drop()
    runs = {
        name: [
            json.loads((spec.out / name / f"seed-{seed}" / "metrics.json").read_text()) for seed in spec.seeds
        ]
        for name, _ in spec.arms
    }
    checks: dict[str, Any] = {}  # one index per distinct list of eval sets, shared by the arms
    contamination = {name: contaminated_items(version, spec, checks) for name, version in spec.arms}
    report = compare(spec, runs, contamination, tokens)
    report["devices"] = {
        name: [_placement(spec.out / name / f"seed-{seed}") for seed in spec.seeds] for name, _ in spec.arms
    }
    report["runs"] = {  # where the time went, run by run
        name: [
            {
                "seed": seed,
                **{k: m.get(k) for k in ("wall_seconds", "train_seconds", "tokens_per_second", "seconds")},
            }
            for seed, m in zip(spec.seeds, runs[name], strict=True)
        ]
        for name, _ in spec.arms
    }
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    say(f"ablation done in {report['wall_seconds']:.1f} s (runs finished earlier not counted)")
    (spec.out / "report.json").write_text(json.dumps(report, indent=1))
    (spec.out / "report.md").write_text(markdown(report))
    plot(report, spec.out / "ablation.png")
    (spec.out / "report.html").write_text(html_page(report, spec.out / "ablation.png"))
    return report


def schedule(spec: Spec, todo: list[tuple], settings: dict, devices: list[str], say) -> None:
    """Runs spread over devices: one worker process per device (curate.train.device_worker) that sees
    only that device (CUDA_VISIBLE_DEVICES) and trains run after run on one loaded base, taking the
    next unclaimed run when it is free. A failed run stops the ablation once the runs in flight have
    finished (their results stay, and a re-run resumes)."""
    import os
    import shutil
    import subprocess
    import sys

    workers = spec.out / ".workers"
    shutil.rmtree(workers, ignore_errors=True)  # an interrupted ablation's claims and stop sign
    workers.mkdir(parents=True)
    for *_, folder in todo:
        (folder / "claim").unlink(missing_ok=True)
        (folder / "device.json").unlink(missing_ok=True)
    job = {
        "train": str(spec.train),
        "settings": settings,
        "runs": [[name, str(version), seed, str(folder)] for name, version, seed, folder in todo],
        "stop": str(workers / "stop"),
    }
    busy: dict[str, tuple] = {}  # device -> (process, log)
    used = devices[: len(todo)]
    # the workers share this host's cores: each would otherwise start a thread per core (OpenMP, MKL)
    # for its CPU work, and N workers' threads contending for the cores slow every one of them (two
    # CPU stand-in workers on 2 cores: 169 s, 19 s with one thread each). Each gets its share, unless
    # OMP_NUM_THREADS is set (torchrun, too, sets it)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // len(used)))
    try:
        for device in used:
            path = workers / f"device-{device}.json"
            cache = workers / f"base-{device}"  # two workers never convert a llama2.c base into one folder
            path.write_text(json.dumps({**job, "device": device, "base_cache": str(cache)}))
            log = open(workers / f"device-{device}.log", "w")  # noqa: SIM115 - closed when the worker ends
            command = [sys.executable, "-m", "curate.train.device_worker", str(path)]
            env = {"OMP_NUM_THREADS": threads, **os.environ, "CUDA_VISIBLE_DEVICES": device}
            busy[device] = (subprocess.Popen(command, env=env, stdout=log, stderr=log), log)
        _watch(todo, busy, workers, say)
    finally:  # interrupted (Ctrl-C, an error here): no training process is left running
        for process, log in busy.values():
            process.terminate()
            process.wait()
            log.close()
    failed = [run for run in todo if (_placement(run[3]) or {}).get("failed")]
    if failed:
        name, _, seed, folder = failed[0]
        tail = (folder / "train.log").read_text()[-1500:]
        raise CurateError(
            f"ablation run {name} seed {seed} failed; its log: {folder / 'train.log'}\n{tail}",
            hint="fix the cause and run curate ablate again: finished runs are kept",
        )
    lost = [run for run in todo if not (run[3] / "metrics.json").is_file()]
    if lost:  # a worker died outside a run (killed, out of memory): its own log says why
        logs = ", ".join(str(p) for p in sorted(workers.glob("device-*.log")))
        raise CurateError(
            f"{len(lost)} ablation runs did not finish, the first {lost[0][0]} seed {lost[0][2]}",
            hint=f"the device workers' logs: {logs}; run curate ablate again to resume",
        )


def _watch(todo: list[tuple], busy: dict, workers: Path, say) -> None:
    """Say which run starts on which device, until every worker has ended; a failed worker puts up
    the stop sign so the others claim no more runs."""
    import time

    told: set[int] = set()
    while any(process.poll() is None for process, _ in busy.values()):
        for i, (name, _, seed, folder) in enumerate(todo):
            placed = _placement(folder) if i not in told else None
            if placed:
                told.add(i)
                say(f"{name} seed {seed}: training on device {placed['device']}")
        if any(process.poll() not in (None, 0) for process, _ in busy.values()):
            (workers / "stop").touch()
        time.sleep(0.2)


def _placement(folder: Path) -> dict | None:
    """Which device and worker process trained a run, when, and whether it failed (None: it ran in the
    ablation's own process)."""
    stamp = folder / "device.json"
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def contaminated_items(version: Path, spec: Spec, checks: dict[str, Any]) -> list[dict]:
    """{eval_set, eval_id, record} of every eval item an arm's version holds an exact copy of. `checks`
    keeps the eval-item index of each list of eval sets, built once for every arm judged on it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.contamination import EvalCopies
    from curate.train.data import load_version
    from curate.train.recipe import load_recipe
    from curate.versions import resolve_version

    sets, base = spec.eval_sets, spec.base_dir
    if sets is None:  # the sets the runs were judged on: the training recipe's, else the version's
        recipe = load_recipe(spec.train, spec.overrides)
        if recipe.eval_sets is not None:
            sets, base = recipe.eval_sets, recipe.base_dir
        else:
            loaded = load_version(version)
            sets, base = loaded.eval_sets, loaded.eval_base_dir
    if not sets:
        return []
    key = json.dumps([sets, str(base)], sort_keys=True, default=str)
    check = checks.get(key)
    if check is None:
        check = checks[key] = EvalCopies(sets, base)
    table = pq.read_table(resolve_version(version) / "data.parquet", columns=["id", "messages"])
    return [
        {"eval_set": c["eval_set"], "eval_id": str(c["eval_id"]), "record": c["id"]}
        for batch in table.to_batches(8192)
        for c in check.find(pa.Table.from_batches([batch]))
    ]


def compare(
    spec: Spec, runs: dict[str, list[dict]], contamination: dict[str, list[dict]], tokens: int
) -> dict:
    """The report: gates per arm (mean and spread over seeds), per eval set each arm's per-item loss
    against the baseline's (paired bootstrap interval, verdict), and contamination."""
    arms = [name for name, _ in spec.arms]
    gates: dict[str, dict] = {}
    for name in arms:
        values: dict[str, list[float]] = {}
        for metrics in runs[name]:
            for gate in metrics["gates"]["gates"]:
                if isinstance(gate.get("value"), (int, float)):
                    values.setdefault(gate["name"], []).append(float(gate["value"]))
        gates[name] = {k: spread(v) for k, v in values.items()}
    sets = sorted(set.intersection(*(set(m.get("item_losses", {})) for r in runs.values() for m in r)))
    comparisons: dict[str, dict] = {}
    for eval_set in sets:
        per_arm = {name: _item_means(runs[name], eval_set) for name in arms}
        shared = sorted(set.intersection(*(set(v) for v in per_arm.values())))
        by_seed = {name: _seed_item_losses(runs[name], eval_set, shared) for name in arms}
        comparisons[eval_set] = {"items": len(shared), "arms": {}}
        for name in arms:
            entry: dict[str, Any] = {"loss": float(by_seed[name].mean()) if shared else None}
            if name != spec.baseline and shared:
                interval = paired_interval(by_seed[name], by_seed[spec.baseline], spec.bootstrap)
                entry.update(difference=interval, verdict=verdict(interval))
            dirty = {c["eval_id"] for c in contamination[name] if c["eval_set"] == eval_set}
            if dirty & set(shared):
                clean = [i for i in shared if i not in dirty]
                entry["contaminated"] = {
                    "items": sorted(dirty & set(shared)),
                    "loss_contaminated": float(np.mean([per_arm[name][i] for i in shared if i in dirty])),
                    "loss_clean": float(np.mean([per_arm[name][i] for i in clean])) if clean else None,
                }
                if clean and name != spec.baseline:  # judged on the items it did not train on only
                    trained = np.array([i in dirty for i in shared])
                    arm_losses, base_losses = by_seed[name], by_seed[spec.baseline]
                    interval = paired_interval(
                        arm_losses[:, ~trained], base_losses[:, ~trained], spec.bootstrap
                    )
                    entry["contaminated"].update(
                        clean_difference=interval,
                        clean_verdict=verdict(interval),
                        memorisation=memorisation_interval(arm_losses, base_losses, trained, spec.bootstrap),
                    )
            comparisons[eval_set]["arms"][name] = entry
    return {
        "name": spec.name,
        "baseline": spec.baseline,
        "seeds": spec.seeds,
        "tokens_per_run": tokens,
        "tokens_seen": {name: [m["tokens_seen"] for m in runs[name]] for name in arms},
        "gates": gates,
        "comparisons": comparisons,
        "contamination": {name: items for name, items in contamination.items() if items},
        "verdicts": _verdict_lines(spec, comparisons, contamination),
    }


def _item_means(runs: list[dict], eval_set: str) -> dict[str, float]:
    """Each item's loss averaged over the seeds that scored it (all of them, in a finished ablation)."""
    seen: dict[str, list[float]] = {}
    for metrics in runs:
        for item, loss in metrics["item_losses"].get(eval_set, {}).items():
            seen.setdefault(item, []).append(loss)
    return {item: statistics.fmean(v) for item, v in seen.items() if len(v) == len(runs)}


def _seed_item_losses(runs: list[dict], eval_set: str, items: list[str]) -> np.ndarray:
    """Each seed's loss of each item (seeds x items)."""
    return np.array([[metrics["item_losses"][eval_set][i] for i in items] for metrics in runs], np.float64)


def _verdict_lines(spec: Spec, comparisons: dict, contamination: dict) -> list[str]:
    lines = []
    for name, _ in spec.arms:
        if name == spec.baseline:
            continue
        for eval_set, comparison in comparisons.items():
            entry = comparison["arms"][name]
            if "verdict" not in entry:
                continue
            d = entry["difference"]
            line = (
                f"{name} vs {spec.baseline} on {eval_set}: {entry['verdict']} (loss {d['mean']:+.4f}, "
                f"95% interval {d['low']:+.4f} to {d['high']:+.4f}, {d['items']} items)"
            )
            dirty = entry.get("contaminated")
            if dirty:
                items = dirty["items"]
                shown = ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")
                clean = dirty["loss_clean"]
                line += (
                    f"; CONTAMINATED: it trained on {len(items)} of these items ({shown}), whose loss is "
                    f"{dirty['loss_contaminated']:.4f} against {'-' if clean is None else f'{clean:.4f}'} "
                    "for the clean ones"
                )
                if "memorisation" in dirty:
                    line += _memorisation_words(dirty["memorisation"], spec.baseline)
                if "clean_difference" in dirty:
                    c = dirty["clean_difference"]
                    line += (
                        f"; on the {c['items']} items it did not train on: {dirty['clean_verdict']} "
                        f"(loss {c['mean']:+.4f}, 95% interval {c['low']:+.4f} to {c['high']:+.4f})"
                    )
                    if dirty["clean_verdict"] == "better":
                        line += ": data taken from this eval set also taught it the set's kind of item"
                line += ". A result on a set it trained on is not evidence"
            lines.append(line)
    return lines


def _memorisation_words(m: dict, baseline: str) -> str:
    gap = (
        f"(loss against {baseline}'s, trained items minus clean ones: {m['mean']:+.4f}, 95% interval "
        f"{m['low']:+.4f} to {m['high']:+.4f})"
    )
    if m["high"] < 0:
        return f"; memorisation: the items it trained on gained more than the clean ones {gap}"
    return (
        "; no memorisation shows: the items it trained on gained no more than the clean ones, beyond "
        f"noise {gap}"
    )


# output --------------------------------------------------------------------------------------------


def _sections(report: dict) -> list[tuple[str, list[str], list[list]]]:
    """The report's tables as (title, headers, rows), for Markdown and HTML alike."""
    sections = []
    for eval_set, comparison in report["comparisons"].items():
        rows = []
        for name, entry in comparison["arms"].items():
            d = entry.get("difference")
            dirty = len(entry["contaminated"]["items"]) if entry.get("contaminated") else 0
            if d is None:
                rows.append([name, f"{entry['loss']:.4f}", "(baseline)", "", "", dirty])
            else:
                span = f"{d['low']:+.4f} .. {d['high']:+.4f}"
                rows.append(
                    [name, f"{entry['loss']:.4f}", f"{d['mean']:+.4f}", span, entry["verdict"], dirty]
                )
        sections.append(
            (
                f"{eval_set} ({comparison['items']} items, loss per item, lower is better)",
                ["arm", "loss", "vs baseline", "95% interval", "verdict", "contaminated items"],
                rows,
            )
        )
    arms = report["gates"]
    gate_rows = [
        [gate] + [f"{a[gate]['mean']:.4g} ± {a[gate]['sd']:.2g}" if gate in a else "-" for a in arms.values()]
        for gate in sorted({g for arm in arms.values() for g in arm})
    ]
    sections.append(("Gates (mean ± sd over seeds)", ["gate", *arms], gate_rows))
    run_rows = [
        [name, r["seed"], _seconds(r.get("wall_seconds")), _seconds(r.get("train_seconds")),
         f"{r['tokens_per_second']:,.0f}" if r.get("tokens_per_second") else "-",
         _seconds((r.get("seconds") or {}).get("gates"))]
        for name, runs in report.get("runs", {}).items()
        for r in runs
    ]  # fmt: skip
    if run_rows:
        sections.append(("Runs", ["arm", "seed", "wall s", "train s", "tokens/s", "gates s"], run_rows))
    return sections


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _contamination_lines(report: dict) -> list[str]:
    """Per arm, the eval items its training data holds, each named once (an item copied into several
    records is one item; the records are counted apart)."""
    lines = []
    for name, copies in report["contamination"].items():
        items = list(dict.fromkeys(f"{c['eval_set']}:{c['eval_id']}" for c in copies))
        named = ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
        records = f" in {len(copies)} records" if len(copies) != len(items) else ""
        count = f"{len(items)} eval item{'s' if len(items) > 1 else ''}"
        lines.append(f"{name}: {count} in its training data{records} ({named})")
    return lines


def _summary_line(report: dict) -> str:
    return (
        f"Baseline {report['baseline']}; seeds {report['seeds']}; "
        f"{report['tokens_per_run']:,} training tokens per run; "
        f"{report.get('wall_seconds', 0):.0f} s of wall time in the last invocation."
    )


def markdown(report: dict) -> str:
    out = [f"# Ablation: {report['name']}", "", _summary_line(report)]
    out += ["", "## Verdicts", ""] + [f"- {line}" for line in report["verdicts"]] + [""]
    for title, headers, rows in _sections(report):
        numeric = "|".join(
            "---:" if h in ("loss", "vs baseline", "contaminated items") else "---" for h in headers
        )
        out += [f"## {title}", "", "| " + " | ".join(headers) + " |", f"|{numeric}|"]
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]
    if report["contamination"]:
        out += ["## Contamination", ""] + [f"- {line}" for line in _contamination_lines(report)]
    return "\n".join(out) + "\n"


def html_page(report: dict, png: Path | None) -> str:
    """The report as one self-contained page (curate.report.html: no script, no network)."""
    from curate.report.html import esc, image, page, table

    body = [f"<p>{esc(_summary_line(report))}</p>", "<h2>Verdicts</h2>", "<ul>"]
    body += [f"<li>{esc(line)}</li>" for line in report["verdicts"]] + ["</ul>"]
    if png is not None and png.is_file():
        body.append(image(png.read_bytes(), "loss per item by arm and eval set"))
    for title, headers, rows in _sections(report):
        body += [
            f"<h2>{esc(title)}</h2>",
            table(headers, rows, numeric=[1, 2, 5] if "verdict" in headers else []),
        ]
    if report["contamination"]:
        body += ["<h2>Contamination</h2>", "<ul>"]
        body += [f"<li>{esc(line)}</li>" for line in _contamination_lines(report)] + ["</ul>"]
    return page(f"Ablation: {report['name']}", body)


def plot(report: dict, path: Path) -> None:
    """Loss per item by arm and eval set, with each arm's interval against the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(report["comparisons"])
    if not sets:
        return
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 3.6), squeeze=False)
    for ax, eval_set in zip(axes[0], sets, strict=True):
        arms = report["comparisons"][eval_set]["arms"]
        names = list(arms)
        losses = [arms[n]["loss"] for n in names]
        errors = [
            [
                arms[n]["difference"]["mean"] - arms[n]["difference"]["low"] if "difference" in arms[n] else 0
                for n in names
            ],
            [
                arms[n]["difference"]["high"] - arms[n]["difference"]["mean"]
                if "difference" in arms[n]
                else 0
                for n in names
            ],
        ]
        colours = ["tab:red" if "contaminated" in arms[n] else "tab:blue" for n in names]
        ax.bar(names, losses, yerr=errors, color=colours, capsize=4)
        ax.set_title(eval_set)
        ax.set_ylabel("loss per item")
        ax.tick_params(axis="x", labelrotation=25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
