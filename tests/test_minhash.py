"""The MinHash kernels against their references: hashlib SHA-1, the Python shingle definition, datasketch."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from curate.formats import InputSpec, read_input
from curate.records import to_table
from curate.text.conversation import conversation_text
from curate.text.lsh import candidate_pairs, clusters, lsh_clusters, optimal_params, pair_jaccard_estimates
from curate.text.minhash import jaccard_estimate, permutations, signatures
from curate.text.sha1 import sha1_prefix64
from curate.text.shingles import content_keys, normalized, shingle_hash_sets, shingles

# Files with many shapes and scripts: English prose, Chinese, code, tool calls, templated T0 prompts.
FILES = [
    "raw/llamafactory_alpaca_zh_demo.json.gz",
    "raw/gpteacher_codegen.json.gz",
    "raw/llamafactory_glaive_toolcall_en_demo.json.gz",
    "raw/foundry_dolly_hhrlhf_train_small.jsonl.gz",
    "raw/oasst_en_100_tree.jsonl.gz",
    "raw/t0_train_50k/*_0*.jsonl.gz",
]


@pytest.fixture(scope="module")
def texts(shared_data: Path) -> list[str]:
    """Conversation texts of about 3,700 real records, plus edge cases the kernels hand to Python."""
    records = []
    for path in FILES:
        for batch in read_input(InputSpec(path=path), shared_data):
            records.extend(batch.records)
    real = conversation_text(pl.from_arrow(to_table(records))).to_list()
    edge = [
        "",
        "   \n\t ",
        "one",
        "two words",
        "İstanbul'da ΣΊΣΥΦΟΣ ΟΔΟΣ and Σ alone",  # multi-code-point and context-dependent lowercase
        "snake_case and ｆｕｌｌｗｉｄｔｈ text, ① ② ③, x²",
        "emoji 🙂 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 letters 𠀀𠀁 beyond the BMP " * 3,
        "past the tables: \U00030000\U00030001 and private \U000f0000 use",
        "a " * 40 + "verylongword" * 10,  # a shingle longer than one SHA-1 block
    ]
    return real + edge


def _sha1_64(data: bytes) -> int:
    return struct.unpack("<Q", hashlib.sha1(data).digest()[:8])[0]


def test_sha1_kernel_equals_hashlib_for_every_padding_case() -> None:
    rng = np.random.default_rng(7)
    messages = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in [*range(0, 200), 1000, 4096]]
    state, w, tail = np.zeros(5, np.uint64), np.zeros(80, np.uint64), np.zeros(128, np.uint8)
    for msg in messages:
        data = np.frombuffer(msg + b"\0" * 8, dtype=np.uint8)
        assert int(sha1_prefix64(data, 0, len(msg), state, w, tail)) == _sha1_64(msg)


def test_shingle_sets_equal_the_python_definition(texts: list[str]) -> None:
    for unit, ngram, sample in [
        ("word", 5, texts),
        ("word", 1, texts[::7]),
        ("char", 5, texts[::7] + texts[-8:]),
    ]:
        offsets, hashes = shingle_hash_sets(sample, ngram, unit)
        assert offsets.size == len(sample) + 1
        for i, text in enumerate(sample):
            expected = sorted({_sha1_64(s.encode("utf-8")) for s in shingles(text, ngram, unit)})
            assert hashes[offsets[i] : offsets[i + 1]].tolist() == expected, (unit, ngram, text[:80])


def test_shingle_definition_on_known_text() -> None:
    text = "The CAT sat, on the mat!  The cat sat."
    assert shingles(text, 3) == [
        "the cat sat",
        "cat sat on",
        "sat on the",
        "on the mat",
        "the mat the",
        "mat the cat",
    ]
    assert shingles("Hi there", 5) == ["hi there"]
    assert shingles("...", 5) == []
    assert shingles("Ab  c", 3, "char") == ["ab ", "b c"]
    assert normalized("İ Σ", "word", True) == "i σ".encode()  # İ lowers to i + U+0307, a non-word mark


def test_permutation_parameters_equal_datasketch() -> None:
    for scheme in ("affine32", "affine64", "legacy"):
        a, b = permutations(128, 1, scheme)
        ref = MinHash(num_perm=128, seed=1, scheme=scheme).permutations
        assert np.array_equal(a, np.asarray(ref[0], dtype=np.uint64))
        assert np.array_equal(b, np.asarray(ref[1], dtype=np.uint64))


def _datasketch(
    text: str, num_perm: int = 128, seed: int = 1, scheme: str = "affine32", **shingling
) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
    m.update_batch([s.encode("utf-8") for s in shingles(text, **shingling)])
    return m


def test_signatures_equal_datasketch_on_real_records(texts: list[str]) -> None:
    sigs = signatures(texts)
    assert sigs.shape == (len(texts), 128) and sigs.dtype == np.uint32
    mismatched = [
        i for i, text in enumerate(texts) if not np.array_equal(sigs[i], _datasketch(text).hashvalues)
    ]
    assert mismatched == []
    assert len(texts) > 3000


@pytest.mark.parametrize(
    ("scheme", "kwargs"),
    [
        ("legacy", {}),
        ("affine64", {}),
        ("affine32", {"unit": "char", "ngram": 4}),
        ("affine32", {"ngram": 2, "seed": 42, "num_perm": 64}),
        ("affine32", {"unit": "char", "ngram": 3, "lowercase": False}),
    ],
)
def test_signature_variants_equal_datasketch(texts: list[str], scheme: str, kwargs: dict) -> None:
    sample = texts[::9] + texts[-8:]
    shingling = {k: v for k, v in kwargs.items() if k in ("unit", "ngram", "lowercase")}
    sketch = {k: v for k, v in kwargs.items() if k in ("seed", "num_perm")}
    sigs = signatures(sample, scheme=scheme, **kwargs)
    for i, text in enumerate(sample):
        assert np.array_equal(sigs[i], _datasketch(text, scheme=scheme, **sketch, **shingling).hashvalues)


def test_polars_series_input_and_nulls(texts: list[str]) -> None:
    series = pl.Series([texts[0], None, texts[5]])
    sigs = signatures(series)
    assert np.array_equal(sigs[0], signatures([texts[0]])[0])
    assert np.all(sigs[1] == np.uint32(2**32 - 1))  # no shingles: an untouched MinHash
    assert np.array_equal(sigs[1], MinHash(128, 1).hashvalues)


def test_lean_minhash_from_signatures_works_in_datasketch_lsh(texts: list[str]) -> None:
    sigs = signatures(texts[:500])
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    for i, row in enumerate(sigs):
        lsh.insert(i, LeanMinHash(seed=1, hashvalues=row, scheme="affine32"))
    for i in (3, 77, 401):
        assert i in lsh.query(_datasketch(texts[i]))


def test_jaccard_estimate_equals_datasketch(texts: list[str]) -> None:
    sigs = signatures(texts[:200])
    for i, j in [(0, 1), (5, 6), (10, 150)]:
        assert jaccard_estimate(sigs[i], sigs[j]) == _datasketch(texts[i]).jaccard(_datasketch(texts[j]))
    both = jaccard_estimate(sigs[:100], sigs[100:200])
    assert both.shape == (100,) and both[0] == jaccard_estimate(sigs[0], sigs[100])


def test_optimal_params_equal_datasketch() -> None:
    for num_perm in (16, 64, 128):
        for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
            for weights in ((0.5, 0.5), (0.3, 0.7)):
                assert optimal_params(threshold, num_perm, *weights) == _optimal_param(
                    threshold, num_perm, *weights
                )
    assert optimal_params(0.8, 128) == (9, 13)


def test_lsh_clusters_equal_datasketch_index(texts: list[str]) -> None:
    """The clusters of inserting every record into MinHashLSH and linking it to its query hits:
    all of them, or those whose estimated Jaccard (MinHash.jaccard) reaches the threshold."""
    sigs = signatures(texts)
    bands, rows = optimal_params(0.8, 128)
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    lean = [LeanMinHash(seed=1, hashvalues=row, scheme="affine32") for row in sigs]
    for i, m in enumerate(lean):
        lsh.insert(i, m)
    hits = [(i, j) for i, m in enumerate(lean) for j in lsh.query(m) if j < i]
    checked = [(i, j) for i, j in hits if lean[i].jaccard(lean[j]) >= 0.8]
    assert len(checked) < len(hits)
    for threshold, pairs in ((None, hits), (0.8, checked)):
        pairs = np.array(pairs, dtype=np.int64)
        expected = clusters(len(texts), pairs[:, 0], pairs[:, 1])
        assert np.array_equal(lsh_clusters(sigs, bands, rows, threshold), expected)
    ours = lsh_clusters(sigs, bands, rows, 0.8)
    assert (ours != np.arange(len(texts))).sum() > 100  # the T0 templates do form clusters
    left, right = candidate_pairs(sigs, bands, rows)
    assert np.allclose(pair_jaccard_estimates(sigs, left, right), jaccard_estimate(sigs[left], sigs[right]))


def test_content_keys_match_normalized_equality(texts: list[str]) -> None:
    keys = content_keys(texts)
    by_key: dict[tuple, set] = {}
    for key, text in zip(map(tuple, keys.tolist()), texts, strict=True):
        by_key.setdefault(key, set()).add(normalized(text, "char", True))
    assert all(len(v) == 1 for v in by_key.values())
    assert len(by_key) == len({normalized(t, "char", True) for t in texts})
    k = content_keys(["Hello   World\n", "hello world", "hello world!"])
    assert np.array_equal(k[0], k[1]) and not np.array_equal(k[1], k[2])
