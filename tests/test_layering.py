"""The package's layers hold: imports point down the declared order, no two modules import each other (also
through a chain), library code never imports a command line. Parsed from the source, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinymusician"

# Bottom -> top (../shared/STYLE.md): a module imports from its own layer's package or a lower one.
LAYERS = (
    "config",
    "machine",
    "shipped",
    "models",
    "data",
    "distill",
    "quant",
    "metrics",
    "onnx",
    "zoo",
    "world",
    "callbacks",
    "training",
    "results",
)
CLIS = (
    "train",
    "evaluate",
    "generate",
    "quantize",
    "export",
    "prepare",
    "report",
    "cache_teacher",
    "plan_memory",
)  # top-level entry points
# An old command name kept working; it may import its CLI, only under `if __name__ == "__main__":`.
SHIMS = {
    "tinymusician.data.prepare": "tinymusician.prepare",
    "tinymusician.distill.cache_teacher": "tinymusician.cache_teacher",
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_sources(root: Path = PACKAGE) -> dict[str, str]:
    return {module_name(path, root): path.read_text(encoding="utf-8") for path in sorted(root.rglob("*.py"))}


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str, source: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """``(imported tinymusician module, line, under if __name__ == "__main__")`` for every import in ``source``."""
    tree = ast.parse(source)
    main_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            main_lines |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, is_package, node)
            # `from tinymusician.distill import divergences` imports the submodule when there is one
            names = [f"{target}.{alias.name}" for alias in node.names] + [target]
        else:
            continue
        for name in names:
            if name == "tinymusician" or name.startswith("tinymusician."):
                found.append((name, node.lineno, node.lineno in main_lines))
    return found


def layer_of(module: str) -> tuple[int, str]:
    """(rank, layer name); CLIs rank above every library layer."""
    top = module.split(".")[1] if "." in module else ""
    if top in LAYERS:
        return LAYERS.index(top), top
    if top in CLIS:
        return len(LAYERS), "cli"
    raise AssertionError(
        f"{module}: not in a declared layer; add its package to LAYERS or CLIS in {__file__}"
    )


def import_graph(sources: dict[str, str]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line}, only edges to modules that exist (a name imported from a module is not
    a module); shim imports under ``__main__`` are left out after they are checked against :data:`SHIMS`."""
    graph: dict[str, dict[str, int]] = {}
    packages = {name for name, _ in sources.items() if (PACKAGE.parent / name.replace(".", "/")).is_dir()}
    for module, source in sources.items():
        edges: dict[str, int] = {}
        for name, line, under_main in imports(module, source, module in packages):
            if name not in sources or name == module:
                continue
            if under_main and SHIMS.get(module) == name:
                continue
            edges.setdefault(name, line)
        graph[module] = edges
    return graph


def layering_violations(sources: dict[str, str]) -> list[str]:
    problems = []
    for module, edges in import_graph(sources).items():
        if module == "tinymusician":
            continue
        rank, layer = layer_of(module)
        for target, line in edges.items():
            if target == "tinymusician":
                continue
            target_rank, target_layer = layer_of(target)
            if target_layer == "cli":
                problems.append(
                    f"{module}:{line} imports the command line {target} (move what it needs to a library)"
                )
            elif target_rank > rank or (target_rank == rank and target_layer != layer):
                problems.append(
                    f"{module}:{line} ({layer}) imports {target} ({target_layer}): an upward import"
                )
    return problems


def import_cycles(sources: dict[str, str]) -> list[list[str]]:
    """Every cycle found by depth-first search over the import graph (each reported once, from its first module)."""
    graph = import_graph(sources)
    cycles, state = [], {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_imports_point_down_the_declared_layers():
    assert layering_violations(read_sources()) == []


def test_no_module_imports_another_that_imports_it_back():
    assert import_cycles(read_sources()) == []


def test_every_module_belongs_to_a_declared_layer():
    for module in read_sources():
        if module != "tinymusician":
            layer_of(module)


def test_the_checks_fail_on_an_upward_import_a_cli_import_and_a_cycle():
    sources = read_sources()
    lazy_upward = sources["tinymusician.models.delay"] + (
        "\n\ndef helper():\n    from tinymusician.distill.losses import build_loss\n\n    return build_loss\n"
    )
    problems = layering_violations({**sources, "tinymusician.models.delay": lazy_upward})
    assert any("tinymusician.models.delay" in p and "tinymusician.distill.losses" in p for p in problems), (
        problems
    )

    cli = sources["tinymusician.metrics.fad"] + "\nfrom tinymusician.generate import main\n"
    problems = layering_violations({**sources, "tinymusician.metrics.fad": cli})
    assert any("imports the command line tinymusician.generate" in p for p in problems), problems

    shim_outside_main = sources["tinymusician.data.prepare"] + "\nfrom tinymusician.prepare import main\n"
    assert layering_violations({**sources, "tinymusician.data.prepare": shim_outside_main})

    cycle = sources["tinymusician.models.delay"] + "\nfrom tinymusician.models import musicgen\n"
    found = import_cycles({**sources, "tinymusician.models.delay": cycle})
    assert any({"tinymusician.models.delay", "tinymusician.models.musicgen"} <= set(c) for c in found), found


def test_relative_imports_are_resolved():
    source = "from .musicgen import load_musicgen\nfrom ..distill import losses\n"
    found = {name for name, _, _ in imports("tinymusician.models.delay", source, is_package=False)}
    assert "tinymusician.models.musicgen" in found
    assert "tinymusician.distill.losses" in found
