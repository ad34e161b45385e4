"""`mates-lab bench probe --config CFG --seeds ...`: every estimator against the oracle at every scored round
of a run config (the demo's by default), not at one model state. With ``--estimators rollout
linearized_rollout ...``, each is also read against Group-MATES's rollout oracle (``*_spearman_vs_rollout``).

The run is trained as its config says (layout, model, optimizer, schedule, reference set, ``probe_tokens``), on
the pool's own order, and stopped at each step where the config's selection scores a round (after its warm-up,
every ``select_every``); there the same ``probe_samples`` pool rows, drawn at random past the training range,
are scored by each estimator on the live model, which every estimator leaves bit-identical. Per round: each
estimator's Spearman against the oracle on the first ``oracle_probes`` samples, and its probes per second
(the round's reference pass included; linearized and forward over all ``probe_samples``).
The states are a random-order run's, not the MATES run's own (whose data differ by the selection); the oracle
is too slow to run beside every round of a real MATES run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import yaml

from mates_megatron.stats import spearman

FULL_COUNT = ("linearized", "forward")
"""Estimators run on the round's full probe count (the others on the first ``oracle_probes``)."""
DEFAULT_ESTIMATORS = ("oracle", "linearized", "forward", "forward_clip", "mirrored")
"""``forward_clip``: the forward estimator with each sample's exact clipping factor (one gradient per sample):
what the first-order direction loses by leaving clipping out."""


def _estimator(name: str, ctx):
    from mates_megatron.probe.estimators import ESTIMATORS
    from mates_megatron.probe.forward import ForwardProber

    if name == "forward_clip":
        return ForwardProber(ctx, clip="exact")
    return ESTIMATORS.get(name)(ctx)


def _worker(
    config: dict, seed: int, probes: int, oracle_probes: int, estimators: tuple[str, ...], keep: bool = False
) -> dict:
    """One seed's rounds (see the module); ``keep``: each round also keeps its probes' texts (decoded by the
    pretraining tokenizer) and each estimator's every score (``<estimator>_scores``)."""
    from mates_megatron.pretrain import train_config_from_dict
    from mates_megatron.probe.context import ProbeContext
    from mates_megatron.probe.reference import make_batch
    from mates_megatron.training.loop import Trainer

    config = dict(config)
    from mates_megatron.config import SelectionConfig
    from mates_megatron.configio import normalize

    sel = normalize(SelectionConfig, config.pop("selection"), where="bench probe --config")
    options = sel.get("scorer_options") or {}
    config.pop("eval_sets", None)
    config["seed"] = seed
    config["log_interval"] = 10**9
    trainer = Trainer(train_config_from_dict(config))
    every, warmup = int(sel.get("select_every", 40)), int(sel.get("warmup_steps", 0))
    steps = [s for s in range(max(warmup, every), trainer.cfg.train_iters, every)]
    probes = probes or int(options.get("probe_samples", 256))
    reference = trainer.reference
    if options.get("probe_tokens") == "all":
        reference = reference.with_all_tokens()
    reference = reference.trimmed()  # as the 'mates' scorer probes
    ctx = ProbeContext.from_host(trainer, reference.micro_batches(trainer.micro_batch_size))
    ctx.show_progress, ctx.time_phases = False, True
    seen = trainer.cfg.train_iters * trainer.cfg.global_batch_size
    if keep:
        from mates_megatron.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(trainer.cfg.tokenizer or trainer.tokenizer_info.path)
    rounds = []
    for step in steps:
        while trainer.iteration < step:
            trainer.step()
        rng = np.random.default_rng([seed, step, 0x9B0BE])
        rows = rng.choice(np.arange(seen, len(trainer.dataset)), size=probes, replace=False)
        samples = []
        for i in rows:
            s = trainer.dataset[int(i)]
            row = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()[None]
            samples.append(make_batch(row, s["loss_mask"].numpy()[None]))
        scores, record = {}, {"step": step}
        if keep:
            record["texts"] = [tokenizer.decode(b["tokens"][0].tolist()) for b in samples]
        for name in estimators:
            # Agreement on the first ``oracle_probes`` samples (the oracle runs the whole reference set per
            # probe); the rate of the fast estimators on the round's full count, the rate a run sees.
            n = probes if name in FULL_COUNT else oracle_probes
            t = time.perf_counter()
            result = _estimator(name, ctx).score(samples[:n])
            elapsed = time.perf_counter() - t
            scores[name] = result.scores[:oracle_probes]
            if keep:
                record[f"{name}_scores"] = [float(v) for v in result.scores]
            record[f"{name}_probes_per_s"] = round(n / elapsed, 3)
            record[f"{name}_seconds"] = {k: round(v, 3) for k, v in result.seconds.items()}
        for name in estimators:
            for truth in (
                "oracle",
                "rollout",
            ):  # the rollout oracle: Group-MATES's, of the rollout estimators
                if name != truth and truth in scores:
                    record[f"{name}_spearman_vs_{truth}"] = round(spearman(scores[name], scores[truth]), 4)
        rounds.append(record)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            agree = {k: v for k, v in record.items() if "_spearman_vs_" in k or k.endswith("_probes_per_s")}
            print(f"bench probe, seed {seed}, step {step}: {agree}", flush=True)
    return {
        "seed": seed,
        "probes": probes,
        "oracle_probes": oracle_probes,
        "reference_rows": len(reference),
        "reference_width": reference.seq_length,
        "rounds": rounds,
    }


def bench_probe_rounds(
    config: str | Path,
    seeds: list[int],
    probes: int = 0,
    oracle_probes: int = 64,
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS,
    keep: bool = False,
) -> dict:
    """Figures per seed and round, and per estimator the worst round's Spearman and the mean probes/s
    (``keep``: each round's probe texts and every score too, see ``_worker``)."""
    from mates_megatron.compat.spawn import run_on_ranks

    raw = yaml.safe_load(Path(config).read_text())
    par = raw.get("parallel", {})
    world = int(par.get("tensor_model_parallel_size", 1)) * int(par.get("pipeline_model_parallel_size", 1))
    runs = [
        run_on_ranks(
            _worker,
            world,
            raw,
            s,
            probes,
            oracle_probes,
            tuple(estimators),
            keep,
            timeout=4 * 3600,
            cuda=torch.cuda.is_available(),
        )[0]
        for s in seeds
    ]
    out: dict = {"config": str(config), "seeds": list(seeds), "runs": runs}
    all_rounds = [r for run in runs for r in run["rounds"]]
    for name in estimators:
        out[f"{name}_probes_per_s"] = round(
            float(np.mean([r[f"{name}_probes_per_s"] for r in all_rounds])), 3
        )
        for truth in ("oracle", "rollout"):
            key = f"{name}_spearman_vs_{truth}"
            if all_rounds and key in all_rounds[0]:
                values = [r[key] for r in all_rounds]
                out[f"{key}_min"] = min(values)
                out[f"{key}_mean"] = round(float(np.mean(values)), 4)
    if "linearized" in estimators and "forward" in estimators:
        out["forward_speedup_vs_linearized"] = round(
            out["forward_probes_per_s"] / out["linearized_probes_per_s"], 2
        )
    return out
