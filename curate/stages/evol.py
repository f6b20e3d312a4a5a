"""evol: Evol-Instruct (WizardLM): grow harder and rarer instructions from real ones with an LLM,
eliminate the evolutions that failed, and answer the ones that survive.

Each chosen record's first user turn evolves for `rounds` rounds. Per record and round the seed
picks one operation by its weight: in depth (add a constraint, deepen, concretize, ask for more
reasoning steps, add input to work on) or in breadth (a new, rarer instruction in the same domain).
Then the elimination step that most tools skip. An evolution is thrown out when it:

- repeats its prompt template (a marker, "rewritten instruction", ...): `copied_prompt`;
- is only punctuation and stop words: `empty_instruction`;
- was cut off at max_tokens (with `drop_cut_off`): `instruction_cut_off`;
- adds no information over its parent (identical text, or the LLM judge finds them the same):
  `no_new_information`;
- gets an answer that is an apology (a decline in under 80 words), has fewer than `min_answer_words`
  words, or is cut off at max_tokens: `refused_answer`, `short_answer`, `answer_cut_off`;
- is a record that exists already: `duplicate`.

Survivors are added as records (origin synthetic, parent_id the record they evolved from, op, round,
provider and model in meta) and evolve further in the next round; an eliminated one is a drop with
its reason and evidence, and its parent tries again with another operation. The prompt templates are
files (curate/llm/prompts/evol_*.txt) that `prompts: FOLDER` overrides one by one.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from xxhash import xxh3_64_intdigest

from curate import synthetic
from curate.dataset import FeatureTable
from curate.llm.config import LLMConfig
from curate.llm.engine import Answer, Failure, Request, estimate_tokens
from curate.stages.base import Decisions, GeneratingStage, option, register
from curate.text.conversation import conversation_text

OPERATIONS = ("constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth")
JUDGE_TOKENS = 8


@dataclass
class EvolConfig(LLMConfig):
    rounds: int = option(1, help="Rounds of evolution per record (WizardLM used 4).", minimum=1, maximum=10)
    seeds: int | None = option(
        None, help="How many records to evolve, chosen by the recipe's seed; empty: every record.", minimum=1
    )
    operations: dict[str, float] = option(
        dict.fromkeys(OPERATIONS, 1.0),
        help=f"Weight of each operation ({', '.join(OPERATIONS)}); one is drawn per record and round.",
    )
    judge: bool = option(
        True,
        help="Ask the LLM whether an evolution adds anything over its parent (else only identical text).",
    )
    min_answer_words: int = option(3, help="Answers with fewer words eliminate their evolution.", minimum=0)
    drop_cut_off: bool = option(True, help="Eliminate evolutions whose instruction or answer hit max_tokens.")
    prompts: str = option("", help="Folder with your own evol_<operation>.txt / evol_judge.txt templates.")

    def check(self) -> None:
        self.check_llm()
        unknown = sorted(set(self.operations) - set(OPERATIONS))
        if unknown:
            raise ValueError(f"operations: unknown {', '.join(unknown)}", f"use {', '.join(OPERATIONS)}")
        if not any(w > 0 for w in self.operations.values()) or any(w < 0 for w in self.operations.values()):
            raise ValueError("operations: weights must be >= 0, one of them > 0")


@dataclass
class _Chain:
    """One seed record's line of evolutions: the record the next round evolves, and its instruction."""

    root: dict
    parent: dict
    instruction: str
    system: str | None
    made: list = field(default_factory=list)


