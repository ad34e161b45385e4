"""`mates-lab bench probe`: probe throughput, agreement, memory and phases on the embedded data (one process).

A small GPT is warmed up on the embedded corpus, then the same probe samples are scored five ways:
"reload" (the reference implementation's loop: load the saved model + optimizer state from disk before
every probe, step, evaluate), the in-memory oracle, the mirrored, the linearized and the forward estimators.
``--config`` instead scores every estimator at each scored round of a run config (``bench.probe_rounds``). On a CUDA
machine it runs there (NCCL, the GPU's fusions), on CPU in CPU mode; ``--bf16`` trains in bf16 with fp32 mains.

Memory: the bytes of the model + optimizer state, of a round's one snapshot, and each estimator's peak memory
during its round above the round's start and above a training step's own peak (the CUDA allocator's peak on a
GPU; the resident set, sampled, on CPU: ``runtime.memory``). Seconds per probe by phase: forward-backward, optimizer step, restore,
and the reference loss (oracle), the dot (linearized) or the forward passes (mirrored), device-synchronised.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mates_megatron.stats import spearman


def _worker(data_dir: str, probes: int, warmup_steps: int, reference_size: int, bf16: bool) -> dict:
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.pretrain import train_config_from_dict
    from mates_megatron.probe.context import ProbeContext, reference_loss
    from mates_megatron.probe.estimators import LinearizedProber, MirroredProber, OracleProber
    from mates_megatron.probe.forward import ForwardProber
    from mates_megatron.probe.reference import ReferenceSet, load_reference_set, make_batch
    from mates_megatron.probe.snapshot import TrainingSnapshot
    from mates_megatron.runtime.memory import ExtraMemory, model_and_optimizer_bytes, precise_resident_set
    from mates_megatron.runtime.rerun import outside_training_step
    from mates_megatron.runtime.schedule import run_schedule
    from mates_megatron.training.loop import Trainer

    cuda = torch.cuda.is_available()
    if not cuda:
        precise_resident_set()
    cfg = train_config_from_dict(
        {
            "data_prefix": f"{data_dir}/train",
            "model": {
                "num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "seq_length": 128, "bf16": bf16,
            },
            "parallel": {"cpu": not cuda},
            "micro_batch_size": 16,
            "global_batch_size": 16,
            "train_iters": warmup_steps + 1,
            "lr": 2e-3,
            "lr_warmup_iters": 5,
            "log_interval": 10**9,
            "seed": 7,
        }
    )  # fmt: skip
    trainer = Trainer(cfg)
    for _ in range(warmup_steps - 1):
        trainer.step()
    with ExtraMemory(trainer.device) as step:  # a training step's own peak (activations, optimizer)
        trainer.step()
    ref = load_reference_set(f"{data_dir}/reference.jsonl", load_tokenizer(), cfg.model.seq_length)
    ref = ReferenceSet(ref.tokens[:reference_size], ref.loss_mask[:reference_size], ref.path)
    ctx = ProbeContext.from_host(trainer, ref.micro_batches(16))
    ctx.show_progress, ctx.time_phases = False, True
    # Probe samples: the next training samples (one sequence each).
    samples = []
    for i in range(probes):
        s = trainer.dataset[warmup_steps * cfg.global_batch_size + i]
        row = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()[None]
        samples.append(make_batch(row, s["loss_mask"].numpy()[None]))

    out: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "bf16": bf16,
        "probes": probes,
        "reference_examples": len(ref),
        "warmup_steps": warmup_steps,
    }
    state_bytes = model_and_optimizer_bytes(trainer.model_chunks, trainer.optimizer)
    snap = TrainingSnapshot(ctx.model_chunks, ctx.optimizer, ctx.scheduler)
    out["model_optimizer_bytes"] = state_bytes
    out["snapshot_bytes"] = sum(t.numel() * t.element_size() for t in snap._saved) + sum(
        v.numel() * v.element_size()
        for state, _ in snap._opt_state
        for st in state.values()
        for v in st.values()
        if torch.is_tensor(v)
    )
    t0 = time.perf_counter()
    for _ in range(5):
        snap.restore()
    out["restore_ms"] = round((time.perf_counter() - t0) / 5 * 1e3, 2)
    del snap

    scores = {}
    for name, est in (
        ("oracle", OracleProber(ctx)),
        ("mirrored", MirroredProber(ctx, micro_batch_size=16)),
        ("linearized", LinearizedProber(ctx)),
        ("forward", ForwardProber(ctx)),
    ):
        with ExtraMemory(trainer.device) as extra:
            t0 = time.perf_counter()
            result = est.score(samples)
            elapsed = time.perf_counter() - t0
        scores[name] = result.scores
        once = result.seconds.get("reference", 0.0)
        out[f"{name}_probes_per_s"] = round(probes / elapsed, 3)
        out[f"{name}_marginal_probes_per_s"] = round(probes / max(elapsed - once, 1e-9), 3)
        out[f"{name}_reference_pass_seconds"] = round(once, 4)
        out[f"{name}_seconds_per_probe"] = {
            k: round(v / probes, 6) for k, v in result.seconds.items() if k != "reference"
        }
        # Above the round's start (what the round holds, its own activations included), and above a training
        # step's peak (what the round adds to the run's peak memory).
        out[f"{name}_extra_memory_bytes"] = int(extra.peak_bytes)
        out[f"{name}_extra_memory_ratio"] = round(extra.peak_bytes / state_bytes, 3)
        over = max(0, extra.peak_total - step.peak_total)
        out[f"{name}_above_training_peak_bytes"] = int(over)
        out[f"{name}_above_training_peak_ratio"] = round(over / state_bytes, 3)
    out["inmemory_probes_per_s"] = out["oracle_probes_per_s"]
    for name in ("mirrored", "linearized", "forward"):
        out[f"{name}_spearman_vs_oracle"] = round(spearman(scores[name], scores["oracle"]), 4)

    # Reference-implementation style: reload the checkpoint from disk before every probe.
    model = trainer.model_chunks[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        torch.save({"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict()}, path)
        reload_scores = []
        t0 = time.perf_counter()
        with outside_training_step():
            for s in samples:
                state = torch.load(path, map_location=trainer.device, weights_only=False)
                model.load_state_dict(state["model"])
                trainer.optimizer.load_state_dict(state["optimizer"])
                model.zero_grad_buffer()
                trainer.optimizer.zero_grad()
                run_schedule(
                    [model], [s], seq_length=cfg.model.seq_length, forward_only=False, device=trainer.device
                )
                trainer.optimizer.step()
                reload_scores.append(reference_loss(ctx))
        out["reload_probes_per_s"] = round(probes / (time.perf_counter() - t0), 3)
        t0 = time.perf_counter()
        for _ in range(5):
            state = torch.load(path, map_location=trainer.device, weights_only=False)
            model.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
        out["reload_ms"] = round((time.perf_counter() - t0) / 5 * 1e3, 2)
    out["reload_max_abs_diff_vs_inmemory"] = float(np.max(np.abs(np.array(reload_scores) - scores["oracle"])))
    out["oracle_std"] = float(np.std(scores["oracle"]))
    return out


def bench_probe(
    data_dir: str = "data/embedded",
    probes: int = 64,
    warmup_steps: int = 40,
    reference_size: int = 64,
    *,
    bf16: bool = False,
) -> dict:
    from mates_megatron.compat.spawn import run_on_ranks

    if not Path(f"{data_dir}/train.bin").is_file():
        raise FileNotFoundError(f"{data_dir}/train.bin not found: run `mates-lab embedded --out {data_dir}`")
    args = (data_dir, probes, warmup_steps, reference_size, bf16)
    return run_on_ranks(_worker, 1, *args, timeout=3600, cuda=torch.cuda.is_available())[0]
