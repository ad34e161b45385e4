"""Checkpoints of a Megatron-Core run in megatron-core's distributed format: atomic, reshardable, exact resume.

Layout:
    SAVE/latest_checkpointed_iteration.txt          written last, once the iteration directory is complete
    SAVE/iter_0000100/run_state.pt                  rank 0 only: format tag, iteration, layout (TP, PP, DP),
                                                    scheduler state and the loop's `extra` (consumed samples,
                                                    sampler and hook state, history); every rank reads it
    SAVE/iter_0000100/dist/                         megatron-core dist_checkpointing (torch_dist backend):
        metadata.json, common.pt, __*_*.distcp      model and optimizer as global tensors, each rank writing
                                                    its own shards (replicas written once)
    SAVE/iter_0000100/rng/tp{t}_pp{p}_dp{d}.pt      every rank's RNG states (Python, NumPy, torch, tracker)

Model and optimizer state are saved as global tensors (``sharded_state_dict()`` of the model chunks and of the
megatron optimizer), so a checkpoint saved with one TP/PP/DP layout loads into another: the weights, Adam's
moments and its step land in whatever shards the new layout has. RNG states are per rank and only restored
when the layout is unchanged (a warning says so otherwise), as Megatron-LM does. The distributed optimizer's
state is saved in megatron-core's ``dp_reshardable`` form: it resumes at any DP size but the same TP and PP
(a TP/PP change is refused with an error; see DIST_OPT_SHARDING for why).

The iteration directory is written under a temporary name and renamed once every rank has written, so a
crash mid-save never leaves a directory that looks complete.

``load_model_weights`` reads the model weights alone (any layout, as above) to start a new run from a saved
one: Megatron-LM's ``--pretrained-checkpoint`` with ``--finetune`` (``TrainConfig.pretrained_checkpoint``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from mates_megatron.runtime.optimizers import allocate_torch_adam_state, megatron_optimizers
from mates_megatron.runtime.rng import get_rng_state, set_rng_state

log = logging.getLogger("mates_megatron.checkpoint")

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT = "mates_megatron.dist_checkpointing.v1"
RUN_STATE = "run_state.pt"
DIST_DIR = "dist"
RNG_DIR = "rng"
# The distributed optimizer's state is saved in megatron-core's `dp_reshardable` form (Megatron-LM's default):
# each rank writes its own flat buffer shards, no gather; it reshards over data parallelism only. The forms
# that would reshard over TP/PP are unusable in megatron-core 0.16.1: `fully_reshardable` writes zeros over
# part of the state of every parameter past a gradient buffer's first bucket ("param range exceeds unpadded
# buffer ... padded with zeros", fixed upstream after 0.16.1 by Megatron-LM PR #5077; the embedding has a
# bucket of its own on the first pipeline stage, and large models always have several), and
# `fully_sharded_model_space` is refused by dist_checkpointing ("ShardedTensor.flattened_range is not
# supported").
DIST_OPT_SHARDING = "dp_reshardable"


def _layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_name() -> str:
    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    dp = parallel_state.get_data_parallel_rank()
    return f"tp{tp}_pp{pp}_dp{dp}.pt"


def _content_metadata(use_distributed_optimizer: bool) -> dict[str, Any]:
    """What `sharded_state_dict()` needs to know about the format (saved in the checkpoint, reused on load)."""
    metadata: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = DIST_OPT_SHARDING
    return metadata


def _process_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The content metadata with this process's data-parallel group added (a group cannot be saved in it)."""
    return {**metadata, "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def _model_key(i: int, model_chunks) -> str:
    return "model" if len(model_chunks) == 1 else f"model{i}"


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _model_sharded_state_dict(model_chunks, *, metadata: dict[str, Any]) -> dict[str, Any]:
    """Model chunks under 'model' ('model0', 'model1', ... with virtual pipelining)."""
    metadata = _process_metadata(metadata)
    state: dict[str, Any] = {}
    for i, chunk in enumerate(model_chunks):
        if len(model_chunks) > 1:
            parallel_state.set_virtual_pipeline_model_parallel_rank(i)
        state[_model_key(i, model_chunks)] = _unwrap(chunk).sharded_state_dict(metadata=metadata)
    return state


def _load_model_state(model_chunks, state: dict[str, Any]) -> None:
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(state[_model_key(i, model_chunks)])


def _sharded_state_dict(model_chunks, optimizer, *, metadata: dict[str, Any], is_loading: bool) -> dict:
    """Model chunks under 'model' ('model0', 'model1', ... with virtual pipelining) and the optimizer."""
    state = _model_sharded_state_dict(model_chunks, metadata=metadata)
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=_process_metadata(metadata)
    )
    return state


