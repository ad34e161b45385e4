"""Work outside a training step with Megatron's rerun state machine switched off, as Megatron-LM's evaluate() does.

Megatron-LM (and Bridge) run every training step inside the rerun state machine's loop
(``while rerun_state_machine.should_run_forward_backward(...)``), by default in ``validate_results`` mode, and
with ``--check-for-nan-in-loss-and-grad`` (on by default) DDP's gradient sync calls ``validate_result`` on each
bucket's gradient norm. Outside that loop ``validate_result`` asserts ("should not be called outside of the
forward-backward pass"). A probe's backward passes (a gradient sync under the distributed optimizer; the mirrored
estimator's reference step) are such work: Megatron's own evaluate() sets the machine to ``DISABLED`` for its
passes and gives the mode back after, and so do probes. In ``DISABLED`` mode a NaN is still refused (a
RuntimeError), and the probe's restore-on-raise leaves the run as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def outside_training_step() -> Iterator[None]:
    """The rerun state machine disabled for the block, its mode restored after (also when the block raises)."""
    from megatron.core import rerun_state_machine as rsm

    machine = rsm._GLOBAL_RERUN_STATE_MACHINE  # None: no host made one (its getter would make one, and warn)
    if machine is None:
        yield
        return
    # The attribute, not set_mode(): set_mode only adds a warning line, twice a round in the training log.
    mode = machine.mode
    machine.mode = rsm.RerunMode.DISABLED
    try:
        yield
    finally:
        machine.mode = mode
