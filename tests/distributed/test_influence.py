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


CPU = torch.device("cpu")


def _cfg(model="finetune", max_length=64, **kw):
    """An InfluenceConfig; ``finetune_*`` / ``ridge_*`` keywords go to the model's own section. Texts are read
    in the test's process (``loader_workers`` 0): the workers give the same batches bit for bit
    (tests/distributed/test_influence_loader.py), and forking 4 of them per pass cost minutes on 2 cores."""
    from mates_megatron.influence.config import FinetuneConfig, InfluenceConfig, RidgeConfig

    kw.setdefault("loader_workers", 0)
    ft = {k[9:]: kw.pop(k) for k in list(kw) if k.startswith("finetune_")}
    rd = {k[6:]: kw.pop(k) for k in list(kw) if k.startswith("ridge_")}
    return InfluenceConfig(
        model=model, max_length=max_length, finetune=FinetuneConfig(**ft), ridge=RidgeConfig(**rd), **kw
    )


def _net(max_length=64, seed=0):
    """The encoder + head network alone, with a non-zero head so that predictions differ per text."""
    from mates_megatron.influence.encoder import EncoderRegressor

    torch.manual_seed(seed)
    net = EncoderRegressor(_cfg(max_length=max_length))
    torch.nn.init.normal_(net.head.weight, std=0.05)
    return net


def test_learns_a_known_function_of_the_text():
    from mates_megatron.influence.finetune import FinetuneInfluenceModel
    from mates_megatron.stats import spearman

    texts, target = _synthetic(320)
    cfg = _cfg(
        finetune_epochs=4,
        finetune_batch_size=16,
        finetune_lr=1e-4,
        finetune_head_lr=2e-3,
        finetune_val_fraction=0.2,
    )
    model = FinetuneInfluenceModel(cfg, device=CPU)
    result = model.fit(texts, target)
    assert result.spearman > 0.9, result.history
    test_texts, test_target = _synthetic(100, seed=1)  # fresh texts, never seen
    pred = model.predict(test_texts)
    assert pred.dtype == np.float64 and pred.shape == (100,)
    assert spearman(pred, test_target) > 0.9


def test_long_texts_are_mean_pooled_over_all_chunk_tokens():
    net = _net(max_length=10).eval()
    text = " ".join(WORDS[:20])  # 20 word pieces -> chunks of 8 body tokens: 8 + 8 (max_chunks=2)
    ids, mask = net.encode_texts([text])
    assert ids.shape[:2] == (1, 2) and int(mask.sum()) == 20
    with torch.no_grad():
        pooled = net.embed(ids, mask)
        parts = [
            net.encoder(input_ids=ids[:, k], attention_mask=mask[:, k]).last_hidden_state[0] for k in range(2)
        ]
        tokens = torch.cat([parts[k][mask[0, k].bool()] for k in range(2)])
    torch.testing.assert_close(pooled[0], tokens.mean(0))


def _distributed(texts, fit_target):
    import torch.distributed as dist

    from mates_megatron.influence.finetune import FinetuneInfluenceModel
    from mates_megatron.influence.group import influence_group

    torch.set_num_threads(1)
    group = influence_group()
    subset = influence_group([0])
    model = FinetuneInfluenceModel(
        _cfg(finetune_epochs=1, finetune_batch_size=8, predict_batch_size=4), device=CPU
    )
    model.load_state_dict(_net().state_dict())  # a random head, so predictions before the fit differ per text
    # Dropout draws differ per process; switch it off to compare the distributed math exactly.
    for mod in model.net.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    pred = model.predict(texts, group=group)
    fitted = model.fit(texts, fit_target, group=group)  # warm start: continues from the loaded network
    after = model.predict(texts, group=group)
    return pred, after, fitted.spearman, subset is None, dist.get_rank()


def test_two_rank_scoring_and_fit_equal_one_rank():
    texts, target = _synthetic(43, seed=3)  # 43: uneven shards
    one = run_on_ranks(_distributed, 1, texts, target)[0]
    two = run_on_ranks(_distributed, 2, texts, target)
    for pred, after, _, _, _ in two:
        torch.testing.assert_close(torch.tensor(pred), torch.tensor(one[0]), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(after), torch.tensor(one[1]), rtol=0, atol=1e-4)
    assert two[0][0].tolist() == two[1][0].tolist()  # every member gets the same scores
    assert two[0][1].tolist() == two[1][1].tolist()
    assert [r[3] for r in two] == [False, True]  # a subset group leaves rank 1 out


