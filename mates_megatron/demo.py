"""`mates-megatron demo`: a random-selection run and a MATES run on the embedded data, then a report.

Both runs use the same config (model, budget, seeds, TP=2 CPU by default); only the selector differs. Each is
a real `torchrun` job of `mates_megatron.pretrain`, so its progress streams to the terminal. The report:

- ``steps_to_random_final_ratio``: training steps (warm-up included) the MATES run needs to reach the random
  run's final reference loss, over the random run's steps. The crossing is interpolated linearly between the
  two evaluations around it; a run that never reaches it gets ``null`` (and the demo says so).
- ``wall_clock_ratio``: the MATES run's wall-clock seconds up to that crossing, selection included, over the
  random run's training seconds (both summed from per-step times, evaluation excluded).
- ``selection_overhead_fraction``: the MATES run's selection seconds over its training seconds without
  selection (1.0: selection costs as much as training).
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


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="random selection vs MATES on the embedded data (CPU, TP=2): report.json and report.png",
        description=(
            "Runs the config twice under torchrun, once with selector 'random' and once as configured "
            "(MATES), with the same model, budget and seeds; writes OUT/report.json and OUT/report.png."
        ),
    )
    p.add_argument("--config", type=Path, default=Path("configs/demo_cpu.yaml"), help="YAML run config")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--seed", type=int, default=None, help="seed of both runs (training and selection)")
    p.add_argument(
        "--nproc-per-node", type=int, default=None, help="processes (default: TP x PP of the config)"
    )
    p.set_defaults(func=run_demo)


def _run_configs(cfg: dict[str, Any], seed: int | None) -> dict[str, dict[str, Any]]:
    sel = cfg.get("selection") or {}
    if sel.get("scorer", "none") == "none":
        raise ValueError(
            "the demo config's selection has no scorer: set scorer: mates with selector: gumbel (or topk)"
        )
    if seed is not None:
        cfg = {**cfg, "seed": seed, "selection": {**sel, "seed": seed}}
        sel = cfg["selection"]
    # The control: the same run with a score-free selector (no probes, no influence model).
    random_cfg = {**cfg, "selection": {**sel, "selector": "random", "scorer": "none"}}
    return {"random": random_cfg, "mates": cfg}


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


def build_report(random_run: dict[str, Any], mates_run: dict[str, Any]) -> dict[str, Any]:
    sel = mates_run["selection"]
    target = random_run["reference_loss"][-1]
    cross = crossing_step(mates_run["eval_step"], mates_run["reference_loss"], target)
    random_steps = random_run["eval_step"][-1]
    random_seconds = float(sum(random_run["seconds"]))
    mates_seconds = float(sum(mates_run["seconds"]))
    selection_seconds = float(sel["selection_seconds"])
    return {
        "random": {
            "steps": random_run["eval_step"],
            "reference_loss": random_run["reference_loss"],
            "train_seconds": random_seconds,
        },
        "mates": {
            "steps": mates_run["eval_step"],
            "reference_loss": mates_run["reference_loss"],
            "influence_spearman": [r["influence_spearman"] for r in sel["rounds"]],
            "scored_rounds": [r["round"] for r in sel["rounds"]],
            "selected_share_by_domain": sel["selected_share_by_domain"],
            "seconds_per_phase": [r["seconds"] for r in sel["rounds"]],
            "train_seconds": mates_seconds,
            "selection_seconds": selection_seconds,
        },
        "domains": sel["domains"],
        "select_every": sel["select_every"],
        "random_final_reference_loss": target,
        "mates_steps_to_random_final": cross,
        "steps_to_random_final_ratio": None if cross is None else cross / random_steps,
        "wall_clock_ratio": None
        if cross is None
        else _seconds_until(mates_run["seconds"], cross) / random_seconds,
        "selection_overhead_fraction": selection_seconds / max(mates_seconds - selection_seconds, 1e-9),
    }


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a training node
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_share) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ("random", "mates"):
        ax_loss.plot(report[name]["steps"], report[name]["reference_loss"], marker=".", label=name)
    ax_loss.axhline(report["random_final_reference_loss"], color="grey", lw=0.8, ls="--")
    if report["mates_steps_to_random_final"] is not None:
        ax_loss.axvline(report["mates_steps_to_random_final"], color="grey", lw=0.8, ls=":")
    ax_loss.set(xlabel="training step", ylabel="reference loss", title="Reference loss")
    ax_loss.legend()
    shares = report["mates"]["selected_share_by_domain"]
    rounds = np.arange(len(shares))
    bottom = np.zeros(len(shares))
    for dom in report["domains"]:
        vals = np.array([s.get(dom, 0.0) for s in shares])
        ax_share.bar(rounds, vals, bottom=bottom, label=dom)
        bottom += vals
    ax_share.set(
        xlabel=f"round ({report['select_every']} steps each)", ylabel="share of selected samples",
        title="MATES selection per domain",
    )  # fmt: skip
    ax_share.set_xticks(rounds)
    ax_share.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    from mates_megatron.cli import launch_pretrain

    if not args.config.is_file():
        print(f"error: config {args.config} not found (run from the repository root or pass --config)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        configs = _run_configs(yaml.safe_load(args.config.read_text()) or {}, args.seed)
    except ValueError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for i, (name, cfg) in enumerate(configs.items(), 1):
        cfg_path, metrics_path = args.out / f"{name}.yaml", args.out / f"{name}.json"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"[demo] run {i}/2: {name} selection ({cfg_path})", flush=True)
        rc = launch_pretrain(cfg_path, ["--metrics-out", str(metrics_path)], args.nproc_per_node)
        if rc:
            print(f"error: the {name} run failed (exit code {rc}); see its output above", file=sys.stderr)
            return rc
        runs[name] = json.loads(metrics_path.read_text())
    report = build_report(runs["random"], runs["mates"])
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    plot_report(report, args.out / "report.png")
    ratio = report["steps_to_random_final_ratio"]
    print(
        f"[demo] random final reference loss {report['random_final_reference_loss']:.4f}; MATES reaches it "
        + (
            f"at step {report['mates_steps_to_random_final']:.1f}: steps ratio {ratio:.3f}, "
            f"wall-clock ratio {report['wall_clock_ratio']:.3f}"
            if ratio is not None
            else "never (no speed-up in this run)"
        )
        + f"; selection overhead {report['selection_overhead_fraction']:.2f}x training",
        flush=True,
    )
    print(f"[demo] wrote {args.out / 'report.json'} and {args.out / 'report.png'}", flush=True)
    return 0
