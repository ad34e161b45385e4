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

Under torchrun, the worker inherits the launcher's environment; its world meets through a TCP store that
worker rank 0 hosts, built explicitly (``join_world``), and it selects its GPU before anything else. Every wait
(joining, the workers' collectives, a training rank waiting for its worker's answer) gives up after
``InfluenceConfig.timeout_s`` with ``InfluenceTimeout`` naming the phase and the worker that did not answer.
"""

from __future__ import annotations

import multiprocessing.util as mp_util
import os
import pickle
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.influence.group import InfluenceTimeout, accelerator_group, meet, timeout_message
from mates_megatron.runtime.rng import set_host_rng_state

REPORT_GRACE_S = 10.0
"""A training rank waits this long beyond ``timeout_s`` for its worker's answer, so that a worker whose own
wait on a peer timed out reports that peer first. The worker's waits end at their deadline (``join_world``
bounds the store connection itself), so the grace covers only the report's own latency on a loaded host."""


@dataclass(frozen=True)
class WorkerWorld:
    """The workers' own gloo world: one worker per influence rank, ranked in the influence ranks' order."""

    rank: int
    """This worker's rank in the workers' world."""
    training_ranks: tuple[int, ...]
    """The training rank whose worker each rank of the workers' world is."""
    address: str
    """host:port of the TCP store that worker rank 0 hosts."""

    @property
    def size(self) -> int:
        return len(self.training_ranks)

    def name(self, rank: int) -> str:
        return f"worker rank {rank} (the influence worker of training rank {self.training_ranks[rank]})"


def select_device(spec: str) -> torch.device:
    """The worker's device, made current first: ``torch.cuda.set_rng_state``, bf16 autocast and the caching
    allocator act on the current device, which in a new process is GPU 0 whatever device the model is on."""
    device = torch.device(spec)
    if device.type == "cuda":
        if device.index is None:
            raise ValueError(
                f"influence worker device {spec!r}: give an indexed device (resolve_device does)"
            )
        torch.cuda.set_device(device)
    return device


