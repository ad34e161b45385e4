"""The selection-cost projection: its FLOP counts against torch's FLOP counter on the real models, the round's
phases, and the refusal before anything is built."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mates_megatron.compat.spawn import run_on_ranks
from mates_megatron.config import SelectionConfig
from mates_megatron.configio import build, load_yaml
from mates_megatron.cost import RoundCost, TransformerShape, check_round_cost, project_mates_round
from mates_megatron.influence.config import InfluenceConfig

SEQ, VOCAB = 32, 200


def _gpt_flops() -> tuple[int, int, int]:
    """Forward and forward+backward FLOPs of one 2-row batch through a real megatron-core GPTModel."""
    from mates_megatron.compat.cpu import enable_cpu_mode
    from mates_megatron.training.model import GPTConfig, build_gpt_model
    from mates_megatron.training.parallel import ParallelConfig, initialize_parallel

    enable_cpu_mode()
    initialize_parallel(ParallelConfig(cpu=True), seed=1)
    cfg = GPTConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, seq_length=SEQ,
                    vocab_size=VOCAB, make_vocab_size_divisible_by=64)  # fmt: skip
    model = build_gpt_model(cfg, cpu=True)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, -1)
    with FlopCounterMode(display=False) as fwd:
        model(tokens, positions, None, labels=tokens).sum()
    with FlopCounterMode(display=False) as both:
        model(tokens, positions, None, labels=tokens).sum().backward()
    return fwd.get_total_flops(), both.get_total_flops(), cfg.padded_vocab_size(1)


def test_gpt_flops_match_torch_flop_counter_on_megatron_gpt():
    fwd, both, vocab = run_on_ranks(_gpt_flops, 1)[0]
    shape = TransformerShape(num_layers=2, hidden_size=64, ffn_hidden_size=96, vocab_size=vocab)
    projected = 2 * SEQ * shape.forward_flops_per_token(SEQ)
    # Every term counts at this size (logits ~40%, attention scores ~15%): all must be right for 1%.
    assert projected == pytest.approx(fwd, rel=0.01)
    assert 3 * projected == pytest.approx(both, rel=0.01)  # backward = 2 x forward


def test_encoder_flops_match_torch_flop_counter_on_the_embedded_encoder():
    from mates_megatron.influence.encoder import EncoderRegressor

    cfg = InfluenceConfig(max_length=128, max_chunks=1)
    enc = EncoderRegressor(cfg)
    shape = TransformerShape.from_encoder_dir(cfg.resolved_path())
    assert (shape.num_layers, shape.hidden_size, shape.ffn_hidden_size) == (6, 384, 1536)  # all-MiniLM-L6-v2
    # torch's counter does not count the CPU kernel of scaled_dot_product_attention: eager attention is the
    # same matmuls, counted.
    enc.encoder.set_attn_implementation("eager")
    ids = torch.randint(1000, 2000, (3, 1, 128))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        enc.embed(ids, torch.ones_like(ids))
    projected = 3 * 128 * shape.forward_flops_per_token(128, logits=False)
    assert projected == pytest.approx(counter.get_total_flops(), rel=0.01)


GPT = TransformerShape(num_layers=4, hidden_size=256, ffn_hidden_size=1024, vocab_size=1000)
ENC = TransformerShape(num_layers=2, hidden_size=64, ffn_hidden_size=128, vocab_size=500)


def _sel(**kw) -> SelectionConfig:
    base = {"scorer": "mates", "selector": "gumbel", "select_every": 10, "selection_ratio": 0.25,
            "probe_samples": 16, "warmup_steps": 10, "influence": {"model": "ridge", "max_length": 64, "max_chunks": 2}}  # fmt: skip
    return build(SelectionConfig, {**base, **kw}, where="test")


def _project(sel: SelectionConfig, **kw) -> RoundCost:
    args = {"model": GPT, "seq_length": 100, "global_batch_size": 8, "reference_rows": 20, "encoder": ENC}
    return project_mates_round(sel, **{**args, **kw})


def test_round_phases_count_what_each_estimator_runs():
    f = GPT.forward_flops_per_token(100) * 100  # one row, forward
    e = ENC.forward_flops_per_token(64, logits=False) * 100  # one candidate: 100 tokens in two chunks of 64
    lin = _project(_sel(estimator="linearized"))
    assert lin.training == 3 * f * 10 * 8  # select_every steps of 8 rows, forward and backward
    assert lin.counts == {"probes": 16, "reference_rows": 20, "candidates": 320, "encoder_tokens": 100}
    assert lin.phases["probe"] == 3 * f * (20 + 16)  # one reference gradient, one gradient per probe
    assert lin.phases["fit"] == 16 * e and lin.phases["predict"] == 320 * e
    oracle = _project(_sel(estimator="oracle")).phases["probe"]
    assert oracle == 16 * (3 * f + 20 * f) + 20 * f  # per probe: a step, then the whole reference set
    # The oracle's cost grows with probes x reference rows; the linearized form's with their sum.
    assert _project(_sel(estimator="oracle"), reference_rows=40).phases["probe"] > 1.8 * oracle
    assert (
        _project(_sel(estimator="linearized"), reference_rows=40).phases["probe"] < 1.6 * lin.phases["probe"]
    )
    mirrored = _project(_sel(estimator="mirrored")).phases["probe"]
    assert mirrored == 3 * f * 20 + 16 * 2 * f
    # Candidates shorter than max_length x max_chunks are cut at seq_length; longer ones at the chunks.
    assert _project(_sel(), seq_length=300).counts["encoder_tokens"] == 128
    static = _project(_sel(influence={"model": "ridge", "ridge": {"features": "token_embeddings"}}))
    assert static.phases["predict"] == 320 * 100 * ENC.hidden_size
    tuned = _project(_sel(influence={"model": "finetune", "max_length": 64, "finetune": {"epochs": 2}}))
    assert tuned.phases["fit"] > 2 * 16 * e  # epochs of forward and backward on the training split
    # influence_rounds=3: two earlier rounds' probes are fitted on again and predicted beside the candidates.
    smoothed = _project(_sel(estimator="linearized", influence_rounds=3))
    assert smoothed.phases["fit"] == 48 * e and smoothed.phases["predict"] == (320 + 32) * e
    assert smoothed.phases["probe"] == lin.phases["probe"]  # no new probes


def test_refusal_names_the_field_the_flag_and_the_largest_phase():
    cost = _project(_sel(estimator="oracle"))
    assert cost.fraction > 0.1
    check_round_cost(cost, cost.fraction)  # at the limit: allowed
    with pytest.raises(ValueError) as e:
        check_round_cost(cost, 0.1)
    msg = str(e.value)
    assert msg.startswith(f"projected selection cost per round: {cost.fraction:.2%} of the round's training")
    assert "above SelectionConfig.max_selection_cost=0.1 (--mates-max-selection-cost)" in msg
    assert (
        "The largest phase is probe: fewer probe_samples or reference rows, or estimator: linearized" in msg
    )
    assert "16 probes against 20 reference rows and 320 candidates of 100 encoder tokens" in msg


# Pythia shapes as examples/megatron_lm/pretrain_gpt_mates.sh passes them (GPT-NeoX vocab padded to 50304),
# 1,024-token rows, 512 rows a step, LAMBADA's 5,153 examples as the reference set.
PAPER = {
    "410m": (TransformerShape(24, 1024, 4096, 50304), 0.067),
    "1b": (TransformerShape(16, 2048, 8192, 50304), 0.038),
}


@pytest.mark.parametrize("size", sorted(PAPER))
def test_paper_configs_project_what_their_comments_say(size):
    """With MiniLM and the linearized oracle, MATES costs a few percent of training at the paper's scale (the
    figure in the config's comment); the paper's oracle would be about 27 times training."""
    gpt, said = PAPER[size]
    sel = build(SelectionConfig, load_yaml(f"configs/paper_{size}.yaml")["selection"], where=size)
    kw = {"model": gpt, "seq_length": 1024, "global_batch_size": 512, "reference_rows": 5153}
    cost = project_mates_round(sel, **kw)
    assert sel.estimator == "linearized" and cost.fraction < sel.max_selection_cost
    assert cost.fraction == pytest.approx(said, abs=0.0006)
    oracle = project_mates_round(dataclasses.replace(sel, estimator="oracle"), **kw)
    assert oracle.fraction == pytest.approx(27, abs=0.5)


def test_demo_config_allows_what_it_projects():
    """The CPU demo's probes are most of its round (its comment says about 60%), under its own limit."""
    raw = load_yaml("configs/demo_cpu.yaml")
    m = raw["model"]
    gpt = TransformerShape(m["num_layers"], m["hidden_size"], 4 * m["hidden_size"], m["vocab_size"])
    sel = build(SelectionConfig, raw["selection"], where="demo")
    cost = project_mates_round(sel, model=gpt, seq_length=m["seq_length"],
                               global_batch_size=raw["global_batch_size"], reference_rows=256)  # fmt: skip
    assert cost.fraction == pytest.approx(0.60, abs=0.01) and cost.fraction < sel.max_selection_cost
    assert cost.phases["probe"] > 0.99 * cost.selection


def test_build_plugin_refuses_before_building_anything(tmp_path):
    from mates_megatron.plugin import build_plugin

    sel = _sel(estimator="oracle", pool="webdataset", shards=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"max_selection_cost=0\.1 \(--mates-max-selection-cost\)"):
        build_plugin(sel, train_iters=20, global_batch_size=8, micro_batch_size=8, seq_length=100, dp_rank=0,
                     dp_size=1, model_shape=GPT, reference_rows=20)  # fmt: skip
    # Without a model shape nothing is projected: the next thing to fail is the missing pool.
    with pytest.raises(Exception, match="missing"):
        build_plugin(sel, train_iters=20, global_batch_size=8, micro_batch_size=8, seq_length=100, dp_rank=0,
                     dp_size=1)  # fmt: skip
