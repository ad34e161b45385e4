"""configio: one path from YAML and flags to typed configs (coercion, validation, unknown keys, flags)."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from mates_megatron import configio, pretrain
from mates_megatron import flags as cli_flags


@dataclass
class Inner:
    rate: float = 0.1
    """A rate in (0, 1]."""
    sizes: tuple[int, ...] = (1, 2)
    """Some sizes."""

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"Inner.rate={self.rate} must be in (0, 1]")


@dataclass
class Outer:
    count: int = 3
    """How many."""
    name: str | None = None
    """A name."""
    flag: bool = False
    """On or off."""
    options: dict[str, Any] = field(default_factory=dict)
    """Free-form options."""
    inner: Inner = field(default_factory=Inner)
    """The inner section."""
    maybe: Inner | None = None
    """An optional section."""


def test_build_coerces_what_yaml_and_argv_give_as_strings():
    out = configio.build(Outer, {"count": "5", "inner": {"rate": "1e-3", "sizes": ["4", 5]}}, where="t")
    assert out == Outer(count=5, inner=Inner(rate=0.001, sizes=(4, 5)))
    assert type(out.inner.rate) is float and type(out.count) is int


def test_dict_fields_pass_through_and_optional_sections_build():
    out = configio.build(Outer, {"options": {"a": [1, {"b": None}]}, "maybe": {"rate": 0.5}}, where="t")
    assert out.options == {"a": [1, {"b": None}]} and out.maybe == Inner(rate=0.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cont": 1}, "t: unknown field 'cont'; Outer has: count, name, flag, options, inner, maybe"),
        ({"inner": {"size": [1]}}, "t: unknown field 'inner.size'; Inner has: rate, sizes"),
        ({"maybe": {"rat": 1}}, "t: unknown field 'maybe.rat'"),
        (
            {"count": 1.5},
            "t: count=1.5: Input should be a valid integer, got a number with a fractional part",
        ),
        ({"count": "ten"}, "t: count='ten': Input should be a valid integer"),
        ({"name": 5}, "t: name=5: Input should be a valid string"),
        ({"inner": {"rate": 2}}, "t: inner.rate=2: Inner.rate=2.0 must be in (0, 1]"),
        ({"inner": {"sizes": [1, "x"]}}, "t: inner.sizes.1='x': Input should be a valid integer"),
    ],
)
def test_errors_name_where_the_field_the_value_and_the_reason(data, message):
    with pytest.raises(ValueError) as e:
        configio.build(Outer, data, where="t")
    assert str(e.value).startswith(message), str(e.value)


def test_errors_name_the_source_of_the_value():
    with pytest.raises(ValueError, match=r"inner\.rate=2 \(--x-inner-rate\): Inner\.rate"):
        configio.build(Outer, {"inner": {"rate": 2}}, where="t", sources={"inner.rate": "--x-inner-rate"})


def test_flags_from_dataclass_fields_round_trip_through_build():
    flags = cli_flags.dataclass_flags(Outer, "--x-", exclude=("maybe",))
    assert [(f.flag, f.path, f.kind, f.nargs) for f in flags] == [
        ("--x-count", "count", int, None),
        ("--x-name", "name", str, None),
        ("--x-flag", "flag", bool, None),
        ("--x-options", "options", dict, None),
        ("--x-inner-rate", "inner.rate", float, None),
        ("--x-inner-sizes", "inner.sizes", int, "+"),
    ]
    assert flags[0].doc == "How many." and flags[0].default == 3
    p = argparse.ArgumentParser()
    cli_flags.add_flags(p, flags)
    args = p.parse_args(["--x-count", "7", "--x-flag", "--x-inner-sizes", "3", "4", "--x-options", "{k: 1}"])
    over = cli_flags.overrides_from_args(args, flags)
    assert over == {"count": "7", "flag": True, "inner": {"sizes": ["3", "4"]}, "options": {"k": 1}}
    assert configio.build(Outer, over, where="flags") == Outer(
        count=7, flag=True, options={"k": 1}, inner=Inner(sizes=(3, 4))
    )
    assert cli_flags.overrides_from_args(p.parse_args([]), flags) == {}  # left-out flags are absent
    assert "How many. [default: 3]" in p.format_help()


def test_named_flags_give_megatron_spellings_to_nested_fields():
    (f,) = cli_flags.named_flags(Outer, {"--rate": "inner.rate"})
    assert (f.flag, f.path, f.kind, f.doc) == ("--rate", "inner.rate", float, "A rate in (0, 1].")


def test_merge_lays_overrides_over_nested_sections():
    base = {"a": 1, "s": {"x": 1, "y": 2}}
    assert configio.merge(base, {"s": {"y": 3}, "b": 2}) == {"a": 1, "b": 2, "s": {"x": 1, "y": 3}}
    assert base == {"a": 1, "s": {"x": 1, "y": 2}}


# -- the pretrain path --------------------------------------------------------------------------------------


def _run(tmp_path: Path, body: dict, *argv: str):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(body) if isinstance(body, dict) else body)
    args = pretrain.build_parser().parse_args(["--config", str(cfg), *argv])
    return pretrain.config_from_args(args)


def test_yaml_1e_minus_3_reaches_train_config_as_a_float(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as the string '1e-3'.
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}
    cfg = _run(tmp_path, "data_prefix: d\nlr: 1e-3\nmin_lr: 1e-5\n")
    assert cfg.lr == 0.001 and type(cfg.lr) is float and cfg.min_lr == 1e-5


def test_pretrain_flags_override_yaml_with_megatron_spellings(tmp_path):
    from mates_megatron.config import SelectionConfig

    cfg = _run(
        tmp_path,
        {"data_prefix": "d", "model": {"num_layers": 2}, "selection": {"select_every": 4}},
        "--num-layers", "6", "--hidden-size", "64", "--lr", "3e-4", "--cpu", "--mates-selection-ratio", "0.5",
        "--tensorboard-dir", "tb",
    )  # fmt: skip
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.lr, cfg.parallel.cpu) == (6, 64, 3e-4, True)
    assert cfg.selection == SelectionConfig(select_every=4, selection_ratio=0.5)
    assert cfg.metrics.tensorboard_dir == "tb"


def test_every_train_config_field_has_a_pretrain_flag():
    from mates_megatron.config import selection_flags
    from mates_megatron.training.config import TrainConfig

    run = {f.path for f in cli_flags.dataclass_flags(TrainConfig, "--", exclude=("selection",))}
    assert set(pretrain.RUN_FLAGS.values()) == run  # a Megatron-LM spelling for each, and no stale one
    selection = {f.path for f in selection_flags("--mates-", path="selection.")}
    given = {a.dest for a in pretrain.build_parser()._actions}
    assert {f.dest for f in pretrain._flags()} <= given and len(pretrain._flags()) == len(run | selection)


def test_pretrain_and_megatron_lm_share_the_selection_flags():
    from mates_megatron.integrations.megatron_lm import add_mates_args

    def options(p: argparse.ArgumentParser) -> set[str]:
        return {s for a in p._actions for s in a.option_strings if s.startswith(("--mates-", "--no-mates-"))}

    megatron = add_mates_args(argparse.ArgumentParser())
    assert options(megatron) - {"--mates-config", "--mates-reference"} == options(pretrain.build_parser())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"data_prefix": "d", "lr_rate": 1}, "unknown field 'lr_rate'"),
        ({"data_prefix": "d", "model": {"layers": 1}}, "unknown field 'model.layers'; GPTConfig has: num_layers"),
        ({"data_prefix": "d", "train_iters": 1.5}, "train_iters=1.5: Input should be a valid integer"),
        ({"data_prefix": "d", "model": {"num_layers": 2.5}}, "model.num_layers=2.5: Input should be a valid"),
        ({"data_prefix": "d", "eval_interval": 0}, "eval_interval=0"),
        ({"data_prefix": "d", "log_interval": 0}, "log_interval=0"),
        ({"data_prefix": "d", "global_batch_size": 0}, "global_batch_size=0"),
        ({"data_prefix": "d", "model": {"num_attention_heads": 0}}, "GPTConfig.num_attention_heads=0 must be >= 1"),
        ({"data_prefix": "d", "model": {"make_vocab_size_divisible_by": 0}}, "make_vocab_size_divisible_by=0"),
        ({"data_prefix": "d", "model": {"hidden_dropout": 1.0}}, "GPTConfig.hidden_dropout=1.0 must be in [0, 1)"),
        ({"data_prefix": "d", "parallel": {"tensor_model_parallel_size": 0}}, "tensor_model_parallel_size"),
        ({"data_prefix": "d", "metrics": {"wandb_exp_name": "r"}}, "set wandb_project"),
        ({"lr": 0.1}, "data_prefix is required"),
    ],
)  # fmt: skip
def test_pretrain_config_errors_name_the_file_and_field(tmp_path, body, message):
    with pytest.raises(ValueError) as e:
        _run(tmp_path, body)
    assert str(tmp_path / "run.yaml") in str(e.value) and message in str(e.value), str(e.value)


def test_a_bad_flag_value_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"model\.num_layers='x' \(--num-layers\)"):
        _run(tmp_path, {"data_prefix": "d"}, "--num-layers", "x")


# -- warnings -----------------------------------------------------------------------------------------------


def test_only_megatron_core_notices_are_silenced():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pretrain.silence_megatron_core_notices()
        shown = [
            # Exactly megatron-core's texts (megatron/core/optimizer/__init__.py, models/gpt/gpt_layer_specs.py,
            # tensor_parallel/layers.py, transformer/transformer_config.py): silenced.
            ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning),
            ("Apex is not installed. Falling back to Torch Norm", UserWarning),
            (
                "When using async grad allreduce it is recommended to set the environment variable "
                "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup",
                UserWarning,
            ),
            ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning),
            # Unrelated warnings that contain 'te', 'TE' or 'apex' in other words: still shown.
            ("this argument is deprecated", UserWarning),
            ("the saved state is stale", DeprecationWarning),
            ("TE kernels were compiled for another GPU", UserWarning),
        ]
        for message, category in shown:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "this argument is deprecated",
        "the saved state is stale",
        "TE kernels were compiled for another GPU",
    ]
