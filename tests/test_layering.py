"""The package's import layering (DESIGN.md): no import cycles between modules, and no module
importing a layer above its own. Read from the source, nothing is imported."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxprune"

# The analysis core, then what builds on it; a layer may import only layers listed before it.
CORE = {
    "trace",
    "graph",
    "interpret",
    "gates",
    "surgery",
    "program",
    "widths",
    "rebuild",
    "cost",
    "tree_paths",
    "runtime",
    "ops",
}
APPLICATIONS = {"methods", "commands", "cli", "demo", "inspect"}
FORBIDDEN = {
    **{
        part: APPLICATIONS | {"models", "train", "checkpoint", "data", "criteria", "run"}
        for part in CORE
    },
    "criteria": APPLICATIONS,
    "models": APPLICATIONS | {"criteria", "train", "checkpoint"},
    "data": APPLICATIONS | {"models", "criteria", "train"},
    "methods": APPLICATIONS - {"methods"},
    "inspect": {"commands", "cli", "demo"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("jaxprune", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def imports(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package re-exporting its own children,
    and the top-level namespace, are not edges)."""
    edges: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target not in found and "." in target:
                    target = target.rsplit(".", 1)[0]
                own_child = target.startswith(name + ".")
                if target in found and target not in (name, "jaxprune") and not own_child:
                    edges[name].add(target)
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_import_cycles():
    edges = imports(modules())
    # Raises CycleError naming the cycle.
    list(graphlib.TopologicalSorter(edges).static_order())


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{a} -> {b}"
        for a, targets in imports(modules()).items()
        for b in sorted(targets)
        if layer(b) in FORBIDDEN.get(layer(a), set())
    ]
    assert not upward, "\n".join(upward)


def test_the_check_sees_imports():
    edges = imports(modules())
    assert "jaxprune.graph" in edges["jaxprune.surgery"]
    assert layer("jaxprune.methods.oneshot") == "methods"
