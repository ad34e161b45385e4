"""Megatron-LM integration: ``--mates-*`` arguments, the MATES train data loader, the step-end call point.

How the pieces plug into Megatron-LM's ``pretrain()`` (``pretrain_gpt.py``):

- ``add_mates_args(parser)`` is an ``extra_args_provider``: ``--mates`` switches the plugin on,
  ``--mates-config YAML`` gives a ``SelectionConfig`` mapping, ``--mates-reference JSONL`` the reference set,
  and one ``--mates-<field>`` / ``--mates-influence-<field>`` flag per config field overrides the file.
  ``mates_config_from_args(args)`` is the one edge that turns them into a typed ``SelectionConfig``.
- ``mates_train_valid_test_num_samples`` sizes the train split as the candidate pool (1/selection_ratio x
  the samples trained on); ``mates_train_data_loader(train_ds, consumed_samples)`` replaces
  ``build_pretraining_data_loader`` for the train split: ``MatesSampler`` serves each round's selection.
- ``mates_step_end(iteration, model, optimizer, opt_param_scheduler)`` runs after every ``train_step``:
  at a round boundary the ``MatesHook`` probes the live model (``MegatronLMRun.probe_context``), fits the
  influence model, scores the next round's candidates and publishes its selection.
- ``save_mates_state`` / ``load_mates_state`` keep the plugin's state (published selections, influence
  model, round records) in ``iter_NNNNNNN/mates_state_rankNNNNN.pt`` beside each checkpoint, since
  Megatron-LM's checkpoint has no slot for it. Loading happens when the loader is built on resume.

Why a patch (``patches/megatron-lm-core_v0.16.1-mates.patch``): Megatron-LM has no training-loop callback,
no way to replace the train data loader or to size the train split from ``pretrain()``'s arguments, no
plugin slot in ``save_checkpoint``, and ``pretrain_gpt.py`` hard-codes its ``extra_args_provider`` and builds
datasets only on the first/last pipeline stage of tensor rank 0, while the probes run the model (and need
its samples) on every rank. Each hunk is a guarded call into this module.

This module imports without Megatron-LM's ``megatron.training`` (only megatron-core is needed); the few
functions that read Megatron-LM's global state import it when called.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import math
import os
import re
import textwrap
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mates_megatron.config import SelectionConfig
from mates_megatron.influence.model import InfluenceConfig

log = logging.getLogger("mates_megatron.integrations.megatron_lm")

STATE_FORMAT = 1
# Fields that fix which samples the run trains on; a resumed run must keep them.
_RESUME_FIXED = ("pool", "shards", "select_every", "selection_ratio", "selector", "temperature", "seed")


# -- arguments ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatesFlag:
    """One ``--mates-*`` flag and the config field it sets."""

    flag: str
    """Command-line spelling, e.g. ``--mates-select-every``."""
    dest: str
    """argparse destination, e.g. ``mates_select_every``."""
    path: tuple[str, ...]
    """Field path in SelectionConfig: ``("select_every",)`` or ``("influence", "lr")``."""
    kind: type
    """Item type: int, float, str or bool."""
    many: bool
    """A list/tuple field (``nargs='+'``)."""
    optional: bool
    """The field accepts None."""
    default: Any
    """The dataclass default."""
    doc: str
    """The field's docstring (``--help``)."""


def _field_docs(cls) -> dict[str, str]:
    """Docstrings under dataclass fields (not kept at run time, so read from the source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unpack_type(tp) -> tuple[type, bool, bool]:
    """(item type, many, optional) of a field annotation such as ``list[int] | None``."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(members) < len(typing.get_args(tp))
        if len(members) != 1:
            raise TypeError(f"unsupported field type {tp}")
        tp = members[0]
    many = typing.get_origin(tp) in (list, tuple)
    if many:
        tp = typing.get_args(tp)[0]
    if tp not in (int, float, str, bool):
        raise TypeError(f"unsupported field type {tp}")
    return tp, many, optional


