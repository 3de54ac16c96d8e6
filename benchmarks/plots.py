"""--quick's plots, drawn by a process of their own while the next benchmark runs.

matplotlib's import and five figures take over a second, a tenth of a quick run: the
worker (`python -m benchmarks.plots OUT`) imports it at once, then draws NAME.png from
OUT/NAME.json for each NAME read on stdin, answering each with one line (what
common.write_plot says, or "plot failed: ..."). The default mode draws its plots in
turn, between the benchmarks, so that they never compete with a measurement.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from .common import BENCHMARKS, Result, write_plot

__all__ = ["FAILED", "PlotWorker", "load_result"]

REPO = Path(__file__).resolve().parent.parent
FAILED = "plot failed: "


def load_result(out_dir: Path, name: str) -> Result:
    """A benchmark's Result back from its JSON: what the plots read (not the tables)."""
    doc = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
    return Result(
        name=name,
        params=doc["params"],
        records=doc["records"],
        tables=[],
        notes=doc["notes"],
        summary=doc["summary"],
    )


class PlotWorker:
    """The plotting process, fed benchmark names as their JSON is written."""

    def __init__(self, out_dir: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self.sent: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.plots", str(out_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )

    def submit(self, name: str) -> None:
        assert self.proc.stdin is not None
        self.sent.append(name)
        with contextlib.suppress(OSError):  # it died: finish() says so
            self.proc.stdin.write(name.encode() + b"\n")
            self.proc.stdin.flush()

    def finish(self) -> list[str]:
        """Wait for the plots: one line for each name submitted."""
        out, _ = self.proc.communicate()
        lines = out.decode(errors="replace").splitlines()
        if len(lines) < len(self.sent):
            gone = ", ".join(self.sent[len(lines) :])
            lines.append(f"{FAILED}{gone}: the plotting process exited ({self.proc.returncode})")
        return lines


def main(argv: list[str]) -> None:
    from . import run  # noqa: F401  (fills the registry)

    out_dir = Path(argv[0])
    with contextlib.suppress(ImportError):  # now, while the benchmark runs
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    for line in sys.stdin:
        name = line.strip()
        try:
            msg = write_plot(BENCHMARKS[name], load_result(out_dir, name), out_dir)
        except Exception as e:  # reported to the run, which fails
            msg = f"{FAILED}{name}: {type(e).__name__}: {e}"
        print(msg, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
