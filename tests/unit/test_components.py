"""Registered components derive from their kind's base, and the run reads what they declare there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest


def test_a_registry_refuses_a_class_that_does_not_derive_from_its_base():
    from mates_megatron.influence import INFLUENCE_MODELS
    from mates_megatron.pool.base import POOLS
    from mates_megatron.probe.estimators import ESTIMATORS
    from mates_megatron.scorers import SCORERS
    from mates_megatron.selectors import SELECTORS
    from mates_megatron.trace.run import TRACERS

    class Duck:  # has select(), as a Protocol would have accepted
        needs_scores = False

        def select(self, candidates, k, *, scores=None, seed, round_):
            return candidates[:k]

    for registry, base in ((SELECTORS, "selectors.base.Selector"), (SCORERS, "scorers.base.Scorer"),
                           (POOLS, "pool.base.PoolBase"), (ESTIMATORS, "probe.estimators.Estimator"),
                           (TRACERS, "trace.base.Tracer"),
                           (INFLUENCE_MODELS, "influence.base.InfluenceModel")):  # fmt: skip
        with pytest.raises(
            TypeError, match=rf"'Duck' does not derive from mates_megatron\.{base}; subclass it"
        ):
            registry.register("duck")(Duck)
        assert "duck" not in registry


def test_every_kind_derives_from_the_one_component_base():
    from mates_megatron.component import Component
    from mates_megatron.influence import INFLUENCE_MODELS
    from mates_megatron.pool.base import POOLS
    from mates_megatron.probe.estimators import ESTIMATORS
    from mates_megatron.scorers import SCORERS
    from mates_megatron.selectors import SELECTORS
    from mates_megatron.trace.run import TRACERS

    for registry in (SELECTORS, SCORERS, POOLS, ESTIMATORS, TRACERS, INFLUENCE_MODELS):
        assert registry.names() and all(issubclass(cls, Component) for _, cls in registry.items()), (
            registry.kind
        )


def test_trace_options_go_through_the_one_config_path():
    from mates_megatron.trace.bm25 import Bm25Options
    from mates_megatron.trace.run import TraceConfig

    cfg = TraceConfig(method="bm25", shards="s", queries="q", options={"k1": "1.2"})  # a flag's string
    assert cfg.tracer_config == Bm25Options(k1=1.2, b=0.75) and cfg.tracer().options == cfg.tracer_config
    with pytest.raises(
        ValueError, match=r"trace --method bm25 --options: unknown field 'k2'; Bm25Options has: k1, b"
    ):
        TraceConfig(method="bm25", shards="s", queries="q", options={"k2": 1})


def test_a_selector_is_built_from_what_it_declares():
    from mates_megatron.config import SelectionConfig
    from mates_megatron.selectors import SELECTORS, Selector

    @dataclass(frozen=True)
    class FirstKConfig:
        temperature: float = 1.0

    @SELECTORS.register("_first_k")
    @dataclass(frozen=True)
    class FirstK(Selector):
        temperature: float = 1.0
        Config: ClassVar[type] = FirstKConfig

        def select(self, candidates, k, *, scores=None, seed, round_):
            return np.sort(np.asarray(candidates, dtype=np.int32)[:k])

    try:
        sel = SelectionConfig(selector="_first_k", selector_options={"temperature": 0.25})
        built = sel.build_selector()
        # The defaults of the base: built from its options' fields, no state is checkpointed, no summary.
        assert built == FirstK(temperature=0.25)
        assert not built.stateful and built.state_dict() == {} and built.summary() == {}
        assert not FirstK.draws_every_round and not FirstK.built_on_pool
    finally:
        SELECTORS.unregister("_first_k")


def test_a_selector_built_on_the_pool_is_refused_without_one():
    from mates_megatron.config import SelectionConfig
    from mates_megatron.selectors import SELECTORS

    assert SELECTORS.get("mixture").built_on_pool and SELECTORS.get("mixture").stateful
    sel = SelectionConfig.__new__(SelectionConfig)  # skip the file check of __post_init__
    sel.selector = "mixture"
    with pytest.raises(
        ValueError, match=r"selector 'mixture' is built on the pool: pass build_selector\(pool=\.\.\.\)"
    ):
        sel.build_selector()


def test_pool_capabilities_are_declared_on_the_base():
    from mates_megatron.pool.base import POOLS, PoolBase

    assert (PoolBase.host_dataset, PoolBase.decodes_text, PoolBase.tokenizes_text) == (False, False, False)
    declared = {name: (c.host_dataset, c.decodes_text, c.tokenizes_text) for name, c in POOLS.items()}
    assert declared["indexed"] == (True, True, False)
    assert declared["webdataset"] == (False, False, False)
