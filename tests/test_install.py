"""A tool that installs like one: man page and completions where `man` and the shells
look, a description on every --help, and README/man synopses that match --help."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amountd.cli import build_parser
from amountd.completion import bash, zsh

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "amountd" / "data"
COMMON = {"--backend", "--debug", "-h", "--help"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    for a in build_parser()._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("no subcommands")


def _flags(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings} - COMMON


def test_every_subcommand_has_a_description() -> None:
    for name, p in _commands().items():
        assert p.description and len(p.description) > 40, name


def _readme_synopses() -> dict[str, str]:
    """`amountd CMD ...` lines of the README's code blocks, with their continuations."""
    text = (ROOT / "README.md").read_text()
    out: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        m = re.match(r"amountd (\w+)\s+\[", line)
        if m:
            current = m.group(1)
            out[current] = out.get(current, "") + line + "\n"
        elif current is not None and line.startswith(" " * 10) and "[" in line:
            out[current] += line + "\n"
        else:
            current = None
    return out


def test_readme_synopsis_has_every_flag_of_every_subcommand() -> None:
    synopses = _readme_synopses()
    readme = (ROOT / "README.md").read_text()
    for name, p in _commands().items():
        assert name in synopses, f"no `amountd {name}` synopsis in README.md"
        for flag in sorted(_flags(p)):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", synopses[name]), (
                f"README's `amountd {name}` synopsis lacks {flag}"
            )
    for flag in ("--backend", "--debug"):
        assert flag in readme


def test_man_page_has_every_flag_of_every_subcommand() -> None:
    page = (DATA / "amountd.1").read_text()
    text = re.sub(r"\\f[RBIP]", " ", page.replace("\\-", "-").replace("\\&", ""))
    synopsis = text.split(".SH SYNOPSIS", 1)[1].split(".SH DESCRIPTION", 1)[0]
    options = text.split(".SH OPTIONS", 1)[1].split("\n.SH ", 1)[0]
    parts = re.split(r"\.B amountd (\w+)", synopsis)
    by_cmd = {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    for name, p in _commands().items():
        assert name in by_cmd, f"no `amountd {name}` in the man page's SYNOPSIS"
        for flag in sorted(_flags(p)):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", by_cmd[name]), (
                f"the man page's `amountd {name}` synopsis lacks {flag}"
            )
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", options), (
                f"the man page's OPTIONS do not describe {flag} ({name})"
            )
    for flag in ("--backend", "--debug"):
        assert flag in text
    assert "watches one namespace" not in text


def test_shipped_completions_are_the_parsers() -> None:
    parser = build_parser()
    assert (DATA / "completion" / "amountd").read_text() == bash(parser), (
        "run: python -m amountd.completion amountd/data/completion"
    )
    assert (DATA / "completion" / "_amountd").read_text() == zsh(parser)


def test_bash_completion_loads_and_completes() -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    path = DATA / "completion" / "amountd"
    script = (
        f"source {path}; complete -p amountd; "
        'COMP_WORDS=(amountd su); COMP_CWORD=1; _amountd; echo "${COMPREPLY[*]}"; '
        'COMP_WORDS=(amountd list --tr); COMP_CWORD=2; _amountd; echo "${COMPREPLY[*]}"; '
        "COMP_WORDS=(amountd watch -o TARGET,PRO); COMP_CWORD=3; _amountd; "
        'echo "${COMPREPLY[*]}"; '
        'COMP_WORDS=(amountd watch --source fa); COMP_CWORD=3; _amountd; echo "${COMPREPLY[*]}"'
    )
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert res.stdout.splitlines() == [
        "complete -F _amountd amountd",
        "subscribe",
        "--tree",
        "TARGET,PROPAGATION",
        "fanotify",
    ]


def test_zsh_completion_parses_and_loads() -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (apt-get install zsh)")
    d = DATA / "completion"
    subprocess.run(["zsh", "-n", str(d / "_amountd")], check=True)
    res = subprocess.run(
        [
            "zsh",
            "-fc",
            f"fpath=({d} $fpath); autoload -Uz compinit; compinit -u; "
            "autoload -Uz _amountd; whence -w _amountd; echo ${_comps[amountd]}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert res.stdout.split() == ["_amountd:", "function", "_amountd"], res


def test_man_finds_the_page_from_a_fresh_venv(tmp_path: Path) -> None:
    """`pip install .` into a new venv puts amountd.1 in VENV/share/man/man1, which
    man-db finds from VENV/bin on $PATH (as for pipx); completions go to share/ too."""
    if shutil.which("man") is None:
        pytest.skip("man is not installed (apt-get install man-db)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    res = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if res.returncode != 0 and re.search(
        r"Could not find a version|No matching distribution|connection|Network", res.stderr
    ):
        pytest.skip(f"pip cannot fetch setuptools to build: {res.stderr.strip()[-200:]}")
    assert res.returncode == 0, res.stderr
    share = venv / "share"
    assert (share / "man" / "man1" / "amountd.1").is_file()
    assert (share / "bash-completion" / "completions" / "amountd").is_file()
    assert (share / "zsh" / "site-functions" / "_amountd").is_file()
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    found = subprocess.run(
        ["man", "-w", "amountd"], capture_output=True, text=True, env=env, check=False
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == (share / "man" / "man1" / "amountd.1").resolve()