@register
class EvolStage(GeneratingStage):
    """Evol-Instruct: evolve, eliminate and answer instructions."""

    name = "evol"
    Config = EvolConfig

    def features(self, batch: pa.Table) -> pa.Table:
        return pa.table({"id": batch["id"], "instruction_chars": _first_user_chars(batch)})

    # which records, which operation ---------------------------------------------------------------

    def _chosen(self, table: FeatureTable) -> np.ndarray:
        chars = table.column("instruction_chars").to_numpy()
        rows = np.flatnonzero(chars > 0)
        if self.config.seeds is not None and self.config.seeds < rows.size:
            ids = table.column("id").to_pylist()
            rank = np.array(
                [xxh3_64_intdigest(ids[r].encode(), seed=self.context.seed) for r in rows], np.uint64
            )
            rows = np.sort(rows[np.argsort(rank, kind="stable")[: self.config.seeds]])
        return rows

    def _operation(self, root_id: str, round_: int) -> str:
        names = [op for op in OPERATIONS if self.config.operations.get(op, 0) > 0]
        weights = np.array([self.config.operations[op] for op in names], np.float64)
        draw = xxh3_64_intdigest(f"{root_id}:{round_}".encode(), seed=self.context.seed) / 2.0**64
        return names[int(np.searchsorted(np.cumsum(weights / weights.sum()), draw, side="right"))]

    def _chains(self, table: FeatureTable) -> list[_Chain]:
        rows = self._chosen(table)
        chains = []
        for record in table.records(rows, ["id", "messages", "source"]).to_pylist():
            messages = record["messages"]
            user = next(m["content"] for m in messages if m["role"] == "user")
            system = next((m["content"] for m in messages if m["role"] == "system"), None)
            chains.append(_Chain(record, record, user, system))
        return chains

    # requests -------------------------------------------------------------------------------------

    def _template(self, name: str) -> str:
        return synthetic.template(name, self.config.prompts, self.context.base_dir)

    def _evolve_request(self, chain: _Chain, op: str, round_: int) -> Request:
        """An evolution of the chain's instruction; the sample index is the round, so a parent whose
        evolution was eliminated gets a fresh one when the same operation is drawn again."""
        text = synthetic.fill(self._template(f"evol_{op}"), instruction=chain.instruction)
        return Request([{"role": "user", "content": text}], sample=round_ - 1)

    def _answer_request(self, chain: _Chain, instruction: str) -> Request:
        system = [{"role": "system", "content": chain.system}] if chain.system else []
        return Request([*system, {"role": "user", "content": instruction}])

    def _judge_request(self, chain: _Chain, instruction: str) -> Request:
        text = synthetic.fill(self._template("evol_judge"), first=chain.instruction, second=instruction)
        return Request([{"role": "user", "content": text}], max_tokens=JUDGE_TOKENS, temperature=0.0)

    def estimate(self, records: Any) -> dict:
        return self._estimate(self._chains(self.feature_table(records)))

    def _estimate(self, chains: list[_Chain]) -> dict:
        """Every round of every chain at its worst: each evolution survives and every answer is as long
        as max_tokens (later rounds' instructions are max_tokens long too)."""
        cfg = self.config
        longest = max(estimate_tokens(self._template(f"evol_{op}")) for op in OPERATIONS)
        judge = estimate_tokens(self._template("evol_judge"))
        sizes, outs = [], []
        for chain in chains:
            parent = estimate_tokens(chain.instruction)
            system = estimate_tokens(chain.system or "")
            for round_ in range(cfg.rounds):
                before = parent if round_ == 0 else cfg.max_tokens
                sizes += [longest + before, system + cfg.max_tokens]
                outs += [cfg.max_tokens, cfg.max_tokens]
                if cfg.judge:
                    sizes.append(judge + before + cfg.max_tokens)
                    outs.append(JUDGE_TOKENS)
        return synthetic.estimate(cfg, sizes, outs)

    # deciding -------------------------------------------------------------------------------------

    def process(self, table: FeatureTable) -> Decisions:  # type: ignore[override]
        cfg = self.config
        decisions = Decisions(table.num_rows)
        chains = self._chains(table)
        expected = self._estimate(chains)
        synthetic.refuse_over_budget(self.name, cfg, expected)
        engine = self.context.llm_engine(cfg)
        seen = set(table.column("id").to_pylist())
        book = _Book()
        for round_ in range(1, cfg.rounds + 1):
            if engine.usage.budget_exhausted or not chains:
                break
            self.context.say(f"round {round_}/{cfg.rounds}: evolving {len(chains):,} instructions")
            ops = [self._operation(c.root["id"], round_) for c in chains]
            evolved = engine.run(
                [self._evolve_request(c, op, round_) for c, op in zip(chains, ops, strict=True)]
            )
            candidates = []
            for chain, op, reply in zip(chains, ops, evolved, strict=True):
                if isinstance(reply, Failure):
                    book.failed(reply)
                    continue
                text = reply.text.strip()
                problem = self._instruction_problem(chain, text, reply)
                where = {"op": op, "round": round_, "root_id": chain.root["id"]}
                if problem is not None:
                    record = synthetic.synthetic_record([("user", text)], chain.parent, "evol", where, cfg)
                    book.reject(record, *problem, where)
                    continue
                candidates.append((chain, op, text, where))
            self.context.say(f"round {round_}/{cfg.rounds}: answering {len(candidates):,} evolutions")
            asks = [self._answer_request(c, text) for c, _, text, _ in candidates]
            if cfg.judge:
                asks += [self._judge_request(c, text) for c, _, text, _ in candidates]
            replies = engine.run(asks)
            for i, (chain, op, text, where) in enumerate(candidates):
                answer = replies[i]
                verdict = replies[len(candidates) + i] if cfg.judge else None
                if isinstance(answer, Failure) or isinstance(verdict, Failure):
                    book.failed(answer if isinstance(answer, Failure) else verdict)
                    continue
                turns = [("system", chain.system)] if chain.system else []
                turns += [("user", text), ("assistant", answer.text.strip())]
                record = synthetic.synthetic_record(turns, chain.parent, "evol", where, cfg)
                problem = self._answer_problem(answer, verdict, chain)
                if problem is None and record["id"] in seen:
                    problem = ("duplicate", {"id": record["id"]})
                if problem is not None:
                    book.reject(record, *problem, where)
                    continue
                seen.add(record["id"])
                book.keep(record, op)
                chain.parent, chain.instruction = record, text
        if book.kept:
            decisions.add(synthetic.records_table(book.kept))
        if book.rejected:
            records, reasons, evidence = zip(*book.rejected, strict=True)
            decisions.reject(synthetic.records_table(list(records)), reasons, evidence)
        decisions.report = book.report(len(chains), cfg, expected, engine.usage)
        return decisions

    def _instruction_problem(self, chain: _Chain, text: str, reply: Answer) -> tuple[str, dict] | None:
        copied = synthetic.copied_template(text)
        if copied is not None:
            return "copied_prompt", {"copied": copied, "instruction": text[:300]}
        if synthetic.says_nothing(text):
            return "empty_instruction", {"instruction": text[:300]}
        if " ".join(text.split()).lower() == " ".join(chain.instruction.split()).lower():
            return "no_new_information", {"rule": "identical to its parent"}
        if self.config.drop_cut_off and reply.finish == "length":
            return "instruction_cut_off", {"output_tokens": reply.output_tokens}
        return None

    def _answer_problem(
        self, answer: Answer, verdict: Answer | None, chain: _Chain
    ) -> tuple[str, dict] | None:
        if verdict is not None and judged_same(verdict.text):
            return "no_new_information", {
                "judge": verdict.text.strip()[:40],
                "parent": chain.instruction[:300],
            }
        return synthetic.answer_problem(answer, self.config.min_answer_words, self.config.drop_cut_off)


