"""No import cycles in the project's packages, and the layering: server -> thor_engine -> thor_sandbox, trainer -> thor_engine.

Reads the sources with `ast` (tests/support/import_graph.py); nothing is imported, no model
or server is started. Every import statement counts: top level, inside functions, and under
``if TYPE_CHECKING:``. The first test checks the graph itself on a made-up package, so the
project checks cannot pass by finding nothing.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.import_graph import (
    FORBIDDEN,
    PACKAGES,
    cycles,
    describe,
    graph,
    layering_violations,
    module_files,
)

FIX = (
    "break it by moving the shared piece into the module that owns it (or a new small module named for what "
    "it is), not by a function-local import; print the graph with: python -m tests.support.import_graph"
)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_graph_sees_function_relative_and_type_checking_imports(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/a.py": "def f():\n    from . import b\n",  # function-level, relative, names a module
            "app/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.c import C\n",
            "app/sub/__init__.py": "from app.d import *\n",
            "app/sub/c.py": "from ..a import f\nimport os\n",  # f is an attribute: the edge is to app.a
            "app/d.py": "from app.sub import c\nfrom app import sub\n",
            "low/__init__.py": "",
            "low/x.py": "import json\nimport app.d\n",
        },
    )
    files = module_files({"app": "app", "low": "low"}, tmp_path)
    assert sorted(files) == ["app", "app.a", "app.b", "app.d", "app.sub", "app.sub.c", "low", "low.x"]
    edges = graph(files)
    assert edges["app.a"] == {"app.b"}
    assert edges["app.b"] == {"app.sub.c"}
    assert edges["app.sub.c"] == {"app.a"}
    assert edges["app.d"] == {"app.sub.c", "app.sub"}
    assert edges["low.x"] == {"app.d"}
    assert [describe(c) for c in cycles(edges)] == [
        "app.a -> app.b -> app.sub.c -> app.a",
        "app.d -> app.sub -> app.d",
    ]
    assert cycles(edges, ["low"]) == []
    assert layering_violations(files, {"low": ("app",)}, tmp_path) == ["low/x.py:2: low.x imports app.d"]


def test_no_package_has_an_import_cycle() -> None:
    files = module_files()
    assert {m.split(".")[0] for m in files} == set(PACKAGES), "a package of PACKAGES has no modules"
    found = cycles(graph(files))
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(describe(c) for c in found) + f"\n{FIX}"


def test_layering_server_thor_engine_sandbox_trainer() -> None:
    bad = layering_violations(module_files())
    rules = "; ".join(f"{k} must not import {', '.join(v)}" for k, v in FORBIDDEN.items())
    assert not bad, f"imports across the layers ({rules}):\n" + "\n".join(bad)