def join_world(world: WorkerWorld, timeout_s: float):
    """Join the workers' world through a TCP store that worker rank 0 hosts; InfluenceTimeout naming the
    workers that did not join within ``timeout_s``."""
    host, port = world.address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    timeout = timedelta(seconds=timeout_s)

    def host_missing(torch_said: str = "") -> InfluenceTimeout:
        return InfluenceTimeout(
            timeout_message(
                "worker start",
                f"{world.name(0)}, which hosts the workers' store at {world.address}",
                timeout_s,
                f"{torch_said}where that address is not reachable from every node, set "
                "MATES_INFLUENCE_WORKER_ADDR to one that is",
            )
        )

    if world.rank != 0 and not _await_listener(host, int(port), deadline):
        raise host_missing()
    # An explicit store, never init_method's rendezvous: that one reads TORCHELASTIC_USE_AGENT_STORE, which
    # torchrun's children inherit as True, and makes every worker a client of a store nobody serves (torch's
    # own async-checkpoint process resets the variable for the same reason).
    try:
        store = dist.TCPStore(
            host,
            int(port),
            world.size,
            is_master=world.rank == 0,
            timeout=timedelta(seconds=max(deadline - time.monotonic(), 1.0)),
            wait_for_workers=False,
        )
        store.set_timeout(timeout)  # the store's later operations get the whole timeout again
    except (RuntimeError, TimeoutError) as e:  # DistNetworkError is a RuntimeError
        raise host_missing(f"torch: {str(e).splitlines()[0]}\n") from None
    keys = [f"mates/joined/{r}" for r in range(world.size)]
    store.set(keys[world.rank], "1")
    try:  # what is left of the phase's timeout: connecting counted against it
        store.wait(keys, timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
    except RuntimeError:  # DistStoreError: some worker never joined
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise InfluenceTimeout(
            timeout_message("worker start", ", ".join(map(world.name, missing)), timeout_s)
        ) from None
    dist.init_process_group("gloo", store=store, rank=world.rank, world_size=world.size, timeout=timeout)
    return dist.group.WORLD


def _await_listener(host: str, port: int, deadline: float) -> bool:
    """Whether the store's port accepts a connection before ``deadline``. A client checks this itself, not by
    the store's timeout: torch's TCPStore client retries after its timeout runs out (a 15 s timeout took 25 s
    here), so a missing host would be reported after the training rank had given up on the worker."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            socket.create_connection((host, port), timeout=min(left, 1.0)).close()
            return True
        except OSError:  # refused (nobody listens yet) or timed out: try again until the deadline
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))


def _serve(conn, cfg: InfluenceConfig, pool, device: str, imports: list[str], threads: int, world) -> None:
    """The worker's loop: one request at a time from the training rank that started it."""
    from mates_megatron.influence import build_influence_model
    from mates_megatron.pool.base import candidate_inputs
    from mates_megatron.registry import import_modules

    try:
        device = select_device(device)  # before any RNG or model work
        torch.set_num_threads(threads)
        import_modules(imports)
        # Rebuilt here, not by spawn before this function runs: a pool that refuses to rebuild (its data
        # changed since the run started) is then reported to the training rank, not lost in a dead process.
        pool = pool.load()
        group, device_group, names = None, None, []
        if world is not None:
            conn.send(("phase", "worker start: joining the workers' world"))
            group = join_world(world, cfg.timeout_s)
            names = [world.name(r) for r in range(world.size)]
            device_group = accelerator_group(None, device, timeout_s=cfg.timeout_s)  # NCCL on CUDA
        conn.send(("phase", "worker start: loading the influence model"))
        model = build_influence_model(cfg, device=device)
        conn.send(("ready", None))
    except BaseException as e:  # noqa: BLE001 - reported to the training rank, which raises it
        conn.send(_failure(e))
        return
    while True:
        kind, payload = conn.recv()
        if kind == "stop":
            break
        try:
            if kind == "fit_predict":
                t = time.perf_counter()
                if group is not None:  # every worker has its job: the fit's collectives can start
                    meet(group, phase="fit/predict", timeout_s=cfg.timeout_s, names=names)
                if payload["delay"]:
                    time.sleep(payload["delay"])  # tests: an artificially slow influence rank
                set_host_rng_state(payload["rng"])
                texts = candidate_inputs(pool, payload["ids"], token_ids=cfg.pass_token_ids)
                scores, result = model.fit_predict(
                    texts, payload["positions"], payload["scores"], group=group, device_group=device_group
                )
                out = (scores.astype(np.float32), result.spearman, result.pearson, time.perf_counter() - t)
            elif kind == "state_dict":
                out = model.state_dict()
            elif kind == "load_state_dict":
                out = model.load_state_dict(payload)
            else:
                raise ValueError(f"unknown request {kind!r}")
            conn.send(("ok", out))
        except BaseException as e:  # noqa: BLE001
            conn.send(_failure(e))
    if world is not None:
        dist.destroy_process_group()


class _Pickled:
    """An object that crosses into the worker as pickle bytes, loaded where the worker chooses."""

    def __init__(self, obj: Any) -> None:
        self.data = pickle.dumps(obj)

    def load(self) -> Any:
        return pickle.loads(self.data)


def _failure(e: BaseException) -> tuple[str, str]:
    """A timeout's message as it is (it names the phase and the peer); any other error with its traceback."""
    if isinstance(e, InfluenceTimeout):
        return ("timeout", str(e))
    return ("error", traceback.format_exc())


class InfluenceWorker:
    """One side process holding this member's influence model; requests go one at a time over a pipe.

    ``submit`` returns at once; ``result`` waits for it. ``world``: this worker's place in the workers' own
    gloo world when the influence group has several members, None for one member. Started at construction
    (importing torch and the encoder takes seconds); stopped by ``close`` or at exit. Every wait for the
    worker's answer gives up after ``cfg.timeout_s`` plus ``REPORT_GRACE_S`` of silence with
    InfluenceTimeout naming the phase and the worker, and kills the worker.
    """

    def __init__(
        self,
        cfg: InfluenceConfig,
        *,
        pool,
        device: torch.device,
        imports: list[str] | None = None,
        world: WorkerWorld | None = None,
    ) -> None:
        self.timeout_s = cfg.timeout_s
        self.world = world
        ctx = mp.get_context("spawn")
        try:  # pickled here, once (a pool pickles as what rebuilds it), rebuilt inside the worker's try
            pool_bytes = _Pickled(pool)
        except Exception as e:  # noqa: BLE001 - any pickling failure means the same fix
            raise ValueError(
                f"selection.asynchronous: the pool ({type(pool).__name__}) cannot be sent to the influence "
                f"worker process ({type(e).__name__}: {e}); set selection.asynchronous: false"
            ) from e
        self._conn, child = ctx.Pipe()
        args = (child, cfg, pool_bytes, str(device), list(imports or []), torch.get_num_threads(), world)
        # Not a daemon: a daemonic process may not start children, and the worker forks its loader workers
        # (InfluenceConfig.loader_workers). At exit it is ended as a daemon would be (``_end_at_exit``).
        self.process = ctx.Process(target=_serve, args=args, name="mates-influence-worker", daemon=False)
        self.process.start()
        # A multiprocessing finalizer, not atexit: a training process that is itself a multiprocessing child
        # (mp.spawn) leaves through multiprocessing's exit function, which runs no atexit handler and joins
        # non-daemonic children; it runs this first (and the main process's runs at exit too).
        self._at_exit = mp_util.Finalize(self, _end_at_exit, args=(self.process,), exitpriority=10)
        child.close()
        self._busy = False
        self._reply("worker start")

    @property
    def name(self) -> str:
        """Which worker this is, as a timeout names it."""
        if self.world is not None:
            return f"{self.world.name(self.world.rank)}, pid {self.process.pid}"
        return f"the influence worker (pid {self.process.pid})"

    def _reply(self, phase: str) -> Any:
        """The worker's answer to the request in ``phase``; the worker may report sub-phases first (each
        restarts the wait)."""
        patience = self.timeout_s + REPORT_GRACE_S
        while True:
            if not self._conn.poll(patience):  # a dead worker is readable (EOF): only silence gets here
                self.process.kill()  # unresponsive: it would otherwise outlive the failed run
                self.process.join(5)
                raise InfluenceTimeout(timeout_message(phase, self.name, self.timeout_s))
            try:
                status, value = self._conn.recv()
            except EOFError:
                self.process.join(5)
                raise RuntimeError(
                    f"the influence worker (pid {self.process.pid}) died during {phase} with exit code "
                    f"{self.process.exitcode}: see its output above (out of memory is the usual cause)"
                ) from None
            if status == "phase":
                phase = value
            elif status == "timeout":
                raise InfluenceTimeout(f"{value}\n(reported by {self.name})")
            elif status == "error":
                raise RuntimeError(f"the influence worker failed during {phase}:\n{value}")
            else:
                return value

    def _call(self, kind: str, payload: Any = None, *, phase: str) -> Any:
        if self._busy:
            raise RuntimeError(f"influence worker: {kind} while a fit is in flight; call result() first")
        self._conn.send((kind, payload))
        return self._reply(phase)

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
        return self._reply("fit/predict")

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict", phase="checkpoint: reading the influence model")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._call("load_state_dict", state, phase="resume: loading the influence model")

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
        self._at_exit.cancel()


def _end_at_exit(process) -> None:
    """What multiprocessing does to a daemonic child at exit (terminate, then kill), for the worker (also when
    its handle is dropped unclosed): it runs before multiprocessing's exit function joins the non-daemonic
    children, which would otherwise wait for the worker while it waits on its pipe."""
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()


def worker_address() -> str:
    """host:port on this host for the workers' own world (the first member's worker hosts its store)."""
    from mates_megatron.compat.spawn import free_port

    host = os.environ.get("MATES_INFLUENCE_WORKER_ADDR") or _this_host()
    return f"{host}:{free_port()}"


def _this_host() -> str:
    import socket

    return socket.gethostbyname(socket.gethostname())
