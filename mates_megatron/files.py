"""File helpers every part shares: atomic writes (a reader, or a job resumed after a crash, never sees half a
file), sha256 of a file, JSON Lines."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def sha256_file(source: str | Path | BinaryIO, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, by path or through an open file (read with ``os.pread``: the file's offset,
    which a forked process may share, is neither used nor moved)."""
    if hasattr(source, "fileno"):
        return _sha256_fd(source.fileno(), chunk)
    with Path(source).open("rb") as f:
        return _sha256_fd(f.fileno(), chunk)


def _sha256_fd(fd: int, chunk: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, chunk, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s directory for a writer that takes a file name (``torch.save``,
    ``np.savez``): on success it is synced and renamed to ``path``; on an error it is removed and ``path`` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are read by other users' jobs too
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, synced, then renamed."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict], *, ensure_ascii: bool = False) -> Path:
    """One JSON object a line, written atomically."""
    buf = io.StringIO()
    for row in rows:
        buf.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
    return atomic_write_text(path, buf.getvalue())
