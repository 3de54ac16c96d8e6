"""Fan-out: one source, many subscribers, and the source never waits for any of them.

`publish` is synchronous and does, per subscriber and frame, a length check and a deque
append; per group of subscribers with one filter it sets one Event, and only when some of
them are parked waiting (a reader that is busy costs no wake-up). Encoding happens once
per format per frame, lazily, in the first reader that needs it; every subscriber with
the same filter shares the same `_Item`, so they all send the very same bytes object.
Work that depends on the table (snapshots) is done by the reader, at read time, so a
subscriber that fell behind costs the publisher nothing: its queue is dropped, and when
it reads again it is handed `resync` + a fresh `snapshot` as of the latest seq.

A subscription's phase (snapshot first, resync, replay, live, done, closed) is one
`Phase`, moved only by `TRANSITIONS`; the broker reaches a subscription only through
its public methods (`offer`: queue a frame or drop the queue). Frames are frozen:
`publish` numbers a copy, and that is the only place a frame gets its seq.

Everything here runs in the event loop's thread: call `publish` from a task or callback
of the loop that the subscriptions are read from (trio or asyncio, via anyio).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
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
from .snapcache import DEFAULT_SNAPSHOT_CACHE, SnapshotCache

__all__ = [
    "TRANSITIONS",
    "Broker",
    "BrokerStats",
    "IllegalTransition",
    "Phase",
    "SubscriberStats",
    "Subscription",
    "Trigger",
    "next_phase",
]


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
"""A namespace's `end`: (its index, last_seq when it was published, ns_id, item)."""


# --- a subscription's phase ---------------------------------------------------------------


class Phase(enum.Enum):
    """Where a subscriber's reading is: what its next read starts with."""

    SNAPSHOT = "snapshot"
    """It asked for a snapshot: its first read starts with one, as of the latest seq."""
    RESYNC = "resync"
    """It missed frames (it lagged, or its `since` expired): its next read starts with
    `resync` and a fresh snapshot; publish stops queueing for it until then."""
    REPLAY = "replay"
    """It resumed with `since`: it is handed the ring's frames after it, then its queue."""
    LIVE = "live"
    """It is handed its queue (and `end`, once the broker has ended and the queue is out)."""
    DONE = "done"
    """`end` was handed out: nothing more comes."""
    CLOSED = "closed"
    """close() was called: nothing more comes, and a read raises ClosedResourceError."""


class Trigger(enum.Enum):
    """What moves a subscription from one phase to another (one method each)."""

    LAG = "lag"
    """Its queue overflowed: publish drops it (`Subscription.offer`)."""
    RESTART = "restart"
    """A read handed out the fresh snapshot (and the `resync` before it)."""
    REPLAYED = "replayed"
    """A read handed out the last ring frame of its replay."""
    END = "end"
    """A read handed out `end`."""
    CLOSE = "close"
    """close(): the subscriber left, or its connection is being torn down."""


_P, _T = Phase, Trigger
TRANSITIONS: Mapping[tuple[Phase, Trigger], Phase] = MappingProxyType(
    {
        (_P.SNAPSHOT, _T.RESTART): _P.LIVE,
        (_P.SNAPSHOT, _T.CLOSE): _P.CLOSED,
        (_P.RESYNC, _T.RESTART): _P.LIVE,
        (_P.RESYNC, _T.CLOSE): _P.CLOSED,
        (_P.REPLAY, _T.LAG): _P.RESYNC,
        (_P.REPLAY, _T.REPLAYED): _P.LIVE,
        (_P.REPLAY, _T.CLOSE): _P.CLOSED,
        (_P.LIVE, _T.LAG): _P.RESYNC,
        (_P.LIVE, _T.END): _P.DONE,
        (_P.LIVE, _T.CLOSE): _P.CLOSED,
        (_P.DONE, _T.CLOSE): _P.CLOSED,
    }
)
"""Every legal (phase, trigger) and the phase it leads to; any other pair is a bug and
raises IllegalTransition. A lag in SNAPSHOT or RESYNC cannot happen (publish queues
nothing for a subscriber whose next read starts over), nor one after DONE or CLOSED
(the subscriber has left the broker)."""


