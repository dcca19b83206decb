"""The import graph of the project's packages: its circles, and the longest modules.

    python scripts/import_graph.py            # the circles (0 expected), the 5 longest modules, and the
                                              # imports of project modules inside functions

An edge A -> B is any import of B in A (at the top or inside a function: both run). Importing
``a.b.c`` from outside package ``a.b`` also runs ``a/__init__`` and ``a/b/__init__``, so those are
edges too; a package's ``__init__`` importing its own modules (a registry such as the stage
mapping) is not a circle. ``tests/test_imports.py`` fails on any circle and on a module over
:data:`LONG` lines whose docstring does not say why it is long ("Long because ...").
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("compressor", "rundir", "export", "deploy", "pipeline")
LONG = 500


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join(here + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (with the package ``__init__`` files that run)."""
    mods = modules(root)
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported(node, name, path.name == "__init__.py"):
                if target in mods:
                    deps.add(target)
                parts = target.split(".")
                for i in range(1, len(parts)):  # the package __init__ files the import runs
                    parent = ".".join(parts[:i])
                    if parent in mods and not (name == parent or name.startswith(parent + ".")):
                        deps.add(parent)
        deps.discard(name)
        edges[name] = deps
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def lengths(root: Path) -> list[tuple[int, str]]:
    """(lines, module) for every module, longest first."""
    return sorted(((len(p.read_text().splitlines()), m) for m, p in modules(root).items()), reverse=True)


def function_imports(root: Path) -> list[tuple[str, int, str, str]]:
    """Every import of a project module inside a function: (module, line, imported, reason).

    ``reason`` is the comment on the import's line or on the line above it ("" when none): a lazy
    import of the project's own code must say why (an optional or heavy dependency it pulls in, or
    a layering rule that forbids the top-level import).
    """
    mods = modules(root)
    out = []
    for name, path in mods.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                targets = _imported(node, name, path.name == "__init__.py")
                if not any(t.split(".")[0] in PACKAGES for t in targets):
                    continue
                reason = ""
                for text in (lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""):
                    if "#" in text:
                        reason = text.split("#", 1)[1].strip()
                        break
                out.append((name, node.lineno, targets[0], reason))
    return sorted(set(out))  # a nested function's imports are walked with its outer function's too


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    found = cycles(graph(root))
    print(f"{len(found)} circles of imports")
    for group in found:
        print("  " + " <-> ".join(group))
    print("longest modules:")
    for n, name in lengths(root)[:5]:
        print(f"  {n:5d}  {name}")
    lazy = function_imports(root)
    print(
        f"{len(lazy)} imports of project modules inside functions, "
        f"{sum(1 for x in lazy if x[3])} with a reason"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
