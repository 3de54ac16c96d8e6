"""`amountd serve` as a service, without a kernel: counting, the server-wide filter,
reload decisions. The service as a process is in tests/kernel/."""

from __future__ import annotations

import os
from collections.abc import Callable

import anyio
import anyio.lowlevel
import msgspec
import pytest

from amountd.broker import Broker
from amountd.config import Config, ConfigError, FilterConfig
from amountd.filter import Filter
from amountd.model import Event, Frame, Resync, Snapshot, Status
from amountd.protocol import FrameReader, SubscribeRequest
from amountd.serve import ServeConfig, Server, Service
from amountd.table import MountTable, apply, apply_frame

from ..factories import event, mount

pytestmark = pytest.mark.anyio


# --- without a kernel: counting, the server-wide filter, reloads ---------------------------------


def _rig(settings: Config, reload: Callable[[], Config] | None = None) -> tuple[Service, Server]:
    service = Service(settings, reload=reload)
    table = MountTable([mount(1, "/", full=False)])
    broker = Broker(table=service.view(table.mounts), queue=1024)
    return service, Server(ServeConfig(), broker, lambda: table, service)


async def _drain(sub: object) -> list[Frame]:
    from amountd.broker import Subscription

    assert isinstance(sub, Subscription)
    reader = FrameReader(sub.format)
    out: list[Frame] = []
    # What is queued now: next_chunk() hands ready frames over with no checkpoint, so
    # an expired deadline stops it only where it would wait (publish() is synchronous).
    with anyio.move_on_after(0):
        while True:
            out += reader.feed(await sub.next_chunk())
    return out


async def test_publisher_filters_and_counts() -> None:
    settings = Config(filter=FilterConfig(under="/a"), metrics="127.0.0.1:9733")
    service, server = _rig(settings)
    sub = server.broker.subscribe(SubscribeRequest())
    publish = service.publisher(server.broker.publish)
    service.stamp()
    for ev in [
        event("mount", mount(2, "/a/x", full=False)),
        event("mount", mount(3, "/b/y", full=False)),
    ]:
        apply(server.table, ev)
        publish(ev)
    publish(Resync(seq=0, reason="overflow"))
    assert service.events == 1 and service.resyncs == 1 and service.overflows == 1
    m = service.metrics
    assert m is not None
    assert m.events.get("mount", "fanotify") == 1
    assert m.event_seconds.count == 1
    assert m.resyncs.get("overflow") == 1 and m.overflows.get() == 1
    frames = await _drain(sub)
    events = [f for f in frames if isinstance(f, Event)]
    assert [e.mount.target for e in events] == ["/a/x"]
    [snap, _] = await _drain(server.broker.subscribe(SubscribeRequest(snapshot=True)))
    assert isinstance(snap, Snapshot)
    assert [m.target for m in snap.mounts] == ["/a/x"]  # not "/" nor "/b/y": not under /a


async def test_rescope_publishes_the_difference() -> None:
    service, server = _rig(Config(filter=FilterConfig(fstypes=["ext4"])))
    for key, target in [(2, "/a"), (3, "/b")]:
        apply(server.table, event("mount", mount(key, target, full=False)))
    sub = server.broker.subscribe(SubscribeRequest(snapshot=True))
    first = await _drain(sub)
    table = MountTable()
    for f in first:
        table = apply_frame(table, f)
    assert len(table) == 0
    service.rescope(server, Filter(fstypes=["tmpfs"]))
    after = await _drain(sub)
    assert isinstance(after[0], Resync) and after[0].reason == "filter-changed"
    assert {f.via for f in after[1:] if isinstance(f, Event)} == {"resync"}
    for f in after:
        table = apply_frame(table, f)
    assert table == server.table  # every mount is tmpfs
    assert service.resyncs == 1 and service.events == 3


async def test_reload_applies_live_keys_only(caplog: pytest.LogCaptureFixture) -> None:
    old = Config(queue=100, ring=10)
    new = Config(queue=5, ring=20, filter=FilterConfig(fstypes=["nfs"]))
    service, server = _rig(old, reload=lambda: new)
    await service.reload(server)
    assert server.broker.queue_limit == 5
    assert service.scope == Filter(fstypes=["nfs"])
    assert service.settings == Config(queue=5, ring=10, filter=FilterConfig(fstypes=["nfs"]))
    assert "ring changed; that needs a restart" in caplog.text

    def broken() -> Config:
        raise ConfigError("unknown key 'x' in /etc/amountd/amountd.toml")

    service, server = _rig(old, reload=broken)
    await service.reload(server)
    assert service.settings == old and server.broker.queue_limit == 1024
    assert "unknown key 'x'" in caplog.text


def test_lagged_subscribers_show_in_metrics() -> None:
    service, server = _rig(Config(metrics="9733"))
    m = service.metrics
    assert m is not None
    m.attach(server.broker)
    server.broker.subscribe(SubscribeRequest())  # a roomy queue: never dropped here
    server.broker.queue_limit = 1  # what SIGHUP does: for subscribers from now on
    lagging = server.broker.subscribe(SubscribeRequest())
    for key in (2, 3, 4):
        server.broker.publish(event("mount", mount(key, f"/{key}", full=False)))
    assert lagging.stats().drops == 1 and server.broker.stats().drops == 1
    text = m.render().decode()
    assert "amountd_queue_drops_total 1" in text
    assert 'amountd_resyncs_total{reason="lagged"} 1' in text
    assert "amountd_subscribers 2" in text


def test_status_frame_is_one_consistent_view() -> None:
    service, server = _rig(Config())
    sub = server.broker.subscribe(SubscribeRequest(format="msgpack"))
    service.subscribed(sub, "unix pid=1 uid=0 gid=0")
    st = service.status(server)
    assert isinstance(st, Status)
    assert st.pid == os.getpid() and st.subscribers == 1
    assert [(s.peer, s.format) for s in st.subscriber] == [("unix pid=1 uid=0 gid=0", "msgpack")]
    assert msgspec.json.decode(msgspec.json.encode(st), type=Status) == st


async def test_a_new_filter_waits_for_the_open_batch() -> None:
    """The table is ahead of the last seq while the pump publishes a batch in slices: the
    difference a new filter makes is taken once the batch is out, never from inside it."""
    old = Config()
    new = Config(filter=FilterConfig(fstypes=["nfs"]))
    service, server = _rig(old, reload=lambda: new)
    server.broker.open_batch()
    with pytest.raises(RuntimeError, match="wait_settled"):
        service.rescope(server, Filter(fstypes=["nfs"]))
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.reload, server)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert service.scope is None  # still waiting
        server.broker.close_batch()
    assert service.scope == Filter(fstypes=["nfs"])
