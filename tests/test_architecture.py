"""The package's structure: floors of imports, no cycles, no private names across modules, no huge files.

The floors, from the top: cli; bench and reproduce; eval and train (siblings: neither imports the
other); models; nn; data and ops (siblings); reference; options (the argument checks every layer
shares); kernels (medvl.kernels, which imports nothing of medvl). A module may import its own package
and any lower floor, never a higher one, and never a sibling of its floor; a name that starts with "_"
is never imported from another package.
"""

from __future__ import annotations

import ast
import os
from typing import Iterator, List, Tuple

from tests.utils import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "medvl")
KERNELS = os.path.join(REPO_ROOT, "kernels")
# (room, floor): a room is a subpackage or top-level module of medvl; higher floors import lower ones.
FLOORS = {
    "cli": 7, "__main__": 8,
    "bench": 6, "reproduce": 6,
    "eval": 5, "train": 5,
    "models": 4,
    "nn": 3,
    "data": 2, "ops": 2,
    "reference": 1,
    # Below reference, which checks its arguments with it too; above kernels, which imports nothing.
    "options": 0.5,
    "kernels": 0,
    # The package's face (imports what it exports), its report, and the compiled core.
    "__init__": 9, "_info": 6, "_C": 0,
}
# Private by convention of their own, and meant to be imported: the compiled core.
PUBLIC_PRIVATE = {"_C"}
MAX_LINES = 800


def modules() -> Iterator[Tuple[str, str]]:
    """(dotted name, path) of every Python file of medvl, with kernels/ as medvl.kernels."""
    for root, base in ((PACKAGE, "medvl"), (KERNELS, "medvl.kernels")):
        for folder, _, files in os.walk(root):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, root)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    yield ".".join([base] + parts), path


def room(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def resolve(module: str, names: List[str]) -> List[Tuple[str, List[str]]]:
    """`from medvl import x` takes the module medvl.x when x is one: one (module, names) per target."""
    if module != "medvl":
        return [(module, names)]
    return [(f"medvl.{name}", []) for name in names]


def imports(dotted: str, path: str) -> List[Tuple[str, List[str], int]]:
    """(imported module, names taken from it, line) of every medvl import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = dotted if path.endswith("__init__.py") else dotted.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("medvl")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.startswith("medvl"):
                found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def problems_of(here: str, module: str, names: List[str], where: str) -> List[str]:
    there = room(module)
    if there == here or here == "__init__":
        return []
    if here == "kernels":
        return [f"{where}: medvl.kernels imports nothing of medvl"]
    found = []
    if FLOORS[there] > FLOORS[here]:
        found.append(f"{where}: {here} (floor {FLOORS[here]}) imports {there} (floor {FLOORS[there]})")
    elif FLOORS[there] == FLOORS[here]:
        found.append(f"{where}: {here} and {there} are siblings of one floor")
    found += [f"{where}: takes the private name {name}" for name in names
              if name.startswith("_") and not name.startswith("__") and name not in PUBLIC_PRIVATE]
    last = module.rsplit(".", 1)[-1]
    if last.startswith("_") and last not in PUBLIC_PRIVATE and not (here == "cli" and there == "_info"):
        found.append(f"{where}: imports a private module of another package")
    return found


def test_imports_go_down_the_floors_only():
    problems = []
    for dotted, path in modules():
        for imported, imported_names, line in imports(dotted, path):
            for module, names in resolve(imported, imported_names):
                where = f"{os.path.relpath(path, REPO_ROOT)}:{line} imports {module}"
                problems += problems_of(room(dotted), module, names, where)
    assert not problems, "\n".join(problems)


def test_no_python_file_is_huge():
    big = [f"{os.path.relpath(path, REPO_ROOT)}: {n} lines" for _, path in modules()
           if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES]
    assert not big, "\n".join(big)
