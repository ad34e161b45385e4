"""`mates-lab bench autoscale-seeds`: AutoScale's weight check and its headline over seeds, with the
fresh-data cap.

Per seed (model init and data order): DDO (``mixture.plan``, 11 proxy runs over the 5 embedded domains) at
``steps``, ``2 * steps`` and ``4 * steps``. Weights:

- interpolation: AutoScale from ``steps`` and ``4 * steps`` predicts ``2 * steps`` (0 < t < 1), against DDO
  run at ``2 * steps`` (the paper's weight-level check is this interpolation);
- extrapolation: from ``steps`` and ``2 * steps`` to ``4 * steps``, against DDO run at ``4 * steps``;
- both beside DDO's own spread: the distances between the DDO weights of two seeds at the same budget. A
  prediction that lies as far from DDO as DDO lies from itself is within DDO's noise.

Then the target ``8 * steps`` is trained on ``uniform``, ``reused`` (DDO at ``4 * steps``, the largest
DDO budget, unchanged), ``autoscale`` (from ``steps`` and ``4 * steps``, as the paper predicts from its two
budgets 4x apart) and ``autoscale_capped`` (the same with each domain capped at its unrepeated share of the
target's tokens, ``mixture.weights.cap_unrepeated``, the rest renormalised). A capped mixture equal to its
uncapped one is not trained again. Figures: the mean over domains of the held-out ``test`` loss (the
alternate held-out documents no fit reads, as in ``bench autoscale``), per seed, mean with 95% t-interval,
and paired differences over seeds.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mates_lab.bench.intervals import mean_ci

MIXTURES = ("uniform", "reused", "autoscale", "autoscale_capped")
PAIRS = (("autoscale", "uniform"), ("autoscale", "reused"), ("autoscale_capped", "autoscale"),
         ("autoscale_capped", "uniform"), ("reused", "uniform"))  # fmt: skip


def weight_distance(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """L1 and largest absolute difference (the paper's measure) between two weightings of the same domains."""
    d = np.array([a[k] - b[k] for k in a])
    return {"l1": float(np.abs(d).sum()), "linf": float(np.abs(d).max())}


def seed_spread(by_seed: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Distances between every two seeds' weights at one budget: DDO's own noise."""
    pairs = {
        f"{s}-{r}": weight_distance(by_seed[s], by_seed[r]) for s, r in itertools.combinations(by_seed, 2)
    }
    out: dict[str, Any] = {"pairs": pairs}
    for k in ("l1", "linf"):
        v = [p[k] for p in pairs.values()]
        out[f"mean_{k}"] = float(np.mean(v)) if v else None
    return out


def summarise(seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The figures over the seeds done so far."""
    done = sorted(seeds)
    out: dict[str, Any] = {"seeds": done, "loss": {}, "paired": {}, "weights": {}}
    for m in MIXTURES:
        out["loss"][m] = mean_ci([seeds[s]["loss"][m] for s in done])
    for a, b in PAIRS:
        out["paired"][f"{a}-{b}"] = mean_ci([seeds[s]["loss"][a] - seeds[s]["loss"][b] for s in done])
    for check in ("interpolation", "extrapolation"):
        out["weights"][check] = {k: mean_ci([seeds[s][check][k] for s in done]) for k in ("l1", "linf")}
    budgets = seeds[done[0]]["budgets_steps"]
    out["weights"]["ddo_spread"] = {
        str(b): seed_spread({s: seeds[s]["ddo"][str(b)] for s in done}) for b in budgets.values()
    }
    return out


def merge_seed_results(paths: list[Path]) -> dict[str, Any]:
    """One result from several ``bench autoscale-seeds`` JSONs of the same setting, run apart (one process and
    ``--work`` per seed): their seeds together, summarised again. Nothing is trained."""
    results = [(Path(p), json.loads(Path(p).read_text())) for p in paths]
    keys = ("budgets_steps", "target_steps", "model", "warmup", "available_tokens")
    first_path, first = results[0]
    per_seed: dict[int, dict[str, Any]] = {}
    for path, r in results:
        other = [k for k in keys if r.get(k) != first.get(k)]
        if other:
            raise ValueError(f"{path} and {first_path} differ in {', '.join(other)}: not the same setting")
        for s, v in r["per_seed"].items():
            if int(s) in per_seed:
                raise ValueError(f"seed {s} is in more than one of {', '.join(map(str, paths))}")
            per_seed[int(s)] = v
    per_seed = dict(sorted(per_seed.items()))
    return {"per_seed": per_seed, "summary": summarise(per_seed), **{k: first[k] for k in keys},
            "target_tokens": first["target_tokens"], "merged_from": [str(p) for p in paths]}  # fmt: skip


def bench_autoscale_seeds(
    data: Path, work: Path, *, steps: int = 40, seeds: tuple[int, ...] = (0, 1, 2),
    model: dict[str, int] | None = None, warmup: int = 10, runner=None,
) -> dict[str, Any]:  # fmt: skip
    """``model``: default `bench autoscale`'s (2 layers, 64 wide); a 1-layer 32-wide model was tried first
    and after 20 steps its validation loss was still 9.1-9.2 (from ln 30522 = 10.3), where the proxies
    differ by their step counts more than by their mixtures.
    ``runner``: as `mixture.plan.run_plan`'s (default: the project's training loop)."""
    from mates_lab.bench.autoscale import MODEL, base_config, split_heldout
    from mates_megatron.mixture.autoscale import autoscale_weights
    from mates_megatron.mixture.plan import (
        fit_plan,
        objective,
        run_plan,
        train_once,
        write_plan,
        write_run_config,
    )
    from mates_megatron.mixture.weights import constant, read_domain_tokens, read_weights, write_weights

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    evals = split_heldout(data / "heldout.jsonl", work / "eval")
    available = read_domain_tokens(data / "train")
    budgets = {"small": steps, "mid": 2 * steps, "large": 4 * steps}
    target = 8 * steps
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        out = work / f"seed{seed}"
        out.mkdir(exist_ok=True)
        cfg = base_config(data, evals, seed, model=model or MODEL, warmup=warmup)
        cfg_path = out / "base.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        ddo: dict[str, Path] = {}
        for name, s in budgets.items():
            plan_dir = out / f"ddo_{s}"
            if not (plan_dir / "plan.json").is_file():
                write_plan(cfg_path, plan_dir, steps=s, eval_set="val")
            run_plan(plan_dir, runner)
            ddo[name] = write_weights(out / f"ddo_{s}.json", fit_plan(plan_dir))
            print(
                f"[bench autoscale-seeds] seed {seed} DDO at {s}: {read_weights(ddo[name]).at(0)}", flush=True
            )
        w = {n: read_weights(p).at(0) for n, p in ddo.items()}
        interp = autoscale_weights(ddo["small"], ddo["large"], budgets["mid"])
        extrap = autoscale_weights(ddo["small"], ddo["mid"], budgets["large"])
        files = {
            "reused": ddo["large"],
            "autoscale": write_weights(out / f"autoscale_{target}.json",
                                       autoscale_weights(ddo["small"], ddo["large"], target)),
            "autoscale_capped": write_weights(
                out / f"autoscale_capped_{target}.json",
                autoscale_weights(ddo["small"], ddo["large"], target, available_tokens=available),
            ),
        }  # fmt: skip
        mix = {n: read_weights(p).at(0) for n, p in files.items()}
        mix["uniform"] = {d: 1 / len(w["small"]) for d in w["small"]}
        files["uniform"] = write_weights(
            out / "uniform.json", constant(mix["uniform"], {"method": "uniform"})
        )
        domains = list(mix["uniform"])
        loss, by_domain, ran = {}, {}, {}
        for name in MIXTURES:
            # A capped mixture the cap leaves unchanged is the same run: read it, do not train it twice.
            twin = next((t for t in ran if weight_distance(mix[t], mix[name])["linf"] < 1e-12), None)
            ran[name] = ran[twin] if twin else name
            run_dir = out / f"train_{ran[name]}_{target}"
            if ran[name] == name:
                train_once(write_run_config(cfg, run_dir, files[name], target), runner)
            _, test = objective(json.loads((run_dir / "metrics.json").read_text()), "test", domains)
            loss[name], by_domain[name] = float(np.mean(list(test.values()))), test
        per_seed[seed] = {
            "loss": loss, "test_by_domain": by_domain, "weights": mix, "same_run_as": ran,
            "ddo": {str(s): w[n] for n, s in budgets.items()},
            "interpolation": {**weight_distance(interp.at(0), w["mid"]), "t": interp.source["t"],
                              "predicted": interp.at(0)},
            "extrapolation": {**weight_distance(extrap.at(0), w["large"]), "t": extrap.source["t"],
                              "predicted": extrap.at(0)},
            "reused_small_at_mid": weight_distance(w["small"], w["mid"]),
            "reused_mid_at_large": weight_distance(w["mid"], w["large"]),
            "autoscale_t": read_weights(files["autoscale"]).source["t"],
            "budgets_steps": budgets,
        }  # fmt: skip
        summary = {"per_seed": per_seed, "summary": summarise(per_seed)}
        (work / "partial.json").write_text(json.dumps(summary, indent=1, default=str))
        print(
            f"[bench autoscale-seeds] seed {seed} done: {loss} | {time.perf_counter() - t0:.0f}s", flush=True
        )
    return {
        "per_seed": per_seed, "summary": summarise(per_seed), "budgets_steps": budgets, "target_steps": target,
        "model": model or MODEL, "warmup": warmup, "available_tokens": available,
        "target_tokens": target * cfg["global_batch_size"] * cfg["model"]["seq_length"],
        "wall_seconds": time.perf_counter() - t0,
    }  # fmt: skip
