"""`mates-megatron bench round`: one selection round at growing candidate counts, and the paper-scale projection.

Measured: a whole round after the probes on a synthetic token-id pool (candidates are generated from their
id, decoded with the encoder's tokenizer as an indexed pool decodes them), on real torch.distributed ranks
with the real components: the round split (``PoolRounds``), the influence model's fit on the probes and its
sharded, streamed prediction of every candidate with the float32 gather (``InfluenceModel``), Gumbel-top-k
(``GumbelTopKSelector``) and publishing to the sampler (``MatesSampler``). Each size runs in fresh
processes, so a rank's peak RSS is that round's; the slope of peak RSS against candidates, split into a part
that follows the round and a part that follows the rank's shard (from a second rank count), projects a
25.6M-candidate round over 8 influence ranks.

Not run here: the probes on the live GPT (their cost does not grow with the round; the cost model counts
them), and, on CPU, an encoder pass per candidate: the influence model is ridge on the encoder's token
embeddings (the CPU demo's setting), whose per-candidate work is decoding, tokenising and a lookup. The
memory of an encoder pass is per batch, not per candidate. The cost model (``mates_megatron.cost``) then
projects the paper rounds in FLOPs for MiniLM and bert-base, linearized and oracle probes.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER_CANDIDATES = 25_600_000
PAPER_RANKS = 8
BERT_BASE = (12, 768, 3072, 30522)
"""bert-base-uncased's layers, hidden, FFN and vocab (its config.json): no weights are needed to count."""


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

    from mates_megatron.influence.config import InfluenceConfig, RidgeConfig
    from mates_megatron.influence.group import influence_group
    from mates_megatron.influence.registry import build_influence_model
    from mates_megatron.pool.base import PoolRounds, candidate_inputs
    from mates_megatron.sampler import MatesSampler
    from mates_megatron.select import GumbelTopKSelector

    seconds: dict[str, float] = {}
    rss: dict[str, int] = {}
    group = influence_group() if dist.get_world_size() > 1 else None
    cfg = InfluenceConfig(
        model="ridge",
        ridge=RidgeConfig(features="token_embeddings"),
        predict_batch_size=batch_size,
        pass_token_ids=token_ids,
    )
    import torch

    # The encoder on this rank's GPU where there is one (the influence group stays gloo: scores are CPU tensors).
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = build_influence_model(cfg, device=device)
    model._network()  # load the encoder before the clock starts
    pool = SyntheticTokenPool(n, seq_length, model.net.tokenizer)
    rss["setup"] = _peak_rss()

    t = time.perf_counter()
    cands = PoolRounds(n, n, seed=1).candidates(0)
    seconds["split"] = time.perf_counter() - t
    rss["split"] = _peak_rss()

    t = time.perf_counter()
    texts = candidate_inputs(pool, cands, token_ids=token_ids)
    positions = np.sort(np.random.default_rng(2).choice(n, size=min(probes, n), replace=False))
    # A probe score the token-embedding features can partly predict: the mean token id, plus noise.
    target = np.array([pool.tokens(int(cands[i])).mean() for i in positions])
    target = target + np.random.default_rng(3).normal(scale=target.std(), size=len(target))
    fit = model.fit([texts[int(i)] for i in positions], target, group=group)
    seconds["fit"] = time.perf_counter() - t
    rss["fit"] = _peak_rss()

    t = time.perf_counter()
    scores = model.predict(texts, group=group)
    seconds["predict_and_gather"] = time.perf_counter() - t
    rss["predict_and_gather"] = _peak_rss()

    t = time.perf_counter()
    k = n // 5
    chosen = GumbelTopKSelector(temperature=0.5).select(cands, k, scores=scores, seed=1, round_=0)
    seconds["select"] = time.perf_counter() - t
    rss["select"] = _peak_rss()

    t = time.perf_counter()
    dp = dist.get_world_size()
    gbs = 8 * dp
    k -= k % gbs
    sampler = MatesSampler(
        total_samples=k, consumed_samples=0, micro_batch_size=8, data_parallel_rank=dist.get_rank(),
        data_parallel_size=dp, samples_per_round=k, seed=1, global_batch_size=gbs,
    )  # fmt: skip
    sampler.publish(0, chosen[:k])
    seconds["publish"] = time.perf_counter() - t
    rss["publish"] = _peak_rss()
    return {
        "seconds": seconds,
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
) -> dict:
    """Run one round per size on ``ranks`` processes (and the middle size on ``check_ranks`` to separate
    per-round from per-shard memory); project the paper round's memory and FLOPs. ``token_ids``: the encoder
    reads the candidates' ids (``influence.pass_token_ids``) instead of their decoded text."""
    from mates_megatron.compat.spawn import run_on_ranks

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

    n = np.array(sizes, dtype=np.float64)
    peak = np.array([max(r["peak_rss_bytes"] for r in run["per_rank"]) for run in runs], dtype=np.float64)
    slope, base = _line(n, peak)  # bytes per candidate of the round at `ranks` ranks
    # slope = round_part + shard_part / ranks; the check run at the middle size gives shard_part.
    at_mid = peak[len(sizes) // 2]
    check_peak = max(r["peak_rss_bytes"] for r in check)
    shard_part = (
        max(0.0, (check_peak - at_mid) / (mid / check_ranks - mid / ranks)) if check_ranks != ranks else 0.0
    )
    round_part = max(0.0, slope - shard_part / ranks)
    paper_bytes = base + round_part * PAPER_CANDIDATES + shard_part * PAPER_CANDIDATES / PAPER_RANKS
    cost = paper_cost()
    return {
        "sizes": list(sizes),
        "ranks": ranks,
        "seq_length": seq_length,
        "probes": probes,
        "influence_model": "ridge on MiniLM token embeddings (CPU: no encoder pass per candidate)",
        "reads": "token ids (pass_token_ids)" if token_ids else "decoded text",
        "seconds_per_phase": [_slowest_phases(run["per_rank"]) for run in runs],
        "wall_seconds": [round(run["wall_seconds"], 2) for run in runs],
        "peak_rss_bytes": [int(p) for p in peak],
        "rss_after_phase": [run["per_rank"][0]["rss_after_phase"] for run in runs],
        "candidates_per_second": [
            round(s / sum(_slowest_phases(run["per_rank"]).values()), 1)
            for s, run in zip(sizes, runs, strict=True)
        ],
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
        "overhead_fraction_paper_1b": cost["paper_1b"]["linearized_minilm"]["fraction"],
        "overhead_fraction_paper_1b_bert_base": cost["paper_1b"]["linearized_bert_base"]["fraction"],
        "cost_model": cost,
    }


def _slowest_phases(per_rank: list[dict]) -> dict[str, float]:
    """Each phase's seconds, the slowest rank's (the round waits for it)."""
    phases = per_rank[0]["seconds"]
    return {k: round(max(r["seconds"][k] for r in per_rank), 3) for k in phases}


def paper_cost() -> dict:
    """The paper_410m and paper_1b rounds in FLOPs (``mates_megatron.cost``) for MiniLM and bert-base, with
    linearized and oracle probes: each phase's fraction of the round's training FLOPs and the assumptions."""
    import dataclasses

    from mates_megatron.config import SelectionConfig
    from mates_megatron.configio import build, load_yaml
    from mates_megatron.cost import TransformerShape, project_mates_round
    from mates_megatron.influence.config import InfluenceConfig

    gpts = {
        "paper_410m": TransformerShape(24, 1024, 4096, 50304),
        "paper_1b": TransformerShape(16, 2048, 8192, 50304),
    }
    minilm = TransformerShape.from_encoder_dir(InfluenceConfig().resolved_path())
    encoders = {"minilm": minilm, "bert_base": TransformerShape(*BERT_BASE)}
    out = {}
    for name, gpt in gpts.items():
        path = CONFIGS / f"{name}.yaml"
        sel = build(SelectionConfig, load_yaml(path)["selection"], where=str(path))
        out[name] = {}
        for est in ("linearized", "oracle"):
            for enc_name, enc in encoders.items():
                cost = project_mates_round(
                    dataclasses.replace(sel, estimator=est), model=gpt, seq_length=1024, global_batch_size=512,
                    reference_rows=5153, encoder=enc,
                )  # fmt: skip
                out[name][f"{est}_{enc_name}"] = {
                    "fraction": round(cost.fraction, 5),
                    "phases": {k: round(v / cost.training, 5) for k, v in cost.phases.items()},
                    "counts": cost.counts,
                    "assumptions": cost.assumptions,
                }
    out["shapes"] = {
        "gpt": {k: dataclasses.asdict(v) for k, v in gpts.items()},
        "encoder": {k: dataclasses.asdict(v) for k, v in encoders.items()},
        "round": "1,024-token rows, global batch 512, 10k steps, 25.6M candidates, 80k probes, 5,153 LAMBADA rows",
    }
    return out
