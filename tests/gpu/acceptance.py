"""The GPU acceptance script of issue 32: the plugin where it is meant to run, in one command and one JSON.

    python tests/gpu/acceptance.py --out gpu_acceptance.json          # on the GPU machine: tests/gpu/run.sh
    python tests/gpu/acceptance.py --cpu-dry-run --out dry.json      # here: every stage at toy size on CPU

Each stage runs in a process of its own (a fresh CUDA context, its own peak-memory counters), is timed, and
records either its figures, ``{"skipped": why}`` or ``{"error": traceback}``; the JSON is rewritten after every
stage, so a run stopped at its time limit keeps what it measured. Without a GPU every stage that needs one is
skipped with the reason, unless ``--cpu-dry-run`` runs it in CPU mode at toy size (figures meaningless, code
paths exercised: CI has no GPU, and this script must work the first time one is at hand).

Stages (what issue 32 asks the script to print):

- ``probes``: a GPT (about 1B parameters on a GPU: 16 layers, 2048 wide, 1,024-token rows) in bf16 with the
  distributed optimizer, Megatron-LM's NaN checks and its rerun state machine in validate_results mode (item 1),
  and the overlapped gradient reduce and parameter gather: snapshot bytes against model + optimizer bytes, each
  estimator's peak memory over its round, whether it restores every tensor and RNG bit for bit, seconds per
  probe by phase, and the Spearman of scores read from the bf16 update against those from the fp32 mains
  (item 5).
- ``cuda_graphs``: CUDA graphs are refused at start-up by the one refusal list (item 3), and why: the RNG
  tracker's states are ``torch.Generator``s, which the snapshot cannot clone.
- ``influence``: the influence encoder's candidates/s end to end (text in) and on pre-tokenised input, against
  its FLOP bound at the GPU's peak.
- ``arms``: step time of random, synchronous and asynchronous MATES runs (``mates_megatron.pretrain`` under
  torchrun), each scored round's phases against the cost projection, and the asynchronous selections against
  the synchronous ones.
- ``resume``: a run stopped between a round's probe and its publish and resumed, against the uninterrupted run,
  bit for bit (losses, selections, every checkpoint tensor).
- ``megatron_lm``: when ``MEGATRON_LM_DIR`` is a patched core_v0.19.0 checkout, its ``pretrain_gpt.py`` on one
  GPU with ``--bf16 --use-distributed-optimizer`` (and TransformerEngine layers when TE is installed) through
  a scored round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peaks (the vendors' data sheets, SXM parts), for the encoder's FLOP bound."""


@dataclass
class Options:
    data: str
    """Prepared embedded data (``PREFIX = data/train``, ``reference.jsonl``, ``corpus.jsonl``)."""
    cuda: bool
    dry_run: bool
    workdir: str


STAGES: dict[str, tuple[Callable[[Options], dict], bool]] = {}


def stage(name: str, *, needs_cuda: bool = True):
    def register(fn):
        STAGES[name] = (fn, needs_cuda)
        return fn

    return register


# -- shared --------------------------------------------------------------------------------------------------


def _in_process(fn: Callable, opts: Options, *args) -> Any:
    """Run ``fn(opts, *args)`` in a fresh single-rank world (NCCL on a GPU, gloo in CPU mode)."""
    from mates_megatron.compat.spawn import run_on_ranks

    return run_on_ranks(fn, 1, opts, *args, timeout=1800, cuda=opts.cuda)[0]


def _gpt(opts: Options) -> dict:
    """The probe stages' model: about 1B parameters on a GPU, a toy in the CPU dry run."""
    if opts.dry_run:
        return {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64}
    return {"num_layers": 16, "hidden_size": 2048, "num_attention_heads": 16, "seq_length": 1024}


