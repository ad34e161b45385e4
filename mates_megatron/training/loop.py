"""A Megatron-Core pretraining loop: GPTModel + DDP + megatron optimizer + LR schedule, TP/PP/DP, checkpoints.

It runs on GPUs as it is and on CPU in megatron-core CPU mode. The plugin attaches at two typed call points:
``SampleOrder`` (which samples each step trains on) and ``TrainerHook`` (called at every step end, with its
state saved in the checkpoint).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mates_megatron.config import SelectionConfig
from mates_megatron.runtime.schedule import collate, evaluate, train_step
from mates_megatron.training import checkpoint as ckpt
from mates_megatron.training.data import TokenizerInfo, build_gpt_dataset, sequential_indices
from mates_megatron.training.metrics import MetricsConfig, MetricsWriter
from mates_megatron.training.model import GPTConfig, build_gpt_model
from mates_megatron.training.parallel import ParallelConfig, initialize_parallel

log = logging.getLogger("mates_megatron.train")


@dataclass
class TrainConfig:
    """A complete pretraining run (Megatron-LM argument names where one exists)."""

    data_prefix: str
    """Indexed dataset prefix (PREFIX.bin / PREFIX.idx / PREFIX.meta.json from `mates-megatron prepare`)."""
    reference: str | None = None
    """Reference-set JSONL ({"context", "target"} lines); its loss is evaluated every eval_interval steps."""
    tokenizer: str | None = None
    """Local tokenizer directory for the reference set (default: the one recorded in PREFIX.meta.json)."""
    model: GPTConfig = field(default_factory=GPTConfig)
    """Model shape."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP layout and CPU mode."""
    micro_batch_size: int = 4
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks."""
    train_iters: int = 300
    """Optimizer steps in the whole run."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 20
    """Linear warm-up steps."""
    lr_decay_style: str = "cosine"
    """'constant', 'linear' or 'cosine' (megatron-core OptimizerParamScheduler)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron-core distributed optimizer)."""
    seed: int = 1234
    """Seed for weights, data order and every RNG."""
    eval_interval: int = 50
    """Steps between reference-set evaluations (also at step 0 and the last step)."""
    log_interval: int = 10
    """Steps between log lines."""
    save: str | None = None
    """Checkpoint directory to save into."""
    save_interval: int = 0
    """Steps between checkpoints (0: only at the end, if `save` is set)."""
    load: str | None = None
    """Checkpoint directory to resume from (the latest iteration in it)."""
    exit_interval: int = 0
    """Stop (after saving) once the iteration is a multiple of this (0: never); for resume tests."""
    data_cache: str | None = None
    """Where GPTDataset writes its index cache (default: beside the data prefix)."""
    selection: SelectionConfig | None = None
    """Train from a candidate pool through MatesSampler, one selection per round (None: Megatron order)."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """TensorBoard / W&B scalars (training loss, reference loss, MATES rounds)."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"TrainConfig.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.train_iters < 1:
            raise ValueError(f"TrainConfig.train_iters must be >= 1, got {self.train_iters}")
        if isinstance(self.metrics, dict):  # YAML gives a mapping
            self.metrics = MetricsConfig(**self.metrics)
        if self.selection is not None and self.selection.scored and not self.reference:
            raise ValueError(
                f"selection.selector={self.selection.selector!r} scores candidates by their influence on the "
                "reference set: set reference (--reference PATH, e.g. LAMBADA as JSONL)"
            )
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"TrainConfig.lr_decay_style={self.lr_decay_style!r}: use constant, linear or cosine"
            )

    def num_micro_batches(self, dp_size: int) -> int:
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size x DP "
                f"= {self.micro_batch_size} x {dp_size}; change --global-batch-size or --micro-batch-size"
            )
        return self.global_batch_size // per_step


