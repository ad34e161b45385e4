"""`mates-lab bench round`: one selection round at growing candidate counts, each phase measured beside the
cost model's projection, and the paper rounds projected.

Measured: a whole round after the probes on a synthetic token-id pool (candidates are generated from their
id, decoded with the encoder's tokenizer as an indexed pool decodes them), on real torch.distributed ranks
with the real components: the round split (``PoolRounds``), the influence model's fit on the probes and its
sharded, streamed prediction of every candidate with the float32 gather (``InfluenceModel``), Gumbel-top-k
(``GumbelTopKSelector``) and publishing to the sampler (``MatesSampler``). Each size runs in fresh
processes, so a rank's peak RSS is that round's; the slope of peak RSS against candidates, split into a part
that follows the round and a part that follows the rank's shard (from a second rank count), projects a
25.6M-candidate round over 8 influence ranks. On CPU the influence model is ridge on the encoder's token
embeddings (the CPU demo's setting), whose per-candidate work is decoding, tokenising and a lookup.

The probes on the live GPT (``bench.round_probes``): every estimator's parts and a training step on a small GPT,
measured and projected. Every phase's measured seconds are set beside the projection of ``mates_megatron.cost``
with machine constants calibrated in the same processes (``bench.calibrate``; the tokenizer's rate on each
influence rank), and beside the stored ``cpu-2core`` preset. Seconds are CPU seconds of each process (one
intra-op thread), so that other jobs on a shared machine do not count; wall seconds are reported too. The
paper rounds are projected with the corrected model on the ``h100`` preset (``bench.paper_cost``).
"""

from __future__ import annotations

import resource
import time

import numpy as np

PAPER_CANDIDATES = 25_600_000
PAPER_RANKS = 8


