"""Run Megatron-LM's own ``pretrain_gpt.py`` on CPU over gloo (the project's CPU mode, for tests and demos).

    torchrun --nproc-per-node 2 -m mates_megatron.integrations.megatron_lm.cpu \\
        "$MEGATRON_LM_DIR/pretrain_gpt.py" --distributed-backend gloo --transformer-impl local ... --mates ...

The shims live here, not in the patch: the patched tree stays the GPU code path, and nothing of it changes.
``compat.cpu.enable_cpu_mode`` redirects megatron-core (CUDA RNG tracker, CUDA device arguments, the CUDA
tensor-type check); on top of it Megatron-LM's training package needs, each because CUDA is absent:

- ``initialize_megatron`` asserts CUDA unless ``allow_no_cuda``: ``pretrain`` is given that;
- ``_initialize_distributed`` builds the model-parallel groups only when ``torch.cuda.device_count() > 0``:
  in CPU mode the CPU counts as the one device;
- ``get_device_arch_version`` reads the CUDA device's properties in ``validate_args``: 0 (no Blackwell
  features; ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is then required for TP > 1, as on Hopper);
- ``fused_kernels.load`` compiles CUDA kernels with nvcc: nothing to compile (pass ``--no-masked-softmax-
  fusion`` and the other ``--no-*-fusion`` flags so no fused kernel is asked for);
- ``get_model`` overlaps DDP set-up on a ``torch.cuda.Stream``: torch's CPU streams stand in;
- the memory report and the checkpoint's ``cuda_rng_state`` read CUDA: zero / an empty state (the CPU
  generator, which dropout uses here, is saved and restored as ``torch_rng_state``);
- dropout and the data-loader set-up draw from the one CPU generator: ``train()`` starts from the RNG state
  ``load_checkpoint`` left (``_train_from_the_loaded_rng_state``), so a resumed run is the one that went on;
- without apex or TransformerEngine the distributed optimizer's inner optimizer is torch Adam, and megatron-core
  resumes it wrongly twice: the state is read before anything is allocated, and the step is not restored
  (``_distributed_optimizer_resumes_torch_adam``).

Megatron-LM also needs, as on GPU: ``triton`` importable (its training package imports it; no kernel runs)
and its dataset helpers compiled (``make -C megatron/core/datasets``, which needs ``pybind11``).
"""

from __future__ import annotations

import functools
import inspect
import os
import runpy
import sys

import torch

from mates_megatron.compat.cpu import enable_cpu_mode


def enable_megatron_lm_cpu_mode() -> None:
    """CPU mode for megatron-core plus the Megatron-LM training package's CUDA assumptions (module doc)."""
    enable_cpu_mode()
    torch.cuda.device_count = lambda: 1
    torch.cuda.memory_stats = lambda *a, **k: {}
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *a, **k: None
    torch.cuda.Stream = torch.cpu.Stream
    torch.cuda.current_stream = torch.cpu.current_stream
    torch.cuda.stream = torch.cpu.stream

    import megatron.legacy.fused_kernels as fused_kernels
    import megatron.training.arguments as arguments
    import megatron.training.training as training
    import megatron.training.utils as utils

    arguments.get_device_arch_version = utils.get_device_arch_version = lambda: 0
    fused_kernels.load = lambda args: None
    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    _train_from_the_loaded_rng_state(training)
    _distributed_optimizer_resumes_torch_adam()


