"""What every benchmark shares: the machine, private namespaces, CPU accounting, output.

Every mount a benchmark makes is made inside a child started with
`unshare -m --propagation private`, on a tmpfs mounted inside that child only, by
benchmarks/nsdriver.py run through `nsenter`: the host's table is never touched.

A watcher's CPU is the kernel's own account of time on CPU, in nanoseconds, summed over
all its threads (/proc/PID/task/*/schedstat): both amountd sources run a helper thread
that waits for POLLPRI, and /proc/PID/stat's clock ticks (10 ms) are far too coarse for
costs of microseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests import nsharness

__all__ = [
    "BENCHMARKS",
    "DRIVER",
    "RESULTS",
    "Benchmark",
    "BenchmarkError",
    "Options",
    "PrivateNs",
    "Result",
    "Table",
    "Watcher",
    "can_run",
    "format_table",
    "left_out",
    "left_out_note",
    "loadavg",
    "machine",
    "machine_line",
    "register",
    "task_cpu_ns",
    "task_switches",
    "write_json",
    "write_plot",
]

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "nsdriver.py"
RESULTS = HERE / "results"
TOOLS = ("unshare", "nsenter")


class BenchmarkError(Exception):
    """A benchmark could not run as set up (a tool missing, a watcher that died)."""


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _amountd_version() -> str:
    try:
        import amountd

        return str(amountd.__version__)
    except ImportError:
        return "not importable"


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "amountd": _amountd_version(),
        "util_linux": _util_linux_version(),
    }


def _util_linux_version() -> str:
    exe = shutil.which("findmnt")
    if exe is None:
        return "missing"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, check=False, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.decode(errors="replace").strip().rsplit(" ", 1)[-1] or "unknown"


def loadavg() -> str:
    """/proc/loadavg's 1, 5 and 15 minute loads: how busy the machine was around a run."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
        f"amountd {m['amountd']}, util-linux {m['util_linux']}"
    )


def can_run() -> str | None:
    """Why the benchmarks cannot run here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root: mounts are made in a private mount namespace"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs util-linux {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------------- CPU


def _per_thread(pid: int, name: str, value: Callable[[bytes], int]) -> int:
    """The sum of `value(/proc/PID/task/TID/<name>)` over every live thread of `pid`."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise BenchmarkError(f"process {pid} is gone") from None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}", "rb") as f:
                total += value(f.read())
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended between listing and reading
    return total


def task_cpu_ns(pid: int) -> int:
    """Nanoseconds on CPU of every live thread of `pid` (schedstat's first field)."""
    return _per_thread(pid, "schedstat", lambda b: int(b.split()[0]))


def _switches(status: bytes) -> int:
    return sum(
        int(line.split()[1])
        for line in status.splitlines()
        if line.startswith((b"voluntary_ctxt_switches", b"nonvoluntary_ctxt"))
    )


def task_switches(pid: int) -> int:
    """Context switches (voluntary + not) of every live thread of `pid`: its wake-ups."""
    return _per_thread(pid, "status", _switches)


# ----------------------------------------------------------------- private namespaces


