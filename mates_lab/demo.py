"""`mates-lab demo`: the arms of the evidence, same model, budget and seeds, on the embedded data.

Every arm is the config run once under torchrun (``mates_megatron.pretrain``, so its progress streams to the
terminal) with only its selection changed:

- ``random``: a uniform draw per round (the control every ratio is read against);
- ``mates``: the config as written (probes on the live model + the influence model, Gumbel-top-k);
- ``static``: MATES's influence model fitted once, at the first scored round, then reused (the paper's
  static comparison);
- ``dsir``: importance resampling toward the probe reference on hashed n-grams (Xie et al. 2023);
- ``classifier``: a quality classifier, probe reference vs pool, on hashed n-grams, top-k (DCLM style);
- ``lava`` / ``gotd``: optimal-transport values toward the probe reference on the influence encoder's
  embeddings (LAVA's calibrated gradient, least harmful first; GOT-D's calibrated potential, most negative
  first), top-k; ``lookalike`` (by name only): nearest to the reference in the same embedding. They embed at
  128 encoder tokens per candidate (``max_length``) to keep the CPU demo's embedding time down;
- ``mates_target`` / ``mates_all``: MATES with the probes' reference loss on the target words only (the
  paper's LAMBADA oracle) or on every reference token (chosen by name only, to settle ``probe_tokens``);
- ``mates_single``: MATES with ``influence_rounds: 1``, each round's influence model fitted on that round's
  probes alone (the paper; chosen by name only, to compare with the config's fit across rounds);
- ``group_mates``, ``classifier>group_mates`` (by name only): Group-MATES on the config's MATES settings
  with first-order rollouts (``_group``), alone and stacked on the classifier as its paper runs it
  (``STACKED_KEEP``).

Every arm keeps the config's random warm-up, so that every arm selects the same number of rounds.

The headline is read from a held-out evaluation set (``--headline``, an ``eval_sets`` key of the config;
by default the language-modelling loss on held-out documents of the reference domain, from source files
that neither the pool nor the probe reference draws from), never from the probe reference itself. Curves
are smoothed by the trailing mean of the last ``SMOOTH`` evaluations before anything is read from them:

- ``final_heldout_loss``: the smoothed loss at the last step (the mean of the last SMOOTH evaluations);
- ``steps_to_random_final_heldout_ratio``: the first step where the arm's smoothed curve reaches random's
  final, linear between evaluations, over random's steps (None: never reached);
- ``wall_clock_ratio``: the arm's seconds up to that step, selection included, over random's training
  seconds (summed per-step times, evaluation excluded).

A second headline averages every held-out domain (``heldout/<domain>``, each domain weighted alike): a
selector that wins on the reference domain by giving up the others shows it there (``*_all_domains`` keys).
The probe-set figures (``reference_loss``; ``steps_to_random_final_ratio`` etc., unsmoothed) stay secondary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ARMS = ("random", "mates", "static", "dsir", "classifier", "lava", "gotd")
VARIANT_ARMS = ("mates_target", "mates_all", "mates_single", "lookalike", "group_mates",
                "classifier>group_mates")  # fmt: skip
"""Arms run when named only (not part of 'all'): MATES with one setting changed, look-alike, Group-MATES."""
DEFAULT_ARMS = ("random", "mates")
STACKED_KEEP = 0.5
"""The classifier's kept fraction in the stacked arm: 2.5 times what a round trains on (selection_ratio 0.2)."""
SMOOTH = 3
"""Evaluations averaged (trailing) before a curve is read: one evaluation moves by about 0.1 nats."""


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="random selection vs MATES (and the static baselines) on the embedded data: report.json/png",
        description=(
            "Runs the config once per arm under torchrun (random, mates and, with --arms, static, dsir, "
            "classifier, lava, gotd), with the same model, budget and seeds; writes OUT/report.json and OUT/report.png."
        ),
    )
    p.add_argument("--config", type=Path, default=Path("configs/demo_cpu.yaml"), help="YAML run config")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--seed", type=int, default=None, help="seed of every run (training and selection)")
    p.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma-separated arms among {', '.join(ARMS + VARIANT_ARMS)}, or 'all' (the first "
        f"{len(ARMS)}; default: %(default)s); random is always run (every ratio is read against it)",
    )
    p.add_argument(
        "--headline",
        default="heldout/python_docs",
        help="the eval_sets key the headline is read from (default: %(default)s)",
    )
    p.add_argument(
        "--nproc-per-node", type=int, default=None, help="processes (default: TP x PP of the config)"
    )
    p.set_defaults(func=run_demo)


