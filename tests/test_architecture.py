"""The layering of selfsup, read from the source with `ast` (no selfsup module is imported).

Layers, lowest first; a module may import its own layer and those below it, never one above:

    core < backbones < data < ssl < export < eval < continual < report < launch

`export` (checkpoint -> .safetensors) has a level of its own: it reads what the methods write without
importing them, and eval and continual read exports. Imports inside functions count for layering
(they run sooner or later all the same); for import cycles only module-level imports count (those
run while a module is being imported, which is where a cycle breaks).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "selfsup"
LAYERS = ("core", "backbones", "data", "ssl", "export", "eval", "continual", "report", "launch")
# imported by the CLI at start-up (`submit --help` must stay fast): nothing heavy at module level
LIGHT_LAYERS = ("core",)
HEAVY = ("torch", "lightning", "timm", "torchvision", "deepspeed", "spconv", "webdataset")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    """The layer of a selfsup module: its top-level package or module (`selfsup` itself: core)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "core"


class _ImportCollector(ast.NodeVisitor):
    """(imported module name, line, at module level?) for every import statement."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, int, bool]] = []
        self._function_depth = 0

    def _nested(self, node) -> None:
        self._function_depth += 1
        self.generic_visit(node)
        self._function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self._function_depth == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolved against this module's package
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub when there is one
            self.found.append((f"{base}.{alias.name}", node.lineno, self._function_depth == 0))
            self.found.append((base, node.lineno, self._function_depth == 0))

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            self._nested(node)  # never runs: like a function body
        else:
            self.generic_visit(node)


def import_graph(modules: dict[str, Path]) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(selfsup module it imports, line, at module level?)]."""
    graph = {}
    for name, path in modules.items():
        collector = _ImportCollector(name, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        edges, seen = [], set()
        for target, line, top in collector.found:
            if target in modules and target != name and (target, top) not in seen:
                seen.add((target, top))
                edges.append((target, line, top))
        graph[name] = edges
    return graph


def module_level_imports(graph) -> dict[str, list[tuple[str, int, bool]]]:
    return {m: [e for e in edges if e[2]] for m, edges in graph.items()}


def external_module_level_imports(modules: dict[str, Path]) -> dict[str, list[str]]:
    found = {}
    for name, path in modules.items():
        collector = _ImportCollector(name, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        found[name] = sorted({t.split(".")[0] for t, _, top in collector.found if top and not t.startswith("selfsup")})
    return found


def layer_violations(graph) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for module, edges in graph.items():
        for target, line, _ in edges:
            if rank.get(layer_of(target), len(LAYERS)) > rank.get(layer_of(module), len(LAYERS)):
                bad.append(f"{module} (line {line}, layer {layer_of(module)}) imports {target} "
                           f"(layer {layer_of(target)}, above it)")
    return bad


def cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(all_modules())


def test_every_package_has_a_layer():
    tops = {layer_of(m) for m in all_modules()}
    assert tops <= set(LAYERS), f"place {sorted(tops - set(LAYERS))} in LAYERS (tests/test_architecture.py)"


def test_each_layer_imports_only_its_own_or_lower_layers(graph):
    assert layer_violations(graph) == []


def test_no_import_cycles_between_modules(graph):
    assert cycles(module_level_imports(graph)) == []


def test_the_core_layer_imports_nothing_heavy_at_module_level():
    modules = {m: p for m, p in all_modules().items() if layer_of(m) in LIGHT_LAYERS}
    heavy = {m: [x for x in found if x in HEAVY] for m, found in external_module_level_imports(modules).items()}
    assert {m: x for m, x in heavy.items() if x} == {}


def test_the_checks_catch_a_bad_import_and_a_cycle(tmp_path):
    """The checks above can fail: a lower layer importing the launcher, and a two-module cycle."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stream.py").write_text("def f():\n    from selfsup.launch.config import compose\n")
    (tmp_path / "ssl").mkdir()
    (tmp_path / "ssl" / "a.py").write_text("from selfsup.ssl import b\n")
    (tmp_path / "ssl" / "b.py").write_text("import selfsup.ssl.a\n")
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "config.py").write_text("")
    files = {f"selfsup.{p.parent.name}.{p.stem}": p for p in tmp_path.glob("*/*.py")}
    fake = import_graph(files)
    assert [v.split(" ")[0] for v in layer_violations(fake)] == ["selfsup.data.stream"]
    assert cycles(module_level_imports(fake)) == [["selfsup.ssl.a", "selfsup.ssl.b"]]
