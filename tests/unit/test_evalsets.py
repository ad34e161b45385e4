"""Evaluation sets: JSONL read per domain, the whole set's loss as the token-weighted mean of its domains',
and the names the loop logs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mates_megatron.data.tokenizer import load_tokenizer
from mates_megatron.training.evalsets import check_names, combine, load_eval_set


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_lines_are_split_by_domain_and_weighted_by_their_tokens(tmp_path):
    rows = [
        {"text": "one two three four five six", "domain": "a"},
        {"context": "the cat sat on the", "target": " mat", "domain": "b"},
        {"text": "seven eight nine", "domain": "a"},
        {"text": "no domain here at all"},
    ]
    s = load_eval_set("held", _write(tmp_path / "e.jsonl", rows), load_tokenizer(), 16)
    assert sorted(s.parts) == ["", "a", "b"]
    assert len(s.parts["a"]) == 2 and len(s.parts["b"]) == 1 and len(s.parts[""]) == 1
    tokens = s.tokens_per_part()
    assert tokens["b"] == 1.0  # LAMBADA form: the target word only
    # A plain text counts every token but the first (it has no label before it).
    tok = load_tokenizer()
    n_a = sum(
        len(tok(r["text"], add_special_tokens=False)["input_ids"]) - 1 for r in rows[::2] if "domain" in r
    )
    assert tokens["a"] == n_a
    out = combine(s, {"": 1.0, "a": 2.0, "b": 5.0})
    expected = (1.0 * tokens[""] + 2.0 * n_a + 5.0 * 1) / (tokens[""] + n_a + 1)
    assert out == {"held": pytest.approx(expected), "held/a": 2.0, "held/b": 5.0}
    assert np.isclose(out["held"], expected)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "a b c", "domain": "x/y"}], r"line 1: 'domain' must be a string without '/'"),
        ([{"text": "a b c", "domain": 3}], r"line 1: 'domain' must be a string"),
        ([{"prompt": "a"}], r'line 1: expected \{"context"'),
    ],
)
def test_bad_lines_name_the_line(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_eval_set("held", _write(tmp_path / "e.jsonl", rows), load_tokenizer(), 16)


def test_a_missing_file_names_the_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation set 'held' .*missing.jsonl not found"):
        load_eval_set("held", str(tmp_path / "missing.jsonl"), load_tokenizer(), 16)


@pytest.mark.parametrize("name", ["", "a/b", "reference"])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="TrainConfig.eval_sets name"):
        check_names([name])


def test_train_config_checks_eval_set_names():
    from mates_megatron.training.config import TrainConfig

    with pytest.raises(ValueError, match="TrainConfig.eval_sets name 'a/b'"):
        TrainConfig(data_prefix="x", eval_sets={"a/b": "f.jsonl"})
    with pytest.raises(ValueError, match="TrainConfig.eval_micro_batch_size must be >= 0"):
        TrainConfig(data_prefix="x", eval_micro_batch_size=-1)
