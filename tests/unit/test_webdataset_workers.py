"""WebDataset pool under torch DataLoader workers (forked): reads do not share a file offset, and each shard is
hashed once per node (a node-local stamp that later processes accept), never once per worker per round."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import mates_megatron.pool.manifest as manifest
from mates_megatron.pool.base import PoolError
from mates_megatron.pool.webdataset_pool import WebDatasetPool
from tests.unit.test_webdataset_pool import _docs, _write_shards

SEQ = 8
N = 200


class _Raw(torch.utils.data.Dataset):
    """Each candidate's id, text and token ids as the pool reads them (two members of its tar)."""

    def __init__(self, pool: WebDatasetPool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, gid: int):
        return gid, self.pool.text(gid), self.pool.tokens(gid).tolist()


def _expected() -> dict[int, tuple[str, list[int]]]:
    return {gid: (text, ids.astype(np.int32).tolist()) for gid, text, _, ids in _docs(N)}


@pytest.fixture
def node_tmp(tmp_path, monkeypatch) -> Path:
    """This test's node-local temporary directory (where shard stamps live by default)."""
    d = tmp_path / "node-tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture
def wds_dir(tmp_path) -> Path:
    _write_shards(tmp_path / "wds", n=N, per_shard=50)
    return tmp_path / "wds"


@pytest.fixture
def hashed(wds_dir, tmp_path, monkeypatch) -> Path:
    """A log of every sha256 of a shard once they are written, appended to by whichever process hashes
    (forked loader workers too)."""
    log = tmp_path / "hashed.log"
    log.touch()
    real = manifest.sha256_file

    def counting(f, *args):
        with open(log, "a") as out:
            out.write(Path(getattr(f, "name", f)).name + "\n")
        return real(f, *args)

    monkeypatch.setattr(manifest, "sha256_file", counting)
    return log


def test_forked_loader_workers_read_what_a_fresh_process_reads(wds_dir, node_tmp):
    pool = WebDatasetPool(wds_dir, seq_length=SEQ)
    for gid in (0, 50, 100, 150):  # the main process opens every shard before the workers fork
        pool.text(gid)
    order = np.random.default_rng(0).permutation(np.tile(np.arange(N), 6)).tolist()
    loader = torch.utils.data.DataLoader(
        _Raw(pool), sampler=order, batch_size=8, num_workers=3, collate_fn=lambda b: b
    )
    got = [item for batch in loader for item in batch]
    expected = _expected()
    wrong = [gid for gid, text, ids in got if (text, ids) != expected[gid]]
    assert len(got) == len(order) and wrong == []


def test_each_shard_is_hashed_once_per_node(wds_dir, node_tmp, hashed):
    expected = _expected()
    for _ in range(3):  # three rounds, each a fresh loader whose two workers read every shard
        pool = WebDatasetPool(wds_dir, seq_length=SEQ)
        loader = torch.utils.data.DataLoader(
            _Raw(pool), sampler=list(range(N)), batch_size=4, num_workers=2, collate_fn=lambda b: b
        )
        assert {gid: (text, ids) for b in loader for gid, text, ids in b} == expected
    other_rank = WebDatasetPool(wds_dir, seq_length=SEQ)
    assert [other_rank.text(g) for g in range(N)] == [expected[g][0] for g in range(N)]
    assert sorted(hashed.read_text().split()) == [f"shard-{i:06d}.tar" for i in range(4)]


def test_a_shard_changed_after_its_stamp_is_caught(wds_dir, node_tmp, hashed):
    pool = WebDatasetPool(wds_dir, seq_length=SEQ)
    [pool.text(g) for g in range(N)]  # every shard verified and stamped
    shard = wds_dir / "shard-000001.tar"
    before = shard.stat()
    with tarfile.open(shard) as tf:
        at = tf.getmember(f"{60:010d}.txt").offset_data
    with shard.open("r+b") as f:  # one byte of a document: same size, tar headers intact
        f.seek(at)
        f.write(b"X")
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with its mtime put back
    assert shard.stat().st_size == before.st_size and shard.stat().st_mtime_ns == before.st_mtime_ns
    fresh = WebDatasetPool(wds_dir, seq_length=SEQ)
    assert fresh.text(0) == pool.text(0)  # shard 0 is unchanged: its stamp is accepted
    with pytest.raises(PoolError, match=r"shard-000001.tar changed since the manifest.*sha256 differs"):
        fresh.text(55)
    with pytest.raises(PoolError, match=r"shard-000001.tar changed since the manifest.*sha256 differs"):
        WebDatasetPool(wds_dir, seq_length=SEQ).text(55)  # no stamp was left for the changed shard
    names = hashed.read_text().split()
    assert names.count("shard-000000.tar") == 1 and names.count("shard-000001.tar") == 3


def test_stamps_that_other_users_could_write_are_refused(wds_dir, tmp_path):
    shared = tmp_path / "shared-stamps"
    shared.mkdir()
    shared.chmod(0o777)
    pool = WebDatasetPool(wds_dir, seq_length=SEQ, stamp_dir=shared)
    with pytest.raises(
        PoolError,
        match=rf"shard stamp directory {shared} is writable by other users \(mode 0o777\): a stamp there could "
        r"vouch for a changed shard; chmod go-w it, or pass stamp_dir= a directory of your own",
    ):
        pool.text(0)
