"""The config spellings of earlier releases: read for one release, with a FutureWarning naming the new key, to
the same config as today's component sections (``mates_megatron.legacy``)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from mates_megatron.config import SelectionConfig
from mates_megatron.configio import build, normalize
from mates_megatron.integrations.megatron_lm.state import _RESUME_FIXED

MATES = {"selector": "gumbel", "scorer": "mates", "warmup_steps": 50}


@pytest.mark.parametrize(
    ("flat", "sections", "warned"),
    [
        ({**MATES, "probe_samples": 32, "influence": {"model": "ridge"}, "temperature": 0.25},
         {**MATES, "selector": {"kind": "gumbel", "temperature": 0.25},
          "scorer": {"kind": "mates", "probe_samples": 32, "influence": {"model": "ridge"}}},
         r"probe_samples is read for one more release: write it as scorer_options\.probe_samples"),
        ({"pool": "webdataset", "shards": "/data/shards"},
         {"pool": {"kind": "webdataset", "shards": "/data/shards"}},
         r"shards is read for one more release: write it as pool_options\.shards, or in the section pool: "
         r"\{kind: webdataset, shards: \.\.\.\}"),
        ({"selector": "mixture", "mixture_weights": "/w.json", "mixture_when_short": "error"},
         {"selector": {"kind": "mixture", "weights": "/w.json", "when_short": "error"}},
         r"mixture_weights is read for one more release: write it as selector_options\.weights"),
        # An option the component does not take was ignored before, and still is (with a warning).
        ({"selector": "random", "temperature": 0.7, "probe_samples": 64}, {"selector": "random"},
         r"temperature is an option that selector 'random' does not take, and it was ignored"),
    ],
)  # fmt: skip
def test_both_spellings_build_the_same_config(flat, sections, warned):
    with pytest.warns(FutureWarning, match=warned):
        old = build(SelectionConfig, flat, where="old")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # today's spelling warns of nothing
        new = build(SelectionConfig, sections, where="new")
    assert old == new
    assert (old.pool_config, old.selector_config, old.scorer_config) == (
        new.pool_config, new.selector_config, new.scorer_config,
    )  # fmt: skip


def test_a_key_in_both_spellings_must_agree():
    with pytest.raises(
        ValueError, match=r"old: probe_samples=32 and scorer_options\.probe_samples=64 disagree"
    ):
        build(
            SelectionConfig,
            {**MATES, "probe_samples": 32, "scorer_options": {"probe_samples": 64}},
            where="old",
        )
    with pytest.warns(FutureWarning):  # the same value twice is no conflict
        same = build(
            SelectionConfig,
            {**MATES, "probe_samples": 32, "scorer_options": {"probe_samples": 32}},
            where="x",
        )
    assert same.scorer_config.probe_samples == 32


def test_a_section_needs_its_kind_and_flags_override_a_file_section():
    with pytest.raises(ValueError, match=r"new: scorer is a section without 'kind'"):
        build(SelectionConfig, {"scorer": {"probe_samples": 32}}, where="new")
    # scorer_options beside a section are laid over it (a flag given beside a file).
    sel = build(SelectionConfig, {**MATES, "scorer": {"kind": "mates", "probe_samples": 32},
                                  "scorer_options": {"probe_samples": 48}}, where="x")  # fmt: skip
    assert sel.scorer_config.probe_samples == 48


def test_a_misspelt_option_names_where_it_lives_now():
    with pytest.raises(
        ValueError, match=r"unknown field 'temprature': did you mean selector_options\.temperature"
    ):
        build(SelectionConfig, {"temprature": 0.3}, where="x")


def test_a_state_saved_by_an_earlier_release_resumes_on_the_same_fields():
    """The Megatron-LM state file holds ``asdict`` of the run's SelectionConfig: an earlier release's has every
    flat field. Normalised, the fields a resume must keep equal today's."""
    now = SelectionConfig(
        **MATES, selector_options={"temperature": 0.25}, scorer_options={"probe_samples": 32}
    )
    old = {
        "pool": "indexed", "shards": None, "energon_split": "train", "energon_text_field": "text",
        "energon_domain_field": None, "select_every": 50, "selection_ratio": 0.2, "selector": "gumbel",
        "temperature": 0.25, "mixture_weights": None, "mixture_when_short": "redistribute", "scorer": "mates",
        "scorer_options": {}, "imports": [], "seed": 0, "run_name": "default", "warmup_steps": 50,
        "probe_samples": 32, "estimator": "linearized", "probe_tokens": "target",
        "influence": dataclasses.asdict(now.scorer_config.influence), "influence_rounds": 1,
        "min_influence_spearman": 0.1, "max_selection_cost": 0.1, "cost_machine": "h100", "influence_ranks": None,
        "probe_lead_steps": 0, "asynchronous": False,
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        saved = normalize(SelectionConfig, old, where="state")
        rebuilt = build(SelectionConfig, old, where="state")
    today = dataclasses.asdict(now)
    for key in _RESUME_FIXED:
        assert saved.get(key, {} if key.endswith("_options") else None) == today[key], key
    assert rebuilt == now
