"""Embeddings for the OT scorers ('lava', 'gotd', 'lookalike'): the influence encoder, frozen.

The encoder is the one the influence model is built from (``selection.influence``: model_path, max_length,
max_chunks, device), read as mean-pooled last hidden states (``features: encoder``) or mean input word
embeddings (``token_embeddings``), L2-normalised. A candidate's embedding depends on its text alone, so it
is cached by candidate id for the life of the scorer (a pool reused across rounds is embedded once) and
recomputed identically after a resume; nothing is checkpointed.

Known limitation: every rank embeds every candidate of the round (as the 'classifier' scorer scores them);
at 25.6M candidates a round the embedding should be sharded over ranks and gathered, or precomputed by
``mates-megatron value`` and read with the 'values' scorer.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from mates_megatron.ot.valuation import embed_texts
from mates_megatron.pool.base import candidate_inputs
from mates_megatron.scorers.base import RoundInput, Scorer
from mates_megatron.scorers.dsir import reference_texts

FEATURES = ("encoder", "token_embeddings")


def check_features(features: str, where: str) -> None:
    if features not in FEATURES:
        raise ValueError(f"{where}.features={features!r}: use 'encoder' or 'token_embeddings'")


class Embedder:
    """Embeds the reference (once per file) and candidates (once per id) with the influence encoder."""

    def __init__(self, selection, *, features: str, batch_size: int, max_length: int | None, device=None):
        self.selection, self.features, self.batch_size = selection, features, batch_size
        self.max_length, self.device = max_length, device
        self._net = None
        self._reference: tuple[str, np.ndarray] | None = None
        self._cache: dict[int, np.ndarray] = {}

    @classmethod
    def for_options(cls, selection, options, device=None) -> Embedder:
        """From a scorer's options (``features``, ``batch_size``, ``max_length``)."""
        return cls(selection, features=options.features, batch_size=options.batch_size,
                   max_length=options.max_length, device=device)  # fmt: skip

    def net(self):
        if self._net is None:
            from mates_megatron.influence.encoder import EncoderRegressor, resolve_device

            cfg = self.selection.influence
            cfg = replace(cfg, ridge=replace(cfg.ridge, features=self.features))
            if self.max_length is not None:
                cfg = replace(cfg, max_length=self.max_length)
            self._net = EncoderRegressor(cfg).to(resolve_device(cfg.device, self.device))
        return self._net

    def embed(self, texts) -> np.ndarray:
        return embed_texts(self.net(), texts, batch_size=self.batch_size)

    def reference(self, reference: Any, *, scorer: str) -> np.ndarray:
        if self._reference is None or self._reference[0] != reference.path:
            self._reference = (reference.path, self.embed(reference_texts(reference, scorer=scorer)))
        return self._reference[1]

    def candidates(self, pool, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        todo = np.array([i for i in ids.tolist() if i not in self._cache], dtype=ids.dtype)
        if len(todo):
            emb = self.embed(candidate_inputs(pool, todo, token_ids=False))
            self._cache.update(zip(todo.tolist(), emb, strict=True))
        return np.stack([self._cache[i] for i in ids.tolist()])


class EmbeddingScorer(Scorer):
    """A scorer on frozen-encoder embeddings of the reference and the round's candidates ('lava', 'gotd',
    'lookalike'): its ``Config`` carries the ``Embedder`` options (features, batch_size, max_length)."""

    needs: ClassVar[frozenset[str]] = frozenset({"reference", "text"})

    def __init__(self, config: Any = None, *, selection, device=None, **_: Any) -> None:
        super().__init__(config or self.Config(), selection=selection, device=device)
        self.embedder = Embedder.for_options(selection, self.config, device)

    def embed(self, r: RoundInput, *, scorer: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(candidates, reference) embeddings of the round, and the seconds they took."""
        t = time.perf_counter()
        y = self.embedder.reference(r.host.reference, scorer=scorer)
        x = self.embedder.candidates(r.pool, r.candidates)
        return x, y, time.perf_counter() - t
