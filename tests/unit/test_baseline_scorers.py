"""Static baselines as scorers: 'dsir' (importance resampling on hashed n-grams, with selector 'importance')
and 'classifier' (hashed n-gram logistic regression, reference vs pool).

The scorers read nothing of the host but ``host.reference.path`` (the reference JSONL), so the host here is a
stand-in with only ``.reference`` (a real ``ReferenceSet`` whose token rows are unused placeholders); the
pool is an in-memory list of texts with the ``text`` / ``num_candidates`` a pool offers.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import chisquare
from sklearn.utils import murmurhash3_32

from mates_megatron.config import SelectionConfig
from mates_megatron.pool.base import PoolRounds
from mates_megatron.probe.reference import ReferenceSet
from mates_megatron.scorers import RoundInput
from mates_megatron.scorers.dsir import WORDPUNCT
from mates_megatron.selectors import SELECTORS, ImportanceResamplingSelector

CATS = [
    "the cat sat on the mat and the cat purred softly",
    "a small cat chased the mouse across the mat",
    "the kitten and the cat slept on the warm mat",
    "my cat likes to sit on the mat by the window",
]
FINANCE = [
    "quarterly revenue rose as interest rates fell sharply",
    "the bank reported higher margins on corporate loans",
    "bond yields climbed after the central bank meeting",
    "investors sold shares amid fears of rising inflation",
]
REFERENCE = [
    {"context": "the cat sat on the", "target": " mat"},
    {"context": "a cat purred and slept on the", "target": " mat"},
    {"text": "the kitten chased the cat around the mat"},
    {"context": "my cat likes to sit by the", "target": " window"},
    {"text": "the small cat slept on the warm mat and purred"},
    {"context": "a kitten chased the mouse across the", "target": " mat"},
]


class ListPool:
    """An in-memory pool: candidate id i is texts[i]."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_candidates(self) -> int:
        return len(self.texts)

    def text(self, gid: int) -> str:
        return self.texts[gid]


def _host(tmp_path, lines=REFERENCE):
    path = tmp_path / "reference.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ref = ReferenceSet(
        tokens=np.zeros((len(lines), 2), np.int64), loss_mask=np.ones((len(lines), 1)), path=str(path)
    )
    return SimpleNamespace(reference=ref)


def _reference_texts(lines=REFERENCE):
    return [x["context"] + x["target"] if "target" in x else x["text"] for x in lines]


def _build(sel: SelectionConfig):
    return sel.build_scorer()


def _round(pool, host, seed, ids=None, round_=1):
    ids = np.arange(pool.num_candidates, dtype=np.int32) if ids is None else ids
    return RoundInput(round=round_, candidates=ids, pool=pool, host=host, seed=seed)


# ----------------------------------------------------------------------------------------------- dsir


def _hand_log_weights(target_texts, raw_texts, buckets, smoothing=1.0, scored=None):
    """DSIR written out: WordPunct tokens, uni+bigrams, MurmurHash3 buckets, add-one multinomials; the log
    weights of ``scored`` (default: the raw texts)."""

    def grams(text):
        words = re.findall(r"\w+|[^\w\s]+", text.lower())
        return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]

    def counts(text):
        c = np.zeros(buckets)
        for g, n in Counter(grams(text)).items():
            c[abs(murmurhash3_32(g, seed=0)) % buckets] += n
        return c

    target = sum(counts(t) for t in target_texts)
    raw = sum(counts(t) for t in raw_texts)
    p_t = (target + smoothing) / (target.sum() + smoothing * buckets)
    p_r = (raw + smoothing) / (raw.sum() + smoothing * buckets)
    return np.array(
        [counts(t) @ (np.log(p_t) - np.log(p_r)) for t in (raw_texts if scored is None else scored)]
    )


def test_wordpunct_is_nltks_tokenizer():
    # nltk's WordPunctTokenizer on this string (the data-selection package's default tokenizer).
    assert re.findall(WORDPUNCT, "hello, world!! it's 3.5") == [
        "hello",
        ",",
        "world",
        "!!",
        "it",
        "'",
        "s",
        "3",
        ".",
        "5",
    ]


@pytest.mark.parametrize("buckets", [64, 10_000])  # 64: many collisions
def test_dsir_log_weights_match_a_hand_computation(tmp_path, buckets):
    pool = ListPool(CATS + FINANCE + ["The CAT, the mat!", ""])
    sel = SelectionConfig(
        selector="importance", scorer="dsir", scorer_options={"num_buckets": buckets}, seed=3
    )
    out = _build(sel).score(_round(pool, _host(tmp_path), sel.seed))
    expected = _hand_log_weights(_reference_texts(), pool.texts, buckets)
    np.testing.assert_allclose(-out.scores, expected, rtol=1e-12, atol=1e-12)
    assert out.scores[-1] == 0.0  # no n-grams: weight 1
    assert out.record["log_weight_mean"] == pytest.approx(expected.mean())
    assert out.record["raw_fit_candidates"] == len(pool.texts)


