"""The plugin in one Megatron-LM process: built with the train loader, called at every step end, and saved
beside every checkpoint (Megatron-LM's checkpoint has no slot for it).

The plugin state (published selections still to serve, round records, the scorer's state such as the
influence model) is the same on every rank: every rank publishes the same selection, and MatesSampler's
state holds no per-rank field (positions map to ids whatever the data-parallel rank). So one rank writes
``iter_NNNNNNN/mates_state.pt`` and every rank reads it; a run may resume on another number of ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mates_megatron import configio
from mates_megatron.config import SelectionConfig
from mates_megatron.files import atomic_path
from mates_megatron.integrations.megatron_lm.host import MegatronLMHost

if TYPE_CHECKING:
    from mates_megatron.plugin import Plugin

log = logging.getLogger("mates_megatron.integrations.megatron_lm")

STATE_FORMAT = 2
"""1: one file per rank (mates_state_rankNNNNN.pt), up to the plugin-as-components rewrite; 2: one file."""
STATE_FILE = "mates_state.pt"
# Fields that fix which samples the run trains on; a resumed run must keep them.
_RESUME_FIXED = (
    "pool",
    "pool_options",
    "select_every",
    "selection_ratio",
    "selector",
    "selector_options",
    "scorer",
    "seed",
)


@dataclasses.dataclass
class MatesState:
    """The plugin's objects in one Megatron-LM process (built with the first train data loader)."""

    sel: SelectionConfig
    plugin: Plugin
    """Built by ``mates_megatron.plugin.build_plugin``: pool, rounds, sampler, hook."""
    host: MegatronLMHost
    """What the round reads of Megatron-LM's live job (updated at every step end)."""
    global_batch_size: int
    """--global-batch-size (fixed under --mates)."""


_STATE: MatesState | None = None


def set_mates_state(state: MatesState | None) -> None:
    """Install (or clear) this process's plugin state; Megatron-LM runs have one per process."""
    global _STATE
    _STATE = state


def get_mates_state() -> MatesState:
    if _STATE is None:
        raise RuntimeError(
            "--mates is on but no MATES train data loader was built in this process: the patched "
            "build_train_valid_test_data_loaders builds it on every rank (apply the patch; keep "
            "train_valid_test_datasets_provider.is_distributed = True)"
        )
    return _STATE


def mates_step_end(iteration: int, model, optimizer, opt_param_scheduler) -> None:
    """The call point: after every ``train_step`` (``iteration`` already incremented), on every rank.

    It reads no training metric: the round reads the live model, and a loss read on the host is a device sync.
    """
    state = get_mates_state()
    host = state.host.step(model, optimizer, opt_param_scheduler)
    state.plugin.hook.on_step_end(host, iteration, {})
    if iteration % state.sel.select_every == 0:
        # Release served rounds: Megatron's loader never rewinds (MatesSampler keeps current and later).
        sampler = state.plugin.sampler
        sampler.consumed_samples = iteration * state.global_batch_size
        sampler.load_state_dict(sampler.state_dict())


# -- beside the checkpoint ----------------------------------------------------------------------------------


def mates_state_dict(iteration: int) -> dict[str, Any]:
    """The plugin state at ``iteration`` (the same on every rank)."""
    state = get_mates_state()
    sampler = state.plugin.sampler
    sampler.consumed_samples = iteration * state.global_batch_size
    return {
        "format": STATE_FORMAT,
        "iteration": iteration,
        "selection": dataclasses.asdict(state.sel),
        "sampler": sampler.state_dict(),
        "hook": state.plugin.hook.state_dict(),
    }


def load_mates_state_dict(st: dict[str, Any]) -> None:
    state = get_mates_state()
    if st.get("format") != STATE_FORMAT:
        raise ValueError(f"MATES state format {st.get('format')}; this plugin reads format {STATE_FORMAT}")
    now = dataclasses.asdict(state.sel)
    with warnings.catch_warnings():  # a state file of an earlier release: our own spelling, moved silently
        warnings.simplefilter("ignore", FutureWarning)
        saved = configio.normalize(SelectionConfig, st["selection"], where="the saved MATES state")
    for key in _RESUME_FIXED:
        was = saved.get(key, {} if key.endswith("_options") else None)
        if was != now[key]:
            raise ValueError(
                f"the checkpoint was trained with --mates-{key.replace('_', '-')} {was}, "
                f"this run has {now[key]}: the sample sequence would change; resume with the same value"
            )
    state.plugin.sampler.load_state_dict(st["sampler"])
    state.plugin.hook.load_state_dict(st["hook"])


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def mates_state_path(checkpoint_dir: str | Path, iteration: int, *, release: bool = False) -> Path:
    """``DIR/iter_NNNNNNN/mates_state.pt`` (Megatron-LM's iteration directory name)."""
    sub = "release" if release else f"iter_{iteration:07d}"
    return Path(checkpoint_dir) / sub / STATE_FILE


