"""`mates-lab bench ...` for the seed methods' own small experiments, each on a dataset that ships with
scikit-learn: LAVA's flip detection, GOT-D's pre-fine-tuning selection, Projektor's projection and Forward-INF's
convex check (issue 35: each method tested the way its paper tests it)."""

from __future__ import annotations

from pathlib import Path

from mates_lab.bench.output import write_result as _write


def _run_gotd_digits_bench(a) -> int:
    from mates_lab.bench.gotd_digits import bench_gotd_digits

    _write(bench_gotd_digits(a.seeds), a.out)
    return 0


def _run_lava_digits_bench(a) -> int:
    from mates_lab.bench.lava_digits import bench_lava_digits

    _write(
        bench_lava_digits(
            a.seeds,
            per_class=a.per_class,
            trusted_per_class=a.trusted_per_class,
            flip_rate=a.flip_rate,
            k=a.k,
        ),
        a.out,
    )
    return 0


def _run_projektor_digits_bench(a) -> int:
    from mates_lab.bench.projektor_digits import bench_projektor_digits

    _write(bench_projektor_digits(a.seeds), a.out)
    return 0


def _run_forward_inf_convex(a) -> int:
    from mates_lab.bench.forward_inf_convex import convex_check

    _write(convex_check(seeds=tuple(a.seeds), train=a.train, queries=a.queries), a.out)
    return 0


def add_paper_check_parsers(bsub) -> None:
    gd = bsub.add_parser(
        "gotd-digits",
        help="GOT-D vs look-alike and random on load_digits with classes the pretraining set under-covers: "
        "held-out balanced accuracy of a logistic regression, rare-class share of each selection",
    )
    gd.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    gd.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    gd.set_defaults(func=_run_gotd_digits_bench)
    ld = bsub.add_parser(
        "lava-digits",
        help="LAVA's flip detection on sklearn load_digits (LDA features): recall@10%% of the project's LAVA at "
        "label weight 1 and 3 (and reweighted), an exact-OT POT peer, kNN disagreement and random, over seeds",
    )
    ld.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ld.add_argument("--per-class", type=int, default=100, help="valued rows per class")
    ld.add_argument("--trusted-per-class", type=int, default=30, help="trusted (validation) rows per class")
    ld.add_argument(
        "--flip-rate", type=float, default=0.1, help="share of the valued rows given another label"
    )
    ld.add_argument("--k", type=int, default=10, help="neighbours of the kNN disagreement baseline")
    ld.add_argument("--out", type=Path, default=None)
    ld.set_defaults(func=_run_lava_digits_bench)
    pd = bsub.add_parser(
        "projektor-digits",
        help="Projektor on load_digits (three skewed sources, one noisy): projected vs actual error at 4x the "
        "larger pilot against a per-mixture power law; the chosen mixture vs uniform and the best single source",
    )
    pd.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    pd.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    pd.set_defaults(func=_run_projektor_digits_bench)
    fc = bsub.add_parser(
        "forward-inf-convex",
        help="Forward-INF's convex check: exact leave-one-out against dual leave-one-out (logistic regression)",
    )
    fc.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    fc.add_argument("--train", type=int, default=200, help="training rows per seed")
    fc.add_argument("--queries", type=int, default=5, help="test rows per seed")
    fc.add_argument("--out", type=Path, default=None)
    fc.set_defaults(func=_run_forward_inf_convex)
