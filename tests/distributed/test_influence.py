"""Influence model: it learns a known function of the text, pools chunks as specified, and distributed
scoring/fitting over a side gloo group equals one process. Uses the real all-MiniLM-L6-v2 encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

WORDS = [
    "the",
    "model",
    "data",
    "selection",
    "training",
    "influence",
    "reference",
    "loss",
    "python",
    "module",
    "function",
    "class",
    "value",
    "return",
    "object",
    "string",
    "number",
    "list",
    "file",
    "path",
    "system",
    "process",
    "memory",
    "error",
    "option",
    "default",
    "method",
]


def _synthetic(n: int, seed: int = 0):
    """Texts whose target is the fraction of the marker word 'zebra' (a known function of the text)."""
    rng = np.random.default_rng(seed)
    texts, fracs = [], []
    for _ in range(n):
        length = int(rng.integers(12, 30))
        frac = rng.uniform(0, 0.6)
        words = [("zebra" if rng.random() < frac else rng.choice(WORDS)) for _ in range(length)]
        texts.append(" ".join(words))
        fracs.append(words.count("zebra") / length)
    return texts, np.array(fracs)


def _model(max_length=64, seed=0, **kw):
    from mates_megatron.influence.model import InfluenceConfig, InfluenceModel

    torch.manual_seed(seed)
    m = InfluenceModel(InfluenceConfig(max_length=max_length, **kw))
    torch.nn.init.normal_(m.head.weight, std=0.05)  # a non-zero head, so predictions differ per text
    return m


def test_learns_a_known_function_of_the_text():
    from mates_megatron.influence.fit import fit, predict
    from mates_megatron.stats import spearman

    texts, target = _synthetic(320)
    model = _model(epochs=4, batch_size=16, lr=1e-4, head_lr=2e-3, val_fraction=0.2)
    result = fit(model, texts, target)
    assert result.spearman > 0.9, result.history
    test_texts, test_target = _synthetic(100, seed=1)  # fresh texts, never seen
    assert spearman(predict(model, test_texts, progress=False), test_target) > 0.9


def test_long_texts_are_mean_pooled_over_all_chunk_tokens():
    model = _model(max_length=10).eval()
    text = " ".join(WORDS[:20])  # 20 word pieces -> chunks of 8 body tokens: 8 + 8 (max_chunks=2)
    ids, mask = model.encode_texts([text])
    assert ids.shape[:2] == (1, 2) and int(mask.sum()) == 20
    with torch.no_grad():
        pooled = model.embed(ids, mask)
        parts = [
            model.encoder(input_ids=ids[:, k], attention_mask=mask[:, k]).last_hidden_state[0]
            for k in range(2)
        ]
        tokens = torch.cat([parts[k][mask[0, k].bool()] for k in range(2)])
    torch.testing.assert_close(pooled[0], tokens.mean(0))


def _distributed(texts, fit_target):
    import torch.distributed as dist

    from mates_megatron.influence.fit import fit, predict
    from mates_megatron.influence.group import influence_group

    torch.set_num_threads(1)
    group = influence_group()
    subset = influence_group([0])
    model = _model(epochs=1, batch_size=8)
    # Dropout draws differ per process; switch it off to compare the distributed math exactly.
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    pred = predict(model, texts, group=group, batch_size=4, progress=False)
    fitted = fit(model, texts, fit_target, group=group)
    after = predict(model, texts, group=group, batch_size=4, progress=False)
    return pred, after, fitted.spearman, subset is None, dist.get_rank()


def test_two_rank_scoring_and_fit_equal_one_rank():
    texts, target = _synthetic(43, seed=3)  # 43: uneven shards
    one = run_on_ranks(_distributed, 1, texts, target)[0]
    two = run_on_ranks(_distributed, 2, texts, target)
    for pred, after, _, _, _ in two:
        torch.testing.assert_close(torch.tensor(pred), torch.tensor(one[0]), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(after), torch.tensor(one[1]), rtol=0, atol=1e-4)
    assert two[0][0].tolist() == two[1][0].tolist()  # every member gets the same scores
    assert [r[3] for r in two] == [False, True]  # a subset group leaves rank 1 out


def _runner(texts, target, warm_start):
    from mates_megatron.influence.model import InfluenceConfig
    from mates_megatron.influence.runner import InfluenceRunner

    torch.set_num_threads(1)
    cfg = InfluenceConfig(max_length=64, epochs=1, batch_size=8, warm_start=warm_start)
    runner = InfluenceRunner(cfg, ranks=[0])  # a dedicated subset: rank 1 only receives the scores
    runner.fit_round(texts, target)
    after_one = runner.predict(texts)
    runner.fit_round(texts, target)
    after_two = runner.predict(texts)
    other = InfluenceRunner(cfg, ranks=[0])
    other.load_state_dict(runner.state_dict())
    return after_one, after_two, other.predict(texts), runner.model is None


def test_runner_subset_group_warm_start_and_state():
    texts, target = _synthetic(24, seed=5)
    (a0, b0, r0, none0), (a1, b1, r1, none1) = run_on_ranks(_runner, 2, texts, target, True)
    # Every rank gets rank 0's scores; only rank 0 holds a model; the state round-trips.
    assert a0.tolist() == a1.tolist() and b0.tolist() == b1.tolist() == r0.tolist() == r1.tolist()
    assert (none0, none1) == (False, True)
    # Warm start: round two continues from round one, so its predictions move.
    assert not np.allclose(a0, b0)
    # Cold start: each round restarts from the pretrained encoder, so the same data gives the same model.
    (c_one, c_two, _, _), _ = run_on_ranks(_runner, 2, texts, target, False)
    assert c_one.tolist() == c_two.tolist()


def test_bad_fit_input():
    from mates_megatron.influence.fit import fit

    model = _model()
    texts, target = _synthetic(20)
    target[3] = np.nan
    with pytest.raises(ValueError, match="1 oracle scores are NaN/inf"):
        fit(model, texts, target)
    with pytest.raises(ValueError, match="at least 10"):
        fit(model, texts[:5], np.zeros(5))
    from mates_megatron.influence.model import InfluenceConfig, InfluenceModel

    with pytest.raises(FileNotFoundError, match="no encoder at .*influence.model_path"):
        InfluenceModel(InfluenceConfig(model_path="/nonexistent"))


def test_fit_ridge_matches_a_reference_ridge_and_learns_the_known_function():
    """The closed-form head equals ridge solved independently (augmented least squares) on standardised
    features, the strength is the one with the best cross-validated Spearman, and on static token embeddings
    it learns the marker-word fraction."""
    from mates_megatron.influence.fit import embed, fit_ridge
    from mates_megatron.stats import spearman

    model = _model(freeze_encoder=True, features="token_embeddings", ridge_alphas=(0.01, 1.0, 1000.0))
    texts, target = _synthetic(200)
    feats = embed(model, texts)
    result = fit_ridge(model, feats, target)
    assert [h["alpha"] for h in result.history] == [0.01, 1.0, 1000.0]
    assert result.spearman == max(h["spearman"] for h in result.history)
    alpha = model.cfg.ridge_alphas[result.best_epoch]
    # Reference: min ||A w - z||^2 + alpha n ||w||^2 with A standardised, z the z-scored target.
    mu, sd = feats.mean(0), feats.std(0) + 1e-8
    a = (feats - mu) / sd
    z = (target - target.mean()) / target.std()
    aug_a = np.vstack([a, np.sqrt(alpha * len(a)) * np.eye(a.shape[1])])
    aug_z = np.concatenate([z - z.mean(), np.zeros(a.shape[1])])
    w_ref = np.linalg.lstsq(aug_a, aug_z, rcond=None)[0]
    expected = a @ w_ref + z.mean()
    got = feats @ model.head.weight.detach().double().numpy()[0] + float(model.head.bias.detach())
    np.testing.assert_allclose(got, expected, atol=2e-4)
    test_texts, test_target = _synthetic(100, seed=1)
    assert (
        spearman(embed(model, test_texts) @ model.head.weight.detach().double().numpy()[0], test_target) > 0.9
    )


def test_token_embeddings_are_the_mean_input_embedding_of_every_token():
    model = _model(freeze_encoder=True, features="token_embeddings")
    text = " ".join(WORDS * 30)  # far beyond max_length: static features read every token
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > model.cfg.max_length * model.cfg.max_chunks
    table = model.encoder.get_input_embeddings().weight.detach()
    torch.testing.assert_close(model.embed_tokens([text])[0], table[torch.tensor(ids)].mean(0))
    from mates_megatron.influence.model import InfluenceConfig

    with pytest.raises(ValueError, match="set freeze_encoder: true"):
        InfluenceConfig(features="token_embeddings")
    with pytest.raises(ValueError, match="features='bag'"):
        InfluenceConfig(features="bag", freeze_encoder=True)


def _score_round(texts, positions, target, ranks):
    from mates_megatron.influence.model import InfluenceConfig
    from mates_megatron.influence.runner import InfluenceRunner

    torch.set_num_threads(1)
    cfg = InfluenceConfig(max_length=32, freeze_encoder=True)
    runner = InfluenceRunner(cfg, ranks=ranks)
    pred, sp, pe = runner.score_round(texts if runner.member else [], positions, target[positions])
    other = InfluenceRunner(cfg, ranks=ranks)
    other.load_state_dict(runner.state_dict())
    state_keys = sorted(runner.state_dict()["model"] or {})
    return pred, sp, pe, state_keys


def test_score_round_is_identical_on_every_rank_and_equals_one_process():
    """Frozen encoder: 2-rank embedding + ridge gives one process's predictions on every rank, also when
    only rank 0 runs the influence model; the checkpointed state is the head alone."""
    texts, target = _synthetic(61, seed=4)
    positions = np.arange(0, 61, 2)
    one = run_on_ranks(_score_round, 1, texts, positions, target, None)[0]
    both = run_on_ranks(_score_round, 2, texts, positions, target, None)
    subset = run_on_ranks(_score_round, 2, texts, positions, target, [0])
    for pred, sp, pe, _ in both + subset:
        np.testing.assert_allclose(pred, one[0], rtol=0, atol=1e-9)
        assert (sp, pe) == (one[1], one[2])
    assert both[0][0].tolist() == both[1][0].tolist()
    assert one[3] == ["bias", "weight"]
    assert subset[1][3] == []  # rank 1 holds no model
