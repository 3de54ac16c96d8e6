"""Pure: what one host has in the KV buckets, kept from the frames the publisher reads.

The publisher applies every frame it takes from the broker here; each call returns
the bucket writes that bring NATS along (a put, a delete, a namespace's purge). After
NATS was down or the publisher lagged, `diff` compares what NATS holds with this
table: the reconcile writes only the difference.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal, NamedTuple

import msgspec

from ..model import Event, Mount, Ready, Snapshot, encode_json
from .naming import (
    MOUNTS_BUCKET,
    NAMESPACES_BUCKET,
    NamespaceRecord,
    event_ns,
    mount_key,
    namespace_key,
)

__all__ = ["KvOp", "Mirror"]


class KvOp(NamedTuple):
    """One bucket write: `put` (value), `del` (a delete marker), `purge` (no history)."""

    op: Literal["put", "del", "purge"]
    bucket: str
    key: str
    value: bytes = b""


_record_encoder = msgspec.json.Encoder()


class Mirror:
    """This host's tables as the buckets should hold them: ns_id -> key -> Mount JSON."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.tables: dict[int | None, dict[str, bytes]] = {}
        self.started: dict[int | None, float] = {}
        self.default_ns: int | None = None
        self.source = ""

    def ready(self, frame: Ready) -> None:
        self.source = frame.source
        if frame.ns_id is not None:
            self.default_ns = frame.ns_id

    def _ns(self, mount: Mount) -> int | None:
        return mount.ns_id if mount.ns_id is not None else self.default_ns

    def _table(self, ns: int | None) -> dict[str, bytes]:
        t = self.tables.get(ns)
        if t is None:
            t = self.tables[ns] = {}
            self.started.setdefault(ns, time.time())
        return t

    def event(self, ev: Event) -> tuple[int | None, KvOp]:
        """The event's namespace and its one write to `amountd_mounts`."""
        ns = event_ns(ev, self.default_ns)
        table = self._table(ns)
        key = mount_key(self.host, ns, ev.mount)
        if ev.action == "umount":
            table.pop(key, None)
            return ns, KvOp("del", MOUNTS_BUCKET, key)
        if ev.action == "move" and ev.old is not None:
            old_key = mount_key(self.host, ns, ev.old)
            if old_key != key:  # the same mount keeps its ID: only a changed ID re-files
                table.pop(old_key, None)
        value = encode_json(ev.mount)
        table[key] = value
        return ns, KvOp("put", MOUNTS_BUCKET, key, value)

    def snapshot(self, snap: Snapshot) -> None:
        """Replace every table with the snapshot's (a lag's fresh start)."""
        tables: dict[int | None, dict[str, bytes]] = {}
        for m in snap.mounts:
            ns = self._ns(m)
            tables.setdefault(ns, {})[mount_key(self.host, ns, m)] = encode_json(m)
        if not snap.mounts and snap.ns_id is not None:
            tables[snap.ns_id] = {}
        now = time.time()
        self.started = {ns: self.started.get(ns, now) for ns in tables}
        self.tables = tables

    def end(self, ns: int | None) -> list[KvOp]:
        """A namespace ended: purge its keys and its record."""
        table = self.tables.pop(ns, {})
        self.started.pop(ns, None)
        ops = [KvOp("purge", MOUNTS_BUCKET, key) for key in table]
        ops.append(KvOp("purge", NAMESPACES_BUCKET, namespace_key(self.host, ns)))
        return ops

    @property
    def namespaces(self) -> list[int | None]:
        return list(self.tables)

    def record(self, ns: int | None) -> KvOp:
        """The namespace's `amountd_namespaces` entry as it is now."""
        rec = NamespaceRecord(
            host=self.host,
            ns_id=ns,
            mounts=len(self.tables.get(ns, ())),
            source=self.source,
            started=round(self.started.get(ns, 0.0), 3),
        )
        key = namespace_key(self.host, ns)
        return KvOp("put", NAMESPACES_BUCKET, key, _record_encoder.encode(rec))

    def diff(self, mounts: dict[str, bytes], namespaces: Iterable[str]) -> list[KvOp]:
        """The writes that make the buckets (this host's keys in them: `mounts` key ->
        value, `namespaces` keys) hold this table."""
        ops: list[KvOp] = []
        want: dict[str, bytes] = {}
        for table in self.tables.values():
            want.update(table)
        for key, value in want.items():
            if mounts.get(key) != value:
                ops.append(KvOp("put", MOUNTS_BUCKET, key, value))
        ops.extend(KvOp("del", MOUNTS_BUCKET, key) for key in mounts if key not in want)
        records = [self.record(ns) for ns in self.tables]
        ops.extend(records)
        have = {r.key for r in records}
        ops.extend(KvOp("del", NAMESPACES_BUCKET, key) for key in namespaces if key not in have)
        return ops
