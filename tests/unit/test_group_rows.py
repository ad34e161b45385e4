"""Group-MATES's candidates go through the encoder once a round: the own scores and embeddings a selector reads
(``scorers.group_mates.ShardRows``) are the relational model's predictions and the encoder's embeddings, bit for
bit, from one pass; and the lazy scores are refused where every score would be read at once."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mates_megatron.config import SelectionConfig
from mates_megatron.encoder import Encoder, EncoderConfig
from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.influence.relational import RelationalInfluenceModel
from mates_megatron.scorers.group_mates import ShardRows
from tests.unit.test_encoder import TEXTS, _Pool

MORE = TEXTS + ["a second cat on another mat", "rates held steady", "print('hello')", "x = [i for i in y]"]


@pytest.mark.parametrize("features", ["encoder", "token_embeddings"])
def test_own_scores_and_embeddings_are_the_models_and_the_encoders_from_one_pass(features):
    cfg = InfluenceConfig(model="relational", max_length=16, max_chunks=2, predict_batch_size=3)
    cfg = replace(cfg, ridge=replace(cfg.ridge, features=features))
    model = RelationalInfluenceModel(cfg)
    hidden = 384
    head = {
        "weight": torch.from_numpy(np.random.default_rng(0).normal(size=(1, hidden))).float(),
        "bias": torch.tensor([0.25]),
    }
    model.load_state_dict({**head, "alpha": 1.5, "temperature": 0.8})
    encoder = Encoder(EncoderConfig.from_influence(cfg, features=features, batch_size=3))
    pool, cands = _Pool(MORE), np.array([6, 0, 3, 7, 1, 5, 2, 4], dtype=np.int32)
    rows = ShardRows(encoder.net(), model.state_dict(), pool, cands, token_ids=False, batch_size=3,
                     loader_workers=0)  # fmt: skip
    pos = np.array([1, 2, 4, 5, 7])  # a shard's positions (ascending, scattered over the round)
    texts = [MORE[i] for i in cands[pos]]
    emb = rows.features(pos)
    scores = rows.scores(pos)
    assert rows.passes == 1  # the embeddings, then the scores of the same positions: one encoder pass
    np.testing.assert_array_equal(emb, encoder.embed(texts))
    np.testing.assert_array_equal(scores, model.predict(texts))
    assert scores.dtype == np.float64 and emb.dtype == np.float32
    other = np.array([0, 3])
    np.testing.assert_array_equal(rows.scores(other), model.predict([MORE[i] for i in cands[other]]))
    assert rows.passes == 2


def test_lazy_scores_are_refused_by_a_selector_that_reads_every_score_and_as_a_filter():
    with pytest.raises(
        ValueError,
        match=r"scorer 'group_mates' computes each candidate's score where the selector reads it, and selector "
        r"'topk' reads every score at once: use a selector that reads them lazily \(cluster_greedy\)",
    ):
        SelectionConfig(selector="topk", scorer="group_mates", scorer_options={"probe_samples": 20})
    with pytest.raises(
        ValueError,
        match=r"selection.filters\[0\].kind='group_mates' scores candidates only where a selector reads them, "
        r"so it cannot filter a round: filter with a scorer that scores every candidate \(e.g. classifier\)",
    ):
        SelectionConfig(selector="topk", scorer="mates", filters=[{"kind": "group_mates", "keep": 0.5}])