class _Batch(enum.Enum):
    """Whether the table the snapshots come from is as of last_seq."""

    SETTLED = "settled"
    OPEN = "open"
    """A publisher awaits inside a batch it applied to the table: snapshots wait."""


class IllegalTransition(RuntimeError):
    """A trigger its phase does not allow: a bug in the broker, never a client's doing."""


def next_phase(phase: Phase, trigger: Trigger) -> Phase:
    """The phase `trigger` leads to from `phase`; raises IllegalTransition."""
    try:
        return TRANSITIONS[phase, trigger]
    except KeyError:
        raise IllegalTransition(
            f"a subscription cannot {trigger.value} in phase {phase.value}"
        ) from None


# The phases by module name: an Enum member looked up on its class costs ~100 ns on
# CPython 3.11, too much on the way of every frame.
_SNAPSHOT = Phase.SNAPSHOT
_RESYNC = Phase.RESYNC
_REPLAY = Phase.REPLAY
_LIVE = Phase.LIVE
_DONE = Phase.DONE
_CLOSED = Phase.CLOSED
_STARTS_OVER = (_SNAPSHOT, _RESYNC)
_QUEUEING = (_REPLAY, _LIVE)


class _Replay:
    """A `since` subscriber's way back: the ring frames after `since`, and the namespace
    `end`s among them (each handed out before the first frame published after it)."""

    __slots__ = ("ends", "frames")

    def __init__(self, frames: deque[_Item], ends: deque[_NsEnd]) -> None:
        self.frames = frames
        self.ends = ends


