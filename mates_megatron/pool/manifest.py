"""Shard manifest and selection files beside WebDataset shards ("reweighted in place").

The tars are never rewritten. ``manifest.json`` records each shard's name, size, sample count and sha256,
so a changed or missing shard is found before training on it. A round's selection (int32 ids) is a
small .npy file under ``mates/``, written to a temporary name and renamed. ``ShardStamps`` records, on each
node, the shards whose sha256 that node has checked, so that the loader workers of every round do not hash
them again.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mates_megatron.files import atomic_write_bytes, sha256_file
from mates_megatron.pool.base import PoolError

MANIFEST = "manifest.json"


def write_manifest(shards_dir: Path, shards: list[dict]) -> Path:
    """Record shards (dicts with name, num_samples, first_id) with their sizes and checksums."""
    entries = []
    for s in shards:
        path = shards_dir / s["name"]
        entries.append({**s, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    data = json.dumps({"format": 1, "shards": entries}, indent=1).encode()
    out = shards_dir / MANIFEST
    atomic_write_bytes(out, data)
    return out


def read_manifest(shards_dir: Path) -> list[dict]:
    path = shards_dir / MANIFEST
    if not path.is_file():
        raise PoolError(
            f"{path} not found: a WebDataset pool needs the manifest that `mates-megatron prepare` writes "
            f"beside the shards (or call mates_megatron.pool.manifest.write_manifest on {shards_dir})"
        )
    try:
        entries = json.loads(path.read_text())["shards"]
    except (json.JSONDecodeError, KeyError) as e:
        raise PoolError(
            f"{path} is not a valid manifest ({e}); re-create it with `mates-megatron prepare`"
        ) from e
    if not entries:
        raise PoolError(f"{path} lists no shards: the pool is empty; prepare some data into {shards_dir}")
    return entries


def check_shard(shards_dir: Path, entry: dict) -> Path:
    """Cheap start-up check of a shard against its manifest entry: it exists and has the recorded size."""
    path = shards_dir / entry["name"]
    if not path.is_file():
        raise PoolError(
            f"shard {path} listed in {shards_dir / MANIFEST} is missing; restore it, or re-run "
            "`mates-megatron prepare` to rebuild the shards and manifest"
        )
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise _changed(path, f"size {size} vs {entry['bytes']} bytes")
    return path


def verify_shard(shards_dir: Path, entry: dict) -> Path:
    """Full check (existence, size, sha256) of one shard, now. Readers check a shard on its first read through
    ``ShardStamps`` instead (once per node), so that a 25.6M-candidate pool does not hash every shard on every
    rank before the first step."""
    path = check_shard(shards_dir, entry)
    if sha256_file(path) != entry["sha256"]:
        raise _changed(path, "sha256 differs")
    return path


def _changed(path: Path, how: str) -> PoolError:
    return PoolError(
        f"shard {path} changed since the manifest was written ({how}): training on it would not be the "
        "recorded pool; restore the original shard or re-run `mates-megatron prepare` to rebuild the shards "
        "and manifest"
    )


def default_stamp_dir() -> Path:
    """``TMPDIR/mates-megatron-UID-shard-stamps``: the node's temporary directory (node-local on clusters; a
    job's own one where the scheduler sets TMPDIR per job), one directory per user."""
    return Path(tempfile.gettempdir()) / f"mates-megatron-{os.getuid()}-shard-stamps"


class ShardStamps:
    """The shards whose sha256 this node has checked against their manifest, as one stamp file per shard.

    Hashing a shard reads all of it, and DataLoader workers are new processes every round, several per rank:
    hashing on each process's first read multiplies the corpus' reads by ranks x workers x rounds. Here the
    first process on the node to read a shard hashes it, under a lock on that shard (workers that start
    together wait for it rather than hash it too), and writes a stamp; a later process accepts the stamp when
    the file it opened is the one that was hashed: same path, device, inode, size, mtime and ctime, and the
    same manifest sha256. An edit in place changes mtime and ctime (ctime cannot be set back), a replacement
    changes the inode, a new manifest changes the sha256: each makes the stamp stale and the shard is hashed
    again. A stamp vouches for a shard, so the directory must be this user's and closed to others' writes.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.dir = Path(directory) if directory is not None else default_stamp_dir()
        self._checked = False

    def verify(self, path: Path, sha256: str, f: BinaryIO) -> None:
        """Check the open shard ``f`` (opened from ``path``) against the manifest's ``sha256`` unless a
        stamp shows this node checked this very file; raise PoolError when its sha256 differs."""
        record = _stamp_record(path, sha256, os.fstat(f.fileno()))
        stamp = self._stamp_path(record["path"])
        if _read_stamp(stamp) == record:
            return
        with _locked(stamp.with_suffix(".lock")):
            if _read_stamp(stamp) == record:  # another process hashed it while this one waited
                return
            if sha256_file(f) != sha256:
                stamp.unlink(missing_ok=True)
                raise _changed(path, "sha256 differs")
            atomic_write_bytes(stamp, json.dumps(record).encode())

    def _stamp_path(self, shard: str) -> Path:
        if not self._checked:
            self._check_dir()
            self._checked = True
        return self.dir / f"{hashlib.sha256(shard.encode()).hexdigest()[:32]}.json"

    def _check_dir(self) -> None:
        fix = "pass stamp_dir= a directory of your own"
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(self.dir)
        except OSError as e:
            raise PoolError(
                f"cannot create the shard stamp directory {self.dir} ({e}): set TMPDIR to a writable node-local "
                f"directory, or {fix}"
            ) from e
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise PoolError(
                f"shard stamp directory {self.dir} is not a directory owned by this user (uid {os.getuid()}): "
                f"a stamp there could vouch for a changed shard; remove it, or {fix}"
            )
        if st.st_mode & 0o022:
            raise PoolError(
                f"shard stamp directory {self.dir} is writable by other users (mode {oct(st.st_mode & 0o777)}): "
                f"a stamp there could vouch for a changed shard; chmod go-w it, or {fix}"
            )


def _stamp_record(path: Path, sha256: str, st: os.stat_result) -> dict:
    return {
        "path": os.path.realpath(path),
        "sha256": sha256,
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def _read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_bytes())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: hash the shard again


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (each process opens its own: forked workers do not share it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class SelectionStore:
    """Per-round selections in ``DIR/mates/RUN_NAME/``: round_00003.ids.npy (int32 candidate ids)."""

    def __init__(self, shards_dir: Path, run_name: str = "default") -> None:
        self.dir = Path(shards_dir) / "mates" / run_name

    def _path(self, round_: int, kind: str) -> Path:
        return self.dir / f"round_{round_:05d}.{kind}.npy"

    def save(self, round_: int, ids: np.ndarray) -> Path:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(ids, dtype=np.int32))
        path = self._path(round_, "ids")
        atomic_write_bytes(path, buf.getvalue())
        return path

    def load(self, round_: int) -> np.ndarray:
        path = self._path(round_, "ids")
        if not path.is_file():
            raise PoolError(f"no selection for round {round_} at {path}")
        return np.load(path)

    def rounds(self) -> list[int]:
        return sorted(int(p.name[6:11]) for p in self.dir.glob("round_*.ids.npy"))
