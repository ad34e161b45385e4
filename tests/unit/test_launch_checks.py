"""A bad run config is refused once, before torchrun starts, in one line that names the key or file (issue 34).

The launchers (``mates-megatron pretrain``, ``mates-lab demo``) build and check the config through the code the
ranks run at their start (``pretrain.load_run``), so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mates_megatron import launch, pretrain

REPO = Path(__file__).resolve().parents[2]


def _base(tmp_path: Path) -> dict:
    """configs/demo_cpu.yaml with its files in tmp_path (empty: only their presence is checked here)."""
    cfg = yaml.safe_load((REPO / "configs" / "demo_cpu.yaml").read_text())
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for ext in (".bin", ".idx", ".meta.json"):
        (data / f"train{ext}").write_text("")
    for name in ("reference", "heldout", "lambada"):
        (data / f"{name}.jsonl").write_text('{"text": "x"}\n')
    cfg["data_prefix"] = str(data / "train")
    cfg["reference"] = str(data / "reference.jsonl")
    cfg["eval_sets"] = {"heldout": str(data / "heldout.jsonl"), "lambada": str(data / "lambada.jsonl")}
    return cfg


def _write(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _misspelt(cfg):
    cfg["selection"]["temprature"] = 0.3


def _ratio(cfg):
    cfg["selection"]["selection_ratio"] = 1.5


def _no_reference(cfg):
    cfg["reference"] = str(Path(cfg["reference"]).with_name("missing.jsonl"))


def _missing_weights(cfg):
    cfg["selection"].update(selector={"kind": "mixture", "weights": "/nowhere/weights.json"}, scorer="none")


def _shards_without_manifest(cfg):
    cfg["selection"].update(pool={"kind": "webdataset", "shards": str(Path(cfg["reference"]).parent)})


BAD = {
    # (break the base config, what the one error line must name)
    "misspelt_key": (
        _misspelt,
        ["unknown field 'selection.temprature'", "did you mean selector_options.temperature"],
    ),
    "selection_ratio": (_ratio, ["selection_ratio=1.5", "must be in (0, 1]"]),
    "missing_reference": (_no_reference, ["reference ", "missing.jsonl not found"]),
    "missing_mixture_weights": (
        _missing_weights,
        [
            "selection.selector_options.weights /nowhere/weights.json",
            "no such file",
            "mates-megatron mixture fit",
        ],
    ),
    "shards_without_manifest": (
        _shards_without_manifest,
        ["selection.pool_options.shards ", "manifest.json not found", "mates-megatron prepare"],
    ),
}


def test_the_base_config_passes(tmp_path):
    cfg = pretrain.check_launch(_write(tmp_path, _base(tmp_path)), [])
    assert cfg.selection is not None and cfg.selection.selector_config.temperature == 0.25


@pytest.mark.parametrize("case", sorted(BAD))
def test_launcher_and_ranks_refuse_the_same_way(case, tmp_path):
    breaks, expected = BAD[case]
    cfg = _base(tmp_path)
    breaks(cfg)
    path = _write(tmp_path, cfg)
    with pytest.raises(ValueError) as launcher:
        pretrain.check_launch(path, [])
    with pytest.raises(ValueError) as rank:  # what each rank runs before torch.distributed
        pretrain.load_run(["--config", str(path)])
    assert str(launcher.value) == str(rank.value)
    assert str(rank.value).startswith(f"{path}: ")
    for text in expected:
        assert text in str(rank.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_pretrain_refuses_a_bad_config_in_one_line_without_torchrun(case, tmp_path):
    """The console script as a user runs it (a real process, nothing patched)."""
    breaks, expected = BAD[case]
    cfg = _base(tmp_path)
    breaks(cfg)
    path = _write(tmp_path, cfg, "bad.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "mates_megatron.cli", "pretrain", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert errors[0].startswith(f"error: {path}: ")
    for text in expected:
        assert text in errors[0]
    assert "Traceback" not in out and "ChildFailedError" not in out
    assert "torch.distributed.run" not in out  # torchrun never started


def test_flag_overrides_are_checked_and_named(tmp_path):
    path = _write(tmp_path, _base(tmp_path))
    with pytest.raises(ValueError, match=r"--data-path.*nowhere\.bin not found; prepare it with"):
        pretrain.check_launch(path, ["--data-path", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match=r"temperature='-1' \(--mates-temperature\)"):
        pretrain.check_launch(path, ["--mates-temperature", "-1"])
    with pytest.raises(ValueError, match=r"\+ flags: unrecognized arguments: --no-such-flag"):
        pretrain.check_launch(path, ["--no-such-flag"])
    # --data-path replaces a missing YAML prefix: its own files are the ones checked.
    cfg = _base(tmp_path)
    good = cfg["data_prefix"]
    cfg["data_prefix"] = str(tmp_path / "gone")
    assert pretrain.check_launch(_write(tmp_path, cfg), ["--data-path", good]).data_prefix == good


def test_eval_set_files_are_checked(tmp_path):
    cfg = _base(tmp_path)
    cfg["eval_sets"]["heldout"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(
        ValueError, match=r"eval_sets\.heldout .*evaluation set 'heldout' .*nope\.jsonl not found"
    ):
        pretrain.check_launch(_write(tmp_path, cfg), [])


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("selection: [\n")
    with pytest.raises(ValueError, match="not valid YAML") as e:
        pretrain.check_launch(path, [])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["misspelt_key", "missing_reference"])
def test_the_demo_refuses_a_bad_arm_before_any_arm_launches(case, tmp_path, monkeypatch, capsys):
    from mates_lab.demo import run_demo

    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("torchrun was launched"))
    breaks, expected = BAD[case]
    cfg = _base(tmp_path)
    breaks(cfg)
    path = _write(tmp_path, cfg)
    args = argparse.Namespace(
        config=path,
        seed=None,
        arms="random,mates",
        out=tmp_path / "out",
        headline="heldout",
        nproc_per_node=1,
    )
    assert run_demo(args) == 2
    err = capsys.readouterr().err.splitlines()
    # A misspelt key is refused as the config is read, before the arms are formed from it.
    arm = "" if case == "misspelt_key" else " (arm random)"
    assert len(err) == 1 and err[0].startswith(f"error: {path}{arm}: "), err
    for text in expected:
        assert text in err[0]
    assert not (tmp_path / "out" / "random").exists()


def test_the_demo_refuses_an_arm_the_cost_guard_would_stop_before_any_arm_launches(
    tmp_path, monkeypatch, capsys
):
    """The guard each rank applies at its start (``build_plugin``), applied to every arm before the first one
    trains: here the MATES arm's round (about 0.9 of its training on the cpu-2core preset) against a limit of
    0.1."""
    from mates_lab.demo import run_demo

    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("torchrun was launched"))
    cfg = _base(tmp_path)
    cfg["selection"]["max_selection_cost"] = 0.1
    path = _write(tmp_path, cfg)
    args = argparse.Namespace(config=path, seed=None, arms="random,mates", out=tmp_path / "out",
                              headline="heldout", nproc_per_node=None)  # fmt: skip
    assert run_demo(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: {path} (arm mates): projected selection cost per round: "
    )
    assert "above SelectionConfig.max_selection_cost=0.1" in err[0] and "estimator: forward" in err[0]
    assert not (tmp_path / "out" / "random").exists()


def test_mates_megatron_pretrain_refuses_a_round_over_its_cost_limit_before_torchrun(
    tmp_path, monkeypatch, capsys
):
    from mates_megatron import cli

    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("torchrun was launched"))
    cfg = _base(tmp_path)
    cfg["selection"]["max_selection_cost"] = 0.1
    path = _write(tmp_path, cfg)
    assert cli.main(["pretrain", "--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: projected selection cost per round: ")
    # The same config at the limit the demo uses is admitted and launched (here: the launch is refused above).
    cfg["selection"]["max_selection_cost"] = 1.5
    with pytest.raises(pytest.fail.Exception, match="torchrun was launched"):
        cli.main(["pretrain", "--config", str(_write(tmp_path, cfg))])


@pytest.mark.parametrize("case", ["missing_reference", "cost"])
def test_the_lab_runner_refuses_what_the_ranks_would_before_torchrun(case, tmp_path, monkeypatch, capsys):
    """``launch.run_config`` with ``pretrain.launch_checked`` (how the lab's benches run their configs) checks
    the run as ``mates-megatron pretrain`` does: one ``error:`` line, and torchrun never starts."""
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("torchrun was launched"))
    cfg = _base(tmp_path)
    if case == "cost":
        cfg["selection"]["max_selection_cost"] = 0.1
        expected = "projected selection cost per round: "
    else:
        _no_reference(cfg)
        expected = "reference "
    with pytest.raises(RuntimeError, match=r"failed \(exit code 2\)"):
        launch.run_config(cfg, tmp_path / "run", runner=pretrain.launch_checked)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'run' / 'config.yaml'}: {expected}")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_mixture_plan_refuses_a_proxy_run_in_one_line_without_torchrun(small_embedded, tmp_path):
    """`mates-megatron mixture plan --run` as a user runs it: the proxy runs are checked as `pretrain` checks
    a run (before this, they went to torchrun unchecked and each rank failed on its own)."""
    cfg = yaml.safe_load((REPO / "configs" / "demo_cpu.yaml").read_text())
    cfg.update(data_prefix=small_embedded["prefix"], reference=small_embedded["reference"],
               eval_sets={"val": str(tmp_path / "missing_val.jsonl")})  # fmt: skip
    path = _write(tmp_path, cfg)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "mates_megatron.cli", "mixture", "plan", "--config", str(path), "--steps", "40",
         "--eval-set", "val", "--out", str(tmp_path / "plan"), "--run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "eval_sets.val" in errors[0] and "missing_val.jsonl not found" in errors[0], out
    assert "exit code 2" in errors[-1] and len(errors) == 2, out  # the refused run, named
    assert "Traceback" not in out and "torch.distributed.run" not in out


def test_mixture_commands_name_a_failed_run_in_one_line_but_a_bug_keeps_its_traceback(tmp_path, capsys):
    """The mixture commands turn a run that failed (``launch.RunError``) into one ``error:`` line and exit code
    2; any other ``RuntimeError`` is a bug and propagates (before, every ``RuntimeError`` lost its traceback)."""
    from mates_megatron.mixture.commands import _run_or_refuse

    cfg = {"train_iters": 1}
    failed = _run_or_refuse(lambda: launch.run_config(cfg, tmp_path / "a", runner=lambda path, rest: 1))
    assert failed == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: the run {tmp_path / 'a' / 'config.yaml'} failed (exit code 1); see its output above. Run again "
        "to resume it"
    ]

    def bug(path, rest):
        raise RuntimeError("a bug in the runner")

    with pytest.raises(RuntimeError, match="a bug in the runner"):
        _run_or_refuse(lambda: launch.run_config(cfg, tmp_path / "b", runner=bug))
