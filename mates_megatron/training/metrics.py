"""Scalar metrics to TensorBoard and, when configured, Weights & Biases (on one rank)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class MetricsConfig:
    """Where scalars go (Megatron-LM's flag names)."""

    tensorboard_dir: str | None = None
    """TensorBoard event directory (--tensorboard-dir); None: no TensorBoard."""
    wandb_project: str | None = None
    """Weights & Biases project (--wandb-project); None: no W&B."""
    wandb_exp_name: str | None = None
    """W&B run name (--wandb-exp-name)."""

    def __post_init__(self) -> None:
        if self.wandb_exp_name and not self.wandb_project:
            raise ValueError(
                f"MetricsConfig.wandb_exp_name={self.wandb_exp_name!r} names a W&B run but wandb_project is "
                "not set, so nothing would be logged: set wandb_project (--wandb-project) too"
            )


class MetricsWriter:
    """Writes scalars to every configured sink; a no-op with none configured (and on non-logging ranks)."""

    def __init__(self, cfg: MetricsConfig, *, enabled: bool) -> None:
        self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - tensorboard is a dependency
                raise ImportError("--tensorboard-dir needs tensorboard: pip install tensorboard") from e
            os.makedirs(cfg.tensorboard_dir, exist_ok=True)
            self.tb = SummaryWriter(cfg.tensorboard_dir)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    f"wandb_project={cfg.wandb_project!r} needs Weights & Biases: pip install wandb "
                    "(or drop --wandb-project)"
                ) from e
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
