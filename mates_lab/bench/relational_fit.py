"""`mates-lab bench relational-fit --config CFG --seeds ...`: which fit of Group-MATES's relational model
recovers a sample's own influence from rollouts, at each scored round of a run config (the demo's by default).

Per seed the run is trained as `bench probe` trains it (the pool's own order) and stopped at each scored round;
there the same probe rows are scored by 'linearized_rollout' (consecutive rollouts of the config's
``rollout_length``: what the relational model is fitted on) and by 'linearized' (each sample alone, one step
from the round's state: its own first-order influence, the truth here). Each fit variant (``VARIANTS``, the
config's relational options overridden) is fitted as a run fits it: on the rollouts of the last
``influence_rounds`` rounds, each round z-scored within itself, and read two ways:

- ``guard``: the fit's out-of-fold Spearman against its own targets (what the run's poor-fit guard reads, 0.1);
- ``own``: the Spearman, on the round's probes, of the head's own scores fitted without their rollout (folds
  over whole rollouts) against the samples' 'linearized' scores: what the selector reads.

Beside them, ``ridge_on_individual``: MATES's own case, a ridge head fitted on the 'linearized' scores
themselves (out of fold, same folds). With ``--rollouts`` smaller than the probes hold, the first rollouts
of each round are read: how the fits grow with the rollouts a round.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

VARIANTS: dict[str, dict] = {
    "authors": {},
    "steps_1": {"steps": 1},
    "head_l2": {"head_l2": 0.1},
    "early_stop": {"early_stop": True},
    "centred": {"center_positions": True},
    "deconvolved_centred": {"deconvolve": 0.9, "center_positions": True},
    "deconvolved_centred_l2": {"deconvolve": 0.9, "center_positions": True, "head_l2": 0.1},
}
"""Fit variants: RelationalConfig fields over the config's (``authors``: the config's own)."""


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() or 1.0)


def rollout_folds(n: int, length: int, folds: int, *, seed: int):
    """(train, held) positions of each fold over whole rollouts of ``length`` (seeded, the same for every
    head read out of fold here)."""
    from mates_megatron.influence.relational import _rollouts

    idx = _rollouts(n, length)
    fold_of = np.random.default_rng([seed, 11]).permutation(len(idx)) % min(folds, len(idx))
    for f in range(min(folds, len(idx))):
        yield (np.concatenate([i for i, g in zip(idx, fold_of, strict=True) if g != f]),
               np.concatenate([i for i, g in zip(idx, fold_of, strict=True) if g == f]))  # fmt: skip


def own_out_of_fold(feats: np.ndarray, scores: np.ndarray, cfg, *, seed: int) -> np.ndarray:
    """Each probe's own score (the head) from a relational fit on the other folds' whole rollouts."""
    from mates_megatron.influence.relational import fit_head

    out = np.zeros(len(scores))
    for train, held in rollout_folds(len(scores), cfg.rollout_length, cfg.folds, seed=seed):
        fit = fit_head(feats[train], scores[train], cfg, seed=seed)
        out[held] = feats[held] @ fit.w + fit.b
    return out


def ridge_out_of_fold(
    feats: np.ndarray, scores: np.ndarray, length: int, folds: int, *, seed: int
) -> np.ndarray:
    """A ridge head (strength 1, the relational fit's start) on the scores themselves, out of fold by the same
    whole rollouts."""
    from mates_megatron.influence.ridge import ridge_solve

    out = np.zeros(len(scores))
    for train, held in rollout_folds(len(scores), length, folds, seed=seed):
        w, b = ridge_solve(feats[train], _zscore(scores[train]), 1.0)
        out[held] = feats[held] @ w + b
    return out


def evaluate_rounds(
    feats: list[np.ndarray], rollout: list[np.ndarray], individual: list[np.ndarray], base, *,
    influence_rounds: int, rollouts: int | None, seed: int,
) -> list[dict]:  # fmt: skip
    """Per round, each variant's ``guard`` and ``own`` Spearman, and ``ridge_on_individual``'s (see the
    module): ``feats``/``rollout``/``individual`` per round (features, rollout scores, 'linearized' scores of
    the same probes), ``base`` the config's RelationalConfig, ``rollouts`` the first rollouts read a round."""
    from mates_megatron.influence.relational import fit_relational
    from mates_megatron.stats import spearman

    n = len(rollout[0]) if rollouts is None else min(len(rollout[0]), rollouts * base.rollout_length)
    out = []
    for r in range(len(feats)):
        past = range(max(0, r - influence_rounds + 1), r + 1)
        x = np.concatenate([feats[p][:n] for p in past])
        y = np.concatenate([_zscore(np.asarray(rollout[p][:n])) for p in past])
        mine = slice(len(x) - n, len(x))  # this round's probes, last
        truth = np.asarray(individual[r][:n])
        record: dict = {"round": r, "pairs": len(x)}
        for name, over in VARIANTS.items():
            cfg = dataclasses.replace(base, **over)
            _, result = fit_relational(x, y, cfg, seed=seed)
            own = own_out_of_fold(x, y, cfg, seed=seed)
            record[name] = {
                "guard": round(float(result.spearman), 4),
                "own": round(spearman(own[mine], truth), 4),
            }
        ind = np.concatenate([_zscore(np.asarray(individual[p][:n])) for p in past])
        ridge = ridge_out_of_fold(x, ind, base.rollout_length, base.folds, seed=seed)
        record["ridge_on_individual"] = {"own": round(spearman(ridge[mine], truth), 4)}
        record["rollout_vs_individual"] = round(spearman(np.asarray(rollout[r][:n]), truth), 4)
        out.append(record)
    return out


def bench_relational_fit(
    config: str | Path, seeds: list[int], probes: int, rollouts: list[int] | None = None,
    work: str | Path = "runs/bench_relational_fit",
) -> dict:  # fmt: skip
    """Figures per seed, round and rollout count; per variant and rollout count the mean ``guard`` and ``own``
    Spearman over every seed and round, and how many rounds pass the guard (0.1)."""
    import hashlib
    import json

    import torch
    import yaml

    from mates_lab.bench.probe_rounds import bench_probe_rounds
    from mates_megatron.influence.relational import RelationalInfluenceModel
    from mates_megatron.pretrain import train_config_from_dict

    raw = yaml.safe_load(Path(config).read_text())
    sel = train_config_from_dict(raw, where=str(config)).selection
    mates = sel.scorer_config
    base, model = mates.influence.relational, RelationalInfluenceModel(mates.influence)
    runs = []
    for seed in seeds:  # each seed's probed rounds kept in ``work``: the fits are read again without training
        tag = hashlib.sha256(Path(config).read_bytes()).hexdigest()[:12]  # another config: probed again
        cached = Path(work) / f"probes_{tag}_seed{seed}_{probes}.json"
        if not cached.is_file():
            run = bench_probe_rounds(config, [seed], probes, oracle_probes=probes,
                                     estimators=("linearized_rollout", "linearized"), keep=True)["runs"][0]  # fmt: skip
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(run))
        runs.append(json.loads(cached.read_text()))
    # The fits are thousands of small Adam steps: one thread (several stall on shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    counts = sorted(set(rollouts or [])) + [None]
    out: dict = {
        "config": str(config),
        "seeds": list(seeds),
        "probes": probes,
        "variants": VARIANTS,
        "runs": [],
    }
    for run in runs:
        rounds = run["rounds"]
        feats = [model.embed(r["texts"]) for r in rounds]
        per = {}
        for c in counts:
            per[str(c or "all")] = evaluate_rounds(
                feats, [np.asarray(r["linearized_rollout_scores"]) for r in rounds],
                [np.asarray(r["linearized_scores"]) for r in rounds], base,
                influence_rounds=mates.influence_rounds, rollouts=c, seed=run["seed"],
            )  # fmt: skip
        out["runs"].append({"seed": run["seed"], "steps": [r["step"] for r in rounds], "by_rollouts": per})
    torch.set_num_threads(threads)
    for c in counts:
        key = str(c or "all")
        records = [rec for run in out["runs"] for rec in run["by_rollouts"][key]]
        for name in [*VARIANTS, "ridge_on_individual"]:
            own = [rec[name]["own"] for rec in records]
            summary = {"own_mean": round(float(np.mean(own)), 4)}
            if name in VARIANTS:
                guard = [rec[name]["guard"] for rec in records]
                summary |= {"guard_mean": round(float(np.mean(guard)), 4),
                            "rounds_passing_guard": f"{sum(g >= 0.1 for g in guard)} of {len(guard)}"}  # fmt: skip
            out[f"{key}_rollouts_{name}"] = summary
        print(f"bench relational-fit, {key} rollouts a round: " + ", ".join(
            f"{n} {out[f'{key}_rollouts_{n}']}" for n in [*VARIANTS, "ridge_on_individual"]), flush=True)  # fmt: skip
    return out


def add_relational_fit_parser(bsub) -> None:
    """The ``bench relational-fit`` sub-command (registered from ``mates_lab.bench``)."""
    from mates_lab.bench.output import write_result

    p = bsub.add_parser(
        "relational-fit",
        help="Group-MATES's relational fit variants against each sample's own (linearized) influence, per round",
    )
    p.add_argument("--config", type=Path, required=True, help="a run config with a 'group_mates' scorer (the "
                   "demo's Group-MATES arm: `mates-lab demo --arms group_mates --out D` writes D/group_mates/config.yaml)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[11])
    p.add_argument(
        "--probes", type=int, default=260, help="probes a round (whole rollouts of rollout_length)"
    )
    p.add_argument(
        "--rollouts", type=int, nargs="*", default=[13], help="also read only the first N rollouts"
    )
    p.add_argument("--work", type=Path, default=Path("runs/bench_relational_fit"),
                   help="each seed's probed rounds are kept here, and read again by a later run")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=lambda a: (write_result(
        bench_relational_fit(a.config, a.seeds, a.probes, a.rollouts, a.work), a.out), 0)[1])  # fmt: skip
