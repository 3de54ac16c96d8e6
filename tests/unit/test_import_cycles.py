"""No import cycle inside amountd/, no import up a layer (docs/architecture.md, "Who
may import whom"), and the client commands load no server module.

The graph counts every import statement wherever it is: at module level, inside a
function (a lazy import is still a dependency, it only runs later), and under
`if TYPE_CHECKING:` (a type-only edge still ties the two modules' designs together).
That is the rule of /work/shared/tools/importcycles, so this test and the tool agree.
An edge goes to the deepest module of the package that the statement names
(`from .sources import multi` -> amountd.sources.multi; `from .sources import Source`
-> amountd.sources); a package's own __init__ is not added as an implicit edge.

Plain: no root, no kernel, no event loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "amountd").is_dir())
"""The repository's root (found upwards, so this file may move to tests/unit/)."""
PACKAGE = ROOT / "amountd"


def modules(package: Path) -> dict[str, Path]:
    """Every module under `package`, by dotted name (a package by its own name)."""
    out: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (see the module doc)."""
    mods = modules(package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [
                    f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names
                ]
            for target in targets:
                t = target
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a closed path, first module repeated last) per strongly connected
    component of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(comp)
    return [_closed_path(graph, comp) for comp in comps]


def _closed_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """The shortest way from the component's first module back to itself."""
    start = min(comp)
    came: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def test_amountd_has_no_import_cycle() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles in amountd/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checker_sees_lazy_and_type_only_cycles(tmp_path: Path) -> None:
    """The check itself can fail: a cycle closed by an import inside a function, one
    closed under TYPE_CHECKING, and one through a package's __init__ are all found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from .b import x\n",
        "b.py": "def f():\n    from . import a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import y\n",
        "d.py": "import pkg.c\n",
        "sub/__init__.py": "from .leaf import z\n",
        "sub/leaf.py": "from .. import e\n",
        "e.py": "from .sub import z\n",
        "fine.py": "from .a import x\nimport os\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    found = {tuple(c) for c in cycles(import_graph(pkg))}
    assert found == {
        ("pkg.a", "pkg.b", "pkg.a"),
        ("pkg.c", "pkg.d", "pkg.c"),
        ("pkg.e", "pkg.sub", "pkg.sub.leaf", "pkg.e"),
    }


LAYERS: list[tuple[str, ...]] = [
    # 0. leaves
    ("constants", "errors", "interrupt", "kernel.consts", "kernel.errors", "cli.constants"),
    # 1. the pure core
    (
        "model",
        "container",
        "mountinfo",
        "table",
        "tracker",
        "sweep",
        "filter",
        "columns",
        "render",
        "protocol",
        "limits",
        "snapcache",
        "kernel.layouts",
        "fleet.naming",
        "fleet.mirror",
    ),
    # 2. shells over the kernel, the host and the loop
    (
        "kernel",
        "kernel.syscalls",
        "loop",
        "ns",
        "cgroups",
        "access",
        "sockdir",
        "accept",
        "tokens",
        "stream",
        "logs",
        "metrics",
        "config",
    ),
    # 3. sources (the package and everything in it)
    ("sources", "sources.*"),
    # 4. fan-out and clients
    ("broker", "api", "client", "status", "fleet", "fleet.*"),
    # 5. the server
    ("serve", "serve.*"),
    # 6. entry points
    ("cli", "cli.*", "completion", "__main__", ""),
]
"""docs/architecture.md's layers, by name under amountd ("" is the package itself;
"x.*" is every module under x). A module named on its own wins over its package's "x.*"
(amountd.fleet.naming is pure, the rest of amountd.fleet is not)."""


def layer_of(module: str) -> int | None:
    name = module.removeprefix("amountd").removeprefix(".")
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    for i, names in enumerate(LAYERS):
        if any(n.endswith(".*") and name.startswith(n[:-1]) for n in names):
            return i
    return None


def test_every_module_has_a_layer() -> None:
    lost = sorted(m for m in modules(PACKAGE) if layer_of(m) is None)
    assert not lost, (
        f"{lost} belong to no layer: add each to docs/architecture.md and to LAYERS here"
    )


def test_no_module_imports_up_a_layer() -> None:
    graph = import_graph(PACKAGE)
    up = sorted(
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in graph.items()
        for t in targets
        if (lm := layer_of(m)) is not None and (lt := layer_of(t)) is not None and lt > lm
    )
    assert not up, "imports up a layer (docs/architecture.md):\n" + "\n".join(up)


@pytest.mark.child
@pytest.mark.parametrize("command", ["subscribe", "status"])
def test_client_commands_load_no_server_module(command: str) -> None:
    """`subscribe` and `status` are clients: running one (here against a socket that is
    not there) must not import the server, the broker or the sources."""
    probe = (
        "import sys, amountd.cli as c\n"
        f"rc = c.main([{command!r}, '--unix', '/nonexistent/amountd.sock', '--timeout', '5'])\n"
        "print(rc, ' '.join(sorted(m for m in sys.modules if m.startswith('amountd'))))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    rc, _, loaded = res.stdout.strip().partition(" ")
    assert rc == "1" and "no socket at /nonexistent/amountd.sock" in res.stderr, res
    assert "amountd.client" in loaded.split()
    server_side = [
        m
        for m in loaded.split()
        if m.split(".")[1:2] in (["server"], ["service"], ["broker"], ["sources"], ["serve"])
    ]
    assert not server_side, f"`amountd {command}` loaded {server_side}"


SERVER_SIDE = ("amountd.serve", "amountd.broker", "amountd.sources")


def test_client_commands_reach_no_server_module_even_lazily() -> None:
    """Statically, through every import (lazy ones too): amountd.cli.remote (subscribe,
    status) reaches no module of the server, the broker or the sources. (The kernel
    shells it may reach: the CONTAINER column reads a process's cgroup.)"""
    graph = import_graph(PACKAGE)
    seen, todo = set(), ["amountd.cli.remote"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    bad = sorted(m for m in seen if m.startswith(SERVER_SIDE))
    assert not bad, f"amountd.cli.remote reaches {bad}"
