"""The selection-cost projection: its FLOP and parameter counts against torch's FLOP counter and the real models,
the round's phases, the seconds' terms a FLOP count leaves out (x dp, per-probe memory work, pipeline
serialisation, packed reference rows, host-side decode and tokenisation) by hand, and the refusal before anything
is built."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mates_megatron.compat.spawn import run_on_ranks
from mates_megatron.config import SelectionConfig
from mates_megatron.configio import build, load_yaml, merge
from mates_megatron.cost import (
    MACHINES,
    Layout,
    Machine,
    RankSeconds,
    RoundCost,
    TransformerShape,
    check_round_cost,
    project_mates_round,
)
from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.scorers.mates import MatesConfig

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
    params = [p.numel() for p in model.parameters()]
    return fwd.get_total_flops(), both.get_total_flops(), cfg.padded_vocab_size(1), params


def test_gpt_flops_and_parameters_match_megatron_gpt():
    fwd, both, vocab, params = run_on_ranks(_gpt_flops, 1)[0]
    shape = TransformerShape(num_layers=2, hidden_size=64, ffn_hidden_size=96, vocab_size=vocab)
    projected = 2 * SEQ * shape.forward_flops_per_token(SEQ)
    # Every term counts at this size (logits ~40%, attention scores ~15%): all must be right for 1%.
    assert projected == pytest.approx(fwd, rel=0.01)
    assert 3 * projected == pytest.approx(both, rel=0.01)  # backward = 2 x forward
    # What the per-probe memory work is counted on: every weight, bias and norm, the tied embedding once and
    # the learned position table (the project's GPT).
    assert dataclasses.replace(shape, position_embeddings=SEQ).parameters() == sum(params)
    assert (
        dataclasses.replace(shape, tied_embeddings=False).parameters() == sum(params) - SEQ * 64 + vocab * 64
    )


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


MATES_FIELDS = {f.name for f in dataclasses.fields(MatesConfig)}


def _sel(**kw) -> SelectionConfig:
    """A 'mates' selection; keywords that are MatesConfig fields set the scorer's options."""
    mates = {"probe_samples": 16, "influence": {"model": "ridge", "max_length": 64, "max_chunks": 2}}
    mates.update({k: v for k, v in kw.items() if k in MATES_FIELDS})
    base = {"scorer": "mates", "selector": "gumbel", "select_every": 10, "selection_ratio": 0.25,
            "warmup_steps": 10, "scorer_options": mates}  # fmt: skip
    return build(
        SelectionConfig, {**base, **{k: v for k, v in kw.items() if k not in MATES_FIELDS}}, where="test"
    )


def _with(sel: SelectionConfig, **options) -> SelectionConfig:
    """``sel`` with these 'mates' options laid over its own (nested sections merged)."""
    return dataclasses.replace(sel, scorer_options=merge(sel.scorer_options, options))


def _project(sel: SelectionConfig, **kw) -> RoundCost:
    args = {"model": GPT, "seq_length": 100, "global_batch_size": 8, "reference_rows": 20, "encoder": ENC}
    return project_mates_round(sel, **{**args, **kw})


def test_round_phases_count_what_each_estimator_runs():
    f = GPT.forward_flops_per_token(100) * 100  # one row, forward
    e = ENC.forward_flops_per_token(64, logits=False) * 100  # one candidate: 100 tokens in two chunks of 64
    lin = _project(_sel(estimator="linearized"))
    assert lin.training == 3 * f * 10 * 8  # select_every steps of 8 rows, forward and backward
    assert lin.counts == {"probes": 16, "reference_rows": 20, "candidates": 320, "encoder_tokens": 100,
                          "probes_per_rank": 16}  # fmt: skip
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
    # The forward estimator: one reference gradient, then each probe's loss at θ + s·d and θ - s·d.
    assert _project(_sel(estimator="forward")).phases["probe"] == 3 * f * 20 + 16 * 2 * f
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