def test_dsir_on_a_candidate_subset_fits_the_raw_distribution_on_those_candidates(tmp_path):
    pool = ListPool(CATS + FINANCE)
    ids = np.array([6, 1, 4, 2], dtype=np.int32)
    sel = SelectionConfig(selector="topk", scorer="dsir", scorer_options={"chunk_size": 3})
    out = _build(sel).score(_round(pool, _host(tmp_path), 0, ids))
    expected = _hand_log_weights(_reference_texts(), [pool.texts[i] for i in ids], 10_000)
    np.testing.assert_allclose(-out.scores, expected, rtol=1e-12)


def test_dsir_raw_sample_is_seeded_and_streams_the_round(tmp_path):
    pool = ListPool(CATS * 5 + FINANCE * 5)
    host = _host(tmp_path)
    opts = {"raw_samples": 7, "chunk_size": 4}
    a = _build(SelectionConfig(selector="topk", scorer="dsir", scorer_options=opts, seed=1))
    b = _build(SelectionConfig(selector="topk", scorer="dsir", scorer_options=opts, seed=1))
    sa, sb = a.score(_round(pool, host, 1)), b.score(_round(pool, host, 1))
    assert sa.scores.tolist() == sb.scores.tolist() and sa.record["raw_fit_candidates"] == 7
    # Against the hand computation: raw fitted on the same seeded sample, weights for every candidate.
    sample = np.sort(np.random.default_rng([1, 1, 0xD512]).choice(len(pool.texts), size=7, replace=False))
    raw = [pool.texts[i] for i in sample]
    expected = _hand_log_weights(_reference_texts(), raw, 10_000, scored=pool.texts)
    np.testing.assert_allclose(-sa.scores, expected, rtol=1e-12)
    # Fitted on the sample, not on the whole round (whose cat/finance mix differs from the sample's).
    whole = _hand_log_weights(_reference_texts(), pool.texts, 10_000)
    assert not np.allclose(-sa.scores, whole)


def test_dsir_ranks_reference_like_candidates_first(tmp_path):
    pool = ListPool(FINANCE + CATS)
    sel = SelectionConfig(selector="topk", scorer="dsir")
    scores = _build(sel).score(_round(pool, _host(tmp_path), 0)).scores
    assert scores[4:].max() < scores[:4].min()
    chosen = sel.build_selector().select(np.arange(8, dtype=np.int32), 4, scores=scores, seed=0, round_=1)
    assert chosen.tolist() == [4, 5, 6, 7]


def test_importance_selector_is_gumbel_top_k_on_raw_log_weights():
    rng = np.random.default_rng(0)
    log_w = rng.normal(scale=3.0, size=40)
    cands = np.arange(500, 540, dtype=np.int32)
    sel = SelectionConfig(selector="importance", scorer="dsir").build_selector()
    assert isinstance(sel, ImportanceResamplingSelector)  # no temperature: it takes no options
    for seed, round_ in [(0, 0), (7, 3)]:
        got = sel.select(cands, 9, scores=-log_w, seed=seed, round_=round_)
        # DSIR's resample: the k largest of log w + Gumbel noise (the selectors' seeded noise stream).
        g = np.random.default_rng([seed, round_, 0x5E1EC7]).gumbel(size=40)
        assert got.tolist() == sorted(cands[np.argsort(-(log_w + g))[:9]].tolist())


def test_importance_selector_first_pick_is_proportional_to_the_weights():
    """k=1 draws follow w / sum(w) on the raw scale (no z-scoring): a chi-square test over seeds."""
    log_w = np.array([0.0, 0.5, 1.0, 2.0])
    sel = SELECTORS.get("importance")()
    cands = np.arange(4, dtype=np.int32)
    picks = [sel.select(cands, 1, scores=-log_w, seed=s, round_=0)[0] for s in range(4000)]
    p = np.exp(log_w) / np.exp(log_w).sum()
    assert chisquare(np.bincount(picks, minlength=4), p * 4000).pvalue > 0.01


# ----------------------------------------------------------------------------------------- classifier


def _classifier(seed=0, **opts):
    return _build(SelectionConfig(selector="topk", scorer="classifier", scorer_options=opts, seed=seed))


