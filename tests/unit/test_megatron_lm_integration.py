"""Megatron-LM integration: --mates-* arguments -> SelectionConfig, the MATES train loader across round
boundaries, plugin state beside checkpoints, the Megatron-LM patch, the launch script and every config."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mates_megatron.config import SelectionConfig
from mates_megatron.influence.config import FinetuneConfig, InfluenceConfig, RelationalConfig, RidgeConfig
from mates_megatron.integrations import megatron_lm as mlm
from mates_megatron.integrations.megatron_lm.versions import PATCHES as SUPPORTED
from mates_megatron.integrations.megatron_lm.versions import check_megatron_core_version, patch_name
from mates_megatron.plugin import pool_num_samples
from mates_megatron.pool.base import PoolError
from mates_megatron.scorers.mates import MatesConfig

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "patches" / "megatron-lm-core_v0.16.1-mates.patch"
PATCHES = {tag: REPO / patch_name(tag) for tag in SUPPORTED.values()}
SCRIPT = REPO / "examples" / "megatron_lm" / "pretrain_gpt_mates.sh"


def parser(megatron: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False)
    if megatron:  # the Megatron-LM arguments that mates_config_from_args checks, with their spellings
        p.add_argument("--train-iters", type=int, default=None)
        p.add_argument("--train-samples", type=int, default=None)
        p.add_argument("--global-batch-size", type=int, default=8)
        p.add_argument("--rampup-batch-size", nargs=3, default=None)
        p.add_argument("--dataloader-type", default=None)
        p.add_argument("--overlap-grad-reduce", action="store_true")
        p.add_argument("--overlap-param-gather", action="store_true")
        p.add_argument("--tp-comm-overlap", action="store_true")
        p.add_argument("--non-persistent-save-interval", type=int, default=None)
    return mlm.add_mates_args(p)


def parse(*argv: str, megatron: bool = False) -> argparse.Namespace:
    return parser(megatron).parse_args(list(argv))


@pytest.fixture(autouse=True)
def _no_plugin_state():
    mlm.set_mates_state(None)
    yield
    mlm.set_mates_state(None)


# -- arguments --------------------------------------------------------------------------------------------

EVERY_FIELD = [
    "--mates",
    "--mates-pool", "webdataset",
    "--mates-pool-options", "{}",
    "--mates-shards", "/data/shards",
    "--mates-selector-options", "{}",
    "--mates-select-every", "100",
    "--mates-selection-ratio", "0.25",
    "--mates-selector", "gumbel",
    "--mates-temperature", "0.7",
    "--mates-scorer", "mates",
    "--mates-scorer-options", "{}",
    "--mates-imports", "json", "csv",
    "--mates-seed", "7",
    "--mates-run-name", "r1",
    "--mates-warmup-steps", "200",
    "--mates-probe-samples", "64",
    "--mates-estimator", "mirrored",
    "--mates-max-selection-cost", "0.5",
    "--mates-cost-machine", "cpu-2core",
    "--mates-probe-tokens", "all",
    "--mates-min-influence-spearman", "0.3",
    "--mates-influence-rounds", "3",
    "--mates-influence-model", "ridge",
    "--mates-influence-model-path", "/models/bert",
    "--mates-influence-max-length", "128",
    "--mates-influence-max-chunks", "3",
    "--mates-influence-predict-batch-size", "8",
    "--mates-influence-loader-workers", "2",
    "--mates-influence-seed", "3",
    "--no-mates-influence-warm-start",
    "--mates-influence-device", "cpu",
    "--mates-influence-pass-token-ids",
    "--no-mates-influence-bf16",
    "--mates-influence-timeout-s", "900",
    "--mates-influence-finetune-lr", "1e-4",
    "--mates-influence-finetune-head-lr", "2e-3",
    "--mates-influence-finetune-epochs", "4",
    "--mates-influence-finetune-batch-size", "8",
    "--mates-influence-finetune-val-fraction", "0.2",
    "--mates-influence-ridge-alphas", "0.5", "5",
    "--mates-influence-ridge-features", "token_embeddings",
    "--mates-influence-ridge-folds", "4",
    "--mates-influence-relational-rollout-length", "5",
    "--mates-influence-relational-steps", "50",
    "--mates-influence-relational-lr", "0.1",
    "--mates-influence-relational-folds", "3",
    "--mates-influence-relational-center-positions",
    "--mates-influence-relational-deconvolve", "0.9",
    "--mates-influence-relational-head-l2", "0.1",
    "--mates-influence-relational-early-stop",
    "--mates-influence-ranks", "0", "1",
    "--mates-probe-lead-steps", "50",
    "--mates-asynchronous",
]  # fmt: skip

EVERY_FIELD_CONFIG = SelectionConfig(
    pool="webdataset",
    pool_options={"shards": "/data/shards"},
    select_every=100,
    selection_ratio=0.25,
    selector="gumbel",
    selector_options={"temperature": 0.7},
    scorer="mates",
    imports=["json", "csv"],
    seed=7,
    run_name="r1",
    warmup_steps=200,
    max_selection_cost=0.5,
    cost_machine="cpu-2core",
    scorer_options=dataclasses.asdict(
        MatesConfig(
            probe_samples=64,
            estimator="mirrored",
            probe_tokens="all",
            min_influence_spearman=0.3,
            influence_rounds=3,
            influence=InfluenceConfig(
                model="ridge",
                model_path="/models/bert",
                max_length=128,
                max_chunks=3,
                predict_batch_size=8,
                loader_workers=2,
                seed=3,
                warm_start=False,
                device="cpu",
                pass_token_ids=True,
                bf16=False,
                timeout_s=900.0,
                finetune=FinetuneConfig(lr=1e-4, head_lr=2e-3, epochs=4, batch_size=8, val_fraction=0.2),
                ridge=RidgeConfig(alphas=(0.5, 5.0), features="token_embeddings", folds=4),
                relational=RelationalConfig(
                    rollout_length=5,
                    steps=50,
                    lr=0.1,
                    folds=3,
                    center_positions=True,
                    deconvolve=0.9,
                    early_stop=True,
                    head_l2=0.1,
                ),
            ),
        )
    ),
    influence_ranks=[0, 1],
    probe_lead_steps=50,
    asynchronous=True,
)


# The mixture options go with selector 'mixture' (which takes no scorer), and the Energon pool's with pool
# 'energon', so they have argvs of their own.
EVERY_MIXTURE_FIELD = [
    "--mates", "--mates-selector", "mixture", "--mates-mixture-weights", "/data/mix.json",
    "--mates-mixture-when-short", "error",
]  # fmt: skip
EVERY_ENERGON_FIELD = [
    "--mates", "--mates-pool", "energon", "--mates-shards", "/data/energon", "--mates-energon-split", "val",
    "--mates-energon-text-field", "caption", "--mates-energon-domain-field", "json[domain]",
]  # fmt: skip
# The built-in components' options keep the flags of earlier releases.
COMPONENT_FLAGS = {
    "--mates-temperature", "--mates-mixture-weights", "--mates-mixture-when-short", "--mates-shards",
    "--mates-energon-split", "--mates-energon-text-field", "--mates-energon-domain-field",
}  # fmt: skip


def _field_flags(cls, prefix: str) -> set[str]:
    """The flag every (nested) field should have, spelled out independently of configio."""
    out = set()
    for f in dataclasses.fields(cls):
        spelled = f"{prefix}{f.name.replace('_', '-')}"
        sub = {"influence": InfluenceConfig, "finetune": FinetuneConfig, "ridge": RidgeConfig,
               "relational": RelationalConfig}.get(f.name)  # fmt: skip
        out |= _field_flags(sub, f"{spelled}-") if sub else {spelled}
    return out


def test_every_config_field_has_a_flag():
    options = {s for a in parser()._actions for s in a.option_strings}
    # SelectionConfig's fields (but filters, a list of sections: --mates-config only), and the 'mates' scorer's
    # options (their spellings of earlier releases).
    own = _field_flags(SelectionConfig, "--mates-") - {"--mates-filters"}
    expected = own | _field_flags(MatesConfig, "--mates-") | COMPONENT_FLAGS
    assert "--mates-influence-ridge-alphas" in expected and "--mates-influence-finetune-lr" in expected
    assert expected | {"--mates", "--mates-config", "--mates-reference"} <= options
    assert "--no-mates-influence-warm-start" in options
    # The argv above sets every one of them, so the next test compares every field.
    negated = {"--mates-influence-warm-start", "--mates-influence-bf16"}  # given as --no-... (default true)
    given = {a for a in EVERY_FIELD + EVERY_MIXTURE_FIELD + EVERY_ENERGON_FIELD if a.startswith("--mates-")}
    assert given | negated >= expected
    # Each flag's --help is its field's docstring.
    help_ = {a.option_strings[0]: a.help for a in parser()._actions if a.option_strings}
    assert help_["--mates-select-every"].startswith("Training steps per round")
    assert "[default: 50]" in help_["--mates-select-every"]


def test_flags_convert_to_the_config_built_directly():
    sel = mlm.mates_config_from_args(parse(*EVERY_FIELD))
    assert sel == EVERY_FIELD_CONFIG
    influence = sel.scorer_config.influence
    assert isinstance(influence, InfluenceConfig) and isinstance(influence.ridge, RidgeConfig)
    assert influence.ridge.alphas == (0.5, 5.0)
    assert type(sel.select_every) is int and type(sel.selector_config.temperature) is float
    assert type(influence.finetune.lr) is float


def test_mixture_flags_convert_to_the_config_built_directly(tmp_path):
    weights = tmp_path / "mix.json"
    weights.write_text('{"weights": {"a": 1}}')
    argv = [a if a != "/data/mix.json" else str(weights) for a in EVERY_MIXTURE_FIELD]
    sel = mlm.mates_config_from_args(parse(*argv))
    assert sel == SelectionConfig(
        selector="mixture", selector_options={"weights": str(weights), "when_short": "error"}
    )


def test_energon_flags_convert_to_the_config_built_directly():
    pytest.importorskip("megatron.energon")
    sel = mlm.mates_config_from_args(parse(*EVERY_ENERGON_FIELD))
    assert sel == SelectionConfig(
        pool="energon",
        pool_options={"shards": "/data/energon", "split": "val", "text_field": "caption",
                      "domain_field": "json[domain]"},
    )  # fmt: skip


def test_only_mates_gives_the_dataclass_defaults():
    assert mlm.mates_config_from_args(parse("--mates")) == SelectionConfig()


def test_without_mates_there_is_no_config():
    assert mlm.mates_config_from_args(parse("--mates-selection-ratio", "0.5")) is None
    assert mlm.mates_config_from_args(argparse.Namespace()) is None


def test_dict_flag_takes_a_json_or_yaml_mapping():
    from mates_megatron.flags import overrides_from_args

    flags = mlm.mates_flags()
    (opt,) = [f for f in flags if f.flag == "--mates-scorer-options"]
    args = parse("--mates-scorer-options", '{"window": 3, "name": "x"}')
    assert overrides_from_args(args, [opt]) == {"scorer_options": {"window": 3, "name": "x"}}
    args = parse("--mates-scorer-options", "{window: 3}")
    assert overrides_from_args(args, [opt]) == {"scorer_options": {"window": 3}}
    with pytest.raises(ValueError, match="--mates-scorer-options"):
        mlm.mates_config_from_args(parse("--mates", "--mates-scorer-options", "[1, 2]"))


MATES = ["--mates-scorer", "mates", "--mates-selector", "gumbel", "--mates-warmup-steps", "50"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--mates-selection-ratio", "1.5"], "selection_ratio='1.5' (--mates-selection-ratio)"),
        ([*MATES, "--mates-temperature", "-1"], "temperature='-1' (--mates-temperature)"),
        ([*MATES, "--mates-estimator", "exact"], "estimator='exact' (--mates-estimator)"),
        (["--mates-select-every", "ten"], "select_every='ten' (--mates-select-every)"),
        (["--mates-select-every", "1.5"], "select_every='1.5' (--mates-select-every)"),
        (["--mates-pool", "webdataset"], "WebDatasetPoolConfig.shards is required with pool 'webdataset'"),
        (["--mates-selector", "gumbel"], "selector='gumbel' (--mates-selector), scorer (--mates-scorer; default)"),
        ([*MATES, "--mates-influence-finetune-val-fraction", "1.5"],
         "influence.finetune.val_fraction='1.5' (--mates-influence-finetune-val-fraction)"),
        ([*MATES, "--mates-influence-ridge-alphas", "1", "-1"],
         "influence.ridge.alphas=['1', '-1'] (--mates-influence-ridge-alphas)"),
        ([*MATES, "--mates-influence-model", "lasso"], "influence.model='lasso' (--mates-influence-model)"),
        (["--mates-estimator", "exact"], "'none' takes no options, got ['estimator']"),
    ],
)  # fmt: skip
def test_a_bad_value_names_its_field_value_and_flag(argv, named):
    with pytest.raises(ValueError) as e:
        mlm.mates_config_from_args(parse("--mates", *argv))
    assert str(e.value).startswith("--mates arguments: ") and named in str(e.value), str(e.value)


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("wrapped", [True, False])
def test_yaml_config_with_flag_overrides(tmp_path, wrapped):
    body = {
        "select_every": 10,
        "selection_ratio": 0.5,
        "selector": "gumbel",
        "scorer": {
            "kind": "mates",
            "probe_samples": 32,
            "influence": {"model": "ridge", "ridge": {"alphas": [1, 2]}, "finetune": {"lr": "1e-4"}},
        },
        "warmup_steps": 10,
    }
    cfg = _write(tmp_path / "sel.yaml", {"selection": body} if wrapped else body)
    args = parse(
        "--mates", "--mates-config", str(cfg), "--mates-temperature", "0.9",
        "--mates-influence-finetune-epochs", "2",
    )  # fmt: skip
    expected = SelectionConfig(
        select_every=10,
        selection_ratio=0.5,
        selector="gumbel",
        scorer="mates",
        selector_options={"temperature": 0.9},
        warmup_steps=10,
        scorer_options={
            "probe_samples": 32,
            "influence": InfluenceConfig(
                model="ridge",
                ridge=RidgeConfig(alphas=(1.0, 2.0)),
                finetune=FinetuneConfig(lr=1e-4, epochs=2),
            ),
        },
    )
    assert mlm.mates_config_from_args(args) == expected
    # A flag beats the file.
    args = parse(
        "--mates", "--mates-config", str(cfg), "--mates-select-every", "20", "--mates-warmup-steps", "20"
    )
    sel = mlm.mates_config_from_args(args)
    assert (sel.select_every, sel.warmup_steps, sel.selection_ratio) == (20, 20, 0.5)
    # The flat spelling of earlier releases: read, with a warning that names the new key, to the same config.
    flat = {**body, "scorer": "mates", **body["scorer"]}
    del flat["kind"]
    old = _write(tmp_path / "old.yaml", {"selection": flat} if wrapped else flat)
    args = parse(
        "--mates", "--mates-config", str(old), "--mates-temperature", "0.9",
        "--mates-influence-finetune-epochs", "2",
    )  # fmt: skip
    with pytest.warns(FutureWarning, match=r"probe_samples is read for one more release: write it as "
                      r"scorer_options\.probe_samples, or in the section scorer: \{kind: mates"):  # fmt: skip
        assert mlm.mates_config_from_args(args) == expected


def _mates(options: dict) -> dict:
    return {"scorer": {"kind": "mates", **options}, "selector": "gumbel", "warmup_steps": 50}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"select_evry": 10}, "unknown field 'select_evry'; SelectionConfig has: pool, "),
        (_mates({"influence": {"epochs": 2}}), "unknown field 'influence.epochs'; InfluenceConfig has: model, "),
        (_mates({"influence": {"ridge": {"alpha": 2}}}), "unknown field 'influence.ridge.alpha'; RidgeConfig has: "),
        ({"select_every": "ten"}, "select_every='ten' (--mates-select-every; from "),
        ({"select_every": 2.5}, "select_every=2.5 (--mates-select-every; from "),
        (_mates({"influence": {"warm_start": "maybe"}}), "influence.warm_start='maybe' (--mates-influence-warm-start"),
        ({"selection_ratio": 2}, "selection_ratio=2 (--mates-selection-ratio; from "),
        (_mates({"influence": [1]}), "influence=[1]: Input should be a dictionary or an instance of InfluenceConfig"),
    ],
)  # fmt: skip
def test_yaml_errors_name_the_file_and_field(tmp_path, body, named):
    cfg = _write(tmp_path / "bad.yaml", {"selection": body})
    with pytest.raises(ValueError) as e:
        mlm.mates_config_from_args(parse("--mates", "--mates-config", str(cfg)))
    assert named in str(e.value) and str(e.value).startswith(f"--mates-config {cfg}: "), str(e.value)


def test_megatron_arguments_are_checked_against_the_selection(tmp_path):
    ref = tmp_path / "ref.jsonl"
    ref.write_text('{"context": "a b", "target": " c"}\n')
    scored = [
        "--mates",
        "--mates-selector", "gumbel",
        "--mates-scorer", "mates",
        "--mates-select-every", "50",
        "--mates-warmup-steps", "50",
    ]  # fmt: skip
    ok = mlm.mates_config_from_args(
        parse(*scored, "--mates-reference", str(ref), "--train-iters", "200", megatron=True)
    )
    assert ok.scored and ok.warmup_steps == 50
    cases = [
        ([*scored, "--mates-reference", str(ref), "--train-iters", "50"], "--mates-warmup-steps 50 >= --train-iters 50"),
        ([*scored, "--train-iters", "200"], "give --mates-reference PATH"),
        ([*scored, "--train-iters", "200", "--mates-reference", str(tmp_path / "no.jsonl")], "no such file"),
        ([*scored, "--mates-reference", str(ref), "--train-iters", "200", "--tp-comm-overlap"],
         "--tp-comm-overlap"),
        (["--mates", "--train-samples", "1000"], "give --train-iters instead"),
        (["--mates", "--train-iters", "200", "--rampup-batch-size", "8", "8", "100"], "--rampup-batch-size"),
        (["--mates", "--train-iters", "200", "--dataloader-type", "cyclic"], "--dataloader-type single"),
    ]  # fmt: skip
    for argv, named in cases:
        with pytest.raises(ValueError, match=re.escape(named)):
            mlm.mates_config_from_args(parse(*argv, megatron=True))
    # The random selector never probes: TP communication overlap does not matter to it.
    sel = mlm.mates_config_from_args(
        parse("--mates", "--train-iters", "200", "--tp-comm-overlap", megatron=True)
    )
    assert sel.selector == "random"


# The settings that break probes on the live model, on every host: tests/unit/test_probe_settings.py.


def test_non_persistent_checkpoints_are_refused_for_every_selection():
    with pytest.raises(ValueError, match=re.escape("--non-persistent-save-interval 100: MATES state")) as e:
        mlm.mates_config_from_args(
            parse("--mates", "--train-iters", "200", "--non-persistent-save-interval", "100", megatron=True)
        )
    assert str(e.value).endswith("drop it and use --save-interval")


def test_train_split_is_sized_as_the_candidate_pool():
    args = parse(
        "--mates", "--mates-select-every", "10", "--mates-selection-ratio", "0.2", "--train-iters", "25",
        "--global-batch-size", "8", megatron=True,
    )  # fmt: skip
    # 3 rounds (25 / 10, rounded up) x 10 steps x 8 samples / 0.2
    assert mlm.mates_train_valid_test_num_samples(args, (200, 16, 8)) == (1200, 16, 8)
    assert mlm.mates_train_valid_test_num_samples(args, (5000, 16, 8)) == (5000, 16, 8)
    web = parse(
        "--mates", "--mates-pool", "webdataset", "--mates-shards", "/s", "--train-iters", "25", megatron=True
    )
    assert mlm.mates_train_valid_test_num_samples(web, (200, 16, 8)) == (200, 16, 8)


def test_package_imports_without_megatron_training(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.training", None)  # any import of it now raises ImportError
    for name in [m for m in sys.modules if m.startswith("mates_megatron.integrations.megatron_lm")]:
        monkeypatch.delitem(sys.modules, name)
    fresh = importlib.import_module("mates_megatron.integrations.megatron_lm")
    assert callable(fresh.add_mates_args) and callable(fresh.mates_step_end)


def test_the_integration_never_imports_the_demo_trainer():
    """The integration (and the config loader and sampler it uses) build the plugin from mates_megatron.plugin,
    never from the demo trainer's mates_megatron.training."""
    import ast

    pkg = REPO / "mates_megatron"
    paths = [*(pkg / "integrations").rglob("*.py"), pkg / "configio.py", pkg / "sampler.py"]
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.startswith("mates_megatron.training")], (path, names)


