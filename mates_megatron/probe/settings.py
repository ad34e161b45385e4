"""Training settings under which a probe on the live model is wrong or fails: one refusal list for every host.

A scorer that reads the live model (``"live_model" in SCORERS.get(scorer).needs``) probes it between two
training steps: a snapshot, an optimizer step on one sample with the data-parallel gradient sync switched off,
reference forwards, and a bit-exact restore (``probe.snapshot``, ``probe.estimators``). ``PROBE_REFUSALS``
lists the settings of a training job that break one of those steps, each with why. Every host maps its own
configuration onto the list at start-up and calls ``check_probe_settings`` (or ``probe_setting_problems``),
with a ``Spelling`` so that the error names the setting and its fix as the user wrote them:

- Megatron-LM (``integrations.megatron_lm.args``): its arguments, ``--tp-comm-overlap``;
- Megatron-Bridge (``integrations.megatron_bridge.callback``): its ConfigContainer, ``model.tp_comm_overlap``;
- the project's loop (``training.build``): the megatron-core configs it builds from TrainConfig.

The list is data: when the snapshot learns to restore a setting bit-exactly, its entry is deleted here and no
host changes. A host passes every setting it has; the names it lacks are settings it cannot express. So left
the overlapped gradient reduce and parameter gather (``overlap_grad_reduce``, ``overlap_param_gather``, on in
Bridge's recipes): probes switch off the reduce the backward hooks start, and the snapshot restores the
deferred-gather flags (tests/distributed/test_probe.py, the overlapped-communication test).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mates_megatron.config import SelectionConfig


@dataclass(frozen=True)
class Refusal:
    """One setting a probe on the live model cannot run under."""

    name: str
    """Megatron-LM's argument attribute (``args.<name>``): the key every host maps its settings onto."""
    core: str | None
    """Where megatron-core's configs keep it, as Bridge's ConfigContainer names them: ``model.<field>`` (the
    TransformerConfig), ``ddp.<field>`` (DistributedDataParallelConfig), ``optimizer.<field>``
    (OptimizerConfig); None when no megatron-core config has it."""
    why: str
    """What goes wrong in a probe under the setting."""
    accepted: Any = False
    """The value probes run under (what the fix sets). None, the setting left unset, is always accepted."""
    instead: str = ""
    """What to use instead, where there is more to say than switching it off."""

    def refuses(self, value: Any) -> bool:
        return value is not None and value != self.accepted


_CUDA_GRAPHS = (
    "the RNG tracker then keeps torch.Generator states (megatron-core's use_cudagraphable_rng), which the probe "
    "snapshot cannot copy (it calls .clone() on every tracker state), and the graphs replay the shapes captured "
    "at the training micro-batch while probes run single samples and reference batches"
)
_FSDP = (
    "parameters, gradients and optimizer state are sharded over the data-parallel ranks and gathered and "
    "reduce-scattered by FSDP's own hooks: switching off finish_grad_sync does not keep a replica's probe "
    "gradient to itself, and the snapshot (made for DDP's contiguous buffers) has not been shown to restore "
    "FSDP's shards bit-exactly"
)
_TE_STATE = "its bit-exact restore has not been verified"

