"""SIGINT/SIGTERM at any moment after the command starts: exit 0, no traceback, no crash,
never swallowed (amountd.interrupt; the decoders built on first use, amountd.model).

The moment counts from when amountd's own code runs: before that the interpreter is
still starting (site, runpy), and what a signal does there is Python's, not ours. The
test sees that moment from outside with `-X importtime`, which writes a line to stderr
as each import ends: the signal is sent a spread of delays after the `amountd`
package's line. Without the early handler, those delays land in the imports of the
CLI, anyio and msgspec (tracebacks, and msgspec 0.23's SIGSEGV).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

TRIES = 100
MAX_DELAY = 0.150

# The two ways the command starts: `python -m amountd`, and the console script
# (pyproject's amountd = "amountd.cli:main", whose argv[0] is the script's path).
ENTRIES = (
    ["-m", "amountd"],
    [
        "-c",
        "import sys; sys.argv[0] = '/usr/bin/amountd'; "
        "from amountd.cli import main; sys.exit(main())",
    ],
)


class _Stderr:
    """The child's stderr, read as it comes; `started` is set at the `amountd` import."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self.started = threading.Event()
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("import time:"):
                if line.rsplit("|", 1)[-1].strip() == "amountd":
                    self.started.set()
                continue
            self.lines.append(line)
        self.started.set()  # ended before: the caller sees it

    def text(self) -> str:
        self._thread.join(10)
        return "\n".join(self.lines)


def test_a_signal_at_any_moment_ends_the_command_with_status_0() -> None:
    env = dict(os.environ, PYTHONFAULTHANDLER="1")  # a crash says "Fatal Python error"
    failures: list[str] = []
    for i in range(TRIES):
        # Spread over 0..MAX_DELAY (a fixed stride through the range, not random: every
        # run covers the same moments, from the CLI's imports to a running loop).
        delay = (i * 37 % TRIES) / TRIES * MAX_DELAY
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        entry = ENTRIES[i // 2 % 2]
        argv = [sys.executable, "-X", "importtime", *entry, "watch", "--ns", str(os.getpid())]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        err = _Stderr(proc)
        try:
            assert err.started.wait(30), "the command did not start"
            time.sleep(delay)
            proc.send_signal(sig)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                failures.append(f"{sig.name} after {delay * 1000:.0f} ms: swallowed")
                continue
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = err.text()
        if proc.returncode != 0 or "Traceback" in text or "Fatal Python error" in text:
            failures.append(
                f"{sig.name} after {delay * 1000:.0f} ms ({entry[0]}): exit {proc.returncode}: "
                f"{text.strip()[-500:]}"
            )
    assert not failures, f"{len(failures)} of {TRIES}:\n" + "\n".join(failures)


def test_importing_the_model_builds_no_decoder() -> None:
    code = (
        "import amountd.model as m, amountd.protocol as p\n"
        "assert m._json_decoder is None and m._msgpack_decoder is None\n"
        "assert p._request_decoder.cache_info().currsize == 0\n"
        'print(m.decode_json(b\'{"type":"end","reason":"x"}\'))\n'
        "print(m.decode_msgpack(m.encode_msgpack(m.End(reason='y'))))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert res.returncode == 0, res.stderr.decode()
    lines = res.stdout.decode().splitlines()
    assert lines == [
        "End(reason='x', ns_id=None, container=None)",
        "End(reason='y', ns_id=None, container=None)",
    ]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_api_leaves_the_handlers_alone(sig: signal.Signals) -> None:
    """Only the command arms the exit-0 handler: a program importing amountd keeps its own."""
    code = (
        "import signal, amountd, amountd.cli, amountd.api, amountd.client\n"
        f"h = signal.getsignal({int(sig)})\n"
        "print(h is signal.default_int_handler or h == signal.SIG_DFL)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert res.stdout.strip() == b"True", res