# -- the data loader on a real GPTDataset -------------------------------------------------------------------

SEQ, GBS, MBS, DP, EVERY, ITERS = 16, 8, 2, 2, 2, 6


@pytest.fixture(scope="module")
def gpt_dataset(tmp_path_factory):
    """A real megatron-core GPTDataset over a small indexed dataset of random documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from mates_megatron.training.data import TokenizerInfo, build_gpt_dataset

    out = tmp_path_factory.mktemp("indexed")
    prefix = out / "train"
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(300):
        doc = np.append(rng.integers(1, 100, size=rng.integers(20, 60)), 0).astype(np.int32)
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    sel = selection()
    need = pool_num_samples(sel, train_iters=ITERS, global_batch_size=GBS)
    ds = build_gpt_dataset(
        prefix,
        seq_length=SEQ,
        num_samples=need,
        seed=1,
        tokenizer=TokenizerInfo(100, 0),
        cache_dir=out / "cache",
    )
    assert len(ds) >= need
    return ds


def selection(**kw) -> SelectionConfig:
    return SelectionConfig(**{"select_every": EVERY, "selection_ratio": 0.5, "seed": 5, **kw})


def cpu_host(**kw) -> mlm.MegatronLMHost:
    """A host without Megatron-LM's globals (the random selector reads none of it)."""
    return mlm.MegatronLMHost(
        device=torch.device("cpu"), seq_length=SEQ, micro_batch_size=MBS, groups=None,
        forward_backward_func=None, **kw,
    )  # fmt: skip


