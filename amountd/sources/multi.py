"""Many mount namespaces as one source: one sub-source per namespace, merged.

Each namespace gets its own source (fanotify: one group per namespace, since an event
does not say which namespace it came from; mountinfo only where fanotify is refused,
and the `ready` reason says where and why), read by its own task into one bounded
channel. `changes()` takes the batches in arrival order and applies each to the
union table (`table`) right before yielding it, so between batches `table` is what
the frames yielded so far imply: the server's snapshots stay exact.

- Frames say their namespace: events through `mount.ns_id`, `resync` and `end`
  through `ns_id`. When one namespace ends, its `end` is yielded (after `umount`s,
  `via: resync`, for any mounts the union still holds for it: a mountinfo watch ends
  when its process exits, with the table as it was) and the others go on. The merged
  stream ends, with an `end` without `ns_id`, only when every namespace of a fixed
  list has ended; with `all_namespaces` it never ends on its own.
- `all_namespaces`: every namespace at the start, then every `rescan` seconds the
  kernel's whole list again (NS_MNT_GET_PREV/NEXT from our own namespace): an ID not
  seen before is a new namespace. The whole list, because IDs do not grow with
  creation time (measured on 6.18: each CPU hands out IDs from its own batch, so a
  namespace made now on CPU 0 gets 1980 while one made before on CPU 1 has 6223).
  That is one ioctl per namespace per rescan, plus a fstat per new one and a /proc
  scan (to find a process in each) only when something new turned up. The kernel
  tells nobody of a new namespace, hence the polling; where the walk is not available
  (before Linux 6.12), /proc is rescanned.
- A namespace found later is armed (marked before its table is read, so nothing is
  missed) and its mounts are yielded as `mount` events `via: resync`: a consumer that
  applies frames stays exact without a second kind of snapshot, a subscriber resuming
  with `since` gets them from the ring like any other event, and a subscriber's
  filter (namespace, type, subtree) applies to them as to any event.
- Keys: unique mount IDs (fanotify) are unique across namespaces. A mountinfo source
  has only the 32-bit IDs, which the kernel allocates from one pool for all
  namespaces and reuses at once, and two namespaces are read at different moments: a
  namespace can report a new mount under an ID whose previous owner's umount another
  namespace has not reported yet. The newer `mount` wins: the stale holder is
  reported as `umount` first (and forgotten by its source), and that source's late
  events about it are dropped. Without namespace IDs (before Linux 6.8) nothing can
  be told apart: several namespaces are refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AsyncExitStack, aclosing
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from msgspec.structs import replace

from ..cgroups import container_of_pid
from ..errors import AmountdError, NamespaceError, UsageError
from ..model import End, Event, Mount, Resync, Via
from ..ns import Namespace, locate, namespace_of, pids_by_inode, resolve_ns, walk_namespaces
from ..ns import all_namespaces as list_namespaces
from ..sweep import DEFAULT_SWEEP, SweepSettings
from ..table import MountTable, apply, diff
from . import arm_source
from .base import Change, Source

__all__ = ["MultiSource", "open_watch", "scan_namespaces", "source_label"]

log = logging.getLogger("amountd.sources.multi")

_NOWHERE = Namespace(path=None, pid=None, ns_id=None, inode=0, dev=0)
"""`Source.ns` of a MultiSource: it watches no single namespace (see `namespaces`)."""

_MAX_REASONS = 4


class _Renewed:
    """A sub-source was replaced by a fresh one (`_renew`); `table` is the new one's
    table as armed, before any of its batches (which follow in the channel)."""

    __slots__ = ("reason", "table")

    def __init__(self, table: MountTable, reason: str | None) -> None:
        self.table = table
        self.reason = reason


class _Sub:
    __slots__ = ("ns", "ns_id", "src")

    def __init__(self, ns: Namespace, ns_id: int, src: Source) -> None:
        self.ns = ns
        self.ns_id = ns_id
        self.src = src

    @property
    def label(self) -> str:
        return f"mount namespace {self.ns_id} ({self.ns.label})"


_Item = tuple[_Sub, list[Change] | BaseException | _Renewed]

_CALM = 60.0
"""A sub-source that failed after running this long is renewed at once; one that fails
again sooner waits (1 s, doubling up to `_MAX_BACKOFF`) so a fault cannot spin."""
_MAX_BACKOFF = 30.0


async def open_one(
    kind: str,
    ns: Namespace,
    *,
    unlimited_queue: bool = False,
    sweep: SweepSettings = DEFAULT_SWEEP,
) -> Source:
    """One armed sub-source: fanotify, else (auto) listmount, else mountinfo, with the
    reason why (as `open_source` picks)."""
    return await arm_source(kind, ns, unlimited_queue=unlimited_queue, sweep=sweep)


def scan_namespaces(seen: frozenset[int]) -> tuple[set[int], list[Namespace]]:
    """(the IDs of every mount namespace now, the ones not in `seen`), by the kernel's
    walk (NS_MNT_GET_PREV/NEXT from our own namespace: one ioctl per namespace, a fstat
    per new one, a /proc scan only if one is new), or by /proc where the walk is not
    available. Blocking: run it in a thread."""
    from ..kernel import consts as c
    from ..kernel.errors import KernelError
    from ..kernel.syscalls import mntns_info

    own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    found: list[tuple[int, os.stat_result]] = []
    try:
        try:
            ids = {mntns_info(own)[1]}
        except KernelError:  # no walk on this kernel: every namespace a process is in
            spaces = [ns for ns in list_namespaces() if ns.ns_id is not None]
            return {ns.ns_id for ns in spaces if ns.ns_id is not None}, [
                ns for ns in spaces if ns.ns_id not in seen
            ]
        if next(iter(ids)) not in seen:
            found.append((next(iter(ids)), os.fstat(own)))
        for op in (c.NS_MNT_GET_PREV, c.NS_MNT_GET_NEXT):
            for fd, ns_id in walk_namespaces(own, op):
                ids.add(ns_id)
                if ns_id not in seen:
                    found.append((ns_id, os.fstat(fd)))
    finally:
        os.close(own)
    if not found:
        return ids, []
    pids = pids_by_inode()
    return ids, [namespace_of(pids.get((st.st_dev, st.st_ino)), st, ns_id) for ns_id, st in found]


class MultiSource(Source):
    """Several mount namespaces (a fixed list, or all of them and new ones as they
    appear) as one stream of changes. Use it with `async with`: its readers are tasks
    that live as long as the `async with` body."""

    kind = "multi"

    def __init__(
        self,
        namespaces: Sequence[Namespace] = (),
        *,
        all_namespaces: bool = False,
        source: str = "auto",
        unlimited_queue: bool = False,
        sweep: SweepSettings = DEFAULT_SWEEP,
        rescan: float = 1.0,
        buffer: int = 64,
    ) -> None:
        super().__init__(_NOWHERE)
        if all_namespaces == bool(namespaces):
            raise UsageError("watch either a list of namespaces or all of them")
        from . import SOURCES

        if source not in SOURCES:
            raise UsageError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
        self.fixed = list(namespaces)
        self.all_namespaces = all_namespaces
        self.source = source
        self.unlimited_queue = unlimited_queue
        self.sweep = sweep
        self.rescan = rescan
        self._subs: dict[int, _Sub] = {}
        self._keys: dict[int, set[int]] = {}  # ns_id -> the union's keys of that namespace
        self._seen: set[int] = set()  # the ns_ids considered (watched, ended or refused)
        self.skipped: list[str] = []
        """Namespaces that could not be watched, each with why (all_namespaces only)."""
        self.ended: list[int] = []
        self._send: MemoryObjectSendStream[_Item]
        self._recv: MemoryObjectReceiveStream[_Item]
        self._send, self._recv = anyio.create_memory_object_stream[_Item](buffer)
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: AsyncExitStack | None = None

    @property
    def ns_id(self) -> int | None:
        return None

    @property
    def namespaces(self) -> list[Namespace]:
        """The namespaces watched now."""
        return [s.ns for s in self._subs.values()]

    @property
    def ns_ids(self) -> list[int]:
        return list(self._subs)

    @property
    def source_label(self) -> str:
        """What the `ready` frame names: the sub-sources' kinds ("fanotify", or
        "fanotify+mountinfo" where some namespace fell back)."""
        kinds = sorted({s.src.kind for s in self._subs.values()})
        return "+".join(kinds) or "fanotify"

    def table_of(self, ns_id: int) -> MountTable:
        """One namespace's part of the union table."""
        table = self.table
        return MountTable(table[k] for k in self._keys.get(ns_id, ()))

    # --- arming --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self.arm()
        except BaseException:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            try:
                await stack.aclose()  # the task group: its tasks are cancelled
            finally:
                self.close()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            if self._stack is not None:
                await self._stack.aclose()  # the task group: its tasks are cancelled
        finally:
            self.close()

    async def arm(self) -> None:
        tg = self._tg
        if tg is None:
            raise RuntimeError("a MultiSource is armed by `async with`")
        if self.all_namespaces:
            spaces = await anyio.to_thread.run_sync(list_namespaces)
        else:
            spaces = self.fixed
        for ns in spaces:
            if ns.ns_id is None:
                raise NamespaceError(
                    f"this kernel ({os.uname().release}) gives no mount namespace IDs "
                    "(Linux 6.8+): several namespaces cannot be told apart; watch one"
                )
            if ns.ns_id in self._seen:
                continue  # two PIDs of one namespace: watched once
            self._note(ns.ns_id)
            try:
                src = await self._open(ns)
            except (AmountdError, OSError) as e:
                # A namespace of the host's walk may be dying while we arm (its process
                # exiting): skipped; one the user named is an error.
                if not self.all_namespaces:
                    raise
                self._skip(ns, e)
                continue
            self._adopt(_Sub(ns, ns.ns_id, src))
        self.reason = self._reasons()
        for sub in self._subs.values():
            tg.start_soon(self._run, sub)
        if self.all_namespaces:
            tg.start_soon(self._discover)
        log.info(
            "watching %d mount namespaces%s",
            len(self._subs),
            f" ({len(self.skipped)} could not be watched)" if self.skipped else "",
        )

    async def _open(self, ns: Namespace) -> Source:
        src = await open_one(
            self.source, ns, unlimited_queue=self.unlimited_queue, sweep=self.sweep
        )
        if not len(src.table):  # freed while we armed: nothing more will come
            src.close()
            raise NamespaceError(f"the mount namespace of {ns.label} is gone")
        return src

    def _note(self, ns_id: int) -> None:
        self._seen.add(ns_id)

    def _skip(self, ns: Namespace, e: BaseException) -> None:
        why = f"mount namespace {ns.ns_id} ({ns.label}): {e}"
        self.skipped.append(why)
        log.info("not watching %s", why)

    def _adopt(self, sub: _Sub) -> None:
        """At arm time: the sub-source's table joins the union (a stale holder of a
        reused 32-bit ID gives way, as in `_absorb`)."""
        self._subs[sub.ns_id] = sub
        keys = self._keys.setdefault(sub.ns_id, set())
        table = self.table
        for rec in sub.src.table:
            m = _stamped(rec, sub.ns_id)
            cur = table.get(m.key)
            if cur is not None and cur.ns_id != sub.ns_id:
                self._forget(cur)
            table.add(m)
            keys.add(m.key)

    def _reasons(self) -> str | None:
        notes = [f"{s.label}: {s.src.reason}" for s in self._subs.values() if s.src.reason]
        if len(notes) > _MAX_REASONS:
            notes[_MAX_REASONS:] = [f"and {len(notes) - _MAX_REASONS} more namespaces"]
        if self.skipped:
            notes.append(f"{len(self.skipped)} namespaces could not be watched")
        return "; ".join(notes) or None

    # --- the readers ------------------------------------------------------------------

    async def _run(self, sub: _Sub) -> None:
        """One sub-source's batches into the channel for as long as its namespace lives.

        A sub-source that fails (or stops) does not end the namespace, nor the server: it
        is replaced by a fresh one (`_renew`) and the consumer gets `resync` and the
        difference. A mountinfo watch whose process exits while the namespace lives on
        (other processes are in it) goes on through another process of it, with no
        `resync`: the difference is reported like any other mountinfo change. An
        unexpected error here is handed to the consumer, which raises it."""
        send = self._send
        backoff = 0.0
        try:
            while True:
                started = anyio.current_time()
                end: list[Change] | None = None
                failure: Exception | str | None = None
                try:
                    async with aclosing(sub.src.changes()) as batches:
                        async for batch in batches:
                            at = next((i for i, f in enumerate(batch) if type(f) is End), None)
                            if at is not None:
                                if at:
                                    await send.send((sub, batch[:at]))
                                end = batch[at:]
                                break
                            await send.send((sub, batch))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    raise  # the consumer is gone
                except Exception as e:
                    failure = e
                if end is not None and sub.src.kind not in ("mountinfo", "listmount"):
                    await send.send((sub, end))  # the namespace was freed
                    return
                if end is None:  # failed, or stopped without a word
                    why = failure or "its stream stopped"
                    log.warning("the watch of %s failed: %s", sub.label, why)
                    calm = anyio.current_time() - started >= _CALM
                    backoff = 0.0 if calm else min(max(backoff * 2, 1.0), _MAX_BACKOFF)
                    await anyio.sleep(backoff)
                reason = None if end is not None else "error"
                renewed = await self._renew(sub, reason)
                if renewed is None:
                    gone = f"{sub.label} is gone"
                    await send.send((sub, end or [End(reason=gone)]))
                    return
                await send.send((sub, renewed))
        except Exception as e:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await send.send((sub, e))
        finally:
            sub.src.close()

    async def _renew(self, sub: _Sub, reason: str | None) -> _Renewed | None:
        """A fresh sub-source for `sub`'s namespace in place of its current one (found
        again through a live process of it, or the kernel's walk); None once the
        namespace is gone. Opening is retried (with backoff) while it fails."""
        delay = 1.0
        sub.src.close()  # an open mountinfo file would keep the namespace alive
        while True:
            ns = await anyio.to_thread.run_sync(locate, sub.ns)
            if ns is None:
                return None
            try:
                src = await open_one(
                    self.source, ns, unlimited_queue=self.unlimited_queue, sweep=self.sweep
                )
            except NamespaceError as e:
                if ns.pid is None:  # no process left in it, and mountinfo needs one
                    log.info("%s can no longer be watched: %s", sub.label, e)
                    return None
                failed: Exception = e
            except (AmountdError, OSError) as e:
                failed = e
            else:
                break
            log.warning("watching %s again failed: %s; next try in %g s", sub.label, failed, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF)
        if not len(src.table):  # freed while we armed
            src.close()
            return None
        sub.src, sub.ns = src, ns  # the old one was closed above
        log.info(
            "%s: watching it afresh with %s%s",
            sub.label,
            src.kind,
            " (its process exited; another one is in it)" if reason is None else "",
        )
        return _Renewed(MountTable(src.table), reason)

    async def _discover(self) -> None:
        """Every `rescan` seconds, watch the namespaces that appeared since (and forget
        the IDs of those that are gone, so `_seen` stays as large as the host's list)."""
        while True:
            await anyio.sleep(self.rescan)
            try:
                ids, found = await anyio.to_thread.run_sync(scan_namespaces, frozenset(self._seen))
            except OSError as e:
                log.warning("looking for new mount namespaces failed: %s", e)
                continue
            self._seen &= ids | set(self._subs)
            for ns in found:
                await self._add(ns)

    async def _add(self, ns: Namespace) -> None:
        assert ns.ns_id is not None and self._tg is not None
        if ns.ns_id in self._seen:
            return
        self._note(ns.ns_id)
        try:
            src = await self._open(ns)
        except (AmountdError, OSError) as e:
            self._skip(ns, e)
            return
        sub = _Sub(ns, ns.ns_id, src)
        self._subs[sub.ns_id] = sub  # closed by close() from now on
        self._keys.setdefault(sub.ns_id, set())
        now = time.time()
        # `resync` (reason `found`) announces the namespace and what runs in it; its table
        # follows as `mount` events learnt by reading it.
        container = await anyio.to_thread.run_sync(container_of_pid, ns.pid)
        burst: list[Change] = [Resync(seq=0, reason="found", ns_id=ns.ns_id, container=container)]
        burst += [
            Event(seq=0, time=now, action="mount", via="resync", mount=m)
            for m in src.table.mounts()
        ]
        log.info(
            "new %s: watching it with %s%s",
            sub.label,
            src.kind,
            f" ({src.reason})" if src.reason else "",
        )
        await self._send.send((sub, burst))
        self._tg.start_soon(self._run, sub)

    # --- the merged stream -------------------------------------------------------------

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        recv = self._recv
        if not self.all_namespaces and not self._subs:
            yield [End(reason="every watched mount namespace has ended")]
            return
        while True:
            sub, item = await recv.receive()
            if isinstance(item, BaseException):
                raise item
            batch = self._difference(sub, item) if isinstance(item, _Renewed) else item
            out = self._absorb(sub, batch)
            if out:
                yield out
            if not self.all_namespaces and not self._subs:
                return

    def _absorb(self, sub: _Sub, batch: list[Change]) -> list[Change]:
        """A sub-source's batch, applied to the union and marked with its namespace."""
        ns = sub.ns_id
        table = self.table
        keys = self._keys.setdefault(ns, set())
        out: list[Change] = []
        for frame in batch:
            if type(frame) is Event:
                ev = _stamped_event(frame, ns)
                m = ev.mount
                key = m.key
                if m.id is None:  # a 32-bit ID: another namespace may hold it (see above)
                    cur = table.get(key)
                    if cur is None or cur.ns_id != ns:
                        if ev.action != "mount":
                            continue  # about a mount already reported gone
                        if cur is not None:
                            out.append(self._forget(cur))
                apply(table, ev)
                if ev.action == "umount":
                    keys.discard(key)
                else:
                    keys.add(key)
                out.append(ev)
            elif type(frame) is Resync:
                out.append(frame if frame.ns_id == ns else replace(frame, ns_id=ns))
            elif type(frame) is End:
                self._finish(sub, frame, out)
                break
        return out

    def _difference(self, sub: _Sub, renewed: _Renewed) -> list[Change]:
        """From what was yielded of the namespace to what its new sub-source saw when
        armed: the frames to absorb (`resync` first, if changes may have been missed)."""
        ns = sub.ns_id
        before = MountTable(self.table[k] for k in self._keys.get(ns, ()))
        after = MountTable(_stamped(m, ns) for m in renewed.table)
        via: Via = "mountinfo" if renewed.reason is None else "resync"
        out: list[Change] = []
        if renewed.reason is not None:
            out.append(Resync(seq=0, reason=renewed.reason, ns_id=ns))
        out += diff(before, after, via=via, time=time.time(), ns_id=ns)
        return out

    def _forget(self, m: Mount) -> Event:
        """A 32-bit ID now used by another namespace: its old holder is gone."""
        self.table.pop(m.key)
        assert m.ns_id is not None
        self._keys.get(m.ns_id, set()).discard(m.key)
        owner = self._subs.get(m.ns_id)
        if owner is not None:
            owner.src.table.pop(m.key)  # so its next diff does not report it again
        return Event(seq=0, time=time.time(), action="umount", via="mountinfo", mount=m)

    def _finish(self, sub: _Sub, end: End, out: list[Change]) -> None:
        ns = sub.ns_id
        left = MountTable(self.table[k] for k in self._keys.pop(ns, ()))
        if len(left):
            for ev in diff(left, MountTable(), via="resync", time=time.time()):
                self.table.pop(ev.mount.key)
                out.append(ev)
        out.append(end if end.ns_id == ns else replace(end, ns_id=ns))
        self._subs.pop(ns, None)
        self.ended.append(ns)
        log.info("%s ended: %s", sub.label, end.reason)
        if not self.all_namespaces and not self._subs:
            out.append(End(reason="every watched mount namespace has ended"))

    def close(self) -> None:
        for sub in list(self._subs.values()):
            sub.src.close()
        self._send.close()
        self._recv.close()