def parse_arms(text: str) -> list[str]:
    names = list(ARMS) if text.strip() == "all" else [a.strip() for a in text.split(",") if a.strip()]
    known = ARMS + VARIANT_ARMS
    unknown = [a for a in names if a not in known]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown} in --arms: choose among {', '.join(known)} or 'all'")
    return ["random"] + [a for a in known if a in names and a != "random"]


def _run_configs(cfg: dict[str, Any], seed: int | None, arms=DEFAULT_ARMS) -> dict[str, dict[str, Any]]:
    sel = cfg.get("selection") or {}
    if sel.get("scorer", "none") == "none":
        raise ValueError(
            "the demo config's selection has no scorer: set scorer: mates with selector: gumbel (or topk)"
        )
    from mates_megatron.config import SelectionConfig
    from mates_megatron.configio import normalize

    sel = normalize(SelectionConfig, sel, where="the demo config", path="selection.")
    if seed is not None:
        sel = {**sel, "seed": seed}
        cfg = {**cfg, "seed": seed}
    mates = sel.get("scorer_options") or {}

    def arm(selector: str, scorer: str, **options: Any) -> dict[str, Any]:
        """Another selector and scorer on the config's run settings (its warm-up included)."""
        return {**sel, "selector": selector, "selector_options": {}, "scorer": scorer,
                "scorer_options": options}  # fmt: skip

    selections = {
        "random": arm("random", "none"),
        "mates": sel,
        "static": {**sel, "scorer": "static"},
        "dsir": arm("importance", "dsir"),
        "classifier": arm("topk", "classifier"),
        **{a: arm("topk", a, max_length=128) for a in ("lava", "gotd", "lookalike")},
        "mates_target": {**sel, "scorer_options": {**mates, "probe_tokens": "target"}},
        "mates_all": {**sel, "scorer_options": {**mates, "probe_tokens": "all"}},
        "mates_single": {**sel, "scorer_options": {**mates, "influence_rounds": 1}},
        "group_mates": arm("cluster_greedy", "group_mates", **_group(mates)),
        "classifier>group_mates": {
            **arm("cluster_greedy", "group_mates", **_group(mates)),
            "filters": [{"kind": "classifier", "keep": STACKED_KEEP}],
        },
    }
    return {a: {**cfg, "selection": selections[a]} for a in parse_arms(",".join(arms))}


