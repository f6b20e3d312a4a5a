"""decontaminate: drop training records that overlap a declared eval set, with the overlap as evidence.

Methods (exact, ngram, minhash, embedding; see curate.contamination), combinable, each with its
own threshold. A dropped record's evidence names the best hit (eval set, eval item id, method,
score, the matched n-gram or span) and lists the best hit of every method that fired, so the
report can count, per eval set, which items were found and how.

Row-local: each record is compared with the eval items alone, so batches run anywhere; the indexes
over the eval items (and their embeddings) are built once per process, in `setup`, or once per
run by `prepare` where an engine ships them to every worker (Ray's object store).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from curate.contamination import EvalCatalog, Matcher, evidence
from curate.evalsets import load_eval_sets
from curate.stages.base import Decisions, Stage, option, register

Method = Literal["exact", "ngram", "minhash", "embedding"]


@dataclass
class DecontaminateConfig:
    methods: list[Method] = option(
        ["exact", "ngram", "minhash"],
        help="Methods to run, any of exact, ngram, minhash, embedding; a record is dropped when any fires.",
        minItems=1,
        uniqueItems=True,
    )
    eval_sets: list[str] = option([], help="Names of the recipe's eval sets to check against; empty: all.")
    user_turns_only: bool = option(
        False, help="exact and ngram look at the user turns only (default: every non-system turn)."
    )
    exact_min_words: int = option(
        4,
        help="An eval question of at least this many words is found anywhere inside a record; a shorter "
        "one only when a whole user turn equals it.",
        minimum=1,
    )
    ngram: int = option(13, help="n of the word n-grams (13 as in GPT-3 and lm-eval-harness).", minimum=1)
    ngram_min_matches: int = option(
        1, help="Distinct shared n-grams with one eval item needed to drop.", minimum=1
    )
    ngram_max_items: int = option(
        10,
        help="An n-gram that more eval items than this share is a template's sentence (a prompt header, a "
        "shared instruction), not evidence: it does not count as a match. 0: every n-gram counts.",
        minimum=0,
    )
    match_answers: bool = option(False, help="Also match n-grams of the eval items' answers.")
    minhash_threshold: float = option(
        0.7,
        help="Estimated Jaccard of word 5-gram shingles (user turns vs eval question) to drop.",
        exclusiveMinimum=0,
        maximum=1.0,
    )
    minhash_num_perm: int = option(128, help="MinHash permutations.", minimum=1)
    minhash_ngram: int = option(
        5,
        help="Words per MinHash shingle; questions shorter than this are left to the exact method.",
        minimum=1,
    )
    embedding_threshold: float = option(
        0.7,
        help="Cosine similarity (user turns vs eval question) to drop as a paraphrase.",
        exclusiveMinimum=0,
        maximum=1.0,
    )
    embedding_numbers_agree: bool = option(
        True,
        help="An embedding match counts only when the record and the eval question, if both state "
        "numbers, share one: a question about other quantities is another question.",
    )
    embedding_model: str = option(
        "",
        help="Empty: the bundled all-MiniLM-L6-v2; `static`: it distilled into a static model (fast, "
        "less exact); or a local sentence-transformers or model2vec folder.",
    )
    embedding_max_tokens: int = option(128, help="Tokens of each text the embedding model reads.", minimum=1)
    embedding_batch_size: int | None = option(
        None, help="Texts per embedding batch (default: 64 on a CPU, 1024 on a GPU).", minimum=1
    )
    judge: bool = option(
        False,
        help="Ask an LLM whether each embedding candidate restates its eval question (as LMSYS's "
        "llm-decontaminator does); only confirmed candidates are dropped.",
    )
    judge_candidates: float = option(
        0.5, help="Cosine from which an embedding match goes to the judge.", exclusiveMinimum=0, maximum=1.0
    )
    judge_provider: Literal["openai", "anthropic"] = option(
        "openai", help="openai (or compatible) or anthropic."
    )
    judge_model: str = option("", help="The judge's model name, e.g. gpt-4o-mini.")
    judge_base_url: str = option(
        "", help="An OpenAI-compatible endpoint (vLLM, Ollama, ...); empty: the provider's."
    )
    judge_api_key_env: str = option(
        "", help="Environment variable holding the API key; empty: OPENAI_API_KEY or ANTHROPIC_API_KEY."
    )

    def check(self) -> None:
        if self.judge and ("embedding" not in self.methods or not self.judge_model):
            raise ValueError("judge needs the embedding method and a judge_model")


@register
class DecontaminateStage(Stage):
    """Drop records that overlap a declared eval set (n-gram, ...)."""

    name = "decontaminate"
    Config = DecontaminateConfig
    uses_eval_sets = True

    @classmethod
    def recipe_issues(cls, config: DecontaminateConfig, recipe) -> list[str]:
        declared = [e.get("name") for e in recipe.eval_sets]
        if not declared:
            return ["the recipe declares no eval_sets (add eval_sets: [{name, path}] to check against)"]
        return [
            f"eval_sets: '{name}' is not a declared eval set (the recipe's: {', '.join(map(str, declared))})"
            for name in config.eval_sets
            if name not in declared
        ]

    @classmethod
    def warmup_config(cls, config: DecontaminateConfig) -> DecontaminateConfig:
        methods = [m for m in config.methods if m != "embedding"] or ["exact"]  # a model compiles nothing
        return dataclasses.replace(config, methods=methods, judge=False)

    def reads(self) -> list[Path]:
        if "embedding" not in self.config.methods:
            return []
        from curate.embed import model_folder

        return [model_folder(self.config.embedding_model, self.context.base_dir)]

    def uses_model(self) -> bool:
        return "embedding" in self.config.methods

    def prepare(self) -> Matcher:
        """The indexes over the eval items (and their embeddings), built once for every process."""
        self.setup()
        return self.matcher

    def setup(self, prepared: Matcher | None = None) -> None:
        cfg = self.config
        judge = None
        if cfg.judge:
            from curate.llm import LLMConfig

            judge = self.context.llm_engine(
                LLMConfig(
                    provider=cfg.judge_provider,
                    model=cfg.judge_model,
                    base_url=cfg.judge_base_url,
                    api_key_env=cfg.judge_api_key_env,
                    max_tokens=4,
                    temperature=0.0,
                )
            )
        embedder = None
        if "embedding" in cfg.methods:
            from curate.embed import Embedder

            embedder = Embedder(
                cfg.embedding_model,
                self.context.shared_cache,
                batch_size=cfg.embedding_batch_size,
                max_seq_length=cfg.embedding_max_tokens,
                base_dir=self.context.base_dir,
            )
        if prepared is not None:
            self.matcher = prepared.attached(embedder, judge)
            return
        chosen = [e for e in self.context.eval_sets if not cfg.eval_sets or e["name"] in cfg.eval_sets]
        catalog = EvalCatalog(load_eval_sets(chosen, self.context.base_dir))
        self.matcher = Matcher(catalog, cfg, embedder, judge)

    def process(self, table: pa.Table) -> Decisions:
        decisions = Decisions(table.num_rows)
        if table.num_rows:
            for doc, proof in sorted(evidence(self.matcher.find(table), self.matcher.catalog).items()):
                decisions.drop(doc, "eval_overlap", proof)
        return decisions