def _train_from_the_loaded_rng_state(training) -> None:
    """Start ``train()`` from the RNG state ``load_checkpoint`` left (shim for one generator doing two jobs).

    On GPU, dropout draws from the CUDA generator, which Megatron-LM's checkpoint restores and which nothing
    touches before ``train()``. In CPU mode dropout draws from torch's CPU generator, and between loading the
    checkpoint and training, the data-loader set-up draws from it too (each ``DataLoader`` iterator takes a
    base seed): a resumed run would then train on other dropout masks than the run that went on. Restoring
    the loaded state when ``train()`` starts gives CPU mode the GPU's semantics, in fresh and resumed runs
    alike.
    """
    loaded = {}
    load_checkpoint, train = training.load_checkpoint, training.train

    @functools.wraps(load_checkpoint)
    def load_then_keep_rng(*args, **kwargs):
        out = load_checkpoint(*args, **kwargs)
        loaded["torch"] = torch.get_rng_state()
        return out

    @functools.wraps(train)
    def train_from_loaded_rng(*args, **kwargs):
        if "torch" in loaded:
            torch.set_rng_state(loaded["torch"])
        return train(*args, **kwargs)

    training.load_checkpoint, training.train = load_then_keep_rng, train_from_loaded_rng


def _distributed_optimizer_resumes_torch_adam() -> None:
    """Resume ``--use-distributed-optimizer`` from ``torch_dist`` with torch Adam as its inner optimizer.

    Without apex/TE (CPU mode always) megatron-core's ``DistributedOptimizer`` (0.16.1, 0.19.0) wraps torch Adam,
    whose state holds a per-parameter "step"; with apex or TE the step lives in the param groups, and neither
    gap below exists. The project's own loop works around the same two (``training.checkpoint``).

    - ``sharded_state_dict(is_loading=True)`` calls ``state_dict()``, which reads the common step from the
      state and asserts there is exactly one (``assert len(steps) == 1``), on a freshly built optimizer whose
      state is still empty: every resume asserts. Zeros are allocated first; the load overwrites them.
    - ``load_state_dict`` sets the saved step (kept once, in the param groups) as one tensor shared by every
      parameter, then copies each parameter's tensors from the loaded buckets, "step" included; the buckets
      were saved without it, so the step comes back as the zero allocated above. Even when right, a shared
      tensor would advance once per parameter per step (torch Adam increments each parameter's step in
      place). Either way the bias correction after a resume is not the uninterrupted run's: after the load
      each parameter gets its own tensor holding the saved step.
    """
    from megatron.core.optimizer import distrib_optimizer

    from mates_megatron.runtime.optimizers import allocate_torch_adam_state

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    sharded_state_dict, load_state_dict = cls.sharded_state_dict, cls.load_state_dict
    signature = inspect.signature(sharded_state_dict)

    @functools.wraps(sharded_state_dict)
    def with_state_to_load_into(self, *args, **kwargs):
        is_loading = signature.bind(self, *args, **kwargs).arguments.get("is_loading", False)
        if is_loading:
            allocate_torch_adam_state(self)
        return sharded_state_dict(self, *args, **kwargs)

    @functools.wraps(load_state_dict)
    def with_the_saved_step(self, state_dict):
        steps = {g.get("step") for g in state_dict.get("optimizer", {}).get("param_groups", ())} - {None}
        load_state_dict(self, state_dict)
        if len(steps) == 1:  # megatron-core asserted this already; other layouts (FSDP) keep their own
            for state in self.optimizer.state.values():
                state["step"] = torch.tensor(float(*steps), dtype=torch.float32)

    cls.sharded_state_dict, cls.load_state_dict = with_state_to_load_into, with_the_saved_step


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        raise SystemExit(
            "usage: python -m mates_megatron.integrations.megatron_lm.cpu PATH/TO/pretrain_gpt.py [ARGS...] "
            "(the script of a Megatron-LM checkout with the MATES patch applied)"
        )
    script = os.path.abspath(argv[0])
    checkout = os.path.dirname(script)
    # This package has imported megatron.core already: it must be the checkout's (with megatron.training),
    # not an installed megatron-core wheel, as when Megatron-LM is run with its checkout on PYTHONPATH.
    import megatron

    if not any(
        os.path.realpath(p) == os.path.realpath(os.path.join(checkout, "megatron")) for p in megatron.__path__
    ):
        raise SystemExit(
            f"megatron is imported from {list(megatron.__path__)}, not from the checkout of {script}: run with "
            f"PYTHONPATH={checkout}"
        )
    enable_megatron_lm_cpu_mode()
    sys.argv = argv
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
