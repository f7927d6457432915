"""The package's import graph: training never imports analysis, and no module imports itself
back through others (read from the sources with ast, nothing imported)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxmem"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: jaxmem modules it imports (anywhere in it, functions included)}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_training_never_imports_analysis():
    arrows = [(a, b) for a, targets in imports().items() for b in targets
              if a.startswith("jaxmem.train") and b.startswith("jaxmem.analysis")]
    assert not arrows


def test_the_run_directory_imports_neither_training_nor_analysis():
    arrows = [(a, b) for a, targets in imports().items() for b in targets
              if a.startswith("jaxmem.rundir") and b.startswith(("jaxmem.train",
                                                                 "jaxmem.analysis"))]
    assert not arrows


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_run_directory_depends_on_neither_training_nor_analysis_through_other_modules():
    """Not even through a top-level module: the settings (config.py), which merging reads,
    parse their sizes with jaxmem.sizes, not with training's host memory code."""
    graph = imports()
    for module in [m for m in graph if m.startswith("jaxmem.rundir")] + ["jaxmem.config"]:
        upward = {m for m in reachable(graph, module)
                  if m.startswith(("jaxmem.train", "jaxmem.analysis"))}
        assert not upward, (module, upward)


def test_no_import_circle():
    graph = imports()
    # a package's __init__ re-exporting its own modules is not a circle
    edges = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph.items()}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in edges[node]:
            assert state.get(nxt) != "open", " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [node])
