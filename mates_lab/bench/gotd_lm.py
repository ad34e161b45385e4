"""`mates-lab bench gotd-lm`: GOT-D's pre-fine-tuning claim on the language model (issue 35, item 2).

GOT-D (Kang et al., ICLR 2024) selects the candidates that move the *pretraining* distribution toward the
target; a look-alike selection (nearest to the target) picks what the model has already seen plenty of.
``bench gotd-digits`` shows it on load_digits; this is the language-model version. The setup, fixed before any
figure was seen:

- The embedded pool's documents are split per seed. ``target_per_mode`` documents of the rare domain
  (package_docs) are the target's rare mode; as many rows of the probe reference (python_docs, 14% of the
  pool) are its well-covered mode: a balanced two-mode target. The rest is split in halves into a pretraining
  set and a candidate pool (disjoint documents); each keeps only ``keep_rare`` of its rare-domain documents
  (the pool shares the pretraining skew, as the paper assumes).
- A model (the config's, the demo's by default) is pretrained on the pretraining set for ``base_iters`` steps,
  in Megatron's order (no selection).
- Budget: ``budget_fraction`` of the candidate pool's documents, for every arm. ``gotd``: the lowest GOT-D
  values of the pool against the target (the ``gotd`` scorer's ``gotd_values``, its epsilon and momentum);
  ``lookalike``: the highest mean cosine to the 10 nearest target rows (the ``lookalike`` scorer's own
  computation); ``random``: a seeded draw. Control ``pretrain``: the same continued steps on the pretraining
  set itself (more of the same data, no budget). ``lookalike_rare`` (added after the first 4 seeds were
  measured): look-alike's documents with GOT-D's rare-domain documents swapped in for as many of its others
  (a seeded draw), the same budget: what GOT-D's rare documents alone add to look-alike.
- Each arm continues from the base weights for ``continue_iters`` steps at the config's ``min_lr``, constant;
  every continued step is drawn from the arm's documents: they alone are the continued run's data (packed,
  in Megatron's order).
- Figures: the held-out loss (smoothed final) on python_docs and package_docs, documents no split draws from,
  and their mean (the target weights its two modes equally); each selection's domain shares.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ARMS = ("gotd", "lookalike", "random", "pretrain", "lookalike_rare")
SELECTED = ("gotd", "lookalike", "random", "lookalike_rare")


@dataclass(frozen=True)
class GotdLmConfig:
    rare_domain: str = "package_docs"
    well_domain: str = "python_docs"
    """The reference's domain: the target's well-covered mode is drawn from the probe reference."""
    target_per_mode: int = 64
    keep_rare: float = 0.1
    budget_fraction: float = 0.05
    base_iters: int = 160
    continue_iters: int = 40
    max_length: int = 128
    """Encoder tokens per document for the selectors' embeddings."""


@dataclass(frozen=True)
class Split:
    target: np.ndarray
    """Pool documents forming the target's rare mode (in neither set below)."""
    pretrain: np.ndarray
    pool: np.ndarray


def split_documents(domains: np.ndarray, rare: int, cfg: GotdLmConfig, seed: int) -> Split:
    """The seed's split of the pool's document ids (see the module docstring); sorted, disjoint."""
    rng = np.random.default_rng([seed, 0x60D1])
    rare_rows = rng.permutation(np.flatnonzero(domains == rare))
    if len(rare_rows) < cfg.target_per_mode + 2:
        raise ValueError(
            f"the rare domain has {len(rare_rows)} documents, the target alone needs {cfg.target_per_mode}: "
            "lower target_per_mode"
        )
    target = np.sort(rare_rows[: cfg.target_per_mode])
    halves: tuple[list, list] = ([], [])
    for d in np.unique(domains):  # per domain: both halves hold the same mix
        rows = (
            rare_rows[cfg.target_per_mode :] if d == rare else rng.permutation(np.flatnonzero(domains == d))
        )
        half = (len(rows) + 1) // 2
        if d == rare:  # only keep_rare of each half (in the permutation's order: a seeded draw)
            keep = max(1, round(cfg.keep_rare * half))
            rows = np.concatenate([rows[:keep], rows[half : half + keep]])
            half = keep
        halves[0].append(rows[:half])
        halves[1].append(rows[half:])
    return Split(
        target=target, pretrain=np.sort(np.concatenate(halves[0])), pool=np.sort(np.concatenate(halves[1]))
    )


