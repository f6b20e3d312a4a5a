"""One process per GPU for `curate ablate` on several GPUs: it trains run after run on one loaded base.

The ablation (curate.train.ablation.schedule) starts a worker per device, each seeing only its device
(CUDA_VISIBLE_DEVICES), and gives every worker the whole list of runs to do. Workers claim runs in
order (a claim file created exclusively, so each run is trained once), so a device that finishes early
takes the next run. A worker loads the base once and gives each run a fresh adapter, as one process
does on one GPU, so the figures are the same and the base's load and "before" measurements are paid
once per device instead of once per run. Each run's output goes to its own train.log.

  python -m curate.train.device_worker JOB.json
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from curate.errors import CurateError
from curate.versions import write_atomic


def claim(folder: Path) -> bool:
    """True for the one worker that claims this run (the claim file did not exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / "claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors 1 and 2, so the libraries' output too) go to
    `path` inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def work(job: dict) -> int:
    """Train every run this worker claims; 1 (and no more claims) after a failed run, else 0."""
    from curate.train.session import BaseModels
    from curate.train.trainer import run_training

    stop = Path(job["stop"])
    bases = BaseModels(Path(job["base_cache"]))
    for _name, version, seed, folder in job["runs"]:
        folder = Path(folder)
        if stop.exists() or not claim(folder):
            continue
        stamp = {"device": job["device"], "process": os.getpid(), "started": time.time()}
        write_atomic(folder / "device.json", json.dumps(stamp))  # the ablation reads it meanwhile
        failed = False
        with output_to(folder / "train.log"):
            try:
                settings = {**job["settings"], "seed": seed}
                run_training(job["train"], version, folder, settings, show_progress=False, bases=bases)
            except CurateError as exc:
                print(f"error: {exc}")  # its hint included, as the CLI prints it
                failed = True
            except Exception:
                traceback.print_exc()
                failed = True
        write_atomic(folder / "device.json", json.dumps({**stamp, "ended": time.time(), "failed": failed}))
        if failed:
            stop.touch()  # the other workers finish their current run and claim no more
            return 1
    return 0


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(work(json.loads(Path(sys.argv[1]).read_text())))


if __name__ == "__main__":
    main()
