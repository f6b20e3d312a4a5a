"""blend: keep at least a minimum share of real records, whatever the generating stages made.

Synthetic data drowns real data easily: one evol round over every record doubles the set. blend
counts real and synthetic records (the `origin` column) and, when the real share is below
`min_real_fraction` (0.2 at least, by the mission's rule), drops synthetic records (reason
`real_share`) until it is not. Which synthetic records go is decided by a seeded hash of their
ids, so the same run drops the same ones. With no real records at all no share can be met and the
run fails. The manifest's stage report gives the mix per source and origin before and after.
`curate validate` refuses a recipe whose generating stages have no blend after them, and the
runner refuses to write a version whose real share is below the minimum.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from xxhash import xxh3_64_intdigest

from curate.dataset import FeatureTable
from curate.errors import CurateError
from curate.stages.base import Decisions, GlobalStage, option, register

MIN_REAL_FRACTION = 0.2


@dataclass
class BlendConfig:
    min_real_fraction: float = option(
        MIN_REAL_FRACTION,
        help="Least share of real records in the version (0.2 at least); synthetic ones are down-sampled.",
        minimum=MIN_REAL_FRACTION,
        maximum=1.0,
    )
    seed: int | None = option(None, help="Seed of which synthetic records go; empty: the recipe's seed.")


@register
class BlendStage(GlobalStage):
    """Keep at least min_real_fraction real records (seeded)."""

    name = "blend"
    Config = BlendConfig
    compiles = False

    def features(self, batch: pa.Table) -> pa.Table:
        names = pc.fill_null(pc.struct_field(batch["source"], "name"), "")
        return pa.table({"id": batch["id"], "origin": batch["origin"], "source_name": names})

    def process(self, table: FeatureTable) -> Decisions:  # type: ignore[override]
        cfg = self.config
        decisions = Decisions(table.num_rows)
        synthetic = np.array([o == "synthetic" for o in table.column("origin").to_pylist()], np.bool_)
        real = int((~synthetic).sum())
        made = int(synthetic.sum())
        allowed = (
            made
            if made == 0
            else int(np.floor(real * (1 - cfg.min_real_fraction) / cfg.min_real_fraction + 1e-9))
        )
        if made and real == 0:
            raise CurateError(
                f"blend: no real records to blend {made:,} synthetic ones with (min_real_fraction "
                f"{cfg.min_real_fraction:g})",
                hint="add real data to the inputs, or check what dropped it (curate show VERSION --dropped)",
            )
        sources = table.column("source_name").to_pylist()
        before = _mix(sources, synthetic)
        if made > allowed:
            seed = self.context.seed if cfg.seed is None else cfg.seed
            rows = np.flatnonzero(synthetic)
            ids = table.column("id").to_pylist()
            rank = np.array([xxh3_64_intdigest(ids[r].encode(), seed=seed) for r in rows], np.uint64)
            gone = np.sort(rows[np.argsort(rank, kind="stable")[allowed:]])
            evidence = {
                "real": real,
                "synthetic": made,
                "synthetic_kept": allowed,
                "min_real_fraction": cfg.min_real_fraction,
            }
            decisions.drop_many(gone, "real_share", [evidence] * gone.size)
            synthetic[gone] = False
            keep = np.ones(len(sources), np.bool_)
            keep[gone] = False
            after = _mix([s for s, k in zip(sources, keep, strict=True) if k], synthetic[keep])
        else:
            after = before
        kept_made = min(made, allowed)
        decisions.report = {
            "real": real,
            "synthetic_in": made,
            "synthetic_kept": kept_made,
            "real_share": round(real / (real + kept_made), 6) if real + kept_made else None,
            "min_real_fraction": cfg.min_real_fraction,
            "mix_before": before,
            "mix_after": after,
        }
        return decisions


def _mix(sources: list[str], synthetic: np.ndarray) -> dict:
    """{source name: {"real": n, "synthetic": n}}."""
    counts: dict[str, Counter] = {}
    for name, made in zip(sources, synthetic.tolist(), strict=True):
        counts.setdefault(name, Counter())["synthetic" if made else "real"] += 1
    return {name: {"real": c["real"], "synthetic": c["synthetic"]} for name, c in sorted(counts.items())}