def select(x: np.ndarray, reference: np.ndarray, split: Split, cfg: GotdLmConfig, seed: int) -> dict:
    """Each arm's documents (pool ids, sorted), the budget and the reference rows of the target."""
    from mates_lab.bench.gotd_digits import budget_arms

    rng = np.random.default_rng([seed, 0x7A2E])
    well = np.sort(rng.choice(len(reference), size=cfg.target_per_mode, replace=False))
    target = np.concatenate([reference[well], x[split.target]])
    budget = max(1, round(cfg.budget_fraction * len(split.pool)))
    chosen = budget_arms(x[split.pool], target, split.pool, budget, seed=seed, rng=rng)
    return {"chosen": chosen, "budget": budget, "reference_rows": well.tolist()}


def swap_in_rare(
    lookalike: np.ndarray, gotd: np.ndarray, domains: np.ndarray, rare: int, seed: int
) -> np.ndarray:
    """``lookalike`` (sorted ids) with ``gotd``'s rare-domain ids it lacks swapped in for as many of its other
    ids (a seeded draw): the same budget, no id twice."""
    add = np.setdiff1d(gotd[domains[gotd] == rare], lookalike)
    others = lookalike[domains[lookalike] != rare]
    add = add[: len(others)]
    drop = np.random.default_rng([seed, 0x5A4B]).choice(others, size=len(add), replace=False)
    return np.sort(np.concatenate([np.setdiff1d(lookalike, drop), add]))


def _prepare(pool, ids: np.ndarray, prefix: Path) -> Path:
    """Write ``ids``'s documents as a prepared dataset at ``prefix`` (``mates-megatron prepare``'s own path)."""
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus

    if Path(f"{prefix}.idx").is_file():
        return prefix
    prefix.parent.mkdir(parents=True, exist_ok=True)
    jsonl = prefix.parent / f"{prefix.name}.jsonl"
    names = pool.domains
    with jsonl.open("w") as f:
        for gid, d in zip(ids.tolist(), pool.domain_ids(ids).tolist(), strict=True):
            f.write(json.dumps({"text": pool.text(gid), "domain": names[d]}) + "\n")
    prepare_corpus(PrepareConfig(input=jsonl, output_prefix=prefix))
    return prefix