def test_classifier_prefers_reference_like_text(tmp_path):
    pool = ListPool(FINANCE * 6 + CATS)  # negatives are drawn from the pool: mostly finance, maybe a cat
    scorer = _classifier(negatives_per_positive=2.0)
    out = scorer.score(_round(pool, _host(tmp_path), 0))
    p = -out.scores
    assert p[24:].min() > p[:24].max()  # the cat candidates are the more reference-like
    assert out.record["classifier_positives"] == 6 and out.record["classifier_negatives"] == 12
    assert 0.8 < out.record["classifier_train_accuracy"] <= 1.0  # a negative may be a cat text
    assert "fit" in out.record["seconds"]
    again = scorer.score(_round(pool, _host(tmp_path), 0, round_=2))  # kept, not refitted
    assert again.scores.tolist() == out.scores.tolist() and "fit" not in again.record["seconds"]


def test_classifier_is_deterministic_for_a_seed_and_round_independent(tmp_path):
    pool = ListPool(FINANCE * 5 + CATS * 5)
    host = _host(tmp_path)
    ids = np.arange(len(pool), dtype=np.int32)
    a = _classifier(seed=4, chunk_size=7).score(_round(pool, host, 4, ids, round_=1)).scores
    # Another scorer, first scored at another round: the same negatives, so the same model and scores.
    b = _classifier(seed=4).score(_round(pool, host, 4, ids, round_=5)).scores
    assert a.tolist() == b.tolist()
    neg = lambda seed: _classifier(seed=seed).negative_ids(pool, 3).tolist()  # noqa: E731
    assert neg(4) == neg(4) and neg(4) != neg(5)


@pytest.mark.parametrize(
    ("opts", "field"),
    [
        ({"n_features": 1}, "n_features"),
        ({"ngram_max": 0}, "ngram_max"),
        ({"negatives_per_positive": 0}, "negatives_per_positive"),
        ({"C": -1.0}, "C"),
        ({"max_iter": 0}, "max_iter"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"buckets": 10}, "buckets"),
    ],
)
def test_classifier_refuses_bad_options_naming_the_field(opts, field):
    with pytest.raises(ValueError, match=rf"scorer_options.*{field}"):
        SelectionConfig(selector="topk", scorer="classifier", scorer_options=opts)


@pytest.mark.parametrize(
    ("opts", "field"),
    [
        ({"num_buckets": 1}, "num_buckets"),
        ({"ngrams": 0}, "ngrams"),
        ({"smoothing": 0}, "smoothing"),
        ({"raw_samples": 0}, "raw_samples"),
    ],
)
def test_dsir_refuses_bad_options_naming_the_field(opts, field):
    with pytest.raises(ValueError, match=rf"scorer_options.*{field}"):
        SelectionConfig(selector="importance", scorer="dsir", scorer_options=opts)


# ------------------------------------------------------------------------------------ the config path


@pytest.mark.parametrize(
    ("selector", "scorer", "opts"),
    [("importance", "dsir", {"num_buckets": 4096}), ("topk", "classifier", {"n_features": 4096})],
)
def test_both_run_through_the_config_path_from_round_zero(tmp_path, selector, scorer, opts):
    sel = SelectionConfig(selector=selector, scorer=scorer, scorer_options=opts, seed=2, select_every=2)
    assert sel.needs_reference and sel.warmup_rounds == 0  # no live model: scored from round 0
    pool = ListPool(FINANCE * 6 + CATS * 6)
    rounds = PoolRounds(len(pool), 16, seed=sel.seed)
    cands = rounds.candidates(0)
    out = _build(sel).score(_round(pool, _host(tmp_path), sel.seed, cands, round_=0))
    assert out.scores.dtype == np.float64 and out.scores.shape == (16,) and np.isfinite(out.scores).all()
    chosen = sel.build_selector().select(cands, 4, scores=out.scores, seed=sel.seed, round_=0)
    assert len(set(chosen.tolist())) == 4 and set(chosen.tolist()) <= set(cands.tolist())
    json.dumps(out.record)  # JSON-ready


def test_a_host_without_reference_is_refused(tmp_path):
    sel = SelectionConfig(selector="topk", scorer="dsir")
    with pytest.raises(ValueError, match="scorer 'dsir' fits toward a reference set"):
        _build(sel).score(_round(ListPool(CATS), SimpleNamespace(reference=None), 0))


def test_classifier_fit_is_the_same_whatever_the_ranks_thread_count(tmp_path):
    """lbfgs's last bits depend on the BLAS/OpenMP thread count, which ranks need not share."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(400)]
    reference = [{"text": " ".join(rng.choice(vocab[:250], size=60))} for _ in range(150)]
    pool = ListPool([" ".join(rng.choice(vocab[150:], size=60)) for _ in range(300)])
    host = _host(tmp_path, reference)
    runs = []
    for threads in (1, 2):
        with threadpool_limits(threads):
            runs.append(_classifier(seed=1).score(_round(pool, host, 1)).scores)
    assert runs[0].tolist() == runs[1].tolist()
