"""Megatron-Core GPT pretraining entry point (run under torchrun; examples/pretrain_gpt.py calls main()).

    torchrun --nproc-per-node 2 -m mates_megatron.pretrain --config configs/cpu_tp2.yaml

A YAML config gives the complete run (the fields of TrainConfig); flags override single fields: Megatron-LM's
spellings for the run (``--num-layers``, ``--lr``, ...) and, for its ``selection`` section, the same
``--mates-*`` flags as the Megatron-LM integration. YAML and flags go through ``configio.build`` alike.

``load_run`` is what every rank does before it touches torch.distributed: parse, build and validate the
TrainConfig, and check the files it reads first (``check_run_files``). The launchers (``mates-megatron
pretrain``, ``mates-lab demo``) call the same code before torchrun (``check_launch``), so that a bad config
is refused once, in one line, and never by both ranks inside their tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mates_megatron import configio
from mates_megatron.files import atomic_write_json
from mates_megatron.flags import Flag, add_flags, given_paths, named_flags, overrides_from_args

if TYPE_CHECKING:
    from mates_megatron.training.config import TrainConfig

# Megatron-LM's spelling -> dotted TrainConfig field.
RUN_FLAGS: dict[str, str] = {
    "--tensor-model-parallel-size": "parallel.tensor_model_parallel_size",
    "--pipeline-model-parallel-size": "parallel.pipeline_model_parallel_size",
    "--cpu": "parallel.cpu",
    "--num-layers": "model.num_layers",
    "--hidden-size": "model.hidden_size",
    "--num-attention-heads": "model.num_attention_heads",
    "--seq-length": "model.seq_length",
    "--vocab-size": "model.vocab_size",
    "--make-vocab-size-divisible-by": "model.make_vocab_size_divisible_by",
    "--ffn-hidden-size": "model.ffn_hidden_size",
    "--hidden-dropout": "model.hidden_dropout",
    "--attention-dropout": "model.attention_dropout",
    "--init-method-std": "model.init_method_std",
    "--transformer-impl": "model.transformer_impl",
    "--bf16": "model.bf16",
    "--sequence-parallel": "model.sequence_parallel",
    "--data-path": "data_prefix",
    "--reference": "reference",
    "--eval-sets": "eval_sets",
    "--eval-micro-batch-size": "eval_micro_batch_size",
    "--tokenizer": "tokenizer",
    "--micro-batch-size": "micro_batch_size",
    "--global-batch-size": "global_batch_size",
    "--train-iters": "train_iters",
    "--lr": "lr",
    "--min-lr": "min_lr",
    "--lr-warmup-iters": "lr_warmup_iters",
    "--lr-decay-style": "lr_decay_style",
    "--weight-decay": "weight_decay",
    "--clip-grad": "clip_grad",
    "--adam-beta1": "adam_beta1",
    "--adam-beta2": "adam_beta2",
    "--use-distributed-optimizer": "use_distributed_optimizer",
    "--overlap-grad-reduce": "overlap_grad_reduce",
    "--overlap-param-gather": "overlap_param_gather",
    "--check-for-nan-in-loss-and-grad": "check_for_nan_in_loss_and_grad",
    "--rerun-mode": "rerun_mode",
    "--seed": "seed",
    "--eval-interval": "eval_interval",
    "--log-interval": "log_interval",
    "--save": "save",
    "--save-interval": "save_interval",
    "--load": "load",
    "--pretrained-checkpoint": "pretrained_checkpoint",
    "--exit-interval": "exit_interval",
    "--data-cache-path": "data_cache",
    "--tensorboard-dir": "metrics.tensorboard_dir",
    "--wandb-project": "metrics.wandb_project",
    "--wandb-exp-name": "metrics.wandb_exp_name",
}

# megatron-core's notices that a GPU extension is missing (expected on CPU, once per process per module), its
# CUDA_DEVICE_MAX_CONNECTIONS advice and a deprecation its own defaults trigger; matched from the start of the
# message, exactly these texts (so an unrelated warning that merely contains "TE" or "apex" still shows).
MEGATRON_CORE_NOTICES = (
    r"Transformer Engine and Apex are not installed\. Falling back to ",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"When using (sequence parallelism|async grad allreduce) it is recommended to set the environment "
    r"variable CUDA_DEVICE_MAX_CONNECTIONS to 1",
    # TransformerConfig's own default cuda_graph_scope ('full' in 0.16) warns on every construction.
    r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer\.",
)


def silence_megatron_core_notices() -> None:
    """Ignore MEGATRON_CORE_NOTICES (call before megatron-core is imported: most are import-time)."""
    for message in MEGATRON_CORE_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def _flags() -> list[Flag]:
    from mates_megatron.config import selection_flags
    from mates_megatron.training.config import TrainConfig

    return named_flags(TrainConfig, RUN_FLAGS) + selection_flags("--mates-", path="selection.")


def train_config_from_dict(
    data: dict[str, Any], where: str = "config", sources: dict[str, str] | None = None
) -> TrainConfig:
    """A TrainConfig from a nested dict (YAML, with flag overrides merged in): ``configio.build``."""
    from mates_megatron.training.config import TrainConfig

    if "data_prefix" not in data:
        raise ValueError(
            f"{where}: data_prefix is required (the PREFIX of PREFIX.bin/.idx); or pass --data-path"
        )
    return configio.build(TrainConfig, data, where=where, sources=sources)


class _RefusingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are ValueErrors (argparse prints usage and exits on its own)."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def build_parser(*, exit_on_error: bool = True) -> argparse.ArgumentParser:
    """The entry point's flags; with ``exit_on_error=False`` a bad flag raises ValueError instead of exiting."""
    cls = argparse.ArgumentParser if exit_on_error else _RefusingParser
    p = cls(description="Megatron-Core GPT pretraining (CPU mode with --cpu)", allow_abbrev=False)
    p.add_argument("--config", type=Path, help="YAML run config (fields of TrainConfig); flags override it")
    p.add_argument("--metrics-out", type=Path, help="write the loss/reference-loss history as JSON here")
    flags = _flags()
    run = p.add_argument_group("run", "TrainConfig fields (Megatron-LM spellings)")
    add_flags(run, [f for f in flags if not f.path.startswith("selection.")])
    sel = p.add_argument_group(
        "selection", "TrainConfig.selection fields (as the Megatron-LM --mates-* flags)"
    )
    add_flags(sel, [f for f in flags if f.path.startswith("selection.")])
    return p