def _runner(texts, target, warm_start):
    from mates_megatron.influence.runner import InfluenceRunner

    torch.set_num_threads(1)
    cfg = _cfg(warm_start=warm_start, finetune_epochs=1, finetune_batch_size=8)
    runner = InfluenceRunner(cfg, ranks=[0], device="cpu")  # a dedicated subset: rank 1 only receives scores
    everything = np.arange(len(texts))
    mine = texts if runner.member else []
    after_one = runner.score_round(mine, everything, target)[0]
    after_two = runner.score_round(mine, everything, target)[0]
    state = runner.state_dict()
    other = InfluenceRunner(cfg, ranks=[0])
    other.load_state_dict(state)
    restored = other.model.predict(texts, group=other.group) if other.member else None
    n_state = len(state["model"] or {})
    return after_one, after_two, restored, runner.model is None, n_state, state["rounds_fitted"]


def test_runner_subset_group_warm_start_and_state():
    texts, target = _synthetic(24, seed=5)
    (a0, b0, r0, none0, n0, k0), (a1, b1, r1, none1, n1, k1) = run_on_ranks(_runner, 2, texts, target, True)
    # Every rank gets rank 0's scores; only rank 0 holds a model; the state round-trips.
    assert a0.tolist() == a1.tolist() and b0.tolist() == b1.tolist() == r0.tolist()
    assert (none0, none1) == (False, True) and r1 is None
    assert (k0, k1) == (2, 2)
    # The fine-tuned encoder is state, not just the head; a non-member checkpoints no model.
    assert n0 > 2 and n1 == 0
    # Warm start: round two continues from round one, so its predictions move.
    assert not np.allclose(a0, b0)
    # Cold start: each round restarts from the pretrained encoder, so the same data gives the same model.
    (c_one, c_two, _, _, _, _), _ = run_on_ranks(_runner, 2, texts, target, False)
    assert c_one.tolist() == c_two.tolist()


def test_bad_fit_input():
    from mates_megatron.influence.finetune import FinetuneInfluenceModel
    from mates_megatron.influence.ridge import RidgeInfluenceModel
    from mates_megatron.influence.runner import InfluenceRunner

    texts, target = _synthetic(20)
    for model in (FinetuneInfluenceModel(_cfg()), RidgeInfluenceModel(_cfg("ridge"))):
        with pytest.raises(RuntimeError, match="has not been fitted: call fit or load_state_dict first"):
            model.predict(texts)
        bad = target.copy()
        bad[3] = np.nan
        with pytest.raises(ValueError, match="1 oracle scores are NaN/inf"):
            model.fit(texts, bad)
        with pytest.raises(ValueError, match="at least 10"):
            model.fit(texts[:5], np.zeros(5))
        with pytest.raises(ValueError, match="got 20 texts and 19 scores"):
            model.fit(texts, target[:19])
    with pytest.raises(FileNotFoundError, match="no encoder at .*influence.model_path"):
        FinetuneInfluenceModel(_cfg(model_path="/nonexistent"))
    with pytest.raises(FileNotFoundError, match="no encoder at .*influence.model_path"):
        InfluenceRunner(_cfg("ridge", model_path="/nonexistent"))


def test_ten_pairs_fit_with_at_least_three_held_out():
    """10 probes at val_fraction 0.1 used to hold out one pair: Spearman NaN every epoch, then
    load_state_dict(None) raised. The held-out split now has at least 3 pairs."""
    from mates_megatron.influence.finetune import MIN_HELDOUT, FinetuneInfluenceModel, split

    assert MIN_HELDOUT == 3
    assert [len(split(n, 0.1, 0)[1]) for n in (10, 14, 29, 30, 40)] == [3, 3, 3, 3, 4]
    train, held = split(10, 0.95, 0)  # never so many held out that fewer than 3 are left to train on
    assert (len(train), len(held)) == (3, 7) and sorted({*train, *held}) == list(range(10))
    with pytest.raises(ValueError, match="at least 6 pairs"):
        split(5, 0.1, 0)

    texts = _synthetic(10, seed=2)[0]
    target = np.random.default_rng(2).normal(size=10)  # no ties: the held-out Spearman is defined
    cfg = _cfg(max_length=32, finetune_epochs=2, finetune_batch_size=4, finetune_val_fraction=0.1)
    result = FinetuneInfluenceModel(cfg).fit(texts, target)
    assert len(result.history) == 2 and all(np.isfinite(h["spearman"]) for h in result.history)
    assert result.spearman == max(h["spearman"] for h in result.history)

    # Held-out scores all equal: Spearman is undefined every epoch. The fit still keeps a model (the last
    # epoch's), reports NaN, and predicts.
    _, held = split(10, 0.1, cfg.seed)
    flat = target.copy()
    flat[held] = 0.5
    model = FinetuneInfluenceModel(cfg)
    result = model.fit(texts, flat)
    assert np.isnan(result.spearman) and np.isnan(result.pearson) and result.best == 1
    assert np.isfinite(model.predict(texts)).all()