class Subscription:
    """One subscriber's view: an async iterator of encoded chunks, ready to write out.

    A chunk holds one or more whole frames (queued frames are coalesced into one bytes to
    cut syscalls). Iteration ends after the `end` frame, or once `close()` is called.

    Its phase (`Phase`) changes only through `TRANSITIONS`, one method per trigger; the
    broker's only way in is `offer` (a published frame: queued, or the queue dropped).
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
        self._stash: list[bytes] = []  # what follows a large chunk, handed over next
        self._replay: _Replay | None = None
        self._resync_reason: str | None = None  # the `resync` a start-over begins with
        self._resync_since: int | None = None  # `end`s published from then on come with it
        self._greeted = False  # `ready` handed out
        self._sent_seq = broker.last_seq
        # Namespace `end`s (Broker.ns_ends indexes) from here on are this subscriber's
        # to be told of; a start-over hands out those its dropped queue held.
        self._end_mark = broker.ns_end_mark
        self.drops = 0
        self.delivered = 0
        self._phase = self._first_phase(req)
        self._queueing = self._phase in _QUEUEING
        """Whether `offer` queues (derived from the phase; kept by `_move` alone)."""

    def _first_phase(self, req: SubscribeRequest) -> Phase:
        broker = self._broker
        if broker.ended:
            self._greeted = True  # the namespace is gone: just say so
            return _LIVE
        if req.since is not None:
            frames = broker.replay_from(req.since)
            if frames is None:
                self._resync_reason = "since-expired"
                # A `since` from another server run (ahead of us) knows none of our ends.
                last = broker.last_seq
                self._resync_since = req.since if req.since <= last else last + 1
                return _RESYNC
            self._replay = _Replay(frames, broker.ns_ends_after(req.since, req.filter))
            self._sent_seq = req.since
            return _REPLAY
        return _SNAPSHOT if req.snapshot else _LIVE

    # --- the triggers: each moves the phase by TRANSITIONS --------------------------------

    def _move(self, trigger: Trigger) -> None:
        phase = self._phase = next_phase(self._phase, trigger)
        self._queueing = phase in _QUEUEING

    def offer(self, item: _Item) -> bool:
        """A frame published for this subscriber: queued, or (the queue is full) the queue
        is dropped and the next read starts over. False when it lagged just now."""
        if not self._queueing:
            return True  # its next read starts from a fresh snapshot anyway
        q = self._queue
        if len(q) < self._limit:
            q.append(item)
            return True
        self._lag()
        return False

    def _lag(self) -> None:
        self._move(Trigger.LAG)
        self._queue.clear()
        replay = self._replay
        if replay is not None and replay.ends:  # its `end`s not handed out yet come later
            self._end_mark = min(self._end_mark, replay.ends[0][0])
        self._replay = None
        self._resync_reason = "lagged"
        self.drops += 1
        self._wake()

    def _restarted(self) -> None:
        self._move(Trigger.RESTART)
        self._resync_reason = None
        self._resync_since = None

    def _replayed(self) -> None:
        self._move(Trigger.REPLAYED)
        self._replay = None

    def _ended(self) -> None:
        self._move(Trigger.END)
        self._broker.unregister(self)

    def close(self) -> None:
        """Stop receiving; a task parked in next_chunk wakes with ClosedResourceError."""
        if self._phase is _CLOSED:
            return
        self._move(Trigger.CLOSE)
        self._queue.clear()
        self._replay = None
        self._broker.unregister(self)
        self._wake()

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
            if self._phase is _CLOSED:
                raise anyio.ClosedResourceError
            if self._phase is _DONE:
                raise anyio.EndOfStream
            group = self._group
            tick = group.tick
            if tick is None:
                tick = group.tick = anyio.Event()
            await tick.wait()

    def _collect(self) -> bytes | None:
        """Everything this subscriber can be handed now, as one bytes (or None), in the
        order of the contract: [resync] [snapshot] [ready] ring frames, queue, [end]."""
        if self._phase is _CLOSED:
            return None
        if self._stash:  # the rest of an earlier collect, in order
            return self._unstash()
        if self._phase is _DONE:
            return None
        if self._phase in _STARTS_OVER and not self._broker.settled:
            # The table is ahead of last_seq until the batch is out: its snapshot waits.
            self._broker.defer(self._group)
            return None
        parts: list[bytes] = []
        ended = self._start_over(parts) if self._phase in _STARTS_OVER else ()
        if not self._greeted:
            parts.append(self._broker.ready_bytes(self.format))
            self._greeted = True
        parts.extend(item.encoded(self.format) for item in ended)
        if self._phase is _REPLAY:
            self._collect_replay(parts)
        if self._phase is _LIVE:
            self._collect_live(parts)
        return self._chunk(parts)

    def _start_over(self, parts: list[bytes]) -> list[_Item]:
        """[resync] and a fresh snapshot into `parts`; returns the namespace `end`s in
        what it missed (the snapshot no longer holds those namespaces: `end` says why)."""
        broker = self._broker
        fmt = self.format
        seq = broker.last_seq
        self._queue.clear()
        if self._resync_reason is not None:
            parts.append(_Item(Resync(seq=seq, reason=self._resync_reason), seq).encoded(fmt))
        parts.append(broker.snapshot(fmt, self._group))
        since = self._resync_since
        ended = broker.ns_ends_missed(self._end_mark, since, self._group.filter)
        self._end_mark = broker.ns_end_mark
        self._restarted()
        return ended

    def _collect_replay(self, parts: list[bytes]) -> None:
        """Up to a queue's worth of ring frames, filtered like live ones; the `end`s
        left once the ring frames ran out."""
        replay = self._replay
        assert replay is not None
        group = self._group
        fmt = self.format
        frames, ends = replay.frames, replay.ends
        n = self._limit
        while frames and n > 0:
            item = frames.popleft()
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
        if not frames:
            while ends:
                parts.append(ends.popleft()[3].encoded(fmt))
            self._replayed()

    def _collect_live(self, parts: list[bytes]) -> None:
        """The queue; then `end`, if the broker has ended (the queue holds all before it)."""
        broker = self._broker
        fmt = self.format
        queue = self._queue
        if queue:
            for item in queue:
                parts.append(item.encoded(fmt))
            queue.clear()
        self._sent_seq = broker.last_seq
        self._end_mark = broker.ns_end_mark
        end = broker.end_item
        if end is not None:
            parts.append(end.encoded(fmt))
            self._ended()

    def _chunk(self, parts: list[bytes]) -> bytes | None:
        """`parts` as one bytes, but a large one (a snapshot, shared by a whole group of
        subscribers) as a chunk of its own, not copied into a join for each of them: what
        follows it waits in the stash for the next read."""
        if not parts:
            return None
        self.delivered += len(parts)
        if len(parts) == 1:
            return parts[0]
        big = next((i for i, p in enumerate(parts) if len(p) > _BIG), None)
        if big is None:
            return b"".join(parts)
        self._stash = parts[big:]
        if big:
            return b"".join(parts[:big])
        return self._stash.pop(0)

    def _unstash(self) -> bytes:
        stash = self._stash
        if len(stash[0]) > _BIG:
            return stash.pop(0)
        self._stash = []
        return stash[0] if len(stash) == 1 else b"".join(stash)

    # --- state -----------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def group(self) -> _Group:
        """The subscribers it shares a filter (and encoded frames) with."""
        return self._group

    @property
    def resync_reason(self) -> str | None:
        """Why its next read starts with `resync` ("lagged", "since-expired"), else None."""
        return self._resync_reason if self._phase is _RESYNC else None

    @property
    def queued(self) -> int:
        replay = self._replay
        return len(self._queue) + (len(replay.frames) if replay is not None else 0)

    @property
    def lagged(self) -> bool:
        return self.resync_reason == "lagged"

    @property
    def finished(self) -> bool:
        """True once `end` was handed out or `close()` was called."""
        return self._phase in (_DONE, _CLOSED)

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

    `table` returns the source's table (for snapshots). It must be as of the last
    published frame whenever the broker is settled: a source that applies a batch to
    its table before yielding it, published with no await in between, needs nothing
    more; a publisher that awaits inside a batch (to let the writers drain the queues)
    calls `open_batch()` first and `close_batch()` once the batch is out, and the
    snapshots asked for in between wait for it. `seq` is
    the last seq of an earlier run: numbers go on above it (the server starts them at
    its start time, so they only grow across restarts).
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
        snapshot_cache: int = DEFAULT_SNAPSHOT_CACHE,
        seq: int = 0,
        container: Container | None = None,
    ) -> None:
        if queue < 1:
            raise ValueError("queue must hold at least one frame")
        if ring < 0:
            raise ValueError("ring must not be negative")
        if seq < 0:
            raise ValueError("seq must not be negative")
        self.queue_limit = queue
        self.ns_id = ns_id
        self.container = container
        """What runs in namespace `ns_id` (given to `ready` and `snapshot`)."""
        self._table = table
        self._ring: deque[_Item] = deque(maxlen=ring)
        self._seq = seq
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
        self._snapshots = SnapshotCache(snapshot_cache)
        """Encoded snapshots by (format, filter), bounded in bytes (amountd.snapcache)."""
        self._batch = _Batch.SETTLED
        self._deferred: set[_Group] = set()
        """Groups with a subscriber whose snapshot waits for the open batch."""
        self._settling: anyio.Event | None = None
        """Set when the open batch closes (`wait_settled`)."""

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

    # --- batches: the table ahead of last_seq ----------------------------------------------

    @property
    def settled(self) -> bool:
        """Whether the table is as of last_seq (no batch open): snapshots may be taken."""
        return self._batch is _Batch.SETTLED

    def open_batch(self) -> None:
        """The table now holds frames not published yet: snapshots wait until
        `close_batch()`."""
        if self._batch is _Batch.OPEN:
            raise RuntimeError("a batch is open already")
        self._batch = _Batch.OPEN

    def close_batch(self) -> None:
        """The batch is out (the table is as of last_seq again): the snapshots that
        waited for it are taken."""
        if self._batch is _Batch.SETTLED:
            raise RuntimeError("no batch is open")
        self._batch = _Batch.SETTLED
        deferred, self._deferred = self._deferred, set()
        for group in deferred:
            group.wake()
        if self._settling is not None:
            self._settling.set()
            self._settling = None

    async def wait_settled(self) -> None:
        """Until no batch is open (returns at once when none is)."""
        while self._batch is _Batch.OPEN:
            if self._settling is None:
                self._settling = anyio.Event()
            await self._settling.wait()

    def defer(self, group: _Group) -> None:
        """A subscriber of `group` waits for the open batch: wake the group when it is out."""
        self._deferred.add(group)

    def publish(self, frame: Event | Resync | End) -> int:
        """Number the frame and offer it to every subscriber. Never blocks. Returns the
        seq (`last_seq` for End).

        The one place a frame gets its seq: an Event or Resync is published (and kept in
        the ring) as a numbered copy; the caller's frame is left as it was."""
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
        numbered = msgspec.structs.replace(frame, seq=seq)
        self._published += 1
        item = _Item(numbered, seq)
        self._ring.append(item)
        ev = numbered if type(numbered) is Event else None
        ns = numbered.ns_id if type(numbered) is Resync else None  # one namespace's resync
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
            self._offer(group, it)
        return seq

    def _offer(self, group: _Group, item: _Item) -> None:
        """One frame to every subscriber of a group (each queues it, or lags), then the
        group's parked readers are woken."""
        for sub in group.subs:
            if not sub.offer(item):
                self._drops += 1
        tick = group.tick  # group.wake(), inline: this runs per frame and group
        if tick is not None:
            group.tick = None
            tick.set()

    def _publish_ns_end(self, frame: End) -> None:
        """One namespace of several ended: an ordinary frame, for those who see that
        namespace, and the stream goes on. It has no seq and is kept out of the ring
        (replay counts ring items by seq); it is kept in `_ns_ends` instead, for those
        who resume with `since` or lag past it."""
        item = _Item(frame, self._seq)
        self._ns_ends.append((self._ns_end_count, self._seq, frame.ns_id, item))
        self._ns_end_count += 1
        for group in self._groups.values():
            if group.filter.ns_matches(frame.ns_id):
                self._offer(group, item)

    def _publish_end(self, frame: End) -> None:
        self._end = _Item(frame, self._seq)
        for group in self._groups.values():
            group.wake()
        # Each hands `end` out after its queue, and then unregisters.

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
            return sub  # it hands out `end` alone: nothing to register for
        self._groups[key] = group
        group.subs[sub] = None
        self._nsubs += 1
        return sub

    def replay_from(self, since: int) -> deque[_Item] | None:
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

    @property
    def end_item(self) -> _Item | None:
        """The stream's `end`, once published (each subscriber hands it out last)."""
        return self._end

    @property
    def ns_end_mark(self) -> int:
        """The index the next namespace `end` will get."""
        return self._ns_end_count

    def ns_ends_after(self, since: int, f: Filter) -> deque[_NsEnd]:
        """The namespace `end`s a `since` replay hands out among the ring frames."""
        return deque(e for e in self._ns_ends if e[1] >= since and f.ns_matches(e[2]))

    def ns_ends_missed(self, mark: int, since: int | None, f: Filter) -> list[_Item]:
        """The namespace `end`s a subscriber starting over missed: from index `mark` on,
        or (an expired `since`) those published once `since` was the last seq."""
        return [
            item
            for idx, at, ns, item in self._ns_ends
            if (idx >= mark if since is None else at >= since) and f.ns_matches(ns)
        ]

    def unregister(self, sub: Subscription) -> None:
        """A subscription that left (closed, or handed out `end`)."""
        group = sub.group
        if sub in group.subs:
            del group.subs[sub]
            self._nsubs -= 1
            if not group.subs and self._groups.get(group.key) is group:
                del self._groups[group.key]

    def ready_bytes(self, fmt: Format) -> bytes:
        """The `ready` frame, encoded once per format."""
        b = self._ready.get(fmt)
        if b is None:
            frame = Ready(
                source=self._source, ns_id=self.ns_id, reason=self._reason, container=self.container
            )
            b = self._ready[fmt] = _Item(frame, 0).encoded(fmt)
        return b

    def snapshot(self, fmt: Format, group: _Group) -> bytes:
        """The table as of last_seq, filtered for the group, encoded (and cached)."""
        return self._snapshot_bytes(fmt, group)

    def _snapshot_bytes(self, fmt: Format, group: _Group) -> bytes:
        """The table as of last_seq, filtered for the group, encoded once per seq."""
        seq = self._seq
        cache_key = (fmt, group.key)
        hit = self._snapshots.get(cache_key, seq)
        if hit is not None:
            return hit
        mounts = list(self._table())
        if not group.empty:
            mounts = filter_mounts(group.filter, mounts)
        snap = Snapshot(seq=seq, ns_id=self.ns_id, mounts=mounts, container=self.container)
        b = _Item(snap, seq).encoded(fmt)
        self._snapshots.put(cache_key, seq, b)
        return b

    # --- numbers -----------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return self._nsubs

    @property
    def snapshot_cache(self) -> SnapshotCache:
        """The encoded snapshots kept (its `bytes`, `limit`, `hits`, `misses`)."""
        return self._snapshots

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
