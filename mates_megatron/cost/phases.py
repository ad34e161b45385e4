"""The seconds of each phase of a MATES round on one rank, part by part, as the code runs it.

The probe's parts carry the names ``ProbeScores.seconds`` measures (``reference``, ``forward_backward``,
``optimizer_step``, ``restore``, ``dot``, ``forward``, ``reference_loss``), plus ``rest`` (what no phase times: the
round's snapshot capture and last restore, the gather of scores, the forward estimator's step size), so that
``bench round`` sets each measured part beside its projection.
"""

from __future__ import annotations

import math

from mates_megatron.cost.machine import Machine
from mates_megatron.cost.seconds import DIRECTION, GRAD_CLONE, MOVE, STEP_SIZE, RankSeconds
from mates_megatron.cost.shapes import TransformerShape


def probe_share(probes: int, work: RankSeconds, *, steps_optimizer: bool) -> int:
    """Probes one rank scores: all of them when the estimator steps a distributed optimizer (Adam's state is
    sharded, so every replica takes part in every step), else its strided share of the data-parallel split."""
    lay = work.layout
    if steps_optimizer and lay.distributed_optimizer:
        return probes
    return math.ceil(probes / lay.dp)


def probe_parts(
    estimator: str, work: RankSeconds, *, probes: int, reference_rows: int, steps_optimizer: bool
) -> dict[str, float]:
    """Seconds of one rank's probe phase by part for ``estimator`` (oracle, rollout, linearized,
    linearized_rollout, mirrored, forward)."""
    # the rollouts restore once per ROLLOUT_LENGTH probes
    from mates_megatron.probe.rollout import ROLLOUT_LENGTH

    w = work
    share = probe_share(probes, w, steps_optimizer=steps_optimizer)
    ref_forward = w.pipeline(reference_rows, backward=False)
    ref_backward = w.zero() + w.pipeline(reference_rows, backward=True)
    probe_fb = w.zero() + w.pipeline(1, backward=True) + w.grad_reduce_scatter()
    step, restore = w.optimizer_step(), w.restore()
    # What no phase times: the round's one snapshot captured (a copy) and restored once more at the end, and
    # the scores' gather.
    capture = w.snapshot_bytes() / w.machine.fresh_memory_bandwidth
    untimed = capture + restore + w.machine.collective_latency_s * (w.layout.dp > 1)
    if estimator in ("oracle", "rollout"):  # per probe: a step on the sample, then the whole reference set
        restores = share if estimator == "oracle" else math.ceil(share / ROLLOUT_LENGTH)  # rollout: one each
        parts = {
            "reference": ref_forward,
            "forward_backward": share * probe_fb,
            "optimizer_step": share * step,
            "reference_loss": share * ref_forward,
            "restore": restores * restore,
        }
    elif estimator in ("linearized", "linearized_rollout"):  # one reference gradient; per probe a step, a dot
        restores = share if estimator == "linearized" else math.ceil(share / ROLLOUT_LENGTH)
        parts = {
            "reference": ref_backward + w.memory(w.n_opt * GRAD_CLONE) + restore,
            "forward_backward": share * probe_fb,
            "optimizer_step": share * step,
            "dot": share * w.dot(),
            "restore": restores * restore,
        }
    elif estimator == "mirrored":  # one step on the reference set between two batched passes of the probes
        sync = w.collective(w.n_rank * 4 * 2, 1 if w.layout.distributed_optimizer else w.layout.dp)
        parts = {
            "reference": ref_forward,
            "forward": 2 * w.pipeline(share, backward=False, padded=True),
            "forward_backward": ref_backward + sync + w.grad_reduce_scatter(),
            "optimizer_step": step,
        }
    elif estimator == "forward":  # one reference gradient made a direction; two batched passes at θ ± s·d
        direction = w.memory(w.n_opt * DIRECTION) + w.collective(w.n_rank * 4, w.optimizer_shards)
        moves = w.memory(w.n_rank * 2 * (MOVE + (4 if w.layout.bf16 else 0)))
        parts = {
            "reference": ref_backward + direction,
            "forward": moves + 2 * w.pipeline(share, backward=False, padded=True),
            "restore": restore,
        }
        untimed += w.memory(w.n_rank * STEP_SIZE)  # the step size, between the reference and the passes
    else:
        raise ValueError(f"no cost model for estimator {estimator!r}: add one to mates_megatron.cost.phases")
    parts["rest"] = untimed
    return parts


