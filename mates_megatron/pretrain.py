"""Megatron-Core GPT pretraining entry point (run under torchrun; examples/pretrain_gpt.py calls main()).

    torchrun --nproc-per-node 2 -m mates_megatron.pretrain --config configs/cpu_tp2.yaml

A YAML config gives the complete run; Megatron-LM style flags override single fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from mates_megatron.training.loop import TrainConfig
from mates_megatron.training.model import GPTConfig
from mates_megatron.training.parallel import ParallelConfig

# flag -> (section, field); section None is TrainConfig itself.
_FLAGS: dict[str, tuple[str | None, str, type]] = {
    "--tensor-model-parallel-size": ("parallel", "tensor_model_parallel_size", int),
    "--pipeline-model-parallel-size": ("parallel", "pipeline_model_parallel_size", int),
    "--num-layers": ("model", "num_layers", int),
    "--hidden-size": ("model", "hidden_size", int),
    "--num-attention-heads": ("model", "num_attention_heads", int),
    "--seq-length": ("model", "seq_length", int),
    "--vocab-size": ("model", "vocab_size", int),
    "--transformer-impl": ("model", "transformer_impl", str),
    "--data-path": (None, "data_prefix", str),
    "--reference": (None, "reference", str),
    "--tokenizer": (None, "tokenizer", str),
    "--micro-batch-size": (None, "micro_batch_size", int),
    "--global-batch-size": (None, "global_batch_size", int),
    "--train-iters": (None, "train_iters", int),
    "--lr": (None, "lr", float),
    "--min-lr": (None, "min_lr", float),
    "--lr-warmup-iters": (None, "lr_warmup_iters", int),
    "--lr-decay-style": (None, "lr_decay_style", str),
    "--weight-decay": (None, "weight_decay", float),
    "--clip-grad": (None, "clip_grad", float),
    "--seed": (None, "seed", int),
    "--eval-interval": (None, "eval_interval", int),
    "--log-interval": (None, "log_interval", int),
    "--save": (None, "save", str),
    "--save-interval": (None, "save_interval", int),
    "--load": (None, "load", str),
    "--exit-interval": (None, "exit_interval", int),
    "--tensorboard-dir": ("metrics", "tensorboard_dir", str),
    "--wandb-project": ("metrics", "wandb_project", str),
    "--wandb-exp-name": ("metrics", "wandb_exp_name", str),
}


def _dataclass_from_dict(cls, data: dict[str, Any], where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    return data


def train_config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a TrainConfig from a nested dict (YAML), naming any unknown field."""
    data = dict(data)
    model = GPTConfig(**_dataclass_from_dict(GPTConfig, data.pop("model", {}) or {}, f"{where}: model"))
    parallel = ParallelConfig(
        **_dataclass_from_dict(ParallelConfig, data.pop("parallel", {}) or {}, f"{where}: parallel")
    )
    if data.get("selection") is not None:
        from mates_megatron.config import SelectionConfig
        from mates_megatron.influence.model import InfluenceConfig

        sel = dict(_dataclass_from_dict(SelectionConfig, data["selection"], f"{where}: selection"))
        if isinstance(sel.get("influence"), dict):
            where_inf = f"{where}: selection.influence"
            sel["influence"] = InfluenceConfig(
                **_dataclass_from_dict(InfluenceConfig, sel["influence"], where_inf)
            )
        data["selection"] = SelectionConfig(**sel)
    if isinstance(data.get("metrics"), dict):
        from mates_megatron.training.metrics import MetricsConfig

        data["metrics"] = MetricsConfig(
            **_dataclass_from_dict(MetricsConfig, data["metrics"], f"{where}: metrics")
        )
    _dataclass_from_dict(TrainConfig, data, where)
    if "data_prefix" not in data:
        raise ValueError(
            f"{where}: data_prefix is required (the PREFIX of PREFIX.bin/.idx); or pass --data-path"
        )
    return TrainConfig(model=model, parallel=parallel, **data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Megatron-Core GPT pretraining (CPU mode with --cpu)")
    p.add_argument("--config", type=Path, help="YAML run config (fields of TrainConfig)")
    p.add_argument("--cpu", action="store_true", default=None, help="megatron-core CPU mode over gloo")
    p.add_argument("--use-distributed-optimizer", action="store_true", default=None)
    p.add_argument("--metrics-out", type=Path, help="write the loss/reference-loss history as JSON here")
    for flag, (_, _, typ) in _FLAGS.items():
        p.add_argument(flag, type=typ, default=None)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data: dict[str, Any] = {}
    if args.config:
        data = yaml.safe_load(args.config.read_text()) or {}
    for flag, (section, name, _) in _FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        target = data.setdefault(section, {}) if section else data
        target[name] = value
    if args.cpu:
        data.setdefault("parallel", {})["cpu"] = True
    if args.use_distributed_optimizer:
        data["use_distributed_optimizer"] = True
    return train_config_from_dict(data, where=str(args.config or "arguments"))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # megatron-core logs every parameter name and its whole optimizer config at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # megatron-core announces every missing GPU extension (apex, TE) once per process; on CPU that is expected.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE|apex).*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    import torch.distributed as dist

    from mates_megatron.training.loop import Trainer
    from mates_megatron.training.parallel import destroy_parallel

    trainer = Trainer(cfg)
    try:
        history = trainer.train()
    finally:
        trainer.metrics_writer.close()
    if args.metrics_out and dist.get_rank() == dist.get_world_size() - 1:
        args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
        out = {"config": dataclasses.asdict(cfg), "world_size": dist.get_world_size(), **history}
        if trainer.selection is not None:
            out["selection"] = trainer.selection.hook.summary()
        tmp = args.metrics_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.metrics_out)
    destroy_parallel()


if __name__ == "__main__":
    main()
