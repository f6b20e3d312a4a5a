"""respond: answer prompt-only records (instruction lists, self-instruct tasks) with an LLM.

A record whose conversation ends on a user turn (the filter keeps such records with
`keep_prompt_only`) gets `samples` answers from the configured provider. Each answer that passes the
checks evol uses (no apology, at least `min_answer_words` words, not cut off) becomes a new record:
origin synthetic, parent_id the prompt's record, provider, model and sample in meta. The prompt
record itself leaves the set: `answered` (evidence: its answers' ids) when an answer was kept,
`unanswered` otherwise (evidence: why), since a prompt without an answer trains nothing. A sample
identical to another (greedy decoding, a cached answer) is rejected as `duplicate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from curate import synthetic
from curate.dataset import FeatureTable
from curate.llm.config import LLMConfig
from curate.llm.engine import Failure, Request, prompt_tokens
from curate.stages.base import Decisions, GeneratingStage, option, register


@dataclass
class RespondConfig(LLMConfig):
    samples: int = option(
        1, help="Answers per prompt (each its own record, its own cached request).", minimum=1
    )
    min_answer_words: int = option(3, help="Answers with fewer words are not kept.", minimum=0)
    drop_cut_off: bool = option(True, help="Do not keep answers that hit max_tokens.")

    def check(self) -> None:
        self.check_llm()


@register
class RespondStage(GeneratingStage):
    """Answer prompt-only records with an LLM."""

    name = "respond"
    Config = RespondConfig

    def features(self, batch: pa.Table) -> pa.Table:
        last = pl.from_arrow(batch.select(["messages"]))["messages"].list.last().struct.field("role")
        return pa.table({"id": batch["id"], "prompt_only": (last == "user").fill_null(False).to_arrow()})

    def _prompts(self, table: FeatureTable) -> tuple[np.ndarray, list[dict]]:
        rows = np.flatnonzero(table.column("prompt_only").to_numpy(zero_copy_only=False))
        return rows, table.records(rows, ["id", "messages", "source", "meta"]).to_pylist()

    def _requests(self, records: list[dict]) -> list[Request]:
        return [
            Request([{"role": m["role"], "content": m["content"] or ""} for m in r["messages"]], sample=s)
            for r in records
            for s in range(self.config.samples)
        ]

    def estimate(self, records: Any) -> dict:
        return self._estimate(self._requests(self._prompts(self.feature_table(records))[1]))

    def _estimate(self, requests: list[Request]) -> dict:
        sizes = [prompt_tokens(r.messages) for r in requests]
        return synthetic.estimate(self.config, sizes, [self.config.max_tokens] * len(requests))

    def process(self, table: FeatureTable) -> Decisions:  # type: ignore[override]
        cfg = self.config
        decisions = Decisions(table.num_rows)
        rows, prompts = self._prompts(table)
        requests = self._requests(prompts)
        expected = self._estimate(requests)
        synthetic.refuse_over_budget(self.name, cfg, expected)
        engine = self.context.llm_engine(cfg)
        self.context.say(f"answering {len(prompts):,} prompts x {cfg.samples}")
        replies = engine.run(requests)
        kept, rejected, failures, first_error = [], [], {"error": 0, "budget": 0}, ""
        seen = set(table.column("id").to_pylist())
        for i, (row, prompt) in enumerate(zip(rows.tolist(), prompts, strict=True)):
            answered, why = [], []
            turns = [(m["role"], m["content"] or "") for m in prompt["messages"]]
            for sample in range(cfg.samples):
                reply = replies[i * cfg.samples + sample]
                if isinstance(reply, Failure):
                    failures[reply.reason] += 1
                    first_error = first_error or (reply.message if reply.reason == "error" else "")
                    why.append(reply.reason if reply.reason == "budget" else f"error: {reply.message[:200]}")
                    continue
                record = synthetic.synthetic_record(
                    [*turns, ("assistant", reply.text.strip())], prompt, "respond", {"sample": sample}, cfg
                )
                problem = synthetic.answer_problem(reply, cfg.min_answer_words, cfg.drop_cut_off)
                if problem is None and record["id"] in seen:  # a sample equal to another (or to a record)
                    problem = ("duplicate", {"id": record["id"]})
                if problem is not None:
                    rejected.append((record, problem[0], {"sample": sample, **problem[1]}))
                    why.append(problem[0])
                    continue
                kept.append(record)
                seen.add(record["id"])
                answered.append(record["id"])
            if answered:
                decisions.drop(row, "answered", {"answers": answered})
            else:
                decisions.drop(row, "unanswered", {"why": why})
        if kept:
            decisions.add(synthetic.records_table(kept))
        if rejected:
            records, reasons, evidence = zip(*rejected, strict=True)
            decisions.reject(synthetic.records_table(list(records)), reasons, evidence)
        decisions.report = {
            "prompts": len(prompts),
            "kept": len(kept),
            "eliminated": {r: reasons.count(r) for r in sorted(set(reasons))} if rejected else {},
            "failed": failures["error"],
            "unsent_budget": failures["budget"],
            "budget_exhausted": engine.usage.budget_exhausted,
            "first_error": first_error,
            "estimate": expected,
            "provider": cfg.provider,
            "model": cfg.model,
        }
        return decisions