def _train_config(opts: Options, **overrides):
    from mates_megatron.pretrain import train_config_from_dict

    cfg = {
        "data_prefix": f"{opts.data}/train",
        "model": _gpt(opts),
        "parallel": {"cpu": not opts.cuda},
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "train_iters": 20,
        "lr": 3e-4,
        "lr_warmup_iters": 2,
        "log_interval": 10**9,
        "eval_interval": 10**9,
        "seed": 7,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return train_config_from_dict(cfg)


def _device_state(trainer) -> dict[str, Any]:
    """Everything a probe may touch, read independently of the snapshot's own bookkeeping: parameters, the
    optimizer's main copies and state, the scheduler, and every RNG (Python, NumPy, torch, CUDA, tracker)."""
    from megatron.core import tensor_parallel

    from mates_megatron.runtime.optimizers import main_params, megatron_optimizers

    out: dict[str, Any] = {
        "params": [p.detach().clone() for c in trainer.model_chunks for p in c.parameters()]
    }
    out["mains"] = [m.detach().clone() for _, m, _ in main_params(trainer.optimizer)]
    out["optimizer"] = [
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        for o in megatron_optimizers(trainer.optimizer)
        for st in o.optimizer.state.values()
    ]
    out["scheduler"] = trainer.scheduler.num_steps
    out["rng"] = {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    return out


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


# -- probes: memory, bit-exact restore, phases, bf16 (items 1, 3, 4, 5) --------------------------------------


def _probes_worker(opts: Options) -> dict:
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.probe.context import ProbeContext
    from mates_megatron.probe.estimators import ESTIMATORS
    from mates_megatron.probe.reference import ReferenceSet, load_reference_set, make_batch
    from mates_megatron.probe.snapshot import TrainingSnapshot
    from mates_megatron.runtime.memory import ExtraMemory, model_and_optimizer_bytes, precise_resident_set
    from mates_megatron.stats import spearman
    from mates_megatron.training.loop import Trainer

    if not opts.cuda:
        precise_resident_set()
    # Bridge's recipe settings: bf16, the distributed optimizer, overlapped gradient reduce and parameter gather;
    # Megatron-LM's defaults: NaN checks in every gradient sync, the rerun state machine validating results.
    cfg = _train_config(
        opts,
        model={"bf16": True},
        use_distributed_optimizer=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
    )
    trainer = Trainer(cfg)
    out: dict[str, Any] = {
        "model": dict(_gpt(opts)),
        "parameters": sum(p.numel() for c in trainer.model_chunks for p in c.parameters()),
        "bf16": True,
        "distributed_optimizer": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "check_for_nan_in_loss_and_grad": cfg.check_for_nan_in_loss_and_grad,
        "rerun_mode": get_rerun_state_machine().get_mode().value,
    }
    for _ in range(2):
        trainer.step()
    with ExtraMemory(trainer.device) as step:
        trainer.step()
    ref = load_reference_set(f"{opts.data}/reference.jsonl", load_tokenizer(), cfg.model.seq_length)
    rows = 8 if opts.dry_run else 32
    ref = ReferenceSet(ref.tokens[:rows], ref.loss_mask[:rows], ref.path)
    ctx = ProbeContext.from_host(trainer, ref.micro_batches(cfg.micro_batch_size))
    ctx.show_progress, ctx.time_phases = False, True
    n = 8 if opts.dry_run else 16
    samples = []
    for i in range(n):
        s = trainer.dataset[1000 + i]
        row = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()[None]
        samples.append(make_batch(row, s["loss_mask"].numpy()[None]))
    state_bytes = model_and_optimizer_bytes(trainer.model_chunks, trainer.optimizer)
    snap = TrainingSnapshot(ctx.model_chunks, ctx.optimizer, ctx.scheduler)
    out["model_optimizer_bytes"] = state_bytes
    out["snapshot_bytes"] = sum(t.numel() * t.element_size() for t in snap._saved) + sum(
        v.numel() * v.element_size() for st, _ in snap._opt_state for s in st.values() for v in s.values()
        if torch.is_tensor(v)
    )  # fmt: skip
    out["training_step_peak_bytes"] = int(step.peak_total)
    del snap
    scores: dict[str, np.ndarray] = {}
    for name, est in ESTIMATORS.items():
        before = _device_state(trainer)
        with ExtraMemory(trainer.device) as extra:
            t0 = time.perf_counter()
            result = est(ctx).score(samples)
            seconds = time.perf_counter() - t0
        scores[name] = result.scores
        out[name] = {
            "restores_bit_exactly": _same(before, _device_state(trainer)),
            "probes_per_s": round(n / seconds, 3),
            "seconds_per_probe": {k: round(v / n, 6) for k, v in result.seconds.items() if k != "reference"},
            "reference_seconds": round(result.seconds.get("reference", 0.0), 4),
            "peak_bytes_above_round_start": int(extra.peak_bytes),
            "peak_bytes_above_training_step": int(max(0, extra.peak_total - step.peak_total)),
            "peak_over_model_optimizer": round(extra.peak_bytes / state_bytes, 3),
        }
    out["rerun_mode_after"] = get_rerun_state_machine().get_mode().value
    out["linearized_spearman_vs_oracle"] = round(spearman(scores["linearized"], scores["oracle"]), 4)
    out["mirrored_spearman_vs_oracle"] = round(spearman(scores["mirrored"], scores["oracle"]), 4)
    by_param = _bf16_update_scores(ctx, samples)
    out["bf16_update_vs_fp32_main_spearman"] = round(spearman(by_param, scores["linearized"]), 4)
    out["bf16_update_vs_oracle_spearman"] = round(spearman(by_param, scores["oracle"]), 4)
    out["grad_buffers"] = "zeroed by restore (dead at a step boundary), not compared"
    return out


def _bf16_update_scores(ctx, samples) -> np.ndarray:
    """The linearized score with the update read from the bf16 parameters (as before issue 32): the reference
    gradient dotted with each probe step's change of the model's own (bf16) weights."""
    import torch.distributed as dist

    from mates_megatron.probe.context import (
        counted_params,
        param_grad,
        replica_local_grads,
        zero_grads,
    )
    from mates_megatron.probe.snapshot import TrainingSnapshot
    from mates_megatron.runtime.rerun import outside_training_step
    from mates_megatron.runtime.schedule import eval_mode, token_mean_backward

    params = counted_params(ctx)
    snap = TrainingSnapshot(ctx.model_chunks, ctx.optimizer, ctx.scheduler)
    out = []
    with outside_training_step():
        with replica_local_grads(ctx, always=True), eval_mode(ctx.model_chunks):
            zero_grads(ctx)
            token_mean_backward(ctx.model_chunks, ctx.reference, seq_length=ctx.seq_length, device=ctx.device)
        g_ref = [param_grad(p).detach().float().clone() for p in params]
        snap.restore()
        for s in samples:
            before = [p.detach().float().clone() for p in params]
            with replica_local_grads(ctx):
                zero_grads(ctx)
                ctx.run([s], forward_only=False)
                ctx.optimizer.step()
            dot = torch.zeros((), dtype=torch.float64, device=ctx.device)
            for g, p, b in zip(g_ref, params, before, strict=True):
                dot += torch.sum(g.double() * (p.detach().double() - b.double()))
            if dist.get_world_size(ctx.groups.model_parallel) > 1:
                dist.all_reduce(dot, group=ctx.groups.model_parallel)
            out.append(float(dot))
            snap.restore()
    return np.array(out)


@stage("probes")
def probes(opts: Options) -> dict:
    return _in_process(_probes_worker, opts)


# -- CUDA graphs: refused at start-up, and why (item 3) ---------------------------------------------------------


def _graph_rng_worker(opts: Options) -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from mates_megatron.runtime.rng import get_rng_state

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1, use_cudagraphable_rng=True)
    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    try:
        get_rng_state()
        snapshot = "copied"
    except Exception as e:  # noqa: BLE001 - what the snapshot meets under CUDA graphs, reported
        snapshot = f"{type(e).__name__}: {e}"
    return {"tracker_state_types": sorted({type(v).__name__ for v in states.values()}), "snapshot": snapshot}


@stage("cuda_graphs", needs_cuda=False)
def cuda_graphs(opts: Options) -> dict:
    from mates_megatron.config import SelectionConfig
    from mates_megatron.probe.settings import Spelling, check_probe_settings

    sel = SelectionConfig(scorer="mates", selector="gumbel", warmup_steps=10, select_every=10)
    spelling = Spelling(
        scorer="--mates-scorer mates",
        setting=lambda r, v: f"--{r.name.replace('_', '-')} {v}",
        fix=lambda r: f"drop --{r.name.replace('_', '-')}",
    )
    try:
        check_probe_settings(sel, {"cuda_graph_impl": "local"}, spelling)
        refused = None
    except ValueError as e:
        refused = str(e)
    out = {"refused_at_start_up": refused}
    if opts.cuda:  # the graph-safe tracker needs CUDA generators
        out["mechanism"] = _in_process(_graph_rng_worker, opts)
    return out


# -- the influence encoder at GPU speed --------------------------------------------------------------------------


def _influence_worker(opts: Options) -> dict:
    """``mates-lab bench influence`` (mates_lab/bench/influence.py) on this device: candidates/s end to
    end from the pool's text with 0 and 4 loader workers (the default), on pre-tokenised input, and the
    encoder's FLOP bound at the GPU's data-sheet peak (a measured matmul where the part is not listed)."""
    from mates_lab.bench.influence import bench_influence

    name = torch.cuda.get_device_name() if opts.cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if opts.dry_run:
        size = {"n": 16, "seq_length": 128, "batch_size": 8, "workers": (0, 2), "fit_samples": 16}
    else:  # 1,536 of the embedded data's ~1,900 windows of 1,024 tokens
        size = {"n": 1536, "seq_length": 1024, "workers": (0, 4)}
    out = bench_influence(opts.data, **size, device_tflops=peak / 1e12 if peak else None)
    out["bf16_autocast"] = bool(opts.cuda)
    return out


@stage("influence")
def influence(opts: Options) -> dict:
    return _in_process(_influence_worker, opts)


# -- arms and resume through the launcher (torchrun) ------------------------------------------------------------


def _arm_config(opts: Options, arm: str, **selection) -> dict:
    small = opts.dry_run
    model = (
        {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64}
        if small
        else {"num_layers": 8, "hidden_size": 1024, "num_attention_heads": 16, "seq_length": 512}
    )
    sel: dict[str, Any] = {
        "pool": "indexed", "select_every": 10, "selection_ratio": 0.2, "seed": 5, "warmup_steps": 10,
        "max_selection_cost": 1000.0,
    }  # fmt: skip
    if arm == "random":
        sel.update(selector="random", scorer="none")
    else:
        mates = {"probe_samples": 16 if small else 128, "estimator": "linearized", "min_influence_spearman": -1,
                 "influence": {"model": "ridge", "ridge": {"features": "token_embeddings"}}}  # fmt: skip
        sel.update(selector="gumbel", scorer="mates", scorer_options=mates, probe_lead_steps=3,
                   asynchronous=arm == "async")  # fmt: skip
    sel.update(selection)
    return {
        "data_prefix": f"{opts.data}/train", "reference": f"{opts.data}/reference.jsonl",
        "model": {**model, "bf16": not small}, "parallel": {"cpu": not opts.cuda},
        "micro_batch_size": 4, "global_batch_size": 16, "train_iters": 30, "lr": 3e-4, "min_lr": 3e-5,
        "lr_warmup_iters": 3, "log_interval": 10, "eval_interval": 10**9, "seed": 7, "selection": sel,
    }  # fmt: skip


def _launch(opts: Options, cfg: dict, name: str, *flags: str) -> tuple[dict, float]:
    """``mates_megatron.pretrain`` under torchrun on one rank (the README's launcher); (metrics, seconds)."""
    import yaml

    work = Path(opts.workdir) / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port),
           "-m", "mates_megatron.pretrain", "--config", str(work / "config.yaml"),
           "--metrics-out", str(work / "metrics.json"), *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    t = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t
    (work / "log.txt").write_text(run.stdout + run.stderr)
    if run.returncode:
        raise RuntimeError(
            f"{name}: exit {run.returncode}; its log ends:\n{(run.stdout + run.stderr)[-3000:]}"
        )
    return json.loads((work / "metrics.json").read_text()), seconds


