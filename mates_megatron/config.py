"""Plugin configuration: typed dataclasses at the core; argparse/YAML only at the edges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mates_megatron.influence.config import InfluenceConfig


@dataclass
class SelectionConfig:
    """Where candidates come from, how they are scored and how each round's training data is chosen."""

    pool: str = "indexed"
    """Pool backend (mates_megatron.pool.POOLS): 'indexed' (the run's Megatron .bin/.idx through GPTDataset),
    'webdataset' or 'energon' (a Megatron-Energon prepared WebDataset; `pip install 'mates-megatron[energon]'`)."""
    shards: str | None = None
    """Directory of WebDataset tar shards with manifest.json (pool='webdataset'), or the root of an
    Energon-prepared dataset, the directory holding .nv-meta/ (pool='energon')."""
    energon_split: str = "train"
    """Split of the Energon dataset whose samples are the candidates (pool='energon'): a split part of its
    .nv-meta/split.yaml."""
    energon_text_field: str = "text"
    """Field of each Energon sample holding the document's text (pool='energon'): an attribute of the sample
    type its dataset.yaml declares ('text' for TextSample), or for a CrudeWebdataset a part in Energon's field
    syntax ('txt', 'json[text]')."""
    energon_domain_field: str | None = None
    """Where an Energon sample's domain comes from (pool='energon'): a part in Energon's field syntax
    ('json[domain]', 'domain.txt'), '__shard__' (each shard is one domain), or None (unknown)."""
    select_every: int = 50
    """Training steps per round; a new selection is served every select_every steps."""
    selection_ratio: float = 0.2
    """Fraction of a round's candidates that it trains on (the round's pool is 1/ratio x its batches)."""
    selector: str = "random"
    """Selector (mates_megatron.selectors.SELECTORS): random, topk, gumbel (Gumbel-top-k, MATES) or importance
    (Gumbel-top-k on raw log importance weights at temperature 1: DSIR's resampling, with scorer 'dsir')."""
    temperature: float = 0.5
    """Gumbel-top-k temperature (selector 'gumbel'), applied to scores z-scored within the round."""
    mixture_weights: str | None = None
    """Domain-weight file that selector 'mixture' serves (written by `mates-megatron mixture fit|predict`, or
    by hand; see mates_megatron.mixture.weights): each round's selection follows its weights, drawn from
    per-domain streams. Re-read at every round boundary: append a schedule entry to change the weights of
    rounds not yet drawn."""
    mixture_when_short: str = "redistribute"
    """Selector 'mixture', when a domain has fewer candidates left than its quota: 'redistribute' (it gives
    what it has and the rest goes to the domains with data left, by weight; logged) or 'error' (stop)."""
    scorer: str = "none"
    """Scorer (mates_megatron.scorers.SCORERS) that gives every candidate of a round a score for the
    selector: 'none' (score-free selectors), 'mates' (probes on the live model + data influence model),
    'static' (MATES's influence model fitted at the first scored round only, then reused), 'dsir' (hashed
    n-gram importance weights toward the probe reference), 'classifier' (probe reference vs pool, hashed
    n-grams + logistic regression) or one of your own."""
    scorer_options: dict[str, Any] = field(default_factory=dict)
    """Fields of the scorer's own config dataclass (``Scorer.Config``), for scorers that have one."""
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
    probe_samples: int = 256
    """Probe samples per round (scorer 'mates'): drawn afresh (seeded) from the next round's candidates,
    scored on the live model, and used as the influence model's training pairs."""
    estimator: str = "linearized"
    """How probes are scored (mates_megatron.probe.estimators.ESTIMATORS): 'linearized' (the oracle's
    first-order form: one reference gradient per round and one gradient and optimizer step per probe),
    'forward' (the same first order by forward passes only: each probe's loss derivative along the reference
    gradient preconditioned by Adam's second moment, two batched forward passes of all probes per round;
    `bench probe --config` measures it against the oracle at each scored round), 'oracle' (one optimizer
    step, then the whole reference loss, per probe: the paper, and about a reference set's worth of forward
    passes per probe) or 'mirrored' (one reference step, forward only)."""
    probe_tokens: str = "target"
    """Which reference tokens the probes' reference loss counts: 'target' (the LAMBADA form: the last word
    only, the same loss the run reports) or 'all' (every token of each reference example, context and target:
    a language-modelling loss on the reference text, far less noisy per probe and harder to win with data that
    only teaches word frequencies)."""
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    """The data influence model and its fitting (scorer 'mates')."""
    influence_rounds: int = 1
    """Scorer 'mates': fit each round's influence model on the probes of this round and of the previous
    influence_rounds - 1 scored rounds, each round's probe scores z-scored within their round (the probes of
    past rounds are read again from the pool by id, and predicted once more beside the candidates). 1: this
    round's probes only (the paper). More rounds smooth the selection across rounds: a round whose oracle has
    little to say (a small spread between domains) no longer decides the whole selection alone, at the cost
    of following the live model's newest preference more slowly. The poor-fit guard reads the fit's
    cross-validated Spearman over all its pairs: rounds that disagree lower it."""
    min_influence_spearman: float = 0.1
    """Poor-fit guard (scorers 'mates', 'static'): a round whose influence model's cross-validated Spearman
    against the probes is below this (or undefined) is not selected by its scores: it falls back to a uniform
    random draw of the round (seeded like the warm-up rounds), logged as the round's ``fallback``. -1 turns the
    guard off."""
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
        from mates_megatron.probe.estimators import ESTIMATORS
        from mates_megatron.registry import import_modules
        from mates_megatron.scorers import SCORERS
        from mates_megatron.selectors import SELECTORS

        import_modules(self.imports)
        if self.selector == "mates":
            raise ValueError(
                "SelectionConfig.selector='mates' is now two settings: selector: gumbel (Gumbel-top-k) with "
                "scorer: mates (probes + influence model)"
            )
        for name, registry in (("pool", POOLS), ("selector", SELECTORS), ("scorer", SCORERS)):
            if getattr(self, name) not in registry:
                raise ValueError(
                    f"SelectionConfig.{name}={getattr(self, name)!r}: choose one of {', '.join(registry.names())}"
                )
        POOLS.get(self.pool).check_config(self)
        if (self.selector == "mixture") != bool(self.mixture_weights):
            raise ValueError(
                "selector 'mixture' needs mixture_weights (a domain-weight file), and mixture_weights is read by "
                f"selector 'mixture' only; got selector={self.selector!r}, mixture_weights={self.mixture_weights!r}"
            )
        from mates_megatron.selectors.mixture import WHEN_SHORT

        if self.mixture_when_short not in WHEN_SHORT:
            raise ValueError(
                f"SelectionConfig.mixture_when_short={self.mixture_when_short!r}: use one of {', '.join(WHEN_SHORT)}"
            )
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
        if not -1 <= self.min_influence_spearman <= 1:
            raise ValueError(
                f"SelectionConfig.min_influence_spearman={self.min_influence_spearman} must be in [-1, 1] "
                "(-1: no guard)"
            )
        if self.influence_rounds < 1:
            raise ValueError(
                f"SelectionConfig.influence_rounds={self.influence_rounds} must be >= 1 (1: this round's "
                "probes only, the paper)"
            )
        if self.temperature < 0:
            raise ValueError(f"SelectionConfig.temperature={self.temperature} must be >= 0 (0: exact top-k)")
        if self.probe_tokens not in ("target", "all"):
            raise ValueError(f"SelectionConfig.probe_tokens={self.probe_tokens!r}: use 'target' or 'all'")
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"SelectionConfig.estimator={self.estimator!r}: choose one of {', '.join(ESTIMATORS.names())}"
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
        scorer = SCORERS.get(self.scorer)
        scorer.check_config(self)
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

        return "reference" in SCORERS.get(self.scorer).needs

    @property
    def needs_text_decoding(self) -> bool:
        """Whether the host must pass its pretraining tokenizer: the pool tokenises text itself (a pool
        class that declares ``tokenizes_text``, e.g. 'energon'), or the scorer reads text and the pool holds token ids,
        or the influence encoder reads the pool's ids (``influence.pass_token_ids``, checked against it)."""
        from mates_megatron.pool import POOLS
        from mates_megatron.scorers import SCORERS

        pool = POOLS.get(self.pool)
        if pool.tokenizes_text:
            return True
        reads_text = "text" in SCORERS.get(self.scorer).needs
        return reads_text and (pool.decodes_text or self.influence.pass_token_ids)

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
        return cls.build(self, pool)

    def samples_per_round(self, global_batch_size: int) -> int:
        return self.select_every * global_batch_size

    def candidates_per_round(self, global_batch_size: int) -> int:
        return int(round(self.samples_per_round(global_batch_size) / self.selection_ratio))
