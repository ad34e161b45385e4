"""`prepare`: JSONL -> megatron-core IndexedDataset + WebDataset shards, and the errors for bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from megatron.core.datasets.indexed_dataset import IndexedDataset

from mates_megatron.data.prepare import PrepareConfig, PrepareError, prepare_corpus
from mates_megatron.data.tokenizer import eod_token_id, load_tokenizer
from mates_megatron.pool.webdataset_pool import WebDatasetPool

DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog.", "domain": "prose"},
    {"text": "def add(a, b):\n    return a + b", "domain": "code"},
    {"text": "Ünïcödé text with accents survives the round trip."},
    {"text": "Another prose line, a little longer than the first one.", "domain": "prose"},
    {"text": "x = [i * i for i in range(10)]", "domain": "code"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_round_trip_indexed_and_shards(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", DOCS)
    out = prepare_corpus(
        PrepareConfig(input=src, output_prefix=tmp_path / "out" / "train", samples_per_shard=2)
    )
    tok = load_tokenizer()
    eod = eod_token_id(tok)
    expected = [tok(d["text"], add_special_tokens=False)["input_ids"] + [eod] for d in DOCS]

    ds = IndexedDataset(str(tmp_path / "out" / "train"))
    assert len(ds) == len(DOCS)
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids

    meta = json.loads((tmp_path / "out" / "train.meta.json").read_text())
    assert meta["num_docs"] == 5 and meta["num_tokens"] == sum(map(len, expected))
    assert meta["eod_id"] == eod and meta["vocab_size"] == len(tok)
    assert meta["domains"] == ["prose", "code", "default"]
    assert meta["docs_per_domain"] == {"prose": 2, "code": 2, "default": 1}
    assert np.load(tmp_path / "out" / "train.domains.npy").tolist() == [0, 1, 2, 0, 1]
    assert [s["num_samples"] for s in meta["shards"]] == [2, 2, 1]

    urls = sorted(str(p) for p in out.shards_dir.glob("shard-*.tar"))
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == 5
    for i, s in enumerate(got):
        m = json.loads(s["json"])
        assert m["id"] == i and m["domain"] == DOCS[i].get("domain", "default")
        assert s["txt"].decode() == DOCS[i]["text"]
        assert np.load(io.BytesIO(s["ids.npy"])).tolist() == expected[i]
    # The shards are a valid pool (manifest checksums match).
    assert WebDatasetPool(out.shards_dir, seq_length=16).num_candidates == 5


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"in.jsonl is empty: it needs at least one JSONL line"),
        (b"\n  \n", r"in.jsonl is empty"),
        (
            b'{"text": "ok"}\n{"body": "no text"}\n',
            r'in.jsonl line 2: no "text" field; each line must be a JSON object like',
        ),
        (
            b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n',
            r"in.jsonl line 3: not valid UTF-8 \(byte \d+\); re-encode the file as UTF-8",
        ),
        (b'{"text": "ok"}\n{"text": \n', r"in.jsonl line 2: invalid JSON"),
        (b'{"text": 42}\n', r'in.jsonl line 1: "text" is int, not a string'),
        (b'{"text": "   "}\n', r'in.jsonl line 1: "text" is empty'),
        (b'["text"]\n', r'in.jsonl line 1: no "text" field'),
    ],
)
def test_bad_input_names_file_line_and_fix(tmp_path, content, message):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    with pytest.raises(PrepareError, match=message):
        prepare_corpus(PrepareConfig(input=src, output_prefix=tmp_path / "out" / "train"))
    # Nothing half-written is left behind.
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_input_and_tokenizer(tmp_path):
    with pytest.raises(PrepareError, match=r"nope.jsonl: no such file"):
        prepare_corpus(PrepareConfig(input=tmp_path / "nope.jsonl", output_prefix=tmp_path / "o"))
    with pytest.raises(
        FileNotFoundError, match=r"no tokenizer files in .*point --tokenizer at a local directory"
    ):
        load_tokenizer(tmp_path)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from mates_megatron.cli import main

    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "a"}\n{"nope": 1}\n')
    assert main(["prepare", "--input", str(src), "--output-prefix", str(tmp_path / "o" / "t")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: ") and "line 2" in last and "Traceback" not in err