def _group(mates: dict[str, Any]) -> dict[str, Any]:
    """The config's MATES options as Group-MATES's: rollouts scored to first order (``linearized_rollout``,
    the cost of MATES's linearized probes), the relational model on the same frozen-encoder settings, and whole
    rollouts of probes. The authors' rollout oracle (a reference pass after every step) projects at 23x a
    round's training on the CPU demo (687 s against 29 s) and is refused by the cost guard; against it the
    first-order rollouts rank at Spearman 0.47 to 0.70 (``docs/results/probes.md``)."""
    influence = {**(mates.get("influence") or {}), "model": "relational"}
    length = int((influence.get("relational") or {}).get("rollout_length", 10))
    probes = -(-int(mates.get("probe_samples", 256)) // length) * length
    return {**mates, "estimator": "linearized_rollout", "influence": influence, "probe_samples": probes}


def crossing_step(steps: list[int], losses: list[float], target: float) -> float | None:
    """First step where the loss curve reaches ``target``, linear between evaluations; None if never."""
    for i, (s, v) in enumerate(zip(steps, losses, strict=True)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], losses[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def _seconds_until(seconds: list[float], step: float) -> float:
    """Wall-clock seconds of the first ``step`` steps (a fractional step counts its share)."""
    whole = int(math.floor(step))
    t = float(sum(seconds[:whole]))
    if whole < len(seconds):
        t += (step - whole) * seconds[whole]
    return t


def _train_seconds(run: dict[str, Any]) -> float:
    """The run's step seconds without the hooks (selection) at their ends (older metrics: less selection)."""
    if "hook_seconds" in run:
        return float(sum(run["seconds"]) - sum(run["hook_seconds"]))
    return float(sum(run["seconds"])) - float((run.get("selection") or {}).get("selection_seconds", 0.0))


def smooth(values: list[float], k: int = SMOOTH) -> list[float]:
    """Trailing mean over the last ``k`` values (fewer at the start)."""
    return [float(np.mean(values[max(0, i - k + 1) : i + 1])) for i in range(len(values))]


def _curve_figures(
    run: dict[str, Any], curve: list[float], random_curve: list[float], random_run, k: int = SMOOTH
) -> dict:
    """Final loss, steps and wall-clock ratio to random's final, for one curve of one arm, each curve
    smoothed over ``k`` evaluations (1: as logged)."""
    sm, rsm = smooth(curve, k), smooth(random_curve, k)
    random_steps = random_run["eval_step"][-1]
    cross = crossing_step(run["eval_step"], sm, rsm[-1])
    return {
        "final": sm[-1],
        "steps_to_random_final": cross,
        "steps_ratio": None if cross is None else cross / random_steps,
        "wall_clock_ratio": None
        if cross is None
        else _seconds_until(run["seconds"], cross) / float(sum(random_run["seconds"])),
    }


def domain_sets(evals: dict[str, list[float]], headline: str) -> list[str]:
    """The per-domain keys of the headline's evaluation file (``heldout/python_docs`` -> every ``heldout/*``)."""
    stem = headline.split("/", 1)[0]
    return sorted(k for k in evals if k.startswith(f"{stem}/"))


def mean_curve(evals: dict[str, list[float]], keys: list[str]) -> list[float]:
    """The evaluations' mean over ``keys`` at each step (each domain weighted alike)."""
    return np.mean([evals[k] for k in keys], axis=0).tolist()


def _arm(run: dict[str, Any], random_run: dict[str, Any], headline: str) -> dict[str, Any]:
    evals = run.get("eval", {})
    if headline not in evals:
        raise ValueError(
            f"evaluation set {headline!r} was not logged (logged: {sorted(evals) or 'none'}); set eval_sets in "
            "the config (`mates-lab embedded` writes heldout.jsonl) or pass --headline"
        )
    held = _curve_figures(run, evals[headline], random_run["eval"][headline], random_run)
    domains = domain_sets(evals, headline)
    every = (
        _curve_figures(run, mean_curve(evals, domains), mean_curve(random_run["eval"], domains), random_run)
        if domains
        else None
    )
    probe = _curve_figures(run, run["reference_loss"], random_run["reference_loss"], random_run)
    sel = run.get("selection") or {}
    rounds = sel.get("rounds", [])
    return {
        "eval_step": run["eval_step"],
        "heldout_loss": evals[headline],
        "final_heldout_loss": held["final"],
        "steps_to_random_final_heldout": held["steps_to_random_final"],
        "steps_to_random_final_heldout_ratio": held["steps_ratio"],
        "wall_clock_ratio": held["wall_clock_ratio"],
        "all_domains_sets": domains,
        "final_heldout_loss_all_domains": None if every is None else every["final"],
        "steps_to_random_final_heldout_all_domains_ratio": None if every is None else every["steps_ratio"],
        "final_eval": {k: smooth(v)[-1] for k, v in sorted(evals.items())},
        "reference_loss": run["reference_loss"],
        "final_reference_loss": probe["final"],
        "steps_to_random_final_reference_ratio": probe["steps_ratio"],
        # Training alone (the steps, without the selection rounds at their ends), the selection apart, and the
        # wall clock of both: a MATES run's per-step seconds include its rounds.
        "train_seconds": _train_seconds(run),
        "selection_seconds": float(sel.get("selection_seconds", 0.0)),
        "wall_seconds": float(sum(run["seconds"])),
        "selected_share_by_domain": sel.get("selected_share_by_domain", []),
        "scored_rounds": [r["round"] for r in rounds],
        "influence_spearman": [r.get("influence_spearman") for r in rounds],
        "fallback_rounds": [r["round"] for r in rounds if r.get("fallback")],
        "oracle_by_domain": [r.get("oracle_by_domain") for r in rounds],
    }


def build_report(runs: dict[str, dict[str, Any]], headline: str = "heldout/python_docs") -> dict[str, Any]:
    """The report of every arm run (``runs["random"]`` required), read from the headline evaluation set."""
    random_run = runs["random"]
    arms = {name: _arm(run, random_run, headline) for name, run in runs.items()}
    any_sel = next((r["selection"] for r in runs.values() if r.get("selection")), {})
    report: dict[str, Any] = {
        "headline_eval": headline,
        "smoothing_evaluations": SMOOTH,
        "random_final_heldout_loss": arms["random"]["final_heldout_loss"],
        "random_final_heldout_loss_all_domains": arms["random"]["final_heldout_loss_all_domains"],
        "arms": arms,
        "domains": any_sel.get("domains", []),
        "select_every": any_sel.get("select_every"),
    }
    if "mates" in runs:
        report.update(_probe_set_figures(random_run, runs["mates"]))
    return report


def _probe_set_figures(random_run: dict[str, Any], mates_run: dict[str, Any]) -> dict[str, Any]:
    """MATES against random on the probe reference, unsmoothed (the figures of earlier reports)."""
    fig = _curve_figures(
        mates_run, mates_run["reference_loss"], random_run["reference_loss"], random_run, k=1
    )
    selection_seconds = float(mates_run["selection"]["selection_seconds"])
    return {
        "random_final_reference_loss": random_run["reference_loss"][-1],
        "mates_steps_to_random_final": fig["steps_to_random_final"],
        "steps_to_random_final_ratio": fig["steps_ratio"],
        "wall_clock_ratio": fig["wall_clock_ratio"],
        "selection_overhead_fraction": selection_seconds / max(_train_seconds(mates_run), 1e-9),
    }


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a training node
    import matplotlib.pyplot as plt

    arms = report["arms"]
    fig, (ax_held, ax_ref, ax_share) = plt.subplots(1, 3, figsize=(17, 4.5))
    for name, arm in arms.items():
        (line,) = ax_held.plot(arm["eval_step"], smooth(arm["heldout_loss"]), marker=".", label=name)
        ax_held.plot(arm["eval_step"], arm["heldout_loss"], color=line.get_color(), lw=0.5, alpha=0.4)
        ax_ref.plot(arm["eval_step"], arm["reference_loss"], marker=".", label=name)
    ax_held.axhline(report["random_final_heldout_loss"], color="grey", lw=0.8, ls="--")
    ax_held.set(xlabel="training step", ylabel="loss", title=f"Held-out: {report['headline_eval']} "
                f"(mean of {report['smoothing_evaluations']})")  # fmt: skip
    ax_held.legend()
    ax_ref.set(xlabel="training step", ylabel="loss", title="Probe reference (what the probes score on)")
    ax_ref.legend()
    shares = arms.get("mates", arms["random"])["selected_share_by_domain"]
    rounds = np.arange(len(shares))
    bottom = np.zeros(len(shares))
    for dom in report["domains"]:
        vals = np.array([s.get(dom, 0.0) for s in shares])
        ax_share.bar(rounds, vals, bottom=bottom, label=dom)
        bottom += vals
    ax_share.set(
        xlabel=f"round ({report['select_every']} steps each)", ylabel="share of selected samples",
        title=("MATES" if "mates" in arms else "random") + " selection per domain",
    )  # fmt: skip
    ax_share.set_xticks(rounds)
    ax_share.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(report: dict[str, Any]) -> str:
    """The arms as a text table (what the demo prints at the end)."""

    def f(v, fmt=".3f"):
        return "never" if v is None else format(v, fmt)

    lines = [
        f"{'arm':<11} {'held-out final':>14} {'steps ratio':>11} {'wall ratio':>10} "
        f"{'all-domain final':>16} {'all-domain ratio':>16} {'probe-set final':>15} {'probe steps ratio':>17}"
    ]
    for name, a in report["arms"].items():
        lines.append(
            f"{name:<11} {a['final_heldout_loss']:>14.4f} {f(a['steps_to_random_final_heldout_ratio']):>11} "
            f"{f(a['wall_clock_ratio'], '.2f'):>10} {f(a['final_heldout_loss_all_domains'], '.4f'):>16} "
            f"{f(a['steps_to_random_final_heldout_all_domains_ratio']):>16} {a['final_reference_loss']:>15.4f} "
            f"{f(a['steps_to_random_final_reference_ratio']):>17}"
        )
    return "\n".join(lines)


def _check_arms(
    configs: dict[str, dict[str, Any]], path: Path, built: dict | None = None, world: int | None = None
) -> dict | None:
    """Each arm's TrainConfig built as its ranks build it (``pretrain.train_config_from_dict``), or with
    ``built`` (those configs) the files they read and its round's projected cost checked on ``world``
    processes, as every rank checks them at its start; None after one ``error: <config>: ...`` line."""
    from mates_megatron.pretrain import check_run_files, train_config_from_dict
    from mates_megatron.training.build import check_round_cost_before_launch

    out = {}
    for name, cfg in configs.items():
        where = f"{path} (arm {name})"
        try:
            if built is None:
                out[name] = train_config_from_dict(cfg, where=where)
                continue
            check_run_files(built[name], where=where)
            check_round_cost_before_launch(built[name], world=world, where=where)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return None
    return out if built is None else built


def run_demo(args: argparse.Namespace) -> int:
    from mates_lab.data.embedded_check import ensure_embedded_data
    from mates_megatron.launch import RunError, launch_pretrain, run_config

    if not args.config.is_file():
        print(f"error: config {args.config} not found (run from the repository root or pass --config)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        configs = _run_configs(
            yaml.safe_load(args.config.read_text()) or {}, args.seed, parse_arms(args.arms)
        )
    except ValueError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    # Every arm's config as its ranks will build it, before anything is built or launched: a bad arm is refused
    # in one line, not after the arms before it have trained.
    if (built := _check_arms(configs, args.config)) is None:
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    if (rc := ensure_embedded_data(next(iter(configs.values())))) != 0:
        return rc
    if _check_arms(configs, args.config, built, args.nproc_per_node) is None:  # files exist now; costs
        return 2
    for i, (name, cfg) in enumerate(configs.items(), 1):
        print(f"[demo] run {i}/{len(configs)}: {name} ({args.out / name / 'config.yaml'})", flush=True)
        try:
            runs[name] = run_config(
                cfg,
                args.out / name,
                runner=lambda path, rest: launch_pretrain(path, rest, args.nproc_per_node),
            )
        except RunError as e:
            print(f"error: the {name} run: {e}", file=sys.stderr)
            return 1
    try:
        report = build_report(runs, args.headline)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    plot_report(report, args.out / "report.png")
    print(f"[demo] held-out set {args.headline}, curves smoothed over {SMOOTH} evaluations; ratios against "
          f"random's final held-out loss {report['random_final_heldout_loss']:.4f}:", flush=True)  # fmt: skip
    print(format_table(report), flush=True)
    print(f"[demo] wrote {args.out / 'report.json'} and {args.out / 'report.png'}", flush=True)
    return 0
