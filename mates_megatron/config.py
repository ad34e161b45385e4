"""Plugin configuration: typed dataclasses at the core; argparse/YAML only at the edges."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SelectionConfig:
    """Where candidates come from, how they are scored and how each round's training data is chosen."""

    pool: str = "indexed"
    """Pool backend (mates_megatron.pool.POOLS): 'indexed' (the run's Megatron .bin/.idx through GPTDataset),
    'webdataset' (shards written by `mates-megatron prepare`) or 'energon' (a Megatron-Energon prepared
    WebDataset; `pip install 'mates-megatron[energon]'`). In YAML also a section: ``pool: {kind: webdataset,
    shards: DIR}`` (the kind, then its options)."""
    pool_options: dict[str, Any] = field(default_factory=dict)
    """Fields of the pool's own config dataclass (``WebDatasetPoolConfig``: shards; ``EnergonPoolConfig``:
    shards, split, text_field, domain_field); ``pool_config`` is the built dataclass."""
    select_every: int = 50
    """Training steps per round; a new selection is served every select_every steps."""
    selection_ratio: float = 0.2
    """Fraction of a round's candidates that it trains on (the round's pool is 1/ratio x its batches)."""
    selector: str = "random"
    """Selector (mates_megatron.selectors.SELECTORS): random, topk, gumbel (Gumbel-top-k, MATES; option
    temperature), importance (Gumbel-top-k on raw log importance weights at temperature 1: DSIR's resampling,
    with scorer 'dsir') or mixture (domain weights from a file; options weights, when_short). In YAML also a
    section: ``selector: {kind: gumbel, temperature: 0.5}``."""
    selector_options: dict[str, Any] = field(default_factory=dict)
    """Fields of the selector's own config dataclass (``GumbelConfig``, ``MixtureConfig``);
    ``selector_config`` is the built dataclass."""
    scorer: str = "none"
    """Scorer (mates_megatron.scorers.SCORERS) that gives every candidate of a round a score for the
    selector: 'none' (score-free selectors), 'mates' (probes on the live model + data influence model),
    'static' (MATES's influence model fitted at the first scored round only, then reused), 'dsir' (hashed
    n-gram importance weights toward the probe reference), 'classifier' (probe reference vs pool, hashed
    n-grams + logistic regression) or one of your own. In YAML also a section: ``scorer: {kind: mates,
    probe_samples: 256, influence: {...}}`` (the kind, then its options)."""
    scorer_options: dict[str, Any] = field(default_factory=dict)
    """Fields of the scorer's own config dataclass (``Scorer.Config``, e.g. ``MatesConfig`` for 'mates'),
    validated against it; ``scorer_config`` is the built dataclass."""
    filters: list[dict[str, Any]] = field(default_factory=list)
    """Stacked selection (as Group-MATES and DCLM run it: a cheap filter first): scorers that each keep the
    best-scored fraction of a scored round's candidates, in order, before the scorer above scores what is left
    and the selector chooses from it: ``[{kind: classifier, keep: 0.5, ...its options}]`` (one filter's kept
    candidates are the next one's pool). Warm-up rounds are not filtered; a round that falls back to random
    draws from the kept candidates. YAML (or --mates-config) only: no flag."""
    imports: list[str] = field(default_factory=list)
    """Python modules imported before the names above are looked up: where your own scorers, selectors or
    pools register themselves."""
    seed: int = 0
    """Seed of the round split, the selector and the serving order."""
    run_name: str = "default"
    """Name of this run's selection files beside WebDataset shards (SHARDS/mates/RUN_NAME/)."""
    warmup_steps: int = 0
    """Steps trained on random selection before the first scored round (a multiple of select_every; scorers
    that read the live model need at least one round, since round 0 is chosen before the model has trained)."""
    max_selection_cost: float = 0.1
    """Largest projected selection cost per round, as a fraction of the round's training time, that the run
    starts with (projected in seconds on cost_machine from the config, the model shape and the parallel layout
    before the first step, see mates_megatron.cost); raise it to spend more."""
    cost_machine: str = "h100"
    """Machine constants the cost projection uses (mates_megatron.cost.machine.MACHINES): 'h100' (public H100 SXM
    figures) or 'cpu-2core' (calibrated on the project's 2-core CPU machine)."""
    influence_ranks: list[int] | None = None
    """Global ranks that fit and run the influence model (default: all); scores reach every rank by broadcast."""
    probe_lead_steps: int = 0
    """Probe round r this many steps before it starts (at step r * select_every - probe_lead_steps) and publish
    its selection when it starts; 0: probe at the round boundary. The selection depends on the model at the
    probe step, so a lead makes it that many steps older."""
    asynchronous: bool = False
    """Run the influence stage (fit and predict, scorer 'mates') in side processes, one per influence rank,
    while training goes on for probe_lead_steps; training waits (logged as the round's stall) when it is
    late. The selection is the synchronous one, whatever the timing. The pool must pickle; the workers meet
    at this host's address (set MATES_INFLUENCE_WORKER_ADDR where that is not reachable from other nodes)."""

    def __post_init__(self) -> None:
        from mates_megatron.pool import POOLS
        from mates_megatron.registry import import_modules
        from mates_megatron.scorers import SCORERS
        from mates_megatron.selectors import SELECTORS

        import_modules(self.imports)
        if self.selector == "mates":
            raise ValueError(
                "SelectionConfig.selector='mates' is now two settings: selector: gumbel (Gumbel-top-k) with "
                "scorer: mates (probes + influence model)"
            )
        registries = component_registries()
        for name, registry in registries.items():
            if getattr(self, name) not in registry:
                raise ValueError(
                    f"SelectionConfig.{name}={getattr(self, name)!r}: choose one of {', '.join(registry.names())}"
                )
        # Not fields: each component's options built from its *_options here, so a config always carries them
        # checked, and spelled out in full (equal configs compare equal).
        for kind, registry in registries.items():
            cls = registry.get(getattr(self, kind))
            config = cls.build_options(getattr(self, f"{kind}_options"), name=getattr(self, kind),
                                       where=f"selection.{kind}_options")  # fmt: skip
            setattr(self, f"{kind}_config", config)
            if config is not None:
                setattr(self, f"{kind}_options", dataclasses.asdict(config))
        POOLS.get(self.pool).check_config(self.pool_config)
        if self.select_every < 1:
            raise ValueError(f"SelectionConfig.select_every must be >= 1, got {self.select_every}")
        if not 0 < self.selection_ratio <= 1:
            raise ValueError(f"SelectionConfig.selection_ratio={self.selection_ratio} must be in (0, 1]")
        if not self.max_selection_cost > 0:
            raise ValueError(
                f"SelectionConfig.max_selection_cost={self.max_selection_cost} must be > 0 (a fraction of "
                "training time, e.g. 0.1)"
            )
        from mates_megatron.cost.machine import MACHINES

        if self.cost_machine not in MACHINES:
            raise ValueError(
                f"SelectionConfig.cost_machine={self.cost_machine!r}: choose one of {', '.join(MACHINES)}"
            )
        if self.warmup_steps < 0 or self.warmup_steps % self.select_every:
            raise ValueError(
                f"SelectionConfig.warmup_steps={self.warmup_steps} must be a non-negative multiple of "
                f"select_every={self.select_every} (warm-up is whole random rounds)"
            )
        needs_scores = SELECTORS.get(self.selector).needs_scores
        if needs_scores and self.scorer == "none":
            raise ValueError(
                f"selector {self.selector!r} ranks candidates by score: set scorer (e.g. scorer: mates); "
                f"registered: {', '.join(n for n in SCORERS.names() if n != 'none')}"
            )
        if not needs_scores and self.scorer != "none":
            raise ValueError(
                f"selector {self.selector!r} ignores scores, so scorer {self.scorer!r} would run for nothing: "
                "set scorer: none, or a selector that reads scores (topk, gumbel)"
            )
        self.filter_stages = self._filter_stages()
        scorer = SCORERS.get(self.scorer)
        if SELECTORS.get(self.selector).needs_features and not scorer.gives_features:
            raise ValueError(
                f"selector {self.selector!r} reads the candidates' embeddings, and scorer {self.scorer!r} gives "
                f"none: choose a scorer that does ({', '.join(n for n, c in SCORERS.items() if c.gives_features)})"
            )
        if scorer.gives_lazy_scores and not SELECTORS.get(self.selector).lazy_scores:
            raise ValueError(
                f"scorer {self.scorer!r} computes each candidate's score where the selector reads it, and "
                f"selector {self.selector!r} reads every score at once: use a selector that reads them lazily "
                f"({', '.join(n for n, c in SELECTORS.items() if c.lazy_scores)})"
            )
        scorer.check_config(self.scorer_config, self.scorer_context())
        if "live_model" in scorer.needs and self.warmup_steps == 0:
            raise ValueError(
                f"scorer {self.scorer!r} scores candidates with the trained model, but round 0 is chosen "
                f"before training starts: set warmup_steps to at least select_every ({self.select_every})"
            )
        self._check_lead(scorer)
        if self.influence_ranks is not None and (not self.influence_ranks or min(self.influence_ranks) < 0):
            raise ValueError(
                f"SelectionConfig.influence_ranks={self.influence_ranks} must be a non-empty list of ranks"
            )

    def _filter_stages(self) -> list[tuple[str, float, Any]]:
        """``filters`` as (scorer name, kept fraction, its built options), each checked."""
        from mates_megatron.scorers import SCORERS

        stages = []
        for i, stage in enumerate(self.filters):
            where = f"selection.filters[{i}]"
            if not isinstance(stage, Mapping) or "kind" not in stage or "keep" not in stage:
                raise ValueError(
                    f"{where}={stage!r}: a filter is a mapping with 'kind' (a scorer) and 'keep' (the fraction of "
                    "the candidates it keeps), e.g. {kind: classifier, keep: 0.5}"
                )
            options = {k: v for k, v in stage.items() if k not in ("kind", "keep")}
            name, keep = stage["kind"], stage["keep"]
            if name not in SCORERS or name == "none":
                raise ValueError(f"{where}.kind={name!r}: choose a scorer ({', '.join(SCORERS.names())})")
            if not isinstance(keep, int | float) or not 0 < keep <= 1:
                raise ValueError(f"{where}.keep={keep!r} must be a fraction in (0, 1]")
            cls = SCORERS.get(name)
            if cls.gives_lazy_scores:
                raise ValueError(
                    f"{where}.kind={name!r} scores candidates only where a selector reads them, so it cannot "
                    "filter a round: filter with a scorer that scores every candidate (e.g. classifier)"
                )
            config = cls.build_options(options, name=name, where=where)
            cls.check_config(config, self.scorer_context())
            stages.append((name, float(keep), config))
        if stages and not self.scored:
            raise ValueError(
                "selection.filters narrow the candidates of scored rounds: set a scorer (and selector)"
            )
        kept = math.prod(keep for _, keep, _ in stages)
        if kept < self.selection_ratio:
            raise ValueError(
                f"selection.filters keep {kept:g} of a round's candidates, fewer than the selection_ratio "
                f"{self.selection_ratio:g} it trains on: keep more"
            )
        return stages

    def build_filters(self, *, device: Any = None, pool: Any = None) -> list[tuple[Any, float]]:
        """The ``filters`` as (scorer, kept fraction), in order."""
        from mates_megatron.scorers import SCORERS

        ctx = self.scorer_context(device=device, pool=pool)
        return [(SCORERS.get(name)(config, context=ctx), keep) for name, keep, config in self.filter_stages]

    def _check_lead(self, scorer) -> None:
        if self.probe_lead_steps < 0:
            raise ValueError(f"SelectionConfig.probe_lead_steps={self.probe_lead_steps} must be >= 0")
        if self.probe_lead_steps and not self.scored:
            raise ValueError(
                f"SelectionConfig.probe_lead_steps={self.probe_lead_steps} prepares scored rounds ahead, but "
                "scorer is 'none': set it to 0"
            )
        # The first scored round's first step (round 0 is always chosen at random, before training).
        first = max(self.warmup_steps // self.select_every, 1) * self.select_every
        if self.probe_lead_steps >= first:
            raise ValueError(
                f"SelectionConfig.probe_lead_steps={self.probe_lead_steps}: the first scored round starts at step "
                f"{first}, so its probes would come before the first training step; use at most {first - 1} "
                "(or raise warmup_steps)"
            )
        if self.asynchronous:
            if not scorer.has_influence_stage:
                raise ValueError(
                    f"SelectionConfig.asynchronous runs the influence stage beside training, and scorer "
                    f"{self.scorer!r} has none: set asynchronous: false"
                )
            if self.probe_lead_steps < 1:
                raise ValueError(
                    "SelectionConfig.asynchronous needs probe_lead_steps >= 1: the influence stage runs while "
                    "those steps train (e.g. select_every // 2); with 0 training would wait for all of it"
                )

    @property
    def scored(self) -> bool:
        """Whether rounds after the warm-up run a scorer."""
        return self.scorer != "none"

    @property
    def needs_reference(self) -> bool:
        """Whether the scorer reads the probe reference set (the host must load one)."""
        from mates_megatron.scorers import SCORERS

        return any("reference" in SCORERS.get(n).needs for n in self._scorer_names())

    def _scorer_names(self) -> list[str]:
        """The scorer and the filters' scorers."""
        return [self.scorer, *(name for name, _, _ in self.filter_stages)]

    @property
    def needs_text_decoding(self) -> bool:
        """Whether the host must pass its pretraining tokenizer: the pool tokenises text itself (a pool
        class that declares ``tokenizes_text``, e.g. 'energon'), or the scorer reads text and the pool holds token ids,
        or the scorer reads the pool's ids through its encoder (``Scorer.reads_token_ids``, e.g. 'mates' with
        ``influence.pass_token_ids``: checked against the tokenizer)."""
        from mates_megatron.pool import POOLS
        from mates_megatron.scorers import SCORERS

        pool = POOLS.get(self.pool)
        if pool.tokenizes_text:
            return True
        scorer = SCORERS.get(self.scorer)
        reads_text = any("text" in SCORERS.get(n).needs for n in self._scorer_names())
        return reads_text and (pool.decodes_text or scorer.reads_token_ids(self.scorer_config))

    @property
    def pool_is_host_dataset(self) -> bool:
        """Whether the candidates are the host's own train dataset (sized by ``plugin.pool_num_samples``)."""
        from mates_megatron.pool import POOLS

        return POOLS.get(self.pool).host_dataset

    @property
    def state_rank(self) -> int:
        """The rank whose plugin state is complete: 0, or the first influence rank when rank 0 fits no
        influence model (the weights are the same on every member, and absent elsewhere)."""
        ranks = self.influence_ranks if self.scored else None
        return 0 if not ranks or 0 in ranks else min(ranks)

    @property
    def warmup_rounds(self) -> int:
        return self.warmup_steps // self.select_every if self.scored else 0

    def build_selector(self, pool=None):
        """The configured selector (``Selector.build``); one ``built_on_pool`` (e.g. 'mixture', which reads the
        pool's domains) needs the pool."""
        from mates_megatron.selectors import SELECTORS

        cls = SELECTORS.get(self.selector)
        if cls.built_on_pool and pool is None:
            raise ValueError(
                f"selector {self.selector!r} is built on the pool: pass build_selector(pool=...)"
            )
        return cls.build(self.selector_config, seed=self.seed, pool=pool)

    def scorer_context(self, *, device: Any = None, pool: Any = None):
        """The ``ScorerContext`` of this run: what a scorer reads of it besides its own options."""
        from mates_megatron.scorers.base import ScorerContext

        return ScorerContext(
            seed=self.seed, device=device, pool=pool, influence_ranks=self.influence_ranks,
            asynchronous=self.asynchronous, imports=tuple(self.imports),
        )  # fmt: skip

    def build_scorer(self, *, device: Any = None, pool: Any = None, **kw: Any):
        """The configured scorer on its options and this run's context (collective for 'mates': its
        influence group is created on every rank)."""
        from mates_megatron.scorers import SCORERS

        return SCORERS.get(self.scorer)(
            self.scorer_config, context=self.scorer_context(device=device, pool=pool), **kw
        )

    @classmethod
    def option_sections(cls, data: Mapping[str, Any]) -> dict[str, type]:
        """The ``*_options`` dataclasses (each named component's ``Config``), for ``configio.check_sections``."""
        from mates_megatron.registry import import_modules

        import_modules(list(data.get("imports") or []))
        out = {}
        for kind, registry in component_registries().items():
            name = data.get(kind, DEFAULTS[kind])
            config = registry.get(name).Config if isinstance(name, str) and name in registry else None
            if config is not None:
                out[f"{kind}_options"] = config
        return out

    @classmethod
    def normalize_mapping(cls, data: Mapping[str, Any], *, where: str, path: str = "") -> dict[str, Any]:
        """A YAML/flag mapping in today's spelling (``configio.build`` calls this first): a ``pool:``,
        ``selector:`` or ``scorer:`` section becomes the name + ``*_options``, and the flat keys of earlier releases move with a
        FutureWarning that names the new key (``legacy.py``)."""
        from mates_megatron.legacy import normalize_selection

        known = {f.name for f in dataclasses.fields(cls)}
        return normalize_selection(
            data, where=where, path=path, known=known, defaults=DEFAULTS, registries=component_registries()
        )

    def samples_per_round(self, global_batch_size: int) -> int:
        return self.select_every * global_batch_size

    def candidates_per_round(self, global_batch_size: int) -> int:
        return int(round(self.samples_per_round(global_batch_size) / self.selection_ratio))

    def scored_candidates_per_round(self, global_batch_size: int) -> int:
        """Candidates the scorer scores in a scored round: the round's, after each filter keeps its fraction
        (rounded up, as the hook keeps them)."""
        n = self.candidates_per_round(global_batch_size)
        for _, keep, _ in self.filter_stages:
            n = math.ceil(keep * n)
        return n


DEFAULTS = {"pool": "indexed", "selector": "random", "scorer": "none"}
"""The default of each component field (SelectionConfig's)."""


def component_registries() -> dict:
    """Each component kind's registry, by the SelectionConfig field that names it."""
    from mates_megatron.pool import POOLS
    from mates_megatron.scorers import SCORERS
    from mates_megatron.selectors import SELECTORS

    return {"pool": POOLS, "selector": SELECTORS, "scorer": SCORERS}


def selection_flags(prefix: str, *, path: str = "") -> list:
    """``flags.Flag``s of a selection config: one per SelectionConfig field, and the options of the built-in
    components under the spellings of earlier releases: every ``MatesConfig`` field at ``scorer_options``
    (``--mates-probe-samples``, ``--mates-influence-lr``), ``--mates-temperature``, ``--mates-mixture-*``,
    ``--mates-shards`` and ``--mates-energon-*``. With a component that does not take one, it is refused as an
    option that component does not take."""
    from mates_megatron.flags import dataclass_flags, named_flags
    from mates_megatron.pool.options import EnergonPoolConfig
    from mates_megatron.scorers.mates import MatesConfig
    from mates_megatron.selectors.basic import GumbelConfig
    from mates_megatron.selectors.mixture import MixtureConfig

    def at(section: str, flags: list) -> list:
        return [dataclasses.replace(f, path=f"{path}{section}.{f.path}") for f in flags]

    m = prefix
    return [
        *dataclass_flags(SelectionConfig, prefix, path=path, exclude=("filters",)),
        *dataclass_flags(MatesConfig, prefix, path=f"{path}scorer_options."),
        *at("selector_options", named_flags(GumbelConfig, {f"{m}temperature": "temperature"})),
        *at("selector_options", dataclass_flags(MixtureConfig, f"{m}mixture-")),
        *at("pool_options", named_flags(EnergonPoolConfig, {
            f"{m}shards": "shards", f"{m}energon-split": "split", f"{m}energon-text-field": "text_field",
            f"{m}energon-domain-field": "domain_field",
        })),
    ]  # fmt: skip