def loader_for(ds, rank: int, *, consumed: int = 0, num_workers: int = 0, sel=None):
    sel = sel or selection()
    loader, plugin = mlm.build_mates_data_loader(
        sel,
        ds,
        train_iters=ITERS,
        global_batch_size=GBS,
        micro_batch_size=MBS,
        seq_length=SEQ,
        consumed_samples=consumed,
        dp_rank=rank,
        dp_size=DP,
        num_workers=num_workers,
    )
    state = mlm.MatesState(sel=sel, plugin=plugin, host=cpu_host(), global_batch_size=GBS)
    return loader, plugin, state


def run_steps(ds, it, plugin, state, rank: int, steps: range) -> dict[int, list[int]]:
    """Megatron's loop on one rank: GBS / (MBS x DP) micro-batches per step, then the step-end call point."""
    served: dict[int, list[int]] = {}
    mlm.set_mates_state(state)
    for step in steps:
        for k in range(GBS // (MBS * DP)):
            batch = next(it)
            start = (step - 1) * GBS + k * MBS * DP + rank * MBS
            ids = plugin.sampler.ids_at(np.arange(start, start + MBS))
            expected = torch.stack([torch.as_tensor(ds[int(i)]["tokens"]) for i in ids])
            assert torch.equal(batch["tokens"], expected)
            assert set(batch) >= {"tokens", "labels", "loss_mask", "position_ids"}
            served.setdefault(plugin.sampler.round_of(start), []).extend(ids.tolist())
        mlm.mates_step_end(step, model=["chunk"], optimizer="opt", opt_param_scheduler="sched")
        assert (state.host.model_chunks, state.host.optimizer, state.host.scheduler) == (
            ["chunk"],
            "opt",
            "sched",
        )
    return served


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_serves_each_rounds_selection_across_boundaries(gpt_dataset, num_workers):
    by_round: dict[int, list[int]] = {}
    for rank in range(DP):
        loader, plugin, state = loader_for(gpt_dataset, rank, num_workers=num_workers)
        it = iter(loader)
        assert len(loader) == ITERS * GBS // (MBS * DP)
        for r, ids in run_steps(gpt_dataset, it, plugin, state, rank, range(1, ITERS + 1)).items():
            by_round.setdefault(r, []).extend(ids)
        with pytest.raises(StopIteration):
            next(it)
        # Served rounds are released at each boundary; after the last step none is held.
        assert plugin.sampler.published_rounds() == []
    per_round = EVERY * GBS
    rounds = plugin.rounds
    assert sorted(by_round) == list(range(ITERS // EVERY))
    for r, ids in by_round.items():  # both ranks together: each id of the round's selection once
        assert len(ids) == per_round and len(set(ids)) == per_round
        assert set(ids) <= set(rounds.candidates(r).tolist())


def test_loader_stops_at_a_round_nobody_published(gpt_dataset):
    loader, plugin, _ = loader_for(gpt_dataset, 0)
    it = iter(loader)
    for _ in range(EVERY * GBS // (MBS * DP)):  # round 0, then no step-end call
        next(it)
    with pytest.raises(PoolError, match="mates_step_end"):
        next(it)


def test_step_end_without_a_loader_says_what_is_missing():
    with pytest.raises(RuntimeError, match="no MATES train data loader"):
        mlm.mates_step_end(1, [], None, None)


def collect(it, steps: range) -> list[torch.Tensor]:
    """Tokens of every micro-batch of ``steps``, with the step-end call point after each step."""
    out = []
    for step in steps:
        out += [next(it)["tokens"] for _ in range(GBS // (MBS * DP))]
        mlm.mates_step_end(step, [], None, None)
    return out


def test_state_beside_the_checkpoint_resumes_the_same_batches(gpt_dataset, tmp_path):
    rank, stop = 1, 3  # mid-round 1
    loader, plugin, state = loader_for(gpt_dataset, rank)
    it = iter(loader)
    run_steps(gpt_dataset, it, plugin, state, rank, range(1, stop + 1))
    path = mlm.save_mates_state(tmp_path, stop)
    assert path == tmp_path / f"iter_{stop:07d}" / "mates_state.pt" and path.is_file()
    rest = collect(it, range(stop + 1, ITERS + 1))

    resumed, plugin2, state2 = loader_for(gpt_dataset, rank, consumed=stop * GBS)
    mlm.set_mates_state(state2)
    assert mlm.load_mates_state(tmp_path, stop) == path
    assert plugin2.sampler.published_rounds() == [1]
    again = collect(iter(resumed), range(stop + 1, ITERS + 1))
    assert len(again) == len(rest) == (ITERS - stop) * GBS // (MBS * DP)
    assert all(torch.equal(a, b) for a, b in zip(again, rest, strict=True))


def test_the_state_is_the_same_on_every_rank_so_one_file_serves_all(gpt_dataset, tmp_path):
    """Every data-parallel rank's plugin state is identical (no per-rank field): rank 0's file resumes rank 1."""
    saved = []
    for rank in range(DP):
        loader, plugin, state = loader_for(gpt_dataset, rank)
        run_steps(gpt_dataset, iter(loader), plugin, state, rank, range(1, 4))
        buf = io.BytesIO()
        torch.save(mlm.mates_state_dict(3), buf)
        saved.append(buf.getvalue())
    assert saved[0] == saved[1]
    sampler_state = torch.load(io.BytesIO(saved[0]), weights_only=False)["sampler"]
    assert not {"data_parallel_rank", "data_parallel_size", "micro_batch_size"} & set(sampler_state)


def test_only_the_writer_rank_writes(gpt_dataset, tmp_path, monkeypatch):
    from mates_megatron.integrations.megatron_lm import state as st

    _, _, state = loader_for(gpt_dataset, 0)
    mlm.set_mates_state(state)
    monkeypatch.setattr(st, "_rank", lambda: 1)
    path = mlm.save_mates_state(tmp_path, 2)
    assert path == tmp_path / "iter_0000002" / "mates_state.pt" and not path.exists()
    assert selection().state_rank == 0
    scored = selection(selector="gumbel", scorer="mates", warmup_steps=EVERY, influence_ranks=[2, 3])
    assert scored.state_rank == 2  # rank 0 holds no influence model then
    assert dataclasses.replace(scored, influence_ranks=[0, 3]).state_rank == 0


def test_resume_refuses_a_changed_selection_missing_or_old_state(gpt_dataset, tmp_path):
    _, _, state = loader_for(gpt_dataset, 0)
    mlm.set_mates_state(state)
    mlm.save_mates_state(tmp_path, 2)
    _, _, other = loader_for(gpt_dataset, 0, sel=selection(seed=6))
    mlm.set_mates_state(other)
    with pytest.raises(ValueError, match="--mates-seed 5"):
        mlm.load_mates_state(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="iter_0000004/mates_state.pt"):
        mlm.load_mates_state(tmp_path, 4)
    old = tmp_path / "iter_0000006"
    old.mkdir()
    (old / "mates_state_rank00000.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="old per-rank format"):
        mlm.load_mates_state(tmp_path, 6)


def test_pool_must_be_large_enough_and_a_single_dataset(gpt_dataset):
    with pytest.raises(ValueError, match="mates_train_valid_test_num_samples"):
        loader_for(gpt_dataset, 0, sel=selection(selection_ratio=0.01))
    with pytest.raises(ValueError, match="every rank"):
        mlm.build_mates_data_loader(
            selection(), None, train_iters=ITERS, global_batch_size=GBS, micro_batch_size=MBS,
            seq_length=SEQ, consumed_samples=0, dp_rank=0, dp_size=DP,
        )  # fmt: skip


class _Recorder:
    """A TensorBoard/W&B writer that keeps what it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add_scalar(self, *a) -> None:
        self.calls.append(a)

    def log(self, *a) -> None:
        self.calls.append(a)


def test_host_implements_the_protocol_and_logs():
    from mates_megatron.host import Host
    from mates_megatron.probe.context import ProbeContext
    from mates_megatron.probe.reference import ReferenceSet

    tb, wb = _Recorder(), _Recorder()
    ref = ReferenceSet(np.zeros((3, SEQ + 1), dtype=np.int64), np.ones((3, SEQ), dtype=np.float32), "ref")
    host = cpu_host(reference=ref, distributed_optimizer=True, tensorboard_writer=tb, wandb_writer=wb)
    host.step(("chunk",), "opt", "sched")
    assert isinstance(host, Host)
    assert (host.model_chunks, host.optimizer, host.scheduler, host.reference) == (
        ["chunk"],
        "opt",
        "sched",
        ref,
    )
    host.log_metrics(10, {"mates/oracle_mean": 1.5})
    assert tb.calls == [("mates/oracle_mean", 1.5, 10)] and wb.calls == [({"mates/oracle_mean": 1.5}, 10)]
    # The round builds the one ProbeContext from the host.
    ctx = ProbeContext.from_host(host, ref.micro_batches(MBS))
    assert (ctx.model_chunks, ctx.optimizer, ctx.seq_length) == (["chunk"], "opt", SEQ)


def _scored_round_on_the_megatron_lm_host(data: dict, save_dir: str, ahead: dict | None = None) -> dict:
    """On each of 2 TP ranks: the Megatron-LM host over a real GPTModel/optimizer, a MATES round at the
    boundary through mates_step_end, the state saved once and read back by every rank. ``ahead``: the round
    is probed at step 2 (probe_lead_steps 1, optionally asynchronous) and a checkpoint is saved right after."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mates_megatron.configio import build
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.host import ProcessGroups
    from mates_megatron.probe.reference import load_reference_set
    from mates_megatron.training.config import TrainConfig
    from mates_megatron.training.loop import Trainer

    cfg = build(TrainConfig, {
        "data_prefix": data["prefix"], "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "seq_length": 64}, "parallel": {"tensor_model_parallel_size": 2, "cpu": True}, "micro_batch_size": 2,
        "global_batch_size": 4, "train_iters": 6, "lr": 3e-3, "lr_warmup_iters": 1, "seed": 5,
    }, where="test")  # fmt: skip
    trainer = Trainer(cfg)  # the live model, optimizer and scheduler that Megatron-LM would hand over
    sel = SelectionConfig(
        select_every=3, selection_ratio=0.25, selector="gumbel", scorer="mates", seed=11, warmup_steps=3,
        scorer_options={"probe_samples": 12, "estimator": "oracle",
                        "influence": {"model": "ridge", "ridge": {"features": "token_embeddings"}}},
        **(ahead or {}),
    )  # fmt: skip
    tok = load_tokenizer(trainer.tokenizer_info.path)
    host = mlm.MegatronLMHost(
        device=torch.device("cpu"), seq_length=64, micro_batch_size=2, groups=ProcessGroups.from_parallel_state(),
        forward_backward_func=get_forward_backward_func(),
        reference=load_reference_set(data["reference"], tok, 64),
    )  # fmt: skip
    need = pool_num_samples(sel, train_iters=6, global_batch_size=4)
    loader, plugin = mlm.build_mates_data_loader(
        sel, trainer.build_dataset(need), train_iters=6, global_batch_size=4, micro_batch_size=2,
        seq_length=64, consumed_samples=0, dp_rank=0, dp_size=1, tokenizer=tok, device=host.device,
    )  # fmt: skip
    mlm.set_mates_state(mlm.MatesState(sel=sel, plugin=plugin, host=host, global_batch_size=4))
    it = iter(loader)
    for step in (1, 2, 3):
        for _ in range(2):
            next(it)
        before = [p.detach().clone() for p in trainer.model_chunks[0].parameters()]
        mlm.mates_step_end(step, trainer.model_chunks, trainer.optimizer, trainer.scheduler)
        if ahead and step == 2:  # round 1 probed, its influence stage maybe in flight: the save waits for it
            mlm.save_mates_state(save_dir, 2)
    after = list(trainer.model_chunks[0].parameters())
    path = mlm.save_mates_state(save_dir, 3)
    dist.barrier()
    files = sorted(p.name for p in path.parent.iterdir())
    published = plugin.sampler.ids_at(np.arange(12, 24)).tolist()
    mlm.load_mates_state(save_dir, 3)  # every rank reads the one file
    assert plugin.sampler.ids_at(np.arange(12, 24)).tolist() == published
    workers = plugin.hook.scorer.influence.worker is not None
    return {
        "workers": workers,
        "saved_ahead": torch.load(
            path.parent.parent / f"iter_{2:07d}" / "mates_state.pt", weights_only=False
        )["hook"]["chosen"][1].tolist()
        if ahead
        else None,
        "published": published,
        "records": sorted(plugin.hook.records),
        "probes": plugin.hook.records[1]["probes"],
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
        "files": files,
        "next": next(it)["tokens"].tolist(),
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_megatron_lm_host_runs_a_scored_round_and_saves_one_state(small_embedded, tmp_path):
    from mates_megatron.compat.spawn import run_on_ranks

    rank0, rank1 = run_on_ranks(_scored_round_on_the_megatron_lm_host, 2, small_embedded, str(tmp_path))
    assert rank0["records"] == [1] and rank0["probes"] == 12
    assert rank0["published"] == rank1["published"] and rank0["next"] == rank1["next"]  # TP ranks agree
    assert rank0["unchanged"] and rank1["unchanged"]  # the round leaves the live model as it found it
    assert rank0["files"] == ["mates_state.pt"]


@pytest.mark.distributed
@pytest.mark.slow
def test_megatron_lm_host_runs_asynchronous_rounds_and_saves_a_round_in_flight(small_embedded, tmp_path):
    """Probed one step ahead, the influence stage in a worker per rank over the host's own GPTDataset pool:
    the checkpoint saved between probe and publish holds the round's selection, which is what the round
    then serves, and what the synchronous run with the same lead serves."""
    from mates_megatron.compat.spawn import run_on_ranks

    lead = {"probe_lead_steps": 1}
    sync = run_on_ranks(_scored_round_on_the_megatron_lm_host, 2, small_embedded, str(tmp_path / "s"), lead)[
        0
    ]
    both = run_on_ranks(
        _scored_round_on_the_megatron_lm_host,
        2,
        small_embedded,
        str(tmp_path / "a"),
        {**lead, "asynchronous": True},
    )
    assert both[0]["workers"] and not sync["workers"]
    assert both[0]["published"] == both[1]["published"] == sync["published"]
    assert both[0]["next"] == sync["next"] and both[0]["unchanged"]
    # The saved selection (sorted by the selector) is the one served from step 3.
    assert sorted(both[0]["saved_ahead"]) == sorted(both[0]["published"]) == sorted(sync["saved_ahead"])


def test_megatron_tokenizer_adapter():
    class Tok:  # Megatron-LM's tokenizer interface
        def tokenize(self, text):
            return [ord(c) for c in text]

        def detokenize(self, ids):
            return "".join(map(chr, ids))

    tok = mlm.MegatronTextTokenizer(Tok())
    assert tok("ab", add_special_tokens=False) == {"input_ids": [97, 98]}
    assert tok.decode(np.array([97, 98])) == "ab"


# -- the patch, the launch script and the configs ------------------------------------------------------------


def _patch_parts(patch: Path) -> tuple[str, str]:
    text = patch.read_text()
    i = text.index("diff --git ")
    return text[:i], text[i:]


def test_each_supported_release_has_its_patch():
    assert set(PATCHES) == {"core_v0.16.1", "core_v0.19.0"} and PATCH in PATCHES.values()
    assert sorted(p.name for p in (REPO / "patches").glob("*.patch")) == sorted(
        p.name for p in PATCHES.values()
    )


@pytest.mark.parametrize("tag", sorted(PATCHES))
def test_patch_header_names_tag_commit_and_reasons(tag):
    header, body = _patch_parts(PATCHES[tag])
    assert re.search(r"^Target:\s+NVIDIA/Megatron-LM tag (\S+)$", header, re.M).group(1) == tag
    sha = re.search(r"^Commit:\s+(\S+)$", header, re.M).group(1)
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    assert patch_name(tag) in header  # its apply/check commands name the file itself
    # git apply would read these as patch lines.
    assert not [ln for ln in header.splitlines() if ln.startswith(("--- ", "+++ ", "@@", "diff "))]
    assert header.count("Delete with:") == 4


@pytest.mark.parametrize("tag", sorted(PATCHES))
def test_patch_touches_only_megatron_and_pretrain_gpt(tag):
    _, body = _patch_parts(PATCHES[tag])
    files = re.findall(r"^diff --git a/(\S+) b/(\S+)$", body, re.M)
    assert files and all(a == b for a, b in files)
    paths = {a for a, _ in files}
    assert all(p.startswith("megatron/") or p == "pretrain_gpt.py" for p in paths), paths
    assert paths == {"megatron/training/checkpointing.py", "megatron/training/training.py", "pretrain_gpt.py"}
    added = [ln[1:] for ln in body.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    removed = [ln for ln in body.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    assert len(added) < 60 and len(removed) <= 3  # small, and upstream code is left in place
    # Every call into the plugin names a function it has.
    called = set(re.findall(r"from mates_megatron\.integrations\.megatron_lm import (\w+)", "\n".join(added)))
    assert called == {
        "add_mates_args",
        "mates_step_end",
        "mates_train_data_loader",
        "mates_train_valid_test_num_samples",
        "save_mates_state",
    }
    assert all(callable(getattr(mlm, name)) for name in called)


@pytest.mark.skipif(
    not os.environ.get("MEGATRON_LM_DIR"), reason="set MEGATRON_LM_DIR to a Megatron-LM clone"
)
@pytest.mark.parametrize("tag", sorted(PATCHES))
def test_patch_applies_to_its_megatron_lm_tag(tag, tmp_path):
    """``git apply --check`` of each patch on a clean worktree of its tag (the clone itself is not touched)."""
    header, _ = _patch_parts(PATCHES[tag])
    sha = re.search(r"^Commit:\s+(\S+)$", header, re.M).group(1)
    git = ["git", "-C", os.environ["MEGATRON_LM_DIR"]]
    rev = subprocess.run([*git, "rev-parse", f"{tag}^{{commit}}"], capture_output=True, text=True)
    assert rev.stdout.strip() == sha, f"the clone has no tag {tag} at {sha}: git fetch --tags"
    tree = tmp_path / "tree"
    subprocess.run([*git, "worktree", "add", "--detach", str(tree), tag], check=True, capture_output=True)
    try:
        check = subprocess.run(
            ["git", "-C", str(tree), "apply", "--check", str(PATCHES[tag])], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], capture_output=True)


@pytest.mark.parametrize("version", ["0.16.0", "0.16.1", "0.19.0", "0.19.1rc0"])
def test_supported_megatron_core_versions_name_their_patch(version):
    assert (
        check_megatron_core_version(version) == {"0.16": "core_v0.16.1", "0.19": "core_v0.19.0"}[version[:4]]
    )


@pytest.mark.parametrize("version", ["0.15.3", "0.17.1", "0.18.2", "0.20.0"])
def test_other_megatron_core_versions_are_refused_with_the_fix(version):
    with pytest.raises(RuntimeError) as e:
        check_megatron_core_version(version)
    msg = str(e.value)
    assert f"megatron-core {version}" in msg and "0.16.x" in msg and "0.19.x" in msg
    assert "patches/megatron-lm-core_v0.19.0-mates.patch" in msg and "patches/README.md" in msg


def test_the_installed_megatron_core_is_supported():
    from megatron.core import __version__

    assert check_megatron_core_version() == check_megatron_core_version(__version__)


def test_cpu_launcher_refuses_a_megatron_imported_from_elsewhere(tmp_path):
    """The launcher runs the checkout's megatron (PYTHONPATH), never an installed megatron-core wheel."""
    script = tmp_path / "pretrain_gpt.py"
    script.write_text("raise SystemExit('must not run')\n")
    out = subprocess.run(
        [sys.executable, "-m", "mates_megatron.integrations.megatron_lm.cpu", str(script)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and f"PYTHONPATH={tmp_path}" in out.stderr, out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "mates_megatron.integrations.megatron_lm.cpu", str(tmp_path / "nope.py")],
        capture_output=True,
        text=True,
    )
    assert (
        out.returncode == 1 and "usage: python -m mates_megatron.integrations.megatron_lm.cpu" in out.stderr
    )


def test_launch_script_checks_its_environment():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_LM_DIR", "DATA_PATH", "REFERENCE")}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "set MEGATRON_LM_DIR" in out.stderr
    text = SCRIPT.read_text()
    assert PATCH.name in text and "paper_${MODEL_SIZE}.yaml" in text
    for flag in (
        "--mates",
        "--mates-config",
        "--mates-reference",
        "--seq-length 1024",
        "--global-batch-size 512",
    ):
        assert flag in text


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path):
    data = yaml.safe_load(path.read_text())
    args = parse("--mates", "--mates-config", str(path))
    if "data_prefix" in data:  # a complete TrainConfig run of mates_megatron.pretrain
        from mates_megatron.pretrain import train_config_from_dict

        cfg = train_config_from_dict(data, where=str(path))
        if cfg.selection is not None:  # its selection section also serves --mates-config
            assert mlm.mates_config_from_args(args) == cfg.selection
    else:  # the selection of a Megatron-LM --mates run
        assert set(data) == {"selection"}
        sel = mlm.mates_config_from_args(args)
        assert isinstance(sel, SelectionConfig) and isinstance(sel.scorer_config.influence, InfluenceConfig)


@pytest.mark.parametrize("name", ["paper_410m.yaml", "paper_1b.yaml"])
def test_paper_configs_hold_the_paper_setting(name, tmp_path):
    ref = tmp_path / "lambada.jsonl"
    ref.write_text('{"context": "He opened the", "target": " door"}\n')
    args = parse("--mates", "--mates-config", str(REPO / "configs" / name), "--mates-reference", str(ref),
                 "--train-iters", "50000", "--global-batch-size", "512", megatron=True)  # fmt: skip
    sel = mlm.mates_config_from_args(args)
    assert (
        sel.selector,
        sel.scorer,
        sel.select_every,
        sel.selection_ratio,
        sel.selector_config.temperature,
    ) == (
        "gumbel",
        "mates",
        10000,
        0.2,
        0.5,
    )
    assert sel.warmup_steps == 10000 and sel.scorer_config.probe_samples == 80000 and sel.pool == "indexed"
    # 5 rounds of 10,000 x 512 / 0.2 candidates.
    assert pool_num_samples(sel, train_iters=50000, global_batch_size=512) == 128_000_000
