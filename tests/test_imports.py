"""The package's import graph, read from the source (imports inside functions included): each unit (a
subpackage or a top-level module) imports only units of a lower layer, and no modules import each other
in a cycle."""

import ast
import sys
from pathlib import Path

import simmim

PACKAGE = Path(simmim.__file__).parent

LAYERS = (
    {"errors"},  # what bad input raises: no simmim imports
    {"fsutil", "hardware", "runtime"},  # files, the machine, launching
    {"data"},
    {"models"},
    {"checkpoint", "viz"},
    {"zoo"},
    {"config", "inference"},
    {"engine"},  # training and evaluation
    {"measure", "demo", "serve", "detection"},
    {"plan", "study", "bench", "detection_study"},
    {"cli", "__init__"},  # the entry points
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports (`from .x import y` counts y where y is a module)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
            elif (node.module or "").split(".")[0] == "simmim":
                base = []
            else:
                continue
            module = ".".join(base + ([m for m in (node.module or "").split(".") if m != "simmim"]))
            targets = [module] + [f"{module}.{a.name}" if module else a.name for a in node.names]
            found |= {t for t in targets if t in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("simmim.") for a in node.names if a.name.removeprefix("simmim.") in modules}
    return found - {name}


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _unit(module: str) -> str:
    return module.split(".")[0]


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _graph()}
    assert units == set(RANK), f"units without a layer: {units - set(RANK)}; layers without a unit: {set(RANK) - units}"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if _unit(t) != _unit(m) and RANK[_unit(t)] >= RANK[_unit(m)])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    # a package's __init__ re-exporting its own modules is not a cycle
    graph = {m: {t for t in ts if not t.startswith(m + ".") and not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_units_import_only_lower_layers():
    assert not _upward(_graph()), f"imports of a unit at the same or a higher layer: {_upward(_graph())}"


def test_no_module_import_cycles():
    assert not _cycles(_graph()), f"import cycles: {_cycles(_graph())}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The graph is read right: a lazy `from ..engine import x` inside a models/ function is an edge."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "__init__.py").write_text("")
    (models / "swin.py").write_text("def f():\n    from ..engine.loop import Trainer\n")
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "loop.py").write_text("from simmim.models import swin\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    graph = _graph()
    assert "engine.loop" in graph["models.swin"] and "models.swin" in graph["engine.loop"]
    assert _upward(graph) == ["models.swin -> engine.loop"]
    assert ["engine.loop", "models.swin", "engine.loop"] in _cycles(graph)
