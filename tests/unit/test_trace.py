"""Tracing parts without the model: the planted-fact generator, the metrics, the top-k merge, BM25 through
the CLI, the FASTTRACK index (built, reused, rebuilt) and the verifier's rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mates_lab.planted import plant
from mates_megatron.trace.metrics import precision_recall_f1, recall_at_k, summarize

BACKGROUND = [
    f"Piece {i} talks about topic {i}. It has a second sentence. And a third one." for i in range(12)
]


def test_plant_puts_each_fact_in_its_documents_only():
    leak = {"context": "The quick brown fox jumps over the lazy", "target": " dog"}
    docs, facts, leaks = plant(
        BACKGROUND, facts=2, supports=2, distractors=1, leaks=[leak], leak_copies=2, seed=3
    )
    assert len(docs) == 12 + 2
    for f in facts:
        with_fact = [i for i, d in enumerate(docs) if f.sentence in d]
        assert with_fact == list(f.supporting) and len(f.supporting) == 2
        named = [i for i, d in enumerate(docs) if f.entity in d]
        assert named == sorted(f.supporting + f.distractors) and len(f.distractors) == 1
        for i in f.distractors:
            assert f.sentence not in docs[i] and f.target.strip() not in docs[i]
        assert f.query() == {"id": f.id, "context": f.context, "target": f.target}
        assert f.context.startswith(f.entity)
    assert [docs[i] for i in leaks[0].copies] == [leak["context"] + leak["target"]] * 2
    # Every background piece is kept once, as it was or with one planted sentence in it.
    for piece in BACKGROUND:
        assert sum(piece.split(". ")[0] in d for d in docs) == 1
    again = plant(BACKGROUND, facts=2, supports=2, distractors=1, leaks=[leak], leak_copies=2, seed=3)
    assert again == (docs, facts, leaks)
    assert plant(BACKGROUND, facts=2, supports=2, distractors=1, seed=4)[0] != docs


def test_plant_refuses_too_little_background():
    with pytest.raises(ValueError, match=r"need 12 background pieces, 11 given; give more background"):
        plant(BACKGROUND[:11], facts=2, supports=3, distractors=3)
    with pytest.raises(ValueError, match="need facts >= 1"):
        plant(BACKGROUND, facts=0)


def test_metrics_by_hand():
    assert recall_at_k([5, 3, 9, 1], [3, 1], 2) == 0.5
    assert recall_at_k([5, 3, 9, 1], [3, 1], 4) == 1.0
    assert precision_recall_f1({3, 4}, {3, 1}) == (0.5, 0.5, 0.5)
    assert precision_recall_f1({3}, {3, 1, 7}) == pytest.approx((1.0, 1 / 3, 0.5))
    assert precision_recall_f1(set(), {3}) == (0.0, 0.0, 0.0)
    # Two queries: (P, R, F1) = (1/2, 1, 2/3) and (0, 0, 0); recall@1 = (1/1 + 0/2) / 2.
    s = summarize([[4, 2], [9, 8]], [[4, 2], []], [[4], [7, 6]], 1)
    assert s == pytest.approx({"recall_at_1": 0.5, "precision": 0.25, "recall": 0.5, "f1": 1 / 3})
    with pytest.raises(ValueError, match="no gold documents"):
        recall_at_k([1], [], 1)


def test_topk_is_independent_of_order_and_split():
    from mates_megatron.trace.base import TopK

    rng = np.random.default_rng(0)
    ids = np.arange(200)
    scores = rng.integers(0, 20, size=(3, 200)).astype(float)  # many ties: broken by the smaller id
    want_ids = np.stack([sorted(ids, key=lambda i, r=r: (-scores[r, i], i))[:7] for r in range(3)])
    whole = TopK(3, 7)
    whole.add(ids, scores)
    parts = []
    for shard in (ids[0::2], ids[1::2]):  # two "replicas", each in shuffled chunks
        t = TopK(3, 7)
        for chunk in np.array_split(rng.permutation(shard), 5):
            t.add(chunk, scores[:, chunk])
        parts.append(t)
    merged = TopK(3, 7)
    for t in parts:
        merged.add_rows(t.ids, t.scores)
    for t in (whole, merged):
        got_ids, got_scores = t.result()
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_scores, np.take_along_axis(scores, want_ids, axis=1))
    short = TopK(1, 4)
    short.add(np.array([5, 6]), np.array([[1.0, 2.0]]))
    got_ids, got_scores = short.result()
    assert got_ids.tolist() == [[6, 5, -1, -1]] and np.isnan(got_scores[0, 2:]).all()
    with pytest.raises(FloatingPointError, match="trace score of candidate 6 for query 0 is nan"):
        short.add(np.array([5, 6]), np.array([[1.0, np.nan]]))


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus

    d = tmp_path_factory.mktemp("trace_pool")
    docs, facts, _ = plant(BACKGROUND * 3, facts=3, supports=2, distractors=2, seed=0)
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepared = prepare_corpus(PrepareConfig(input=d / "corpus.jsonl", output_prefix=d / "train"))
    (d / "facts.jsonl").write_text("".join(json.dumps(f.query()) + "\n" for f in facts))
    return {"dir": d, "shards": str(prepared.shards_dir), "facts": facts, "docs": docs}


def test_bm25_cli_against_rank_bm25(tiny_pool, tmp_path, capsys):
    from rank_bm25 import BM25Okapi

    from mates_megatron.cli import main
    from mates_megatron.trace.bm25 import words

    out = tmp_path / "bm25.jsonl"
    argv = ["trace", "--method", "bm25", "--shards", tiny_pool["shards"], "--queries",
            str(tiny_pool["dir"] / "facts.jsonl"), "--out", str(out), "--top-k", "5"]  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    bm25 = BM25Okapi([words(t) for t in tiny_pool["docs"]])
    for f, line in zip(tiny_pool["facts"], lines, strict=True):
        s = bm25.get_scores(words(f.context + f.target))
        want = sorted(range(len(s)), key=lambda i: (-s[i], i))[:5]
        assert line["id"] == f.id and line["ids"] == want
        np.testing.assert_allclose(line["scores"], s[want], rtol=1e-12)
        assert set(f.supporting) <= set(line["ids"])  # the fact's words are rare: BM25 finds its documents
    meta = json.loads((tmp_path / "bm25.jsonl.meta.json").read_text())
    assert meta["method"] == "bm25" and meta["queries"] == 3 and meta["seconds_per_query"] > 0
    # Bad input: named, nothing written.
    assert main([*argv[:-2], "--options", "{k3: 1}"]) == 2
    assert "unknown field 'k3'; Bm25Options has: k1, b" in capsys.readouterr().err
    assert main(["trace", "--method", "gradient", *argv[3:]]) == 2
    assert "needs the model: give --config RUN.yaml and --load CKPT" in capsys.readouterr().err
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(ValueError, match='ids repeat; give every line its own "id"'):
        from mates_megatron.trace.run import load_queries

        load_queries(tmp_path / "dup.jsonl")


def test_fasttrack_index_rebuilt_when_the_pool_changes(tiny_pool, tmp_path):
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus
    from mates_megatron.encoder import Encoder, EncoderConfig
    from mates_megatron.pool.webdataset_pool import WebDatasetPool
    from mates_megatron.trace.index import IndexSettings, load_or_build, recursive_kmeans

    emb = Encoder(EncoderConfig(max_length=64, batch_size=32))
    calls = []

    def embed(pool, ids):
        calls.append(len(ids))
        return emb.embed_candidates(pool, ids)

    settings = IndexSettings(leaf_size=5, branching=3, max_length=64, max_keyword_df=0.2)
    pool = WebDatasetPool(tiny_pool["shards"], seq_length=32)
    index, status = load_or_build(tmp_path, pool, settings, embed, log=lambda m: None)
    assert status == "built: no index yet" and calls == [len(pool)]
    # A partition of the pool into leaves of at most leaf_size, each leaf a contiguous run of `order`.
    assert sorted(index.order.tolist()) == list(range(len(pool)))
    sizes = np.diff(index.offsets)
    assert sizes.max() <= 5 and sizes.sum() == len(pool)
    np.testing.assert_allclose(np.linalg.norm(index.centroids, axis=1), 1.0, rtol=1e-5)
    again, status = load_or_build(tmp_path, pool, settings, embed, log=lambda m: None)
    assert status == "reused" and calls == [len(pool)]
    np.testing.assert_array_equal(again.order, index.order)
    # The same settings over a changed pool: built again, naming why.
    d = tmp_path / "changed"
    d.mkdir()
    (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_pool["docs"][:-1]))
    changed = WebDatasetPool(
        prepare_corpus(PrepareConfig(d / "c.jsonl", d / "train")).shards_dir, seq_length=32
    )
    _, status = load_or_build(tmp_path, changed, settings, embed, log=lambda m: None)
    assert status == "built: the pool fingerprint and num candidates changed" and calls[-1] == len(changed)
    _, status = load_or_build(tmp_path, changed, IndexSettings(leaf_size=4, max_length=64), embed, log=print)
    assert status == "built: the settings changed"
    # Routing: a query goes first to the leaves holding its rare words (here the planted entity's name).
    fact = tiny_pool["facts"][0]
    from mates_megatron.trace.bm25 import words

    leaves = index.route(words(fact.sentence), np.zeros(index.centroids.shape[1], np.float32), 4)
    routed = set(np.concatenate([index.members(int(j)) for j in leaves]).tolist())
    named = [i for i, d in enumerate(tiny_pool["docs"]) if fact.entity in d]  # 2 supporting, 2 distractors
    assert named and set(named) <= routed
    assert index.keywords(words(fact.entity)) and not index.keywords(["piece", "talks"])  # in every document
    # Identical rows cannot be split by k-means: cut in id order, the recursion still ends.
    leaves = recursive_kmeans(np.ones((9, 4)), np.arange(9), IndexSettings(leaf_size=2))
    assert sorted(np.concatenate(leaves).tolist()) == list(range(9)) and max(map(len, leaves)) <= 2


def test_verifier_rows_by_hand():
    from mates_megatron.trace.fasttrack import query_parts, with_document

    # A query row "c1 c2 t1" padded to 6 labels; target = the last token.
    tokens = np.array([11, 12, 13, 0, 0, 0, 0])
    mask = np.array([0, 1, 0, 0, 0, 0], dtype=np.float32)
    q = query_parts(tokens, mask)
    assert q.tolist() == [11, 12, 13]
    row, m = with_document(np.array([1, 2, 3, 4, 5]), q, 1, seq_length=6)
    # 7 tokens of room: 4 of the document, then the query; the one counted label predicts 13.
    assert row.tolist() == [1, 2, 3, 4, 11, 12, 13] and m.tolist() == [0, 0, 0, 0, 0, 1]
    row, m = with_document(np.zeros(0, np.int64), q, 1, seq_length=6)
    assert row.tolist() == [11, 12, 13, 0, 0, 0, 0] and m.tolist() == [0, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="longer than the model's window"):
        with_document(np.zeros(0, np.int64), np.arange(9), 1, seq_length=6)
