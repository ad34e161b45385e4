"""DDO's proxy runs at one budget: the plan, running it with the project's training loop (resumable), and the
fit that turns the results into a weights file.

A plan directory holds ``plan.json``, the runs' weights (``weights/NAME.json``) and one directory per run
(``runs/NAME/``: ``config.yaml``, ``weights.json``, the copy of the weights its mixture selector serves,
``metrics.json`` once it has finished, and its checkpoints while it runs). ``run_plan`` skips a finished run and resumes an unfinished one from its last checkpoint, so a
killed planning job picks up where it stopped.

Units: the base run trains ``steps`` steps on the uniform mixture, so each domain gets ``steps * gbs / m``
samples: one unit. Run ``<domain>_x<X>`` keeps every other domain at one unit and gives ``domain`` X units;
it trains ``round(steps * (m - 1 + X) / m)`` steps (the total changes with the one domain, as in the
paper) on the weights ``(1, ..., X, ..., 1) / (m - 1 + X)``. The x used in the fit is the amount the run
really served (the rounding of its steps moves it slightly).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mates_megatron.launch import Runner, run_config
from mates_megatron.mixture.ddo import ddo_weights
from mates_megatron.mixture.weights import MixtureError, WeightSchedule, constant, write_weights

PLAN = "plan.json"


@dataclass(frozen=True)
class ProxyRun:
    name: str
    domain: str | None
    """The scaled domain (None: the uniform base)."""
    x: float
    """Units of ``domain`` (1 for the base)."""
    train_iters: int
    weights: dict[str, float]


def proxy_runs(domains: list[str], steps: int, *, down: float = 1 / 3, up: float = 3.0) -> list[ProxyRun]:
    """The 2m + 1 runs: base, then each domain at ``down`` and ``up`` units."""
    m = len(domains)
    if m < 2:
        raise MixtureError(f"a mixture needs at least 2 domains, the pool has {domains}")
    if not 0 < down < 1 < up:
        raise MixtureError(f"scales must satisfy 0 < down < 1 < up, got down={down}, up={up}")
    runs = [ProxyRun("base", None, 1.0, steps, {d: 1 / m for d in domains})]
    for d in domains:
        for x in (down, up):
            total = m - 1 + x
            w = {e: (x if e == d else 1.0) / total for e in domains}
            runs.append(ProxyRun(f"{d}_x{x:.3g}", d, x, max(1, round(steps * total / m)), w))
    return runs


def _selection(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config's selection mapping in today's spelling (component sections as ``*_options``)."""
    from mates_megatron.config import SelectionConfig
    from mates_megatron.configio import normalize

    return normalize(SelectionConfig, cfg.get("selection") or {}, where="the run config's selection")


def pool_domains(cfg: dict[str, Any]) -> list[str]:
    """The domains of a run config's pool, in the pool's order."""
    sel = _selection(cfg)
    if sel.get("pool", "indexed") == "indexed":
        meta = Path(f"{cfg['data_prefix']}.meta.json")
        if not meta.is_file():
            raise MixtureError(
                f"{meta}: not found; the indexed pool's domains come from `mates-megatron prepare`"
            )
        names = json.loads(meta.read_text()).get("domains") or []
    else:
        from mates_megatron.config import SelectionConfig
        from mates_megatron.pool import POOLS

        pool_sel = SelectionConfig(pool=sel["pool"], pool_options=sel.get("pool_options") or {})
        names = (
            POOLS.get(pool_sel.pool).from_config(pool_sel.pool_config, num_samples=0, seq_length=1).domains
        )
    if not names:
        raise MixtureError("the pool names no domains: a mixture needs each candidate's domain")
    return list(names)