def encoder_seconds(
    inf, encoder: TransformerShape, machine: Machine, tokens: int, *, backward: bool
) -> float:
    """One candidate through the influence encoder (forward, or forward and backward) on the influence device.
    Token-embedding features are a lookup: hidden floats read per token, four eager operators per candidate."""
    if inf.model in ("ridge", "relational") and inf.ridge.features == "token_embeddings":
        return tokens * encoder.hidden_size * 4 / machine.memory_bandwidth + 4 * machine.op_overhead_s
    chunk = min(tokens, inf.max_length)
    flops = encoder.forward_flops_per_token(chunk, logits=False) * tokens * (3 if backward else 1)
    return flops / machine.matmul_flops


def influence_parts(
    inf,
    encoder: TransformerShape,
    machine: Machine,
    *,
    tokens: int,
    candidates: int,
    pairs: int,
    probes: int,
    ranks: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """(fit, predict) seconds by part on one influence rank: each rank reads, decodes, tokenises and encodes its
    share (``pass_token_ids``: the pool's ids, no decode or tokenise). With ``loader_workers`` W > 0 the host work
    runs in W processes ahead of the encoder, so only what W workers cannot hide behind it is counted:
    max(0, host / W - encoder) a candidate (each worker one host thread; the host is assumed to have the cores).
    With W = 0 it runs on the rank's own thread, in series with the encoder."""
    m = machine
    forward = encoder_seconds(inf, encoder, m, tokens, backward=False)
    host = 0.0 if inf.pass_token_ids else tokens / m.tokenize_tokens_per_s
    if inf.loader_workers > 0:
        host = max(0.0, host / inf.loader_workers - forward)

    def gather(nbytes: float) -> float:
        return (
            0.0
            if ranks == 1
            else m.collective_latency_s + nbytes * (ranks - 1) / ranks / m.host_link_bandwidth
        )

    predicted = candidates + pairs - probes  # past rounds' probes are predicted again beside the candidates
    mine = math.ceil(predicted / ranks)
    predict = {"decode_tokenise": mine * host, "encoder": mine * forward, "gather": gather(predicted * 4)}
    if inf.model == "finetune":
        ft = inf.finetune
        val = max(3, round(pairs * ft.val_fraction))
        train = pairs - val
        steps = ft.epochs * math.ceil(train / ft.batch_size)
        read = ft.epochs * (math.ceil(train / ranks) + math.ceil(val / ranks))  # re-tokenised every epoch
        backward = encoder_seconds(inf, encoder, m, tokens, backward=True)
        n = encoder.parameters()
        fit = {
            "decode_tokenise": read * host,
            "encoder": ft.epochs * (math.ceil(train / ranks) * backward + math.ceil(val / ranks) * forward),
            "gradient_allreduce": steps * gather(2 * n * 4),
            "optimizer": steps * n * m.adam_bytes_per_element / m.memory_bandwidth,
        }
    else:
        h = encoder.hidden_size
        solves = len(inf.ridge.alphas) * inf.ridge.folds + 1  # each strength's folds, then the refit
        fit = {
            "decode_tokenise": math.ceil(pairs / ranks) * host,
            "encoder": math.ceil(pairs / ranks) * forward,
            "gather": gather(pairs * h * 8),
            "ridge_solve": solves * (2.0 * pairs * h * h + h**3) / m.host_flops,  # numpy, float64, host
        }
    return fit, predict
