"""The trace bench's scoring: the tuned decision rule, routing recall, the oracle verifier (by hand), and the
planted corpus's hard distractors and paraphrased queries."""

from __future__ import annotations

import pytest

from mates_lab.planted import PARAPHRASES, plant
from mates_megatron.trace.metrics import apply_rule, macro_f1, oracle_verifier, routing_recall, tune_rule

BACKGROUND = [
    f"Piece {i} talks about topic {i}. It has a second sentence. And a third one." for i in range(40)
]


def test_tuned_rule_picks_the_k_with_the_best_f1_by_hand():
    # Gold {1, 2} and {5, 6}; both rankings put the two gold documents first.
    ranked = [[1, 2, 3, 4], [6, 5, 7, 8]]
    gold = [[1, 2], [5, 6]]
    # F1 at k = 1: (P 1, R 1/2) -> 2/3; k = 2: 1; k = 3: (2/3, 1) -> 0.8; k = 4: (1/2, 1) -> 2/3.
    assert [
        macro_f1(apply_rule(("top", k), ranked, [[0] * 4] * 2), gold) for k in (1, 2, 3, 4)
    ] == pytest.approx([2 / 3, 1.0, 0.8, 2 / 3])
    assert tune_rule(ranked, [[0.0] * 4] * 2, gold, 4, thresholds=False) == (("top", 2), 1.0)
    # Gold of different sizes: {1} and {5, 6, 7}. k = 1: (1 + 1/2) / 2 = 0.75; k = 2: (2/3 + 0.8) / 2 = 0.733;
    # k = 3: (1/2 + 1) / 2 = 0.75 (a tie goes to the smaller k). A threshold of 0.5 keeps {1} and {6, 5, 7}:
    # F1 (1 + 1) / 2 = 1, which only the threshold family reaches.
    ranked = [[1, 2, 3], [6, 5, 7]]
    scores = [[0.9, 0.2, 0.1], [0.8, 0.7, 0.6]]
    gold = [[1], [5, 6, 7]]
    rule, f1 = tune_rule(ranked, scores, gold, 3, thresholds=False)
    assert rule == ("top", 1) and f1 == pytest.approx(0.75)
    rule, f1 = tune_rule(ranked, scores, gold, 3)
    assert rule == ("above", 0.6) and f1 == 1.0
    assert apply_rule(("above", 0.6), ranked, scores) == [[1], [6, 5, 7]]


def test_routing_recall_and_oracle_verifier_by_hand():
    routed = [[1, 2, 3, 4, 9], [10, 11], [20]]
    gold = [[1, 2, 5], [12, 13], [20, 21]]
    # Shares routed: 2/3, 0, 1/2.
    assert routing_recall(routed, gold) == pytest.approx((2 / 3 + 0 + 1 / 2) / 3)
    # The oracle keeps {1, 2}, {}, {20}: precision 1, 0 (nothing kept), 1; recall 2/3, 0, 1/2;
    # F1 0.8, 0, 2/3.
    o = oracle_verifier(routed, gold)
    assert o == pytest.approx({"precision": 2 / 3, "recall": (2 / 3 + 1 / 2) / 3, "f1": (0.8 + 2 / 3) / 3})


def test_same_relation_distractors_name_the_subject_and_relation_with_another_object():
    docs, facts, _ = plant(
        BACKGROUND, facts=3, supports=2, distractors=1, same_relation=2, paraphrase=True, seed=5
    )
    for f in facts:
        relation = f.context[len(f.entity) + 1 :]
        assert len(f.same_relation) == 2
        assert set(f.same_relation).isdisjoint(f.supporting + f.distractors)
        for i in f.same_relation:
            assert f.context in docs[i] and f.sentence not in docs[i]
            after = docs[i].split(f.context, 1)[1].split(".", 1)[0]
            assert after.strip() and after != f.target
        named = [i for i, d in enumerate(docs) if f.entity in d]
        assert named == sorted(f.supporting + f.distractors + f.same_relation)
        # The query paraphrases: the entity and the target, no word of the relation but "a", "the", "is".
        q = f.query()
        assert q["context"] == PARAPHRASES[relation].format(entity=f.entity) and q["target"] == f.target
        assert not (set(relation.split()) & set(q["context"].split())) - {"a", "the", "is"}
    # Without the new options the corpus is what it was (the bench's earlier figures stay reproducible).
    plain = plant(BACKGROUND, facts=3, supports=2, distractors=1, seed=5)
    assert all(f.same_relation == () and f.query()["context"] == f.context for f in plain[1])


def test_held_out_rule_scores_each_half_with_the_rule_tuned_on_the_other():
    from mates_lab.bench.trace_scores import halves, held_out_rule

    a, b = halves(4, seed=0)
    assert sorted(a + b) == [0, 1, 2, 3] and len(a) == len(b) == 2
    # Half a's queries have one gold document, ranked first (tuned alone: top-1, F1 1); half b's have two,
    # ranked first and second (top-2, F1 1). Each half is then scored with the other's rule: a at top-2
    # (P 1/2, R 1: F1 2/3), b at top-1 (P 1, R 1/2: F1 2/3).
    ranked, gold = [None] * 4, [None] * 4
    for i in a:
        ranked[i], gold[i] = [10 * i, 10 * i + 1, 10 * i + 2, 10 * i + 3], [10 * i]
    for i in b:
        ranked[i], gold[i] = [10 * i, 10 * i + 1, 10 * i + 2, 10 * i + 3], [10 * i, 10 * i + 1]
    zeros = [[0.0] * 4] * 4
    r = held_out_rule(ranked, zeros, gold, 4, seed=0)
    assert [x["rule"] for x in r["rules"]] == [["top", 1], ["top", 2]]
    assert [x["tuning_f1"] for x in r["rules"]] == [1.0, 1.0]
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx(0.75) and r["recall"] == pytest.approx(0.75)


def test_peak_memory_reset_sees_a_new_allocation():
    from mates_lab.bench.trace_queries import peak_kib, reset_peak

    start = reset_peak()
    block = bytearray(64 * 1024 * 1024)
    assert peak_kib() - start >= 60 * 1024
    del block
    assert reset_peak() <= peak_kib()


def test_query_count_crossing_by_hand():
    from mates_lab.bench.trace_queries import linear_fit

    # forward-inf 2 + 3Q seconds, gradient 20 + 0.5Q: they cross at Q = 18 / 2.5 = 7.2.
    out = {
        "forward-inf": {str(q): {"seconds": 2 + 3 * q} for q in (1, 2, 4)},
        "gradient": {str(q): {"seconds": 20 + 0.5 * q} for q in (1, 2, 4)},
    }
    fit = linear_fit(out, pool_docs=10)
    assert fit["crossing_queries"] == pytest.approx(7.2)
    assert fit["forward-inf"] == pytest.approx({"fixed_seconds": 2.0, "per_query_seconds": 3.0})
    assert fit["large_pool_crossing_queries"] == pytest.approx(20 / 3)
