"""`mates-lab bench demo-seeds`: the demo's arms over seeds, with paired intervals on both headlines.

Each seed is one `mates-lab demo --seed S` in ``WORK/seed_S`` (the same config, arms and launcher; an
interrupted seed resumes arm by arm, a finished arm is read, not trained again). The figures are read from
every seed whose arms have all finished:

- ``arms``: per arm, over seeds (mean and 95% t-interval), the reference-domain headline (``final``, the
  smoothed held-out loss of the headline set at the last step) and the all-domain headline (``final_all``,
  every held-out domain weighted alike), the steps ratio to random's final (``never`` counted apart) and the
  selection seconds;
- ``paired``: per seed differences, ``A-B`` for every arm against random and for ``COMPARISONS`` (negative:
  A ends lower), on both headlines; an interval wholly below 0 is a difference the seeds agree on;
- ``domains``: per arm and held-out domain the paired gap to random (positive: worse than random), and the
  worst domain (largest mean gap);
- ``targets``: issue 36's, read from the above and reported whatever they are, with how many of the Group-MATES
  arms' scored rounds were selected by their scores (a round whose influence fit fails the poor-fit guard is a
  uniform draw: with none left, a target met is met by random data).

The seeds share nothing but the config: each seed changes the model's initialisation, the data order and the
selection's draws, and every arm of a seed shares them (that is what makes the differences paired).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mates_lab.bench.intervals import mean_ci

COMPARISONS = (("classifier>group_mates", "classifier"), ("group_mates", "mates"),
               ("group_mates", "classifier>group_mates"), ("mates", "classifier"), ("static", "mates"))  # fmt: skip
"""Pairs reported beside every arm against random, where both arms ran."""
HEADLINES = {"final": "final_heldout_loss", "final_all": "final_heldout_loss_all_domains"}


def seed_dir(work: Path, seed: int) -> Path:
    return work / f"seed_{seed}"


def read_seed(directory: Path, arms: list[str], headline: str) -> dict[str, Any] | None:
    """The demo report of one seed from its arms' metrics (``directory/<arm>/metrics.json``); None while an
    arm has not finished."""
    from mates_lab.demo import build_report

    paths = {a: directory / a / "metrics.json" for a in arms}
    if not all(p.is_file() for p in paths.values()):
        return None
    return build_report({a: json.loads(p.read_text()) for a, p in paths.items()}, headline)


def _gap(reports: dict[int, dict], a: str, b: str, key: str) -> dict[str, Any]:
    return mean_ci([r["arms"][a][key] - r["arms"][b][key] for r in reports.values()])


def _below(ci: dict[str, Any]) -> dict[str, Any]:
    """A paired difference read as 'A below B': by its mean, and by its interval (both ends below 0)."""
    return {"mean": ci["mean"], "ci95": ci["ci95"], "mean_below": ci["mean"] < 0,
            "interval_below": ci["ci95"] is not None and ci["ci95"][1] < 0}  # fmt: skip


def summarise(reports: dict[int, dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """The figures over the seeds in ``reports`` (seed -> the demo's report, every arm in ``arms``)."""
    seeds = sorted(reports)
    out: dict[str, Any] = {"seeds": seeds, "arms": {}, "paired": {}, "domains": {}}
    for a in arms:
        runs = [reports[s]["arms"][a] for s in seeds]
        ratios = [r["steps_to_random_final_heldout_ratio"] for r in runs]
        out["arms"][a] = {
            **{h: mean_ci([r[key] for r in runs]) for h, key in HEADLINES.items()},
            "steps_ratio": {"per_seed": ratios, "never": sum(v is None for v in ratios),
                            "mean_reached": float(np.mean([v for v in ratios if v is not None]))
                            if any(v is not None for v in ratios) else None},
            "selection_seconds": mean_ci([r["selection_seconds"] for r in runs]),
            # Scored rounds that fell back to a uniform draw (a poor influence fit): an arm whose rounds all
            # fell back trained on random data, whatever its figures say.
            "fallback_rounds": [len(r["fallback_rounds"]) for r in runs],
            "scored_rounds": [len(r["scored_rounds"]) for r in runs],
        }  # fmt: skip
    pairs = [(a, "random") for a in arms if a != "random"]
    pairs += [(a, b) for a, b in COMPARISONS if a in arms and b in arms]
    for a, b in pairs:
        out["paired"][f"{a}-{b}"] = {h: _gap(reports, a, b, key) for h, key in HEADLINES.items()}
    sets = reports[seeds[0]]["arms"]["random"]["all_domains_sets"]
    for a in arms:
        if a == "random":
            continue
        gaps = {
            d: mean_ci([reports[s]["arms"][a]["final_eval"][d] - reports[s]["arms"]["random"]["final_eval"][d]
                        for s in seeds])
            for d in sets
        }  # fmt: skip
        worst = max(gaps, key=lambda d: gaps[d]["mean"]) if gaps else None
        out["domains"][a] = {"gap_to_random": gaps, "worst": worst,
                             "worst_gap": gaps[worst]["mean"] if worst else None}  # fmt: skip
    out["targets"] = targets(out)
    return out


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Issue 36's targets on the demo, where their arms ran: the stacked arm below the classifier on both
    headlines; Group-MATES at or below MATES on the all-domain headline, with no held-out domain worse than
    random by more than half of MATES's worst gap."""
    paired, domains, out = summary["paired"], summary["domains"], {}
    for a in ("group_mates", "classifier>group_mates"):
        if a in summary["arms"]:
            arm = summary["arms"][a]
            out[f"{a}_rounds_selected_by_scores"] = sum(arm["scored_rounds"]) - sum(arm["fallback_rounds"])
    if "classifier>group_mates-classifier" in paired:
        out["stacked_below_classifier"] = {
            h: _below(paired["classifier>group_mates-classifier"][h]) for h in HEADLINES
        }
    if "group_mates-mates" in paired:
        ci = paired["group_mates-mates"]["final_all"]
        out["group_mates_at_or_below_mates_all_domains"] = {**_below(ci), "at_or_below": ci["mean"] <= 0}
    if "group_mates" in domains and "mates" in domains:
        limit = 0.5 * domains["mates"]["worst_gap"]
        out["group_mates_worst_domain_gap"] = {
            "worst_domain": domains["group_mates"]["worst"], "gap": domains["group_mates"]["worst_gap"],
            "limit_half_mates_worst": limit, "mates_worst_domain": domains["mates"]["worst"],
            "met": domains["group_mates"]["worst_gap"] <= limit,
        }  # fmt: skip
    return out


def bench_demo_seeds(
    config: Path, work: Path, seeds: list[int], arms: str, *, headline: str = "heldout/python_docs",
    nproc_per_node: int | None = None, run: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Run the demo for each seed not finished (``run``), then read every finished seed."""
    from mates_lab.demo import parse_arms, run_demo

    names = parse_arms(arms)
    t0 = time.perf_counter()
    reports: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        d = seed_dir(work, seed)
        if run and read_seed(d, names, headline) is None:
            print(f"[bench demo-seeds] seed {seed}: {d}", flush=True)
            args = argparse.Namespace(config=config, out=d, seed=seed, arms=",".join(names),
                                      headline=headline, nproc_per_node=nproc_per_node)  # fmt: skip
            if (rc := run_demo(args)) != 0:
                raise RuntimeError(f"the demo of seed {seed} failed (exit code {rc}); run again to resume it")
        if (report := read_seed(d, names, headline)) is not None:
            reports[seed] = report
    missing = [s for s in seeds if s not in reports]
    if not reports:
        raise RuntimeError(f"no seed of {seeds} has finished every arm of {names} under {work}")
    return {
        "config": str(config), "headline": headline, "arms": names, "seeds_missing": missing,
        "summary": summarise(reports, names), "wall_seconds": time.perf_counter() - t0,
    }  # fmt: skip


def add_demo_seeds_parser(bsub) -> None:
    """The ``bench demo-seeds`` sub-command (registered from ``mates_lab.bench``)."""
    from mates_lab.bench.output import write_result

    p = bsub.add_parser(
        "demo-seeds",
        help="the demo's arms over seeds: both headlines with paired 95%% intervals, gaps per held-out domain",
    )
    p.add_argument("--config", type=Path, default=Path("configs/demo_cpu.yaml"), help="YAML run config")
    p.add_argument(
        "--work", type=Path, default=Path("runs/demo_seeds"), help="WORK/seed_S per seed (resumable)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2, 3, 4, 5, 6, 7])
    p.add_argument("--arms", default="random,mates,classifier,group_mates,classifier>group_mates",
                   help="as the demo's --arms (default: %(default)s)")  # fmt: skip
    p.add_argument("--headline", default="heldout/python_docs", help="as the demo's --headline")
    p.add_argument("--nproc-per-node", type=int, default=None, help="as the demo's")
    p.add_argument("--gather", action="store_true", help="read the finished seeds only; train nothing")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(
        func=lambda a: write_result(
            bench_demo_seeds(a.config, a.work, a.seeds, a.arms, headline=a.headline,
                             nproc_per_node=a.nproc_per_node, run=not a.gather),
            a.out,
        ) or 0
    )  # fmt: skip
