"""Run the benchmarks: `python -m benchmarks [--quick] [--out DIR] [NAME ...]`.

Each benchmark in the registry (common.BENCHMARKS, filled as the modules below are
imported) prints its tables and writes NAME.json, NAME.txt (the tables) and NAME.png
(with matplotlib, the optional extra `bench`) to benchmarks/results/. A benchmark is a
module whose `run(opts)` returns a Result and which calls
`register(name, title, plot=...)(run)`, imported here; they run in the order imported.
With --quick, the plots are drawn by a process of their own (plots.py) while the next
benchmark runs; the default mode draws each between the benchmarks.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import (  # noqa: F401  (they register themselves)
    cpu_per_change,
    fanout,
    fleet,
    latency,
    memory,
    overflow,
    remount,
)
from .common import (
    BENCHMARKS,
    RESULTS,
    BenchmarkError,
    Options,
    can_run,
    format_table,
    loadavg,
    machine,
    machine_line,
    write_json,
    write_plot,
)
from .plots import FAILED, PlotWorker

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="amountd benchmarks: fanotify vs mountinfo parsing, in private "
        "mount namespaces (root). Tables to stdout, JSON and PNG to --out.",
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME", help=f"run only these: {', '.join(BENCHMARKS)}"
    )
    p.add_argument("--quick", action="store_true", help="small sizes: seconds, not minutes")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for b in BENCHMARKS.values():
            print(f"{b.name:16} {b.title}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    why = can_run()
    if why is not None:
        print(f"benchmarks: cannot run here: {why}", file=sys.stderr)
        return 1
    opts = Options(
        quick=args.quick, out_dir=args.out, plots=not args.no_plot, verbose=not args.quiet
    )
    # --quick draws its plots in a process of its own, alongside the next benchmark.
    worker = None
    if opts.plots and args.quick and importlib.util.find_spec("matplotlib") is not None:
        worker = PlotWorker(args.out)
    print(f"machine: {machine_line(machine())}")
    mode = (
        "quick (plots drawn alongside the runs)" if worker else "quick" if args.quick else "default"
    )
    print(f"mode: {mode}; results in {args.out}\n")
    failed = 0
    for name in args.names or list(BENCHMARKS):
        bench = BENCHMARKS[name]
        print(f"== {bench.name}: {bench.title}", flush=True)
        load_before = loadavg()
        started = time.time()
        t0 = time.monotonic()
        try:
            result = bench.run(opts)
        except BenchmarkError as e:
            print(f"{name}: FAILED: {e}\n", flush=True)
            failed += 1
            continue
        wall = time.monotonic() - t0
        load = {"before": load_before, "after": loadavg()}
        text = "\n\n".join(format_table(t) for t in result.tables) + "\n"
        text += "".join(f"note: {note}\n" for note in result.notes)
        print(text)
        path = write_json(result, args.out, started=started, wall_s=wall, load=load)
        txt = path.with_suffix(".txt")
        head = f"machine: {machine_line(machine())}\n"
        head += f"load (1, 5, 15 min): {load['before']} before, {load['after']} after\n"
        txt.write_text(f"{head}\n{text}", encoding="utf-8")
        print(f"load (1, 5, 15 min): {load['before']} before, {load['after']} after")
        print(f"json: {path}\ntext: {txt}")
        if worker is not None:
            worker.submit(name)
        elif opts.plots:
            print(write_plot(bench, result, args.out))
        print(f"({wall:.1f}s)\n", flush=True)
    if worker is not None:
        for line in worker.finish():
            print(line)
            failed += line.startswith(FAILED)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
