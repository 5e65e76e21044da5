"""The package's floors: polyak's own imports run one way, and the weight math sits lowest.

The graph is read from the source with ``ast``: every ``import polyak...`` and
``from polyak... import ...`` (and relative imports), at module level and inside
functions alike, since a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import polyak

PACKAGE = Path(polyak.__file__).parent
#: The weight math: numpy only, it may import nothing of polyak but its errors and
#: the shared argument checks, which stand on the errors alone.
WEIGHT_MATH = "polyak.weights"
WEIGHT_MATH_MAY_IMPORT = {"polyak.errors", "polyak.checks"}
GROUND_FLOOR = {"polyak.errors": set(), "polyak.checks": {"polyak.errors"}}


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The polyak modules that the code ``source`` of module ``name`` imports, anywhere in it."""

    def module_of(dotted: str) -> str | None:
        parts = dotted.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                # ``from polyak.cli import sweep`` imports the module polyak.cli.sweep.
                submodule = f"{origin}.{alias.name}"
                targets.add(submodule if submodule in modules else origin)
    return {
        found
        for target in targets
        if target.split(".")[0] == "polyak"
        and (found := module_of(target)) is not None
        and found != name
    }


def import_graph() -> dict[str, set[str]]:
    """Module -> the polyak modules it imports (a package counts as its ``__init__``)."""
    modules = module_names()
    return {
        name: imported_modules(path.read_text(), name, path.name == "__init__.py", set(modules))
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for target in sorted(graph[module]):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done and (cycle := visit(target)):
                return cycle
        on_path.discard(module)
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    # The reader itself: a lazy import inside a function is an edge too, and so are
    # relative imports and submodules named in a from-import.
    source = (
        "import numpy\n"
        "from polyak.errors import SchemeError\n"
        "from . import engine\n"
        "def later():\n"
        "    from polyak.weights.schemes import parse_scheme\n"
        "    import polyak.formats.safetensors\n"
    )
    modules = {
        "polyak",
        "polyak.errors",
        "polyak.engine",
        "polyak.weights",
        "polyak.weights.schemes",
        "polyak.formats",
        "polyak.formats.safetensors",
    }
    assert imported_modules(source, "polyak.sweep", False, modules) == {
        "polyak.errors",
        "polyak.engine",
        "polyak.weights.schemes",
        "polyak.formats.safetensors",
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_polyak_imports_itself_without_a_loop():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle or [])


def test_the_weight_math_imports_nothing_above_it():
    graph = import_graph()
    weight_math = [n for n in graph if n == WEIGHT_MATH or n.startswith(WEIGHT_MATH + ".")]
    assert len(weight_math) >= 3  # the package, its schemes and its power profiles
    for module in weight_math:
        above = {
            target
            for target in graph[module]
            if target not in WEIGHT_MATH_MAY_IMPORT
            and not (target == WEIGHT_MATH or target.startswith(WEIGHT_MATH + "."))
        }
        assert above == set(), f"{module} imports {sorted(above)} from above the weight math"


def test_the_errors_and_the_argument_checks_stand_on_nothing_else():
    graph = import_graph()
    for module, allowed in GROUND_FLOOR.items():
        assert graph[module] <= allowed, f"{module} imports {sorted(graph[module] - allowed)}"


#: The only polyak modules that may be imported inside a function: the adapters, which
#: import their framework (keras, torch, lightning) when imported, so a command that does
#: not need the framework does not pay its start-up.
LAZY_ALLOWED = ("polyak.keras", "polyak.torch", "polyak.lightning")


def test_polyak_imports_itself_at_the_top_of_each_file_but_the_framework_adapters():
    modules = module_names()
    late = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                found = imported_modules(
                    ast.unparse(node), name, path.name == "__init__.py", set(modules)
                )
                late += [
                    f"{name}:{node.lineno} imports {target}"
                    for target in sorted(found)
                    if not target.startswith(LAZY_ALLOWED)
                ]
    assert late == []
