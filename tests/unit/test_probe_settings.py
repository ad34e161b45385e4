"""One refusal list for every host (probe/settings.py): each setting that breaks a probe on the live model is
refused at start-up by Megatron-LM (its arguments), Megatron-Bridge (MatesCallback.on_train_start, its
ConfigContainer) and the project's loop (build_trainer, the megatron-core configs it builds), each message naming
the setting and the fix in that host's own spelling.

Megatron-LM's ``megatron.training`` is not installed here: its arguments are an argparse parser with the flags,
attribute names and types of core_v0.16.1's and core_v0.19.0's ``megatron.training.arguments`` (checked against
both parsers when this was written). Bridge 0.3.1's ConfigContainer imports transformer-engine (CUDA only): its
``model``/``ddp``/``optimizer`` sections are megatron-core's own TransformerConfig, DistributedDataParallelConfig
and OptimizerConfig (Bridge's classes subclass them), its ``dist``/``rng``/``comm_overlap`` sections namespaces
with the field names of the installed Bridge source (``test_bridge_field_names_are_the_installed_bridges``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig

from mates_megatron.config import SelectionConfig
from mates_megatron.integrations import megatron_bridge as mb
from mates_megatron.integrations import megatron_lm as mlm
from mates_megatron.probe import settings
from mates_megatron.training.build import check_loop_probe_settings
from tests.unit.test_megatron_bridge_callback import bcb, bridge_state

MATES = SelectionConfig(selector="gumbel", scorer="mates", select_every=50, warmup_steps=50)

# -- Megatron-LM ----------------------------------------------------------------------------------------------

_MLM_SWITCHES = (
    "--calculate-per-token-loss", "--fp16", "--overlap-grad-reduce", "--overlap-param-gather",
    "--enable-cuda-graph", "--external-cuda-graph", "--te-rng-tracker", "--use-precision-aware-optimizer",
    "--use-megatron-fsdp", "--use-torch-fsdp2", "--optimizer-cpu-offload", "--tp-comm-overlap",
    "--use-distributed-optimizer",
)  # fmt: skip


def megatron_lm_args(*argv: str, vpp: int | None = None) -> argparse.Namespace:
    """Megatron-LM's arguments after ``validate_args``; ``vpp``: the virtual_pipeline_model_parallel_size it
    derives from --num-virtual-stages-per-pipeline-rank (or the layout flags), which the schedule reads."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--train-iters", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=8)
    for flag in _MLM_SWITCHES:
        p.add_argument(flag, action="store_true")
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None)
    p.add_argument("--cuda-graph-impl", default="none", choices=["none", "local", "transformer_engine"])
    p.add_argument("--fp8-format", dest="fp8", default=None, choices=["e4m3", "hybrid"])
    p.add_argument("--fp4-format", dest="fp4", default=None, choices=["e2m1"])
    args = mlm.add_mates_args(p).parse_args(list(argv))
    args.virtual_pipeline_model_parallel_size = vpp
    return args


def _mates_argv(reference: Path) -> list[str]:
    reference.write_text('{"context": "a b", "target": " c"}\n')
    return ["--mates", "--mates-selector", "gumbel", "--mates-scorer", "mates", "--mates-select-every", "50",
            "--mates-warmup-steps", "50", "--mates-reference", str(reference),
            "--train-iters", "200"]  # fmt: skip


# -- Megatron-Bridge ------------------------------------------------------------------------------------------


def bridge_config(tmp, *, model=None, ddp=None, optimizer=None, **sections) -> SimpleNamespace:
    """Bridge's GlobalState with megatron-core's real config objects as model/ddp/optimizer."""
    gs = bridge_state(tmp)
    gs.cfg.model = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, **(model or {}))
    gs.cfg.model.seq_length = 64  # GPTModelProvider's field
    # Bridge's DDP and optimizer configs run megatron-core's __post_init__ only in finalize() (at setup; the
    # optimizer's asks for TransformerEngine): the fields are set on them as a recipe sets them.
    gs.cfg.ddp, gs.cfg.optimizer = DistributedDataParallelConfig(), OptimizerConfig()
    for section, fields in (("ddp", ddp), ("optimizer", optimizer)):
        for k, v in (fields or {}).items():
            setattr(getattr(gs.cfg, section), k, v)
    for name, fields in sections.items():
        setattr(gs.cfg, name, SimpleNamespace(**fields))
    return gs


