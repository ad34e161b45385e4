"""The Scorer interface: whatever gives each candidate of the next round a score for the selector.

Contract: ``score(round_input) -> Scores`` returns one finite float64 per candidate, in the order of
``round_input.candidates``, lower = more useful, identical on every rank (a scorer that computes on some
ranks broadcasts). It is called once per scored round at the step boundary before the round, inside a
scope seeded by (seed, round), so any randomness it draws repeats exactly on resume. It must leave the
host's model, optimizer and RNG streams as it found them.

A scored round may be prepared ahead (``SelectionConfig.probe_lead_steps``): ``begin`` reads the live model
at the probe step and returns a ``PendingScores``; the round's ``result()`` is taken at the round's first
step. The default ``begin`` scores at once; a scorer with work that needs no live model (the 'mates'
influence stage) may leave it running in a side process until ``result()``. Both are called on every rank
at the same steps.

A scorer declares what it needs (``needs``) so the configuration is refused early when the run cannot
provide it: 'live_model' (it reads the model being trained: the first round must be a warm-up round),
'reference' (the probe reference set), 'text' (candidates' text: an indexed pool needs the tokenizer),
'tokens' (candidates' token ids). A scorer is built from its own options (``Config``, from the selection's
``scorer:`` section) and a ``ScorerContext`` (the seed and the runtime objects it may use); it never sees the
whole ``SelectionConfig``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mates_megatron.component import Component
from mates_megatron.registry import Registry

if TYPE_CHECKING:
    from mates_megatron.cost import RoundCost
    from mates_megatron.host import Host
    from mates_megatron.pool.base import CandidatePool

NEEDS = frozenset({"live_model", "reference", "text", "tokens"})


@dataclass(frozen=True)
class ScorerContext:
    """What a scorer is given besides its options: the run's settings it may read and its runtime objects
    (``SelectionConfig.scorer_context`` builds a run's)."""

    seed: int = 0
    """The selection seed (every draw a scorer makes is seeded from it and the round)."""
    device: Any = None
    """The training device (the scorer's models run there); None: CPU."""
    pool: CandidatePool | None = None
    """The run's candidate pool (the asynchronous influence workers read it); None offline."""
    influence_ranks: list[int] | None = None
    """Global ranks that fit and run an influence model (None: all)."""
    asynchronous: bool = False
    """Whether the influence stage runs in side processes (``SelectionConfig.asynchronous``)."""
    imports: tuple[str, ...] = ()
    """Modules the run imported for its registrations (side processes import them again)."""


@dataclass
class RoundInput:
    """What a scorer is given for one round."""

    round: int
    """The round being chosen."""
    candidates: np.ndarray
    """Its int32 candidate ids (the order of the scores to return)."""
    pool: CandidatePool
    """Candidates by id: ``text``, ``tokens``, ``domain_ids``, ``training_sample``."""
    host: Host | None
    """The live training job (model, optimizer, reference set, process groups). None offline, in
    ``mates-megatron value``: only an OT scorer given its reference file when built runs without a host."""
    seed: int
    """The selection seed."""


@dataclass
class Scores:
    scores: np.ndarray | Callable[[np.ndarray], np.ndarray]
    """float64 per candidate, lower = more useful. Or, from a scorer that declares ``gives_lazy_scores``, a
    callable from positions in the candidates to their scores, computed when read (for selectors that declare
    ``Selector.lazy_scores``)."""
    record: dict[str, Any] = field(default_factory=dict)
    """JSON-ready numbers for the round's record (logged as ``mates/<key>`` when scalar)."""
    features: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None
    """Per-candidate embeddings in candidate order, for selectors that read them (``Selector.needs_features``,
    e.g. 'cluster_greedy'); given by scorers that declare ``gives_features``. Or a callable from positions in
    the candidates to their rows, computed when read, so a selector that spreads its work over the ranks has
    each rank embed only its part."""
    fallback: str | None = None
    """Why these scores must not be used (e.g. a poor influence fit): the round then takes a uniform random
    draw instead, seeded by (seed, round), and records the reason; None: select by the scores."""


class PendingScores:
    """A round's scores, ready now (``PendingScores(scores)``) or when ``finish`` returns them."""

    def __init__(self, scores: Scores | None = None, *, finish=None) -> None:
        if (scores is None) == (finish is None):
            raise ValueError("PendingScores takes the scores or a finish callable, not both")
        self._scores, self._finish = scores, finish

    def result(self) -> Scores:
        """The scores (waits for the side work; collective over the world when it gathers)."""
        if self._scores is None:
            self._scores, self._finish = self._finish(), None
        return self._scores


class Scorer(Component, ABC):
    """Base class: subclass, set ``needs`` (and ``Config``), implement ``score``, register by name."""

    needs: ClassVar[frozenset[str]] = frozenset()
    Config: ClassVar[type | None] = None
    """Dataclass of the scorer's options (the ``scorer:`` section); None: it takes none."""
    stateful: ClassVar[bool] = True  # the hook saves every scorer's state_dict (stateless ones give {})
    gives_features: ClassVar[bool] = False
    """Whether its ``Scores`` carry the candidates' embeddings (``Scores.features``)."""
    gives_lazy_scores: ClassVar[bool] = False
    """Whether its ``Scores.scores`` is a callable from positions to scores (computed where a selector reads
    them): it can then only feed a selector with ``lazy_scores``, and cannot filter."""
    has_influence_stage: ClassVar[bool] = False
    """Whether its work after the probes needs no live model and can run in side processes
    (``SelectionConfig.asynchronous``), as the 'mates' influence stage does."""

    def __init__(self, config: Any = None, *, context: ScorerContext | None = None, **_: Any) -> None:
        self.config, self.context = config, context or ScorerContext()
        self.device = self.context.device

    @classmethod
    def check_config(cls, config: Any, context: ScorerContext) -> None:
        """Refuse options or run settings this scorer cannot run with (ValueError naming the field and fix);
        ``config`` is already its validated ``Config``."""
        unknown = cls.needs - NEEDS
        if unknown:
            raise ValueError(
                f"{cls.__name__}.needs has unknown entries {sorted(unknown)}; use {sorted(NEEDS)}"
            )

    @classmethod
    def reads_token_ids(cls, config: Any) -> bool:
        """Whether it reads candidates as the pretraining tokenizer's ids through an encoder with the same
        vocabulary (``influence.pass_token_ids``), so the host must pass its tokenizer to check it."""
        return False

    @classmethod
    def projected_cost(cls, config: Any, selection: Any, **shape: Any) -> RoundCost | None:
        """The round's projected FLOPs against training's (``mates_megatron.cost``), from its options, the
        run's round sizes (``selection``: the run's SelectionConfig, which scorers do not import) and ``shape`` (model: TransformerShape, seq_length, global_batch_size,
        reference_rows); None when this scorer has no cost model (nothing is checked then)."""
        return None

    @abstractmethod
    def score(self, round_input: RoundInput) -> Scores:
        """One score per candidate of the round (see the module contract)."""

    def begin(self, round_input: RoundInput) -> PendingScores:
        """Start the round at its probe step; ``result()`` is taken when the round starts."""
        return PendingScores(self.score(round_input))

    def close(self) -> None:
        """Release side processes (asynchronous influence workers); nothing by default."""
        return None


SCORERS: Registry[type[Scorer]] = Registry("scorer", base=Scorer)


@SCORERS.register("none")
class NoScorer(Scorer):
    """No scores: for selectors that ignore them (random)."""

    def score(self, round_input: RoundInput) -> Scores:
        raise RuntimeError(
            "scorer 'none' gives no scores: the round calls no scorer for a score-free selector"
        )