def test_device_is_honoured_and_bad_devices_fail_clearly():
    """The network and every tensor that reaches one of its modules are on the configured device;
    InfluenceConfig.device overrides the training device; a bad device is a clear error."""
    from mates_megatron.influence.finetune import FinetuneInfluenceModel
    from mates_megatron.influence.runner import InfluenceRunner

    seen: set[torch.device] = set()

    def record(_module, args):
        seen.update(a.device for a in args if isinstance(a, torch.Tensor))

    texts, target = _synthetic(12, seed=6)
    model = FinetuneInfluenceModel(_cfg(max_length=32, finetune_epochs=1, finetune_batch_size=4), device=CPU)
    assert model.device == CPU
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        model.fit(texts, target)
        model.predict(texts)
    finally:
        handle.remove()
    assert seen == {CPU}
    assert {p.device for p in model.net.parameters()} == {CPU}

    assert InfluenceRunner(_cfg(), device="cpu").model.device == CPU
    assert InfluenceRunner(_cfg()).device == CPU  # no training device given: CPU
    # cfg.device wins over the training device (that CUDA device is never touched).
    assert InfluenceRunner(_cfg("ridge", device="cpu"), device="cuda:7").model.device == CPU
    with pytest.raises(ValueError, match="InfluenceConfig.device='gpu' is not a torch device: use 'cpu'"):
        _cfg(device="gpu")
    with pytest.raises(ValueError, match="influence device='tpu:x' is not a torch device"):
        InfluenceRunner(_cfg(), device="tpu:x")
    if not torch.cuda.is_available():
        cfg = _cfg(device="cuda")  # a config may name a device this machine lacks ...
        with pytest.raises(ValueError, match="CUDA is not available on this machine; set influence.device"):
            FinetuneInfluenceModel(cfg)  # ... the model built from it may not


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
def test_fit_and_predict_on_cuda():
    from mates_megatron.influence.finetune import FinetuneInfluenceModel
    from mates_megatron.influence.ridge import RidgeInfluenceModel

    texts, target = _synthetic(40, seed=7)
    cuda = torch.device("cuda", torch.cuda.current_device())
    model = FinetuneInfluenceModel(
        _cfg(max_length=32, finetune_epochs=1, finetune_batch_size=8), device="cuda"
    )
    model.fit(texts, target)
    assert {p.device for p in model.net.parameters()} == {cuda}
    pred = model.predict(texts)
    assert pred.dtype == np.float64 and np.isfinite(pred).all()
    assert all(v.device.type == "cpu" for v in model.state_dict().values())  # checkpoints hold CPU tensors
    positions = np.arange(0, 40, 2)
    results = {}
    for name, device in (("cuda", "cuda"), ("cpu", "cpu")):
        ridge = RidgeInfluenceModel(_cfg("ridge", max_length=32, device=device))
        results[name] = ridge.fit_predict(texts, positions, target[positions])[0]
        assert {p.device.type for p in ridge.net.parameters()} == {name}
    np.testing.assert_allclose(results["cuda"], results["cpu"], atol=1e-3)