def write_plan(
    base_config: Path, out: Path, *, steps: int, eval_set: str, down: float = 1 / 3, up: float = 3.0,
    save_interval: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write ``out/plan.json`` and every run's config and weights. The base config is any run config: its
    selection becomes the mixture selector on the run's weights; evaluation happens at the end of each run."""
    if not Path(base_config).is_file():
        raise MixtureError(f"run config {base_config}: no such file")
    cfg = yaml.safe_load(Path(base_config).read_text()) or {}
    if eval_set not in (cfg.get("eval_sets") or {}):
        raise MixtureError(
            f"{base_config}: eval_sets has no {eval_set!r} (has {sorted(cfg.get('eval_sets') or {})}); the "
            "objective is its per-domain validation loss: add it, with a 'domain' on every line"
        )
    domains = pool_domains(cfg)
    out.mkdir(parents=True, exist_ok=True)
    runs = proxy_runs(domains, steps, down=down, up=up)
    for run in runs:
        source = {"method": "ddo-proxy", "run": run.name}
        w = write_weights(out / "weights" / f"{run.name}.json", constant(run.weights, source))
        write_run_config(cfg, out / "runs" / run.name, w, run.train_iters, save_interval)
    plan = {
        "base_config": str(base_config), "steps": steps, "domains": domains, "eval_set": eval_set,
        "down": down, "up": up, "global_batch_size": int(cfg.get("global_batch_size", 1)),
        "seq_length": int((cfg.get("model") or {}).get("seq_length", 0)),
        "runs": [asdict(r) for r in runs],
    }  # fmt: skip
    (out / PLAN).write_text(json.dumps(plan, indent=1))
    return plan


def write_run_config(
    cfg: dict[str, Any], run_dir: Path, weights: Path, train_iters: int, save_interval: int | None = None
) -> Path:
    """``run_dir/config.yaml``: ``cfg`` trained ``train_iters`` steps on the mixture in ``weights`` (copied to
    ``run_dir/weights.json``, which the run reads), evaluated at its end, checkpointed into ``run_dir/ckpt``
    (and resumed from there). A directory that holds a run of another config or other weights, finished or
    not, is refused: its metrics or checkpoints would be taken for this run's."""
    sel = {
        k: v for k, v in _selection(cfg).items() if k not in ("scorer", "scorer_options", "selector_options")
    }
    every = save_interval or max(1, train_iters // 2)
    own = run_dir / "weights.json"
    rc = {
        **cfg, "train_iters": train_iters, "eval_interval": train_iters,
        "save": str(run_dir / "ckpt"), "load": str(run_dir / "ckpt"), "save_interval": every,
        "selection": {**sel, "selector": "mixture", "selector_options": {"weights": str(own)}, "scorer": "none",
                      "warmup_steps": 0},
    }  # fmt: skip
    text, path, mix = yaml.safe_dump(rc, sort_keys=False), run_dir / "config.yaml", Path(weights).read_text()
    started = (run_dir / "metrics.json").is_file() or (run_dir / "ckpt").is_dir()
    if started and (not path.is_file() or path.read_text() != text or own.read_text() != mix):
        raise MixtureError(
            f"{run_dir} holds a run of another config or other weights than {weights}; remove the directory "
            "to train this one there"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    own.write_text(mix)
    path.write_text(text)
    return path


def train_once(config: Path, runner: Runner | None = None) -> dict[str, Any]:
    """Train ``config`` (written by ``write_run_config``) unless it has finished; resumes an interrupted run.
    Returns the metrics; the run's checkpoints are deleted once it has finished."""
    cfg = yaml.safe_load(Path(config).read_text())
    return run_config(cfg, Path(config).parent, runner=runner, keep_checkpoints=False)


def read_plan(plan_dir: Path) -> dict[str, Any]:
    p = Path(plan_dir) / PLAN
    if not p.is_file():
        raise MixtureError(f"{p}: no plan here; write one with `mates-megatron mixture plan`")
    return json.loads(p.read_text())


def run_plan(plan_dir: Path, runner: Runner | None = None) -> None:
    """Run every unfinished run of the plan; a finished one (its metrics.json) is skipped, an interrupted
    one resumes from its checkpoint. ``runner(config, args) -> exit code`` (default: `mates-megatron
    pretrain`). A finished run's checkpoints are deleted (only its metrics are read)."""
    plan = read_plan(plan_dir)
    runs = plan["runs"]
    t0 = time.perf_counter()
    for i, run in enumerate(runs, 1):
        d = Path(plan_dir) / "runs" / run["name"]
        if (d / "metrics.json").is_file():
            print(f"[mixture] {plan_dir}: run {i}/{len(runs)} {run['name']}: done before", flush=True)
            continue
        print(
            f"[mixture] {plan_dir}: run {i}/{len(runs)} {run['name']} ({run['train_iters']} steps"
            f"{', resuming' if (d / 'ckpt').is_dir() else ''}) | {time.perf_counter() - t0:.0f}s so far",
            flush=True,
        )
        train_once(d / "config.yaml", runner)


def objective(metrics: dict[str, Any], eval_set: str, domains: list[str]) -> tuple[float, dict[str, float]]:
    """The average validation perplexity over domains at the run's end (the paper's PPL_avg), and the
    per-domain losses."""
    losses = {}
    for d in domains:
        key = f"{eval_set}/{d}"
        if key not in metrics.get("eval", {}):
            raise MixtureError(f"the run's metrics have no {key}: every domain needs lines in {eval_set}")
        losses[d] = float(metrics["eval"][key][-1])
    return float(np.mean([math.exp(v) for v in losses.values()])), losses


def fit_plan(plan_dir: Path | list[Path], *, floor: float = 0.2) -> WeightSchedule:
    """DDO weights from a finished plan; the schedule's source records the fits, amounts and budget.

    Several plan directories (the same plan trained with other seeds: replicates) are fitted on each run's
    objective averaged over them, which lowers the noise of a proxy run's loss at small budgets.
    """
    dirs = [Path(p) for p in (plan_dir if isinstance(plan_dir, list) else [plan_dir])]
    plans = [read_plan(d) for d in dirs]
    plan = plans[0]
    for d, other in zip(dirs[1:], plans[1:], strict=True):
        if (other["runs"], other["eval_set"], other["global_batch_size"]) != (
            plan["runs"],
            plan["eval_set"],
            plan["global_batch_size"],
        ):
            raise MixtureError(f"{d}: not a replicate of {dirs[0]} (other runs, eval set or batch size)")
    domains, m, steps = plan["domains"], len(plan["domains"]), plan["steps"]
    results: dict[str, Any] = {}
    for run in plan["runs"]:
        objs, losses = [], []
        for d in dirs:
            path = d / "runs" / run["name"] / "metrics.json"
            if not path.is_file():
                raise MixtureError(
                    f"{path}: run {run['name']} has not finished; `mates-megatron mixture run` first"
                )
            obj, loss = objective(json.loads(path.read_text()), plan["eval_set"], domains)
            objs.append(obj)
            losses.append(loss)
        # The amount the run served, in units (the rounding of its steps moves it off the nominal x).
        x = run["weights"][run["domain"]] * run["train_iters"] * m / steps if run["domain"] else 1.0
        results[run["name"]] = {"domain": run["domain"], "x": x, "objective": float(np.mean(objs)),
                                "replicates": objs, "losses": losses}  # fmt: skip
    base = results["base"]["objective"]
    by_domain = {d: [(r["x"], r["objective"]) for r in results.values() if r["domain"] == d] for d in domains}
    w, fits = ddo_weights(base, by_domain, domains, floor=floor)
    samples = steps * plan["global_batch_size"]
    weights = dict(zip(domains, w.tolist(), strict=True))
    return constant(
        weights,
        {
            "method": "ddo", "plan": [str(d) for d in dirs], "steps": steps, "budget_samples": samples,
            "budget_tokens": samples * plan["seq_length"], "floor": floor,
            "amounts_samples": {d: wi * samples for d, wi in weights.items()},
            "fits": {d: asdict(f) for d, f in zip(domains, fits, strict=True)}, "runs": results,
        },
    )  # fmt: skip