def _stamped(m: Mount, ns_id: int) -> Mount:
    return m if m.ns_id == ns_id else replace(m, ns_id=ns_id)


def _stamped_event(ev: Event, ns_id: int) -> Event:
    """The event with its records marked with their namespace (a new value if need be)."""
    if ev.mount.ns_id == ns_id and (ev.old is None or ev.old.ns_id == ns_id):
        return ev
    old = None if ev.old is None else _stamped(ev.old, ns_id)
    return replace(ev, mount=_stamped(ev.mount, ns_id), old=old)


@contextlib.asynccontextmanager
async def open_watch(
    kind: str,
    *,
    ns: str | None = None,
    namespaces: Sequence[str] | None = None,
    all_namespaces: bool = False,
    unlimited_queue: bool = False,
    sweep: SweepSettings = DEFAULT_SWEEP,
) -> AsyncIterator[Source]:
    """What `amountd serve` watches: one namespace (`ns`, default ours) with the source
    of today, or several (`namespaces`: PIDs or namespace files; `all_namespaces`)
    merged by a MultiSource."""
    from . import open_source

    if all_namespaces and (ns is not None or namespaces):
        raise UsageError("--ns and --all-namespaces exclude each other")
    specs = [*([ns] if ns is not None else []), *(namespaces or [])]
    if not all_namespaces and len(specs) <= 1:
        one = resolve_ns(specs[0] if specs else None)
        async with open_source(kind, one, unlimited_queue=unlimited_queue, sweep=sweep) as src:
            log.info(
                "watching the mount namespace of %s with %s%s",
                one.label,
                src.kind,
                f" ({src.reason})" if src.reason else "",
            )
            yield src
        return
    multi = MultiSource(
        [resolve_ns(s) for s in specs],
        all_namespaces=all_namespaces,
        source=kind,
        unlimited_queue=unlimited_queue,
        sweep=sweep,
    )
    async with multi:
        if multi.reason:
            log.info("%s", multi.reason)
        yield multi


def source_label(src: Source) -> str:
    """What the `ready` frame names as the source."""
    return src.source_label if isinstance(src, MultiSource) else src.kind