def test_fit_ridge_matches_a_reference_ridge_and_learns_the_known_function():
    """The closed-form head equals ridge solved independently (augmented least squares) on standardised
    features, the strength is the one with the best cross-validated Spearman, and on static token embeddings
    it learns the marker-word fraction."""
    from mates_megatron.influence.ridge import RidgeInfluenceModel
    from mates_megatron.stats import spearman

    cfg = _cfg("ridge", ridge_features="token_embeddings", ridge_alphas=(0.01, 1.0, 1000.0))
    model = RidgeInfluenceModel(cfg, device=CPU)
    texts, target = _synthetic(200)
    feats = model.embed(texts)
    result = model.fit(texts, target)
    assert [h["alpha"] for h in result.history] == [0.01, 1.0, 1000.0]
    assert result.spearman == max(h["spearman"] for h in result.history)
    alpha = cfg.ridge.alphas[result.best]
    # Reference: min ||A w - z||^2 + alpha n ||w||^2 with A standardised, z the z-scored target.
    mu, sd = feats.mean(0), feats.std(0) + 1e-8
    a = (feats - mu) / sd
    z = (target - target.mean()) / target.std()
    aug_a = np.vstack([a, np.sqrt(alpha * len(a)) * np.eye(a.shape[1])])
    aug_z = np.concatenate([z - z.mean(), np.zeros(a.shape[1])])
    w_ref = np.linalg.lstsq(aug_a, aug_z, rcond=None)[0]
    expected = a @ w_ref + z.mean()
    np.testing.assert_allclose(model.predict(texts), expected, atol=2e-4)
    test_texts, test_target = _synthetic(100, seed=1)
    assert spearman(model.predict(test_texts), test_target) > 0.9
    # Embedding every candidate once (fit_predict) gives what fitting on the probes and predicting all does.
    positions = np.arange(0, 200, 3)
    once, once_result = model.fit_predict(texts, positions, target[positions])
    other = RidgeInfluenceModel(cfg)
    twice_result = other.fit([texts[i] for i in positions], target[positions])
    np.testing.assert_allclose(once, other.predict(texts), rtol=0, atol=1e-12)
    assert once_result == twice_result


def test_token_embeddings_are_the_mean_input_embedding_of_every_token():
    net = _net()
    text = " ".join(WORDS * 30)  # far beyond max_length: static features read every token
    ids = net.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > net.cfg.max_length * net.cfg.max_chunks
    table = net.encoder.get_input_embeddings().weight.detach()
    torch.testing.assert_close(net.embed_tokens([text])[0], table[torch.tensor(ids)].mean(0))