# A machine whose every rate but one is infinite isolates a term: FLOPs only (no memory, launch or link cost).
FLOPS_ONLY = Machine(
    name="flops-only", matmul_flops=1e12, matmul_flops_batch1=5e11, backward_matmul_speedup=1.0,
    memory_bandwidth=1e40, fresh_memory_bandwidth=1e40, logit_bytes_forward=32.0,
    logit_bytes_forward_backward=40.0, adam_bytes_per_element=28.0, pass_overhead_s=0.0, layer_overhead_s=0.0,
    op_overhead_s=0.0, host_flops=1e9, tokenize_tokens_per_s=1e6, ngram_tokens_per_s=1e6, collective_latency_s=0.0, link_bandwidth=1e40,
    host_link_bandwidth=1e40, source="test",
)  # fmt: skip
BYTES_ONLY = dataclasses.replace(
    FLOPS_ONLY, name="bytes-only", matmul_flops=1e40, matmul_flops_batch1=1e40, memory_bandwidth=1e9
)


def _probe(estimator: str, layout: Layout, machine: Machine = FLOPS_ONLY, **kw) -> RoundCost:
    sel = _sel(estimator=estimator, influence={"model": "ridge", "pass_token_ids": True})
    return _project(sel, layout=layout, machine=machine, **kw)


def test_replicas_probe_every_sample_when_the_estimator_steps_a_distributed_optimizer():
    """Under the distributed optimizer an estimator that steps it (oracle, linearized, mirrored) probes every
    sample on every replica (Adam's state is sharded over them): x dp. The forward estimator steps nothing and
    splits the samples. A FLOP count per round has no replicas at all."""
    b1 = 3 * GPT.forward_flops_per_token(100) * 100 / 5e11  # one probe's forward-backward at batch 1
    ddp, dist = Layout(dp=8), Layout(dp=8, distributed_optimizer=True)
    for estimator in ("oracle", "linearized"):
        split, together = _probe(estimator, ddp), _probe(estimator, dist)
        assert split.counts["probes_per_rank"] == 2 and together.counts["probes_per_rank"] == 16
        assert split.seconds["probe"]["forward_backward"] == pytest.approx(2 * b1, rel=1e-12)
        assert together.seconds["probe"]["forward_backward"] == pytest.approx(16 * b1, rel=1e-12)
    assert _probe("mirrored", dist).counts["probes_per_rank"] == 16
    forward = _probe("forward", dist)
    assert forward.counts["probes_per_rank"] == 2  # 16 probes over 8 replicas, distributed optimizer or not
    # Two batched forward passes of the rank's 2 probes, in one micro-batch of the layout's 8 rows.
    f8 = 8 * GPT.forward_flops_per_token(100) * 100 / 1e12
    assert forward.seconds["probe"]["forward"] == pytest.approx(2 * f8, rel=1e-12)
    assert "every replica probes every sample" in " ".join(_probe("linearized", dist).assumptions)


def test_a_probe_at_batch_1_passes_the_pipeline_stages_one_after_another():
    """pp stages give a probe no speed-up: one sample's forward-backward takes pp x a stage's time. Training's
    micro-batches fill the pipeline: m micro-batches take (m + pp - 1) stage times."""
    f = GPT.forward_flops_per_token(100) * 100
    for pp in (1, 4):
        work = RankSeconds(GPT, Layout(pp=pp, micro_batch_size=8), FLOPS_ONLY, 100)
        stage = 3 * f / (pp * 5e11)  # a stage's share of one row, forward and backward, at batch 1
        assert work.pipeline(1, backward=True) == pytest.approx(pp * stage, rel=1e-12)
        assert work.pipeline(1, backward=True) == pytest.approx(3 * f / 5e11, rel=1e-12)
        # 32 rows of a step in 4 micro-batches of 8.
        assert work.pipeline(32, backward=True) == pytest.approx(
            (4 + pp - 1) * 8 * 3 * f / (pp * 1e12), rel=1e-12
        )
    cost = _probe("linearized", Layout(pp=4, micro_batch_size=8))
    assert cost.seconds["probe"]["forward_backward"] == pytest.approx(16 * 3 * f / 5e11, rel=1e-12)


def test_reference_rows_count_at_their_packed_length_when_their_tokens_are_given():
    f = GPT.forward_flops_per_token(100) * 100
    padded = _probe("linearized", Layout(micro_batch_size=8))  # 20 rows padded to 100 tokens
    packed = _probe("linearized", Layout(micro_batch_size=8), reference_tokens=800)  # 8 full rows: one
    assert padded.counts["reference_rows"] == 20 and packed.counts["reference_rows"] == 8
    assert packed.phases["probe"] == 3 * f * (8 + 16)
    assert padded.seconds["probe"]["reference"] == pytest.approx(20 * 3 * f / 1e12, rel=1e-12)  # 8 + 8 + 4
    assert packed.seconds["probe"]["reference"] == pytest.approx(8 * 3 * f / 1e12, rel=1e-12)
    assert "packed rows (800 tokens)" in " ".join(packed.assumptions)