class _Book:
    """What a run of the stage made, threw out and failed, for its decisions and its report."""

    def __init__(self) -> None:
        self.kept: list[dict] = []
        self.rejected: list[tuple[dict, str, dict]] = []
        self.ops: Counter = Counter()
        self.failures: Counter = Counter()
        self.first_error = ""

    def keep(self, record: dict, op: str) -> None:
        self.kept.append(record)
        self.ops[op] += 1

    def reject(self, record: dict, reason: str, evidence: dict, where: dict) -> None:
        self.rejected.append((record, reason, {**where, **evidence}))

    def failed(self, failure: Failure) -> None:
        self.failures[failure.reason] += 1
        self.first_error = self.first_error or (failure.message if failure.reason == "error" else "")

    def report(self, seeds: int, cfg: EvolConfig, expected: dict, usage) -> dict:
        return {
            "seeds": seeds,
            "rounds": cfg.rounds,
            "kept": len(self.kept),
            "eliminated": dict(sorted(Counter(reason for _, reason, _ in self.rejected).items())),
            "kept_by_operation": dict(sorted(self.ops.items())),
            "failed": self.failures.get("error", 0),
            "unsent_budget": self.failures.get("budget", 0),
            "budget_exhausted": usage.budget_exhausted,
            "first_error": self.first_error,
            "estimate": expected,
            "provider": cfg.provider,
            "model": cfg.model,
        }


def judged_same(reply: str) -> bool:
    """Whether the judge said the two instructions are the same: its first word when that is a
    verdict (`**Same**`, "Same."), else `same` said and `different` not."""
    words = re.findall(r"[a-z]+", reply.lower())
    if words and words[0] in ("same", "different"):
        return words[0] == "same"
    return "same" in words and "different" not in words


def _first_user_chars(batch: pa.Table) -> pa.Array:
    """Characters of each record's first user turn (0: none, nothing to evolve), column-wise."""
    text = conversation_text(pl.from_arrow(batch.select(["messages"])), "first_user")
    return text.str.len_chars().cast(pl.Int64).to_arrow()
