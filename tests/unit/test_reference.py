"""Reference set: the loss counts the target tokens only (LAMBADA form), or every token for {"text"}."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mates_megatron.data.tokenizer import load_tokenizer
from mates_megatron.probe.reference import load_reference_set


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_target_tokens_only_and_text_form(tmp_path):
    tok = load_tokenizer()
    rows = [{"context": "the cat sat on the", "target": " mat"}, {"text": "all of these tokens count"}]
    ref = load_reference_set(_write(tmp_path / "r.jsonl", rows), tok, seq_length=16)
    ctx, tgt = (tok(x, add_special_tokens=False)["input_ids"] for x in ("the cat sat on the", " mat"))
    full = ctx + tgt
    assert ref.tokens[0, : len(full)].tolist() == full
    # Label i is token i+1: exactly the target's positions are counted.
    counted = np.flatnonzero(ref.loss_mask[0])
    assert [ref.tokens[0, i + 1] for i in counted] == tgt
    text = tok("all of these tokens count", add_special_tokens=False)["input_ids"]
    assert ref.loss_mask[1].sum() == len(text) - 1
    # DP shares are disjoint, padded with zero-mask rows to the same number of batches.
    shares = [ref.micro_batches(1, dp_rank=r, dp_size=2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 1
    assert shares[0][0]["loss_mask"].sum() + shares[1][0]["loss_mask"].sum() == ref.loss_mask.sum()


def test_all_tokens_counts_context_and_target_but_not_padding(tmp_path):
    tok = load_tokenizer()
    rows = [{"context": "the cat sat on the", "target": " mat"}, {"context": "a b", "target": " c"}]
    ref = load_reference_set(_write(tmp_path / "r.jsonl", rows), tok, seq_length=16)
    full = ref.with_all_tokens()
    for i, row in enumerate(rows):
        n = len(tok(row["context"] + row["target"], add_special_tokens=False)["input_ids"])
        # Labels 0..n-2 predict tokens 1..n-1: every real token after the first, padding excluded.
        assert np.flatnonzero(full.loss_mask[i]).tolist() == list(range(n - 1))
    assert (full.tokens == ref.tokens).all() and ref.loss_mask[0].sum() == 1  # the original is unchanged


def test_long_context_is_cut_from_the_left(tmp_path):
    tok = load_tokenizer()
    ref = load_reference_set(
        _write(tmp_path / "r.jsonl", [{"context": "word " * 100, "target": " end"}]), tok, 8
    )
    tgt = tok(" end", add_special_tokens=False)["input_ids"]
    assert ref.tokens[0, -len(tgt) :].tolist() == tgt
    assert ref.loss_mask[0].sum() == len(tgt)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b'{"ctx": "a"}\n', r"line 1: expected \{\"context\""),
        (b"\xff\n", "line 1: not a UTF-8 JSON"),
    ],
)
def test_bad_reference_files(tmp_path, content, message):
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_reference_set(path, load_tokenizer(), 8)
    with pytest.raises(FileNotFoundError, match="mates-lab embedded"):
        load_reference_set(tmp_path / "missing.jsonl", load_tokenizer(), 8)