def test_each_stepping_probe_pays_the_optimizer_step_restore_and_dot_over_memory():
    """Per probe, bytes over bandwidth: Adam (28 per main element here) + clipping's norm (4) and scaling (8);
    the restore copies parameters (2 x 4), both moments (16) and zeroes the gradients (4); the dot reads the
    gradient and the update (20). Under the distributed optimizer the main elements are the rank's shard; bf16
    adds the main copies (restore 8, step 6) and halves the parameters' bytes."""
    n = GPT.parameters()
    work = RankSeconds(GPT, Layout(), BYTES_ONLY, 100)
    assert work.optimizer_step() == pytest.approx(n * (28 + 4 + 8) / 1e9, rel=1e-12)
    assert work.restore() == pytest.approx(n * (8 + 16 + 4) / 1e9, rel=1e-12)
    assert work.dot() == pytest.approx(n * 20 / 1e9, rel=1e-12)
    shard = RankSeconds(GPT, Layout(dp=4, distributed_optimizer=True, bf16=True), BYTES_ONLY, 100)
    assert shard.optimizer_step() == pytest.approx(n / 4 * (28 + 4 + 8 + 6) / 1e9, rel=1e-9)
    assert shard.restore() == pytest.approx((n * 2 * 2 + n / 4 * (8 + 16) + n * 4) / 1e9, rel=1e-12)
    cost = _probe("linearized", Layout(), BYTES_ONLY)
    for part, per in (
        ("optimizer_step", work.optimizer_step()),
        ("dot", work.dot()),
        ("restore", work.restore()),
    ):
        assert cost.seconds["probe"][part] == pytest.approx(16 * per, rel=1e-12)


def test_prediction_decodes_and_tokenises_every_candidate_on_the_host():
    # 320 candidates of 100 tokens over 2 influence ranks, at 1e6 tokens per second.
    serial = _project(
        _sel(influence={"model": "ridge", "loader_workers": 0}), layout=Layout(dp=2), machine=FLOPS_ONLY
    )
    assert serial.seconds["predict"]["decode_tokenise"] == pytest.approx(160 * 100 / 1e6)
    assert serial.seconds["fit"]["decode_tokenise"] == pytest.approx(8 * 100 / 1e6)
    # Loader workers run it ahead of the encoder: only what W workers cannot hide behind it is counted.
    encoder = serial.seconds["predict"]["encoder"] / 160
    for workers in (1, 2, 64):
        sel = _sel(influence={"model": "ridge", "loader_workers": workers})
        cost = _project(sel, layout=Layout(dp=2), machine=FLOPS_ONLY)
        hidden = max(0.0, 100 / 1e6 / workers - encoder)
        assert cost.seconds["predict"]["decode_tokenise"] == pytest.approx(160 * hidden)
        assert cost.seconds["predict"]["encoder"] == serial.seconds["predict"]["encoder"]
    ids = _project(
        _sel(influence={"model": "ridge", "pass_token_ids": True}), layout=Layout(dp=2), machine=FLOPS_ONLY
    )
    assert ids.seconds["predict"]["decode_tokenise"] == 0.0


