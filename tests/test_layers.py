"""The package's layers import downwards only, lazy imports included, and nothing imports in a cycle.

Read from the source (every ``import`` statement, also those inside functions), not from
``sys.modules``, so that an import the tests never trigger still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "uhc_fast"
KERNELS = ROOT / "kernels"  # installed as uhc_fast.kernels

# lowest first; a module may import its own layer and the ones below (docs/architecture.md)
LAYERS = (
    ("registries", ("methods", "constants", "errors")),
    ("problem and inputs", ("problem", "inputs", "topk_inputs", "options", "linalg")),
    ("reference", ("reference",)),
    ("backends", ("backends",)),
    ("entry points", ("api", "topk", "loss", "stream", "cli", "commands", "demo", "__main__", "__init__")),
)


def module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ("uhc_fast", "kernels", *path.relative_to(KERNELS).with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in (*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # uhc_fast.inputs.Batch -> uhc_fast.inputs
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top == "kernels":
        return -1  # the kernels import nothing from uhc_fast (checked below)
    return next(rank for rank, (_, tops) in enumerate(LAYERS) if top in tops)


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)  # StopIteration names a module no layer holds


def test_imports_go_downwards():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if target == "uhc_fast" and layer(name) == len(LAYERS) - 1:
                continue  # entry points may use the public names
            if layer(target) > layer(name):
                wrong.append(f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    assert not wrong, "\n".join(wrong)


def test_kernels_and_registries_import_nothing_from_the_package():
    for name, targets in graph().items():
        if name.startswith("uhc_fast.kernels") or layer(name) == 0:
            outside = {t for t in targets if not t.startswith("uhc_fast.kernels")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(edges.get(name, ())):
            if target == "uhc_fast" or target.endswith("__main__"):
                continue  # the package's __init__ re-exports: importing it from inside is the parent, not a cycle
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(edges):
        if state.get(name) is None:
            visit(name)
