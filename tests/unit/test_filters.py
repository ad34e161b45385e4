"""Stacked selection (``selection.filters``): each filter keeps the best-scored fraction of a scored round's
candidates before the scorer and the selector see them; the config is refused early when the chain cannot
give the round its samples."""

from __future__ import annotations

import pytest

from mates_megatron.config import SelectionConfig

BASE = {"selector": "topk", "scorer": "values", "scorer_options": {"path": "/v.npy"}, "selection_ratio": 0.2}


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ([{"kind": "classifier"}], r"filters\[0\]=.*a filter is a mapping with 'kind' \(a scorer\) and 'keep'"),
        ([{"kind": "none", "keep": 0.5}], r"filters\[0\]\.kind='none': choose a scorer"),
        ([{"kind": "classifier", "keep": 1.5}], r"filters\[0\]\.keep=1\.5 must be a fraction in \(0, 1\]"),
        ([{"kind": "classifier", "keep": 0.5, "windows": 3}], r"filters\[0\]: unknown field 'windows'"),
        ([{"kind": "classifier", "keep": 0.4}, {"kind": "dsir", "keep": 0.4}],
         r"filters keep 0\.16 of a round's candidates, fewer than the selection_ratio 0\.2"),
    ],
)  # fmt: skip
def test_a_filter_chain_that_cannot_work_is_refused(filters, message):
    with pytest.raises(ValueError, match=message):
        SelectionConfig(**BASE, filters=filters)


def test_filters_need_a_scored_run_and_add_their_needs():
    with pytest.raises(ValueError, match="filters narrow the candidates of scored rounds: set a scorer"):
        SelectionConfig(filters=[{"kind": "classifier", "keep": 0.5}])
    plain = SelectionConfig(**BASE)
    assert not plain.needs_reference and not plain.needs_text_decoding  # 'values' reads a file
    sel = SelectionConfig(**BASE, filters=[{"kind": "classifier", "keep": 0.5, "n_features": 512}])
    assert sel.needs_reference and sel.needs_text_decoding  # the classifier reads the reference and the text
    ((name, keep, config),) = sel.filter_stages
    assert (name, keep, config.n_features) == ("classifier", 0.5, 512)
    ((scorer, kept),) = sel.build_filters()
    assert kept == 0.5 and scorer.config.n_features == 512