def bridge_refusal(gs, selection: SelectionConfig = MATES) -> str:
    """The message MatesCallback.on_train_start refuses Bridge's state with."""
    cb = mb.MatesCallback(selection)
    cb.provide(None)
    with pytest.raises(ValueError) as e:
        bcb.normalize_callbacks([cb]).fire("on_train_start", bcb.CallbackContext(state=gs, model=[]))
    return str(e.value)


needs_bridge = pytest.mark.skipif(bcb is None, reason="megatron.bridge is not installed")


# -- one case per setting -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    name: str
    """The Refusal.name."""
    mlm: list[str] | None
    """Megatron-LM argv that sets it (None: Megatron-LM has no flag for it)."""
    mlm_says: str
    """The setting as the Megatron-LM message names it, then its fix."""
    bridge: dict
    """bridge_config keyword arguments that set it."""
    bridge_says: str
    """The setting as the Bridge message names it, then its fix."""
    vpp: int | None = None
    core: dict | None = None
    """bridge_config keyword arguments that set it in megatron-core's configs (default: ``bridge``)."""


CASES = [
    Case("virtual_pipeline_model_parallel_size", ["--num-virtual-stages-per-pipeline-rank", "2"],
         "virtual_pipeline_model_parallel_size 2 (from --num-layers-per-virtual-pipeline-stage, "
         "--num-virtual-stages-per-pipeline-rank or --pipeline-model-parallel-layout) | drop those flags",
         {"model": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
                    "pipeline_dtype": torch.float32}},
         "model.virtual_pipeline_model_parallel_size=2 | set model.virtual_pipeline_model_parallel_size=None",
         vpp=2),
    Case("calculate_per_token_loss", ["--calculate-per-token-loss"],
         "--calculate-per-token-loss | drop --calculate-per-token-loss",
         {"model": {"calculate_per_token_loss": True}},
         "model.calculate_per_token_loss=True | set model.calculate_per_token_loss=False"),
    Case("fp16", ["--fp16"], "--fp16 | drop --fp16 (train in bf16)",
         {"model": {"fp16": True}}, "model.fp16=True | set model.fp16=False (train in bf16)"),
    Case("num_microbatches_with_partial_activation_checkpoints", None, "",
         {"model": {"num_microbatches_with_partial_activation_checkpoints": 2}},
         "model.num_microbatches_with_partial_activation_checkpoints=2 | "
         "set model.num_microbatches_with_partial_activation_checkpoints=None"),
    Case("context_parallel_size", ["--context-parallel-size", "2"],
         "--context-parallel-size 2 | use --context-parallel-size 1",
         {"model": {"context_parallel_size": 2}},
         "model.context_parallel_size=2 | set model.context_parallel_size=1"),
    Case("cuda_graph_impl", ["--cuda-graph-impl", "local"],
         "--cuda-graph-impl local | use --cuda-graph-impl none (and neither --enable-cuda-graph nor "
         "--external-cuda-graph)",
         {"model": {"cuda_graph_impl": "transformer_engine"}},
         "model.cuda_graph_impl='transformer_engine' | set model.cuda_graph_impl='none'"),
    Case("enable_cuda_graph", ["--enable-cuda-graph"], "--enable-cuda-graph | drop --enable-cuda-graph",
         {"model": {"enable_cuda_graph": True}},
         "model.enable_cuda_graph=True | set model.enable_cuda_graph=False"),
    Case("external_cuda_graph", ["--external-cuda-graph"], "--external-cuda-graph | drop --external-cuda-graph",
         {"model": {"external_cuda_graph": True}},
         "model.external_cuda_graph=True | set model.external_cuda_graph=False"),
    Case("te_rng_tracker", ["--te-rng-tracker"], "--te-rng-tracker | drop --te-rng-tracker",
         {"rng": {"te_rng_tracker": True}},
         "rng.te_rng_tracker=True | set rng.te_rng_tracker=False and model.use_te_rng_tracker=False",
         core={"model": {"use_te_rng_tracker": True}}),
    Case("fp8", ["--fp8-format", "hybrid"], "--fp8-format hybrid | drop --fp8-format (train in bf16)",
         {"model": {"fp8": "hybrid"}}, "model.fp8='hybrid' | set model.fp8=None (train in bf16)"),
    Case("fp4", ["--fp4-format", "e2m1"], "--fp4-format e2m1 | drop --fp4-format (train in bf16)",
         {"model": {"fp4": "e2m1"}}, "model.fp4='e2m1' | set model.fp4=None (train in bf16)"),
    Case("use_precision_aware_optimizer", ["--use-precision-aware-optimizer"],
         "--use-precision-aware-optimizer | drop --use-precision-aware-optimizer",
         {"optimizer": {"use_precision_aware_optimizer": True, "use_distributed_optimizer": True}},
         "optimizer.use_precision_aware_optimizer=True | set optimizer.use_precision_aware_optimizer=False"),
    Case("use_megatron_fsdp", ["--use-megatron-fsdp"],
         "--use-megatron-fsdp | drop --use-megatron-fsdp (use the distributed optimizer)",
         {"ddp": {"use_megatron_fsdp": True}},
         "ddp.use_megatron_fsdp=True | set ddp.use_megatron_fsdp=False and dist.use_megatron_fsdp=False "
         "(use the distributed optimizer)"),
    Case("use_torch_fsdp2", ["--use-torch-fsdp2"],
         "--use-torch-fsdp2 | drop --use-torch-fsdp2 (use the distributed optimizer)",
         {"dist": {"use_torch_fsdp2": True}},
         "dist.use_torch_fsdp2=True | set dist.use_torch_fsdp2=False (use the distributed optimizer)"),
    Case("optimizer_cpu_offload", ["--optimizer-cpu-offload"],
         "--optimizer-cpu-offload | drop --optimizer-cpu-offload",
         {"optimizer": {"optimizer_cpu_offload": True}},
         "optimizer.optimizer_cpu_offload=True | set optimizer.optimizer_cpu_offload=False"),
    Case("tp_comm_overlap", ["--tp-comm-overlap"], "--tp-comm-overlap | drop --tp-comm-overlap",
         {"model": {"tp_comm_overlap": True}}, "model.tp_comm_overlap=True | set model.tp_comm_overlap=False"),
]  # fmt: skip


