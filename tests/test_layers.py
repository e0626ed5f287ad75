"""The package's imports point one way: each module imports only modules of its own layer or below, the
graph has no cycle (imports inside functions count: a lazy import may not hide one), and no module imports
another module's private names. The demo app and the research benchmarks sit above the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pege_hf"
# lowest first; a module belongs to the first layer whose prefix it has
LAYERS = (
    ("base", ("pege_hf.version", "pege_hf.sources")),
    ("quant", ("pege_hf.quant",)),  # pure torch
    ("config", ("pege_hf.config",)),
    ("transformers integration", ("pege_hf.hf",)),
    ("data", ("pege_hf.data",)),
    ("hub and export", ("pege_hf.hub", "pege_hf.export")),
    ("training", ("pege_hf.training",)),
    ("commands", ("pege_hf.train", "pege_hf.train_lm", "pege_hf.evaluate", "pege_hf.demo", "pege_hf.bench",
                  "pege_hf.cli", "pege_hf.deploy")),
    ("package", ("pege_hf",)),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def known_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(importer: str, is_package: bool, node: ast.AST, modules: dict) -> list[tuple[str, list[str]]]:
    """[(imported pege_hf module, names taken from it)] of one import statement."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name.split(".")[0] == "pege_hf"]
    base = importer if is_package else importer.rpartition(".")[0]
    for _ in range(max(node.level - 1, 0)):
        base = base.rpartition(".")[0]
    target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
    if target.split(".")[0] != "pege_hf":
        return []
    out, names = [], []
    for alias in node.names:
        if f"{target}.{alias.name}" in modules:  # `from . import hub`: the submodule itself
            out.append((f"{target}.{alias.name}", []))
        else:
            names.append(alias.name)
    return out + ([(target, names)] if names or not out else [])


def import_graph() -> dict[str, list[tuple[str, list[str]]]]:
    modules = known_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = []
        for node in ast.walk(tree):  # every import, at module level or inside a function
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges += resolve(name, path.name == "__init__.py", node, modules)
        graph[name] = [(t, n) for t, n in edges if t != name]
    return graph


def layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py")


GRAPH = import_graph()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = [t for t, _ in GRAPH[module] if layer(t) > layer(module)]
    assert not upward, (f"{module} ({LAYERS[layer(module)][0]}) imports {upward} from a higher layer")


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for target, _ in GRAPH.get(node, []):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [target]))
            if not state.get(target):
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(GRAPH):
        if not state.get(module):
            visit(module, [module])


def test_no_private_name_crosses_modules():
    crossing = [(m, t, n) for m, edges in GRAPH.items() for t, names in edges for n in names
                if n.startswith("_") and not n.startswith("__")]
    assert not crossing, crossing


def test_quant_is_pure_torch():
    for path in (PACKAGE / "quant").rglob("*.py"):
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                  and not n.level}
        assert not roots & {"transformers", "accelerate", "datasets", "huggingface_hub", "gradio"}, path


def test_the_wheel_does_not_reach_outside_itself():
    """No module of the package names a path above it (../app, ../benchmarks, ../shared) to read from,
    except the demo command, which looks for the app of a source checkout and says how to get one."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for needle in ("../shared", "parents[1] / \"benchmarks\"", "parents[1] / \"app\""):
            if needle in text and path.name != "demo.py":
                raise AssertionError(f"{path.relative_to(ROOT)} reaches outside the package: {needle}")


def test_functions_stay_small():
    """No function of the package runs over about 60 lines: a long one is a sequence of named steps."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long
