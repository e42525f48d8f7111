"""The arrows of the architecture, read from the source: app.py -> ui/, api/ -> studio/ -> quant/ -> engine/, never
back, and nothing imports benchmarks/. Every `import` and `from ... import` of the project's modules counts,
module-level and inside functions alike (a package counts as its __init__.py; `from engine import loader` is an
edge to engine.loader, not to engine), and the whole graph has no cycle. A function-level import of a project
module is allowed only with a `# lazy: <why>` comment (a heavy import kept off a fast path such as `--help`), never
to dodge a cycle: the graph with those edges must still be acyclic. engine/ and studio/ never import gradio or
fastapi."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "quant", "studio", "ui", "api", "benchmarks")
# higher may import lower; same layer only within one package; benchmarks/ is imported by nobody
LAYER = {"engine": 0, "quant": 1, "studio": 2, "ui": 3, "api": 3, "app": 4, "benchmarks": 5}
WEB = ("gradio", "fastapi", "starlette", "uvicorn")


def project_modules() -> dict[str, Path]:
    modules = {"app": ROOT / "app.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_nodes(path: Path):
    """(node, inside a function?) for every import statement of the file."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, id(node) in in_function


def imported_names(module: str, path: Path, node, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = node.module or ""
    if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        graph[module] = {n for node, _ in import_nodes(path) for n in imported_names(module, path, node, modules)
                         if n in modules and n != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def top(module: str) -> str:
    return module.split(".")[0]


def arrow_allowed(src: str, dst: str) -> bool:
    a, b = top(src), top(dst)
    if b == "benchmarks":
        return a == "benchmarks"
    return a == b or LAYER[a] > LAYER[b]


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert len(graph) > 60
    assert "engine.kernels.ops" in graph["engine.models.llama"]
    assert "engine.loader" in graph["engine.llm_engine"]  # `from engine import loader`
    assert "engine.kernels.triton_ops" in graph["engine.kernels.ops"]  # a function-level import counts too
    assert "studio.compare" in graph["ui.compare_tab"] and "studio.manager" in graph["app"]


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_arrow_rule_itself():
    assert arrow_allowed("ui.quantize_tab", "studio.jobs") and arrow_allowed("studio.compare", "quant.api")
    assert not arrow_allowed("engine.loader", "studio.quality") and not arrow_allowed("quant.api", "studio.jobs")
    assert not arrow_allowed("ui.compare_tab", "benchmarks.common") and not arrow_allowed("ui.common", "api.errors")
    assert arrow_allowed("benchmarks.bench_serving", "studio.engine_args")


def test_no_import_cycles_anywhere():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_arrows_point_down_only():
    wrong = [f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in sorted(dsts)
             if not arrow_allowed(src, dst)]
    assert not wrong, "imports against the arrows app -> ui, api -> studio -> quant -> engine:\n" + "\n".join(wrong)


def test_engine_and_studio_never_import_the_web_stack():
    for module, path in project_modules().items():
        if top(module) not in ("engine", "studio"):
            continue
        for node, _ in import_nodes(path):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if not node.level else [])
            for name in names:
                assert name.split(".")[0] not in WEB, f"{module} imports {name}"


def test_function_level_project_imports_say_why():
    modules = project_modules()
    unexplained = []
    for module, path in modules.items():
        if top(module) == "benchmarks":  # scripts: they import what a run needs when it runs; nothing imports them
            continue
        lines = path.read_text().splitlines()
        for node, in_function in import_nodes(path):
            if not in_function or not any(n in modules or top(n) in LAYER
                                          for n in imported_names(module, path, node, modules)):
                continue
            text = " ".join(lines[node.lineno - 2: node.end_lineno])  # the line above and the statement
            if "# lazy:" not in text:
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unexplained, ("function-level imports of project modules without a `# lazy: <why>` comment "
                             "(import at the top, or say why it must wait):\n" + "\n".join(unexplained))
