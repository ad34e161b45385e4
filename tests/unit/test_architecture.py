"""The layering of DESIGN.md, checked by walking every import of both packages (module-level and local): the
plugin (mates_megatron) never imports the lab (mates_lab); cli.py is a sink and launch.py a leaf; no import
circle beyond the two listed below."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

import mates_lab
import mates_megatron

ROOT = Path(mates_megatron.__file__).parent
LAB = Path(mates_lab.__file__).parent
# Hosts and tools may import the demo host; nothing else may (the plugin reads hosts through host.Host).
# trace/run.py is the `trace` tool's edge (it loads the project's checkpoint); the tracers take a ProbeContext.
HOST_OR_TOOL = ("training/", "pretrain.py", "cli.py", "trace/run.py")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _modules(root: Path = ROOT):
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path, root: Path) -> str:
    parts = (root.name, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (an import of a name inside a module counts as the module)."""
    mods = {_name(p, root): p for p in _modules(root)}

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    return {m: {r for i in _imports(p) if (r := resolve(i)) and r != m} for m, p in mods.items()}


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_plugin_never_imports_the_lab():
    offenders = {
        str(p.relative_to(ROOT)): sorted(i for i in _imports(p) if i.split(".")[0] == "mates_lab")
        for p in _modules()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_cli_is_a_sink_and_launch_a_leaf():
    for root in (ROOT, LAB):
        for p in _modules(root):
            imported = _imports(p)
            assert "mates_megatron.cli" not in imported and "mates_lab.cli" not in imported, p
    launch = {i for i in _imports(ROOT / "launch.py") if i.startswith("mates_megatron")}
    assert launch == set()


def test_no_import_circle_in_either_package():
    # Imports inside functions and under TYPE_CHECKING count: a circle through them is still a circle.
    assert _circles(_graph(LAB)) == []
    assert _circles(_graph(ROOT)) == []


def test_circles_are_found(tmp_path):
    # The walk finds a circle through a local import, and none in a chain.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import g\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert _circles(_graph(pkg)) == [{"pkg.a", "pkg.b"}]


def test_importing_the_plugin_imports_nothing_of_the_lab_or_matplotlib():
    code = (
        "import sys, mates_megatron, mates_megatron.plugin, mates_megatron.cli, mates_megatron.pretrain, "
        "mates_megatron.launch, mates_megatron.integrations.megatron_lm\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mates_lab', 'matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_core_install_pulls_no_matplotlib():
    meta = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if d.startswith("matplotlib")]
    assert any(d.startswith("matplotlib") for d in meta["optional-dependencies"]["lab"])


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
    long = {
        str(p.relative_to(root)): n
        for root in (ROOT, LAB)
        for p in _modules(root)
        if (n := len(p.read_text().splitlines())) > 420
    }
    assert long == {}