def _line(says: str, scorer: str, name: str) -> str:
    """The expected message line: '<setting> with <scorer>: <why>; <fix>' (why from the list)."""
    (why,) = [r.why for r in settings.PROBE_REFUSALS if r.name == name]
    setting, fix = says.split(" | ")
    return f"{setting} with {scorer}: {why}; {fix}"


def test_every_refusal_has_a_case():
    assert [c.name for c in CASES] == [r.name for r in settings.PROBE_REFUSALS]


@pytest.mark.parametrize("case", [c for c in CASES if c.mlm], ids=lambda c: c.name)
def test_megatron_lm_refuses_each_setting_in_its_own_flags(tmp_path, case):
    with pytest.raises(ValueError) as e:
        mlm.mates_config_from_args(
            megatron_lm_args(*_mates_argv(tmp_path / "r.jsonl"), *case.mlm, vpp=case.vpp)
        )
    assert str(e.value) == _line(case.mlm_says, "--mates-scorer mates", case.name)


@needs_bridge
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bridge_refuses_each_setting_in_its_config_fields(tmp_path, case):
    message = bridge_refusal(bridge_config(tmp_path, **case.bridge))
    assert (
        _line(case.bridge_says, "scorer 'mates'", case.name)
        in message.removeprefix("MatesCallback: ").splitlines()
    )


@pytest.mark.parametrize("case", [c for c in CASES if c.name != "use_torch_fsdp2"], ids=lambda c: c.name)
def test_the_loop_refuses_each_setting_of_the_megatron_core_configs_it_builds(tmp_path, case):
    cfg = bridge_config(tmp_path, **(case.core or case.bridge)).cfg
    with pytest.raises(ValueError) as e:
        check_loop_probe_settings(MATES, model=cfg.model, ddp=cfg.ddp, optimizer=cfg.optimizer)
    (r,) = [r for r in settings.PROBE_REFUSALS if r.name == case.name]
    section, field = r.core.split(".")
    value = getattr(getattr(cfg, section), field)
    instead = f" ({r.instead})" if r.instead else ""
    assert (
        f"{r.core}={value!r} in the configs mates_megatron.training builds with selection.scorer 'mates': "
        f"{r.why}; TrainConfig has no field for it: build {r.core}={r.accepted!r}{instead}"
    ) in str(e.value).splitlines()


def test_several_settings_are_refused_together_one_line_each(tmp_path):
    argv = [
        *_mates_argv(tmp_path / "r.jsonl"),
        "--fp16",
        "--tp-comm-overlap",
        "--fp8-format",
        "e4m3",
    ]
    with pytest.raises(ValueError) as e:
        mlm.mates_config_from_args(megatron_lm_args(*argv))
    assert [line.split(" with ")[0] for line in str(e.value).splitlines()] == [
        "--fp16", "--fp8-format e4m3", "--tp-comm-overlap"
    ]  # fmt: skip


