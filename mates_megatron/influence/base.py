"""The influence model's interface, its fit report, and the sharding helpers its implementations share.

An implementation is one file: a subclass of ``InfluenceModel`` added to ``registry.INFLUENCE_MODELS``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.component import Component
from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.influence.encoder import check_encoder_path, resolve_device

MIN_PAIRS = 10
"""Fewest (text, score) pairs any influence model fits on."""


@dataclass
class FitResult:
    """How well a fit ranks pairs it did not train on."""

    spearman: float
    """Held-out Spearman of the kept model (NaN when undefined, e.g. constant held-out scores)."""
    pearson: float
    """Held-out Pearson of the kept model (NaN when undefined)."""
    best: int
    """Which candidate was kept: the epoch (finetune) or the index into ``ridge.alphas`` (ridge)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per candidate (epoch or strength) with its held-out Spearman and Pearson."""


class InfluenceModel(Component, ABC):
    """Text -> predicted oracle score (lower = more useful, like the oracle), fitted on probe pairs.

    Contract of every implementation:

    - ``__init__(cfg, *, device=None)`` is cheap and draws no random numbers: it checks the device and the
      encoder path and loads nothing. ``device`` is the training device; ``cfg.device`` overrides it; CPU when
      both are None. Weights load (from local files only) when first needed (``fit`` or ``load_state_dict``;
      the fine-tuned model without ``warm_start`` at every ``fit``), right after
      ``torch.manual_seed(cfg.seed)``, so a round's randomness (head init, dropout) depends on the seed alone.
    - ``group`` is the influence process group (None: this process alone). ``fit``, ``predict`` and
      ``fit_predict`` are collective over it: every member calls them with the same arguments.
    - ``fit(texts, scores, *, group, device_group)`` trains on the pairs (at least ``MIN_PAIRS``, all scores
      finite, else ValueError) and returns the held-out (or cross-validated) Spearman/Pearson of the model it
      keeps. ``device_group``: the same members on a backend that reduces tensors where they are (NCCL when
      the device is CUDA, ``group.accelerator_group``), for the fit's tensor collectives; None: ``group`` (gloo,
      through host memory). ``group`` keeps the CPU objects and barriers either way.
    - ``predict(texts, *, group)`` returns a float64 array, one score per text in input order (on the
      z-scored scale of the fit's targets), identical on every member. RuntimeError before any fit or load.
      ``texts`` is a ``Sequence[str]`` that may decode on access (``pool.CandidateTexts``): a member reads
      only its contiguous block (``shard``), streams it in batches, keeps one float32 score per text, and
      gathers the scores (``gather_rows``): host memory follows the member's shard, not the round.
    - ``fit_predict(texts, probe_positions, probe_scores, *, group, device_group)`` fits on
      ``texts[probe_positions]`` and predicts every text; the default is ``fit`` then ``predict``.
    - Candidates and probes are read and tokenised in ``cfg.loader_workers`` DataLoader workers
      (``influence.loader``), with the same scores as in process.
    - ``state_dict()`` is what a checkpoint must hold to predict again, as CPU tensors: what was fitted, not
      what loads from the pretrained files (a frozen encoder is not state); ``{}`` before any fit.
      ``load_state_dict(state)`` restores it (``{}``: nothing to restore).
    """

    name: str = ""

    def __init__(self, cfg: InfluenceConfig, *, device: str | torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device, device)
        check_encoder_path(cfg)

    @abstractmethod
    def fit(
        self, texts: Sequence[str], scores: np.ndarray, *, group=None, device_group=None
    ) -> FitResult: ...

    @abstractmethod
    def predict(self, texts: Sequence[str], *, group=None) -> np.ndarray: ...

    def fit_predict(
        self,
        texts: Sequence[str],
        probe_positions: np.ndarray,
        probe_scores: np.ndarray,
        *,
        group=None,
        device_group=None,
    ) -> tuple[np.ndarray, FitResult]:
        """(predicted score of every text, fit report); see the class contract."""
        probes = [texts[int(i)] for i in probe_positions]
        result = self.fit(probes, probe_scores, group=group, device_group=device_group)
        return self.predict(texts, group=group), result

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_pairs(n_texts: int, scores: np.ndarray, what: str) -> np.ndarray:
    """``scores`` as float64, or ValueError if they do not pair with the texts or cannot be fitted."""
    scores = np.asarray(scores, dtype=np.float64)
    if n_texts != len(scores):
        raise ValueError(f"{what} got {n_texts} texts and {len(scores)} scores")
    if not np.isfinite(scores).all():
        raise ValueError(
            f"{int((~np.isfinite(scores)).sum())} oracle scores are NaN/inf: fix the probes before fitting"
        )
    if len(scores) < MIN_PAIRS:
        raise ValueError(f"{what} needs at least {MIN_PAIRS} (text, score) pairs, got {len(scores)}")
    return scores


def rank_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(n: int, group) -> tuple[int, int, int]:
    """This member's contiguous block [lo, hi) of n items, and the block size every member pads to."""
    rank, size = rank_size(group)
    per = math.ceil(n / size)
    return min(rank * per, n), min((rank + 1) * per, n), per


def gather_rows(out: torch.Tensor, n: int, group) -> np.ndarray:
    """Every member's padded CPU block ``out`` concatenated in rank order, cut to n rows (all members).
    Scores travel as float32 (about 100 MB for 25.6M candidates on every member)."""
    size = rank_size(group)[1]
    if size > 1:
        parts = [torch.zeros_like(out) for _ in range(size)]
        dist.all_gather(parts, out, group=group)
        out = torch.cat(parts)
    return out[:n].numpy()
