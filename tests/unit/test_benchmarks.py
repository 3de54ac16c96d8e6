"""The benchmarks' pure parts: table formatting, rows left out, percentiles, counters.
Running them (`--quick`) is in tests/kernel/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from benchmarks.common import (
    Table,
    format_table,
    left_out,
    left_out_note,
)
from benchmarks.serving import JsonCounter, MsgpackCounter, percentile


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    text = format_table(
        Table("T", ["name", "us"], [["fanotify", 12.345], ["mountinfo", 54767.4], ["x", None]])
    )
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1].split() == ["name", "us"]
    assert lines[3] == "fanotify     12.3"
    assert lines[4] == "mountinfo  54,767"
    assert lines[5] == "x               -"


def test_left_out_names_the_default_rows_a_run_lacks() -> None:
    full = {"sizes": (100, 1000, 10000), "clients": ("socket", "watch")}
    missing = left_out(full, {"sizes": [100, 1000], "clients": ["socket", "watch"]})
    assert missing == {"sizes": [10000]}
    assert left_out_note(missing) == ["--quick leaves out (the default mode has them): sizes 10000"]
    assert left_out(full, {"sizes": list(full["sizes"]), "clients": ["watch", "socket"]}) == {}
    assert left_out_note({}) == []


def test_percentile_is_a_nearest_rank() -> None:
    v = [float(i) for i in range(1, 101)]
    assert percentile(v, 50) == 50.0
    assert percentile(v, 99) == 99.0
    assert percentile(v, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0


def _frames(kinds: list[str]) -> list[Any]:
    from amountd.model import Event, Mount, Ready, Resync, Snapshot, fspath

    m = Mount(
        id=2**40,
        legacy_id=30,
        parent_id=2**40 - 1,
        legacy_parent_id=29,
        ns_id=1,
        target=fspath(b"/x"),
        root=fspath(b"/"),
        source=fspath(b"tmpfs"),
        fstype="tmpfs",
        options="rw",
        fs_options=fspath(b"rw"),
        propagation="",
        dev="0:50",
    )
    make: dict[str, Callable[[], Any]] = {
        "ready": lambda: Ready(source="fanotify", ns_id=1, reason=None),
        "resync": lambda: Resync(seq=2**50, reason="lagged"),
        "snapshot": lambda: Snapshot(seq=2**50, ns_id=1, mounts=[m] * 3),
        "event": lambda: Event(seq=2**50, time=1.0, action="mount", via="fanotify", mount=m),
    }
    return [make[k]() for k in kinds]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 13, 64, 1 << 20])
def test_counters_count_frames_by_type_across_any_cut(cut: int) -> None:
    kinds = ["ready", "event", "event", "resync", "snapshot", "event", "event", "event"]
    from amountd.protocol import frame_json, frame_msgpack

    frames = _frames(kinds)
    for counter, data in (
        (MsgpackCounter(), b"".join(frame_msgpack(f) for f in frames)),
        (JsonCounter(), b"".join(frame_json(f) for f in frames)),
    ):
        for i in range(0, len(data), cut):
            counter.feed(data[i : i + cut])
        assert counter.kinds["event"] == 5, type(counter)
        assert counter.kinds["ready"] == 1
        assert counter.kinds["resync"] == 1
        assert counter.kinds["snapshot"] == 1
