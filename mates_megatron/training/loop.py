"""A Megatron-Core pretraining loop: GPTModel + DDP + megatron optimizer + LR schedule, TP/PP/DP, checkpoints.

It runs on GPUs as it is and on CPU in megatron-core CPU mode. It knows nothing of data selection: what it
trains on comes from the edge (``training/build.py``) as a dataset, a ``SampleOrder`` (which samples each step
trains on) and ``TrainerHook``s (called at every step end, their state saved in the checkpoint). It
implements the plugin's host protocol (``mates_megatron.host.Host``): the hooks read the live run through it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from megatron.core.pipeline_parallel import get_forward_backward_func

from mates_megatron.host import ProcessGroups
from mates_megatron.runtime.schedule import collate, evaluate, train_step
from mates_megatron.training import checkpoint as ckpt
from mates_megatron.training.config import TrainConfig
from mates_megatron.training.data import TokenizerInfo, build_gpt_dataset
from mates_megatron.training.evalsets import EvalSets
from mates_megatron.training.metrics import MetricsWriter
from mates_megatron.training.model import build_gpt_model, in_model_precision
from mates_megatron.training.order import SampleOrder, SequentialOrder, TrainerHook
from mates_megatron.training.parallel import initialize_parallel, initialize_rerun_machine

log = logging.getLogger("mates_megatron.train")


DataProvider = Callable[["Trainer"], tuple[Any, SampleOrder, list[TrainerHook]]]
"""Called once the model exists (before a resume): (dataset, sample order, hooks) to train with."""


class Trainer:
    """Builds the model, optimizer, data and checkpointing for a TrainConfig and runs the loop."""

    def __init__(
        self, cfg: TrainConfig, *, data: DataProvider | None = None, hooks: list[TrainerHook] | None = None
    ) -> None:
        self.cfg = cfg
        initialize_parallel(cfg.parallel, seed=cfg.seed)
        initialize_rerun_machine(cfg.rerun_mode)
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
        self.groups = ProcessGroups.from_parallel_state()
        self.forward_backward_func = get_forward_backward_func()
        self.reference = self._load_reference()  # before ``data``: the plugin projects its cost from it
        if data is not None:
            self.dataset, self.order, data_hooks = data(self)
            self.hooks: list[TrainerHook] = list(data_hooks)
        else:
            self.dataset = self.build_dataset()
            self.order = SequentialOrder(
                cfg.global_batch_size, cfg.micro_batch_size, self.dp_rank, self.dp_size
            )
            self.hooks = []
        self.hooks += list(hooks or [])
        eval_mbs = cfg.eval_micro_batch_size or cfg.micro_batch_size
        self.reference_batches = (
            None
            if self.reference is None
            else self.reference.micro_batches(eval_mbs, dp_rank=self.dp_rank, dp_size=self.dp_size)
        )
        self.eval_sets = EvalSets.load(cfg, self.tokenizer_info.path, eval_mbs, self.dp_rank, self.dp_size)
        self.iteration = 0
        self.consumed_samples = 0
        self.history: dict[str, Any] = {
            "step": [],
            "loss": [],
            "seconds": [],  # wall-clock seconds of the step, selection work at its end included
            "hook_seconds": [],  # of which the hooks at its end (selection rounds): training alone is the rest
            "eval_step": [],
            "reference_loss": [],
            "eval": {},  # "<set>" and "<set>/<domain>" -> loss at each eval_step
        }
        self.metrics_writer = MetricsWriter(cfg.metrics, enabled=dist.get_rank() == dist.get_world_size() - 1)
        # A checkpoint in `load` wins (a restarted run continues exactly); without one the run starts from
        # pretrained_checkpoint's weights, if given (Megatron-LM's --pretrained-checkpoint with --finetune).
        resumed = bool(cfg.load) and self._resume(cfg.load)
        if not resumed and cfg.pretrained_checkpoint:
            self._load_pretrained(cfg.pretrained_checkpoint)

    # -- the host protocol (mates_megatron.host.Host) -----------------------------------------------------
    @property
    def seq_length(self) -> int:
        return self.cfg.model.seq_length

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.micro_batch_size

    @property
    def distributed_optimizer(self) -> bool:
        return self.cfg.use_distributed_optimizer

    def log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        self.metrics_writer.log(step, scalars)

    # -- construction -------------------------------------------------------------------------------------
    def _build_model_and_optimizer(self) -> None:
        cfg = self.cfg
        model = in_model_precision(build_gpt_model(cfg.model, cpu=cfg.parallel.cpu), cfg.model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.overlap_grad_reduce,
            overlap_param_gather=cfg.overlap_param_gather,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            check_for_nan_in_grad=cfg.check_for_nan_in_loss_and_grad,
        )
        self.model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        self.model_chunks = [self.model]
        model.config.finalize_model_grads_func = finalize_model_grads
        if cfg.overlap_grad_reduce:  # as Megatron-LM's train() sets it: no reduce before the last micro-batch
            model.config.no_sync_func = self.model.no_sync
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

    def build_dataset(self, num_samples: int | None = None):
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

    def _load_reference(self):
        if not self.cfg.reference:
            return None
        from mates_megatron.data.tokenizer import load_tokenizer
        from mates_megatron.probe.reference import load_reference_set

        tok_path = self.cfg.tokenizer or self.tokenizer_info.path
        return load_reference_set(self.cfg.reference, load_tokenizer(tok_path), self.cfg.model.seq_length)

    # -- the loop -----------------------------------------------------------------------------------------
    def eval_set_losses(self) -> dict[str, float]:
        """Every evaluation set's loss, whole and per domain (fp32, no dropout), identical on every rank."""
        return self.eval_sets.losses(
            lambda batches: evaluate(
                self.model_chunks,
                batches,
                seq_length=self.cfg.model.seq_length,
                device=self.device,
                forward_backward_func=self.forward_backward_func,
            )
        )

    def reference_loss(self) -> float:
        """Mean target-token loss on the reference set (fp32, no dropout), identical on every rank."""
        if self.reference_batches is None:
            raise ValueError("no reference set configured: set TrainConfig.reference (--reference PATH)")
        return evaluate(
            self.model_chunks,
            self.reference_batches,
            seq_length=self.cfg.model.seq_length,
            device=self.device,
            forward_backward_func=self.forward_backward_func,
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
        evaluates = self.reference_batches is not None or bool(self.eval_sets)
        if evaluates and self.iteration == 0:
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
            t_hooks = time.perf_counter()
            for hook in self.hooks:
                hook.on_step_end(self, self.iteration, metrics)
            t_end = time.perf_counter()
            self.history["seconds"].append(t_end - t_step)
            self.history["hook_seconds"].append(t_end - t_hooks)
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
            if evaluates and (self.iteration % cfg.eval_interval == 0 or last):
                self._record_eval()
            stop = cfg.exit_interval and self.iteration % cfg.exit_interval == 0
            if cfg.save and ((cfg.save_interval and self.iteration % cfg.save_interval == 0) or last or stop):
                self.save()
            if stop:
                break
        return self.history

    def _record_eval(self) -> None:
        self.history["eval_step"].append(self.iteration)
        scalars, shown = {}, []
        if self.reference_batches is not None:
            loss = self.reference_loss()
            self.history["reference_loss"].append(loss)
            scalars["eval/reference_loss"] = loss
            shown.append(f"reference loss {loss:.4f}")
        for key, loss in self.eval_set_losses().items():
            self.history["eval"].setdefault(key, []).append(loss)
            scalars[f"eval/{key}"] = loss
            if "/" not in key:
                shown.append(f"{key} {loss:.4f}")
        self.metrics_writer.log(self.iteration, scalars)
        if dist.get_rank() == dist.get_world_size() - 1:
            log.info("iteration %6d | %s", self.iteration, " | ".join(shown))

    # -- checkpoints --------------------------------------------------------------------------------------
    @staticmethod
    def _hook_state(hook: TrainerHook) -> dict[str, Any]:
        """The hook's state as its ``state_rank`` holds it (rank 0 writes the run state; e.g. the influence
        model lives only on influence ranks). Collective over the world group."""
        if hasattr(hook, "settle"):
            hook.settle()
        state, src = hook.state_dict(), getattr(hook, "state_rank", 0)
        if src != 0:
            box = [state]
            dist.broadcast_object_list(box, src=src)
            state = box[0]
        return state

    def save(self) -> None:
        if self.cfg.overlap_param_gather:  # the last step's gather is due at the next forward: the checkpoint
            for (
                chunk
            ) in self.model_chunks:  # saves the parameters as they are after the step (Megatron-LM too)
                chunk.start_param_sync(force_sync=True)
        extra = {
            "consumed_samples": self.consumed_samples,
            "order": self.order.state_dict(),
            "hooks": [self._hook_state(h) for h in self.hooks],
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

    def _resume(self, load_dir: str) -> bool:
        """Restore the whole run from the latest checkpoint in load_dir; False if it holds none."""
        loaded = ckpt.load_checkpoint(
            load_dir,
            model_chunks=self.model_chunks,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            use_distributed_optimizer=self.cfg.use_distributed_optimizer,
        )
        if loaded is None:
            if dist.get_rank() == 0:
                start = (
                    "the weights of pretrained_checkpoint" if self.cfg.pretrained_checkpoint else "scratch"
                )
                log.info("no checkpoint in %s: starting from %s", load_dir, start)
            return False
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
        self.history.setdefault("eval", {})  # a checkpoint of a run without evaluation sets
        # A checkpoint from before the hooks' seconds were apart: its steps count as training.
        self.history.setdefault("hook_seconds", [0.0] * len(self.history["seconds"]))
        if dist.get_rank() == 0:
            log.info("resumed from %s at iteration %d", load_dir, self.iteration)
        return True

    def _load_pretrained(self, load_dir: str) -> None:
        """Initialise the model weights (only) from the latest checkpoint in load_dir; the run starts at 0."""
        iteration = ckpt.load_model_weights(
            load_dir, model_chunks=self.model_chunks, optimizer=self.optimizer
        )
        if dist.get_rank() == 0:
            log.info("initialised weights from %s iteration %d", load_dir, iteration)
