"""`mates-lab bench ...`: benchmarks that print and write their figures (never timed tests)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mates_lab.bench.decoys import add_decoys_parser
from mates_lab.bench.demo_seeds import add_demo_seeds_parser
from mates_lab.bench.gotd_lm import add_gotd_lm_parser
from mates_lab.bench.output import write_result as _write
from mates_lab.bench.paper_checks import add_paper_check_parsers
from mates_lab.bench.relational_fit import add_relational_fit_parser
from mates_lab.bench.trace_queries import add_trace_queries_parser


def bench_sampler(candidates: int, *, ratio: float = 0.2, micro_batches: int = 1000, seed: int = 0) -> dict:
    """Build a round over N candidates (random 20%), then serve indices for 1,000 micro-batches.

    build_seconds covers the round split (a permutation of all N ids), the selection and publishing it
    (validation, shuffled serving order).
    """
    from mates_megatron.pool.base import PoolRounds
    from mates_megatron.sampler import MatesSampler
    from mates_megatron.selectors import RandomSelector

    k = int(candidates * ratio)
    mbs, dp = 8, 1
    gbs = mbs * dp
    k -= k % gbs
    t0 = time.perf_counter()
    rounds = PoolRounds(candidates, candidates, seed=seed)
    chosen = RandomSelector().select(rounds.candidates(0), k, scores=None, seed=seed, round_=0)
    sampler = MatesSampler(
        total_samples=k, consumed_samples=0, micro_batch_size=mbs, data_parallel_rank=0,
        data_parallel_size=dp, samples_per_round=k, seed=seed, global_batch_size=gbs,
    )  # fmt: skip
    sampler.publish(0, chosen)
    build = time.perf_counter() - t0
    nbytes = sum(a.nbytes for a in sampler.state_dict()["rounds"].values())
    t0 = time.perf_counter()
    for i in range(micro_batches):
        sampler.micro_batch_indices((i * gbs) % (k - gbs))
    per_batch = (time.perf_counter() - t0) / micro_batches
    return {
        "candidates": candidates,
        "selected": k,
        "build_seconds": round(build, 4),
        "bytes_per_selected": nbytes / k,
        "next_batch_us": round(per_batch * 1e6, 2),
    }


def _run_probe_bench(a) -> int:
    if a.config is not None:
        from mates_lab.bench.probe_rounds import DEFAULT_ESTIMATORS, bench_probe_rounds

        estimators = tuple(a.estimators) if a.estimators else DEFAULT_ESTIMATORS
        _write(bench_probe_rounds(a.config, a.seeds, a.probes or 0, a.oracle_probes, estimators), a.out)
        return 0
    from mates_lab.bench.probe import bench_probe

    _write(bench_probe(a.data, a.probes or 64, a.warmup_steps, a.reference_size, bf16=a.bf16), a.out)
    return 0


def _run_influence_bench(a) -> int:
    from mates_lab.bench.influence import bench_influence

    _write(
        bench_influence(
            a.data, n=a.samples, seq_length=a.seq_length, max_length=a.max_length, max_chunks=a.max_chunks,
            batch_size=a.batch_size, workers=a.workers, fit_samples=a.fit_samples, device_tflops=a.device_tflops,
            repeats=a.repeats,
        ),
        a.out,
    )  # fmt: skip
    return 0


def _run_round_bench(a) -> int:
    from mates_lab.bench.rounds import bench_round

    _write(
        bench_round(
            a.sizes,
            ranks=a.ranks,
            seq_length=a.seq_length,
            probes=a.probes,
            token_ids=a.pass_token_ids,
            gpt_probes=a.gpt_probes,
            data_dir=a.data,
            group_sizes=tuple(a.group_sizes),
        ),
        a.out,
    )
    return 0


def _quality(probes: int, epochs: int) -> dict:
    from mates_lab.bench.influence_quality import bench_influence_quality

    return bench_influence_quality(probes=probes, epochs=epochs)


def _run_ot_bench(a) -> int:
    from mates_lab.bench.ot import bench_ot

    _write(
        bench_ot(
            a.data, a.config, a.work, seed=a.seed, max_length=a.max_length, scale=a.scale,
            base_iters=a.base_iters, continue_iters=a.continue_iters, skip_training=a.skip_training,
            scale_max_iter=a.scale_max_iter,
        ),
        a.out,
    )  # fmt: skip
    return 0


def _run_autoscale_bench(a) -> int:
    from mates_lab.bench.autoscale import bench_autoscale

    _write(bench_autoscale(a.data, a.work, steps=a.steps, seed=a.seed), a.out)
    return 0


def _run_autoscale_seeds_bench(a) -> int:
    from mates_lab.bench.autoscale_seeds import bench_autoscale_seeds

    if a.merge:
        from mates_lab.bench.autoscale_seeds import merge_seed_results

        _write(merge_seed_results(a.merge), a.out)
        return 0
    _write(bench_autoscale_seeds(a.data, a.work, steps=a.steps, seeds=tuple(a.seeds), warmup=a.warmup), a.out)
    return 0


def _run_projektor_bench(a) -> int:
    from mates_lab.bench.projektor import bench_projektor

    _write(
        bench_projektor(a.data, a.work, steps=a.steps, mixtures=a.mixtures, evaluate=a.evaluate,
                        revealed=a.revealed, seed=a.seed, sources=a.sources),
        a.out,
    )  # fmt: skip
    return 0


def _run_dam_bench(a) -> int:
    from mates_lab.bench.dam import bench_dam

    _write(bench_dam(a.data, a.work, markets=a.markets, seed=a.seed, draws=a.draws, strategies=a.strategies,
                     oracle_threshold=a.oracle_threshold), a.out)  # fmt: skip
    return 0


def _run_trace_bench(a) -> int:
    import yaml

    from mates_lab.bench.trace import bench_trace

    options = yaml.safe_load(a.options) or {}
    _write(
        bench_trace(
            a.data, a.work, background=a.background, facts=a.facts, leaks=a.leaks, steps=a.steps,
            seeds=tuple(a.seeds), distractors=a.distractors, same_relation=a.same_relation,
            paraphrase=not a.no_paraphrase, top_k=a.ranking_depth, options=options, methods=tuple(a.methods),
        ),
        a.out,
    )  # fmt: skip
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print and write figures")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    s = bsub.add_parser(
        "sampler", help="MatesSampler: build a 20%% selection of N candidates, serve 1,000 batches"
    )
    s.add_argument("--candidates", type=int, default=10_000_000)
    s.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    s.set_defaults(func=lambda a: _write(bench_sampler(a.candidates), a.out) or 0)
    pr = bsub.add_parser(
        "probe",
        help="oracle / reload / mirrored / linearized probe rates, agreement, memory and phases (GPU if present)",
    )
    pr.add_argument("--data", default="data/embedded", help="prepared embedded data directory")
    pr.add_argument(
        "--probes",
        type=int,
        default=None,
        help="probes per round (default: 64; with --config its probe_samples)",
    )
    pr.add_argument("--warmup-steps", type=int, default=40)
    pr.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a run config (e.g. configs/demo_cpu.yaml): every estimator against the oracle at each of its scored "
        "rounds, trained as it says (mates_lab.bench.probe_rounds)",
    )
    pr.add_argument(
        "--seeds", type=int, nargs="+", default=[1234, 1, 2], help="with --config: the runs' seeds"
    )
    pr.add_argument(
        "--oracle-probes",
        type=int,
        default=64,
        help="with --config: samples scored by every estimator per round",
    )
    pr.add_argument(
        "--estimators",
        nargs="+",
        default=None,
        help="with --config: which estimators (default: oracle linearized forward forward_clip mirrored; "
        "'rollout linearized_rollout linearized' compares Group-MATES's oracle with its first-order form; "
        "give --oracle-probes as a multiple of 10, whole rollouts)",
    )
    pr.add_argument("--reference-size", type=int, default=64)
    pr.add_argument("--bf16", action="store_true", help="train and probe in bf16 with fp32 main weights")
    pr.add_argument("--out", type=Path, default=None)
    pr.set_defaults(func=_run_probe_bench)
    inf = bsub.add_parser(
        "influence",
        help="influence stage candidates/s (end to end from pool text, pre-tokenised, per loader_workers) against "
        "the encoder's FLOP bound, and fit throughput (embedded default encoder; GPU if present)",
    )
    inf.add_argument("--data", default="data/embedded", help="prepared embedded data directory")
    inf.add_argument("--samples", type=int, default=256, help="candidates read from the indexed pool")
    inf.add_argument("--seq-length", type=int, default=1024, help="pretraining tokens per candidate")
    inf.add_argument("--max-length", type=int, default=512)
    inf.add_argument("--max-chunks", type=int, default=2)
    inf.add_argument("--batch-size", type=int, default=256, help="influence.predict_batch_size")
    inf.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="influence.loader_workers settings to measure"
    )
    inf.add_argument("--fit-samples", type=int, default=64, help="texts of the fit measurement (0: skip it)")
    inf.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each candidates/s measurement; the fastest is reported",
    )
    inf.add_argument(
        "--device-tflops",
        type=float,
        default=None,
        help="the device's FLOP rate for the bound (default: a dense matmul measured on it)",
    )
    inf.add_argument("--out", type=Path, default=None)
    inf.set_defaults(func=_run_influence_bench)
    rd = bsub.add_parser(
        "round",
        help="one round at growing candidate counts and the probe phase on a small GPT, each phase measured "
        "beside the cost model's projection (peak RSS per rank); the paper rounds projected",
    )
    rd.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    rd.add_argument("--ranks", type=int, default=2, help="processes (the influence group), gloo")
    rd.add_argument("--seq-length", type=int, default=128, help="tokens per synthetic candidate")
    rd.add_argument("--probes", type=int, default=1024, help="probes the influence model is fitted on")
    rd.add_argument(
        "--gpt-probes",
        type=int,
        default=32,
        help="probes per estimator in the measured probe phase on a small GPT, each estimator run 3 times (the "
        "oracle: a quarter of them; 0: skip)",
    )
    rd.add_argument("--data", default="data/embedded", help="embedded data for the probe phase's GPT")
    rd.add_argument(
        "--pass-token-ids", action="store_true", help="the encoder reads candidate ids, not decoded text"
    )
    rd.add_argument(
        "--group-sizes",
        type=int,
        nargs="*",
        default=[12000, 24000, 48000],
        help="round sizes of Group-MATES's cluster-greedy step, measured beside its projection (none: skip)",
    )
    rd.add_argument("--out", type=Path, default=None)
    rd.set_defaults(func=_run_round_bench)
    q = bsub.add_parser(
        "influence-quality", help="held-out Spearman: ridge on frozen embeddings vs fine-tuned, cold vs warm"
    )
    q.add_argument("--probes", type=int, default=640)
    q.add_argument("--epochs", type=int, default=3)
    q.add_argument("--out", type=Path, default=None)
    q.set_defaults(func=lambda a: _write(_quality(a.probes, a.epochs), a.out) or 0)
    o = bsub.add_parser(
        "ot",
        help="LAVA flip recall / junk AUC, GOT-D continued training vs look-alike, dsir, random; Sinkhorn at 1M",
    )
    o.add_argument(
        "--data", type=Path, default=Path("data/embedded"), help="prepared embedded data directory"
    )
    o.add_argument("--config", type=Path, default=Path("configs/demo_cpu.yaml"), help="the model and budget")
    o.add_argument("--work", type=Path, default=Path("runs/bench_ot"), help="runs, checkpoints, embeddings")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--max-length", type=int, default=128, help="encoder tokens per document")
    o.add_argument(
        "--scale", type=int, default=1_000_000, help="candidates of the Sinkhorn scale run (0: skip)"
    )
    o.add_argument("--scale-max-iter", type=int, default=1000, help="full Sinkhorn passes at most at scale")
    o.add_argument("--base-iters", type=int, default=160, help="pretraining steps on the random mix")
    o.add_argument("--continue-iters", type=int, default=40, help="continued-training steps per arm")
    o.add_argument("--skip-training", action="store_true", help="LAVA figures and the scale run only")
    o.add_argument("--out", type=Path, default=None)
    o.set_defaults(func=_run_ot_bench)
    a = bsub.add_parser(
        "autoscale",
        help="DDO at two budgets, AutoScale's prediction at 4x the larger vs DDO run there; train all four",
    )
    a.add_argument(
        "--data", type=Path, default=Path("data/embedded"), help="prepared embedded data directory"
    )
    a.add_argument(
        "--work", type=Path, default=Path("runs/bench_autoscale"), help="plans and runs (resumable)"
    )
    a.add_argument("--steps", type=int, default=40, help="the smaller budget; the others are 2x and 8x")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", type=Path, default=None)
    a.set_defaults(func=_run_autoscale_bench)
    asd = bsub.add_parser(
        "autoscale-seeds",
        help="over seeds: AutoScale's interpolated and extrapolated weights vs DDO and DDO's seed spread; "
        "the target trained on uniform, reused DDO, AutoScale and AutoScale capped at unrepeated data",
    )
    asd.add_argument("--data", type=Path, default=Path("data/embedded"), help="prepared embedded data")
    asd.add_argument("--work", type=Path, default=Path("runs/bench_autoscale_seeds"), help="runs (resumable)")
    asd.add_argument("--steps", type=int, default=40, help="smallest DDO budget; then 2x, 4x, target 8x")
    asd.add_argument("--warmup", type=int, default=10, help="learning-rate warm-up steps")
    asd.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    asd.add_argument(
        "--merge", type=Path, nargs="+", help="JSONs of seeds run apart: merged, nothing trained"
    )
    asd.add_argument("--out", type=Path, default=None)
    asd.set_defaults(func=_run_autoscale_seeds_bench)
    pj = bsub.add_parser(
        "projektor",
        help="Projektor vs a power law: projected and actual held-out loss of 8 mixtures at 4x the larger "
        "pilot; the chosen mixture vs uniform and the best single source",
    )
    pj.add_argument(
        "--data", type=Path, default=Path("data/embedded"), help="prepared embedded data directory"
    )
    pj.add_argument(
        "--work", type=Path, default=Path("runs/bench_projektor"), help="pilots and runs (resumable)"
    )
    pj.add_argument("--steps", type=int, default=40, help="the smaller pilot; the others are 2x and 8x")
    pj.add_argument("--mixtures", type=int, default=16, help="pilot mixtures")
    pj.add_argument("--evaluate", type=int, default=8, help="mixtures trained at 8x to judge the projections")
    pj.add_argument("--revealed", type=int, default=100, help="revealed documents per source")
    pj.add_argument("--seed", type=int, default=0)
    pj.add_argument("--sources", nargs="+", default=None, help="domains to use (default: every domain)")
    pj.add_argument("--out", type=Path, default=None)
    pj.set_defaults(func=_run_projektor_bench)
    dm = bsub.add_parser(
        "dam", help="DataPerf DAM: the leaderboard metric of each buyer strategy over seeded local markets"
    )
    dm.add_argument(
        "--data", type=Path, default=Path("data/embedded"), help="prepared embedded data directory"
    )
    dm.add_argument("--work", type=Path, default=Path("runs/bench_dam"), help="markets and embeddings")
    dm.add_argument("--markets", type=int, default=5, help="markets, seeds seed .. seed + markets - 1")
    dm.add_argument("--draws", type=int, default=5, help="seeded purchases drawn per score")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--strategies", nargs="+", default=None, help="buyer strategies (default: all)")
    dm.add_argument("--oracle-threshold", type=float, default=None,
                    help="noise rate below which the truth-aware upper bound buys (default: ORACLE_THRESHOLD)")  # fmt: skip
    dm.add_argument("--out", type=Path, default=None)
    dm.set_defaults(func=_run_dam_bench)
    tr = bsub.add_parser(
        "trace",
        help="planted facts and leaks over seeds: recall@10, F1 of a tuned decision rule, FASTTRACK's routing "
        "recall and oracle verifier, seconds per query of forward-inf, fasttrack, gradient, bm25",
    )
    tr.add_argument(
        "--data", type=Path, default=Path("data/embedded"), help="prepared embedded data directory"
    )
    tr.add_argument("--work", type=Path, default=Path("runs/bench_trace"), help="pool, checkpoint, traces")
    tr.add_argument("--background", type=int, default=800, help="background pieces of the pool")
    tr.add_argument("--facts", type=int, default=16, help="planted facts (half tune each rule, half report)")
    tr.add_argument(
        "--distractors", type=int, default=2, help="documents per fact naming its entity otherwise"
    )
    tr.add_argument(
        "--same-relation",
        type=int,
        default=2,
        help="documents per fact: its entity and relation, another object",
    )
    tr.add_argument(
        "--no-paraphrase", action="store_true", help="query with the planted sentence's own words"
    )
    tr.add_argument(
        "--ranking-depth", type=int, default=30, help="documents ranked per query (largest top-k)"
    )
    tr.add_argument("--leaks", type=int, default=5, help="reference examples copied into the pool")
    tr.add_argument("--steps", type=int, default=300, help="training steps of the demo model on the pool")
    tr.add_argument(
        "--options", default="{}", help="per-method options as YAML, e.g. '{forward-inf: {drop: 0.02}}'"
    )
    tr.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    tr.add_argument("--methods", nargs="+", default=["bm25", "fasttrack", "gradient", "forward-inf"])
    tr.add_argument("--out", type=Path, default=None)
    tr.set_defaults(func=_run_trace_bench)
    add_paper_check_parsers(bsub)
    add_trace_queries_parser(bsub)
    add_demo_seeds_parser(bsub)
    add_relational_fit_parser(bsub)
    add_gotd_lm_parser(bsub)
    add_decoys_parser(bsub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mates-megatron")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)