# -- scorers that do not read the live model ------------------------------------------------------------------

CLASSIFIER = SelectionConfig(selector="gumbel", scorer="classifier")


def test_a_scorer_that_does_not_read_the_live_model_is_not_refused(tmp_path):
    every = [flag for c in CASES if c.mlm for flag in c.mlm]
    mates = _mates_argv(tmp_path / "r.jsonl")
    classifier = [*mates[: mates.index("--mates-scorer")], "--mates-scorer", "classifier",
                  *mates[mates.index("--mates-scorer") + 2:]]  # fmt: skip
    sel = mlm.mates_config_from_args(megatron_lm_args(*classifier, *every, vpp=2))
    assert sel.scorer == "classifier"
    with pytest.raises(ValueError) as e:  # the same flags with the scorer that probes: one line per flag
        mlm.mates_config_from_args(megatron_lm_args(*mates, *every, vpp=2))
    assert len(str(e.value).splitlines()) == len([c for c in CASES if c.mlm])


@needs_bridge
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bridge_does_not_refuse_them_for_a_scorer_that_does_not_read_the_live_model(tmp_path, case):
    gs = bridge_config(tmp_path, **case.bridge)
    cb = mb.MatesCallback(CLASSIFIER)  # no dataset provider: the check after the refusals fails
    with pytest.raises(ValueError, match="^MatesCallback: Bridge built no MATES train iterator"):
        cb.on_train_start(bcb.CallbackContext(state=gs, model=[]))


def test_the_loop_does_not_refuse_them_for_a_scorer_that_does_not_read_the_live_model(tmp_path):
    cfg = bridge_config(tmp_path, model={"tp_comm_overlap": True, "fp8": "hybrid"}).cfg
    check_loop_probe_settings(CLASSIFIER, model=cfg.model, ddp=cfg.ddp, optimizer=cfg.optimizer)
    with pytest.raises(ValueError):
        check_loop_probe_settings(MATES, model=cfg.model, ddp=cfg.ddp, optimizer=cfg.optimizer)


# -- Bridge: settings its other sections turn on --------------------------------------------------------------


@needs_bridge
def test_bridge_names_comm_overlap_and_mixed_precision_when_they_set_it(tmp_path):
    gs = bridge_config(tmp_path, model={"tp_comm_overlap": True, "fp8": "hybrid"},
                       comm_overlap={"tp_comm_overlap": True, "overlap_grad_reduce": True},
                       mixed_precision={"bf16": True, "fp8": "hybrid"})  # fmt: skip
    message = bridge_refusal(gs)
    assert message.startswith("MatesCallback: model.fp8='hybrid' with scorer 'mates': ")
    # Bridge's setup copies comm_overlap's and mixed_precision's fields onto model: the fix names both.
    assert "; set model.tp_comm_overlap=False and comm_overlap.tp_comm_overlap=False" in message
    assert "; set model.fp8=None and mixed_precision.fp8=None (train in bf16)\n" in message


@needs_bridge
def test_bridge_reports_probe_refusals_beside_its_other_problems(tmp_path):
    gs = bridge_config(tmp_path, model={"tp_comm_overlap": True})
    gs.cfg.train.rampup_batch_size = [2, 2, 8]
    message = bridge_refusal(gs)
    assert message.startswith("MatesCallback: train.rampup_batch_size: ")
    assert "\nmodel.tp_comm_overlap=True with scorer 'mates': " in message


def _bridge_class_fields(path: Path, cls: str) -> set[str]:
    tree = ast.parse(path.read_text())
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls]
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}


@needs_bridge
def test_bridge_field_names_are_the_installed_bridges():
    """The Bridge-only sections the callback reads, in the installed Bridge's source (not importable on CPU)."""
    root = Path(importlib.util.find_spec("megatron.bridge").submodule_search_locations[0]) / "training"
    assert {"use_megatron_fsdp", "use_torch_fsdp2"} <= _bridge_class_fields(
        root / "config.py", "DistributedInitConfig"
    )
    assert "te_rng_tracker" in _bridge_class_fields(root / "config.py", "RNGConfig")
    assert {"tp_comm_overlap", "overlap_grad_reduce", "overlap_param_gather"} <= _bridge_class_fields(
        root / "comm_overlap.py", "CommOverlapConfig"
    )
    assert {"fp16", "fp8", "fp4"} <= _bridge_class_fields(root / "mixed_precision.py", "MixedPrecisionConfig")
    config = _bridge_class_fields(root / "config.py", "ConfigContainer")
    assert {"model", "ddp", "optimizer", "dist", "rng", "comm_overlap", "mixed_precision"} <= config


