"""GOT-D (Kang et al., ICLR 2024) as a scorer ('gotd'): each candidate's calibrated OT potential toward the
probe reference (the target), from the streamed Sinkhorn component. The most negative first: the data that
moves the candidates' distribution (the proxy for what the model was trained on) closest to the target,
rather than the data that merely looks like the target ('lookalike'). Use ``selector: topk``.

Cost: plain squared distance of the normalised embeddings, epsilon 0.1 and over-relaxation 1.3 (the
paper's ott-jax settings). ``screen_domains: K`` first keeps the K domains closest to the target in entropic
OT value, each measured on a seeded sample of ``screen_samples`` of its candidates at ``screen_epsilon``
(the paper: 20k samples, epsilon 0.5, 2 to 4 domains kept); the candidates of screened-out domains are
still scored, and rank after every candidate of a kept domain (nothing is dropped: a round short of kept
candidates takes the best of the rest). The kept domains and every domain's distance go to the round record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from mates_megatron.ot.valuation import gotd_values, screen_domains
from mates_megatron.scorers.base import SCORERS, RoundInput, Scores
from mates_megatron.scorers.embedding import EmbeddingScorer
from mates_megatron.scorers.lava import OTScorerConfig, ot_record


@dataclass(frozen=True)
class GotdConfig(OTScorerConfig):
    """Options of the 'gotd' scorer."""

    epsilon: float = 0.1
    momentum: float = 1.3
    """Over-relaxation of the Sinkhorn updates (ott-jax's GOT-D setting)."""
    screen_domains: int | None = None
    """Keep this many domains closest to the target first (None: no screening)."""
    screen_samples: int = 20000
    """Candidates per domain the screening measures (a seeded sample)."""
    screen_epsilon: float = 0.5
    """Entropic regularisation of the screening distances."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.screen_domains is not None and self.screen_domains < 1:
            raise ValueError(f"GotdConfig.screen_domains={self.screen_domains} must be >= 1, or null")
        if self.screen_samples < 1 or not self.screen_epsilon > 0:
            raise ValueError("GotdConfig needs screen_samples >= 1 and screen_epsilon > 0")


@SCORERS.register("gotd")
class GotdScorer(EmbeddingScorer):
    """Score = the calibrated OT potential toward the reference (lower = selected first)."""

    Config = GotdConfig

    def score(self, r: RoundInput) -> Scores:
        c, t = self.config, time.perf_counter()
        x, y, _ = self.embed(r, scorer="gotd")
        t_embed = time.perf_counter() - t
        cfg = c.sinkhorn(r.seed, momentum=c.momentum)
        values, res = gotd_values(x, y, cfg)
        record = ot_record(res, t_embed, 0.0)
        if c.screen_domains is not None:
            domains = r.pool.domain_ids(np.asarray(r.candidates)).astype(np.int64)
            kept, dist = screen_domains(
                x, domains, y, replace(cfg, epsilon=c.screen_epsilon), keep=c.screen_domains,
                samples_per_domain=c.screen_samples, seed=r.seed,
            )  # fmt: skip
            out = ~np.isin(domains, kept)
            if out.any() and (~out).any():
                # Screened-out candidates rank after every kept one, in their own order.
                values = values.copy()
                values[out] += values[~out].max() - values[out].min() + 1.0
            names = list(r.pool.domains)
            name = lambda d: names[d] if 0 <= d < len(names) else str(d)  # noqa: E731
            record["screen_kept"] = [name(d) for d in kept]
            record["screen_distance"] = {name(d): v for d, v in dist.items()}
        record["seconds"]["score"] = time.perf_counter() - t
        return Scores(values, record, features=x)
