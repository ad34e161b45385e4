"""Plugin configuration: typed dataclasses at the core; argparse/YAML only at the edges."""

from __future__ import annotations

from dataclasses import dataclass, field

from mates_megatron.influence.model import InfluenceConfig

ESTIMATOR_NAMES = ("oracle", "linearized", "mirrored")


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
    warmup_steps: int = 0
    """Steps trained on random selection before the first scored round (a multiple of select_every; score-
    based selectors need at least one round, since round 0 is chosen before the model has trained)."""
    probe_samples: int = 256
    """Probe samples per round: drawn afresh (seeded) from the next round's candidates, scored on the live
    model, and used as the influence model's training pairs."""
    estimator: str = "oracle"
    """How probes are scored: 'oracle' (one optimizer step, then the reference loss: the paper), 'linearized'
    (its first-order form, one reference backward per round) or 'mirrored' (one reference step, forward only)."""
    probe_tokens: str = "target"
    """Which reference tokens the probes' reference loss counts: 'target' (the LAMBADA form: the last word
    only, the same loss the run reports) or 'all' (every token of each reference example, context and target:
    a language-modelling loss on the reference text, far less noisy per probe and harder to win with data that
    only teaches word frequencies)."""
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    """The data influence model and its fitting."""
    influence_ranks: list[int] | None = None
    """Global ranks that fit and run the influence model (default: all); scores reach every rank by broadcast."""

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
        if self.probe_tokens not in ("target", "all"):
            raise ValueError(f"SelectionConfig.probe_tokens={self.probe_tokens!r}: use 'target' or 'all'")
        if isinstance(self.influence, dict):  # YAML gives a mapping
            self.influence = InfluenceConfig(**self.influence)
        if self.estimator not in ESTIMATOR_NAMES:
            raise ValueError(
                f"SelectionConfig.estimator={self.estimator!r}: choose one of {', '.join(ESTIMATOR_NAMES)}"
            )
        if self.warmup_steps < 0 or self.warmup_steps % self.select_every:
            raise ValueError(
                f"SelectionConfig.warmup_steps={self.warmup_steps} must be a non-negative multiple of "
                f"select_every={self.select_every} (warm-up is whole random rounds)"
            )
        if self.scored and self.warmup_steps == 0:
            raise ValueError(
                f"selector {self.selector!r} scores candidates with the trained model, but round 0 is chosen "
                f"before training starts: set warmup_steps to at least select_every ({self.select_every})"
            )
        if self.scored and self.probe_samples < 10:
            raise ValueError(
                f"SelectionConfig.probe_samples={self.probe_samples}: the influence model needs at least 10 "
                "(text, score) pairs per round; the paper uses thousands"
            )

    @property
    def scored(self) -> bool:
        """Whether the selector needs influence scores (everything but 'random')."""
        return self.selector != "random"

    @property
    def warmup_rounds(self) -> int:
        return self.warmup_steps // self.select_every

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
