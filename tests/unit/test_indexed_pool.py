"""Indexed pool: its fingerprint is cheap (never the whole .idx), computed once, and survives a copy."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from mates_megatron.data.prepare import PrepareConfig, prepare_corpus
from mates_megatron.pool.base import PoolError
from mates_megatron.pool.indexed_pool import IndexedPool


def _prepare(tmp_path, docs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d, "domain": "prose"}) + "\n" for d in docs))
    prefix = tmp_path / "out" / "train"
    prepare_corpus(PrepareConfig(input=src, output_prefix=prefix, samples_per_shard=4))
    return prefix


def _pool(prefix):
    return IndexedPool(IndexedDataset(str(prefix)), prefix)


DOCS = [f"document number {i} says something about {i * i}" for i in range(12)]


def test_fingerprint_is_equal_for_a_copy_and_differs_for_other_data(tmp_path):
    prefix = _prepare(tmp_path / "a", DOCS)
    fp = _pool(prefix).fingerprint()
    assert fp.startswith("indexed:") and _pool(prefix).fingerprint() == fp

    copy = tmp_path / "copy"
    shutil.copytree(prefix.parent, copy)  # another place, other mtimes: the same data
    os.utime(copy / "train.idx", (1, 1))
    assert _pool(copy / "train").fingerprint() == fp

    longer = _prepare(tmp_path / "b", [*DOCS[:-1], DOCS[-1] + " and more"])
    assert _pool(longer).fingerprint() != fp  # a document's length changed: the .idx differs
    same_length = _prepare(tmp_path / "d", [*DOCS[:-1], DOCS[-1].replace("something", "anything")])
    assert same_length.with_suffix(".idx").read_bytes() == prefix.with_suffix(".idx").read_bytes()
    assert _pool(same_length).fingerprint() != fp  # only a token differs: the .bin's tail differs
    fewer = _prepare(tmp_path / "c", DOCS[:-1])
    assert _pool(fewer).fingerprint() != fp


def test_fingerprint_is_computed_once(tmp_path):
    prefix = _prepare(tmp_path, DOCS)
    pool = _pool(prefix)
    fp = pool.fingerprint()
    os.rename(f"{prefix}.idx", f"{prefix}.idx.moved")  # a second call would fail to read it
    assert pool.fingerprint() == fp


def test_empty_indexed_dataset_is_refused(tmp_path):
    prefix = _prepare(tmp_path, DOCS)

    class Empty(IndexedDataset):
        def __len__(self):
            return 0

    with pytest.raises(PoolError, match=r"indexed dataset .*train yields no samples: the pool is empty"):
        IndexedPool(Empty(str(prefix)), prefix)
