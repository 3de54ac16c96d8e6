"""The README's Python example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has a Python example"
    res = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, timeout=60, check=False
    )
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr.decode()
    assert "mounts now" in out
    assert "snapshot of" in out
    assert "armed:" in out
