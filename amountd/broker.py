"""Fan-out: one source, many subscribers, and the source never waits for any of them.

`publish` is synchronous and does, per subscriber and frame, a length check and a deque
append; per group of subscribers with one filter it sets one Event, and only when some of
them are parked waiting (a reader that is busy costs no wake-up). Encoding happens once
per format per frame, lazily, in the first reader that needs it; every subscriber with
the same filter shares the same `_Item`, so they all send the very same bytes object.
Work that depends on the table (snapshots) is done by the reader, at read time, so a
subscriber that fell behind costs the publisher nothing: its queue is dropped, and when
it reads again it is handed `resync` + a fresh `snapshot` as of the latest seq.

Everything here runs in the event loop's thread: call `publish` from a task or callback
of the loop that the subscriptions are read from (trio or asyncio, via anyio).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import msgspec

from .container import Container
from .filter import Filter, filter_event, filter_mounts
from .model import (
    End,
    Event,
    Frame,
    Mount,
    Ready,
    Resync,
    Snapshot,
)
from .protocol import Format, SubscribeRequest, frame_json, frame_msgpack

__all__ = ["Broker", "BrokerStats", "SubscriberStats", "Subscription"]


class SubscriberStats(msgspec.Struct, kw_only=True):
    id: int
    format: str
    filtered: bool
    queued: int
    """Frames waiting in its queue."""
    lag: int
    """Published seqs it has not been handed yet (queued, dropped, or not yet reached)."""
    lagged: bool
    """Its queue was dropped; it gets resync + snapshot when it next reads."""
    drops: int
    """Times its queue overflowed and was dropped."""
    delivered: int
    """Frames handed to it (snapshots, ready and resync included)."""


class BrokerStats(msgspec.Struct, kw_only=True):
    subscribers: int
    published: int
    last_seq: int
    ring: int
    """Numbered frames held for `since` replay."""
    drops: int
    subscriber: list[SubscriberStats]


class _Item:
    """One frame, as shared by every subscriber that gets it unchanged; its encodings are
    made on first need and then reused by all of them."""

    __slots__ = ("frame", "json", "msgpack", "seq")

    def __init__(self, frame: Frame, seq: int) -> None:
        self.frame = frame
        self.seq = seq
        self.json: bytes | None = None
        self.msgpack: bytes | None = None

    def encoded(self, fmt: Format) -> bytes:
        if fmt == "msgpack":
            b = self.msgpack
            if b is None:
                b = self.msgpack = frame_msgpack(self.frame)
            return b
        b = self.json
        if b is None:
            b = self.json = frame_json(self.frame)
        return b


def _filter_key(f: Filter) -> Any:
    """A hashable value equal for equal filters: subscribers with one filter share work."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in msgspec.structs.astuple(f))


def _filter_is_empty(f: Filter) -> bool:
    return bool(f.is_empty)


class _Group:
    """Subscribers with equal filters: the filter runs once per frame for all of them."""

    __slots__ = ("empty", "filter", "key", "subs", "tick")

    def __init__(self, key: Any, f: Filter) -> None:
        self.key = key
        self.filter = f
        self.empty = _filter_is_empty(f)
        self.subs: dict[Subscription, None] = {}
        # What the group's idle readers wait on: one Event per publish, not one per
        # subscriber; a reader woken for nothing just waits again.
        self.tick: anyio.Event | None = None

    def wake(self) -> None:
        t = self.tick
        if t is not None:
            self.tick = None
            t.set()


_BIG = 64 * 1024  # a chunk this large is sent as it is, never joined with others
_NS_ENDS = 4096  # namespace `end`s kept for subscribers that lag or resume past them
_NsEnd = tuple[int, int, int | None, _Item]


