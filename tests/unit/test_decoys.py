"""The demo's decoy set (`mates_lab.data.decoys`) and `bench decoys`'s per-round shares."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mates_lab.bench.decoys import decoy_shares
from mates_lab.data.decoys import DecoyConfig, build_decoy_corpus, decoy_documents, near_duplicate


def test_near_duplicate_replaces_the_share_of_words_asked_with_words_of_the_same_text():
    text = " ".join(f"w{i}" for i in range(200))
    copy = near_duplicate(text, 0.05, np.random.default_rng(0))
    a, b = text.split(" "), copy.split(" ")
    assert len(b) == len(a) and set(b) <= set(a)
    assert sum(x != y for x, y in zip(a, b, strict=True)) == 10  # distinct words: every replacement shows
    assert copy == near_duplicate(text, 0.05, np.random.default_rng(0))
    assert copy != near_duplicate(text, 0.05, np.random.default_rng(1))
    with pytest.raises(ValueError, match="at least 2 words"):
        near_duplicate("alone", 0.05, np.random.default_rng(0))


def _corpus(n=30):
    domains = ["python_docs", "python_code", "junk"]
    return [{"text": " ".join(f"d{i}w{j}" for j in range(40)), "domain": domains[i % 3]} for i in range(n)]


def test_decoys_copy_a_seeded_draw_of_the_source_domain():
    corpus = _corpus()
    cfg = DecoyConfig(sources=3, copies=4)
    decoys, sources = decoy_documents(corpus, cfg)
    assert len(decoys) == 12 and {d["domain"] for d in decoys} == {"decoy"}
    assert all(corpus[i]["domain"] == "python_docs" for i in sources) and len(set(sources)) == 3
    for k, i in enumerate(sources):  # each copy keeps its source's words, not the exact text
        for d in decoys[4 * k : 4 * k + 4]:
            assert set(d["text"].split()) <= set(corpus[i]["text"].split()) and d["text"] != corpus[i]["text"]
    assert decoy_documents(corpus, cfg) == (decoys, sources)
    with pytest.raises(ValueError, match="holds 10 'python_docs' documents, the decoys need 11"):
        decoy_documents(corpus, DecoyConfig(sources=11))


def test_the_decoy_corpus_keeps_every_document_and_adds_the_decoys_as_their_own_domain(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    corpus = _corpus()
    (src / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    cfg = DecoyConfig(sources=2, copies=5)
    built = build_decoy_corpus(src, tmp_path / "out", cfg)
    rows = [json.loads(x) for x in (tmp_path / "out/corpus.jsonl").read_text().splitlines()]
    assert rows[:30] == corpus and len(rows) == built["documents"] == 40 and built["decoys"] == 10
    meta = json.loads((tmp_path / "out/train.meta.json").read_text())
    names = [meta["domains"][i] for i in np.load(tmp_path / "out/train.domains.npy")]
    assert names == [r["domain"] for r in rows]
    assert build_decoy_corpus(src, tmp_path / "out", cfg) == built  # built once, read after
    with pytest.raises(ValueError, match="remove it or use another --work"):
        build_decoy_corpus(src, tmp_path / "out", DecoyConfig(sources=2, copies=6))


def test_decoy_shares_are_per_round_over_seeds(tmp_path):
    for seed, shares in ((1, [0.0, 0.3]), (2, [0.1, 0.5])):
        d = tmp_path / f"seed_{seed}" / "mates"
        d.mkdir(parents=True)
        rounds = [{"decoy": s, "junk": 1 - s} for s in shares]
        (d / "metrics.json").write_text(json.dumps({"selection": {"selected_share_by_domain": rounds}}))
    out = decoy_shares(tmp_path, [1, 2], ["mates"], "decoy")
    assert [r["per_seed"] for r in out["mates"]] == [[0.0, 0.1], [0.3, 0.5]]
    assert out["mates"][1]["mean"] == pytest.approx(0.4)
