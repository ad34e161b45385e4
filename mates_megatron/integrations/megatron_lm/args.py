"""The ``--mates-*`` arguments of Megatron-LM and the one edge that turns them into a SelectionConfig.

``add_mates_args(parser)`` is an ``extra_args_provider``: ``--mates`` switches the plugin on, ``--mates-config
YAML`` gives a SelectionConfig mapping, ``--mates-reference JSONL`` the reference set, and one
``--mates-<field>`` / ``--mates-<section>-<field>`` flag per config field (``dataclass_flags``)
overrides the file. ``mates_config_from_args(args)`` builds the config through ``configio.build``, the same
coercion and validation as ``mates-megatron pretrain`` and its YAML.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mates_megatron import configio
from mates_megatron.config import SelectionConfig, selection_flags
from mates_megatron.flags import Flag, add_flags, given_paths, overrides_from_args
from mates_megatron.probe.settings import Refusal, Spelling, check_probe_settings

PREFIX = "--mates-"
OWN_FLAGS = ("--mates", "--mates-config", "--mates-reference")


def mates_flags() -> list[Flag]:
    """Every ``--mates-<field>`` flag of SelectionConfig and of the 'mates' scorer's options (nested sections as
    ``--mates-<section>-<field>``)."""
    flags = selection_flags(PREFIX)
    clash = [f.flag for f in flags if f.flag in OWN_FLAGS]
    if clash:
        raise TypeError(f"SelectionConfig fields would take the integration's own flags {clash}: rename them")
    return flags


def add_mates_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the "mates" argument group. Returns the parser.

    Every field flag defaults to None so that a flag given on the command line can be told from one left
    out: left-out fields come from ``--mates-config``, else from the dataclass default.
    """
    g = parser.add_argument_group("mates", "MATES model-aware data selection (mates_megatron)")
    g.add_argument("--mates", action="store_true", help="Train on MATES selections (off: Megatron's order).")
    g.add_argument(
        "--mates-config",
        type=str,
        default=None,
        metavar="YAML",
        help="SelectionConfig as YAML: a top-level mapping or a 'selection:' key; flags override it.",
    )
    g.add_argument(
        "--mates-reference",
        type=str,
        default=None,
        metavar="JSONL",
        help='Reference set (e.g. LAMBADA): {"context", "target"} or {"text"} lines, in the '
        "pretraining tokenizer's text. Needed by scorers that read it (mates).",
    )
    add_flags(g, mates_flags())
    return parser


def mates_config_from_args(args: argparse.Namespace) -> SelectionConfig | None:
    """The SelectionConfig of the ``--mates-*`` arguments (None without ``--mates``).

    Precedence: a flag given on the command line, then ``--mates-config``, then the dataclass default. An
    invalid value raises ValueError naming the field, its value and the flag that sets it. When ``args`` is
    a training run's (Megatron-LM's: it has ``train_iters``), its arguments are checked against the
    selection too (rounds counted in steps, a fixed batch size, a reference set for scorers that read it, none
    of the settings a probe on the live model cannot run under: ``probe.settings``).
    """
    if not getattr(args, "mates", False):
        return None
    flags = mates_flags()
    cfg_path = getattr(args, "mates_config", None)
    data: dict[str, Any] = {}
    if cfg_path:
        where = f"--mates-config {cfg_path}"
        data = configio.load_yaml(cfg_path, section="selection", where=where)
        data = configio.normalize(SelectionConfig, data, where=where)  # before flags are laid over it
    overrides = overrides_from_args(args, flags)
    given, in_file = set(given_paths(overrides)), set(given_paths(data))

    def source(f: Flag) -> str:  # where a field's value came from, for error messages
        if f.path in given:
            return f.flag
        return f"{f.flag}; from {cfg_path}" if f.path in in_file else f"{f.flag}; default"

    sources = {f.path: source(f) for f in flags}
    where = f"--mates-config {cfg_path}" if cfg_path else "--mates arguments"
    sel = configio.build(SelectionConfig, configio.merge(data, overrides), where=where, sources=sources)
    _check_megatron_args(sel, args)
    return sel


def mates_train_valid_test_num_samples(args: argparse.Namespace, num_samples) -> tuple:
    """Megatron-LM's (train, valid, test) sample counts with the train split grown to the candidate pool."""
    from mates_megatron.plugin import pool_num_samples

    sel = mates_config_from_args(args)
    if sel is None or not sel.pool_is_host_dataset:
        return tuple(num_samples)
    need = pool_num_samples(sel, train_iters=args.train_iters, global_batch_size=args.global_batch_size)
    train = num_samples[0]
    return (need if train is None else max(int(train), need), *tuple(num_samples)[1:])


