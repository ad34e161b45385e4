"""One influence model across rounds: fit and predict on the influence group, share scores, checkpoint state."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.influence import build_influence_model
from mates_megatron.influence.base import InfluenceModel
from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.influence.encoder import resolve_device
from mates_megatron.influence.group import accelerator_group, influence_group, meet
from mates_megatron.influence.worker import InfluenceWorker, WorkerWorld, worker_address
from mates_megatron.runtime.rng import get_host_rng_state


class InfluenceRunner:
    """Owns the influence model (built by name from ``cfg.model``) and its process group.

    ``ranks`` (default: all) form the side group that fits and predicts; scores then reach every rank of
    the world by a broadcast from the group's first rank over a gloo group of the world. ``device`` is the
    training device; the influence model runs there unless ``cfg.device`` names another (CPU when neither is
    given). Collective at construction (the groups are created on every rank).

    ``pool`` given: asynchronous. Each member starts an ``InfluenceWorker`` (a side process that holds its
    model; the workers form their own world) and ``submit`` returns while the worker fits and predicts;
    ``collect`` waits for the scores. Otherwise ``submit`` computes in this process and ``collect`` returns
    at once. Both give the same scores.
    """

    def __init__(
        self,
        cfg: InfluenceConfig,
        *,
        ranks: list[int] | None = None,
        device: str | torch.device | None = None,
        pool=None,
        imports: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device, device)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.ranks = (
            sorted(ranks)
            if ranks is not None
            else (list(range(dist.get_world_size())) if self.distributed else [0])
        )
        timeout_s = cfg.timeout_s
        self.group = influence_group(self.ranks, timeout_s=timeout_s) if self.distributed else None
        # The fit's gradients all-reduce on the accelerator (NCCL) when the model is on CUDA; CPU: None (gloo).
        self.device_group = (
            accelerator_group(self.ranks, self.device, timeout_s=timeout_s)
            if self.distributed and pool is None and len(self.ranks) > 1
            else None
        )
        subset = self.distributed and len(self.ranks) < dist.get_world_size()
        # Scores reach non-members over gloo (CPU tensors), never on the default group, which is NCCL on GPUs.
        self.world_group = influence_group(timeout_s=timeout_s) if subset else None
        self.member = not self.distributed or dist.get_rank() in self.ranks
        self.worker: InfluenceWorker | None = None
        """Asynchronous: this member's side process, which holds its model."""
        self.worker_delay = 0.0
        """Seconds each worker sleeps before a fit (tests: an artificially slow influence rank)."""
        self.model: InfluenceModel | None = None
        """Synchronous: the influence model on members of the group; None elsewhere."""
        if pool is not None:
            self.worker = self._start_worker(pool, imports)
        elif self.member:
            self.model = build_influence_model(cfg, device=self.device)
        self.rounds_fitted = 0
        self._pending: tuple[np.ndarray, float, float, float] | None = None
        self._submitted = False

    def _start_worker(self, pool, imports) -> InfluenceWorker | None:
        world = None
        if self.distributed and len(self.ranks) > 1:
            box = [worker_address() if dist.get_rank() == self.ranks[0] else None]
            dist.broadcast_object_list(box, src=self.ranks[0], group=self.world_group or self.group)
            if self.member:
                world = WorkerWorld(self.ranks.index(dist.get_rank()), tuple(self.ranks), box[0])
        if not self.member:
            return None
        return InfluenceWorker(self.cfg, pool=pool, device=self.device, imports=imports, world=world)

    def submit(
        self, ids: np.ndarray, texts: Sequence[str], probe_positions: np.ndarray, probe_scores: np.ndarray
    ) -> None:
        """Start fitting on the probes (``texts[probe_positions]`` with their oracle scores) and predicting
        every candidate (``ids``, read as ``texts``).

        ``texts`` may decode on access (``pool.CandidateTexts``): a member reads the probes and its own shard
        only; a non-member reads nothing and may pass an empty sequence. A worker reads ``ids`` from its own
        copy of the pool. Synchronous: collective over the influence group. The fit starts from the caller's
        RNG state (a worker is given it), so both modes give the same scores.
        """
        if self._submitted:
            raise RuntimeError("InfluenceRunner.submit: the previous round was not collected")
        self._submitted = True
        if self.worker is not None:
            self.worker.submit(ids, probe_positions, probe_scores, self._rng_state(), delay=self.worker_delay)
        elif self.model is not None:
            t = time.perf_counter()
            self._meet(self.group, "fit/predict")
            scores, result = self.model.fit_predict(
                texts, probe_positions, probe_scores, group=self.group, device_group=self.device_group
            )
            self._pending = (
                scores.astype(np.float32),
                result.spearman,
                result.pearson,
                time.perf_counter() - t,
            )

    def _rng_state(self) -> dict[str, Any]:
        """The RNG state the synchronous fit would start from, for the worker: the host streams, with the CUDA
        stream of the influence device (the one its fit draws from), not of the current device."""
        state = get_host_rng_state()
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _meet(self, group, phase: str) -> None:
        """Every rank of ``group`` (one of this runner's) reaches ``phase`` within the timeout, or the run fails
        naming the phase and the training ranks that did not."""
        if group is not None and dist.get_world_size(group) > 1:
            ranks = dist.get_process_group_ranks(group)
            names = [f"training rank {r}" for r in ranks]
            meet(group, phase=phase, timeout_s=self.cfg.timeout_s, names=names)

    def predict_only(self, ids: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, float, float, float]:
        """Score every candidate with the model as last fitted, without fitting (synchronous runners only);
        returns what ``collect`` returns, with NaN for the fit statistics."""
        if self.worker is not None:
            raise RuntimeError("InfluenceRunner.predict_only runs synchronously: build it without a pool")
        if self.rounds_fitted == 0:
            raise RuntimeError(
                "InfluenceRunner.predict_only before any fit: there is no model to predict with"
            )
        self._submitted = True
        if self.model is not None:
            t = time.perf_counter()
            self._meet(self.group, "predict")
            scores = self.model.predict(texts, group=self.group)
            self._pending = (scores.astype(np.float32), float("nan"), float("nan"), time.perf_counter() - t)
        return self._share()

    @property
    def in_flight(self) -> bool:
        return self._submitted

    def collect(self) -> tuple[np.ndarray, float, float, float]:
        """(predicted scores, held-out Spearman, held-out Pearson, the members' fit-and-predict seconds) of
        the submitted round, identical on every rank of the world; waits for the workers (collective)."""
        if not self._submitted:
            raise RuntimeError("InfluenceRunner.collect: nothing was submitted")
        out = self._share()
        self.rounds_fitted += 1  # on every rank: a checkpoint of any rank tells how many rounds were fitted
        return out

    def _share(self) -> tuple[np.ndarray, float, float, float]:
        """The members' pending (scores, Spearman, Pearson, seconds), broadcast to every rank of the world."""
        self._submitted = False
        pred = torch.zeros(0, dtype=torch.float32)
        stats = torch.zeros(3, dtype=torch.float64)
        if self.member:
            scores, sp, pe, seconds = self.worker.result() if self.worker is not None else self._pending
            self._pending = None
            pred = torch.from_numpy(scores)  # float32 already on the wire (gather_rows)
            stats = torch.tensor([sp, pe, seconds], dtype=torch.float64)
        if self.world_group is not None:
            src, group = self.ranks[0], self.world_group
            self._meet(group, "sharing scores")
            size = torch.tensor([len(pred)], dtype=torch.long)
            dist.broadcast(size, src=src, group=group)  # non-members do not know the pool's size
            if not self.member:
                pred = torch.zeros(int(size), dtype=torch.float32)
            dist.broadcast(pred, src=src, group=group)
            dist.broadcast(stats, src=src, group=group)
        return pred.numpy().astype(np.float64), float(stats[0]), float(stats[1]), float(stats[2])

    def score_round(
        self, texts: Sequence[str], probe_positions: np.ndarray, probe_scores: np.ndarray, ids=None
    ) -> tuple[np.ndarray, float, float]:
        """``submit`` then ``collect``: (predicted scores, held-out Spearman, held-out Pearson)."""
        self.submit(ids, texts, probe_positions, probe_scores)
        return self.collect()[:3]

    def state_dict(self) -> dict[str, Any]:
        """Rounds fitted (on every rank) and the model's state (None before the first fit and on
        non-members)."""
        if self._submitted:
            raise RuntimeError("InfluenceRunner.state_dict with a round in flight: collect it first")
        holder = self.worker or self.model
        model = holder.state_dict() if holder is not None else None
        return {"rounds_fitted": self.rounds_fitted, "model": model or None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_fitted = int(state["rounds_fitted"])
        holder = self.worker or self.model
        if state["model"] is not None and holder is not None:
            holder.load_state_dict(state["model"])

    def close(self) -> None:
        """Stop the worker (asynchronous); nothing to do otherwise."""
        if self.worker is not None:
            self.worker.close()