class Subscription:
    """One subscriber's view: an async iterator of encoded chunks, ready to write out.

    A chunk holds one or more whole frames (queued frames are coalesced into one bytes to
    cut syscalls). Iteration ends after the `end` frame, or once `close()` is called.
    """

    _ids = itertools.count(1)

    def __init__(self, broker: Broker, req: SubscribeRequest, group: _Group) -> None:
        self.id = next(self._ids)
        self.request = req
        self.format: Format = req.format
        self._broker = broker
        self._group = group
        self._limit = broker.queue_limit
        self._queue: deque[_Item] = deque()
        self._replay: deque[_Item] | None = None
        # When set, the next read drops the queue and starts over from a fresh snapshot
        # (and publish stops queueing for it): a lag, an expired `since`, or the first
        # read of a subscriber that asked for a snapshot.
        self._skip = False
        self._stash: list[bytes] = []  # what follows a large chunk, handed over next
        self._resync_reason: str | None = None
        self._ready_sent = False
        self._end: _Item | None = None
        self._done = False
        self._closed = False
        self._sent_seq = broker.last_seq
        # Namespace `end`s (broker._ns_ends indexes) from here on are this subscriber's
        # to be told of; a resync hands out those its dropped queue held.
        self._end_mark = broker._ns_end_count
        self._replay_ends: deque[_NsEnd] | None = None
        self._resync_since: int | None = None
        self.drops = 0
        self.delivered = 0

    # --- reading ---------------------------------------------------------------------

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.next_chunk()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def next_chunk(self) -> bytes:
        """The next bytes to send. Raises anyio.EndOfStream after `end`,
        anyio.ClosedResourceError after `close()`.

        When frames are ready it returns them at once, with no checkpoint: the caller's
        next write is its checkpoint, and a wake-up per frame is what fan-out can't afford.
        """
        while True:
            chunk = self._collect()
            if chunk is not None:
                return chunk
            if self._closed:
                raise anyio.ClosedResourceError
            if self._done:
                raise anyio.EndOfStream
            group = self._group
            tick = group.tick
            if tick is None:
                tick = group.tick = anyio.Event()
            await tick.wait()

    def _collect(self) -> bytes | None:
        """Everything this subscriber can be handed now, as one bytes (or None)."""
        if self._closed:
            return None
        if self._stash:  # the rest of an earlier collect, in order
            stash = self._stash
            if len(stash[0]) > _BIG:
                return stash.pop(0)
            self._stash = []
            return stash[0] if len(stash) == 1 else b"".join(stash)
        if self._done:
            return None
        broker = self._broker
        fmt = self.format
        parts: list[bytes] = []
        if self._skip:
            seq = broker.last_seq
            self._queue.clear()
            self._replay = None
            if self._resync_reason is not None:
                parts.append(_Item(Resync(seq=seq, reason=self._resync_reason), seq).encoded(fmt))
                self._resync_reason = None
            parts.append(broker._snapshot_bytes(fmt, self._group))
            self._skip = False
            # The namespaces that ended in what this subscriber missed: the snapshot
            # no longer holds them, and `end` says why.
            since = self._resync_since
            self._resync_since = None
            self._replay_ends = None
            matches = self._group.filter.ns_matches
            ended = [
                item
                for idx, at, ns, item in broker._ns_ends
                if (idx >= self._end_mark if since is None else at >= since) and matches(ns)
            ]
            self._end_mark = broker._ns_end_count
        else:
            ended = []
        if not self._ready_sent:
            parts.append(broker._ready_bytes(fmt))
            self._ready_sent = True
        for item in ended:
            parts.append(item.encoded(fmt))
        replay = self._replay
        if replay is not None:
            self._collect_replay(replay, parts)
            if not replay:
                self._replay = None
                ends = self._replay_ends
                while ends:
                    parts.append(ends.popleft()[3].encoded(fmt))
        if self._replay is None:
            queue = self._queue
            if queue:
                for item in queue:
                    parts.append(item.encoded(fmt))
                queue.clear()
            self._sent_seq = broker.last_seq
            self._end_mark = broker._ns_end_count
            if self._end is not None:
                parts.append(self._end.encoded(fmt))
                self._end = None
                self._done = True
                broker._unregister(self)
        if not parts:
            return None
        self.delivered += len(parts)
        if len(parts) == 1:
            return parts[0]
        # A snapshot is large and shared by a whole group of subscribers: hand it over as
        # a chunk of its own, not copied into a join for each of them.
        big = next((i for i, p in enumerate(parts) if len(p) > _BIG), None)
        if big is None:
            return b"".join(parts)
        self._stash = parts[big:]
        if big:
            return b"".join(parts[:big])
        return self._stash.pop(0)

    def _collect_replay(self, replay: deque[_Item], parts: list[bytes]) -> None:
        """Up to a queue's worth of ring frames, filtered like live ones."""
        group = self._group
        fmt = self.format
        n = self._limit
        ends = self._replay_ends
        while replay and n > 0:
            item = replay.popleft()
            n -= 1
            while ends and ends[0][1] < item.seq:  # it ended before this frame came
                parts.append(ends.popleft()[3].encoded(fmt))
            frame = item.frame
            self._sent_seq = item.seq
            if not group.empty and type(frame) is Event:
                out = filter_event(group.filter, frame)
                if out is None:
                    continue
                if out is not frame:
                    item = _Item(out, item.seq)
            elif type(frame) is Resync and not group.filter.ns_matches(frame.ns_id):
                continue
            parts.append(item.encoded(fmt))

    # --- state -----------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue) + (len(self._replay) if self._replay is not None else 0)

    @property
    def lagged(self) -> bool:
        return self._resync_reason == "lagged"

    @property
    def finished(self) -> bool:
        """True once `end` was handed out or `close()` was called."""
        return self._done or self._closed

    def close(self) -> None:
        """Stop receiving; a task parked in next_chunk wakes with ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._replay = None
        self._broker._unregister(self)
        self._wake()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        self._group.wake()

    def stats(self) -> SubscriberStats:
        return SubscriberStats(
            id=self.id,
            format=self.format,
            filtered=not self._group.empty,
            queued=self.queued,
            lag=max(0, self._broker.last_seq - self._sent_seq),
            lagged=self.lagged,
            drops=self.drops,
            delivered=self.delivered,
        )


class Broker:
    """Numbers frames, keeps a ring of recent ones for `since`, fans out to subscribers.

    `table` returns the source's table as of the last published frame (for snapshots):
    the source must update its table and publish with no await in between.
    """

    def __init__(
        self,
        *,
        ring: int = 65536,
        queue: int = 1024,
        table: Callable[[], Iterable[Mount]],
        ns_id: int | None = None,
        source: str = "unknown",
        reason: str | None = None,
        container: Container | None = None,
    ) -> None:
        if queue < 1:
            raise ValueError("queue must hold at least one frame")
        if ring < 0:
            raise ValueError("ring must not be negative")
        self.queue_limit = queue
        self.ns_id = ns_id
        self.container = container
        """What runs in namespace `ns_id` (given to `ready` and `snapshot`)."""
        self._table = table
        self._ring: deque[_Item] = deque(maxlen=ring)
        self._seq = 0
        self._published = 0
        self._drops = 0
        self._groups: dict[Any, _Group] = {}
        self._nsubs = 0
        self._end: _Item | None = None
        self._source = source
        self._reason = reason
        self._ready: dict[str, bytes] = {}
        # Recent namespace `end`s as (index, last_seq when published, ns_id, item): one
        # that lagged or resumes with `since` is told of the namespaces that ended in
        # what it missed, though `end` has no seq and is not in the ring.
        self._ns_ends: deque[_NsEnd] = deque(maxlen=_NS_ENDS)
        self._ns_end_count = 0
        self._snapshots: dict[tuple[str, Any], tuple[int, bytes]] = {}

    # --- the source's side -------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def ended(self) -> bool:
        return self._end is not None

    def set_ready(self, source: str, reason: str | None = None) -> None:
        """What the `ready` frame says (which source is armed, and why it was chosen)."""
        self._source = source
        self._reason = reason
        self._ready.clear()
        self._snapshots.clear()

    def publish(self, frame: Event | Resync | End) -> int:
        """Number the frame (Event/Resync: its `seq` is set in place) and offer it to every
        subscriber. Never blocks. Returns the seq (`last_seq` for End)."""
        if self._end is not None:
            raise RuntimeError("the broker has ended: nothing can be published after End")
        if isinstance(frame, End):
            if frame.ns_id is None:
                self._publish_end(frame)
            else:
                self._publish_ns_end(frame)
            return self._seq
        if not isinstance(frame, (Event, Resync)):
            raise TypeError(f"only Event, Resync and End are published, not {type(frame)}")
        seq = self._seq = self._seq + 1
        frame.seq = seq
        self._published += 1
        item = _Item(frame, seq)
        self._ring.append(item)
        ev = frame if type(frame) is Event else None
        ns = frame.ns_id if type(frame) is Resync else None  # one namespace's resync
        for group in self._groups.values():
            if ev is None or group.empty:
                if ns is not None and not group.filter.ns_matches(ns):
                    continue
                it = item
            else:
                out = filter_event(group.filter, ev)
                if out is None:
                    continue
                it = item if out is ev else _Item(out, seq)
            for sub in group.subs:
                if sub._skip:
                    continue  # its next read starts from a fresh snapshot anyway
                q = sub._queue
                if len(q) < sub._limit:
                    q.append(it)
                else:
                    self._lag(sub)
            tick = group.tick
            if tick is not None:
                group.tick = None
                tick.set()
        return seq

    def _lag(self, sub: Subscription) -> None:
        sub._queue.clear()
        sub._replay = None
        if sub._replay_ends:  # the replay's `end`s not handed out yet come with the resync
            sub._end_mark = min(sub._end_mark, sub._replay_ends[0][0])
        sub._replay_ends = None
        sub._skip = True
        sub._resync_reason = "lagged"
        sub.drops += 1
        self._drops += 1
        sub._wake()

    def _publish_ns_end(self, frame: End) -> None:
        """One namespace of several ended: an ordinary frame, for those who see that
        namespace, and the stream goes on. It has no seq and is kept out of the ring
        (replay counts ring items by seq); it is kept in `_ns_ends` instead, for those
        who resume with `since` or lag past it."""
        item = _Item(frame, self._seq)
        self._ns_ends.append((self._ns_end_count, self._seq, frame.ns_id, item))
        self._ns_end_count += 1
        for group in self._groups.values():
            if not group.filter.ns_matches(frame.ns_id):
                continue
            for sub in group.subs:
                if sub._skip:
                    continue  # its next read starts from a fresh snapshot anyway
                q = sub._queue
                if len(q) < sub._limit:
                    q.append(item)
                else:
                    self._lag(sub)
            group.wake()

    def _publish_end(self, frame: End) -> None:
        item = self._end = _Item(frame, self._seq)
        for group in self._groups.values():
            for sub in group.subs:
                sub._end = item
                sub._wake()
        # They unregister themselves once `end` is handed out.

    # --- the subscribers' side -----------------------------------------------------------

    def subscribe(self, req: SubscribeRequest | None = None) -> Subscription:
        """Register now (nothing published after this call is missed); read the frames
        from the returned Subscription.

        Initial frames: `snapshot` (if asked; taken when the subscriber first reads, as
        of the latest seq), `ready`, then frames. With `since`: `ready`, the ring frames
        after `since`, then live ones; or, if the ring no longer holds them all (or
        `since` is ahead of us: another server run), `resync` ("since-expired"),
        `snapshot`, `ready`, live. With `since`, `snapshot` is only sent when replay is
        impossible (a client that still has its table needs no snapshot).
        """
        if req is None:
            req = SubscribeRequest()
        key = _filter_key(req.filter)
        group = self._groups.get(key)
        if group is None:
            group = _Group(key, req.filter)
        sub = Subscription(self, req, group)
        if self._end is not None:
            sub._ready_sent = True  # the namespace is gone: just say so
            sub._end = self._end
            return sub
        if req.since is not None:
            replay = self._replay_from(req.since)
            if replay is None:
                sub._skip = True
                sub._resync_reason = "since-expired"
                # A `since` from another server run (ahead of us) knows none of our ends.
                sub._resync_since = req.since if req.since <= self._seq else self._seq + 1
            else:
                sub._replay = replay
                sub._sent_seq = req.since
                f = req.filter
                sub._replay_ends = deque(
                    e for e in self._ns_ends if e[1] >= req.since and f.ns_matches(e[2])
                )
        elif req.snapshot:
            sub._skip = True
        self._groups[key] = group
        group.subs[sub] = None
        self._nsubs += 1
        return sub

    def _replay_from(self, since: int) -> deque[_Item] | None:
        """The ring frames after `since`, or None if the ring does not hold them all."""
        last = self._seq
        if since > last:
            return None
        if since == last:
            return deque()
        ring = self._ring
        if not ring or ring[0].seq > since + 1:
            return None
        return deque(itertools.islice(ring, since + 1 - ring[0].seq, None))

    def _unregister(self, sub: Subscription) -> None:
        group = sub._group
        if sub in group.subs:
            del group.subs[sub]
            self._nsubs -= 1
            if not group.subs and self._groups.get(group.key) is group:
                del self._groups[group.key]

    def _ready_bytes(self, fmt: Format) -> bytes:
        b = self._ready.get(fmt)
        if b is None:
            frame = Ready(
                source=self._source, ns_id=self.ns_id, reason=self._reason, container=self.container
            )
            b = self._ready[fmt] = _Item(frame, 0).encoded(fmt)
        return b

    def _snapshot_bytes(self, fmt: Format, group: _Group) -> bytes:
        """The table as of last_seq, filtered for the group, encoded once per seq."""
        seq = self._seq
        cache_key = (fmt, group.key)
        hit = self._snapshots.get(cache_key)
        if hit is not None and hit[0] == seq:
            return hit[1]
        mounts = list(self._table())
        if not group.empty:
            mounts = filter_mounts(group.filter, mounts)
        snap = Snapshot(seq=seq, ns_id=self.ns_id, mounts=mounts, container=self.container)
        b = _Item(snap, seq).encoded(fmt)
        if len(self._snapshots) > 64:
            self._snapshots = {k: v for k, v in self._snapshots.items() if v[0] == seq}
        self._snapshots[cache_key] = (seq, b)
        return b

    # --- numbers -----------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return self._nsubs

    def subscriptions(self) -> list[Subscription]:
        return [s for g in self._groups.values() for s in g.subs]

    def stats(self) -> BrokerStats:
        return BrokerStats(
            subscribers=self._nsubs,
            published=self._published,
            last_seq=self._seq,
            ring=len(self._ring),
            drops=self._drops,
            subscriber=[s.stats() for s in self.subscriptions()],
        )
