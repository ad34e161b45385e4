"""The Megatron-LM CPU launcher's distributed-optimizer resume shim, without a Megatron-LM checkout.

``integrations.megatron_lm.cpu`` lets Megatron-LM's ``load_checkpoint`` resume ``--use-distributed-optimizer``
from ``torch_dist`` with torch Adam inside (no apex/TE). Here its load sequence runs on 2 gloo ranks (DP=2, bf16
as in the end-to-end test) against a checkpoint of the project's own loop: without the shim the load asserts,
megatron-core's own load leaves every Adam step at 0, and with the shim each parameter gets its own step K and
the saved moments. The end-to-end proof (a resume bit-identical to the uninterrupted run) is
tests/integration/test_megatron_lm_e2e.py, which needs a checkout.
"""

from __future__ import annotations

import pytest
import torch

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

K = 2


def _config(data, **overrides):
    from mates_megatron.training.loop import TrainConfig
    from mates_megatron.training.model import GPTConfig
    from mates_megatron.training.parallel import ParallelConfig

    model = GPTConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=32, bf16=True)
    return TrainConfig(
        data_prefix=data["prefix"], model=model, parallel=ParallelConfig(cpu=True), micro_batch_size=2,
        global_batch_size=4, train_iters=K, lr_warmup_iters=1, log_interval=100, seed=5,
        use_distributed_optimizer=True, **overrides,
    )  # fmt: skip


def _adam(optimizer) -> list[dict[str, torch.Tensor]]:
    """torch Adam's state of every main parameter, in parameter order."""
    from mates_megatron.runtime.optimizers import megatron_optimizers

    return [
        o.optimizer.state[p]
        for o in megatron_optimizers(optimizer)
        for g in o.optimizer.param_groups
        for p in g["params"]
    ]


def _load_as_megatron_lm(data, root):
    """Train K steps and save; then, in a fresh run, the load sequence of Megatron-LM's load_checkpoint."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from mates_megatron.integrations.megatron_lm.cpu import _distributed_optimizer_resumes_torch_adam
    from mates_megatron.runtime.optimizers import megatron_optimizers
    from mates_megatron.training import checkpoint as ckpt
    from mates_megatron.training.loop import Trainer

    trained = Trainer(_config(data, save=root, save_interval=K))
    trained.train()
    saved = [{k: v.clone() for k, v in st.items()} for st in _adam(trained.optimizer)]
    parallel_state.destroy_model_parallel()
    fresh = Trainer(_config(data))
    dist_dir = f"{root}/iter_{K:07d}/{ckpt.DIST_DIR}"
    metadata = ckpt._content_metadata(True)

    def state_to_load_into() -> dict:
        return ckpt._sharded_state_dict(
            fresh.model_chunks, fresh.optimizer, metadata=metadata, is_loading=True
        )

    out = {}
    try:
        state_to_load_into()
    except AssertionError:
        out["unpatched"] = "asserted"
    _distributed_optimizer_resumes_torch_adam()
    loaded = dist_checkpointing.load(state_to_load_into(), dist_dir)["optimizer"]
    [inner] = megatron_optimizers(fresh.optimizer)
    DistributedOptimizer.load_state_dict.__wrapped__(inner, loaded)  # megatron-core's own load
    out["steps_unpatched_load"] = {float(st["step"]) for st in _adam(fresh.optimizer)}
    fresh.optimizer.load_state_dict(loaded)
    adam = _adam(fresh.optimizer)
    out["steps"] = {float(st["step"]) for st in adam}
    out["distinct_step_tensors"] = len({id(st["step"]) for st in adam}) == len(adam)
    out["moments_equal"] = len(adam) == len(saved) and all(
        torch.equal(a[k], s[k]) for a, s in zip(adam, saved, strict=True) for k in ("exp_avg", "exp_avg_sq")
    )
    return out


def test_cpu_launcher_resumes_the_distributed_optimizer_with_torch_adam(small_embedded, tmp_path):
    for out in run_on_ranks(_load_as_megatron_lm, 2, small_embedded, str(tmp_path)):
        assert out["unpatched"] == "asserted"  # state_dict() on a fresh optimizer: assert len(steps) == 1
        assert out["steps_unpatched_load"] == {0.0}
        assert out["steps"] == {float(K)} and out["distinct_step_tensors"]
        assert out["moments_equal"]
