"""The benchmarks run, and write well-formed results (never a timing assertion).

`python -m benchmarks --quick` makes its mounts in private namespaces only; it needs
root and util-linux, and is skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import cpu_per_change, fanout, latency, overflow, remount
from benchmarks.common import (
    BenchmarkError,
    PrivateNs,
)

REPO = Path(__file__).resolve().parents[2]
CAN_RUN = os.geteuid() == 0 and all(shutil.which(t) for t in ("unshare", "nsenter", "findmnt"))


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def test_list_names_every_benchmark() -> None:
    res = _bench("--list")
    assert res.returncode == 0, res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    assert names == [
        "cpu_per_change",
        "fanout",
        "fleet",
        "latency",
        "memory",
        "overflow",
        "remount",
    ]


def test_unknown_benchmark_is_a_usage_error() -> None:
    res = _bench("no_such_benchmark")
    assert res.returncode == 2
    assert "unknown benchmark" in res.stderr


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if not CAN_RUN:
        pytest.skip("needs root and util-linux unshare/nsenter/findmnt (private mount namespaces)")
    out = tmp_path_factory.mktemp("bench")
    res = _bench("--quick", "-q", "--out", str(out))
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return out, res.stdout


def _load(out: Path, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    assert doc["benchmark"] == name
    m = doc["machine"]
    for key in ("cpu_model", "kernel", "python", "amountd", "util_linux"):
        assert isinstance(m[key], str) and m[key], key
    assert isinstance(m["cores"], int) and m["cores"] > 0
    assert isinstance(doc["started"], str)
    assert _number(doc["wall_s"])
    assert set(doc["loadavg"]) == {"before", "after"}  # how busy the machine was
    assert doc["params"]["quick"] is True
    assert isinstance(doc["params"]["left_out"], dict)
    assert isinstance(doc["records"], list) and doc["records"]
    assert isinstance(doc["notes"], list)
    if doc["params"]["left_out"]:  # said in the notes too, where the tables are read
        assert any(n.startswith("--quick leaves out") for n in doc["notes"])
    return doc


def _covers(params: dict[str, Any], key: str, full: Any) -> None:
    """What the quick run measured and what it says it left out make the default set."""
    used, missing = list(params[key]), params["left_out"].get(key, [])
    assert not set(used) & set(missing), (key, used, missing)
    assert sorted(used + missing, key=str) == sorted(full, key=str), (key, used, missing)


def test_quick_prints_machine_and_tables(quick_results: tuple[Path, str]) -> None:
    out, stdout = quick_results
    assert stdout.startswith("machine: ")
    assert "CPU per change" in stdout
    assert "Ratios of CPU per change" in stdout
    assert "Overflow recovery" in stdout
    assert "Mount-to-subscriber latency" in stdout
    assert "Fan-out" in stdout
    assert "Server memory" in stdout
    assert "NATS restart to reconciled keys" in stdout
    for name in ("cpu_per_change", "fanout", "fleet", "latency", "memory", "overflow"):
        assert (out / f"{name}.txt").read_text(encoding="utf-8").startswith("machine: ")
        png = out / f"{name}.png"
        assert png.exists() or "plot skipped: matplotlib is missing" in stdout
        if png.exists():
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_cpu_per_change_is_well_formed(quick_results: tuple[Path, str]) -> None:
    doc = _load(quick_results[0], "cpu_per_change")
    recs = doc["records"]
    rows = {(r["size"], r["source"], r["mode"]) for r in recs}
    sizes = doc["params"]["sizes"]
    sources = doc["params"]["sources"]
    modes = doc["params"]["modes"]
    assert set(modes) == {"8ms", "80ms", "unpaced"}
    assert rows == {(n, s, m) for n in sizes for s in sources for m in modes}
    _covers(doc["params"], "sizes", cpu_per_change.Plan().sizes)
    for r in recs:
        assert isinstance(r["mounts"], int) and r["mounts"] >= r["size"] > 0
        assert isinstance(r["changes_made"], int) and r["changes_made"] > 0
        assert isinstance(r["changes_reported"], int) and r["changes_reported"] >= 0
        for key in ("cpu_per_change_us", "cpu_ns", "idle_ns", "wall_s", "gap_ms"):
            assert _number(r[key]) and r[key] >= 0, (key, r)
        assert r["cpu_per_reported_us"] is None or _number(r["cpu_per_reported_us"])
        assert _number(r["switches_per_change"])
        assert isinstance(r["threads"], int) and r["threads"] >= 1
        if r["mode"] != "unpaced":
            assert r["changes_reported"] > 0, r  # every watcher reports something
        if r["source"] in cpu_per_change.EVERY_CHANGE and not r["source"].startswith("listmount"):
            # fanotify reports every change (the queue is far from full).
            assert r["changes_reported"] == r["changes_made"], r
    summary = doc["summary"]
    assert len(summary["ratios"]) == len(sizes) * len(modes)
    for s in summary["ratios"]:
        for key in ("mountinfo_over_fanotify", "findmnt_over_fanotify", "fanotify_over_cfloor"):
            assert s[key] is None or _number(s[key])
    for t in summary["targets"]:
        assert isinstance(t["scale_met"], bool) and isinstance(t["ratio_met"], bool)
        assert isinstance(t["cfloor_met"], bool)
    # The C floor is built where a C compiler is, else the params say why not.
    assert ("cfloor" in sources) == (doc["params"]["cfloor"] == "built with the system's cc")


def test_quick_overflow_recovers_to_the_kernels_table(quick_results: tuple[Path, str]) -> None:
    doc = _load(quick_results[0], "overflow")
    p = doc["params"]
    _covers(p, "scenarios", overflow.SCENARIOS)
    _covers(p, "rows", [name for name, _, _ in overflow.ROWS])
    rows = [(r["scenario"], r["row"]) for r in doc["records"]]
    assert sorted(rows) == sorted((sc, row) for sc in p["scenarios"] for row in p["rows"])
    for r in doc["records"]:
        assert r["scenario"] in ("rbind", "binds")
        assert r["equal"] is True, r
        assert r["consumer_mounts"] == r["kernel_mounts"] > r["mounts_before"]
        assert r["burst"] == doc["params"]["burst"]
        assert isinstance(r["events"], int) and r["events"] > 0
        assert _number(r["recovered_s"]) and _number(r["burst_s"])
        assert _number(r["consumer_cpu_s"]) and _number(r["max_pause_s"])
        assert isinstance(r["resyncs"], int) and r["resyncs"] >= 0
        assert r["first_resync_s"] is None or _number(r["first_resync_s"])
        assert all(len(p) == 2 and _number(p[0]) for p in r["timeline"])
        if r["scenario"] == "rbind" and r["source"] == "fanotify" and not r["unlimited_queue"]:
            # 20,000 attaches in one syscall, the reader held busy: a 16,384-event
            # queue overflows, and the table above came back through resync.
            assert r["resyncs"] >= 1, r


def _ordered(r: dict[str, Any], prefix: str = "") -> None:
    """p50 <= p90 <= p99 <= max: a property of any sample, not a timing."""
    vals = [r[f"{prefix}{k}_us"] for k in ("min", "p50", "p90", "p99", "max")]
    assert all(_number(v) for v in vals), (prefix, r)
    assert vals == sorted(vals), (prefix, vals)


def test_quick_latency_is_well_formed(quick_results: tuple[Path, str]) -> None:
    doc = _load(quick_results[0], "latency")
    p = doc["params"]
    rows = [(r["size"], r["source"], r["client"]) for r in doc["records"]]
    assert sorted(rows) == sorted(
        (n, s, c) for n in p["sizes"] for s in p["sources"] for c in p["clients"]
    )
    assert set(p["sources"]) == {"fanotify", "mountinfo"}
    _covers(p, "sizes", latency.SIZES)
    _covers(p, "clients", latency.CLIENTS)
    for r in doc["records"]:
        assert r["mounts"] >= r["size"] > 0
        assert r["changes"] == 2 * r["mount_syscalls"] > 0
        assert 0 <= r["mounts_arrived"] <= r["mount_syscalls"]
        assert r["arrived"] + r["missing"] == r["changes"]
        assert len(r["latencies_us"]) == r["mounts_arrived"]
        assert all(_number(v) for v in r["latencies_us"] + r["umount_latencies_us"])
        assert _number(r["gap_ms"]) and r["gap_ms"] > 0
        if r["source"] == "fanotify":
            # Paced, one change at a time: fanotify reports every one of them.
            assert r["missing"] == 0, r
        if r["mounts_arrived"]:
            for prefix in ("", "from_call_", "mount_syscall_"):
                _ordered(r, prefix)
        if r["client"] == "watch":
            assert r["server_cpu_per_change_us"] is None
        else:
            assert _number(r["server_cpu_per_change_us"])
    t = doc["summary"]["target"]
    assert isinstance(t["p50_met"], bool) and isinstance(t["p99_met"], bool)


def test_quick_fanout_is_well_formed(quick_results: tuple[Path, str]) -> None:
    doc = _load(quick_results[0], "fanout")
    p = doc["params"]
    assert set(p["formats"]) == {"json", "msgpack"}
    rows = [(r["format"], r["subscribers"]) for r in doc["records"]]
    assert sorted(rows) == sorted((f, k) for f in p["formats"] for k in p["subscribers"])
    _covers(p, "subscribers", fanout.SUBSCRIBERS)
    for r in doc["records"]:
        k = r["subscribers"]
        assert r["events"] == p["events"][str(k)]
        assert 0 < r["frames_delivered"] <= r["events"] * k
        assert 1 <= r["client_procs"] <= k
        assert isinstance(r["resyncs"], int) and r["resyncs"] >= 0
        assert 0 <= r["resynced_subscribers"] <= k
        if r["resyncs"] == 0:
            # Nobody lagged: every subscriber had every event of the burst.
            assert r["complete"] == k and r["frames_delivered"] == r["events"] * k, r
        for key in ("frames_per_s", "events_in_per_s", "server_cpu_per_frame_us", "window_s"):
            assert _number(r[key]) and r[key] >= 0, (key, r)
        for key in ("max_lag_events", "end_lag_events"):
            assert r[key] is None or (isinstance(r[key], int) and r[key] >= 0), (key, r)
        assert set(r["curves"]) == {"fastest", "slowest"}
    assert isinstance(doc["summary"]["target"]["met"], bool)


def test_quick_memory_is_well_formed(quick_results: tuple[Path, str]) -> None:
    doc = _load(quick_results[0], "memory")
    assert doc["params"]["left_out"] == {}  # every row; only the sizes are smaller
    recs = doc["records"]
    groups = {(r["server"], r["snapshot"]) for r in recs}
    assert {("amountd", False), ("amountd", True)} <= groups
    for server, snapshot in groups:
        stages = [r["stage"] for r in recs if (r["server"], r["snapshot"]) == (server, snapshot)]
        assert len(stages) == 4 and stages[0] == "serving, no subscriber"
    for r in recs:
        assert r["mounts"] >= r["size"] > 0
        for key in ("vmrss_kib", "vmhwm_kib", "rss_anon_kib", "rss_file_kib"):
            assert isinstance(r[key], int) and r[key] > 0, (key, r)
        assert r["vmhwm_kib"] >= r["vmrss_kib"]  # the peak, read with the current size
        if "burst_events" in r:
            assert r["frames_delivered"] <= r["burst_events"] * doc["params"]["subscribers"]
    for t in doc["summary"]["targets"]:
        assert isinstance(t["met"], bool) and _number(t["vmhwm_mib"])


def test_kept_driver_answers_each_op_and_reports_failures() -> None:
    """--quick's driver stays in the namespace: ops in turn, an error as BenchmarkError,
    and the doubling tree holds exactly the mounts asked for."""
    if not CAN_RUN:
        pytest.skip("needs root and util-linux unshare/nsenter (a private mount namespace)")
    with PrivateNs(keep_driver=True) as ns:
        before = ns.mount_count()
        assert ns.driver("up")["changes"] == 1
        assert ns.mount_count() == before + 1
        ns.driver("down")
        with pytest.raises(BenchmarkError, match="down"):
            ns.driver("down")  # nothing mounted there now: EINVAL, and the driver stays
        assert ns.driver("fasttree", 37)["changes"] == 37
        assert ns.mount_count() == before + 37  # the helper tree is gone
        ns.driver("rbind")
        assert ns.mount_count() == before + 2 * 37 + 1


def test_quick_fleet_is_well_formed(quick_results: tuple[Path, str]) -> None:
    doc = _load(quick_results[0], "fleet")
    kinds = [r["kind"] for r in doc["records"]]
    assert kinds == ["publish", "latency", "reconcile", "reconcile"]
    pub, lat, kept, empty = doc["records"]
    assert pub["events"] > 0 and _number(pub["events_per_s"])
    assert lat["arrived"] == lat["changes"] and _number(lat["p50_us"]) and _number(lat["p99_us"])
    assert (kept["case"], empty["case"]) == ("store kept", "empty store")
    for r in (kept, empty):
        assert _number(r["restart_to_reconciled_s"]) and _number(r["reconcile_s"])
        assert r["mounts"] >= doc["params"]["size"]
    assert kept["written"] == 0 and empty["written"] >= kept["keys_held"] > 0
    assert set(doc["summary"]) == {"events_per_s", "fleet_p50_us", "fleet_p99_us", "reconcile_s"}


def test_quick_remount_is_well_formed(quick_results: tuple[Path, str]) -> None:
    out, stdout = quick_results
    assert "Remount detection by the sweeps" in stdout
    assert (out / "remount.txt").read_text(encoding="utf-8").startswith("machine: ")
    doc = _load(out, "remount")
    p = doc["params"]
    _covers(p, "sizes", remount.SIZES)
    _covers(p, "phases", remount.PHASES)
    assert p["sources"] == list(remount.SOURCES)
    assert sorted((r["size"], r["source"], r["phase"]) for r in doc["records"]) == sorted(
        (n, s, ph) for n in p["sizes"] for s in p["sources"] for ph in p["phases"]
    )
    for r in doc["records"]:
        assert r["mounts"] >= r["size"] > 0
        assert r["missing"] == 0 and r["reported"] == r["remounts"] > 0  # none lost
        assert len(r["latencies_ms"]) == r["reported"]
        vals = [r["p50_ms"], r["p99_ms"], r["max_ms"]]
        assert all(_number(v) for v in vals) and vals == sorted(vals)
        assert _number(r["sweep_cpu_share"]) and r["sweep_cpu_share"] >= 0
        assert r["checks"] > 0  # the sweeps ran, and were counted
        for key in ("statmount_us", "statmount_hash_us", "statmount_decode_us"):
            assert _number(r[key]) and r[key] > 0
