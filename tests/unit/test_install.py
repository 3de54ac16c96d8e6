"""A tool that installs like one, checked in-process: a description on every --help, and
README/man synopses and shipped completions that match the parsers."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from amountd.cli import build_parser
from amountd.completion import bash, zsh

ROOT = Path(__file__).resolve().parents[2]
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