def _selections(save: Path) -> dict[int, list[int]]:
    """Every round's published ids, from the samplers' states of the checkpoints in ``save``."""
    out: dict[int, list[int]] = {}
    for it in sorted(save.glob("iter_*")):
        state = torch.load(it / "run_state.pt", weights_only=False)
        for r, ids in state["extra"]["order"]["rounds"].items():
            out.setdefault(int(r), sorted(np.asarray(ids).tolist()))
    return out


def _checkpoint_tensors(it_dir: Path, scratch: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = scratch / f"{it_dir.parent.name}_{it_dir.name}.pt"
    dist_dir = next(p for p in it_dir.iterdir() if p.is_dir())
    dcp_to_torch_save(dist_dir, target)
    flat: dict[str, torch.Tensor] = {}

    def walk(x, path: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}/{k}")
        elif torch.is_tensor(x):
            flat[path] = x

    walk(torch.load(target, weights_only=False), "")
    return flat


@stage("resume")
def resume(opts: Options) -> dict:
    """Asynchronous rounds probed 3 steps ahead; stopped at step 18, after round 2's probe (step 17) and before
    its publish (step 20): the checkpoint waits for the round and saves its selection."""
    cfg = _arm_config(opts, "async")
    whole, split = Path(opts.workdir) / "resume_whole", Path(opts.workdir) / "resume_split"
    every = ("--save-interval", "10")  # checkpoints at the round boundaries, where _selections reads them
    full, _ = _launch(opts, cfg, "resume_whole", "--save", str(whole / "ckpt"), *every)
    first, _ = _launch(
        opts, cfg, "resume_first", "--save", str(split / "ckpt"), *every, "--exit-interval", "18"
    )
    rest, _ = _launch(
        opts, cfg, "resume_rest", "--save", str(split / "ckpt"), *every, "--load", str(split / "ckpt")
    )
    last = f"iter_{cfg['train_iters']:07d}"
    a = _checkpoint_tensors(whole / "ckpt" / last, Path(opts.workdir))
    b = _checkpoint_tensors(split / "ckpt" / last, Path(opts.workdir))
    return {
        "stopped_at": max(first["step"]),
        "losses_equal": rest["loss"] == full["loss"],
        "selections_equal": _selections(split / "ckpt") == _selections(whole / "ckpt"),
        "checkpoint_tensors": len(a),
        "checkpoint_tensors_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
    }


@stage("arms")
def arms(opts: Options) -> dict:
    from mates_megatron.config import SelectionConfig
    from mates_megatron.configio import build
    from mates_megatron.cost import Layout, TransformerShape, project_mates_round
    from mates_megatron.probe.reference import read_jsonl

    out: dict[str, Any] = {}
    for arm in ("random", "sync", "async"):
        cfg = _arm_config(opts, arm)
        save = Path(opts.workdir) / f"arm_{arm}" / "ckpt"
        metrics, wall = _launch(opts, cfg, f"arm_{arm}", "--save", str(save), "--save-interval", "10")
        every = cfg["selection"]["select_every"]
        steps = [s for i, s in enumerate(metrics["seconds"]) if (i + 1) % every]  # rounds land on boundaries
        record = {"wall_seconds": round(wall, 1), "median_step_seconds": round(statistics.median(steps), 4)}
        summary = metrics.get("selection", {})
        record["rounds"] = [
            {"round": r["round"], "seconds": r["seconds"], "fallback": r.get("fallback")}
            for r in summary.get("rounds", [])
        ]
        record["selection_seconds"] = summary.get("selection_seconds")
        record["stall_seconds"] = summary.get("stall_seconds")
        if arm != "random":
            sel = build(SelectionConfig, cfg["selection"], where="arm")
            m = cfg["model"]
            shape = TransformerShape(
                m["num_layers"],
                m["hidden_size"],
                4 * m["hidden_size"],
                30592,
                num_attention_heads=m["num_attention_heads"],
                position_embeddings=m["seq_length"],
            )
            cost = project_mates_round(
                sel, model=shape, seq_length=m["seq_length"], global_batch_size=cfg["global_batch_size"],
                reference_rows=len(read_jsonl(cfg["reference"])), machine="h100" if opts.cuda else "cpu-2core",
                layout=Layout(micro_batch_size=cfg["micro_batch_size"], bf16=m.get("bf16", False)),
            )  # fmt: skip
            train_round = every * record["median_step_seconds"]
            # The corrected projection (seconds; h100 preset on a GPU) beside the measured rounds, and in FLOPs.
            record["projected_fraction"] = round(cost.fraction, 4)
            record["projected_flop_fraction"] = round(cost.flop_fraction, 4)
            record["projected_phases"] = {
                k: round(v / cost.training_seconds, 4) for k, v in cost.phase_seconds.items()
            }
            record["projected_training_step_seconds"] = round(cost.training_seconds / every, 4)
            record["measured_fraction"] = [
                round(r["seconds"]["total"] / train_round, 4) for r in summary.get("rounds", [])
            ]
        record["selections"] = _selections(save)
        out[arm] = record
    out["async_selections_equal_sync"] = out["async"]["selections"] == out["sync"]["selections"]
    for arm in out.values():
        if isinstance(arm, dict):
            arm["selections"] = {r: len(ids) for r, ids in arm["selections"].items()}
    return out


# -- Megatron-LM's own pretrain_gpt.py with the core_v0.19.0 patch ------------------------------------------------


@stage("megatron_lm")
def megatron_lm(opts: Options) -> dict:
    root = os.environ.get("MEGATRON_LM_DIR")
    if not root:
        return {
            "skipped": "MEGATRON_LM_DIR is not set: carry a patched core_v0.19.0 checkout (tests/gpu/README.md)"
        }
    script = Path(root) / "pretrain_gpt.py"
    if "add_mates_args" not in script.read_text():
        return {"error": f"{script} has no MATES patch applied"}
    try:
        import transformer_engine  # noqa: F401

        impl = "transformer_engine"
    except ImportError:
        impl = "local"
    from mates_megatron.data.tokenizer import default_tokenizer_path

    work = Path(opts.workdir) / "megatron_lm"
    work.mkdir(parents=True, exist_ok=True)
    selection = {
        "select_every": 4, "selection_ratio": 0.25, "selector": "gumbel", "seed": 11,
        "warmup_steps": 4, "max_selection_cost": 1000.0,
        "scorer": {"kind": "mates", "probe_samples": 16, "estimator": "linearized",
                   "influence": {"model": "ridge", "ridge": {"features": "token_embeddings"}}},
    }  # fmt: skip
    (work / "mates.json").write_text(json.dumps(selection))
    args = [
        "--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8", "--seq-length", "512",
        "--max-position-embeddings", "512", "--micro-batch-size", "4", "--global-batch-size", "16",
        "--train-iters", "12", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "2",
        "--lr-decay-iters", "12", "--bf16", "--use-distributed-optimizer", "--transformer-impl", impl,
        "--data-path", f"{opts.data}/train", "--split", "998,1,1", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(default_tokenizer_path()), "--save", str(work / "ckpt"),
        "--save-interval", "12", "--ckpt-format", "torch_dist", "--log-interval", "1", "--eval-iters", "0",
        "--eval-interval", "1000", "--mates", "--mates-config", str(work / "mates.json"),
        "--mates-reference", f"{opts.data}/reference.jsonl",
    ]  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port),
           str(script), *args]  # fmt: skip
    t = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    (work / "log.txt").write_text(log)
    out: dict[str, Any] = {"transformer_impl": impl, "exit_code": run.returncode,
                           "wall_seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
    state = work / "ckpt" / "iter_0000012" / "mates_state.pt"
    if state.is_file():
        records = torch.load(state, weights_only=False)["hook"]["records"]
        out["scored_rounds"] = sorted(records)
        out["round_seconds"] = {r: rec["seconds"] for r, rec in records.items()}
    if run.returncode:
        out["log_tail"] = log[-3000:]
    return out


# -- driver ------------------------------------------------------------------------------------------------------


def _environment(opts: Options) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if opts.cuda else "cpu",
        "cpu_dry_run": opts.dry_run,
    }
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except ImportError as e:
        env["megatron_core"] = f"missing: {e}"
    try:
        import transformer_engine

        env["transformer_engine"] = getattr(transformer_engine, "__version__", "installed")
    except ImportError:
        env["transformer_engine"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON written (rewritten after every stage)")
    p.add_argument("--data", default=str(ROOT / "data" / "embedded"), help="prepared embedded data")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--cpu-dry-run", action="store_true", help="run every stage on CPU at toy size")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if a.cpu_dry_run and cuda:
        p.error("--cpu-dry-run is for machines without a GPU (CPU mode refuses to run beside CUDA)")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="mates-gpu-"))
    opts = Options(data=a.data, cuda=cuda, dry_run=a.cpu_dry_run, workdir=str(workdir))
    results: dict[str, Any] = {"environment": _environment(opts), "stages": {}}
    unknown = [s for s in a.stages.split(",") if s and s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    for name in [s for s in a.stages.split(",") if s]:
        fn, needs_cuda = STAGES[name]
        t = time.perf_counter()
        if needs_cuda and not cuda and not a.cpu_dry_run:
            record = {
                "skipped": "no CUDA device on this machine (run it on the GPU machine: tests/gpu/README.md)"
            }
        else:
            try:
                record = fn(opts)
            except Exception:  # noqa: BLE001 - one stage's failure is a result; the others still run
                record = {"error": traceback.format_exc()[-4000:]}
        record["stage_seconds"] = round(time.perf_counter() - t, 1)
        results["stages"][name] = record
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".tmp").write_text(json.dumps(results, indent=1, default=str))
        os.replace(a.out.with_suffix(".tmp"), a.out)
        status = next((k for k in ("skipped", "error") if k in record), "ok")
        print(f"[gpu acceptance] {name}: {status} ({record['stage_seconds']} s)", flush=True)
    if a.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=1, default=str))
    return 1 if any("error" in r for r in results["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
