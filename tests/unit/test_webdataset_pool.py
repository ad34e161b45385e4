"""WebDataset pool: real tar shards read in place, checked against the manifest; bad input named with its fix."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mates_megatron.pool.base import PoolError
from mates_megatron.pool.manifest import SelectionStore, write_manifest
from mates_megatron.pool.webdataset_pool import WebDatasetPool

SEQ = 8


def _docs(n: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        length = int(rng.integers(3, 20))
        yield (
            i,
            f"document {i} " + "word " * length,
            ("code" if i % 3 == 0 else "prose"),
            rng.integers(1, 500, length),
        )


def _write_shards(d: Path, n: int = 25, per_shard: int = 10, drop_txt_of: int | None = None) -> list[dict]:
    d.mkdir(parents=True, exist_ok=True)
    shards = []
    docs = list(_docs(n))
    for si, start in enumerate(range(0, n, per_shard)):
        name = f"shard-{si:06d}.tar"
        with wds.TarWriter(str(d / name)) as w:
            for gid, text, dom, ids in docs[start : start + per_shard]:
                sample = {
                    "__key__": f"{gid:010d}",
                    "json": {"id": gid, "domain": dom},
                    "ids.npy": ids.astype(np.int32),
                }
                if gid != drop_txt_of:
                    sample["txt"] = text
                w.write(sample)
        shards.append({"name": name, "num_samples": len(docs[start : start + per_shard]), "first_id": start})
    write_manifest(d, shards)
    return shards


def test_reads_samples_in_place(tmp_path):
    _write_shards(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")}
    pool = WebDatasetPool(tmp_path, seq_length=SEQ)
    assert pool.num_candidates == 25
    assert pool.domains == ["code", "prose"]
    docs = list(_docs(25))
    for gid, text, dom, ids in docs:
        assert pool.text(gid) == text
        assert pool.domains[pool.domain_ids(np.array([gid]))[0]] == dom
        assert np.array_equal(pool.tokens(gid), ids.astype(np.int32))
        s = pool.training_sample(gid)
        row = np.zeros(SEQ + 1, dtype=np.int64)
        row[: min(len(ids), SEQ + 1)] = ids[: SEQ + 1]
        assert np.array_equal(s["tokens"], row[:-1]) and np.array_equal(s["labels"], row[1:])
        assert s["loss_mask"].sum() == min(len(ids), SEQ + 1) - 1
    assert pool.domain_ids(np.array([0, 1, 3])).tolist() == [0, 1, 0]
    # Selections go beside the shards; the tars are never rewritten.
    store = SelectionStore(tmp_path, "run1")
    store.save(0, np.array([3, 1, 2]))
    ids = store.load(0)
    assert ids.dtype == np.int32 and ids.tolist() == [3, 1, 2]
    assert store.rounds() == [0]
    assert not list(store.dir.glob(".*"))  # no temporary files left behind
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")} == before


def _text_offset(shard: Path, key: str) -> int:
    with tarfile.open(shard) as tf:
        return tf.getmember(f"{key}.txt").offset_data


def test_shard_changed_since_manifest_is_refused_at_its_first_read(tmp_path, monkeypatch):
    _write_shards(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    with shard.open("r+b") as f:  # one byte of a document's text: same size, tar headers intact
        f.seek(_text_offset(shard, "0000000012"))
        f.write(b"X")
    import mates_megatron.pool.manifest as manifest

    hashed = []
    real = manifest.sha256_file
    monkeypatch.setattr(
        manifest, "sha256_file", lambda f, *a: hashed.append(Path(getattr(f, "name", f)).name) or real(f)
    )
    pool = WebDatasetPool(tmp_path, seq_length=SEQ)  # start-up checks sizes and indexes; it hashes nothing
    assert hashed == []
    assert pool.text(3) == next(t for g, t, _, _ in _docs(25) if g == 3)  # shard 0 is intact
    pool.text(4)
    assert hashed == ["shard-000000.tar"]  # verified once, on its first read
    with pytest.raises(
        PoolError,
        match=r"shard-000001.tar changed since the manifest.*sha256 differs.*restore the original shard",
    ):
        pool.tokens(15)


def test_shard_of_another_size_is_refused_at_start_up(tmp_path):
    _write_shards(tmp_path)
    with (tmp_path / "shard-000001.tar").open("ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(
        PoolError, match=r"shard-000001.tar changed since the manifest.*\(size \d+ vs \d+ bytes\)"
    ):
        WebDatasetPool(tmp_path, seq_length=SEQ)


def test_changed_json_is_named_as_a_changed_shard(tmp_path):
    _write_shards(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    with tarfile.open(shard) as tf:
        at = tf.getmember("0000000012.json").offset_data
    with shard.open("r+b") as f:
        f.seek(at)
        f.write(b"X")  # the index cannot parse it; the checksum says why
    with pytest.raises(PoolError, match=r"shard-000001.tar changed since the manifest.*sha256 differs"):
        WebDatasetPool(tmp_path, seq_length=SEQ)


def test_unreadable_json_in_a_recorded_shard(tmp_path):
    shards = _write_shards(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    with tarfile.open(shard) as tf:
        at = tf.getmember("0000000012.json").offset_data
    with shard.open("r+b") as f:
        f.seek(at)
        f.write(b"X")
    write_manifest(tmp_path, shards)  # recorded as it is now: the shard itself is bad
    with pytest.raises(PoolError, match=r"shard-000001.tar: sample '0000000012' has unreadable .json"):
        WebDatasetPool(tmp_path, seq_length=SEQ)


def test_missing_shard(tmp_path):
    _write_shards(tmp_path)
    (tmp_path / "shard-000002.tar").unlink()
    with pytest.raises(PoolError, match=r"shard-000002.tar listed in .*manifest.json is missing"):
        WebDatasetPool(tmp_path, seq_length=SEQ)


def test_truncated_tar(tmp_path):
    shards = _write_shards(tmp_path)
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:3000])
    write_manifest(tmp_path, shards)  # recorded as it is now: only the tar itself is bad
    with pytest.raises(PoolError, match=r"shard-000000.tar is corrupt or truncated.*mates-megatron prepare"):
        WebDatasetPool(tmp_path, seq_length=SEQ)


def test_garbage_tar(tmp_path):
    shards = _write_shards(tmp_path)
    (tmp_path / "shard-000001.tar").write_bytes(b"this is not a tar file" * 100)
    write_manifest(tmp_path, shards)
    with pytest.raises(
        PoolError, match=r"shard-000001.tar (is corrupt or truncated|holds 0 samples|holds no samples)"
    ):
        WebDatasetPool(tmp_path, seq_length=SEQ)


def test_empty_shard(tmp_path):
    shards = _write_shards(tmp_path, n=10)
    with tarfile.open(tmp_path / "shard-000001.tar", "w"):
        pass
    write_manifest(tmp_path, [*shards, {"name": "shard-000001.tar", "num_samples": 0, "first_id": 10}])
    with pytest.raises(PoolError, match=r"shard-000001.tar holds no samples; remove it"):
        WebDatasetPool(tmp_path, seq_length=SEQ)


def test_sample_without_text(tmp_path):
    _write_shards(tmp_path, drop_txt_of=12)
    with pytest.raises(PoolError, match=r"shard-000001.tar: sample '0000000012' has no text \(.txt\)"):
        WebDatasetPool(tmp_path, seq_length=SEQ)


def test_no_manifest_and_empty_pool(tmp_path):
    with pytest.raises(PoolError, match=r"manifest.json not found.*mates-megatron prepare"):
        WebDatasetPool(tmp_path, seq_length=SEQ)
    write_manifest(tmp_path, [])
    with pytest.raises(PoolError, match="lists no shards: the pool is empty"):
        WebDatasetPool(tmp_path, seq_length=SEQ)


def test_streaming_with_webdataset_matches_random_access(tmp_path):
    _write_shards(tmp_path)
    pool = WebDatasetPool(tmp_path, seq_length=SEQ)
    urls = sorted(str(p) for p in tmp_path.glob("shard-*.tar"))
    for sample in wds.WebDataset(urls, shardshuffle=False):
        gid = int(__import__("json").loads(sample["json"])["id"])
        assert sample["txt"].decode() == pool.text(gid)
        assert np.array_equal(np.load(io.BytesIO(sample["ids.npy"])), pool.tokens(gid))


def test_mates_sampler_drives_a_torch_dataloader_like_megatron(tmp_path):
    """build_pretraining_data_loader's shape: DataLoader(dataset, batch_sampler=sampler)."""
    import torch

    from mates_megatron.sampler import MatesSampler

    _write_shards(tmp_path)
    pool = WebDatasetPool(tmp_path, seq_length=SEQ)
    loaders = []
    for rank in range(2):
        s = MatesSampler(8, 0, 2, rank, 2, samples_per_round=8, seed=1)
        s.publish(0, np.arange(3, 11))
        loaders.append(torch.utils.data.DataLoader(pool, batch_sampler=s, num_workers=1))
    seen = []
    for b0, b1 in zip(*loaders, strict=True):
        assert b0["tokens"].shape == (2, SEQ)
        seen += [b0["tokens"], b1["tokens"]]
    expected = [torch.as_tensor(pool.training_sample(i)["tokens"]) for i in range(3, 11)]
    got = sorted(t.tolist() for b in seen for t in b)
    assert got == sorted(t.tolist() for t in expected)