# -- one list for every host ----------------------------------------------------------------------------------


# The list replaced by one entry no host refuses today: every host must refuse it, and none of the others.
TEST_ENTRY = settings.Refusal("use_distributed_optimizer", "ddp.use_distributed_optimizer", "a test entry")


def _with_only_a_test_entry(monkeypatch):
    monkeypatch.setattr(settings, "PROBE_REFUSALS", (TEST_ENTRY,))


def test_an_entry_added_or_dropped_in_the_list_changes_megatron_lm(tmp_path, monkeypatch):
    _with_only_a_test_entry(monkeypatch)
    mates = _mates_argv(tmp_path / "r.jsonl")
    with pytest.raises(ValueError) as e:
        mlm.mates_config_from_args(megatron_lm_args(*mates, "--use-distributed-optimizer"))
    assert str(e.value) == (
        "--use-distributed-optimizer with --mates-scorer mates: a test entry; drop --use-distributed-optimizer"
    )
    assert mlm.mates_config_from_args(megatron_lm_args(*mates, "--overlap-grad-reduce")).scorer == "mates"


@needs_bridge
def test_an_entry_added_or_dropped_in_the_list_changes_bridge(tmp_path, monkeypatch):
    _with_only_a_test_entry(monkeypatch)
    message = bridge_refusal(bridge_config(tmp_path, ddp={"use_distributed_optimizer": True}))
    assert message == (
        "MatesCallback: ddp.use_distributed_optimizer=True with scorer 'mates': a test entry; "
        "set ddp.use_distributed_optimizer=False"
    )
    gs = bridge_config(tmp_path, ddp={"overlap_grad_reduce": True})
    with pytest.raises(ValueError, match="^MatesCallback: Bridge built no MATES train iterator"):
        mb.MatesCallback(MATES).on_train_start(bcb.CallbackContext(state=gs, model=[]))


def _loop_start(data: dict) -> str | None:
    """One rank: build_trainer with the test entry in the list and TrainConfig.use_distributed_optimizer."""
    from mates_megatron.configio import build
    from mates_megatron.training.build import build_trainer
    from mates_megatron.training.config import TrainConfig

    settings.PROBE_REFUSALS = (TEST_ENTRY,)  # this spawned process only
    cfg = build(TrainConfig, {
        "data_prefix": data["prefix"], "reference": data["reference"], "model": {"num_layers": 2,
        "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64}, "parallel": {"cpu": True},
        "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 6, "lr_warmup_iters": 1,
        "use_distributed_optimizer": True,
        "selection": {"selector": "gumbel", "scorer": "mates", "select_every": 3, "warmup_steps": 3},
    }, where="test")  # fmt: skip
    try:
        build_trainer(cfg)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.distributed
def test_an_entry_added_in_the_list_is_refused_by_the_loop_at_start_up(small_embedded):
    from mates_megatron.compat.spawn import run_on_ranks

    (message,) = run_on_ranks(_loop_start, 1, small_embedded)
    assert message == (
        "TrainConfig.use_distributed_optimizer=True with selection.scorer 'mates': a test entry; "
        "set TrainConfig.use_distributed_optimizer=False"
    )


# -- supported, not refused -----------------------------------------------------------------------------------


def test_overlapped_reduce_and_gather_are_run_not_refused(tmp_path):
    """Bridge's recipes turn both on by default; probes honour them (tests/distributed/test_probe.py)."""
    argv = [*_mates_argv(tmp_path / "r.jsonl"), "--overlap-grad-reduce", "--overlap-param-gather"]
    assert (
        mlm.mates_config_from_args(megatron_lm_args(*argv, "--use-distributed-optimizer")).scorer == "mates"
    )
    cfg = bridge_config(tmp_path, ddp={"overlap_grad_reduce": True, "overlap_param_gather": True}).cfg
    check_loop_probe_settings(MATES, model=cfg.model, ddp=cfg.ddp, optimizer=cfg.optimizer)
    assert "overlap_grad_reduce" not in {r.name for r in settings.PROBE_REFUSALS}
