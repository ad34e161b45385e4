"""`mates-lab bench autoscale`: AutoScale's two effects at toy scale on the embedded domains.

DDO at two small budgets (``steps`` and ``2 * steps``, 11 proxy runs each over the 5 domains), AutoScale's
prediction for ``8 * steps`` (four times the larger), and DDO run directly at ``8 * steps`` as the check. Then
the ``8 * steps`` budget is trained on four mixtures: ``uniform``, ``reused`` (DDO at ``2 * steps``, reused
unchanged), ``autoscale`` and ``ddo`` (the direct DDO). The uniform run is the direct DDO plan's base run (the
same config and weights, trained once).

Evaluation: the embedded held-out documents (sources that never enter the pool) of each domain are split
in two by alternating documents, and cut into pieces of about a sequence each: ``val`` is DDO's objective
(the fits read it), ``test`` is what the four mixtures are judged on (no fit reads it). Figures:

- ``uniform``, ``reused``, ``autoscale``, ``ddo``: the mean over domains of the test loss at the end;
- ``autoscale_weight_err``, ``reused_weight_err``: the largest absolute weight difference from the direct
  DDO weights (the paper's measure), with the L1 distances beside them;
- ``wall_seconds``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "seq_length": 64, "vocab_size": 30522}


def split_heldout(heldout: Path, out: Path, *, piece_chars: int = 240) -> dict[str, Path]:
    """``val.jsonl`` and ``test.jsonl`` from the held-out documents: alternate documents of each domain, each
    cut into pieces of about ``piece_chars`` characters (one evaluation row each)."""
    rows = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    seen: dict[str, int] = {}
    parts: dict[str, list[str]] = {"val": [], "test": []}
    for r in rows:
        i = seen.get(r["domain"], 0)
        seen[r["domain"]] = i + 1
        text = r["text"]
        for lo in range(0, len(text) - piece_chars // 2, piece_chars):
            piece = text[lo : lo + piece_chars]
            parts["val" if i % 2 == 0 else "test"].append(json.dumps({"text": piece, "domain": r["domain"]}))
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in parts.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def base_config(
    data: Path, evals: dict[str, Path], seed: int, *, model: dict[str, int] | None = None, warmup: int = 10
) -> dict[str, Any]:
    return {
        "data_prefix": str(data / "train"),
        "eval_sets": {k: str(v) for k, v in evals.items()},
        "eval_micro_batch_size": 64,
        "model": model or MODEL,
        "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "cpu": not torch.cuda.is_available()},
        "micro_batch_size": 16, "global_batch_size": 16, "lr": 0.003, "min_lr": 0.0003,
        "lr_warmup_iters": warmup, "lr_decay_style": "cosine", "weight_decay": 0.1, "clip_grad": 1.0,
        "seed": seed, "log_interval": 1000,
        # The pool is 20x each run's samples: headroom for a domain weighted up to 3/7 of a run (licenses is
        # 4% of the corpus's tokens; GPTDataset repeats the corpus in epochs to fill the pool, as Megatron does).
        "selection": {"pool": "indexed", "select_every": 10, "selection_ratio": 0.05, "seed": seed},
    }  # fmt: skip


def bench_autoscale(data: Path, out: Path, *, steps: int = 40, seed: int = 0) -> dict[str, Any]:
    from mates_megatron.mixture.autoscale import autoscale_weights
    from mates_megatron.mixture.plan import (
        fit_plan,
        objective,
        run_plan,
        train_once,
        write_plan,
        write_run_config,
    )
    from mates_megatron.mixture.weights import read_weights, write_weights

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    evals = split_heldout(data / "heldout.jsonl", out / "eval")
    cfg = base_config(data, evals, seed)
    cfg_path = out / "base.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    budgets = {"small": steps, "large": 2 * steps, "target": 8 * steps}
    ddo = {}
    for name, s in budgets.items():
        plan_dir = out / f"ddo_{name}_{s}"
        if not (plan_dir / "plan.json").is_file():
            write_plan(cfg_path, plan_dir, steps=s, eval_set="val")
        run_plan(plan_dir)
        ddo[name] = write_weights(out / f"ddo_{name}_{s}.json", fit_plan(plan_dir))
        print(f"[bench autoscale] DDO at {s} steps: {read_weights(ddo[name]).at(0)}", flush=True)
    target = budgets["target"]
    auto = write_weights(
        out / f"autoscale_{target}.json", autoscale_weights(ddo["small"], ddo["large"], target)
    )
    mixtures = {"reused": ddo["large"], "autoscale": auto, "ddo": ddo["target"]}
    domains = read_weights(ddo["target"]).domains
    weights = {k: read_weights(p).at(0) for k, p in mixtures.items()}
    weights["uniform"] = {d: 1 / len(domains) for d in domains}
    runs = {"uniform": out / f"ddo_target_{target}" / "runs" / "base" / "metrics.json"}
    for name, path in mixtures.items():
        d = out / f"train_{name}_{target}"
        d.mkdir(exist_ok=True)
        train_once(write_run_config(cfg, d, path, target))
        runs[name] = d / "metrics.json"
    result: dict[str, Any] = {}
    for name, path in runs.items():
        metrics = json.loads(path.read_text())
        _, test = objective(metrics, "test", domains)
        _, val = objective(metrics, "val", domains)
        result[name] = float(np.mean(list(test.values())))
        result[f"{name}_test_by_domain"] = test
        result[f"{name}_val_mean"] = float(np.mean(list(val.values())))

    def err(name: str) -> tuple[float, float]:
        a = np.array([weights[name][d] for d in domains])
        b = np.array([weights["ddo"][d] for d in domains])
        return float(np.abs(a - b).max()), float(np.abs(a - b).sum())

    for name in ("autoscale", "reused", "uniform"):
        result[f"{name}_weight_err"], result[f"{name}_weight_l1"] = err(name)
    auto_src = read_weights(auto).source
    result.update({
        "weights": weights, "autoscale_t": auto_src["t"],
        "ddo_weights_by_budget": {s: read_weights(ddo[n]).at(0) for n, s in budgets.items()},
        "budgets_steps": budgets, "global_batch_size": cfg["global_batch_size"],
        "seq_length": MODEL["seq_length"], "seed": seed, "wall_seconds": time.perf_counter() - t0,
    })  # fmt: skip
    return result