def _flags_of(cls, prefix: str, path: tuple[str, ...]) -> list[MatesFlag]:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    out: list[MatesFlag] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(tp):
            out += _flags_of(tp, f"{prefix}{f.name.replace('_', '-')}-", (*path, f.name))
            continue
        kind, many, optional = _unpack_type(tp)
        flag = f"{prefix}{f.name.replace('_', '-')}"
        out.append(
            MatesFlag(
                flag=flag,
                dest=flag.lstrip("-").replace("-", "_"),
                path=(*path, f.name),
                kind=kind,
                many=many,
                optional=optional,
                default=default,
                doc=docs.get(f.name, ""),
            )
        )
    return out


def mates_flags() -> list[MatesFlag]:
    """Every ``--mates-<field>`` flag: SelectionConfig's fields, then ``--mates-influence-<field>``."""
    flags = _flags_of(SelectionConfig, "--mates-", ())
    seen: dict[str, MatesFlag] = {}
    for f in flags:
        if f.flag in seen or f.flag in ("--mates-config", "--mates-reference"):
            raise TypeError(
                f"two settings would share the flag {f.flag} (field {'.'.join(f.path)}): rename one"
            )
        seen[f.flag] = f
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
        "pretraining tokenizer's text. Needed by every selector but random.",
    )
    for f in mates_flags():
        shown = " ".join(map(str, f.default)) if f.many and f.default else f.default
        help_ = f"{f.doc} [default: {shown}]".replace("%", "%%").strip()
        if f.kind is bool:
            g.add_argument(
                f.flag, dest=f.dest, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        else:
            g.add_argument(
                f.flag,
                dest=f.dest,
                type=f.kind,
                default=None,
                nargs="+" if f.many else None,
                metavar=f.kind.__name__.upper(),
                help=help_,
            )
    return parser


def load_selection_mapping(path: str | Path) -> dict[str, Any]:
    """The SelectionConfig mapping of a YAML file: its ``selection:`` key if present, else the whole file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--mates-config {path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--mates-config {path}: expected a mapping of SelectionConfig fields")
    if "selection" in data:
        data = data["selection"] or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"--mates-config {path}: 'selection' must be a mapping of SelectionConfig fields"
            )
    return dict(data)


def _scalar(flag: MatesFlag, value: Any, where: str) -> Any:
    k = flag.kind
    if k is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    ok = (
        (k is bool and isinstance(value, bool))
        or (k is int and isinstance(value, int) and not isinstance(value, bool))
        or (k is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (k is str and isinstance(value, str))
    )
    if not ok:
        raise ValueError(
            f"{where}={value!r} is not {'an' if k is int else 'a'} {k.__name__} (flag {flag.flag})"
        )
    return float(value) if k is float else value


def _coerce(flag: MatesFlag, value: Any, where: str) -> Any:
    if value is None:
        if flag.optional:
            return None
        raise ValueError(f"{where} is null; it takes {'a list of ' if flag.many else ''}{flag.kind.__name__}")
    if flag.many:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}={value!r} must be a list (flag {flag.flag} takes several values)")
        return [_scalar(flag, v, where) for v in value]
    return _scalar(flag, value, where)


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


def _blame(message: str, cls, prefix: tuple[str, ...], values, by_path) -> str:
    """The flags (and values) behind a dataclass error message, most specific match first."""
    names = [f.name for f in dataclasses.fields(cls)]
    hits = [n for n in names if re.search(rf"\b{cls.__name__}\.{n}\b", message)]
    hits = hits or [n for n in names if re.search(rf"(?<![\w.-]){n}\b", message)]
    parts = []
    for n in hits:
        flag = by_path.get((*prefix, n))
        if flag is None:
            continue
        if flag.path in values:
            value, where = values[flag.path]
            parts.append(f"{flag.flag} {_shown(value)}" + ("" if where == flag.flag else f" (from {where})"))
        else:
            parts.append(f"{flag.flag} (default {_shown(flag.default)})")
    return f"{', '.join(parts) or '--mates arguments'}: {message}"


def mates_config_from_args(args: argparse.Namespace) -> SelectionConfig | None:
    """The SelectionConfig of the ``--mates-*`` arguments (None without ``--mates``).

    Precedence: a flag given on the command line, then ``--mates-config``, then the dataclass default. Any
    invalid value raises ValueError naming the flag and the value. When ``args`` is a training run's
    (Megatron-LM's: it has ``train_iters``), its arguments are checked against the selection too (rounds
    counted in steps, a fixed batch size, a reference set for scored selectors, ...).
    """
    if not getattr(args, "mates", False):
        return None
    flags = mates_flags()
    by_path = {f.path: f for f in flags}
    values: dict[tuple[str, ...], tuple[Any, str]] = {}
    cfg_path = getattr(args, "mates_config", None)
    if cfg_path:
        data = load_selection_mapping(cfg_path)
        influence = data.pop("influence", None) or {}
        if not isinstance(influence, dict):
            raise ValueError(
                f"--mates-config {cfg_path}: 'influence' must be a mapping of InfluenceConfig fields"
            )
        for prefix, section in (((), data), (("influence",), influence)):
            for key, value in section.items():
                flag = by_path.get((*prefix, key))
                if flag is None:
                    known = sorted(".".join(p) for p in by_path if p[:-1] == prefix)
                    raise ValueError(
                        f"--mates-config {cfg_path}: unknown field {'.'.join((*prefix, key))!r}; known: {known}"
                    )
                where = f"{cfg_path}: {'.'.join(flag.path)}"
                values[flag.path] = (_coerce(flag, value, where), where)
    for f in flags:
        value = getattr(args, f.dest, None)
        if value is not None:
            values[f.path] = (value, f.flag)

    inf_kwargs = {p[1]: v for p, (v, _) in values.items() if p[0] == "influence"}
    try:
        influence_cfg = InfluenceConfig(**inf_kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(_blame(str(e), InfluenceConfig, ("influence",), values, by_path)) from e
    sel_kwargs = {p[0]: v for p, (v, _) in values.items() if len(p) == 1}
    try:
        sel = SelectionConfig(**sel_kwargs, influence=influence_cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(_blame(str(e), SelectionConfig, (), values, by_path)) from e
    _check_megatron_args(sel, args)
    return sel


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
    if has("non_persistent_ckpt_type") == "local":
        raise ValueError(
            "--non-persistent-ckpt-type local: MATES state is written beside checkpoints in --save; "
            "use global non-persistent checkpoints"
        )
    if not sel.scored:
        return
    if sel.warmup_steps >= args.train_iters:
        raise ValueError(
            f"--mates-warmup-steps {sel.warmup_steps} >= --train-iters {args.train_iters}: selector "
            f"{sel.selector!r} would never score a round; lower --mates-warmup-steps or train longer"
        )
    if "mates_reference" in args.__dict__ and not has("mates_reference"):
        raise ValueError(
            f"--mates-selector {sel.selector} scores candidates by their influence on a reference set: "
            "give --mates-reference PATH (e.g. LAMBADA as JSONL)"
        )
    if has("mates_reference") and not Path(args.mates_reference).is_file():
        raise ValueError(f"--mates-reference {args.mates_reference}: no such file")
    for name in ("overlap_grad_reduce", "overlap_param_gather"):
        if has(name):
            raise ValueError(
                f"--{name.replace('_', '-')}: MATES probes step one replica on one sample with the data-"
                "parallel gradient sync switched off, but overlapped communication is started from "
                f"backward/forward hooks; drop --{name.replace('_', '-')} with --mates-selector {sel.selector}"
            )


# -- data -------------------------------------------------------------------------------------------------


def pool_num_samples(sel: SelectionConfig, *, train_iters: int, global_batch_size: int) -> int:
    """Candidates the run needs: one pool slice of select_every x global_batch_size / ratio per round."""
    return math.ceil(train_iters / sel.select_every) * sel.candidates_per_round(global_batch_size)


def mates_train_valid_test_num_samples(args: argparse.Namespace, num_samples) -> tuple:
    """Megatron-LM's (train, valid, test) sample counts with the train split grown to the candidate pool."""
    sel = mates_config_from_args(args)
    if sel is None or sel.pool != "indexed":
        return tuple(num_samples)
    need = pool_num_samples(sel, train_iters=args.train_iters, global_batch_size=args.global_batch_size)
    train = num_samples[0]
    return (need if train is None else max(int(train), need), *tuple(num_samples)[1:])


class MegatronTextTokenizer:
    """A Megatron-LM tokenizer with the two calls the plugin makes on a pretraining tokenizer.

    ``tok(text, add_special_tokens=False)["input_ids"]`` (reference set) is Megatron's ``tokenize`` and
    ``tok.decode(ids)`` (candidate text for the influence model) its ``detokenize``. Megatron's
    ``tokenize`` adds whatever special tokens the tokenizer adds by default (none for GPT-NeoX).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(self.tokenizer.tokenize(text))}

    def decode(self, ids) -> str:
        return self.tokenizer.detokenize(list(ids))


class _PublishedRounds:
    """Batch sampler: MatesSampler's micro-batches from ``start`` to the end of the last published round.

    A torch DataLoader draws indices ahead of training (prefetch, workers); stopping where the published
    selections stop keeps it from asking for a round that the hook has not chosen yet.
    """

    def __init__(self, sampler, start: int) -> None:
        self.sampler, self.start = sampler, start

    def end(self) -> int:
        s = self.sampler
        published = set(s.published_rounds())
        r = s.round_of(self.start)
        while r in published:
            r += 1
        return min(s.total_samples, r * s.samples_per_round)

    def __iter__(self) -> Iterator[list[int]]:
        s = self.sampler
        chunk = s.micro_batch_size * s.data_parallel_size
        offset = s.data_parallel_rank * s.micro_batch_size
        for c in range(self.start, self.end() - chunk + 1, chunk):
            yield s.ids_at(np.arange(c + offset, c + offset + s.micro_batch_size)).tolist()

    def __len__(self) -> int:
        chunk = self.sampler.micro_batch_size * self.sampler.data_parallel_size
        return max(0, (self.end() - self.start) // chunk)


class MatesDataLoader:
    """Megatron-LM's train data loader over MatesSampler (what ``iter()`` gives is Megatron's iterator).

    Each stretch of published rounds is read through its own torch DataLoader (workers, pinning and
    collation as Megatron's); when it runs out at a round boundary, the next stretch starts from the sample
    position reached, which the hook has published by then (it runs at the end of the round's last step).
    """

    def __init__(
        self,
        dataset,
        sampler,
        *,
        consumed_samples: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn=None,
        worker_init_fn=None,
    ) -> None:
        self.dataset, self.sampler, self.consumed_samples = dataset, sampler, consumed_samples
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.collate_fn, self.worker_init_fn = collate_fn, worker_init_fn

    @property
    def chunk(self) -> int:
        return self.sampler.micro_batch_size * self.sampler.data_parallel_size

    def torch_loader(self, start: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=_PublishedRounds(self.sampler, start),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self.collate_fn,
            worker_init_fn=self.worker_init_fn,
        )

    def __iter__(self) -> Iterator:
        return _MatesBatches(self, self.consumed_samples)

    def __len__(self) -> int:
        """Micro-batches this rank has left to serve."""
        return max(0, (self.sampler.total_samples - self.consumed_samples) // self.chunk)


class _MatesBatches:
    def __init__(self, loader: MatesDataLoader, position: int) -> None:
        self.loader, self.position = loader, position
        self._it: Iterator | None = None

    def __iter__(self) -> _MatesBatches:
        return self

    def __next__(self):
        s = self.loader.sampler
        if self.position + self.loader.chunk > s.total_samples:
            raise StopIteration
        if self._it is None:
            self._it = iter(self.loader.torch_loader(self.position))
        try:
            batch = next(self._it)
        except StopIteration:
            # A round boundary: the hook has published the next round since this stretch began.
            self._it = iter(self.loader.torch_loader(self.position))
            try:
                batch = next(self._it)
            except StopIteration:
                from mates_megatron.pool.base import PoolError

                raise PoolError(
                    f"round {s.round_of(self.position)} has no published selection at sample "
                    f"{self.position}: mates_step_end(iteration, ...) must run after every train_step "
                    "(apply patches/megatron-lm-core_v0.16.1-mates.patch to Megatron-LM)"
                ) from None
        self.position += self.loader.chunk
        return batch


def _given_dataset(train_ds):
    def build(num_samples: int):
        if train_ds is None:
            raise ValueError(
                "MATES needs the train split on every rank (the probes run the model on every rank): "
                "Megatron-LM built none here; apply the patch's is_dataset_built_on_rank hunk"
            )
        if not getattr(train_ds, "dataset_path", None):
            raise ValueError(
                f"--mates-pool indexed wraps one GPTDataset, got {type(train_ds).__name__}: give a single "
                "--data-path prefix (a blend makes a BlendedDataset), or use --mates-pool webdataset"
            )
        if len(train_ds) < num_samples:
            raise ValueError(
                f"the train split has {len(train_ds)} samples, the MATES pool needs {num_samples} "
                "(train_iters / select_every rounds x select_every x global_batch_size / selection_ratio): "
                "build it with mates_train_valid_test_num_samples (the patch does)"
            )
        return train_ds

    return build


def build_mates_data_loader(
    sel: SelectionConfig,
    train_ds,
    *,
    train_iters: int,
    global_batch_size: int,
    micro_batch_size: int,
    seq_length: int,
    consumed_samples: int,
    dp_rank: int,
    dp_size: int,
    tokenizer=None,
    num_workers: int = 0,
    pin_memory: bool = False,
    write_files: bool = False,
    parts=None,
    worker_init_fn=None,
):
    """(MatesDataLoader, SelectionParts) for a Megatron-LM train split (``parts`` given: reuse them).

    pool='indexed' takes its candidates from ``train_ds`` (a GPTDataset at least ``pool_num_samples``
    long) and serves ``train_ds[id]`` as Megatron builds it; pool='webdataset' serves the shards and
    leaves ``train_ds`` unused. ``tokenizer`` decodes indexed candidates for the influence model.
    Collective when ``parts`` is None and the selector is scored (the influence group is created).
    """
    if parts is None:
        from mates_megatron.training.selection import build_selection

        parts = build_selection(
            sel,
            train_iters=train_iters,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            dp_rank=dp_rank,
            dp_size=dp_size,
            build_indexed_dataset=_given_dataset(train_ds),
            write_files=write_files,
            tokenizer=tokenizer,
        )
    loader = MatesDataLoader(
        train_ds if sel.pool == "indexed" else parts.pool,
        parts.sampler,
        consumed_samples=consumed_samples,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
    )
    return loader, parts


# -- the live run ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class MegatronLMRun:
    """What MatesHook reads of Megatron-LM's training state (``hooks.LiveRun``)."""

    model_chunks: list
    """Megatron-LM's model list (DDP-wrapped chunks)."""
    optimizer: Any
    """Megatron-LM's MegatronOptimizer."""
    scheduler: Any
    """Megatron-LM's OptimizerParamScheduler."""
    reference: list | None
    """The whole reference set as micro-batches (every replica evaluates all of it)."""
    seq_length: int
    device: torch.device
    distributed_optimizer: bool = False
    tensorboard_writer: Any = None
    wandb_writer: Any = None

    def probe_context(self):
        from mates_megatron.probe.estimators import ProbeContext

        if self.reference is None:
            raise ValueError("MATES probes need a reference set: give --mates-reference PATH")
        return ProbeContext(
            model_chunks=self.model_chunks,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            reference=self.reference,
            seq_length=self.seq_length,
            device=self.device,
            distributed_optimizer=self.distributed_optimizer,
        )

    def log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        if self.tensorboard_writer is not None:
            for k, v in scalars.items():
                self.tensorboard_writer.add_scalar(k, v, step)
        if self.wandb_writer is not None:
            self.wandb_writer.log(scalars, step)


@dataclasses.dataclass
class MatesState:
    """The plugin's objects in one Megatron-LM process (built with the first train data loader)."""

    sel: SelectionConfig
    parts: Any
    """SelectionParts: pool, rounds, sampler, hook."""
    global_batch_size: int
    seq_length: int
    device: torch.device
    reference: list | None = None
    distributed_optimizer: bool = False
    tensorboard_writer: Any = None
    wandb_writer: Any = None


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


def mates_step_end(iteration: int, model, optimizer, opt_param_scheduler, metrics=None) -> None:
    """The call point: after every ``train_step`` (``iteration`` already incremented), on every rank."""
    state = get_mates_state()
    run = MegatronLMRun(
        model_chunks=list(model),
        optimizer=optimizer,
        scheduler=opt_param_scheduler,
        reference=state.reference,
        seq_length=state.seq_length,
        device=state.device,
        distributed_optimizer=state.distributed_optimizer,
        tensorboard_writer=state.tensorboard_writer,
        wandb_writer=state.wandb_writer,
    )
    hook = state.parts.hook
    hook.on_step_end(run, iteration, dict(metrics or {}))
    if iteration % state.sel.select_every == 0:
        # Release served rounds: Megatron's loader never rewinds (MatesSampler keeps current and later).
        sampler = state.parts.sampler
        sampler.consumed_samples = iteration * state.global_batch_size
        sampler.load_state_dict(sampler.state_dict())


def mates_state_dict(iteration: int) -> dict[str, Any]:
    """This rank's plugin state at ``iteration`` (selections still to serve, hook records, influence model)."""
    state = get_mates_state()
    sampler = state.parts.sampler
    sampler.consumed_samples = iteration * state.global_batch_size
    return {
        "format": STATE_FORMAT,
        "iteration": iteration,
        "world_size": _world_size(),
        "selection": dataclasses.asdict(state.sel),
        "sampler": sampler.state_dict(),
        "hook": state.parts.hook.state_dict(),
    }


def load_mates_state_dict(st: dict[str, Any]) -> None:
    state = get_mates_state()
    if st.get("format") != STATE_FORMAT:
        raise ValueError(f"MATES state format {st.get('format')}; this plugin reads {STATE_FORMAT}")
    if st["world_size"] != _world_size():
        raise ValueError(
            f"the MATES state was written by {st['world_size']} ranks, this run has {_world_size()}: "
            "resume with the same number of ranks (the state is per rank)"
        )
    now = dataclasses.asdict(state.sel)
    for key in _RESUME_FIXED:
        if st["selection"].get(key) != now[key]:
            raise ValueError(
                f"the checkpoint was trained with --mates-{key.replace('_', '-')} {st['selection'].get(key)}, "
                f"this run has {now[key]}: the sample sequence would change; resume with the same value"
            )
    state.parts.sampler.load_state_dict(st["sampler"])
    state.parts.hook.load_state_dict(st["hook"])


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def mates_state_path(checkpoint_dir: str | Path, iteration: int, rank: int, *, release: bool = False) -> Path:
    """``DIR/iter_NNNNNNN/mates_state_rankNNNNN.pt`` (Megatron-LM's iteration directory name)."""
    sub = "release" if release else f"iter_{iteration:07d}"
    return Path(checkpoint_dir) / sub / f"mates_state_rank{rank:05d}.pt"


def save_mates_state(save_dir: str | Path, iteration: int, *, release: bool = False) -> Path | None:
    """Write this rank's plugin state beside Megatron-LM's checkpoint (atomic rename)."""
    if _STATE is None:  # e.g. a checkpoint written before the data loaders exist (MoE upcycling)
        log.warning("no MATES state yet at iteration %d: the checkpoint carries none", iteration)
        return None
    path = mates_state_path(save_dir, iteration, _rank(), release=release)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(mates_state_dict(iteration), tmp)
    os.replace(tmp, path)
    return path


def load_mates_state(load_dir: str | Path, iteration: int, *, release: bool = False) -> Path:
    """Restore this rank's plugin state saved with the checkpoint at ``iteration``."""
    path = mates_state_path(load_dir, iteration, _rank(), release=release)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the checkpoint at iteration {iteration} has no MATES state for this rank. "
            "It is written beside every checkpoint saved with --mates by the patched save_checkpoint; "
            "resume from such a checkpoint, with the same number of ranks"
        )
    load_mates_state_dict(torch.load(path, map_location="cpu", weights_only=False))
    return path


# -- Megatron-LM edge (reads its global state) -------------------------------------------------------------


def _megatron_tokenizer(args):
    from megatron.training import get_tokenizer

    try:
        return get_tokenizer()
    except AssertionError:  # not built by initialize_megatron
        from megatron.training.tokenizer import build_tokenizer

        return build_tokenizer(args)


def mates_train_data_loader(train_ds, consumed_samples: int) -> MatesDataLoader:
    """Replaces ``build_pretraining_data_loader(train_ds, consumed_samples)`` under ``--mates``.

    The first call in a process builds the plugin (pool, sampler, hook, reference set) and, on resume,
    loads its state from ``--load``; later calls (one per virtual pipeline stage) reuse it.
    """
    from megatron.core import parallel_state as mpu
    from megatron.training import get_args, get_tensorboard_writer, get_wandb_writer
    from megatron.training.dist_signal_handler import DistributedSignalHandler

    args = get_args()
    sel = mates_config_from_args(args)
    if sel is None:
        raise ValueError("mates_train_data_loader is for --mates runs")
    device = torch.device("cuda", torch.cuda.current_device())
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
        loader, _ = build_mates_data_loader(sel, train_ds, parts=_STATE.parts, **common)
        return loader
    text_tok = None
    if (sel.scored and sel.pool == "indexed") or args.mates_reference:
        text_tok = MegatronTextTokenizer(_megatron_tokenizer(args))
    loader, parts = build_mates_data_loader(
        sel,
        train_ds,
        tokenizer=text_tok if sel.scored and sel.pool == "indexed" else None,
        write_files=_rank() == 0,
        **common,
    )
    reference = None
    if args.mates_reference:
        from mates_megatron.probe.reference import load_reference_set

        ref = load_reference_set(args.mates_reference, text_tok, args.seq_length)
        if sel.probe_tokens == "all":
            ref = ref.with_all_tokens()
        reference = ref.micro_batches(args.micro_batch_size)
    set_mates_state(
        MatesState(
            sel=sel,
            parts=parts,
            global_batch_size=args.global_batch_size,
            seq_length=args.seq_length,
            device=device,
            reference=reference,
            distributed_optimizer=bool(args.use_distributed_optimizer),
            tensorboard_writer=get_tensorboard_writer(),
            wandb_writer=get_wandb_writer(),
        )
    )
    if args.load and args.iteration > 0:
        path = load_mates_state(args.load, args.iteration)
        log.info("loaded MATES state from %s", path)
    return loader