def _require_psutil() -> None:
    # megatron-core's torch_dist writer (FileSystemWriterAsync.write_preloaded_data) logs its memory use
    # with psutil in a forked writer process; without psutil that process dies before it reports and the
    # save waits forever on its queue. megatron-core does not declare the dependency.
    try:
        import psutil  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "saving a checkpoint with megatron-core's torch_dist backend needs psutil: pip install psutil"
        ) from e


@torch.no_grad()
def _load_optimizer(optimizer, state: dict, *, use_distributed_optimizer: bool) -> None:
    """optimizer.load_state_dict, with a way around megatron-core's torch-Adam gap in the distributed optimizer.

    Without apex/TE the inner optimizer is torch Adam, whose state holds a per-parameter "step". megatron-core
    saves that step once (in the param groups) and its reshardable loaders skip it in the loaded tensors,
    but DistributedOptimizer._set_main_param_and_optimizer_states then copies every key of the live state,
    "step" included (`dst_tensors[key].copy_(tensors[key])`: KeyError 'step', distrib_optimizer.py in
    megatron-core 0.16.1). So: load the common part (param groups, step), then the parameter state with the
    step set aside, then put the step back.

    no_grad: with fp32 parameters the distributed optimizer's main parameters are views of the model's, and
    load_parameter_state_from_dp_reshardable copies into them in place ("a view of a leaf Variable that
    requires grad is being used in an in-place operation" without it).
    """
    from megatron.core.optimizer import distrib_optimizer

    opts = megatron_optimizers(optimizer)
    if not use_distributed_optimizer or getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        optimizer.load_state_dict(state)
        return
    states = [state] if len(opts) == 1 else [state[i] for i in range(len(opts))]
    for o, st in zip(opts, states, strict=True):
        st = dict(st)
        param_state = st.pop("param_state")
        sharding = st.pop("param_state_sharding_type")
        if sharding != DIST_OPT_SHARDING:
            raise ValueError(
                f"distributed-optimizer state saved as {sharding!r}; this version reads {DIST_OPT_SHARDING!r}"
            )
        o.load_state_dict(st)
        steps = {p: ps.pop("step") for p, ps in o.optimizer.state.items() if "step" in ps}
        try:
            o.load_parameter_state_from_dp_reshardable(param_state)
        finally:
            # One tensor per parameter: load_state_dict gives every parameter the SAME step tensor, and
            # torch Adam's foreach path increments each listed step in place, so a shared one would advance
            # once per parameter per step (wrong bias correction from the first step after the resume).
            for p, step in steps.items():
                o.optimizer.state[p]["step"] = step.detach().clone()
    if len(opts) > 1:
        optimizer._synchronize_steps()


def _dist_load(state: dict, dist_dir: str) -> dict:
    return dist_checkpointing.load(
        state,
        dist_dir,
        sharded_strategy=dist_checkpointing.serialization.get_default_load_sharded_strategy(dist_dir),
    )