class SampleOrder(Protocol):
    """Which dataset samples each step trains on. MatesSampler implements this."""

    def micro_batch_indices(self, consumed_samples: int) -> list[np.ndarray]:
        """This data-parallel rank's micro-batches (sample indices) of the global batch at consumed_samples."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainerHook(Protocol):
    """Called at every step end; its state is saved with the checkpoint (MatesHook implements this)."""

    def on_step_end(self, trainer: Trainer, iteration: int, metrics: dict[str, float]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class SequentialOrder:
    """Megatron's pretraining order (no selection): consecutive global batches of the dataset."""

    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def micro_batch_indices(self, consumed_samples: int) -> list[np.ndarray]:
        return sequential_indices(
            consumed_samples,
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Trainer:
    """Builds the model, optimizer, data and checkpointing for a TrainConfig and runs the loop."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        order: SampleOrder | None = None,
        hooks: list[TrainerHook] | None = None,
        dataset=None,
    ) -> None:
        self.cfg = cfg
        initialize_parallel(cfg.parallel, seed=cfg.seed)
        self.device = (
            torch.device("cpu") if cfg.parallel.cpu else torch.device("cuda", torch.cuda.current_device())
        )
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        cfg.num_micro_batches(self.dp_size)  # fails early if the batch sizes do not divide
        self._build_model_and_optimizer()
        self.tokenizer_info = TokenizerInfo.from_meta(cfg.data_prefix)
        if cfg.model.vocab_size < self.tokenizer_info.vocab_size:
            raise ValueError(
                f"model vocab_size={cfg.model.vocab_size} is smaller than the data's tokenizer vocabulary "
                f"({self.tokenizer_info.vocab_size}); set --vocab-size {self.tokenizer_info.vocab_size}"
            )
        self.hooks: list[TrainerHook] = list(hooks or [])
        self.selection = None
        if cfg.selection is not None:
            from mates_megatron.training.selection import build_selection

            if order is not None or dataset is not None:
                raise ValueError(
                    "TrainConfig.selection builds its own pool and sampler: pass no order= or dataset="
                )

            tokenizer = None
            if cfg.selection.scored and cfg.selection.pool == "indexed":
                from mates_megatron.data.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(cfg.tokenizer or self.tokenizer_info.path)
            self.selection = build_selection(
                cfg.selection,
                train_iters=cfg.train_iters,
                global_batch_size=cfg.global_batch_size,
                micro_batch_size=cfg.micro_batch_size,
                seq_length=cfg.model.seq_length,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
                build_indexed_dataset=self._build_dataset,
                write_files=dist.get_rank() == 0,
                tokenizer=tokenizer,
            )
            self.dataset = self.selection.pool
            self.order: SampleOrder = self.selection.sampler
            self.hooks.insert(0, self.selection.hook)
        else:
            self.dataset = dataset if dataset is not None else self._build_dataset()
            self.order = order or SequentialOrder(
                cfg.global_batch_size, cfg.micro_batch_size, self.dp_rank, self.dp_size
            )
        self.reference_batches = self._build_reference()
        self.iteration = 0
        self.consumed_samples = 0
        self.history: dict[str, list] = {
            "step": [],
            "loss": [],
            "seconds": [],  # wall-clock seconds of the step, selection work at its end included
            "eval_step": [],
            "reference_loss": [],
        }
        self.metrics_writer = MetricsWriter(cfg.metrics, enabled=dist.get_rank() == dist.get_world_size() - 1)
        if cfg.load:
            self._resume(cfg.load)

    # -- construction -------------------------------------------------------------------------------------
    def _build_model_and_optimizer(self) -> None:
        cfg = self.cfg
        model = build_gpt_model(cfg.model, cpu=cfg.parallel.cpu)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        self.model_chunks = [self.model]
        model.config.finalize_model_grads_func = finalize_model_grads
        opt_cfg = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            clip_grad=cfg.clip_grad,
            bf16=cfg.model.bf16,
            params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_cfg, self.model_chunks)
        decay_steps = cfg.train_iters * cfg.global_batch_size
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_iters * cfg.global_batch_size,
            lr_decay_steps=decay_steps,
            lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )

    def _build_dataset(self, num_samples: int | None = None):
        cfg = self.cfg
        cache = cfg.data_cache or str(Path(cfg.data_prefix).parent / "cache")
        # Collective: megatron-core's builder writes the index cache on rank 0, then the others read it.
        return build_gpt_dataset(
            cfg.data_prefix,
            seq_length=cfg.model.seq_length,
            num_samples=num_samples or cfg.train_iters * cfg.global_batch_size,
            seed=cfg.seed,
            tokenizer=self.tokenizer_info,
            cache_dir=cache,
        )

    def _build_reference(self):
        if not self.cfg.reference:
            return None
        from mates_megatron.data.tokenizer import load_tokenizer
        from mates_megatron.probe.reference import load_reference_set

        tok_path = self.cfg.tokenizer or self.tokenizer_info.path
        ref = load_reference_set(self.cfg.reference, load_tokenizer(tok_path), self.cfg.model.seq_length)
        self.reference_set = ref
        # What the probes score against: the reported loss, or every token of the same examples.
        sel = self.cfg.selection
        self._probe_reference = (
            ref.with_all_tokens() if sel is not None and sel.probe_tokens == "all" else ref
        )
        return ref.micro_batches(self.cfg.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size)

    # -- what the plugin reads ----------------------------------------------------------------------------
    def probe_context(self):
        """The live run for the probes: model, optimizer, scheduler and the whole reference set."""
        from mates_megatron.probe.estimators import ProbeContext

        if self.reference_batches is None:
            raise ValueError("probing needs a reference set: set TrainConfig.reference (--reference PATH)")
        return ProbeContext(
            model_chunks=self.model_chunks,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            reference=self._probe_reference.micro_batches(self.cfg.micro_batch_size),
            seq_length=self.cfg.model.seq_length,
            device=self.device,
            distributed_optimizer=self.cfg.use_distributed_optimizer,
        )

    def log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        self.metrics_writer.log(step, scalars)

    # -- the loop -----------------------------------------------------------------------------------------
    def reference_loss(self) -> float:
        """Mean target-token loss on the reference set (fp32, no dropout), identical on every rank."""
        if self.reference_batches is None:
            raise ValueError("no reference set configured: set TrainConfig.reference (--reference PATH)")
        return evaluate(
            self.model_chunks,
            self.reference_batches,
            seq_length=self.cfg.model.seq_length,
            device=self.device,
        )

    def micro_batches(self, consumed_samples: int):
        return [
            collate([self.dataset[int(i)] for i in idx])
            for idx in self.order.micro_batch_indices(consumed_samples)
        ]

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        metrics = train_step(
            self.model_chunks,
            self.optimizer,
            self.scheduler,
            self.micro_batches(self.consumed_samples),
            seq_length=cfg.model.seq_length,
            global_batch_size=cfg.global_batch_size,
            device=self.device,
        )
        self.iteration += 1
        self.consumed_samples += cfg.global_batch_size
        return metrics

    def train(self) -> dict[str, list]:
        cfg = self.cfg
        is_logger = dist.get_rank() == dist.get_world_size() - 1
        tokens_per_step = cfg.global_batch_size * cfg.model.seq_length
        if self.reference_batches is not None and self.iteration == 0:
            self._record_eval()
        t_last, it_last = time.perf_counter(), self.iteration
        while self.iteration < cfg.train_iters:
            t_step = time.perf_counter()
            metrics = self.step()
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"training loss is {metrics['loss']} at iteration {self.iteration}; lower --lr or check the data"
                )
            self.history["step"].append(self.iteration)
            self.history["loss"].append(metrics["loss"])
            for hook in self.hooks:
                hook.on_step_end(self, self.iteration, metrics)
            self.history["seconds"].append(time.perf_counter() - t_step)
            self.metrics_writer.log(
                self.iteration, {"train/loss": metrics["loss"], "train/lr": metrics["lr"]}
            )
            if self.iteration % cfg.log_interval == 0 and is_logger:
                dt = time.perf_counter() - t_last
                tps = (self.iteration - it_last) * tokens_per_step / max(dt, 1e-9)
                log.info(
                    "iteration %6d/%d | loss %.4f | lr %.3e | grad norm %.3f | %.0f tokens/s",
                    self.iteration,
                    cfg.train_iters,
                    metrics["loss"],
                    metrics["lr"],
                    metrics["grad_norm"],
                    tps,
                )
            if self.iteration % cfg.log_interval == 0:
                t_last, it_last = time.perf_counter(), self.iteration
            last = self.iteration == cfg.train_iters
            if self.reference_batches is not None and (self.iteration % cfg.eval_interval == 0 or last):
                self._record_eval()
            stop = cfg.exit_interval and self.iteration % cfg.exit_interval == 0
            if cfg.save and ((cfg.save_interval and self.iteration % cfg.save_interval == 0) or last or stop):
                self.save()
            if stop:
                break
        return self.history

    def _record_eval(self) -> None:
        loss = self.reference_loss()
        self.history["eval_step"].append(self.iteration)
        self.history["reference_loss"].append(loss)
        self.metrics_writer.log(self.iteration, {"eval/reference_loss": loss})
        if dist.get_rank() == dist.get_world_size() - 1:
            log.info("iteration %6d | reference loss %.4f", self.iteration, loss)

    # -- checkpoints --------------------------------------------------------------------------------------
    def save(self) -> None:
        extra = {
            "consumed_samples": self.consumed_samples,
            "order": self.order.state_dict(),
            "hooks": [h.state_dict() for h in self.hooks],
            "history": self.history,
        }
        path = ckpt.save_checkpoint(
            self.cfg.save,
            self.iteration,
            model_chunks=self.model_chunks,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra=extra,
            use_distributed_optimizer=self.cfg.use_distributed_optimizer,
        )
        if dist.get_rank() == 0:
            log.info("saved checkpoint %s", path)

    def _resume(self, load_dir: str) -> None:
        loaded = ckpt.load_checkpoint(
            load_dir,
            model_chunks=self.model_chunks,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            use_distributed_optimizer=self.cfg.use_distributed_optimizer,
        )
        if loaded is None:
            if dist.get_rank() == 0:
                log.info("no checkpoint in %s: starting from scratch", load_dir)
            return
        self.iteration, extra = loaded
        self.consumed_samples = extra["consumed_samples"]
        self.order.load_state_dict(extra["order"])
        if len(extra["hooks"]) != len(self.hooks):
            raise ValueError(
                f"checkpoint has state for {len(extra['hooks'])} hooks, this run has {len(self.hooks)}: "
                "resume with the same plugin configuration"
            )
        for hook, state in zip(self.hooks, extra["hooks"], strict=True):
            hook.load_state_dict(state)
        self.history = extra["history"]
        if dist.get_rank() == 0:
            log.info("resumed from %s at iteration %d", load_dir, self.iteration)