class PrivateNs(nsharness.PrivateNs):
    """tests/nsharness.py's private namespace, with a 64 MiB tmpfs that nsdriver.py fills.

    `keep_driver` (--quick): driver() hands its ops to one nsdriver.py that stays in the
    namespace (`serve`), rather than starting one per op (some 30 ms each).
    """

    def __init__(self, *, keep_driver: bool = False) -> None:
        why = can_run()
        if why is not None:
            raise BenchmarkError(why)
        self._keep_driver = keep_driver
        self._driver: subprocess.Popen[bytes] | None = None
        try:
            super().__init__(size="64m", tag="bench")
        except nsharness.NsError as e:
            raise BenchmarkError(str(e)) from None

    def output(self, argv: Sequence[str]) -> str:
        """One command inside the namespace; its stdout."""
        res = self.run(*argv, check=False)
        if res.returncode != 0:
            raise BenchmarkError(
                f"{' '.join(argv)} failed in the namespace: {res.stderr.decode(errors='replace')}"
            )
        return res.stdout.decode(errors="replace")

    def driver_argv(self, op: str, *args: object) -> list[str]:
        return [str(a) for a in self.argv([sys.executable, str(DRIVER), op, self.base, *args])]

    def driver(self, op: str, *args: object) -> dict[str, Any]:
        """Run nsdriver.py OP inside the namespace; its {"start", "end", "changes"}."""
        if self._keep_driver:
            return self._ask_driver(op, *args)
        out = self.output([sys.executable, str(DRIVER), op, str(self.base), *map(str, args)])
        return dict(json.loads(out.strip().splitlines()[-1]))

    def _ask_driver(self, op: str, *args: object) -> dict[str, Any]:
        if self._driver is None:
            self._driver = subprocess.Popen(
                self.driver_argv("serve"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        p = self._driver
        assert p.stdin is not None and p.stdout is not None
        try:
            p.stdin.write(" ".join(map(str, (op, *args))).encode() + b"\n")
            p.stdin.flush()
        except OSError:
            pass  # it died: its (empty) answer says so below
        line = p.stdout.readline()
        if not line:
            raise BenchmarkError(f"nsdriver.py serve exited ({p.poll()}) at {op}")
        doc = json.loads(line)
        if "error" in doc:
            raise BenchmarkError(f"nsdriver.py {doc['error']}")
        return dict(doc)

    def populate(self, total: int) -> int:
        """Grow the namespace's table to `total` mounts (bind mounts, quickly); the count."""
        have = self.mount_count()
        if total > have:
            self.driver("populate", total - have)
        return self.mount_count()

    def close(self) -> None:
        if self._driver is not None:
            for f in (self._driver.stdin, self._driver.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()  # its stdin at EOF: it exits
            try:
                self._driver.wait(10)
            except subprocess.TimeoutExpired:
                self._driver.kill()
                self._driver.wait()
            self._driver = None
        super().close()


# ----------------------------------------------------------------------- watchers


class Watcher:
    """A watcher process whose stdout is drained (by a thread) and counted, line by line.

    `is_change(line)` says whether a line reports a change; `is_ready(line)` (if given)
    whether it says the watch is armed.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        is_change: Callable[[bytes], bool],
        is_ready: Callable[[bytes], bool] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self._is_change = is_change
        self._is_ready = is_ready
        self.changes = 0
        self.lines = 0
        self.last_change = 0.0
        self.ready = threading.Event()
        self.says_ready = is_ready is not None  # else: ready as soon as it started
        self._cond = threading.Condition()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed by close())
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"drain-{name}", daemon=True)
        self._reader.start()
        if is_ready is None:
            self.ready.set()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines += 1
                if self._is_change(line):
                    self.changes += 1
                    self.last_change = time.monotonic()
                elif self._is_ready is not None and self._is_ready(line):
                    self.ready.set()
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout):
            raise BenchmarkError(f"{self.name} was not ready within {timeout}s: {self.stderr()}")

    def wait_changes(self, n: int, timeout: float) -> bool:
        """Wait until `n` changes were counted in all; False on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.changes < n:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return self.changes >= n
                self._cond.wait(min(left, 0.05))
        return True

    def cpu_ns(self) -> int:
        if self.proc.poll() is not None:
            raise BenchmarkError(f"{self.name} exited ({self.proc.returncode}): {self.stderr()}")
        return task_cpu_ns(self.pid)

    def switches(self) -> int:
        return task_switches(self.pid)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_quiet(
    cpu: Callable[[], int], *, quiet: float = 0.3, step: float = 0.05, limit: float = 120.0
) -> bool:
    """Wait until `cpu()` stops growing for `quiet` seconds (the watcher caught up)."""
    deadline = time.monotonic() + limit
    last = cpu()
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(step)
        now = cpu()
        if now != last:
            last = now
            still_since = time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return True
    return False


# -------------------------------------------------------------------------- results


@dataclasses.dataclass
class Options:
    quick: bool = False
    out_dir: Path = RESULTS
    plots: bool = True
    verbose: bool = True

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  .. {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclasses.dataclass
class Result:
    """What a benchmark hands back: JSON records, the tables to print, notes."""

    name: str
    params: dict[str, Any]
    records: list[dict[str, Any]]
    tables: list[Table]
    notes: list[str] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Benchmark:
    name: str
    title: str
    run: Callable[[Options], Result]
    plot: Callable[[Result, Path], None] | None = None


BENCHMARKS: dict[str, Benchmark] = {}


def left_out(
    full: Mapping[str, Sequence[Any]], used: Mapping[str, Sequence[Any]]
) -> dict[str, list[Any]]:
    """What the default mode measures and this run does not (--quick's smaller set), by
    parameter: the rows that are missing, said in the JSON rather than left to guess."""
    out = {key: [v for v in values if v not in used[key]] for key, values in full.items()}
    return {key: values for key, values in out.items() if values}


def left_out_note(missing: dict[str, list[Any]]) -> list[str]:
    """The note that goes with left_out() (none when nothing is left out)."""
    if not missing:
        return []
    what = "; ".join(f"{key} {', '.join(map(str, vals))}" for key, vals in missing.items())
    return [f"--quick leaves out (the default mode has them): {what}"]


def register(
    name: str, title: str, plot: Callable[[Result, Path], None] | None = None
) -> Callable[[Callable[[Options], Result]], Callable[[Options], Result]]:
    """Add a benchmark to the registry that `python -m benchmarks` runs, in order."""

    def deco(fn: Callable[[Options], Result]) -> Callable[[Options], Result]:
        BENCHMARKS[name] = Benchmark(name=name, title=title, run=fn, plot=plot)
        return fn

    return deco


def write_json(
    result: Result,
    out_dir: Path,
    *,
    started: float,
    wall_s: float,
    load: dict[str, str] | None = None,
) -> Path:
    """benchmarks/results/NAME.json: the machine, the load, the parameters, every record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result.name}.json"
    doc = {
        "benchmark": result.name,
        "machine": machine(),
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "wall_s": round(wall_s, 3),
        "loadavg": load or {},
        "params": result.params,
        "records": result.records,
        "summary": result.summary,
        "notes": result.notes,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.2f}"
        return f"{v:.2g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_table(table: Table) -> str:
    """A plain-text table: text columns left, numbers right."""
    cells = [[_cell(v) for v in row] for row in table.rows]
    numeric = [
        all(isinstance(r[i], int | float) or r[i] is None for r in table.rows)
        for i in range(len(table.columns))
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(table.columns)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(vals, widths, numeric, strict=True)
        ).rstrip()

    out = [table.title, line(table.columns), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def figure(path: Path, *, width: float = 8.0, height: float = 4.5) -> Iterator[Any]:
    """A matplotlib figure (Agg, no display) saved to `path` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, height), dpi=110)
    try:
        yield fig
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)


def write_plot(bench: Benchmark, result: Result, out_dir: Path) -> str:
    """NAME.png beside the JSON; a note instead when matplotlib (extra `bench`) is missing."""
    if bench.plot is None:
        return "no plot for this benchmark"
    if not have_matplotlib():
        return "plot skipped: matplotlib is missing (pip install 'amountd[bench]')"
    path = out_dir / f"{result.name}.png"
    bench.plot(result, path)
    return f"plot: {path}"