def _warn_reshaped(state: dict, dist_dir: str) -> None:
    """Log the model tensors whose global shape differs from the saved one (rank 0).

    megatron-core marks the vocabulary-parallel embedding and output layer `allow_shape_mismatch`: the
    padded vocabulary is a multiple of make_vocab_size_divisible_by x TP, so it can change with TP, and the
    load then zero-fills or drops the padding rows. Training continues, but not exactly as the saved run
    would have (padding rows take part in the softmax).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(dist_dir)
    for t in nested_values(state):
        if not isinstance(t, ShardedTensor) or t.key.startswith("optimizer.") or t.key not in saved:
            continue
        if tuple(saved[t.key].global_shape) != tuple(t.global_shape):
            log.warning(
                "%s was saved with shape %s and loads into shape %s (rows zero-filled or dropped): the padded "
                "vocabulary differs (a multiple of make_vocab_size_divisible_by x TP); choose the vocabulary "
                "size or make_vocab_size_divisible_by so that both layouts pad alike to continue exactly",
                t.key,
                tuple(saved[t.key].global_shape),
                tuple(t.global_shape),
            )


def latest_iteration(load_dir: str | Path) -> int | None:
    """The iteration recorded in the tracker file, or None when the directory holds no checkpoint."""
    tracker = Path(load_dir) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} holds {text!r}, not an iteration number; fix or delete the file")
    return int(text)


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    *,
    model_chunks,
    optimizer,
    scheduler,
    extra: dict[str, Any],
    use_distributed_optimizer: bool,
) -> Path:
    """Save the run at `iteration`; collective over the world group. Returns the iteration directory.

    `extra` and the scheduler state are the same on every rank: rank 0 writes them once.
    """
    _require_psutil()
    save_dir = Path(save_dir)
    final = save_dir / f"iter_{iteration:07d}"
    tmp = save_dir / f".tmp_iter_{iteration:07d}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / DIST_DIR).mkdir(parents=True)
        (tmp / RNG_DIR).mkdir()
    dist.barrier()
    metadata = _content_metadata(use_distributed_optimizer)
    state = _sharded_state_dict(model_chunks, optimizer, metadata=metadata, is_loading=False)
    dist_checkpointing.save(
        state,
        str(tmp / DIST_DIR),
        sharded_strategy=dist_checkpointing.serialization.get_default_save_sharded_strategy("torch_dist"),
        content_metadata=metadata,
    )
    torch.save({"layout": _layout(), "rng": get_rng_state()}, tmp / RNG_DIR / _rng_name())
    if rank == 0:
        run_state = {
            "format": FORMAT,
            "iteration": iteration,
            "layout": _layout(),
            "use_distributed_optimizer": use_distributed_optimizer,
            "scheduler": scheduler.state_dict(),
            "extra": extra,
        }
        torch.save(run_state, tmp / RUN_STATE)
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = save_dir / (TRACKER + ".tmp")
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, save_dir / TRACKER)
    dist.barrier()
    return final


def _read_run_state(it_dir: Path) -> dict[str, Any]:
    path = it_dir / RUN_STATE
    if not path.is_file():
        if not it_dir.is_dir():
            raise FileNotFoundError(
                f"{it_dir} not found although {it_dir.parent / TRACKER} names it: the checkpoint directory "
                "is incomplete; fix the tracker file to name an iteration that exists, or delete it"
            )
        if any(it_dir.glob("mp_rank_*")):
            raise ValueError(
                f"{it_dir} was written by the old per-shard checkpoint format (mp_rank_*/model_optim_rng.pt), "
                "which this version cannot read: resume with the mates-megatron release that wrote it, or "
                "start the run again"
            )
        raise FileNotFoundError(f"{path} not found: {it_dir} is not a complete mates-megatron checkpoint")
    run_state = torch.load(path, map_location="cpu", weights_only=False)
    if run_state.get("format") != FORMAT:
        raise ValueError(
            f"{path} has format {run_state.get('format')!r}, this version reads {FORMAT!r}: resume with the "
            "mates-megatron release that wrote it"
        )
    return run_state


def load_checkpoint(
    load_dir: str | Path,
    *,
    model_chunks,
    optimizer,
    scheduler,
    use_distributed_optimizer: bool,
    iteration: int | None = None,
) -> tuple[int, dict[str, Any]] | None:
    """Restore the latest (or the given) checkpoint in place; returns (iteration, extra) or None if none.

    The model and optimizer load into this run's TP/PP/DP layout whatever layout saved them; RNG states are
    restored only when the layout is the same.
    """
    if iteration is None:
        iteration = latest_iteration(load_dir)
        if iteration is None:
            return None
    it_dir = Path(load_dir) / f"iter_{iteration:07d}"
    run_state = _read_run_state(it_dir)
    if run_state["use_distributed_optimizer"] != use_distributed_optimizer:
        raise ValueError(
            f"checkpoint {it_dir} was saved with use_distributed_optimizer="
            f"{run_state['use_distributed_optimizer']}, this run has {use_distributed_optimizer}: their "
            "optimizer states are stored differently; resume with the same use_distributed_optimizer"
        )
    saved_layout, layout = run_state["layout"], _layout()
    model_parallel = ("tp", "pp")
    if use_distributed_optimizer and any(saved_layout[k] != layout[k] for k in model_parallel):
        raise ValueError(
            f"checkpoint {it_dir} was saved with the distributed optimizer at TP={saved_layout['tp']}, "
            f"PP={saved_layout['pp']}; this run has TP={layout['tp']}, PP={layout['pp']}. The distributed "
            f"optimizer's checkpoint ({DIST_OPT_SHARDING}) reshards over data parallelism only: resume with "
            "the same TP and PP (any DP), or save without use_distributed_optimizer to change TP/PP"
        )
    dist_dir = str(it_dir / DIST_DIR)
    metadata = dist_checkpointing.load_content_metadata(dist_dir)
    if use_distributed_optimizer:
        allocate_torch_adam_state(optimizer)
    state = _sharded_state_dict(model_chunks, optimizer, metadata=metadata, is_loading=True)
    if saved_layout != layout and dist.get_rank() == 0:
        _warn_reshaped(state, dist_dir)
    state = _dist_load(state, dist_dir)
    _load_model_state(model_chunks, state)
    _load_optimizer(optimizer, state["optimizer"], use_distributed_optimizer=use_distributed_optimizer)
    scheduler.load_state_dict(run_state["scheduler"])
    if saved_layout == layout:
        rng = torch.load(it_dir / RNG_DIR / _rng_name(), map_location="cpu", weights_only=False)
        set_rng_state(rng["rng"])
    elif dist.get_rank() == 0:
        log.warning(
            "checkpoint %s was saved with layout %s, this run has %s: model and optimizer state were "
            "resharded, but the per-rank RNG states cannot map to the new ranks and were NOT loaded "
            "(dropout and other random draws continue from this run's seed, not the saved streams)",
            it_dir,
            saved_layout,
            layout,
        )
    return iteration, run_state["extra"]


def load_model_weights(load_dir: str | Path, *, model_chunks, optimizer=None) -> int:
    """Load the model weights alone of the latest checkpoint in `load_dir`; returns its iteration.

    Megatron-LM's ``--pretrained-checkpoint`` with ``--finetune``: nothing else of the saved run is read
    (optimizer, scheduler, iteration, consumed samples, sampler and hook state, RNG all stay as this run
    built them). The weights load into this run's TP/PP/DP layout whatever layout saved them, with or
    without the distributed optimizer. Collective over the world group. Give the `optimizer` when it keeps
    main (fp32) copies of the parameters (bf16 training): they are refreshed from the loaded weights, as
    Megatron-LM does, or its first step would start from the initial weights.
    """
    iteration = latest_iteration(load_dir)
    if iteration is None:
        missing = "" if Path(load_dir).is_dir() else "; the directory does not exist"
        raise FileNotFoundError(
            f"pretrained_checkpoint {load_dir} holds no checkpoint (no {TRACKER} in it{missing}): set it to "
            f"the `save` directory of the run to start from (the one holding {TRACKER} and iter_*/), or "
            "unset pretrained_checkpoint to start from freshly initialised weights"
        )
    it_dir = Path(load_dir) / f"iter_{iteration:07d}"
    saved_layout = _read_run_state(it_dir)["layout"]  # also: a complete checkpoint of this format
    dist_dir = str(it_dir / DIST_DIR)
    state = _model_sharded_state_dict(
        model_chunks, metadata=dist_checkpointing.load_content_metadata(dist_dir)
    )
    if saved_layout != _layout() and dist.get_rank() == 0:
        _warn_reshaped(state, dist_dir)
    # The checkpoint's optimizer tensors are not asked for: the default strictness ignores them.
    state = _dist_load(state, dist_dir)
    _load_model_state(model_chunks, state)
    if optimizer is not None:
        optimizer.reload_model_params()
    return iteration
