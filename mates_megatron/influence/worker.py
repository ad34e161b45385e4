"""The influence stage in a side process, so that training goes on while the influence model fits and scores.

Asynchronous rounds (``SelectionConfig.asynchronous``): every influence member (a training rank) starts one
worker process that holds its influence model. The members' workers form their own gloo world (never one of
the training job's groups), so the sharded fit/predict runs there exactly as it runs on the members' own
group in synchronous rounds. A job carries the candidate ids, the probe positions and scores, and the RNG
state the synchronous fit would have started from; with the same thread count, the worker's result is the
synchronous one bit for bit. Why a process and not a thread: the fit draws from the global torch RNG
(dropout, head init) and would interleave with training's draws, so the selection would depend on timing.

The worker reads candidate text through the pool it is given (pickled at start: a pool must pickle to run
asynchronously); each worker reads the probes and its own shard only.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.runtime.rng import set_host_rng_state


def _serve(conn, cfg: InfluenceConfig, pool, device: str, imports: list[str], threads: int, world) -> None:
    """The worker's loop: one request at a time from the training rank that started it."""
    from mates_megatron.influence.registry import build_influence_model
    from mates_megatron.pool.base import candidate_inputs
    from mates_megatron.registry import import_modules

    torch.set_num_threads(threads)
    try:
        import_modules(imports)
        group = None
        if world is not None:
            rank, size, address = world
            dist.init_process_group("gloo", init_method=address, rank=rank, world_size=size)
            group = dist.group.WORLD
        model = build_influence_model(cfg, device=device)
        conn.send(("ready", None))
    except BaseException:  # noqa: BLE001 - reported to the training rank, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        kind, payload = conn.recv()
        if kind == "stop":
            break
        try:
            if kind == "fit_predict":
                t = time.perf_counter()
                if payload["delay"]:
                    time.sleep(payload["delay"])  # tests: an artificially slow influence rank
                set_host_rng_state(payload["rng"])
                texts = candidate_inputs(pool, payload["ids"], token_ids=cfg.pass_token_ids)
                scores, result = model.fit_predict(
                    texts, payload["positions"], payload["scores"], group=group
                )
                out = (scores.astype(np.float32), result.spearman, result.pearson, time.perf_counter() - t)
            elif kind == "state_dict":
                out = model.state_dict()
            elif kind == "load_state_dict":
                out = model.load_state_dict(payload)
            else:
                raise ValueError(f"unknown request {kind!r}")
            conn.send(("ok", out))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
    if world is not None:
        dist.destroy_process_group()


class InfluenceWorker:
    """One side process holding this member's influence model; requests go one at a time over a pipe.

    ``submit`` returns at once; ``result`` waits for it. ``world``: (rank, size, init address) of the
    workers' own gloo world when the influence group has several members, None for one member. Started at
    construction (importing torch and the encoder takes seconds); stopped by ``close`` or at exit.
    """

    def __init__(
        self,
        cfg: InfluenceConfig,
        *,
        pool,
        device: torch.device,
        imports: list[str] | None = None,
        world: tuple[int, int, str] | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve,
            args=(child, cfg, pool, str(device), list(imports or []), torch.get_num_threads(), world),
            name="mates-influence-worker",
            daemon=True,
        )
        try:  # spawn pickles the pool here, once: the worker holds its own copy of the pool's index
            self.process.start()
        except Exception as e:  # noqa: BLE001 - any pickling failure means the same fix
            self._conn.close()
            child.close()
            raise ValueError(
                f"selection.asynchronous: the pool ({type(pool).__name__}) cannot be sent to the influence "
                f"worker process ({type(e).__name__}: {e}); set selection.asynchronous: false"
            ) from e
        child.close()
        self._busy = False
        self._reply("start")

    def _reply(self, what: str) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(
                f"the influence worker (pid {self.process.pid}) died during {what} with exit code "
                f"{self.process.exitcode}: see its output above (out of memory is the usual cause)"
            ) from None
        if status == "error":
            raise RuntimeError(f"the influence worker failed during {what}:\n{value}")
        return value

    def _call(self, kind: str, payload: Any = None) -> Any:
        if self._busy:
            raise RuntimeError(f"influence worker: {kind} while a fit is in flight; call result() first")
        self._conn.send((kind, payload))
        return self._reply(kind)

    def submit(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        scores: np.ndarray,
        rng: dict[str, Any],
        *,
        delay: float = 0.0,
    ) -> None:
        if self._busy:
            raise RuntimeError("influence worker: a fit is already in flight; call result() first")
        payload = {"ids": ids, "positions": positions, "scores": scores, "rng": rng, "delay": delay}
        self._conn.send(("fit_predict", payload))
        self._busy = True

    @property
    def busy(self) -> bool:
        return self._busy

    def result(self) -> tuple[np.ndarray, float, float, float]:
        """(float32 scores of every candidate, Spearman, Pearson, the worker's seconds); waits for them."""
        if not self._busy:
            raise RuntimeError("influence worker: result() with nothing submitted")
        self._busy = False
        return self._reply("fit_predict")

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._call("load_state_dict", state)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                if self._busy:
                    self.result()
                self._conn.send(("stop", None))
            except (OSError, RuntimeError):
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


def worker_address() -> str:
    """A TCP address on this host for the workers' own world (the first member's workers host it)."""
    from mates_megatron.compat.spawn import free_port

    host = os.environ.get("MATES_INFLUENCE_WORKER_ADDR") or _this_host()
    return f"tcp://{host}:{free_port()}"


def _this_host() -> str:
    import socket

    return socket.gethostbyname(socket.gethostname())
