"""The package's layering: shared layers never import the jobs, and no module imports in a cycle.

Data flows one way: the jobs (train, cache, export, calibrate, evaluate, demos, tradeoff, cli) use
the shared layers (options, config, loading, runs, model, images, sources, preprocess, fsutil, ...),
which use nothing of the jobs. A new import against that direction fails here.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "latentvae"
JOBS = {"train", "cache", "export", "evaluate", "demos", "tradeoff", "probe", "cli", "__main__"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def _imports(path: Path) -> set[str]:
    """latentvae modules `path` imports (top level and inside functions), as dotted names."""
    name = _module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                out |= {f"{target}.{a.name}".strip(".") for a in node.names} | {target}
            elif node.module and node.module.startswith("latentvae"):
                out.add(node.module.removeprefix("latentvae").strip("."))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("latentvae").strip(".") for a in node.names if a.name.startswith("latentvae")}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_shared_layers_never_import_a_job():
    for module, deps in _graph().items():
        if module.split(".")[0] in JOBS:
            continue
        bad = sorted(d for d in deps if d.split(".")[0] in JOBS)
        assert not bad, f"latentvae.{module} (a shared layer) imports the job(s) {bad}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if not state.get(d):
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [m])


def test_no_module_is_named_like_the_standard_library():
    import sys
    names = {p.stem for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)


def test_no_module_sprawls():
    """One concept per module, readable at once: none over ~450 lines (split by concept, not by count)."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 460}
    assert not long, f"modules over 460 lines: {long}"
