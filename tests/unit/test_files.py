"""The shared file helpers: an atomic write either replaces the file whole or leaves it as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mates_megatron.files import atomic_path, atomic_write_json


def test_an_atomic_path_replaces_the_file_only_when_the_writer_finishes(tmp_path):
    path = tmp_path / "state.pt"
    atomic_write_json(path, {"old": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(path) as tmp:
        torch.save({"new": 2}, tmp)
        raise RuntimeError("writer died")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    with atomic_path(path) as tmp:
        torch.save({"new": 2}, tmp)
    assert torch.load(path) == {"new": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    assert path.stat().st_mode & 0o777 == 0o644  # readable by other users' jobs, as the other helpers write


def test_np_savez_keeps_the_name_it_is_given(tmp_path):
    # np.savez appends .npz to a name without it: the temporary name ends in the target's suffix.
    with atomic_path(tmp_path / "index.npz") as tmp:
        np.savez(tmp, a=np.arange(3))
    with np.load(tmp_path / "index.npz") as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]
