"""A decoy set for the demo (issue 35, item 8): near-duplicates of a few reference-like documents, added to the
embedded corpus as their own domain.

A static scorer (the classifier, DSIR) values a document by what it looks like, so it keeps choosing the
decoys in every round; a model-aware one (MATES) should stop once the model has learned them, since another
copy then teaches it little. Their share of each round's selection is the figure (`mates-lab bench decoys`).

Each decoy is a copy of one source document with ``edit_rate`` of its space-separated words replaced by other
words of the same document (seeded): the vocabulary, layout and domain stay the source's, the exact text does
not repeat. The sources are a seeded draw of the reference domain's pool documents (python_docs, the domain
the probe reference is drawn from); they stay in the pool as they were.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DecoyConfig:
    sources: int = 4
    """Reference-like documents copied."""
    copies: int = 50
    """Near-duplicates of each source (4 x 50 = 200, 4.4% of the embedded pool's 4,392 documents)."""
    edit_rate: float = 0.05
    """Share of a copy's words replaced."""
    source_domain: str = "python_docs"
    domain: str = "decoy"
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.sources < 1 or self.copies < 1:
            raise ValueError(f"DecoyConfig sources={self.sources}, copies={self.copies}: both must be >= 1")
        if not 0 < self.edit_rate < 1:
            raise ValueError(f"DecoyConfig.edit_rate={self.edit_rate} must be in (0, 1)")


def near_duplicate(text: str, edit_rate: float, rng: np.random.Generator) -> str:
    """``text`` with ``edit_rate`` of its space-separated words (at least one) replaced by other words of it."""
    words = text.split(" ")
    n = len(words)
    if n < 2:
        raise ValueError(f"a decoy source needs at least 2 words, got {text[:60]!r}")
    for p in rng.choice(n, size=max(1, round(edit_rate * n)), replace=False):
        words[p] = words[(p + 1 + rng.integers(n - 1)) % n]  # another position's word: same vocabulary
    return " ".join(words)


def read_corpus(path: Path) -> list[dict[str, str]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def decoy_documents(corpus: list[dict[str, str]], cfg: DecoyConfig) -> tuple[list[dict[str, str]], list[int]]:
    """The decoys (``sources`` x ``copies`` JSONL rows, domain ``cfg.domain``) and their sources' line numbers
    (0-based) in ``corpus``."""
    candidates = [i for i, row in enumerate(corpus) if row.get("domain") == cfg.source_domain]
    if len(candidates) < cfg.sources:
        raise ValueError(
            f"the corpus holds {len(candidates)} {cfg.source_domain!r} documents, the decoys need {cfg.sources}: "
            "lower DecoyConfig.sources"
        )
    rng = np.random.default_rng([cfg.seed, 0xDEC0])
    sources = sorted(int(i) for i in rng.choice(candidates, size=cfg.sources, replace=False))
    decoys = [
        {"text": near_duplicate(corpus[i]["text"], cfg.edit_rate, rng), "domain": cfg.domain}
        for i in sources
        for _ in range(cfg.copies)
    ]
    return decoys, sources


def build_decoy_corpus(src: Path, out: Path, cfg: DecoyConfig) -> dict[str, Any]:
    """``src/corpus.jsonl`` (the embedded corpus) plus the decoys, prepared to ``out/train`` as `mates-megatron
    prepare` does; ``out/decoys.json`` records the config and the sources. Built once: a directory built with
    another config is refused."""
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus

    record = out / "decoys.json"
    if record.is_file():
        built = json.loads(record.read_text())
        if built["config"] != asdict(cfg):
            raise ValueError(
                f"{out} holds decoys built with {built['config']}, not {asdict(cfg)}: remove it or use another --work"
            )
        return built
    corpus = read_corpus(src / "corpus.jsonl")
    decoys, sources = decoy_documents(corpus, cfg)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w") as f:
        for row in corpus + decoys:
            f.write(json.dumps(row) + "\n")
    prepare_corpus(PrepareConfig(input=out / "corpus.jsonl", output_prefix=out / "train"))
    built = {
        "config": asdict(cfg),
        "sources": sources,
        "source_texts": [corpus[i]["text"][:200] for i in sources],
        "documents": len(corpus) + len(decoys),
        "decoys": len(decoys),
        "prefix": str(out / "train"),
    }
    record.write_text(json.dumps(built, indent=1))
    return built
