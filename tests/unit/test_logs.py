"""Logging: journal priority prefixes when stderr is the journal, timestamps when not,
and one JSON object a line."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from amountd.errors import AmountdError
from amountd.logs import setup_logging, stderr_is_journal, syslog_priority


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _journal_env(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.stat(path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def test_stderr_is_journal_matches_dev_and_inode(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.touch()
    b.touch()
    st = os.stat(a)
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with open(a, "w") as fa, open(b, "w") as fb:
        assert stderr_is_journal(fa.fileno(), env)
        # JOURNAL_STREAM is inherited: a process whose stderr went elsewhere is not logging
        # to the journal.
        assert not stderr_is_journal(fb.fileno(), env)
        assert not stderr_is_journal(fa.fileno(), {})
        assert not stderr_is_journal(fa.fileno(), {"JOURNAL_STREAM": "garbage"})
        assert not stderr_is_journal(fa.fileno(), {"JOURNAL_STREAM": "1:x"})
    assert not stderr_is_journal(999_999, env)


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
    ],
)
def test_syslog_priority(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


def test_journal_lines_have_priorities_and_no_timestamps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    path.touch()
    _journal_env(path, monkeypatch)
    with open(path, "w") as stream:
        setup_logging("info", "text", stream=stream)
        log = logging.getLogger("amountd.test")
        log.debug("not shown at info")
        log.info("hello")
        log.warning("careful\nsecond line")
        log.error("bad")
    assert path.read_text().splitlines() == [
        "<6>amountd.test: hello",
        "<4>amountd.test: careful",
        "<4>second line",
        "<3>amountd.test: bad",
    ]


def test_journal_traceback_lines_all_carry_the_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    path.touch()
    _journal_env(path, monkeypatch)
    with open(path, "w") as stream:
        setup_logging("info", "text", stream=stream)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("amountd.test").exception("failed")
    lines = path.read_text().splitlines()
    assert lines[0] == "<3>amountd.test: failed"
    assert lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines)


def test_text_elsewhere_has_timestamps_and_levels() -> None:
    out = io.StringIO()
    setup_logging("debug", "text", stream=out)
    logging.getLogger("amountd.test").debug("seen at debug")
    line = out.getvalue().rstrip("\n")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d DEBUG amountd.test: seen at debug",
        line,
    ), line


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in text.splitlines()]


def test_json_one_object_a_line() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log = logging.getLogger("amountd.server")
    log.info("subscriber %d joined", 7, extra={"peer": "unix", "lag": 3})
    log.warning('quote " and\nnewline')
    docs = _json_lines(out.getvalue())
    assert len(docs) == 2
    first = docs[0]
    assert first["level"] == "info"
    assert first["logger"] == "amountd.server"
    assert first["message"] == "subscriber 7 joined"
    assert first["peer"] == "unix"
    assert first["lag"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["time"])
    assert docs[1]["message"] == 'quote " and\nnewline'
    assert docs[1]["level"] == "warning"


def test_json_exception_and_odd_values() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log = logging.getLogger("amountd.test")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", extra={"path": Path("/mnt")})
    # A path with bytes that are not UTF-8, as FsPath carries them.
    log.info("mounted %s", b"/mnt/\xff".decode("utf-8", "surrogateescape"))
    docs = _json_lines(out.getvalue())
    assert docs[0]["path"] == "/mnt"
    assert docs[0]["exception"].endswith("RuntimeError: boom")
    assert docs[1]["message"] == "mounted /mnt/\\xff"


def test_json_in_the_journal_keeps_the_prefix_outside_the_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    path.touch()
    _journal_env(path, monkeypatch)
    with open(path, "w") as stream:
        setup_logging("info", "json", stream=stream)
        logging.getLogger("amountd.test").warning("hi")
    line = path.read_text().rstrip("\n")
    assert line.startswith("<4>{")
    assert msgspec.json.decode(line[3:])["message"] == "hi"


def test_setup_again_replaces_its_handler_and_level() -> None:
    first = io.StringIO()
    second = io.StringIO()
    setup_logging("warning", "text", stream=first)
    setup_logging("debug", "json", stream=second)
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    logging.getLogger("amountd.test").debug("once")
    assert first.getvalue() == ""
    assert [d["message"] for d in _json_lines(second.getvalue())] == ["once"]


def test_level_names_are_case_insensitive_and_checked() -> None:
    setup_logging("WARNING", "text", stream=io.StringIO())
    assert logging.getLogger().level == logging.WARNING
    with pytest.raises(AmountdError, match="unknown log level 'loud'"):
        setup_logging("loud", "text", stream=io.StringIO())
    with pytest.raises(AmountdError, match="unknown log format 'xml'"):
        setup_logging("info", "xml", stream=io.StringIO())  # type: ignore[arg-type]


CHILD = textwrap.dedent(
    """
    import logging
    from amountd.logs import setup_logging
    setup_logging("info", "text")
    logging.getLogger("amountd.child").warning("from the child")
    """
)


@pytest.mark.child
@pytest.mark.parametrize("matches", [True, False])
def test_real_stderr_of_a_child(tmp_path: Path, matches: bool) -> None:
    """fd 2 itself, as systemd sets it up: JOURNAL_STREAM names the stderr we got."""
    path = tmp_path / "stderr"
    other = tmp_path / "other"
    path.touch()
    other.touch()
    st = os.stat(path if matches else other)
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    with open(path, "w") as err:
        subprocess.run([sys.executable, "-c", CHILD], stderr=err, env=env, check=True, timeout=60)
    line = path.read_text().rstrip("\n")
    if matches:
        assert line == "<4>amountd.child: from the child"
    else:
        assert line.endswith(" WARNING amountd.child: from the child")
        assert not line.startswith("<")
