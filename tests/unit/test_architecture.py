"""The layering of DESIGN.md, checked by walking every import of the package (module-level and local)."""

from __future__ import annotations

import ast
from pathlib import Path

import mates_megatron

ROOT = Path(mates_megatron.__file__).parent
# Hosts and tools may import the demo host; nothing else may (the plugin reads hosts through host.Host).
# trace/run.py is the `trace` tool's edge (it loads the project's checkpoint); the tracers take a ProbeContext.
HOST_OR_TOOL = ("training/", "pretrain.py", "bench/", "demo.py", "cli.py", "trace/run.py")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_plugin_module_imports_the_demo_host():
    offenders = {
        str(p.relative_to(ROOT)): sorted(i for i in _imports(p) if i.startswith("mates_megatron.training"))
        for p in _modules()
        if not str(p.relative_to(ROOT)).startswith(HOST_OR_TOOL)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_megatron_lm_host_imports_no_other_host():
    mlm = [p for p in _modules() if "integrations" in p.parts]
    assert mlm, "the Megatron-LM integration moved: update this test"
    for p in mlm:
        assert not [i for i in _imports(p) if i.startswith("mates_megatron.training")], p


def test_the_walk_sees_local_imports(tmp_path):
    # The check must see imports inside functions too (the old cycle hid in one).
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from mates_megatron.training.loop import Trainer\n")
    assert "mates_megatron.training.loop" in _imports(f)


def test_no_module_is_longer_than_about_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}
