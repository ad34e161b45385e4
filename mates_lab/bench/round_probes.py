"""The probe phase and the training step of a round, measured beside the cost model's projection (``bench round``).

One process, the project's loop on the embedded data: a small GPT is trained a few steps (each step timed), the
machine is calibrated in the same process (``bench.calibrate``), then every estimator scores the same probe
samples against the same reference rows, ``repeats`` times round-robin (the median of each part is kept: a burst
of other work on a shared machine hits one run), with its parts timed by ``ProbeScores.seconds`` and what no phase
times (the round's snapshot, its last restore, the gather) as the ``rest`` of its total. The machine is
calibrated before and after the estimators run, and the projection takes the geometric mean of the two. Each part is projected by
``cost.phases.probe_parts`` for the same shapes and counts, with the constants calibrated here and with the
stored ``cpu-2core`` preset. Seconds are this process's CPU seconds by default (one intra-op thread), so that
other jobs on a shared CPU do not count; ``clock='wall'`` reads wall-clock seconds.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch

ESTIMATORS = ("forward", "linearized", "mirrored", "oracle")
SMALL_GPT = {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "seq_length": 128}
"""``bench probe``'s GPT (vocab: the embedded tokenizer's, padded)."""


def _clock(name: str):
    return {"cpu": time.process_time, "wall": time.perf_counter}[name]


def _worker(data_dir: str, gpt: dict, micro_batch_size: int, probes: int, oracle_probes: int, reference: int,
            steps: int, repeats: int, clock_name: str) -> dict:  # fmt: skip
    from mates_lab.bench.calibrate import calibrate, mean_machine
    from mates_megatron.cost import MACHINES, Layout, TransformerShape
    from mates_megatron.cost.phases import probe_parts
    from mates_megatron.cost.seconds import RankSeconds
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.pretrain import train_config_from_dict
    from mates_megatron.probe.context import ProbeContext
    from mates_megatron.probe.estimators import ESTIMATORS as REGISTRY
    from mates_megatron.probe.reference import ReferenceSet, load_reference_set, make_batch
    from mates_megatron.training.loop import Trainer

    clock = _clock(clock_name)
    cfg = train_config_from_dict(
        {
            "data_prefix": f"{data_dir}/train", "model": dict(gpt), "parallel": {"cpu": True},
            "micro_batch_size": micro_batch_size, "global_batch_size": micro_batch_size,
            "train_iters": 2 * steps + 1, "lr": 2e-3, "lr_warmup_iters": 2, "log_interval": 10**9, "seed": 7,
        }
    )  # fmt: skip
    trainer = Trainer(cfg)
    m = cfg.model
    shape = TransformerShape(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.padded_vocab_size(1),
                             num_attention_heads=m.num_attention_heads, position_embeddings=m.seq_length)  # fmt: skip
    params = sum(p.numel() for c in trainer.model_chunks for p in c.parameters())
    for _ in range(steps):  # warm-up: the optimizer's state exists and the allocator has settled
        trainer.step()
    t = clock()
    for _ in range(steps):
        trainer.step()
    step_seconds = (clock() - t) / steps
    before = calibrate(shape, seq_length=m.seq_length, micro_batch_size=micro_batch_size, clock=clock)

    ref = load_reference_set(f"{data_dir}/reference.jsonl", load_tokenizer(), m.seq_length)
    ref = ReferenceSet(ref.tokens[:reference], ref.loss_mask[:reference], ref.path)
    ctx = ProbeContext.from_host(trainer, ref.micro_batches(micro_batch_size))
    ctx.show_progress, ctx.time_phases, ctx.clock = False, True, clock
    samples = []
    for i in range(probes):
        s = trainer.dataset[(2 * steps + 1) * micro_batch_size + i]
        row = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()[None]
        samples.append(make_batch(row, s["loss_mask"].numpy()[None]))
    counts = {name: oracle_probes if name == "oracle" else probes for name in ESTIMATORS}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ESTIMATORS}
    for _ in range(repeats):  # round-robin, so that a burst of other work on the machine hits one run of each
        for name in ESTIMATORS:
            t = clock()
            result = REGISTRY.get(name)(ctx).score(samples[: counts[name]])
            total = clock() - t
            parts = dict(result.seconds)
            parts["rest"] = max(0.0, total - sum(parts.values()))
            runs[name].append(parts)
    measured = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}

    after = calibrate(shape, seq_length=m.seq_length, micro_batch_size=micro_batch_size, clock=clock)
    machine = mean_machine([before, after], "calibrated")
    layout = Layout(micro_batch_size=micro_batch_size)
    projected = {}
    for label, mach in (("calibrated", machine), ("preset", MACHINES["cpu-2core"])):
        work = RankSeconds(shape, layout, mach, m.seq_length)
        projected[label] = {
            name: probe_parts(
                name,
                work,
                probes=counts[name],
                reference_rows=len(ref),
                steps_optimizer=REGISTRY.get(name).steps_optimizer,
            )
            for name in ESTIMATORS
        }
        projected[label]["training"] = {"step": work.training_step(micro_batch_size)}
    measured["training"] = {"step": step_seconds}
    return {
        "clock": clock_name,
        "gpt": {**asdict(shape), "parameters": shape.parameters(), "parameters_counted_in_the_model": params},
        "micro_batch_size": micro_batch_size,
        "reference_rows": len(ref),
        "probes": counts,
        "repeats": repeats,
        "runs": runs,
        "machine": machine.to_dict(),
        "calibrations": [before.to_dict(), after.to_dict()],
        "measured": measured,
        "projected": projected,
    }


def measure_probe_phases(
    data_dir: str = "data/embedded",
    *,
    gpt: dict | None = None,
    micro_batch_size: int = 16,
    probes: int = 32,
    oracle_probes: int | None = None,
    reference: int = 64,
    steps: int = 3,
    repeats: int = 3,
    clock: str = "cpu",
) -> dict:
    """Every estimator's parts and a training step, measured and projected (see the module doc)."""
    from pathlib import Path

    from mates_megatron.compat.spawn import run_on_ranks

    if not Path(f"{data_dir}/train.bin").is_file():
        raise FileNotFoundError(f"{data_dir}/train.bin not found: run `mates-lab embedded --out {data_dir}`")
    oracle = oracle_probes if oracle_probes is not None else max(1, probes // 4)
    args = (data_dir, gpt or SMALL_GPT, micro_batch_size, probes, oracle, reference, steps, repeats, clock)
    return run_on_ranks(_worker, 1, *args, timeout=3600)[0]


def compare(measured: dict[str, dict[str, float]], projected: dict[str, dict[str, float]]) -> list[dict]:
    """One row per (estimator or training, part) with measured and projected seconds and their ratio."""
    rows = []
    for group, parts in measured.items():
        for part, secs in parts.items():
            proj = projected[group].get(part, 0.0)
            rows.append({"phase": f"{group}.{part}", "measured_s": round(secs, 5), "projected_s": round(proj, 5),
                         "ratio": round(secs / proj, 3) if proj > 0 else None})  # fmt: skip
        total, proj = sum(parts.values()), sum(projected[group].values())
        if len(parts) > 1:
            rows.append({"phase": f"{group}.total", "measured_s": round(total, 5), "projected_s": round(proj, 5),
                         "ratio": round(total / proj, 3) if proj > 0 else None})  # fmt: skip
    return rows
