"""`prepare`: JSONL -> megatron-core IndexedDataset + WebDataset shards, and the errors for bad input."""

from __future__ import annotations

import io
import json
import types

import numpy as np
import pytest
import webdataset as wds
from megatron.core.datasets.indexed_dataset import IndexedDataset

from mates_megatron.cli import main
from mates_megatron.data.prepare import PrepareConfig, PrepareError, prepare_corpus, read_jsonl
from mates_megatron.data.tokenizer import default_tokenizer_path, eod_token_id, load_tokenizer
from mates_megatron.pool.webdataset_pool import WebDatasetPool

DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog.", "domain": "prose"},
    {"text": "def add(a, b):\n    return a + b", "domain": "code"},
    {"text": "Ünïcödé text with accents survives the round trip."},
    {"text": "Another prose line, a little longer than the first one.", "domain": "prose"},
    {"text": "x = [i * i for i in range(10)]", "domain": "code"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_tokenizer_path())


def _jsonl(path, rows, blank_lines=False):
    sep = "\n\n" if blank_lines else "\n"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + sep for r in rows), encoding="utf-8")
    return path


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_round_trip_indexed_and_shards(tmp_path, tok):
    src = _jsonl(tmp_path / "in.jsonl", DOCS, blank_lines=True)  # blank lines are skipped, not documents
    prefix = tmp_path / "out" / "train"
    # batch_size=2 makes the 5 documents span three tokenizer calls.
    out = prepare_corpus(PrepareConfig(input=src, output_prefix=prefix, samples_per_shard=2, batch_size=2))
    eod = eod_token_id(tok)
    assert eod == tok.sep_token_id == 102  # BERT has no eos: [SEP] ends a document
    expected = [tok(d["text"], add_special_tokens=False)["input_ids"] + [eod] for d in DOCS]

    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(DOCS) and ds.index.dtype == np.uint16  # vocab 30522 < 65500
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4, 5]  # one sequence per document
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids

    meta = json.loads((tmp_path / "out" / "train.meta.json").read_text())
    assert meta["format"] == 1 and meta["dtype"] == "uint16" and meta["source"] == str(src)
    assert meta["num_docs"] == 5 and meta["num_tokens"] == sum(map(len, expected)) == out.num_tokens
    assert meta["eod_id"] == eod and meta["vocab_size"] == len(tok) == 30522
    assert meta["domains"] == out.domains == ["prose", "code", "default"]
    assert meta["docs_per_domain"] == {"prose": 2, "code": 2, "default": 1}
    assert meta["tokens_per_domain"] == {
        "prose": len(expected[0]) + len(expected[3]),
        "code": len(expected[1]) + len(expected[4]),
        "default": len(expected[2]),
    }
    assert np.load(tmp_path / "out" / "train.domains.npy").tolist() == [0, 1, 2, 0, 1]
    assert meta["shards"] == [
        {"name": "shard-000000.tar", "num_samples": 2, "first_id": 0},
        {"name": "shard-000001.tar", "num_samples": 2, "first_id": 2},
        {"name": "shard-000002.tar", "num_samples": 1, "first_id": 4},
    ]

    urls = [str(out.shards_dir / s["name"]) for s in meta["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == 5
    for i, s in enumerate(got):
        assert s["__key__"] == f"{i:010d}"
        m = json.loads(s["json"])
        assert m == {"id": i, "domain": DOCS[i].get("domain", "default")}
        assert s["txt"].decode() == DOCS[i]["text"]
        arr = np.load(io.BytesIO(s["ids.npy"]))
        assert arr.dtype == np.int32 and arr.tolist() == expected[i]
    # The shards are a valid pool (the manifest's checksums match), and no temporary file is left.
    assert WebDatasetPool(out.shards_dir, seq_length=16).num_candidates == 5
    assert _files(tmp_path / "out") == [
        "train-shards",
        "train-shards/manifest.json",
        "train-shards/shard-000000.tar",
        "train-shards/shard-000001.tar",
        "train-shards/shard-000002.tar",
        "train.bin",
        "train.domains.npy",
        "train.idx",
        "train.meta.json",
    ]


def test_without_eod(tmp_path, tok):
    src = _jsonl(tmp_path / "in.jsonl", DOCS[:2])
    prepare_corpus(PrepareConfig(input=src, output_prefix=tmp_path / "t", append_eod=False))
    ds = IndexedDataset(str(tmp_path / "t"))
    assert [ds[i].tolist() for i in range(2)] == [
        tok(d["text"], add_special_tokens=False)["input_ids"] for d in DOCS[:2]
    ]


FIX = r"each line must be a JSON object like"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"in.jsonl is empty \(no non-blank line\): it needs at least one JSONL line"),
        (b"\n  \n", r"in.jsonl is empty"),
        (b'{"text": "ok"}\n{"body": "no text"}\n', rf'in.jsonl line 2: no "text" field; {FIX}'),
        (
            b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n',
            r"in.jsonl line 3: not valid UTF-8 \(byte 13 of the line\); re-encode the file as UTF-8",
        ),
        (b'{"text": "ok"}\n\n{"text": \n', rf"in.jsonl line 3: invalid JSON \(.*\); {FIX}"),
        (b'{"text": 42}\n', rf'in.jsonl line 1: "text" is int, not a string; {FIX}'),
        (b'{"text": null}\n', r'in.jsonl line 1: "text" is NoneType, not a string'),
        (b'{"text": "   "}\n', r'in.jsonl line 1: "text" is empty; drop the line or give it some text'),
        (b'["text"]\n', rf'in.jsonl line 1: no "text" field; {FIX}'),
        (b'{"text": "a", "domain": 3}\n', r'in.jsonl line 1: "domain" must be a non-empty string'),
    ],
)
def test_bad_input_names_file_line_and_fix(tmp_path, content, message):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    with pytest.raises(PrepareError, match=message):
        # batch_size=1: the good lines before the bad one are already tokenised and written (to temp files).
        prepare_corpus(PrepareConfig(input=src, output_prefix=tmp_path / "out" / "train", batch_size=1))
    # Nothing half-written is left behind, not even the output directory this call created.
    assert _files(tmp_path) == ["in.jsonl"]


