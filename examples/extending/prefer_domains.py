"""A scorer in one file: candidates of the preferred domains first (a static, model-free control).

Use it from a config: ``selection: {selector: topk, scorer: prefer_domains,
scorer_options: {prefer: [python_docs]}, imports: [prefer_domains]}`` with this folder on PYTHONPATH.
"""

from dataclasses import dataclass, field

import numpy as np

from mates_megatron.scorers import SCORERS, RoundInput, Scorer, Scores


@dataclass
class PreferDomainsConfig:
    prefer: list[str] = field(default_factory=list)
    """Domains whose candidates score 0; all others score 1 (lower is more useful)."""


@SCORERS.register("prefer_domains")
class PreferDomains(Scorer):
    Config = PreferDomainsConfig

    def score(self, r: RoundInput) -> Scores:
        wanted = [i for i, name in enumerate(r.pool.domains) if name in self.config.prefer]
        preferred = np.isin(r.pool.domain_ids(r.candidates), wanted)  # domain id -1: unknown
        return Scores(np.where(preferred, 0.0, 1.0), {"preferred": float(preferred.mean())})
