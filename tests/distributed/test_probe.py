"""Oracle data influence on the live sharded model: exact restore, TP/PP/DP parity, a hand-computed AdamW oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

VOCAB, SEQ = 512, 16
LR, WD, CLIP, B1, B2, EPS = 1e-2, 0.1, 1.0, 0.9, 0.95, 1e-8


def _batch(tokens: np.ndarray, mask: np.ndarray | None = None):
    from mates_megatron.probe.reference import make_batch

    return make_batch(tokens, np.ones((tokens.shape[0], SEQ), np.float32) if mask is None else mask)


def _data():
    g = np.random.default_rng(0)
    samples = [_batch(g.integers(0, VOCAB, (1, SEQ + 1))) for _ in range(6)]
    ref_tokens = g.integers(0, VOCAB, (4, SEQ + 1))
    ref_mask = np.zeros((4, SEQ), np.float32)
    ref_mask[:, -3:] = 1  # LAMBADA form: only the last tokens count
    reference = [_batch(ref_tokens[i : i + 2], ref_mask[i : i + 2]) for i in (0, 2)]
    return samples, reference


def _full_weights():
    """TP=1 initial weights, shared by every layout."""
    model = _build(1, 1)[0]
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _build(tp: int, pp: int, *, distopt: bool = False, weights=None):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from mates_megatron.compat.cpu import enable_cpu_mode
    from mates_megatron.training.model import GPTConfig, build_gpt_model
    from mates_megatron.training.parallel import ParallelConfig, initialize_parallel
    from mates_megatron.training.sharding import load_full_state

    enable_cpu_mode()
    initialize_parallel(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, cpu=True), seed=3
    )
    cfg = GPTConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        seq_length=SEQ,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=64,
    )
    model = build_gpt_model(cfg, cpu=True)
    if weights is not None:
        load_full_state(model, weights)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distopt),
        module=model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR, weight_decay=WD, clip_grad=CLIP, adam_beta1=B1,
                        adam_beta2=B2, adam_eps=EPS, use_distributed_optimizer=distopt),
        [ddp],
    )  # fmt: skip
    sched = OptimizerParamScheduler(opt, init_lr=LR, max_lr=LR, min_lr=LR, lr_warmup_steps=0, lr_decay_steps=100,
                                    lr_decay_style="constant", start_wd=WD, end_wd=WD, wd_incr_steps=100,
                                    wd_incr_style="constant")  # fmt: skip
    return model, ddp, opt, sched


def _ctx(ddp, opt, sched, reference, distopt=False):
    from mates_megatron.host import ProcessGroups
    from mates_megatron.probe.estimators import ProbeContext

    return ProbeContext(
        [ddp],
        opt,
        sched,
        reference,
        SEQ,
        torch.device("cpu"),
        ProcessGroups.from_parallel_state(),
        distributed_optimizer=distopt,
        show_progress=False,
    )


def _scores(tp, pp, weights, distopt=False):
    from mates_megatron.probe.estimators import ESTIMATORS

    _, ddp, opt, sched = _build(tp, pp, distopt=distopt, weights=weights)
    samples, reference = _data()
    ctx = _ctx(ddp, opt, sched, reference, distopt)
    return {name: est(ctx).score(samples).scores.tolist() for name, est in ESTIMATORS.items()}


@pytest.fixture(scope="module")
def weights():
    return run_on_ranks(_full_weights, 1)[0]


@pytest.fixture(scope="module")
def tp1_scores(weights):
    return run_on_ranks(_scores, 1, 1, 1, weights)[0]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_tp2_and_pp2_scores_equal_tp1(weights, tp1_scores, tp, pp):
    for rank_scores in run_on_ranks(_scores, 2, tp, pp, weights):
        for name in ("oracle", "linearized", "mirrored"):
            torch.testing.assert_close(
                torch.tensor(rank_scores[name]), torch.tensor(tp1_scores[name]), rtol=0, atol=2e-5, msg=name
            )


def _dp_scores_and_shares(weights, distopt):
    from mates_megatron.probe import estimators

    scores = _scores(1, 1, weights, distopt)
    from mates_megatron.host import ProcessGroups

    groups = ProcessGroups.from_parallel_state()
    ctx = estimators.ProbeContext(
        [], None, None, [], SEQ, torch.device("cpu"), groups, distributed_optimizer=distopt
    )
    return scores, estimators._my_share(6, ctx).tolist()


@pytest.mark.parametrize("distopt", [False, True], ids=["split", "distributed-optimizer"])
def test_dp2_splits_probes_and_gathers_dp1_scores(weights, tp1_scores, distopt):
    (s0, share0), (s1, share1) = run_on_ranks(_dp_scores_and_shares, 2, weights, distopt)
    if distopt:
        assert share0 == share1 == list(range(6))  # sharded Adam state: replicas probe together
    else:
        assert share0 == [0, 2, 4] and share1 == [1, 3, 5]  # disjoint, covering
    for name in ("oracle", "linearized", "mirrored"):
        assert s0[name] == s1[name]
        torch.testing.assert_close(torch.tensor(s0[name]), torch.tensor(tp1_scores[name]), rtol=0, atol=2e-5)


def _state(model, ddp, opt, sched):
    from mates_megatron.runtime.rng import get_rng_state

    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [b.grad_data.clone() for b in ddp.buffers],
        "opt": [
            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.state[p].items()}
            for p in inner.state
        ],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups],
        "sched": sched.num_steps,
        "rng": get_rng_state(),
    }


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _restore_check():
    from mates_megatron.probe.estimators import ESTIMATORS, OracleProber
    from mates_megatron.runtime.schedule import run_schedule

    model, ddp, opt, sched = _build(1, 1)
    samples, reference = _data()
    for s in samples[:3]:  # real training first: Adam moments and step counts are non-trivial
        ddp.zero_grad_buffer()
        opt.zero_grad()
        run_schedule([ddp], [s], seq_length=SEQ, forward_only=False, device=torch.device("cpu"))
        opt.step()
        sched.step(1)
    # Leave a gradient in the buffers too: restore must bring it back.
    run_schedule([ddp], [samples[4]], seq_length=SEQ, forward_only=False, device=torch.device("cpu"))
    before = _state(model, ddp, opt, sched)
    ctx = _ctx(ddp, opt, sched, reference)
    for _, est in ESTIMATORS.items():
        est(ctx).score(samples)
    after_probes = _same(before, _state(model, ddp, opt, sched))
    bad = _batch(np.full((1, SEQ + 1), VOCAB * 4))  # token ids past the vocabulary: the forward raises
    raised = False
    try:
        OracleProber(ctx).score([samples[0], bad, samples[1]])
    except (IndexError, RuntimeError):
        raised = True
    return after_probes, raised, _same(before, _state(model, ddp, opt, sched))


def test_restore_is_bit_identical_after_probes_and_after_a_probe_that_raises():
    after_probes, raised, after_raise = run_on_ranks(_restore_check, 1)[0]
    assert after_probes
    assert raised
    assert after_raise


def _hand_oracle():
    """The oracle of sample 0 written out: grad, global-norm clipping, AdamW step 1, reference loss."""
    from torch.func import functional_call

    from mates_megatron.probe.estimators import OracleProber

    model, ddp, opt, sched = _build(1, 1)
    samples, reference = _data()
    prober_score = OracleProber(_ctx(ddp, opt, sched, reference)).score(samples[:1]).scores[0]

    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    s = samples[0]
    out = functional_call(model, params, (s["tokens"], s["position_ids"], None), {"labels": s["labels"]})
    loss = (out.float() * s["loss_mask"]).sum() / s["loss_mask"].sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    clip = min(1.0, CLIP / (float(norm) + 1e-6))
    new = {}
    for k, p in params.items():
        g = grads[k] * clip
        m, v = (1 - B1) * g, (1 - B2) * g * g  # first Adam step from zero moments
        m_hat, v_hat = m / (1 - B1), v / (1 - B2)
        wd = 0.0 if (k.endswith(".bias") or p.dim() == 1) else WD  # megatron: no decay on biases and norms
        new[k] = p.detach() * (1 - LR * wd) - LR * m_hat / (v_hat.sqrt() + EPS)
    total = tokens = 0.0
    with torch.no_grad():
        model.eval()
        for b in reference:
            out = functional_call(model, new, (b["tokens"], b["position_ids"], None), {"labels": b["labels"]})
            total += float((out.double() * b["loss_mask"]).sum())
            tokens += float(b["loss_mask"].sum())
    return float(prober_score), total / tokens


def test_oracle_equals_hand_written_adamw_step():
    prober, hand = run_on_ranks(_hand_oracle, 1)[0]
    assert abs(prober - hand) < 1e-5, (prober, hand)