def test_the_scorer_is_projected_on_what_the_filters_leave_it():
    # 320 candidates a round; the classifier keeps 0.6 (192), then 0.5 of those (96): the scorer predicts 96.
    whole = _project(_sel(influence={"model": "ridge", "loader_workers": 0}), machine=FLOPS_ONLY)
    sel = _sel(influence={"model": "ridge", "loader_workers": 0},
               filters=[{"kind": "classifier", "keep": 0.6}, {"kind": "classifier", "keep": 0.5}])  # fmt: skip
    cost = _project(sel, machine=FLOPS_ONLY)
    assert whole.counts["candidates"] == 320 and cost.counts["candidates"] == 96
    assert cost.seconds["predict"]["encoder"] == pytest.approx(whole.seconds["predict"]["encoder"] * 96 / 320)
    assert cost.seconds["probe"] == whole.seconds["probe"]
    # Each n-gram filter reads, decodes and featurizes what reaches it (one rank: all of it) at 1e6 tokens/s.
    assert cost.seconds["filters"] == {
        "0_classifier": pytest.approx(320 * 100 / 1e6), "1_classifier": pytest.approx(192 * 100 / 1e6)
    }  # fmt: skip
    assert cost.assumptions[-1] == (
        "filters (classifier > classifier) leave the scorer 96 of the round's 320 candidates; the n-gram "
        "filters' pass is shared over the world's 1 ranks, one thread each"
    )
    lava = _project(_sel(influence={"model": "ridge", "loader_workers": 0}, filters=[{"kind": "lava", "keep": 0.5}]),
                    machine=FLOPS_ONLY)  # fmt: skip
    assert lava.seconds["filters"] == {} and lava.assumptions[-1].endswith(
        "not counted: the scoring of filter(s) lava"
    )


def test_refusal_names_the_field_the_flag_and_the_largest_phase():
    cost = _project(_sel(estimator="oracle"), machine="cpu-2core")
    assert cost.fraction > 0.1
    check_round_cost(cost, cost.fraction)  # at the limit: allowed
    with pytest.raises(ValueError) as e:
        check_round_cost(cost, 0.1)
    msg = str(e.value)
    assert msg.startswith(
        f"projected selection cost per round: {cost.fraction:.2%} of the round's training time"
    )
    assert "on cpu-2core" in msg and f"{cost.flop_fraction:.2%} in FLOPs" in msg
    assert "above SelectionConfig.max_selection_cost=0.1 (--mates-max-selection-cost)" in msg
    assert "The largest phase is probe (reference_loss" in msg
    assert "estimator: forward" in msg and "estimator: linearized" in msg
    assert "16 probes (16 per rank) against 20 reference rows and 320 candidates of 100 encoder tokens" in msg


# Pythia shapes as examples/megatron_lm/pretrain_gpt_mates.sh passes them (GPT-NeoX vocab padded to 50304,
# untied, rotary), 1,024-token rows, 512 rows a step over 8 replicas at micro-batch 16, bf16; LAMBADA's 5,153
# examples as the reference set. FLOP fraction and the corrected fraction (h100 preset) of the config's comment.
PAPER = {
    "410m": (
        TransformerShape(24, 1024, 4096, 50304, num_attention_heads=16, tied_embeddings=False),
        0.067,
        0.996,
    ),
    "1b": (
        TransformerShape(16, 2048, 8192, 50304, num_attention_heads=8, tied_embeddings=False),
        0.038,
        0.560,
    ),
}
PAPER_ROUND = {"seq_length": 1024, "global_batch_size": 512, "reference_rows": 5153}
PAPER_LAYOUT = Layout(dp=8, micro_batch_size=16, bf16=True)


def _paper(size: str, **kw) -> tuple[SelectionConfig, dict]:
    sel = build(SelectionConfig, load_yaml(f"configs/paper_{size}.yaml")["selection"], where=size)
    return sel, {"model": PAPER[size][0], **PAPER_ROUND, "layout": PAPER_LAYOUT, **kw}


@pytest.mark.parametrize("size", sorted(PAPER))
def test_paper_configs_project_what_their_comments_say(size):
    """In FLOPs, MATES with MiniLM and the linearized oracle is a few percent of training (the paper's oracle
    about 27 times); in seconds on H100s, decoding and tokenising 25.6M candidates in 4 loader workers per rank
    is about half (1b) or all (410m) of the round's training; without it about a tenth of training remains."""
    sel, kw = _paper(size)
    cost = project_mates_round(sel, **kw)
    _, flops, seconds = PAPER[size]
    assert sel.scorer_config.estimator == "linearized" and sel.cost_machine == "h100"
    assert cost.flop_fraction == pytest.approx(flops, abs=0.0006)
    assert cost.fraction == pytest.approx(seconds, abs=0.01) and cost.fraction < sel.max_selection_cost
    assert cost.dominant() == ("predict", "decode_tokenise")
    oracle = project_mates_round(_with(sel, estimator="oracle"), **kw)
    assert oracle.flop_fraction == pytest.approx(27, abs=0.5)
    ids = project_mates_round(_with(sel, influence={"pass_token_ids": True}), **kw)
    assert ids.fraction < 0.11  # 1b: 9.7%, 410m: 10.4%