def test_config_errors_name_the_field_and_the_fix():
    from mates_megatron.influence import INFLUENCE_MODELS, build_influence_model
    from mates_megatron.influence.config import FinetuneConfig, InfluenceConfig, RidgeConfig
    from mates_megatron.influence.finetune import FinetuneInfluenceModel
    from mates_megatron.influence.relational import RelationalInfluenceModel
    from mates_megatron.influence.ridge import RidgeInfluenceModel

    assert dict(INFLUENCE_MODELS.items()) == {
        "finetune": FinetuneInfluenceModel,
        "relational": RelationalInfluenceModel,
        "ridge": RidgeInfluenceModel,
    }
    assert type(build_influence_model(_cfg("ridge"))) is RidgeInfluenceModel
    cases = [
        (
            lambda: RidgeConfig(features="bag"),
            "RidgeConfig.features='bag': use 'encoder' or 'token_embeddings'",
        ),
        (lambda: RidgeConfig(folds=1), r"RidgeConfig.folds=1: cross-validation needs folds >= 2"),
        (lambda: RidgeConfig(alphas=()), r"RidgeConfig.alphas=\(\): give one or more positive"),
        (lambda: RidgeConfig(alphas=(1.0, 0.0)), r"RidgeConfig.alphas=\(1.0, 0.0\)"),
        (lambda: FinetuneConfig(epochs=0), "FinetuneConfig.epochs=0: set epochs >= 1"),
        (lambda: FinetuneConfig(batch_size=0), "FinetuneConfig.batch_size=0: set batch_size >= 1"),
        (lambda: FinetuneConfig(val_fraction=1.0), r"FinetuneConfig.val_fraction=1.0 must be in \(0, 1\)"),
        (lambda: FinetuneConfig(lr=-1.0), "learning rates must be >= 0"),
        (
            lambda: InfluenceConfig(model="lasso"),
            "InfluenceConfig.model='lasso': choose one of finetune, relational, ridge",
        ),
        (lambda: InfluenceConfig(max_length=4), "InfluenceConfig.max_length=4: set max_length >= 8"),
        (lambda: InfluenceConfig(max_chunks=0), "InfluenceConfig.max_chunks=0: set max_chunks >= 1"),
        (lambda: InfluenceConfig(predict_batch_size=0), "InfluenceConfig.predict_batch_size=0"),
        (
            lambda: InfluenceConfig(loader_workers=-1),
            "InfluenceConfig.loader_workers=-1: set loader_workers >= 0",
        ),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    assert RidgeConfig(alphas=[1, 2]).alphas == (1.0, 2.0)
    with pytest.raises(TypeError, match="InfluenceConfig.ridge is a dict, not a RidgeConfig"):
        InfluenceConfig(ridge={"features": "encoder"})
    cfg = _cfg()
    cfg.model = "lasso"  # past validation: the registry names what it knows
    with pytest.raises(
        ValueError,
        match="unknown influence model 'lasso'; registered: finetune, relational, ridge \\(register your own with @INFLUENCE_MODELS",
    ):
        build_influence_model(cfg)


def _score_round(texts, positions, target, ranks):
    from mates_megatron.influence.runner import InfluenceRunner

    torch.set_num_threads(1)
    cfg = _cfg("ridge", max_length=32)
    runner = InfluenceRunner(cfg, ranks=ranks)
    pred, sp, pe = runner.score_round(texts if runner.member else [], positions, target[positions])
    other = InfluenceRunner(cfg, ranks=ranks)
    other.load_state_dict(runner.state_dict())
    restored = other.model.predict(texts, group=other.group) if other.member else None
    state_keys = sorted(runner.state_dict()["model"] or {})
    return pred, sp, pe, state_keys, restored


def test_score_round_is_identical_on_every_rank_and_equals_one_process():
    """Frozen encoder: 2-rank embedding + ridge gives one process's predictions on every rank, also when
    only rank 0 runs the influence model; the checkpointed state is the head alone, and it restores them."""
    texts, target = _synthetic(61, seed=4)
    positions = np.arange(0, 61, 2)
    one = run_on_ranks(_score_round, 1, texts, positions, target, None)[0]
    both = run_on_ranks(_score_round, 2, texts, positions, target, None)
    subset = run_on_ranks(_score_round, 2, texts, positions, target, [0])
    for pred, sp, pe, _, _ in both + subset:
        np.testing.assert_allclose(pred, one[0], rtol=0, atol=1e-9)
        assert (sp, pe) == (one[1], one[2])
    assert both[0][0].tolist() == both[1][0].tolist()
    assert one[3] == ["bias", "weight"]
    assert subset[1][3] == [] and subset[1][4] is None  # rank 1 holds no model
    for pred, _, _, _, restored in [one, *both, subset[0]]:
        np.testing.assert_allclose(restored, pred, rtol=0, atol=1e-9)


class _RecordingTexts:
    """A lazily read text sequence (like ``pool.CandidateTexts``) that records which positions were read."""

    def __init__(self, texts):
        self.texts, self.read = texts, set()

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            positions = range(*i.indices(len(self.texts)))
            self.read.update(positions)
            return [self.texts[k] for k in positions]
        self.read.add(int(i))
        return self.texts[int(i)]


def _reads(texts, positions, target, model):
    from mates_megatron.influence.runner import InfluenceRunner

    torch.set_num_threads(1)
    # Read in this process (loader_workers=0), where the recording sees it; the loader's batches are the same
    # with workers (tests/distributed/test_influence_loader.py).
    cfg = _cfg(model, max_length=32, finetune_epochs=1, finetune_batch_size=8)
    runner = InfluenceRunner(cfg, device="cpu")
    recording = _RecordingTexts(texts)
    pred, _, _ = runner.score_round(recording, positions, target[positions])
    return sorted(recording.read), pred


@pytest.mark.parametrize("model", ["ridge", "finetune"])
def test_each_member_reads_only_the_probes_and_its_own_shard(model):
    """The sharded influence stage: a member decodes its contiguous block of the round and the probes,
    never the whole round, and every member still gets every score (float32 on the wire)."""
    texts, target = _synthetic(41, seed=9)
    positions = np.arange(0, 41, 4)  # 11 probes, spread over both shards
    (read0, pred0), (read1, pred1) = run_on_ranks(_reads, 2, texts, positions, target, model)
    assert read0 == sorted(set(range(0, 21)) | set(positions.tolist()))
    assert read1 == sorted(set(range(21, 41)) | set(positions.tolist()))
    assert pred0.tolist() == pred1.tolist() and pred0.dtype == np.float64 and len(pred0) == 41
    assert np.array_equal(pred0, pred0.astype(np.float32).astype(np.float64))  # gathered as float32
    if model == "ridge":  # deterministic: equals one process reading a plain list
        one = run_on_ranks(_score_round, 1, texts, positions, target, None)[0][0]
        np.testing.assert_allclose(pred0, one, rtol=0, atol=1e-6)
