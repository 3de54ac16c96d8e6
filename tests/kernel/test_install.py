"""A tool that installs like one: man page and completions where `man` and the shells
look (real bash, zsh and a fresh venv)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "amountd" / "data"


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
