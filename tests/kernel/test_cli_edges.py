"""The command line at its edges, as a process: global flags before or after the command,
one line (no traceback) for every path a user gives, a bad filter answered by a server.
The pure filter checks are in tests/unit/.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from ..conftest import ROOT, run_cli
from ..multihelp import Serve

NOWHERE = "/nonexistent/amountd.sock"


def _one_line(err: bytes) -> str:
    text = err.decode()
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- global flags ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command(where: str) -> None:
    args = ["status", "--unix", NOWHERE]
    res = run_cli(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert res.returncode == 1
    assert b"Traceback" in res.stderr  # --debug: the traceback is shown
    plain = run_cli(*args)
    assert plain.returncode == 1
    assert _one_line(plain.stderr).startswith("amountd: is `amountd serve` running?")


@pytest.mark.parametrize("where", ["before", "after"])
def test_backend_before_or_after_the_command(where: str) -> None:
    args = ["status", "--unix", NOWHERE, "--debug"]
    flags = ["--backend", "trio"]
    res = run_cli(*(flags + args if where == "before" else args + flags))
    assert res.returncode == 1
    assert b"/trio/" in res.stderr  # the traceback runs through trio's loop
    res = run_cli(*args)
    assert b"/trio/" not in res.stderr and b"asyncio" in res.stderr


def test_the_command_may_override_a_global_flag() -> None:
    args = ["status", "--unix", NOWHERE, "--backend", "asyncio", "--debug"]
    res = run_cli("--backend", "trio", *args)
    assert b"/trio/" not in res.stderr and b"asyncio" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--under", "relative/path"], "bad --under: 'relative/path' is not an absolute"),
        (["list", "--under", "/a/../b"], "bad --under: '/a/../b' holds '..'"),
        (["list", "--under", "/mnt/"], "bad --under: '/mnt/' ends with a slash: write '/mnt'"),
        (["list", "--under", "//mnt"], "bad --under: '//mnt' holds an empty component"),
        (["list", "--under", ""], "bad --under: an empty path"),
        (["list", "-t", ""], "no filesystem types in ''"),
        (["watch", "--action", ""], "no actions in ''"),
        (["watch", "--action", "mnt"], "unknown action 'mnt'"),
        (["subscribe", "--unix", NOWHERE, "--under", "rel"], "bad --under: 'rel' is not"),
        (["serve", "--unix", ""], "argument --unix: an empty path"),
        (["status", "--unix", ""], "argument --unix: an empty path"),
    ],
)
def test_bad_flags_are_one_usage_line(args: list[str], message: str) -> None:
    res = run_cli(*args)
    assert res.returncode == 2, res
    assert res.stdout == b""
    text = res.stderr.decode()
    assert "Traceback" not in text
    assert text.startswith(f"amountd: {message}"), text
    assert len([line for line in text.splitlines() if not line.startswith("(see ")]) == 1


# --- paths the user gives: one line ----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "--unix", "/etc/passwd"], "/etc/passwd is not a socket"),
        (["subscribe", "--unix", "/etc/passwd"], "/etc/passwd is not a socket"),
        (["status", "--unix", "/"], "/ is not a socket"),
        (["status", "--unix", NOWHERE], "no socket at /nonexistent/amountd.sock"),
        (["serve", "--unix", "/etc/passwd"], "/etc/passwd exists and is not a socket"),
        (["serve", "--unix", "/no/such/dir/s.sock"], "its parent /no/such does not exist"),
        (["list", "--ns", "/etc/passwd"], "/etc/passwd is not a namespace file"),
        (["serve", "--config", "/nonexistent.toml"], "cannot read the config file"),
    ],
)
def test_paths_get_one_line(args: list[str], message: str) -> None:
    res = run_cli(*args)
    assert res.returncode in (1, 2), res
    line = _one_line(res.stderr)
    assert message in line, line
    assert not Path("/no/such").exists()


# --- the wire, on a real server -------------------------------------------------------


def test_a_server_answers_a_bad_filter_with_an_error_frame(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("needs root for amountd serve's default socket checks and namespace")
    srv = Serve(tmp_path / "amountd.sock", "asyncio", "--source", "mountinfo").start()
    try:
        for flt, words in (
            ({"under": "rel"}, "bad filter 'under': 'rel' is not an absolute path"),
            ({"actions": ["mnt"]}, "filter.actions[0]"),
            ({"actions": []}, "bad filter 'actions': an empty list"),
        ):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(20)
                s.connect(str(srv.sock))
                req = {"type": "subscribe", "version": 1, "filter": flt}
                s.sendall(json.dumps(req).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            frame = json.loads(data)
            assert frame["type"] == "error" and frame["code"] == "bad-request", frame
            assert words in frame["message"], frame
        assert srv.running()
    finally:
        srv.stop()
