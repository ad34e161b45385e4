"""What crosses into a process: every pool pickles as what rebuilds it (its files and settings), never its
per-sample arrays, reads the same samples after, and refuses data that changed in between.

Asynchronous rounds spawn one influence worker per influence rank and spawning pickles the pool: at 128M
samples a GPTDataset's index arrays alone are about 2 GB a worker.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mates_megatron.pool.base import PoolError
from mates_megatron.pool.indexed_pool import IndexedPool
from mates_megatron.pool.webdataset_pool import WebDatasetPool
from tests.unit.test_webdataset_pool import _write_shards

SEQ = 16
HAS_ENERGON = importlib.util.find_spec("megatron.energon") is not None
CHANGED = (
    r"\(fingerprint digest \w+ then, \w+ now\): a pool must not change while a run reads it; restore the data it "
    r"was built from"
)
SIZE_SLACK = 64
"""Bytes a pickle of 4N samples may differ from one of N (integers that pickle a few bytes longer)."""


@pytest.fixture(scope="module")
def tok():
    from mates_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer()


def _docs(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    words = ["data", "model", "round", "token", "shard", "loss", "pool", "the", "a", "of"]
    return [
        {"text": f"document {i}: " + " ".join(rng.choice(words, int(rng.integers(3, 40)))), "domain": d}
        for i, d in zip(range(n), ["code", "prose", "junk"] * n, strict=False)
    ]


@pytest.fixture(scope="module")
def indexed_prefix(tmp_path_factory) -> Path:
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus

    d = tmp_path_factory.mktemp("indexed")
    src = d / "in.jsonl"
    src.write_text("".join(json.dumps(doc) + "\n" for doc in _docs(60)))
    prepare_corpus(PrepareConfig(input=src, output_prefix=d / "train", samples_per_shard=20))
    return d / "train"


def _indexed(prefix: Path, num_samples: int, cache: Path, tok) -> IndexedPool:
    """The pool as the project's loop builds it: megatron-core's GPTDataset, index cached on disk."""
    from mates_megatron.training.data import TokenizerInfo, build_gpt_dataset

    ds = build_gpt_dataset(
        prefix,
        seq_length=SEQ,
        num_samples=num_samples,
        seed=3,
        tokenizer=TokenizerInfo.from_meta(prefix),
        cache_dir=cache,
    )
    return IndexedPool(ds, prefix, tokenizer=tok)


def _reads(pool, ids) -> list:
    """Everything a pool gives of candidates ``ids``: training sample, tokens, text, domain."""
    return [
        (
            {k: np.asarray(v).tolist() for k, v in pool.training_sample(int(g)).items()},
            np.asarray(pool.tokens(int(g))).tolist(),
            pool.text(int(g)),
            pool.domains[d] if (d := int(pool.domain_ids(np.array([g]))[0])) >= 0 else None,
        )
        for g in ids
    ]


def test_indexed_pool_pickles_as_its_prefix_and_dataset_recipe(indexed_prefix, tmp_path, tok):
    small = _indexed(indexed_prefix, 200, tmp_path / "cache", tok)
    large = _indexed(indexed_prefix, 800, tmp_path / "cache", tok)
    assert len(large) >= 4 * len(small) - 4  # GPTDataset rounds to whole epochs' tokens
    sizes = [len(pickle.dumps(p)) for p in (small, large)]
    assert abs(sizes[1] - sizes[0]) <= SIZE_SLACK, sizes

    again = pickle.loads(pickle.dumps(large))
    ids = np.random.default_rng(0).choice(len(large), 60, replace=False)
    assert len(again) == len(large) and again.domains == ["code", "prose", "junk"]
    assert _reads(again, ids) == _reads(large, ids)
    # A sample's domain is its first document's, as megatron-core's own lookup names the documents.
    doc_domain = np.load(f"{indexed_prefix}.domains.npy")
    first_docs = [
        large.dataset._query_document_sample_shuffle_indices(int(g))[1][0] for g in range(len(large))
    ]
    assert again.domain_ids(np.arange(len(large))).tolist() == doc_domain[first_docs].tolist()
    assert again.fingerprint() == large.fingerprint()
    # The rebuilt dataset memory-maps the cache files the original wrote: nothing was rebuilt.
    for name in ("document_index", "sample_index", "shuffle_index"):
        arr = getattr(again.dataset, name)
        assert isinstance(arr, np.memmap) and Path(arr.filename).parent == tmp_path / "cache"


def test_indexed_pool_refuses_a_changed_dataset_or_a_missing_index_cache(indexed_prefix, tmp_path, tok):
    prefix = tmp_path / "data" / "train"
    shutil.copytree(indexed_prefix.parent, prefix.parent)
    pool = _indexed(prefix, 200, tmp_path / "cache", tok)
    blob = pickle.dumps(pool)

    cached = sorted((tmp_path / "cache").glob("*.npy"))
    moved = [p.rename(p.with_suffix(".moved")) for p in cached]
    with pytest.raises(
        PoolError,
        match=r"GPTDataset index cache .*-document_index.npy is missing: a pickled indexed pool is rebuilt "
        r"from Megatron's index cache; keep it \(path_to_cache / --data-cache-path\) until the run ends",
    ):
        pickle.loads(blob)
    for m, p in zip(moved, cached, strict=True):
        m.rename(p)
    assert _reads(pickle.loads(blob), [0, 5]) == _reads(pool, [0, 5])

    shuffle = next(p for p in cached if p.name.endswith("-shuffle_index.npy"))
    original = np.load(shuffle)
    np.save(shuffle, original[::-1])  # a cache written again with another order
    with pytest.raises(
        PoolError, match=r"GPTDataset index cache .*cache holds other indices than when the pool was pickled"
    ):
        pickle.loads(blob)
    np.save(shuffle, original)

    domains = np.load(f"{prefix}.domains.npy")
    np.save(f"{prefix}.domains.npy", (domains + 1) % 3)
    with pytest.raises(PoolError, match=rf"indexed pool {prefix} changed since it was pickled {CHANGED}"):
        pickle.loads(blob)
    np.save(f"{prefix}.domains.npy", domains)
    assert _reads(pickle.loads(blob), [0, 5]) == _reads(pool, [0, 5])

    with open(f"{prefix}.bin", "r+b") as f:  # the last document's last token
        f.seek(-2, 2)
        f.write(b"\x07\x00")
    with pytest.raises(PoolError, match=rf"indexed pool {prefix} changed since it was pickled {CHANGED}"):
        pickle.loads(blob)


def test_webdataset_pool_pickles_as_its_directory(tmp_path):
    n = 25
    small_dir, large_dir = tmp_path / "small", tmp_path / "large"
    _write_shards(small_dir, n=n)
    _write_shards(large_dir, n=4 * n)
    small = WebDatasetPool(small_dir, seq_length=SEQ)
    large = WebDatasetPool(large_dir, seq_length=SEQ)
    large.text(0)  # an open shard does not travel either
    sizes = [len(pickle.dumps(p)) for p in (small, large)]
    assert abs(sizes[1] - sizes[0]) <= SIZE_SLACK, sizes

    again = pickle.loads(pickle.dumps(large))
    ids = np.random.default_rng(0).permutation(4 * n)
    assert _reads(again, ids) == _reads(large, ids)

    blob = pickle.dumps(large)
    _write_shards(large_dir, n=4 * n + 1)  # prepared again, with one more document
    with pytest.raises(
        PoolError,
        match=rf"WebDataset pool {large_dir} changed since it was pickled {CHANGED}",
    ):
        pickle.loads(blob)


def _energon_dataset(root: Path, n: int) -> Path:
    from tests.unit.test_energon_pool import _prepare

    root.mkdir(parents=True)
    docs = _docs(n)
    for si, start in enumerate(range(0, n, 10)):
        with wds.TarWriter(str(root / f"shard-{si:06d}.tar")) as w:
            for i in range(start, min(start + 10, n)):
                w.write(
                    {"__key__": f"{i:010d}", "txt": docs[i]["text"], "json": {"domain": docs[i]["domain"]}}
                )
    _prepare(
        root,
        "--split-parts",
        "train:shard-.*",
        "--sample-type",
        "TextSample",
        "--field-map",
        '{"text": "txt"}',
    )
    return root


def _energon(root: Path, tok):
    from mates_megatron.pool.energon_pool import EnergonPool

    return EnergonPool(root, seq_length=SEQ, tokenizer=tok, domain_field="json[domain]")


@pytest.mark.skipif(
    not HAS_ENERGON, reason="megatron-energon is an optional extra: pip install 'mates-megatron[energon]'"
)
def test_energon_pool_pickles_as_its_root_and_split(tmp_path, tok):
    small = _energon(_energon_dataset(tmp_path / "small", 20), tok)
    large = _energon(_energon_dataset(tmp_path / "large", 80), tok)
    sizes = [len(pickle.dumps(p)) for p in (small, large)]
    assert abs(sizes[1] - sizes[0]) <= SIZE_SLACK, sizes

    again = pickle.loads(pickle.dumps(large))
    ids = np.random.default_rng(0).permutation(80)
    assert _reads(again, ids) == _reads(large, ids)
    assert again.domains == large.domains == ["code", "prose", "junk"]

    blob = pickle.dumps(large)
    shutil.rmtree(tmp_path / "large")
    _energon_dataset(tmp_path / "large", 81)
    with pytest.raises(
        PoolError,
        match=rf"Energon pool {tmp_path / 'large'} changed since it was pickled {CHANGED}",
    ):
        pickle.loads(blob)


def _read_in_child(pools, ids, conn) -> None:
    conn.send([_reads(p, ids) for p in pools])


def test_pools_read_the_same_in_a_spawned_process(indexed_prefix, tmp_path, tok):
    """What the influence worker does: a spawned process receives the pools pickled and reads them."""
    _write_shards(tmp_path / "wds", n=40)
    pools = [
        _indexed(indexed_prefix, 200, tmp_path / "cache", tok),
        WebDatasetPool(tmp_path / "wds", seq_length=SEQ),
    ]
    if HAS_ENERGON:
        pools.append(_energon(_energon_dataset(tmp_path / "energon", 40), tok))
    ids = [0, 3, 17, 39]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_in_child, args=(pools, ids, child))
    proc.start()
    got = parent.recv() if parent.poll(120) else None
    proc.join(30)
    assert proc.exitcode == 0
    assert got == [_reads(p, ids) for p in pools]