def test_failed_prepare_keeps_the_previous_dataset(tmp_path):
    prefix = tmp_path / "train"
    prepare_corpus(PrepareConfig(input=_jsonl(tmp_path / "good.jsonl", DOCS), output_prefix=prefix))
    before = {p: (tmp_path / p).read_bytes() for p in _files(tmp_path) if (tmp_path / p).is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n{"text": 1}\n')
    with pytest.raises(PrepareError, match="bad.jsonl line 3"):
        prepare_corpus(PrepareConfig(input=bad, output_prefix=prefix, batch_size=1))
    after = {p: (tmp_path / p).read_bytes() for p in _files(tmp_path) if (tmp_path / p).is_file()}
    del after["bad.jsonl"]
    assert after == before


def test_missing_input_and_tokenizer(tmp_path):
    with pytest.raises(PrepareError, match=r"nope.jsonl: no such file; pass --input a JSONL file"):
        prepare_corpus(PrepareConfig(input=tmp_path / "nope.jsonl", output_prefix=tmp_path / "o"))
    with pytest.raises(PrepareError, match="no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))
    fix = rf"point --tokenizer at a local directory holding tokenizer.json .*{default_tokenizer_path()}"
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer files in {tmp_path}.*{fix}"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        load_tokenizer(tmp_path / "missing-dir")
    src = _jsonl(tmp_path / "in.jsonl", DOCS)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        prepare_corpus(PrepareConfig(input=src, output_prefix=tmp_path / "o" / "t", tokenizer=tmp_path))
    assert not (tmp_path / "o").exists()


def test_eod_token_id():
    assert eod_token_id(types.SimpleNamespace(eos_token_id=2, sep_token_id=102)) == 2
    assert eod_token_id(types.SimpleNamespace(eos_token_id=None, sep_token_id=102)) == 102
    with pytest.raises(ValueError, match="tokenizer toy has neither an eos nor a sep token"):
        eod_token_id(types.SimpleNamespace(eos_token_id=None, sep_token_id=None, name_or_path="toy"))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match=r"PrepareConfig.samples_per_shard=0: must be >= 1"):
        PrepareConfig(input=tmp_path / "a", output_prefix=tmp_path / "b", samples_per_shard=0)
    with pytest.raises(ValueError, match=r"PrepareConfig.batch_size=0"):
        PrepareConfig(input=tmp_path / "a", output_prefix=tmp_path / "b", batch_size=0)
    with pytest.raises(ValueError, match=r"PrepareConfig.output_prefix='.*': give a file prefix"):
        PrepareConfig(input=tmp_path / "a", output_prefix=tmp_path / "..")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "a"}\n{"nope": 1}\n')
    assert main(["prepare", "--input", str(src), "--output-prefix", str(tmp_path / "o" / "t")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: ") and "in.jsonl line 2" in last and "Traceback" not in err

    assert main(["prepare", "--input", str(src), "--output-prefix", "x", "--samples-per-shard", "0"]) == 2
    assert "samples_per_shard=0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: both are required
        main(["prepare", "--input", str(src)])
    assert (
        e.value.code == 2
        and "the following arguments are required: --output-prefix" in capsys.readouterr().err
    )


def test_cli_prepares_user_jsonl(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", DOCS)
    prefix = tmp_path / "data" / "train"
    assert (
        main(["prepare", "--input", str(src), "--output-prefix", str(prefix), "--samples-per-shard", "3"])
        == 0
    )
    out = capsys.readouterr().out
    assert "5 documents" in out and f"{prefix}.bin" in out and "(2 shards)" in out
    assert len(IndexedDataset(str(prefix))) == 5


def test_cli_embedded(tmp_path, capsys):
    """`mates-lab embedded` gathers the corpus and prepares it to OUT/train; the summary has every domain."""
    from mates_lab.cli import main as lab

    out_dir = tmp_path / "emb"
    assert lab(["embedded", "--out", str(out_dir), "--max-docs-per-domain", "20"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out_dir / "train.meta.json").read_text())
    assert sorted(meta["domains"]) == ["junk", "licenses", "package_docs", "python_code", "python_docs"]
    assert all(n <= 20 for n in meta["docs_per_domain"].values())
    assert len(IndexedDataset(str(out_dir / "train"))) == meta["num_docs"]
    assert (out_dir / "reference.jsonl").is_file() and (out_dir / "train-shards" / "manifest.json").is_file()
    for name in meta["domains"]:
        line = next(ln for ln in printed.splitlines() if ln.split()[:1] == [name])
        assert line.split()[1:] == [str(meta["docs_per_domain"][name]), str(meta["tokens_per_domain"][name])]
