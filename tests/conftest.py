"""Shared fixtures: private mount namespaces (tests/nsharness.py), a host-table guard,
both event loops, frames with a deadline, the command as another uid.

Every scenario that changes mounts does so inside a child started with
`unshare -m --propagation private` and driven with `nsenter`; amountd watches it from
outside with `--ns PID`. A test that needs root is skipped with the reason.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from amountd.model import Event, Frame

from .nsharness import HAVE_TOOLS, NO_NS, ROOT, PrivateNs, kernel_table, ns_id_of

# Hypothesis's wall-clock checks (200 ms an example, "input generation is slow") fail
# when a loaded VM stalls the process, not when the code is wrong: timings belong in
# benchmarks/. Seen: 1.5 s for one draw of a set of setting names, as `nobody`.
settings.register_profile("amountd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("amountd")

__all__ = [
    "HAVE_TOOLS",
    "ROOT",
    "MakeNs",
    "PrivateNs",
    "as_user",
    "kernel_table",
    "needs_root",
    "next_events",
    "next_frames",
    "no_more_frames",
    "ns_id_of",
    "run_cli",
]

needs_root = pytest.mark.skipif(not (ROOT and HAVE_TOOLS), reason=NO_NS)


def _host_mounts() -> list[bytes]:
    """The host's table without IDs (a private namespace's work must leave it alone)."""
    with open("/proc/self/mountinfo", "rb") as f:
        return sorted(b" ".join(line.split(b" ")[4:]) for line in f.read().splitlines())


@pytest.fixture(scope="session", autouse=True)
def host_table_unchanged() -> Iterator[None]:
    if not ROOT:
        yield
        return
    before = _host_mounts()
    yield
    after = _host_mounts()
    gone = sorted(set(before) - set(after))
    new = sorted(set(after) - set(before))
    assert not gone and not new, f"the host's mount table changed: gone {gone}, new {new}"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


MakeNs = Callable[[int], list[PrivateNs]]


@pytest.fixture
def make_ns(tmp_path: Path) -> Iterator[MakeNs]:
    """make_ns(n): n more private namespaces, each with a tmpfs scratch area; all killed after."""
    if not (ROOT and HAVE_TOOLS):
        pytest.skip(NO_NS)
    made: list[PrivateNs] = []

    def make(n: int) -> list[PrivateNs]:
        out = []
        for _ in range(n):
            base = tmp_path / f"ns{len(made)}"
            base.mkdir()
            made.append(PrivateNs(base))
            out.append(made[-1])
        return out

    try:
        yield make
    finally:
        for ns in made:
            ns.close()


@pytest.fixture
def private_ns(tmp_path: Path) -> Iterator[PrivateNs]:
    if not (ROOT and HAVE_TOOLS):
        pytest.skip(NO_NS)
    base = tmp_path / "scratch"
    base.mkdir()
    ns = PrivateNs(base)
    try:
        yield ns
    finally:
        ns.close()


async def next_frames(frames: AsyncIterator[Frame], n: int, timeout: float = 10.0) -> list[Frame]:
    """The next n frames, or a clear failure if they do not come (never a hang)."""
    import anyio

    out: list[Frame] = []
    with anyio.move_on_after(timeout):
        while len(out) < n:
            out.append(await anext(frames))
    assert len(out) == n, f"expected {n} frames within {timeout}s, got {out!r}"
    return out


async def next_events(frames: AsyncIterator[Frame], n: int, timeout: float = 10.0) -> list[Event]:
    got = await next_frames(frames, n, timeout)
    assert all(isinstance(f, Event) for f in got), got
    return [f for f in got if isinstance(f, Event)]


async def no_more_frames(frames: AsyncIterator[Frame], wait: float = 0.3) -> None:
    """Nothing else arrives (a source must not report changes twice)."""
    import anyio

    extra: list[Frame] = []
    with anyio.move_on_after(wait):
        extra.append(await anext(frames))
    assert not extra, f"unexpected extra frames: {extra!r}"


def _requirements(dist: str) -> set[str]:
    """`dist` and what it needs at run time, by distribution name (extras left out)."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # a dependency for another Python version, not installed here
        seen.add(name)
        for req in requires:
            if "extra ==" not in req and (m := re.match(r"[A-Za-z0-9._-]+", req)):
                todo.append(m.group(0))
    return seen


@functools.cache
def _world_readable_site(*extra: str) -> str:
    """A copy of amountd and the packages it needs (and `extra` ones, with theirs) in a
    directory any uid can read.

    The checkout and its venv may sit in a 0700 directory (a clone under /root): another
    uid cannot import from there, so what it runs is copied out once per session."""
    import amountd

    site = tempfile.mkdtemp(prefix="amountd-site-")
    os.chmod(site, 0o755)
    atexit.register(shutil.rmtree, site, True)
    needed = _requirements("amountd").union(*(_requirements(e) for e in extra))
    for name in needed - {"amountd"}:
        for f in importlib.metadata.files(name) or []:
            src = Path(str(f.locate()))
            if f.parts[0] != ".." and ".dist-info" not in f.parts[0] and src.is_file():
                dst = Path(site, *f.parts)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
    # amountd itself from wherever it is imported (an editable install lists no files).
    shutil.copytree(
        Path(amountd.__file__).parent,
        Path(site, "amountd"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for d, dirs, files in os.walk(site):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o755)
        for n in files:
            os.chmod(os.path.join(d, n), 0o644)
    return site


def as_user(
    uid: int, argv: Sequence[str], *, packages: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """`python ARGV` as `uid`: the command and environment, runnable from any checkout
    (with amountd's packages, and `packages` too)."""
    site = _world_readable_site(*packages)
    env = dict(os.environ, PYTHONPATH=site, PYTHONNOUSERSITE="1")
    python = os.path.realpath(sys._base_executable)  # the venv's bin/ may be unreachable
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, *argv]
    return cmd, env


def run_cli(
    *args: str, user: int | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    """`python -m amountd ARGS`, optionally as another uid (setpriv), capturing output."""
    if user is None:
        cmd = [sys.executable, "-m", "amountd", *args]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    cmd, env = as_user(user, ["-m", "amountd", *args])
    return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, env=env, cwd="/")
