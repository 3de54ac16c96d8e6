"""The human output against findmnt itself, and in a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from amountd.model import Snapshot, decode_json

from ..conftest import PrivateNs, run_cli

COLUMNS = "TARGET,SOURCE,FSTYPE,OPTIONS,VFS-OPTIONS,FS-OPTIONS,PROPAGATION,ID,PARENT"


def _findmnt(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("findmnt") is None:
        pytest.skip("findmnt (util-linux) is not installed")
    return subprocess.run(["findmnt", *args], capture_output=True, text=True, check=False)


def _scenario(ns: PrivateNs) -> None:
    a, b, c, d = ns.path("a b"), ns.path("bind"), ns.path("slave"), ns.path("ro")
    ns.mkdir(a, b, c, d)
    ns.run("mount", "-t", "tmpfs", "-o", "size=1m,mode=750", "src one", a)
    ns.run("mkdir", ns.path("a b", "sub dir"))
    ns.run("mount", "--bind", ns.path("a b", "sub dir"), b)  # SOURCE: src one[/sub dir]
    ns.run("mount", "--make-shared", a)
    ns.run("mount", "--bind", a, c)
    ns.run("mount", "--make-slave", c)
    ns.run("mount", "-t", "tmpfs", "-o", "ro,noexec,size=2m", "rofs", d)
    ns.run("mount", "--make-unbindable", d)


@pytest.mark.parametrize("style", ["-r", "-P"])
def test_every_column_matches_findmnt(private_ns: PrivateNs, style: str) -> None:
    ns = private_ns
    _scenario(ns)
    want = _findmnt("--task", str(ns.pid), style, "-n", "-o", COLUMNS)
    assert want.returncode == 0, want.stderr
    got = run_cli("list", "--ns", str(ns.pid), style, "-n", "-o", COLUMNS)
    assert got.returncode == 0, got.stderr
    mine, theirs = sorted(got.stdout.decode().splitlines()), sorted(want.stdout.splitlines())
    assert mine == theirs
    base = os.fsdecode(ns.base)
    assert any(f"{base}/bind" in line and "src\\x20one[/sub\\x20dir]" in line for line in mine) or (
        style == "-P"
    )


def test_table_cells_match_findmnts_table(private_ns: PrivateNs) -> None:
    """The default table (not raw): paths with spaces as they are, same cells."""
    ns = private_ns
    _scenario(ns)
    cols = "TARGET,SOURCE,PROPAGATION"
    want = _findmnt("--task", str(ns.pid), "--list", "-n", "-o", cols, "-R", os.fsdecode(ns.base))
    got = run_cli("list", "--ns", str(ns.pid), "-n", "-o", cols, "--under", os.fsdecode(ns.base))
    assert got.returncode == 0, got.stderr
    norm = lambda text: sorted(" ".join(line.split()) for line in text.splitlines())  # noqa: E731
    assert norm(got.stdout.decode()) == norm(want.stdout)
    assert f"{os.fsdecode(ns.base)}/a b src one shared" in norm(got.stdout.decode())


def test_uniq_id_is_the_64_bit_id(private_ns: PrivateNs) -> None:
    # findmnt before 2.41 has no UNIQ-ID column: check against the JSON's `id`.
    got = run_cli("list", "--ns", str(private_ns.pid), "-r", "-n", "-o", "ID,UNIQ-ID")
    snap = decode_json(run_cli("list", "--json", "--ns", str(private_ns.pid)).stdout)
    assert isinstance(snap, Snapshot)
    want = sorted(f"{m.legacy_id} {m.id if m.id is not None else '-'}" for m in snap.mounts)
    assert sorted(got.stdout.decode().splitlines()) == want


# --- a real terminal ---------------------------------------------------------------------------


class Tmux:
    def __init__(self, width: int) -> None:
        self.sock = f"amountd-test-{uuid.uuid4().hex[:8]}"
        self.width = width
        subprocess.run(
            [
                "tmux",
                "-L",
                self.sock,
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                str(width),
                "-y",
                "50",
                "sh",
            ],
            check=True,
        )
        tm = ["tmux", "-L", self.sock]
        subprocess.run([*tm, "resize-window", "-x", str(width)], check=False)
        got = subprocess.run(
            [*tm, "display", "-p", "#{pane_width}"], capture_output=True, text=True, check=True
        )
        self.width = int(got.stdout)

    def run(self, cmd: str, env: dict[str, str] | None = None) -> None:
        prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        # COLUMNS, if inherited, would win over the pane's width (as for findmnt)
        full = f"cd {os.getcwd()} && env -u COLUMNS {prefix} {sys.executable} -m amountd {cmd}"
        subprocess.run(["tmux", "-L", self.sock, "send-keys", full, "Enter"], check=True)

    def screen(self, escapes: bool = False) -> str:
        args = ["tmux", "-L", self.sock, "capture-pane", "-p", "-J"]
        if escapes:
            args.append("-e")
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout

    def wait_for(self, text: str, escapes: bool = False, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            s = self.screen(escapes)
            if text in s:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen:\n{s}")
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], check=False)


@pytest.fixture
def tmux() -> Iterator[type[Tmux]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    made: list[Tmux] = []

    class Made(Tmux):
        def __init__(self, width: int) -> None:
            super().__init__(width)
            made.append(self)

    yield Made
    for t in made:
        t.close()


def test_a_terminal_table_fits_its_width(private_ns: PrivateNs, tmux: type[Tmux]) -> None:
    ns = private_ns
    long = ns.path("x" * 70)
    ns.mkdir(long)
    ns.run("mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=1000,mode=700", "longsrc", long)
    t = tmux(60)
    t.run(f"list --ns {ns.pid} --under {os.fsdecode(ns.base)}; echo DO''NE")
    screen = t.wait_for("\nDONE\n")
    lines = [ln for ln in screen.splitlines() if ln.strip()]
    header = next((ln for ln in lines if ln.startswith("TARGET")), None)
    assert header is not None, screen
    rows = lines[lines.index(header) + 1 : lines.index(header) + 3]
    assert all(len(ln) <= t.width for ln in [header, *rows]), screen
    assert t.width < 70 + len(os.fsdecode(ns.base)), "the terminal is narrower than the path"
    assert header.split() == ["TARGET", "SOURCE", "FSTYPE", "OPTIONS"]
    row = next(r for r in rows if "longsrc" in r)
    assert "x" * 70 not in row  # the widest column was cut to fit
    # Piped, the same command cuts nothing.
    piped = run_cli("list", "--ns", str(ns.pid), "--under", os.fsdecode(ns.base)).stdout.decode()
    assert "x" * 70 in piped and "nr_inodes=1000" in piped


def test_watch_colours_by_action_unless_no_color(private_ns: PrivateNs, tmux: type[Tmux]) -> None:
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    t = tmux(120)
    t.run(f"watch --ns {ns.pid} --source mountinfo")
    t.wait_for("ACTION")
    ns.run("mount", "-t", "tmpfs", "colourful", a)
    ns.run("umount", a)
    screen = t.wait_for("umount", escapes=True)
    assert "\x1b[32mmount" in screen  # green
    assert "\x1b[31mumount" in screen  # red
    plain = tmux(120)
    plain.run(f"watch --ns {ns.pid} --source mountinfo", env={"NO_COLOR": "1"})
    plain.wait_for("ACTION")
    ns.run("mount", "-t", "tmpfs", "plain", a)
    screen = plain.wait_for("plain", escapes=True)
    assert "\x1b[32m" not in screen and "\x1b[31m" not in screen