def run_seed(data: Path, config: Path, work: Path, seed: int, cfg: GotdLmConfig) -> dict[str, Any]:
    from mates_lab.bench.ot import _embed_pool
    from mates_lab.demo import smooth
    from mates_megatron.launch import run_config
    from mates_megatron.pretrain import launch_checked

    x, reference, names, pool = _embed_pool(data, work, cfg.max_length)
    domains = pool.domain_ids(np.arange(len(pool))).astype(np.int64)
    rare = names.index(cfg.rare_domain)
    split = split_documents(domains, rare, cfg, seed)
    picked = select(x, reference, split, cfg, seed)
    chosen = picked["chosen"]
    swapped = swap_in_rare(chosen["lookalike"], chosen["gotd"], domains, rare, seed)
    sets = {**chosen, "pretrain": split.pretrain, "lookalike_rare": swapped}
    seed_dir = work / f"seed{seed}"
    base = yaml.safe_load(config.read_text())
    base.pop("selection", None)  # Megatron's order over each run's own data
    base_dir = seed_dir / "base"
    run_config({**base, "seed": seed, "train_iters": cfg.base_iters, "eval_interval": 20,
                "data_prefix": str(_prepare(pool, split.pretrain, seed_dir / "data" / "pretrain")),
                "save": str(base_dir / "ckpt")}, base_dir, runner=launch_checked)  # fmt: skip
    lr = base.get("min_lr", 2e-4)
    heldout: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        prefix = _prepare(pool, sets[arm], seed_dir / "data" / arm)
        run = run_config({**base, "seed": seed, "train_iters": cfg.continue_iters, "lr_warmup_iters": 0,
                          "lr_decay_style": "constant", "lr": lr, "min_lr": lr, "eval_interval": 5,
                          "data_prefix": str(prefix), "pretrained_checkpoint": str(base_dir / "ckpt")},
                         seed_dir / arm, runner=launch_checked)  # fmt: skip
        ev = run["eval"]
        loss = {
            m: smooth(ev[f"heldout/{d}"])[-1]
            for m, d in (("well", cfg.well_domain), ("rare", cfg.rare_domain))
        }
        loss["start_well"], loss["start_rare"] = (
            ev[f"heldout/{cfg.well_domain}"][0],
            ev[f"heldout/{cfg.rare_domain}"][0],
        )
        heldout[arm] = {**loss, "target": (loss["well"] + loss["rare"]) / 2}
    shares = {
        arm: {names[d]: float(np.mean(domains[sets[arm]] == d)) for d in range(len(names))} for arm in ARMS
    }
    return {
        "seed": seed,
        "sizes": {"pretrain": len(split.pretrain), "pool": len(split.pool), "budget": picked["budget"],
                  "target": 2 * cfg.target_per_mode,
                  "rare_in_pool": int(np.sum(domains[split.pool] == rare))},
        "heldout": heldout,
        "share_by_domain": shares,
        "selected": {arm: sets[arm].tolist() for arm in SELECTED},
    }  # fmt: skip


def bench_gotd_lm(data: Path, config: Path, work: Path, seeds: list[int], cfg: GotdLmConfig | None = None):
    from mates_lab.bench.intervals import mean_ci

    cfg = cfg or GotdLmConfig()
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"gotd-lm needs distinct seeds, got {seeds}")
    runs = [run_seed(data, config, work, s, cfg) for s in seeds]
    figure = lambda arm, key: mean_ci([r["heldout"][arm][key] for r in runs])  # noqa: E731
    paired = lambda a, b, key: mean_ci([r["heldout"][a][key] - r["heldout"][b][key] for r in runs])  # noqa: E731
    return {
        "config": asdict(cfg),
        "seeds": list(seeds),
        **{f"{arm}_heldout_target": figure(arm, "target")["mean"] for arm in ARMS},
        "heldout": {arm: {k: figure(arm, k) for k in ("target", "well", "rare")} for arm in ARMS},
        "paired": {
            **{f"gotd-{b}": {k: paired("gotd", b, k) for k in ("target", "well", "rare")} for b in ARMS[1:]},
            "lookalike_rare-lookalike": {
                k: paired("lookalike_rare", "lookalike", k) for k in ("target", "well", "rare")
            },
        },
        "rare_share": {
            arm: mean_ci([r["share_by_domain"][arm][cfg.rare_domain] for r in runs]) for arm in ARMS
        },
        "per_seed": runs,
    }


def _run(a) -> int:
    from mates_lab.bench.output import write_result

    write_result(bench_gotd_lm(a.data, a.config, a.work, a.seeds), a.out)
    return 0


def add_gotd_lm_parser(bsub) -> None:
    p = bsub.add_parser(
        "gotd-lm",
        help="GOT-D vs look-alike and random on the LM: a model pretrained on a mix that under-covers one mode "
        "of a two-mode target, continued on each arm's 5%% of a pool with the same skew; held-out loss per mode",
    )
    p.add_argument(
        "--data", type=Path, default=Path("data/embedded"), help="prepared embedded data directory"
    )
    p.add_argument("--config", type=Path, default=Path("configs/demo_cpu.yaml"), help="the model and budget")
    p.add_argument("--work", type=Path, default=Path("runs/bench_gotd_lm"), help="runs, data, embeddings")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.set_defaults(func=_run)