PROBE_REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "virtual_pipeline_model_parallel_size",
        "model.virtual_pipeline_model_parallel_size",
        "the probe step runs the non-interleaved schedule with one data iterator, and the interleaved one "
        "needs one per model chunk",
        accepted=None,
    ),
    Refusal(
        "calculate_per_token_loss",
        "model.calculate_per_token_loss",
        "finalize_model_grads all-reduces the token count over the data-parallel group while each replica "
        "probes its own sample (a wrong scale, and a hang when the probes do not divide evenly)",
    ),
    Refusal(
        "fp16",
        "model.fp16",
        "every probe step would update the dynamic loss scaler, which the snapshot does not restore",
        instead="train in bf16",
    ),
    Refusal(
        "num_microbatches_with_partial_activation_checkpoints",
        "model.num_microbatches_with_partial_activation_checkpoints",
        "the schedule then calls the forward step with a third argument that the probe's forward step does "
        "not take",
        accepted=None,
    ),
    Refusal(
        "context_parallel_size",
        "model.context_parallel_size",
        "probe batches are not split over context-parallel ranks (get_batch_on_this_cp_rank)",
        accepted=1,
    ),
    Refusal("cuda_graph_impl", "model.cuda_graph_impl", _CUDA_GRAPHS, accepted="none"),
    # The deprecated spellings of cuda_graph_impl 'local' and 'transformer_engine' (both tags still take them).
    Refusal("enable_cuda_graph", "model.enable_cuda_graph", _CUDA_GRAPHS),
    Refusal("external_cuda_graph", "model.external_cuda_graph", _CUDA_GRAPHS),
    Refusal(
        "te_rng_tracker",
        "model.use_te_rng_tracker",
        "TransformerEngine's RNG tracker keeps torch.Generator states wherever torch has graph-safe generators "
        "(graph_safe_rng_available()), and the probe snapshot calls .clone() on every tracker state "
        "(Megatron-LM turns it on itself for CUDA graphs with TransformerEngine)",
    ),
    Refusal(
        "fp8",
        "model.fp8",
        "TransformerEngine's fp8 state is outside the probe snapshot: the delayed-scaling recipe's amax history "
        "and scales (Megatron-LM's default recipe) advance on every probe forward and backward, and no "
        f"recipe's {_TE_STATE}",
        accepted=None,
        instead="train in bf16",
    ),
    Refusal(
        "fp4",
        "model.fp4",
        f"TransformerEngine's NVFP4 recipe state is outside the probe snapshot and {_TE_STATE}",
        accepted=None,
        instead="train in bf16",
    ),
    Refusal(
        "use_precision_aware_optimizer",
        "optimizer.use_precision_aware_optimizer",
        "the main weights then live inside TransformerEngine's FusedAdam (master_param, as int16 remainders of "
        "the bf16 weights with store_param_remainders), not in the distributed optimizer's fp32 shards that the "
        f"snapshot and the estimators read, and {_TE_STATE}",
    ),
    Refusal("use_megatron_fsdp", "ddp.use_megatron_fsdp", _FSDP, instead="use the distributed optimizer"),
    Refusal("use_torch_fsdp2", None, _FSDP, instead="use the distributed optimizer"),
    Refusal(
        "optimizer_cpu_offload",
        "optimizer.optimizer_cpu_offload",
        "HybridDeviceOptimizer steps the offloaded parameters from fp32 copies on the CPU and copies them back "
        "to the GPU, and the probe snapshot does not capture those copies",
    ),
    Refusal(
        "tp_comm_overlap",
        "model.tp_comm_overlap",
        "TransformerEngine's userbuffers are allocated once for seq_length x micro_batch_size tokens "
        "(initialize_ub), while probes run single samples and reference batches of their own size",
    ),
)


@dataclass(frozen=True)
class Spelling:
    """How one host writes its settings, so that an error reads in the user's own terms."""

    scorer: str
    """The scorer setting as the host writes it, e.g. ``--mates-scorer mates``."""
    setting: Callable[[Refusal, Any], str]
    """(entry, the host's value) -> the setting as written, e.g. ``--context-parallel-size 2``."""
    fix: Callable[[Refusal], str]
    """entry -> how to set ``entry.accepted`` in this host, e.g. ``use --context-parallel-size 1``."""


def reads_live_model(selection: SelectionConfig) -> bool:
    """Whether the selection's rounds probe the live model (a scored selection whose scorer needs it)."""
    from mates_megatron.scorers import SCORERS

    return selection.scored and "live_model" in SCORERS.get(selection.scorer).needs


def probe_setting_problems(
    selection: SelectionConfig, values: Mapping[str, Any], spelling: Spelling
) -> list[str]:
    """One message per refused setting (none when the selection does not probe the live model).

    ``values``: the host's settings by ``Refusal.name``; a name that is absent is one the host cannot express.
    """
    if not reads_live_model(selection):
        return []
    out = []
    for r in PROBE_REFUSALS:
        if r.name in values and r.refuses(value := values[r.name]):
            instead = f" ({r.instead})" if r.instead else ""
            setting = spelling.setting(r, value)
            out.append(f"{setting} with {spelling.scorer}: {r.why}; {spelling.fix(r)}{instead}")
    return out


def check_probe_settings(selection: SelectionConfig, values: Mapping[str, Any], spelling: Spelling) -> None:
    """Raise ValueError, a line per refused setting, when the host's settings break probes on the live model."""
    problems = probe_setting_problems(selection, values, spelling)
    if problems:
        raise ValueError("\n".join(problems))


def core_values(configs: Mapping[str, Any]) -> dict[str, Any]:
    """The list's settings read from megatron-core config objects: ``configs`` maps 'model' (TransformerConfig),
    'ddp' (DistributedDataParallelConfig) and 'optimizer' (OptimizerConfig) to the run's objects; a field an
    object does not have (an older megatron-core) is left out."""
    out = {}
    for r in PROBE_REFUSALS:
        if r.core is None:
            continue
        section, field = r.core.split(".")
        if hasattr(configs.get(section), field):
            out[r.name] = getattr(configs[section], field)
    return out
