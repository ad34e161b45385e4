"""Data values written beside a pool's shards (the pool is never rewritten), and read back by id.

``<shards>/values/<name>.npy``: float64, one value per candidate id (0 .. N-1); ``<name>.json``: what made
them (method, options, the reference file and its sha256, the pool's fingerprint, the solver's figures).
A reader refuses values whose pool fingerprint or length differs from the pool it is given.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from mates_megatron.files import atomic_write_bytes, atomic_write_json


def values_paths(shards_dir: str | Path, name: str) -> tuple[Path, Path]:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"values name {name!r} must be a plain file name (e.g. 'lava')")
    d = Path(shards_dir) / "values"
    return d / f"{name}.npy", d / f"{name}.json"


def write_values(shards_dir: str | Path, name: str, values: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write atomically (a reader never sees half a file)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"values {name!r} have {int((~np.isfinite(values)).sum())} non-finite entries")
    npy, js = values_paths(shards_dir, name)
    buf = io.BytesIO()
    np.save(buf, values)
    atomic_write_bytes(npy, buf.getvalue())
    atomic_write_json(js, {**meta, "count": len(values)})
    return npy


def read_values(path: str | Path, pool) -> tuple[np.ndarray, dict[str, Any]]:
    """The values at ``path`` (the .npy) for ``pool``; ValueError when they were computed for another."""
    npy = Path(path)
    js = npy.with_suffix(".json")
    if not npy.is_file() or not js.is_file():
        raise FileNotFoundError(
            f"values {npy} (and {js.name}) not found: write them with `mates-megatron value --shards DIR "
            "--reference REF.jsonl --method lava|gotd`"
        )
    meta = json.loads(js.read_text())
    values = np.load(npy, mmap_mode="r")
    if meta.get("pool_fingerprint") != pool.fingerprint() or len(values) != len(pool):
        raise ValueError(
            f"values {npy} were computed for pool {meta.get('pool_fingerprint')!r} ({len(values)} candidates), "
            f"this pool is {pool.fingerprint()!r} ({len(pool)}): value this pool again with `mates-megatron value`"
        )
    return values, meta
