"""The command line and the API at their edges: global flags before or after the command,
one line (no traceback) for every path a user gives, and filters checked wherever they
enter (flags, Filter(...), the wire request, the settings file) by one pure function.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from amountd.config import ConfigError, parse_config
from amountd.filter import Filter, FilterError, check_filter
from amountd.model import fspath
from amountd.protocol import ProtocolError, parse_request

from .conftest import ROOT, run_cli
from .multihelp import Serve

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


# --- filters: the one check ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"under": "rel"}, "under", "not an absolute path"),
        ({"under": "relative/path"}, "under", "not an absolute path"),
        ({"under": ""}, "under", "an empty path"),
        ({"under": "/a/../b"}, "under", "holds '..'"),
        ({"under": "/a/./b"}, "under", "holds '.'"),
        ({"under": "/a/"}, "under", "ends with a slash"),
        ({"under": "//a"}, "under", "empty component"),
        ({"under": "/a//b"}, "under", "empty component"),
        ({"under": "/a\0b"}, "under", "NUL"),
        ({"actions": []}, "actions", "an empty list"),
        ({"actions": ["mnt"]}, "actions", "unknown action 'mnt'"),
        ({"actions": [""]}, "actions", "unknown action ''"),
        ({"fstypes": []}, "fstypes", "an empty list"),
        ({"fstypes": [""]}, "fstypes", "is not a filesystem type"),
        ({"fstypes": ["no"]}, "fstypes", "is not a filesystem type"),
        ({"fstypes": [" ext4"]}, "fstypes", "is not a filesystem type"),
        ({"pids": [0]}, "pids", "not a process ID"),
    ],
)
def test_check_filter_refuses(kwargs: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(FilterError) as info:
        check_filter(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert words in info.value.reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"under": "/"},
        {"under": "/mnt"},
        {"under": "/a b/c"},
        {"under": "/d\udcff"},  # a byte that is not UTF-8, as a path value holds it
        {"under": "/a..b/.c"},  # dots inside a name are fine
        {"actions": ["mount", "umount"]},
        {"fstypes": ["ext4", "notmpfs"]},
    ],
)
def test_check_filter_accepts(kwargs: dict[str, object]) -> None:
    check_filter(**kwargs)  # type: ignore[arg-type]


def test_the_api_refuses_a_bad_filter_when_it_is_made() -> None:
    with pytest.raises(ValueError, match="unknown action 'mnt'"):
        Filter(actions=["mnt"], under=fspath("rel"))  # type: ignore[list-item]
    with pytest.raises(FilterError, match="not an absolute path"):
        Filter(under=fspath("rel"))
    assert Filter(under=fspath("/mnt")).is_under("/mnt/x")


@pytest.mark.parametrize(
    ("flt", "words"),
    [
        ({"under": "rel"}, "bad filter 'under': 'rel' is not an absolute path"),
        ({"under": "/a/"}, "bad filter 'under': '/a/' ends with a slash"),
        ({"actions": []}, "bad filter 'actions': an empty list"),
        ({"fstypes": [""]}, "bad filter 'fstypes[0]'"),
    ],
)
def test_the_wire_request_is_checked(flt: dict[str, object], words: str) -> None:
    line = json.dumps({"type": "subscribe", "version": 1, "filter": flt}).encode()
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == "bad-request"
    assert words in info.value.message, info.value.message


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b'[filter]\nunder = "/a/"', "bad value for 'filter.under' in F: '/a/' ends with a slash"),
        (b'[filter]\nunder = "/a/../b"', "bad value for 'filter.under' in F: '/a/../b' holds"),
        (b'[filter]\nunder = ""', "bad value for 'filter.under' in F: an empty path"),
        (b"[filter]\nactions = []", "bad value for 'filter.actions' in F: an empty list"),
        (b"[filter]\nfstypes = []", "bad value for 'filter.fstypes' in F: an empty list"),
        (b'[filter]\nfstypes = ["ext4", ""]', "bad value for 'filter.fstypes[1]' in F: ''"),
    ],
)
def test_the_settings_files_filter_is_checked(doc: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "F")
    assert str(info.value).startswith(message), str(info.value)


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
