"""`mates-lab bench projektor`: Projektor's projection and mixture at toy scale on the embedded domains.

The sources are the 5 embedded domains, or those ``sources`` names (a subset of the data is prepared in
``out/data``: Projektor's paper uses three, with at least 3x as many pilots as stage 1's 3m + 1
coefficients: ``--sources python_docs python_code package_docs --mixtures 30``). Each reveals ``revealed``
documents (what the OT reads), and the pilot runs (``steps`` and ``2 * steps``, every pilot mixture:
uniform, each source alone, seeded Dirichlet mixtures) are trained with the project's loop on the mixture selector. Stage 1 regresses each pilot size's
mean validation loss on the mixture's OT features, stage 2 projects to ``8 * steps`` (four times the larger
pilot). Evaluation at ``8 * steps``: ``evaluate`` of the pilot mixtures (uniform and the first Dirichlet ones)
are trained there and their mean validation loss is the truth the projections are judged on:

- ``projektor_mae``: stage 2 on the stage-1 fits (the method);
- ``projektor_loo_mae``: the same with each judged mixture left out of stage 1 (an unseen mixture);
- ``stage2_measured_mae``: stage 2 on the judged mixture's own pilot losses (no regression);
- ``powerlaw_mae``: a power law ``L = a N^-b`` through the judged mixture's two pilot losses (the fitted
  scaling-law baseline, from the same pilots);
- ``*_spearman``: each projection's rank correlation with the truth over the judged mixtures (what choosing
  a mixture needs).

Then Projektor's chosen mixture and the best single source (the one whose pilot at ``2 * steps`` reached the
lowest validation loss) are trained at ``8 * steps``; ``projektor``, ``uniform`` and ``best_single`` are the
mean test losses over domains (the test split no fit reads).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.stats import spearmanr


def bench_projektor(
    data: Path, out: Path, *, steps: int = 40, mixtures: int = 16, evaluate: int = 8, revealed: int = 100,
    seed: int = 0, sources: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    from mates_lab.bench.autoscale import base_config, split_heldout
    from mates_lab.data.subset import subset_domains
    from mates_megatron.mixture.plan import train_once, write_run_config
    from mates_megatron.mixture.projektor import (
        PLAN,
        fit_projektor,
        fit_stage1,
        mean_loss,
        plan_projektor,
        projektor_weights,
        run_projektor,
        stage2,
    )
    from mates_megatron.mixture.weights import write_weights

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if sources:
        subset_domains(data, out / "data", sources)
        data = out / "data"
    evals = split_heldout(data / "heldout.jsonl", out / "eval")
    cfg = base_config(data, evals, seed)
    # 50x each run's samples: a single source (licenses is 4% of the tokens) still fills a run.
    cfg["selection"]["selection_ratio"] = 0.02
    cfg_path = out / "base.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    work = out / "projektor"
    n0, n1, target = steps, 2 * steps, 8 * steps
    if not (work / PLAN).is_file():
        plan_projektor(cfg_path, work, pilot_steps=(n0, n1), mixtures=mixtures, eval_set="val",
                       sources=data / "corpus.jsonl", revealed=revealed, seed=seed)  # fmt: skip
    run_projektor(work)
    fit, _, _ = fit_projektor(work)
    gbs = cfg["global_batch_size"]
    n = target * gbs
    m = len(fit.domains)
    chosen = projektor_weights(work, target)
    chosen_path = write_weights(out / f"projektor_{target}.json", chosen)
    print(f"[bench projektor] chosen for {target} steps: {chosen.at(0)}", flush=True)

    judged = [0, *range(m + 1, m + evaluate)]
    if max(judged) >= len(fit.mixtures):
        raise ValueError(f"--evaluate {evaluate} needs at least {m + evaluate} pilot mixtures")
    singles = list(range(1, m + 1))
    best_single = singles[int(np.argmin(fit.losses[singles, 1]))]

    def train(name: str, weights: Path) -> dict[str, Any]:
        d = out / f"target_{name}_{target}"
        print(
            f"[bench projektor] training {name} at {target} steps | {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        return train_once(write_run_config(cfg, d, weights, target))

    metrics = {j: train(f"mix{j:02d}", work / "weights" / f"mix{j:02d}.json") for j in judged}
    if best_single not in metrics:
        metrics[best_single] = train(f"mix{best_single:02d}", work / "weights" / f"mix{best_single:02d}.json")
    chosen_metrics = train("projektor", chosen_path)

    preds: dict[str, list[float]] = {
        "projektor": [],
        "projektor_loo": [],
        "stage2_measured": [],
        "powerlaw": [],
    }
    actual = []
    for j in judged:
        p, ot = fit.mixtures[j], fit.ots[j]
        actual.append(mean_loss(metrics[j], "val", fit.domains))
        preds["projektor"].append(fit.predict(ot, p, n))
        keep = np.arange(len(fit.mixtures)) != j
        loo = [
            fit_stage1(fit.ots[keep], fit.mixtures[keep], fit.losses[keep, k]).predict(ot, p) for k in (0, 1)
        ]
        preds["projektor_loo"].append(float(stage2(*loo, *fit.sizes, n)))
        l0, l1 = fit.losses[j]
        preds["stage2_measured"].append(float(stage2(l0, l1, *fit.sizes, n)))
        b = np.log(l0 / l1) / np.log(fit.sizes[1] / fit.sizes[0])
        preds["powerlaw"].append(float(l1 * (n / fit.sizes[1]) ** (-b)))
    actual_a = np.array(actual)
    result: dict[str, Any] = {
        f"{k}_mae": float(np.abs(np.array(v) - actual_a).mean()) for k, v in preds.items()
    }
    # Choosing a mixture needs the order of the projections, not their level: Spearman against the truth.
    result.update({f"{k}_spearman": float(spearmanr(v, actual_a)[0]) for k, v in preds.items()})
    result["predictions"] = {
        f"mix{j:02d}": {"weights": dict(zip(fit.domains, fit.mixtures[j].tolist(), strict=True)),
                        "actual_val": actual[i], **{k: v[i] for k, v in preds.items()},
                        "pilot_val": fit.losses[j].tolist()}
        for i, j in enumerate(judged)
    }  # fmt: skip
    test = {
        "projektor": mean_loss(chosen_metrics, "test", fit.domains),
        "uniform": mean_loss(metrics[0], "test", fit.domains),
        "best_single": mean_loss(metrics[best_single], "test", fit.domains),
    }
    tokens = json.loads(Path(f"{cfg['data_prefix']}.meta.json").read_text())["tokens_per_domain"]
    seq = cfg["model"]["seq_length"]
    # The most of each source any pilot read (tokens served / the source's tokens; above 1: repeated).
    pilot_read = {
        d: float(fit.mixtures[:, i].max() * fit.sizes[1] * seq / tokens[d]) for i, d in enumerate(fit.domains)
    }
    result.update({
        **test,
        "projektor_minus_uniform": test["projektor"] - test["uniform"],
        "projektor_val": mean_loss(chosen_metrics, "val", fit.domains),
        "projected_val_for_chosen": chosen.source["projected_loss"],
        "projektor_weights": chosen.at(0),
        "best_single_source": fit.domains[best_single - 1],
        "stage1_rms_residual": [f.rms_residual for f in fit.fits],
        "pilot_sizes_samples": list(fit.sizes), "target_samples": n, "pilot_mixtures": len(fit.mixtures),
        "stage1_coefficients": len(fit.fits[0].coef), "sources": list(fit.domains),
        "judged_mixtures": len(judged), "revealed_documents_per_source": revealed,
        "pilot_max_share_read": pilot_read, "seed": seed, "wall_seconds": time.perf_counter() - t0,
    })  # fmt: skip
    return result
