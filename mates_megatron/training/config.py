"""The demo host's run configuration (Megatron-LM argument names where one exists)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mates_megatron.config import SelectionConfig
from mates_megatron.training.metrics import MetricsConfig
from mates_megatron.training.model import GPTConfig
from mates_megatron.training.parallel import ParallelConfig


@dataclass
class TrainConfig:
    """A complete pretraining run (Megatron-LM argument names where one exists)."""

    data_prefix: str
    """Indexed dataset prefix (PREFIX.bin / PREFIX.idx / PREFIX.meta.json from `mates-megatron prepare`)."""
    reference: str | None = None
    """Reference-set JSONL ({"context", "target"} lines); its loss is evaluated every eval_interval steps."""
    eval_sets: dict[str, str] = field(default_factory=dict)
    """Named evaluation sets apart from the probe reference: name -> JSONL of {"context", "target"} or
    {"text"} lines, optionally with "domain"; each is evaluated every eval_interval and logged as
    eval/<name> and eval/<name>/<domain> (``training/evalsets.py``)."""
    eval_micro_batch_size: int = 0
    """Rows per evaluation forward pass per data-parallel rank (0: micro_batch_size); larger is faster."""
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
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with the backward pass (Megatron-LM --overlap-grad-reduce, on in
    Bridge's recipes)."""
    overlap_param_gather: bool = False
    """With the distributed optimizer, gather the updated parameters during the next forward pass instead of
    after the step (Megatron-LM --overlap-param-gather, on in Bridge's recipes)."""
    check_for_nan_in_loss_and_grad: bool = True
    """Check every gradient bucket for NaN/Inf before its data-parallel reduction, through the rerun state
    machine (Megatron-LM's default; ``--no-check-for-nan-in-loss-and-grad`` turns it off)."""
    rerun_mode: str = "validate_results"
    """Megatron's rerun state machine around every training step: 'validate_results' (Megatron-LM's default:
    a rejected result reruns the step to tell a transient fault from a reproducible one) or 'disabled'."""
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
    pretrained_checkpoint: str | None = None
    """Checkpoint directory whose model weights initialise a run that has no checkpoint to resume from in
    `load` (weights only: the optimizer, scheduler, iteration, consumed samples, sampler/hook state and RNG
    start fresh, as Megatron-LM's --pretrained-checkpoint with --finetune). Used to continue training a
    pretrained model on newly selected data."""
    exit_interval: int = 0
    """Stop (after saving) once the iteration is a multiple of this (0: never); for resume tests."""
    data_cache: str | None = None
    """Where GPTDataset writes its index cache (default: beside the data prefix)."""
    selection: SelectionConfig | None = None
    """Data selection (read by ``training/build.py``, never by the Trainer): train from a candidate pool
    through MatesSampler, one selection per round (None: Megatron's order)."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """TensorBoard / W&B scalars (training loss, reference loss, MATES rounds)."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"TrainConfig.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        for name in ("train_iters", "global_batch_size", "eval_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_interval", "exit_interval", "lr_warmup_iters", "eval_micro_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig needs 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        for name in ("clip_grad", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr_warmup_iters >= self.train_iters:
            raise ValueError(
                f"TrainConfig.lr_warmup_iters={self.lr_warmup_iters} must be below train_iters="
                f"{self.train_iters} (megatron-core's scheduler asserts it); lower --lr-warmup-iters"
            )
        if self.selection is not None and self.selection.needs_reference and not self.reference:
            raise ValueError(
                f"selection.scorer={self.selection.scorer!r} scores candidates by their influence on the "
                "reference set: set reference (--reference PATH, e.g. LAMBADA as JSONL)"
            )
        from mates_megatron.training.evalsets import check_names

        check_names(self.eval_sets)
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise ValueError(
                "TrainConfig.overlap_param_gather needs use_distributed_optimizer and overlap_grad_reduce "
                "(as Megatron-LM's --overlap-param-gather does)"
            )
        if self.rerun_mode not in ("validate_results", "disabled"):
            raise ValueError(f"TrainConfig.rerun_mode={self.rerun_mode!r}: use validate_results or disabled")
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
