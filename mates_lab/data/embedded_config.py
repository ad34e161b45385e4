"""The embedded corpus builder's config (shared by the builder and its sources)."""

from __future__ import annotations

from dataclasses import dataclass

DOMAINS = ("python_docs", "python_code", "licenses", "package_docs", "junk")
REAL_DOMAINS = DOMAINS[:-1]
EMBEDDED_FORMAT = 2
"""Bump whenever the builder writes other files for the same config and machine: ``check_embedded_data``
refuses data of another format instead of training on a corpus this version would not build."""


@dataclass
class EmbeddedCorpusConfig:
    """How much of each domain to gather, the reference (probe) set and the held-out evaluation sets."""

    seed: int = 1234
    """Seed of every random choice (source splits, per-domain sampling, junk, corpus order)."""
    max_docs_per_domain: int = 6000
    """Cap per domain of the corpus (a seeded sample when a domain has more)."""
    reference_size: int = 256
    """Probe reference examples (context, target), from sources held out of the corpus."""
    reference_domain: str = "python_docs"
    """Domain the reference set, the eval set and most held-out documents are drawn from (any but junk)."""
    eval_size: int = 128
    """Evaluation examples (eval_lambada.jsonl), from other held-out sources than the reference set's."""
    heldout_docs_reference_domain: int = 64
    """Held-out documents of the reference domain (heldout.jsonl), from the evaluation sources."""
    heldout_docs_per_domain: int = 16
    """Held-out documents of every other domain, junk included (heldout.jsonl)."""
    min_chars: int = 200
    """Shortest document; shorter consecutive pieces of one source file are merged."""
    max_chars: int = 2000
    """Longest document; longer texts are split at paragraph or line boundaries."""

    def __post_init__(self) -> None:
        if self.reference_domain not in REAL_DOMAINS:
            raise ValueError(
                f"EmbeddedCorpusConfig.reference_domain={self.reference_domain!r}: "
                f"choose one of {REAL_DOMAINS}"
            )
        if self.max_docs_per_domain < 1:
            raise ValueError(
                f"EmbeddedCorpusConfig.max_docs_per_domain={self.max_docs_per_domain}: must be >= 1"
            )
        if self.reference_size < 1:
            raise ValueError(
                f"EmbeddedCorpusConfig.reference_size={self.reference_size}: must be >= 1 "
                "(the probe needs a reference set)"
            )
        for name in ("eval_size", "heldout_docs_reference_domain", "heldout_docs_per_domain"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"EmbeddedCorpusConfig.{name}={getattr(self, name)}: must be >= 1 "
                    "(the evaluation sets need examples of every domain)"
                )
        if self.min_chars < 1:
            raise ValueError(f"EmbeddedCorpusConfig.min_chars={self.min_chars}: must be >= 1")
        if self.max_chars <= self.min_chars:
            raise ValueError(
                f"EmbeddedCorpusConfig.max_chars={self.max_chars}: must be greater than "
                f"min_chars={self.min_chars} (e.g. 10 * min_chars)"
            )


# ----------------------------------------------------------------------------------------------- reference
