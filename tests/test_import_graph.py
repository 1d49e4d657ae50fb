"""The library's import graph (issue 42): no import circle, and no module importing one above it (the generic data
contract knows no source; the Hub layout helper knows no pipeline). Read from the source with `ast`, every import
counted (module level or inside a function)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ambiseg_diffusers"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}; `from . import x` counts as importing `x` (a package `__init__`
    importing its children is how a package exposes them, not an arrow back)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                stem = (base + "." + node.module if node.module else base) if node.level else node.module
                submodules = [f"{stem}.{alias.name}" for alias in node.names if f"{stem}.{alias.name}" in modules]
                targets.update(submodules or ([stem] if stem in modules else []))
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in modules)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary circle, each listed once from its smallest module name."""
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append(path)
            elif nxt not in path and nxt > start:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_the_library_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20 and "ambiseg_diffusers.data" in graph["ambiseg_diffusers.lidc"]  # the graph is read
    assert cycles(graph) == []


def test_no_module_imports_one_above_it():
    graph = import_graph()
    assert "ambiseg_diffusers.lidc" not in graph["ambiseg_diffusers.data"]  # the contract knows no source
    assert not {m for m in graph["ambiseg_diffusers.pipelines.custom_code"] if ".pipelines.pipeline_" in m}
    assert not any(m.startswith("ambiseg_diffusers.pipelines") for m in graph["ambiseg_diffusers.data"])
    for name, targets in graph.items():  # only the package's `__init__` sits above the rest
        assert "ambiseg_diffusers" not in targets, f"{name} imports the package's __init__"
        if name.startswith("ambiseg_diffusers.models"):
            assert not any(t.startswith("ambiseg_diffusers.pipelines") for t in targets), name


def test_a_circle_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
