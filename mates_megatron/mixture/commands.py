"""`mates-megatron mixture plan|run|fit|predict|projektor`: DDO's proxy runs and fit at one budget, AutoScale's
extrapolation to a larger one, Projektor's projection from pilots; each writes a weights file that
`selector: mixture` serves.

    mates-megatron mixture plan --config RUN.yaml --steps 100 --eval-set val --out runs/ddo_100 --run
    mates-megatron mixture fit --plan runs/ddo_100 --out data/embedded/mixture/ddo_100.json
    mates-megatron mixture predict --small ddo_100.json --large ddo_200.json --steps 800 --out autoscale_800.json
    mates-megatron mixture projektor --config RUN.yaml --eval-set val --pilot-steps 40 80 --target-steps 320 \
        --work runs/projektor --out projektor_320.json
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

from mates_megatron.mixture.autoscale import autoscale_weights
from mates_megatron.mixture.weights import MixtureError, write_weights


def add_mixture_parser(sub, runner=None) -> None:
    """``runner``: how the proxy and pilot runs are launched (a ``launch.Runner``; the console script passes
    one that checks each run's config and cost before torchrun, as `pretrain` does; this module may not import
    the host that checks)."""
    p = sub.add_parser(
        "mixture",
        help="domain weights: DDO proxy runs and fit, AutoScale extrapolation, Projektor projection",
        description=(
            "DDO: `plan` writes the 2m+1 proxy runs of one budget (uniform base, each domain scaled down and "
            "up), `run` trains the unfinished ones (resuming an interrupted one), `fit` fits each domain's "
            "loss curve and writes the optimal weights. AutoScale: `predict` extrapolates two DDO results to a "
            "larger budget. Serve a weights file with selector: mixture, mixture_weights: FILE."
        ),
    )
    p.set_defaults(runner=runner)
    s = p.add_subparsers(dest="mixture_command", metavar="STEP", required=True)
    pl = s.add_parser("plan", help="write the proxy runs of one budget (and run them with --run)")
    pl.add_argument("--config", type=Path, required=True, help="run config (model, data, eval_sets)")
    pl.add_argument("--steps", type=int, required=True, help="the base run's steps (the budget)")
    pl.add_argument(
        "--eval-set", required=True, help="eval_sets name whose per-domain losses are the objective"
    )
    pl.add_argument("--out", type=Path, required=True, help="plan directory")
    pl.add_argument("--down", type=Fraction, default=Fraction(1, 3), help="scale-down factor (default 1/3)")
    pl.add_argument("--up", type=Fraction, default=Fraction(3), help="scale-up factor (default 3)")
    pl.add_argument("--run", action="store_true", help="run the plan now (as `mixture run`)")
    pl.set_defaults(func=_plan)
    r = s.add_parser("run", help="run the plan's unfinished proxy runs (resumes an interrupted one)")
    r.add_argument("--plan", type=Path, required=True)
    r.set_defaults(func=_run)
    f = s.add_parser("fit", help="fit a finished plan and write the DDO weights")
    f.add_argument(
        "--plan", type=Path, required=True, nargs="+",
        help="plan directory; several: the same plan trained with other seeds, objectives averaged",
    )  # fmt: skip
    f.add_argument("--out", type=Path, required=True, help="weights file (e.g. beside the data)")
    f.add_argument("--floor", type=float, default=0.2, help="least amount of each domain, in base units")
    f.set_defaults(func=_fit)
    pr = s.add_parser("predict", help="AutoScale: extrapolate two DDO weight files to a larger budget")
    pr.add_argument("--small", type=Path, required=True, help="DDO weights at the smaller budget")
    pr.add_argument("--large", type=Path, required=True, help="DDO weights at the larger budget")
    pr.add_argument("--steps", type=int, required=True, help="target budget in steps (same batch and length)")
    pr.add_argument(
        "--cap-unrepeated", type=Path, default=None, metavar="PREFIX",
        help="cap each domain at the tokens it holds in PREFIX (its .meta.json), so none repeats at --steps",
    )  # fmt: skip
    pr.add_argument("--out", type=Path, required=True)
    pr.set_defaults(func=_predict)
    pk = s.add_parser(
        "projektor",
        help="Projektor: pilot runs at two sizes on revealed samples, the OT projection, the chosen mixture",
        description=(
            "Writes the pilot runs (uniform, each source alone, seeded mixtures) at the two --pilot-steps "
            "sizes into --work and trains the unfinished ones (resuming an interrupted one), fits stage 1 (loss "
            "on the mixture's OT distance to the --eval-set texts) at both sizes, projects to --target-steps "
            "(stage 2) and writes the mixture with the lowest projected loss to --out."
        ),
    )
    pk.add_argument("--config", type=Path, required=True, help="run config (model, data, eval_sets)")
    pk.add_argument("--eval-set", required=True, help="eval_sets name: the pilots' loss and the OT's target")
    pk.add_argument("--pilot-steps", type=int, nargs=2, required=True, metavar=("N0", "N1"))
    pk.add_argument("--target-steps", type=int, required=True, help="the size to choose the mixture for")
    pk.add_argument("--mixtures", type=int, default=16, help="pilot mixtures (at least domains + 2)")
    pk.add_argument(
        "--sources", type=Path, default=None,
        help="JSONL (text, domain) the revealed samples come from (default: corpus.jsonl beside the data)",
    )  # fmt: skip
    pk.add_argument("--revealed", type=int, default=100, help="revealed documents per source")
    pk.add_argument("--floor", type=float, default=0.0, help="least weight of every source")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--work", type=Path, required=True, help="pilot runs and fits (resumable)")
    pk.add_argument("--out", type=Path, required=True, help="weights file")
    pk.set_defaults(func=_projektor)


def _plan(args: argparse.Namespace) -> int:
    from mates_megatron.mixture.plan import run_plan, write_plan

    try:
        plan = write_plan(args.config, args.out, steps=args.steps, eval_set=args.eval_set,
                          down=float(args.down), up=float(args.up))  # fmt: skip
    except MixtureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(r["train_iters"] for r in plan["runs"])
    print(f"[mixture] wrote {len(plan['runs'])} proxy runs ({total} steps in all) to {args.out}", flush=True)
    if args.run:
        return _run_or_refuse(lambda: run_plan(args.out, args.runner))
    return 0


def _run(args: argparse.Namespace) -> int:
    from mates_megatron.mixture.plan import run_plan

    return _run_or_refuse(lambda: run_plan(args.plan, args.runner))


def _run_or_refuse(train) -> int:
    """Train; a run the launcher refused (its own ``error:`` line is printed already) or that failed ends the
    command with exit code 2 and the run named, not a traceback. Any other error is a bug: it propagates."""
    from mates_megatron.launch import RunError

    try:
        train()
    except (MixtureError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _fit(args: argparse.Namespace) -> int:
    from mates_megatron.mixture.plan import fit_plan

    try:
        schedule = fit_plan(list(args.plan), floor=args.floor)
    except MixtureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_weights(args.out, schedule)
    print(json.dumps({"weights": schedule.at(0), "out": str(args.out)}, indent=1))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mates_megatron.mixture.weights import read_domain_tokens

    try:
        tokens = None if args.cap_unrepeated is None else read_domain_tokens(args.cap_unrepeated)
        schedule = autoscale_weights(args.small, args.large, args.steps, available_tokens=tokens)
    except MixtureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_weights(args.out, schedule)
    print(json.dumps({"weights": schedule.at(0), "t": schedule.source["t"], "out": str(args.out)}, indent=1))
    return 0


def _projektor(args: argparse.Namespace) -> int:
    import yaml

    from mates_megatron.mixture.projektor import plan_projektor, projektor_weights, run_projektor

    try:
        sources = args.sources
        if sources is None:
            cfg = yaml.safe_load(args.config.read_text()) or {}
            sources = Path(cfg.get("data_prefix", "")).parent / "corpus.jsonl"
        plan_projektor(args.config, args.work, pilot_steps=tuple(args.pilot_steps), mixtures=args.mixtures,
                           eval_set=args.eval_set, sources=sources, revealed=args.revealed, seed=args.seed)  # fmt: skip
        if _run_or_refuse(lambda: run_projektor(args.work, args.runner)):
            return 2
        schedule = projektor_weights(args.work, args.target_steps, floor=args.floor)
    except MixtureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_weights(args.out, schedule)
    print(json.dumps({"weights": schedule.at(0), "projected_loss": schedule.source["projected_loss"],
                      "out": str(args.out)}, indent=1))  # fmt: skip
    return 0