def _check_megatron_args(sel: SelectionConfig, args: argparse.Namespace) -> None:
    """Megatron-LM arguments that MATES cannot serve, each refused with the fix.

    Only for a training run's namespace (one with ``train_iters``), and only the arguments it has.
    """
    if "train_iters" not in args.__dict__:
        return
    has = args.__dict__.get
    if has("train_samples"):
        raise ValueError(
            f"--train-samples {args.train_samples}: MATES rounds are counted in steps "
            "(--mates-select-every); give --train-iters instead"
        )
    if not has("train_iters"):
        raise ValueError("--mates needs --train-iters: rounds and the candidate pool are sized from it")
    if has("rampup_batch_size"):
        raise ValueError(
            "--rampup-batch-size: a MATES round is select_every x global_batch_size samples, so the global "
            "batch size must stay fixed; drop --rampup-batch-size"
        )
    if has("global_batch_size") is not None and args.global_batch_size < 1:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be positive")
    if has("iterations_to_skip"):
        raise ValueError(
            "--iterations-to-skip: a skipped iteration would skip its MATES round boundary; drop it with --mates"
        )
    if has("phase_transition_iterations"):
        raise ValueError("--phase-transition-iterations is not supported with --mates (one phase, one pool)")
    if has("dataloader_type") not in (None, "single"):
        raise ValueError(
            f"--dataloader-type {args.dataloader_type}: MATES serves its own sample order; "
            "use --dataloader-type single"
        )
    if has("non_persistent_save_interval"):
        raise ValueError(
            f"--non-persistent-save-interval {args.non_persistent_save_interval}: MATES state (the rounds, the "
            "sampler's position, the influence model) is saved with persistent checkpoints in --save only, and a "
            "resume from a non-persistent one would serve other batches; drop it and use --save-interval"
        )
    if not sel.scored:
        return
    if sel.warmup_steps >= args.train_iters:
        raise ValueError(
            f"--mates-warmup-steps {sel.warmup_steps} >= --train-iters {args.train_iters}: scorer "
            f"{sel.scorer!r} would never score a round; lower --mates-warmup-steps or train longer"
        )
    if sel.needs_reference:
        if "mates_reference" in args.__dict__ and not has("mates_reference"):
            raise ValueError(
                f"--mates-scorer {sel.scorer} scores candidates by their influence on a reference set: "
                "give --mates-reference PATH (e.g. LAMBADA as JSONL)"
            )
        if has("mates_reference") and not Path(args.mates_reference).is_file():
            raise ValueError(f"--mates-reference {args.mates_reference}: no such file")
    check_probe_settings(sel, vars(args), _probe_spelling(sel))


# Megatron-LM's flags whose attribute is not their own name (core_v0.16.1 and core_v0.19.0 alike).
_FLAGS = {"fp8": "--fp8-format", "fp4": "--fp4-format"}
# validate_args derives virtual_pipeline_model_parallel_size (the schedule reads it) from these flags.
_VPP_FLAGS = (
    "--num-layers-per-virtual-pipeline-stage, --num-virtual-stages-per-pipeline-rank or "
    "--pipeline-model-parallel-layout"
)


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _setting(r: Refusal, value: Any) -> str:
    if r.name == "virtual_pipeline_model_parallel_size":
        return f"{r.name} {value} (from {_VPP_FLAGS})"
    return _flag(r.name) if value is True else f"{_flag(r.name)} {value}"


def _fix(r: Refusal) -> str:
    if r.name == "virtual_pipeline_model_parallel_size":
        return "drop those flags"
    if r.name == "cuda_graph_impl":  # validate_args turns the older spellings into it
        return "use --cuda-graph-impl none (and neither --enable-cuda-graph nor --external-cuda-graph)"
    return f"drop {_flag(r.name)}" if r.accepted in (False, None) else f"use {_flag(r.name)} {r.accepted}"


def _probe_spelling(sel: SelectionConfig) -> Spelling:
    """Megatron-LM's arguments as its users write them, for the refusals of ``probe.settings``."""
    return Spelling(scorer=f"--mates-scorer {sel.scorer}", setting=_setting, fix=_fix)
