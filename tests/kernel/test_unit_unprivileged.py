"""The pure core needs neither a kernel nor root: tests/unit passes as uid 65534, from a
copy of the repository that user owns (the checkout may sit in a 0700 directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ..conftest import ROOT, as_user

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "anyio.pytest_plugin"]


def _copy(dst: Path) -> Path:
    """amountd/, tests/, benchmarks/, pyproject.toml and README.md, owned by NOBODY
    (hypothesis writes its database beside them)."""
    skip = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache", "results")
    for d in ("amountd", "tests", "benchmarks"):
        shutil.copytree(REPO / d, dst / d, ignore=skip)
    for f in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / f, dst / f)
    for d, dirs, files in os.walk(dst):
        for n in [*dirs, *files, "."]:
            os.chown(os.path.join(d, n), NOBODY, NOBODY)
    return dst


@pytest.mark.skipif(not ROOT, reason="running tests as another uid needs root (setpriv)")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_the_unit_tests_pass_as_an_unprivileged_user() -> None:
    with tempfile.TemporaryDirectory(prefix="amountd-unit-") as tmp:  # pytest's is 0700
        os.chmod(tmp, 0o755)
        _run_as_nobody(_copy(Path(tmp, "repo")))


def _run_as_nobody(repo: Path) -> None:
    cmd, env = as_user(
        NOBODY,
        # No dist-info is copied, so no entry point names the anyio plugin: -p does. A
        # child of that uid may not exec this interpreter again (a pyenv under a 0700
        # /root: setpriv's exec is allowed, the child's is not): `child` tests stay root's.
        [*PYTEST, "-m", "not child", "tests/unit"],
        packages=("pytest", "hypothesis"),
    )
    env["HOME"] = str(repo)
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=300, check=False)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out[-4000:] + done.stderr.decode(errors="replace")[-2000:]
    assert " passed" in out and " failed" not in out
