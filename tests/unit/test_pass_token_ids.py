"""influence.pass_token_ids: the encoder reads the pool's token ids, never its text, and gets exactly what
tokenising the text gives; a pool in another vocabulary is refused at start-up with the fix."""

from __future__ import annotations

import numpy as np
import pytest

from mates_megatron.data.tokenizer import load_tokenizer
from mates_megatron.influence.config import InfluenceConfig, RidgeConfig

TEXTS = [
    f"def f{i}(x):\n    return x * {i}  # {word} the lambda of a list"
    for i, word in enumerate(["map", "sum"] * 20)
] + ["The cat sat on the mat, and the dog ran.", "Licensed under the Apache License, Version 2.0."] * 10


class TokenPool:
    """Texts and their ids in the encoder's vocabulary; reading text is an error (pass-through never does)."""

    def __init__(self, tok) -> None:
        self.ids = [np.array(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]

    def tokens(self, gid: int) -> np.ndarray:
        return self.ids[gid]

    def text(self, gid: int) -> str:
        raise AssertionError("pass_token_ids read a candidate's text")


class TextPool(TokenPool):
    def text(self, gid: int) -> str:
        return TEXTS[gid]


@pytest.mark.parametrize("features", ["token_embeddings", "encoder"])
def test_ids_score_exactly_like_their_text(features):
    from mates_megatron.influence import build_influence_model
    from mates_megatron.pool.base import candidate_inputs

    cfg = InfluenceConfig(model="ridge", ridge=RidgeConfig(features=features), max_length=32, max_chunks=2)
    tok = load_tokenizer(cfg.resolved_path())
    ids = np.arange(len(TEXTS))[::-1].copy()
    positions = np.arange(0, len(ids), 2)
    target = np.random.default_rng(0).normal(size=len(positions))
    by_text, fit_text = build_influence_model(cfg).fit_predict(
        candidate_inputs(TextPool(tok), ids, token_ids=False), positions, target
    )
    by_ids, fit_ids = build_influence_model(cfg).fit_predict(
        candidate_inputs(TokenPool(tok), ids, token_ids=True), positions, target
    )
    assert np.array_equal(by_text, by_ids) and fit_text.spearman == fit_ids.spearman


def test_a_batch_mixing_texts_and_ids_is_refused():
    from mates_megatron.influence.encoder import EncoderRegressor

    net = EncoderRegressor(InfluenceConfig(max_length=32))
    with pytest.raises(TypeError, match="a batch mixes texts and token-id arrays"):
        net.encode_texts(["a text", np.array([2023, 2003])])


def test_a_pool_in_another_vocabulary_is_refused_with_the_fix():
    from mates_megatron.plugin import check_same_vocabulary

    cfg = InfluenceConfig()
    tok = load_tokenizer(cfg.resolved_path())
    check_same_vocabulary(tok, cfg)  # the encoder's own tokenizer passes

    class Other:
        def get_vocab(self):
            vocab = dict(tok.get_vocab())
            vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
            return vocab

    with pytest.raises(ValueError, match=r"the pool's tokenizer \(30522 tokens\) is not the influence encoder's "
                       r"\(30522 tokens at .*; 4 entries differ\).*set influence.pass_token_ids: false"):  # fmt: skip
        check_same_vocabulary(Other(), cfg)
    with pytest.raises(ValueError, match="the pretraining tokenizer is needed to check"):
        check_same_vocabulary(None, cfg)