def _built(args: argparse.Namespace) -> tuple[TrainConfig, str, dict[str, str]]:
    where = str(args.config or "flags")
    data: dict[str, Any] = configio.load_yaml(args.config) if args.config else {}
    if data:  # today's spelling before flags are laid over it (a flag overrides the file's new key)
        from mates_megatron.training.config import TrainConfig

        data = configio.normalize(TrainConfig, data, where=where)
    flags = _flags()
    try:
        overrides = overrides_from_args(args, flags)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    by_path = {f.path: f.flag for f in flags}
    sources = {p: by_path[p] for p in given_paths(overrides) if p in by_path}
    if args.config and overrides:
        where = f"{args.config} + flags"
    return (
        train_config_from_dict(configio.merge(data, overrides), where=where, sources=sources),
        where,
        sources,
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``--config`` with the given flags laid over it (flags win)."""
    return _built(args)[0]


def checked_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """``config_from_args`` with the files the run reads checked (``check_run_files``)."""
    cfg, where, sources = _built(args)
    check_run_files(cfg, where=where, sources=sources)
    return cfg


def _data_fix(prefix: str) -> str:
    if Path(prefix).parent == Path("data/embedded"):
        return "build it with `mates-lab embedded --out data/embedded` (pip install '.[lab]'), or run `mates-lab demo`"
    return f"prepare it with `mates-megatron prepare --input CORPUS.jsonl --output-prefix {prefix}`"


def check_run_files(cfg: TrainConfig, *, where: str, sources: dict[str, str] | None = None) -> None:
    """Refuse a run whose files are missing, before anything is built: the indexed dataset (``data_prefix``
    .bin/.idx/.meta.json), the probe ``reference``, every ``eval_sets`` file, the mixture weights (read whole)
    and a WebDataset or Energon pool's index. ValueError naming ``where``,
    the field (and the flag that set it) and the fix. Their contents are read later, by the ranks."""
    from mates_megatron.probe.reference import require_jsonl

    sources = sources or {}

    def named(path: str, value: str) -> str:
        return f"{path} {value}" + (f" ({sources[path]})" if path in sources else "")

    prefix = cfg.data_prefix
    for ext in (".bin", ".idx", ".meta.json"):
        if not Path(f"{prefix}{ext}").is_file():
            raise ValueError(
                f"{where}: {named('data_prefix', prefix)}: {prefix}{ext} not found; {_data_fix(prefix)}"
            )
    files = [("reference", cfg.reference, "reference set")] if cfg.reference else []
    files += [(f"eval_sets.{n}", p, f"evaluation set {n!r}") for n, p in cfg.eval_sets.items()]
    for path, value, what in files:
        try:
            require_jsonl(value, what)
        except FileNotFoundError as e:
            raise ValueError(f"{where}: {named(path, value)}: {e}") from None
    sel = cfg.selection
    if sel is None:
        return
    if sel.selector == "mixture":
        from mates_megatron.mixture.weights import MixtureError, read_weights

        weights = sel.selector_config.weights
        try:  # a small file: read it whole, so that a malformed one is refused here too
            read_weights(weights)
        except (FileNotFoundError, MixtureError) as e:
            raise ValueError(
                f"{where}: {named('selection.selector_options.weights', weights)}: {e}"
            ) from None
    # The pool's own index, whose absence the ranks would otherwise report after torchrun has started them.
    needed = {"webdataset": "manifest.json", "energon": ".nv-meta"}.get(sel.pool)
    shards = sel.pool_config.shards if needed else None
    if needed and not (Path(shards) / needed).exists():
        raise ValueError(
            f"{where}: {named('selection.pool_options.shards', shards)}: {Path(shards) / needed} not found; "
            f"prepare the pool with `mates-megatron prepare` (pool {sel.pool!r}), or point pool.shards at it"
        )


def load_run(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    """The entry point's flags and its checked TrainConfig (``checked_config_from_args``): what every rank does
    before it touches torch.distributed or builds the model."""
    args = build_parser().parse_args(argv)
    return args, checked_config_from_args(args)


def check_launch(config: str | Path, rest: list[str]) -> TrainConfig:
    """Refuse, before torchrun starts, what every rank of ``-m mates_megatron.pretrain --config config *rest``
    would refuse at its start (``load_run`` without argparse's exit): ValueError whose message starts with the
    config path. The launchers print it as one ``error:`` line."""
    try:
        args = build_parser(exit_on_error=False).parse_args(["--config", str(config), *rest])
    except ValueError as e:
        raise ValueError(f"{config} + flags: {e}") from None
    return checked_config_from_args(args)


def launch_checked(config: str | Path, rest: list[str], nproc_per_node: int | None = None) -> int:
    """torchrun this entry point on ``config`` (``launch.launch_pretrain``) after what every rank would refuse
    at its start is refused here once (``check_launch``, and the round's projected cost): then one ``error:``
    line on stderr and exit code 2, and torchrun never starts. A ``launch.Runner``: the lab's runs take it."""
    import sys

    from mates_megatron.launch import launch_pretrain
    from mates_megatron.training.build import check_round_cost_before_launch

    try:
        cfg = check_launch(config, rest)
        check_round_cost_before_launch(cfg, world=nproc_per_node, where=str(config))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return launch_pretrain(Path(config), rest, nproc_per_node)


def main(argv: list[str] | None = None) -> None:
    # Before anything imports megatron-core: its notices fire at import time.
    silence_megatron_core_notices()
    args, cfg = load_run(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # megatron-core logs every parameter name and its whole optimizer config at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    import torch.distributed as dist

    from mates_megatron.training.build import build_trainer
    from mates_megatron.training.parallel import destroy_parallel

    trainer = build_trainer(cfg)
    try:
        history = trainer.train()
    finally:
        trainer.metrics_writer.close()
    if args.metrics_out and dist.get_rank() == dist.get_world_size() - 1:
        args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
        out = {"config": dataclasses.asdict(cfg), "world_size": dist.get_world_size(), **history}
        from mates_megatron.hooks import MatesHook

        rounds = [h for h in trainer.hooks if isinstance(h, MatesHook)]
        if rounds:
            out["selection"] = rounds[0].summary()
        atomic_write_json(args.metrics_out, out)
    destroy_parallel()


if __name__ == "__main__":
    main()
