"""`mates-megatron bench probe`: probe throughput and agreement on the embedded data (one CPU process).

A small GPT is warmed up on the embedded corpus, then the same probe samples are scored four ways:
"reload" (the reference implementation's loop: load the saved model + optimizer state from disk before
every probe, step, evaluate), the in-memory oracle, the mirrored and the linearized estimators.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mates_megatron.stats import spearman


def _worker(data_dir: str, probes: int, warmup_steps: int, reference_size: int) -> dict:
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.pretrain import train_config_from_dict
    from mates_megatron.probe.estimators import (
        LinearizedProber,
        MirroredProber,
        OracleProber,
        ProbeContext,
        _reference_loss,
    )
    from mates_megatron.probe.reference import load_reference_set, make_batch
    from mates_megatron.runtime.schedule import run_schedule
    from mates_megatron.training.loop import Trainer

    cfg = train_config_from_dict(
        {
            "data_prefix": f"{data_dir}/train",
            "model": {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "seq_length": 128},
            "parallel": {"cpu": True},
            "micro_batch_size": 16,
            "global_batch_size": 16,
            "train_iters": warmup_steps + 1,
            "lr": 2e-3,
            "lr_warmup_iters": 5,
            "log_interval": 10**9,
            "seed": 7,
        }
    )
    trainer = Trainer(cfg)
    for _ in range(warmup_steps):
        trainer.step()
    ref = load_reference_set(f"{data_dir}/reference.jsonl", load_tokenizer(), cfg.model.seq_length)
    keep = slice(0, reference_size)
    from mates_megatron.probe.reference import ReferenceSet

    ref = ReferenceSet(ref.tokens[keep], ref.loss_mask[keep], ref.path)
    ctx = ProbeContext.from_host(trainer, ref.micro_batches(16))
    ctx.show_progress = False
    # Probe samples: the next training samples (one sequence each).
    samples = []
    for i in range(probes):
        s = trainer.dataset[warmup_steps * cfg.global_batch_size + i]
        row = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()[None]
        samples.append(make_batch(row, s["loss_mask"].numpy()[None]))

    t0 = time.perf_counter()
    oracle = OracleProber(ctx).score(samples)
    inmem = probes / (time.perf_counter() - t0)

    # Reference-implementation style: reload the checkpoint from disk before every probe.
    model = trainer.model_chunks[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        torch.save({"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict()}, path)
        reload_scores = []
        t0 = time.perf_counter()
        for s in samples:
            state = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
            model.zero_grad_buffer()
            trainer.optimizer.zero_grad()
            run_schedule(
                [model], [s], seq_length=cfg.model.seq_length, forward_only=False, device=trainer.device
            )
            trainer.optimizer.step()
            reload_scores.append(_reference_loss(ctx))
        reload = probes / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(5):
            state = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
        reload_ms = (time.perf_counter() - t0) / 5 * 1e3
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])

    # The state reset alone, the part the two oracle loops differ in.
    from mates_megatron.probe.snapshot import TrainingSnapshot

    snap = TrainingSnapshot(ctx.model_chunks, ctx.optimizer, ctx.scheduler)
    t0 = time.perf_counter()
    for _ in range(5):
        snap.restore()
    restore_ms = (time.perf_counter() - t0) / 5 * 1e3

    t0 = time.perf_counter()
    mirrored = MirroredProber(ctx, micro_batch_size=16).score(samples)
    mirrored_rate = probes / (time.perf_counter() - t0)
    prober = LinearizedProber(ctx)
    t0 = time.perf_counter()
    prober.reference_gradient()
    once = time.perf_counter() - t0
    t0 = time.perf_counter()
    linear = prober.score(samples)
    linear_time = time.perf_counter() - t0
    linear_rate = probes / linear_time
    return {
        "probes": probes,
        "reference_examples": len(ref),
        "warmup_steps": warmup_steps,
        "reload_probes_per_s": round(reload, 3),
        "inmemory_probes_per_s": round(inmem, 3),
        "mirrored_probes_per_s": round(mirrored_rate, 3),
        "mirrored_spearman_vs_oracle": round(spearman(mirrored.scores, oracle.scores), 4),
        "linearized_probes_per_s": round(linear_rate, 3),
        "linearized_spearman_vs_oracle": round(spearman(linear.scores, oracle.scores), 4),
        "linearized_marginal_probes_per_s": round(probes / max(linear_time - once, 1e-9), 3),
        "linearized_reference_pass_seconds": round(once, 3),
        "restore_ms": round(restore_ms, 2),
        "reload_ms": round(reload_ms, 2),
        "reload_max_abs_diff_vs_inmemory": float(np.max(np.abs(np.array(reload_scores) - oracle.scores))),
        "oracle_std": float(np.std(oracle.scores)),
        "reference_loss_before": oracle.loss_before,
    }


def bench_probe(
    data_dir: str = "data/embedded", probes: int = 64, warmup_steps: int = 40, reference_size: int = 64
) -> dict:
    from mates_megatron.compat.spawn import run_on_ranks

    if not Path(f"{data_dir}/train.bin").is_file():
        raise FileNotFoundError(
            f"{data_dir}/train.bin not found: run `mates-megatron prepare --embedded --out {data_dir}`"
        )
    return run_on_ranks(_worker, 1, data_dir, probes, warmup_steps, reference_size, timeout=3600)[0]
