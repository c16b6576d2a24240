"""csm's modules import one another without a cycle, counting imports inside functions.

A cycle hidden in a function body is still a knot: the two modules cannot be read, tested or
moved apart. The graph is read from the source with `ast`: every `import csm.x`, `from csm.x
import y` and relative import, at module level or in any function, is an edge from the
importing module to the module it needs (see `_imported`). A package's `__init__` counts as the
package. Python loads a package before its submodules, but that implicit step is no edge: a
package whose `__init__` re-exports its submodules' names is no knot, while a submodule that
reads a name its package's `__init__` defines is one.

The networks are also checked to import no loading or policy code.
"""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src" / "csm"


def _module_name(path: Path) -> str:
    parts = ["csm", *path.relative_to(SOURCE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The csm modules that one import statement needs.

    `import a.b.c` needs a.b.c; `from a.b import c` needs the submodule a.b.c when there is
    one, else a.b, whose `__init__` must define c (that is what makes `csm.watermark` and a
    module of its own that reads a name from it a knot).
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each csm module -> the csm modules it imports anywhere in its source."""
    modules = _modules()
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _imported(node, module, path.name == "__init__.py", known)
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "csm.model" in graph["csm.generator"]
    assert "csm.finetune.trainer" in graph["csm.cli.finetune"]  # imported inside a function


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    graph = import_graph()
    knots = cycles(graph)
    described = [
        " <-> ".join(component)
        + ": "
        + "; ".join(
            f"{source} -> {target}" for source in component for target in sorted(graph[source] & set(component))
        )
        for component in knots
    ]
    assert not knots, "import cycles among csm's modules:\n" + "\n".join(described)


# The networks: plain modules and tensor functions. Loading (hub, files, layouts, adapters,
# quantized folders), the inference form and generation policy sit above them.
NETWORKS = [
    "csm.llama",
    "csm.model",
    "csm.mimi.config",
    "csm.mimi.conv",
    "csm.mimi.seanet",
    "csm.mimi.transformer",
    "csm.mimi.quantizer",
    "csm.watermark.networks",
]
ABOVE_THE_NETWORKS = (
    "csm.hub", "csm.weights", "csm.checkpoints", "csm.layouts", "csm.adapters", "csm.loading", "csm.inference",
    "csm.compiled", "csm.quantize", "csm.quantized_checkpoint", "csm.mimi.loading", "csm.watermark.checkpoint",
    "csm.generator", "csm.batching", "csm.engine", "csm.cli", "csm.server", "csm.finetune",
)  # fmt: skip


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_networks_import_no_loading_or_policy_code():
    graph = import_graph()
    for network in NETWORKS:
        above = sorted(name for name in _reachable(graph, network) if name.startswith(ABOVE_THE_NETWORKS))
        assert not above, f"{network} imports {', '.join(above)}"
