"""Shard manifest and selection files beside WebDataset shards ("reweighted in place").

The tars are never rewritten. ``manifest.json`` records each shard's name, size, sample count and sha256,
so a changed or missing shard is found before training on it. A round's selection (int32 ids) is a
small .npy file under ``mates/``, written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from mates_megatron.pool.base import PoolError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are read by other users' jobs too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Full check (existence, size, sha256); callers run it on a shard's first read, not at start-up, so that
    a 25.6M-candidate pool does not hash every shard on every rank before the first step."""
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