def save_mates_state(save_dir: str | Path, iteration: int, *, release: bool = False) -> Path | None:
    """Write the plugin state beside Megatron-LM's checkpoint (on the writer rank only; atomic rename).

    Called on every rank by the patched ``save_checkpoint``; returns the path (None without a plugin yet).
    """
    if _STATE is None:  # e.g. a checkpoint written before the data loaders exist (MoE upcycling)
        log.warning("no MATES state yet at iteration %d: the checkpoint carries none", iteration)
        return None
    path = mates_state_path(save_dir, iteration, release=release)
    _STATE.plugin.hook.settle()  # on every rank: a round probed ahead finishes and its selection is saved
    if _rank() == _STATE.plugin.hook.state_rank:  # the rank whose state holds the influence model
        with atomic_path(path) as tmp:
            torch.save(mates_state_dict(iteration), tmp)
    else:  # what mates_state_dict does to the sampler, so that every rank stays alike
        _STATE.plugin.sampler.consumed_samples = iteration * _STATE.global_batch_size
    return path


def load_mates_state(load_dir: str | Path, iteration: int, *, release: bool = False) -> Path:
    """Restore the plugin state saved with the checkpoint at ``iteration`` (every rank reads the one file)."""
    path = mates_state_path(load_dir, iteration, release=release)
    if not path.is_file():
        old = sorted(path.parent.glob("mates_state_rank*.pt"))
        if old:
            raise ValueError(
                f"{path.parent} holds MATES state in the old per-rank format ({old[0].name}, ...), written by "
                f"an earlier mates-megatron; this version reads one {STATE_FILE}. Resume with the version that "
                "wrote the checkpoint, or start the selection afresh from a checkpoint saved without --mates"
            )
        raise FileNotFoundError(
            f"{path} not found: the checkpoint at iteration {iteration} has no MATES state. It is written "
            "beside every checkpoint saved with --mates by the patched save_checkpoint; resume from such a "
            "checkpoint"
        )
    load_mates_state_dict(torch.load(path, map_location="cpu", weights_only=False))
    return path


# -- Megatron-LM edge (reads its global state) -------------------------------------------------------------


def mates_train_data_loader(train_ds, consumed_samples: int):
    """Replaces ``build_pretraining_data_loader(train_ds, consumed_samples)`` under ``--mates``.

    The first call in a process builds the plugin (pool, sampler, hook) and the host (reference set loaded
    once) and, on resume, loads the plugin state from ``--load``; later calls (one per virtual pipeline
    stage) reuse them.
    """
    from megatron.core import parallel_state as mpu
    from megatron.training import get_args
    from megatron.training.dist_signal_handler import DistributedSignalHandler

    from mates_megatron.cost import Layout, TransformerShape
    from mates_megatron.integrations.megatron_lm.args import mates_config_from_args
    from mates_megatron.integrations.megatron_lm.host import (
        MegatronTextTokenizer,
        megatron_lm_host,
        megatron_tokenizer,
    )
    from mates_megatron.integrations.megatron_lm.loader import build_mates_data_loader
    from mates_megatron.integrations.megatron_lm.versions import check_megatron_core_version

    args = get_args()
    sel = mates_config_from_args(args)
    if sel is None:
        raise ValueError("mates_train_data_loader is for --mates runs")
    check_megatron_core_version()
    worker_init_fn = None
    if args.exit_signal_handler and args.num_workers > 0:

        def worker_init_fn(_):
            DistributedSignalHandler(args.exit_signal).__enter__()

    common = {
        "train_iters": args.train_iters,
        "global_batch_size": args.global_batch_size,
        "micro_batch_size": args.micro_batch_size,
        "seq_length": args.seq_length,
        "consumed_samples": consumed_samples,
        "dp_rank": mpu.get_data_parallel_rank(),
        "dp_size": mpu.get_data_parallel_world_size(),
        "num_workers": args.num_workers,
        "pin_memory": True,
        "worker_init_fn": worker_init_fn,
    }
    if _STATE is not None:
        loader, _ = build_mates_data_loader(sel, train_ds, plugin=_STATE.plugin, **common)
        return loader
    decode = sel.needs_text_decoding
    text_tok = MegatronTextTokenizer(megatron_tokenizer(args)) if decode or args.mates_reference else None
    host = megatron_lm_host(args, reference_tokenizer=text_tok)
    loader, plugin = build_mates_data_loader(
        sel,
        train_ds,
        tokenizer=text_tok if decode else None,
        device=host.device,
        write_files=_rank() == 0,
        # validate_args has set ffn_hidden_size, and the tokenizer build padded_vocab_size, by now.
        model_shape=TransformerShape(
            args.num_layers,
            args.hidden_size,
            args.ffn_hidden_size,
            args.padded_vocab_size,
            num_attention_heads=args.num_attention_heads,
            tied_embeddings=not args.untie_embeddings_and_output_weights,
            position_embeddings=args.max_position_embeddings
            if args.position_embedding_type == "learned_absolute"
            else 0,
        ),
        layout=Layout(
            dp=mpu.get_data_parallel_world_size(),
            tp=args.tensor_model_parallel_size,
            pp=args.pipeline_model_parallel_size,
            micro_batch_size=args.micro_batch_size,
            distributed_optimizer=args.use_distributed_optimizer,
            bf16=args.bf16,
        ),
        reference_rows=len(host.reference) if host.reference is not None else 0,
        **common,
    )
    set_mates_state(MatesState(sel=sel, plugin=plugin, host=host, global_batch_size=args.global_batch_size))
    if args.load and args.iteration > 0:
        path = load_mates_state(args.load, args.iteration)
        log.info("loaded MATES state from %s", path)
    return loader