class SyntheticTokenPool:
    """``n`` candidates of ``seq_length`` token ids drawn from (seed, id) in the encoder's vocabulary; text
    is decoded with its tokenizer. Holds nothing per candidate, so RSS measures the round, not the pool."""

    def __init__(self, n: int, seq_length: int, tokenizer, *, seed: int = 0) -> None:
        self.n, self.seq_length, self.tokenizer, self.seed = n, seq_length, tokenizer, seed
        self.domains = ["synthetic"]
        # Ordinary word pieces (skip [PAD]/[unused]/special ids at the start of BERT vocabularies).
        self.low, self.high = 1996, tokenizer.vocab_size

    def __len__(self) -> int:
        return self.n

    def tokens(self, gid: int) -> np.ndarray:
        return np.random.default_rng([self.seed, gid]).integers(self.low, self.high, self.seq_length)

    def text(self, gid: int) -> str:
        return self.tokenizer.decode(self.tokens(gid).tolist())

    def domain_ids(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros(len(ids), dtype=np.int16)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _round_on_rank(n: int, seq_length: int, probes: int, batch_size: int, token_ids: bool = False) -> dict:
    """One round of ``n`` candidates on this rank of the world (the influence group = the world)."""
    import torch.distributed as dist

    from mates_megatron.influence import build_influence_model
    from mates_megatron.influence.config import InfluenceConfig, RidgeConfig
    from mates_megatron.influence.group import influence_group
    from mates_megatron.pool.base import PoolRounds, candidate_inputs
    from mates_megatron.sampler import MatesSampler
    from mates_megatron.selectors import GumbelTopKSelector

    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    rss: dict[str, int] = {}
    group = influence_group() if dist.get_world_size() > 1 else None
    cfg = InfluenceConfig(
        model="ridge",
        ridge=RidgeConfig(features="token_embeddings"),
        predict_batch_size=batch_size,
        pass_token_ids=token_ids,
        # In process: CPU seconds are read per process, and loader workers' would escape the clock (and on two
        # cores they only compete with the rank for them). The projection below counts the same setting.
        loader_workers=0,
    )
    import torch

    # The encoder on this rank's GPU where there is one (the influence group stays gloo: scores are CPU tensors).
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = build_influence_model(cfg, device=device)
    model._network()  # load the encoder before the clock starts
    pool = SyntheticTokenPool(n, seq_length, model.net.tokenizer)
    rss["setup"] = _peak_rss()
    from threadpoolctl import threadpool_limits

    from mates_lab.bench.calibrate import host_flops, lookup_op_seconds, tokenize_rate

    # One BLAS thread per rank, as torchrun's OMP_NUM_THREADS=1 sets it (spawned ranks would otherwise spin
    # every core each, and the ridge fit's solves take 20x the CPU here).
    threadpool_limits(1)
    clock = time.process_time
    tokens_per_s = tokenize_rate(clock, seq_length=seq_length, read=pool.text)  # as prediction reads them
    op_s, host = lookup_op_seconds(clock), host_flops(clock)

    t, c = time.perf_counter(), time.process_time()
    cands = PoolRounds(n, n, seed=1).candidates(0)
    seconds["split"], cpu["split"] = time.perf_counter() - t, time.process_time() - c
    rss["split"] = _peak_rss()

    t, c = time.perf_counter(), time.process_time()
    texts = candidate_inputs(pool, cands, token_ids=token_ids)
    positions = np.sort(np.random.default_rng(2).choice(n, size=min(probes, n), replace=False))
    # A probe score the token-embedding features can partly predict: the mean token id, plus noise.
    target = np.array([pool.tokens(int(cands[i])).mean() for i in positions])
    target = target + np.random.default_rng(3).normal(scale=target.std(), size=len(target))
    fit = model.fit([texts[int(i)] for i in positions], target, group=group)
    seconds["fit"], cpu["fit"] = time.perf_counter() - t, time.process_time() - c
    rss["fit"] = _peak_rss()

    t, c = time.perf_counter(), time.process_time()
    scores = model.predict(texts, group=group)
    seconds["predict_and_gather"], cpu["predict_and_gather"] = (
        time.perf_counter() - t,
        time.process_time() - c,
    )
    rss["predict_and_gather"] = _peak_rss()

    t, c = time.perf_counter(), time.process_time()
    k = n // 5
    chosen = GumbelTopKSelector(temperature=0.5).select(cands, k, scores=scores, seed=1, round_=0)
    seconds["select"], cpu["select"] = time.perf_counter() - t, time.process_time() - c
    rss["select"] = _peak_rss()

    t, c = time.perf_counter(), time.process_time()
    dp = dist.get_world_size()
    gbs = 8 * dp
    k -= k % gbs
    sampler = MatesSampler(
        total_samples=k, consumed_samples=0, micro_batch_size=8, data_parallel_rank=dist.get_rank(),
        data_parallel_size=dp, samples_per_round=k, seed=1, global_batch_size=gbs,
    )  # fmt: skip
    sampler.publish(0, chosen[:k])
    seconds["publish"], cpu["publish"] = time.perf_counter() - t, time.process_time() - c
    rss["publish"] = _peak_rss()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "calibrated": {"tokenize_tokens_per_s": tokens_per_s, "op_overhead_s": op_s, "host_flops": host},
        "peak_rss_bytes": _peak_rss(),
        "rss_after_phase": rss,
        "fit_spearman": fit.spearman,
        "selected": int(k),
    }


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def bench_round(
    sizes: list[int],
    *,
    ranks: int = 2,
    seq_length: int = 128,
    probes: int = 1024,
    batch_size: int = 256,
    check_ranks: int = 1,
    token_ids: bool = False,
    gpt_probes: int = 32,
    data_dir: str = "data/embedded",
    probe_options: dict | None = None,
    group_sizes: tuple[int, ...] = (12000, 24000, 48000),
) -> dict:
    """Run one round per size on ``ranks`` processes (and the middle size on ``check_ranks`` to separate
    per-round from per-shard memory); measure the probe phase with ``gpt_probes`` probes per estimator on the
    embedded data in ``data_dir`` (0: not measured; ``probe_options``: ``measure_probe_phases``'s keywords);
    set every phase beside its projection; project the paper rounds. ``token_ids``: the encoder reads the
    candidates' ids (``influence.pass_token_ids``) instead of their decoded text. ``group_sizes``: Group-MATES's
    set selection measured at these round sizes beside its projection (``bench.group_step``)."""
    from mates_lab.bench.paper_cost import paper_cost
    from mates_megatron.compat.spawn import run_on_ranks

    load = _load()
    runs = []
    for n in sizes:
        t = time.perf_counter()
        per_rank = run_on_ranks(
            _round_on_rank, ranks, n, seq_length, probes, batch_size, token_ids, timeout=7200
        )
        wall = time.perf_counter() - t
        runs.append({"candidates": n, "ranks": ranks, "wall_seconds": wall, "per_rank": per_rank})
        worst = max(r["peak_rss_bytes"] for r in per_rank)
        print(
            f"round of {n:,} candidates on {ranks} ranks: {wall:.1f} s, peak RSS {worst / 2**30:.2f} GiB/rank"
        )
    mid = sizes[len(sizes) // 2]
    check = run_on_ranks(
        _round_on_rank, check_ranks, mid, seq_length, probes, batch_size, token_ids, timeout=7200
    )
    print(f"round of {mid:,} candidates on {check_ranks} rank(s): peak RSS "
          f"{max(r['peak_rss_bytes'] for r in check) / 2**30:.2f} GiB/rank")  # fmt: skip
    phases = [row for run in runs for row in _influence_rows(run, seq_length, probes, batch_size, token_ids)]
    probe_phases = None
    if gpt_probes:
        from mates_lab.bench.round_probes import compare, measure_probe_phases

        probe_phases = measure_probe_phases(data_dir, probes=gpt_probes, **(probe_options or {}))
        for label in ("calibrated", "preset"):
            rows = compare(probe_phases["measured"], probe_phases["projected"][label])
            for row in rows:
                row["machine"] = label
            phases += rows
    _print_phases(phases)
    group = None
    if group_sizes:
        from mates_lab.bench.group_step import bench_group_step

        group = bench_group_step(tuple(group_sizes))
    load = {"before": load, "after": _load()}
    cost = paper_cost()
    print(f"paper_1b on 8 x H100 (h100 preset, public figures), corrected model: {cost['paper_1b_verdict']}")
    return {
        "sizes": list(sizes),
        "ranks": ranks,
        "seq_length": seq_length,
        "probes": probes,
        "influence_model": "ridge on MiniLM token embeddings (CPU: no encoder pass per candidate)",
        "reads": "token ids (pass_token_ids)" if token_ids else "decoded text",
        "load_average": load,
        "seconds_per_phase": [_slowest_phases(run["per_rank"]) for run in runs],
        "cpu_seconds_per_phase": [_slowest_phases(run["per_rank"], "cpu_seconds") for run in runs],
        "wall_seconds": [round(run["wall_seconds"], 2) for run in runs],
        "candidates_per_second": [
            round(s / sum(_slowest_phases(run["per_rank"]).values()), 1)
            for s, run in zip(sizes, runs, strict=True)
        ],
        "influence_calibration": [
            {
                k: float(np.median([r["calibrated"][k] for r in run["per_rank"]]))
                for k in run["per_rank"][0]["calibrated"]
            }
            for run in runs
        ],
        "phases_measured_vs_projected": phases,
        "within_30_percent": _within(phases, 0.3),
        "probe_phases": probe_phases,
        "group_step": group,
        **_memory(sizes, runs, check, check_ranks, ranks),
        "overhead_fraction_paper_1b": cost["paper_1b"]["linearized_minilm_ddp_padded_host"]["fraction"],
        "overhead_fraction_paper_1b_forward": cost["paper_1b"]["forward_minilm_ddp_padded_host"]["fraction"],
        "paper_1b_verdict": cost["paper_1b_verdict"],
        "cost_model": cost,
    }


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _influence_rows(run: dict, seq_length: int, probes: int, batch_size: int, token_ids: bool) -> list[dict]:
    """The fit and the prediction of one size, measured (the slowest rank's CPU seconds) and projected with the
    ranks' own calibration (tokenizer, lookup operators, float64 BLAS) and with the cpu-2core preset."""
    from dataclasses import replace

    from mates_megatron.cost import MACHINES, TransformerShape
    from mates_megatron.cost.phases import influence_parts
    from mates_megatron.influence.config import InfluenceConfig, RidgeConfig

    inf = InfluenceConfig(model="ridge", ridge=RidgeConfig(features="token_embeddings"),
                          predict_batch_size=batch_size, pass_token_ids=token_ids, loader_workers=0)  # fmt: skip
    encoder = TransformerShape.from_encoder_dir(inf.resolved_path())
    per_rank, n, ranks = run["per_rank"], run["candidates"], run["ranks"]
    calibrated = {
        k: float(np.median([r["calibrated"][k] for r in per_rank])) for k in per_rank[0]["calibrated"]
    }
    measured = _slowest_phases(per_rank, "cpu_seconds")
    rows = []
    preset = MACHINES["cpu-2core"]
    for label, machine in (("calibrated", replace(preset, **calibrated)), ("preset", preset)):
        fit, predict = influence_parts(
            inf, encoder, machine, tokens=seq_length, candidates=n,
            pairs=min(probes, n), probes=min(probes, n), ranks=ranks,
        )  # fmt: skip
        for phase, proj in (("fit", fit), ("predict_and_gather", predict)):
            got, want = measured[phase], sum(proj.values())
            rows.append({"phase": f"influence_{n}.{phase}", "measured_s": round(got, 5), "projected_s": round(want, 5),
                         "ratio": round(got / want, 3), "machine": label})  # fmt: skip
    return rows


def _within(rows: list[dict], tolerance: float) -> dict:
    """Per machine label, whether every phase's measured/projected ratio lies within 1 +- tolerance, and those
    that do not."""
    out = {}
    for label in sorted({r["machine"] for r in rows}):
        mine = [r for r in rows if r["machine"] == label and r["ratio"] is not None]
        off = [r["phase"] for r in mine if abs(r["ratio"] - 1) > tolerance]
        out[label] = {"all": not off, "outside": off}
    return out


def _print_phases(rows: list[dict]) -> None:
    print(f"{'phase':40s} {'machine':10s} {'measured s':>11s} {'projected s':>11s} {'ratio':>6s}")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(
            f"{r['phase']:40s} {r['machine']:10s} {r['measured_s']:11.4f} {r['projected_s']:11.4f} {ratio:>6s}"
        )


def _memory(sizes: list[int], runs: list[dict], check: list[dict], check_ranks: int, ranks: int) -> dict:
    """Peak RSS per size, and its model: base + a x candidates of the round + b x candidates of the shard."""
    n = np.array(sizes, dtype=np.float64)
    peak = np.array([max(r["peak_rss_bytes"] for r in run["per_rank"]) for run in runs], dtype=np.float64)
    slope, base = _line(n, peak)  # bytes per candidate of the round at `ranks` ranks
    # slope = round_part + shard_part / ranks; the check run at the middle size gives shard_part.
    mid = sizes[len(sizes) // 2]
    at_mid = peak[len(sizes) // 2]
    check_peak = max(r["peak_rss_bytes"] for r in check)
    shard_part = (
        max(0.0, (check_peak - at_mid) / (mid / check_ranks - mid / ranks)) if check_ranks != ranks else 0.0
    )
    round_part = max(0.0, slope - shard_part / ranks)
    paper_bytes = base + round_part * PAPER_CANDIDATES + shard_part * PAPER_CANDIDATES / PAPER_RANKS
    return {
        "peak_rss_bytes": [int(p) for p in peak],
        "rss_after_phase": [run["per_rank"][0]["rss_after_phase"] for run in runs],
        "memory_model": {
            "base_bytes": base,
            "bytes_per_candidate_of_the_round": round_part,
            "bytes_per_candidate_of_the_shard": shard_part,
            "check_run": {"candidates": mid, "ranks": check_ranks, "peak_rss_bytes": int(check_peak)},
            "assumptions": [
                "peak RSS = base + a x candidates of the round + b x candidates of the rank's shard; a and b "
                f"from the sizes at {ranks} ranks and the middle size at {check_ranks}",
                "the selection's own process: the trained GPT, its optimizer and data loaders are not in it",
                "the pool is synthetic (nothing per candidate); an indexed pool maps its files, a WebDataset "
                "pool's index holds about 40 bytes per sample on every rank",
            ],
        },
        "peak_rss_gb_per_rank_paper": round(paper_bytes / 1e9, 3),
    }


def _slowest_phases(per_rank: list[dict], key: str = "seconds") -> dict[str, float]:
    """Each phase's seconds, the slowest rank's (the round waits for it)."""
    phases = per_rank[0][key]
    return {k: round(max(r[key][k] for r in per_rank), 3) for k in phases}