def test_the_corrected_guard_refuses_what_the_flop_count_admitted():
    """paper_1b at the default limit (0.1): admitted in FLOPs (3.8%), refused in seconds, first for its host-side
    decode and tokenisation; with those gone, under the distributed optimizer, for the linearized probes that
    every replica runs (x 8), with the forward estimator as the lever."""
    sel, kw = _paper("1b")
    sel = dataclasses.replace(sel, max_selection_cost=0.1)
    cost = project_mates_round(sel, **kw)
    assert cost.flop_fraction < sel.max_selection_cost < cost.fraction
    with pytest.raises(ValueError, match=r"The largest phase is predict \(decode_tokenise \d+% of it\): "
                       r"influence\.pass_token_ids"):  # fmt: skip
        check_round_cost(cost, sel.max_selection_cost)
    ids = _with(sel, influence={"pass_token_ids": True})
    dist = project_mates_round(
        ids, **{**kw, "layout": dataclasses.replace(PAPER_LAYOUT, distributed_optimizer=True)}
    )
    assert dist.counts["probes_per_rank"] == 80_000
    with pytest.raises(
        ValueError, match=r"The largest phase is probe \(forward_backward \d+% of it\): estimator: forward"
    ):
        check_round_cost(dist, sel.max_selection_cost)
    forward = project_mates_round(_with(ids, estimator="forward"), **{**kw, "layout": dist_layout()})
    assert forward.counts["probes_per_rank"] == 10_000 and forward.fraction < 0.05
    check_round_cost(forward, sel.max_selection_cost)


def dist_layout() -> Layout:
    return dataclasses.replace(PAPER_LAYOUT, distributed_optimizer=True)


def test_machine_presets_and_the_config_field():
    assert set(MACHINES) == {"cpu-2core", "h100"} and all(m.source for m in MACHINES.values())
    with pytest.raises(ValueError, match="cost_machine='a100': choose one of cpu-2core, h100"):
        _sel(cost_machine="a100")
    with pytest.raises(ValueError, match="no machine 'a100'"):
        _project(_sel(), machine="a100")
    with pytest.raises(ValueError, match="memory_bandwidth=-1.0 must be >= 0"):
        dataclasses.replace(FLOPS_ONLY, memory_bandwidth=-1.0)


def test_demo_config_allows_what_it_projects():
    """The CPU demo, projected on this machine's constants (cpu-2core, its TP=2 layout), under its own limit:
    its probes are most of its round."""
    raw = load_yaml("configs/demo_cpu.yaml")
    m = raw["model"]
    gpt = TransformerShape(m["num_layers"], m["hidden_size"], 4 * m["hidden_size"], 30592,
                           num_attention_heads=m["num_attention_heads"], position_embeddings=m["seq_length"])  # fmt: skip
    sel = build(SelectionConfig, raw["selection"], where="demo")
    layout = Layout(
        tp=raw["parallel"]["tensor_model_parallel_size"], micro_batch_size=raw["micro_batch_size"]
    )
    cost = project_mates_round(sel, model=gpt, seq_length=m["seq_length"], layout=layout,
                               global_batch_size=raw["global_batch_size"], reference_rows=256)  # fmt: skip
    assert sel.cost_machine == "cpu-2core"
    assert cost.fraction < sel.max_selection_cost
    assert cost.phase_seconds["probe"] > 0.9 * cost.selection_seconds


def test_build_plugin_refuses_before_building_anything(tmp_path):
    from mates_megatron.plugin import build_plugin

    sel = _sel(estimator="oracle", pool="webdataset", pool_options={"shards": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match=r"max_selection_cost=0\.1 \(--mates-max-selection-cost\)"):
        build_plugin(sel, train_iters=20, global_batch_size=8, micro_batch_size=8, seq_length=100, dp_rank=0,
                     dp_size=1, model_shape=GPT, reference_rows=20)  # fmt: skip
    # Without a model shape nothing is projected: the next thing to fail is the missing pool.
    with pytest.raises(Exception, match="missing"):
        build_plugin(sel, train_iters=20, global_batch_size=8, micro_batch_size=8, seq_length=100, dp_rank=0,
                     dp_size=1)  # fmt: skip
