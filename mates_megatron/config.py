"""Plugin configuration: typed dataclasses at the core; argparse/YAML only at the edges."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SelectionConfig:
    """Where candidates come from and how each round's training data is chosen."""

    pool: str = "indexed"
    """Pool backend: 'indexed' (the run's Megatron .bin/.idx through GPTDataset) or 'webdataset'."""
    shards: str | None = None
    """Directory of WebDataset tar shards with manifest.json (pool='webdataset')."""
    select_every: int = 50
    """Training steps per round; a new selection is served every select_every steps."""
    selection_ratio: float = 0.2
    """Fraction of a round's candidates that it trains on (the round's pool is 1/ratio x its batches)."""
    selector: str = "random"
    """Selector name (mates_megatron.select.SELECTORS): random, topk or mates (Gumbel-top-k)."""
    temperature: float = 0.5
    """Gumbel-top-k temperature (selector 'mates'), applied to scores z-scored within the round."""
    seed: int = 0
    """Seed of the round split, the selector and the serving order."""
    run_name: str = "default"
    """Name of this run's selection files beside WebDataset shards (SHARDS/mates/RUN_NAME/)."""

    def __post_init__(self) -> None:
        if self.pool not in ("indexed", "webdataset"):
            raise ValueError(f"SelectionConfig.pool={self.pool!r}: use 'indexed' or 'webdataset'")
        if self.pool == "webdataset" and not self.shards:
            raise ValueError(
                "SelectionConfig.shards is required with pool='webdataset' (the shard directory)"
            )
        if self.select_every < 1:
            raise ValueError(f"SelectionConfig.select_every must be >= 1, got {self.select_every}")
        if not 0 < self.selection_ratio <= 1:
            raise ValueError(f"SelectionConfig.selection_ratio={self.selection_ratio} must be in (0, 1]")
        if self.temperature < 0:
            raise ValueError(f"SelectionConfig.temperature={self.temperature} must be >= 0 (0: exact top-k)")

    def build_selector(self):
        """The configured selector (mates gets the temperature)."""
        from mates_megatron.select import build_selector

        return build_selector(
            self.selector, **({"temperature": self.temperature} if self.selector == "mates" else {})
        )

    def samples_per_round(self, global_batch_size: int) -> int:
        return self.select_every * global_batch_size

    def candidates_per_round(self, global_batch_size: int) -> int:
        return int(round(self.samples_per_round(global_batch_size) / self.selection_ratio))
