"""The import graph of the package: lines per module, the number of edges, and any import cycles.

Reads (never imports) every module of ``lalic_codec/`` and of ``kernels/``, ``formats/`` and
``models/`` (installed as ``lalic_codec.kernels``, ``.formats``, ``.models``) and follows every
``import`` statement between them, the ones inside functions too (a lazy import hides a cycle from
Python, not from a reader). ``if TYPE_CHECKING:`` blocks are left out: they never run. An edge
goes to the module an import names; the package ``__init__`` files that Python runs on the way
are not counted as edges of their own.

    python benchmarks/import_graph.py            # lines per module, edges, cycles
    python benchmarks/import_graph.py --quiet    # edges and cycles only

Exits with status 1 when there is a cycle; ``tests/test_import_graph.py`` runs the same check.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: where each package's files are (pyproject.toml's package-dir)
PACKAGE_DIRS = {
    "lalic_codec": ROOT / "lalic_codec",
    "lalic_codec.kernels": ROOT / "kernels",
    "lalic_codec.formats": ROOT / "formats",
    "lalic_codec.models": ROOT / "models",
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                continue
            name = ".".join([package, *parts])
            if name in found:  # lalic_codec/kernels would shadow kernels/: not the case, but say so
                raise SystemExit(f"two files for {name}: {found[name]} and {path}")
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, the ones under ``if TYPE_CHECKING:`` excepted."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that the module ``name`` (file ``path``) imports."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            names: list[str] = []
        else:
            if node.level:
                base_parts = here.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            bases = [base]
            names = [alias.name for alias in node.names]
        for base in bases:
            # "from a.b import c" where a.b.c is a module: that module
            hits = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            if hits:
                targets.update(hits)
                if len(hits) == len(names) or base not in known:
                    continue  # else some names are attributes of base itself: base counts too
            parts = base.split(".")  # "import a.b.c" or names of base: the deepest known module
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts:
                targets.add(".".join(parts))
    targets.discard(name)
    return targets


def graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    mods = modules()
    known = set(mods)
    return mods, {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def main(argv: list[str]) -> int:
    mods, edges = graph()
    if "--quiet" not in argv:
        total = 0
        for name, path in sorted(mods.items()):
            n = len(path.read_text(encoding="utf-8").splitlines())
            total += n
            print(f"{n:6d}  {name}  ({path.relative_to(ROOT)})")
        print(f"{total:6d}  in {len(mods)} modules")
    print(f"import graph: {len(mods)} modules, {sum(len(t) for t in edges.values())} edges")
    found = cycles(edges)
    for component in found:
        print("cycle: " + " <-> ".join(component))
        for v in component:
            inside = sorted(edges[v] & set(component))
            print(f"    {v} imports {', '.join(inside)}")
    if not found:
        print("no cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
