"""The project's module import graph, read with `ast` (nothing is imported), and its cycles.

Owns: finding the modules of the project's packages (`PACKAGES`: name -> directory), every
import statement in them (top level, in functions, under ``if TYPE_CHECKING:``: all count,
as each is a dependency of one module on another), resolving relative imports, the edges
between project modules (``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``), the cycles among them (one shortest cycle per strongly connected
component), and the layering checks (which packages may not import which).

Does not own: the test that asserts on these (tests/test_import_graph.py).

Run it to print the cycles and layering violations (exit status 1 when there are any)::

    python -m tests.support.import_graph            # all of PACKAGES
    python -m tests.support.import_graph trainer    # only cycles inside the named packages
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Top-level import name -> its source directory (relative to the checkout).
PACKAGES: dict[str, str] = {
    "trainer": "trainer",
    "thor_engine": "thor_engine",
    "server": "server",
    "thor_sandbox": "sandbox_image/thor_sandbox",
}

#: Package -> the project packages it must not import (server -> thor_engine -> thor_sandbox; trainer -> thor_engine).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "thor_engine": ("server", "trainer"),
    "server": ("trainer",),
    "thor_sandbox": ("thor_engine", "server", "trainer"),
}


@dataclass(frozen=True)
class Import:
    """One import of module *source*: the dotted name it imports, and where."""

    source: str
    target: str  # absolute dotted name: a module, or ``module.attribute`` for ``from module import attribute``
    path: Path
    line: int


def module_files(packages: dict[str, str] = PACKAGES, root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of *packages* (``pkg/__init__.py`` is ``pkg``)."""
    found: dict[str, Path] = {}
    for name, rel in packages.items():
        base = root / rel
        if not (base / "__init__.py").is_file():
            raise FileNotFoundError(f"{base}/__init__.py: package {name!r} not found; fix PACKAGES in {__file__}")
        for f in sorted(base.rglob("*.py")):
            parts = f.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = f
    return found


def _imports(module: str, path: Path) -> Iterator[Import]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                if node.level - 1 >= len(anchor):
                    raise ValueError(f"{path}:{node.lineno}: relative import goes above the top-level package")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                yield Import(module, base if alias.name == "*" else f"{base}.{alias.name}", path, node.lineno)


def all_imports(files: dict[str, Path]) -> list[Import]:
    return [imp for module, path in files.items() for imp in _imports(module, path)]


def _resolve(target: str, modules: Iterable[str]) -> str | None:
    """The project module *target* names: itself, else its longest dotted prefix that is one (None: not ours)."""
    known = set(modules)
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (self-edges dropped)."""
    edges: dict[str, set[str]] = {m: set() for m in files}
    for imp in all_imports(files):
        dest = _resolve(imp.target, files)
        if dest is not None and dest != imp.source:
            edges[imp.source].add(dest)
    return edges


def _components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                out.append(sorted(comp))
    return sorted(out)


def _shortest_cycle(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start inside *members* (breadth first)."""
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(edges[node] & members):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in a strongly connected component but no cycle returns to it")


def cycles(edges: dict[str, set[str]], within: Iterable[str] | None = None) -> list[list[str]]:
    """One shortest cycle (``[a, b, ..., a]``) per import circle; *within*: only circles of these packages."""
    tops = set(within) if within is not None else None
    found = []
    for comp in _components(edges):
        if len(comp) < 2 or (tops is not None and comp[0].split(".")[0] not in tops):
            continue
        found.append(_shortest_cycle(comp[0], set(comp), edges))
    return found


def layering_violations(
    files: dict[str, Path], forbidden: dict[str, tuple[str, ...]] = FORBIDDEN, root: Path = ROOT
) -> list[str]:
    """``file:line: a imports b`` for each import that crosses a forbidden layer (any import statement counts)."""
    bad = []
    for imp in all_imports(files):
        top, target_top = imp.source.split(".")[0], imp.target.split(".")[0]
        if target_top in forbidden.get(top, ()):
            bad.append(f"{imp.path.relative_to(root)}:{imp.line}: {imp.source} imports {imp.target}")
    return bad


def describe(cycle: list[str]) -> str:
    return " -> ".join(cycle)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    unknown = [a for a in args if a not in PACKAGES]
    if unknown:
        print(f"unknown package(s) {unknown}; choose from {sorted(PACKAGES)}", file=sys.stderr)
        return 2
    files = module_files()
    found = cycles(graph(files), args or None)
    violations = layering_violations(files)
    for c in found:
        print(f"cycle: {describe(c)}")
    for v in violations:
        print(f"layering: {v}")
    print(f"{len(files)} modules, {len(found)} cycle(s), {len(violations)} layering violation(s)")
    return 1 if found or violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
