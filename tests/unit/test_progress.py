"""Progress in a log file is whole periodic lines, never ``\\r`` frames; a terminal keeps tqdm's bar (issue 34)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from mates_megatron import progress as progress_mod
from mates_megatron.progress import LineProgress, progress

REPO = Path(__file__).resolve().parents[2]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_file_gets_a_line_per_interval_and_a_final_line(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    monkeypatch.delenv("MATES_PROGRESS_INTERVAL", raising=False)
    seen = []
    for i in progress(range(10), desc="embed", unit="doc"):  # stderr is captured: no terminal
        seen.append(i)
        clock.now += 10.0  # a line every 3 items at the default 30 s
    assert seen == list(range(10))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [
        "[embed] 3/10 (30%) 0.1 doc/s",
        "[embed] 6/10 (60%) 0.1 doc/s",
        "[embed] 9/10 (90%) 0.1 doc/s",
        "[embed] 10/10 (100%) 0.1 doc/s, done in 100.0s",
    ]


def test_manual_updates_postfix_and_the_environments_interval(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    monkeypatch.setenv("MATES_PROGRESS_INTERVAL", "5")
    with progress(total=5000, desc="prepare", unit="doc") as bar:
        assert isinstance(bar, LineProgress)
        clock.now += 4.0
        bar.update(1200)  # before the interval: no line
        clock.now += 1.0
        bar.update(300)
        bar.set_postfix(err="1.2e-03")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[prepare] 1500/5000 (30%) 300 doc/s",
        "[prepare] 1500/5000 (30%) 300 doc/s err=1.2e-03, done in 5.0s",
    ]


def test_disable_writes_nothing(capsys, monkeypatch):
    assert list(progress(range(3), desc="x", disable=True)) == [0, 1, 2]
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert list(progress(range(3), desc="x", disable=True)) == [0, 1, 2]
    assert sys.stderr.getvalue() == ""
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_the_tqdm_bar(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress(range(3), desc="probes", unit="probe", leave=False)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    assert "\r" in tty.getvalue() and "probes" in tty.getvalue()


def test_a_bad_interval_names_the_variable(monkeypatch):
    monkeypatch.setenv("MATES_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="MATES_PROGRESS_INTERVAL='soon'"):
        progress(range(3))


def test_a_call_site_writes_lines_to_a_redirected_stderr(tmp_path):
    """The Sinkhorn solver's bar (update + set_postfix + close) with stderr redirected to a file, as in Slurm."""
    script = (
        "import numpy as np\n"
        "from mates_megatron.ot.sinkhorn import SinkhornConfig, sinkhorn\n"
        "rng = np.random.default_rng(0)\n"
        "x, y = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))\n"
        "sinkhorn(x, y, SinkhornConfig(epsilon=0.5, tol=1e-12, max_iter=20, device='cpu', progress=True))\n"
        "sinkhorn(x, y, SinkhornConfig(epsilon=0.5, tol=1e-12, max_iter=20, device='cpu', progress=False))\n"
    )
    log = tmp_path / "slurm.err"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MATES_PROGRESS_INTERVAL": "0"}
    with log.open("w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, env=env, check=True, timeout=300)
    text = log.read_text()
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("[sinkhorn]")]
    assert lines[0].startswith("[sinkhorn] 1/20 (5%) ")
    assert "err=" in lines[1]  # the postfix set after the pass shows from the next line on
    assert lines[-1].startswith("[sinkhorn] 20/20 (100%) ") and "err=" in lines[-1] and "done in" in lines[-1]
    assert len(lines) == 21  # one per pass at interval 0, and the final line; none from progress=False
