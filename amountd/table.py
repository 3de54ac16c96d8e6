"""Pure: a namespace's mounts by ID, the diff of two tables into events, and applying them.

The table is what lets a source describe what went away (the kernel can no longer stat
a detached mount) and what lets a consumer follow the stream: a consumer that applies
every frame with `apply_frame` ends with the kernel's table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, KeysView

import msgspec

from amountd.model import Action, Event, Frame, Mount, Snapshot, Via

__all__ = [
    "Follower",
    "MountTable",
    "apply",
    "apply_frame",
    "classify",
    "diff",
    "parent_key",
    "same_mount",
    "split_change",
]


def parent_key(m: Mount) -> int | None:
    """The key the parent is filed under, in the same ID space as `m.key`."""
    return m.parent_id if m.id is not None else m.legacy_parent_id


class MountTable:
    """Mounts by `Mount.key`. Iterating yields mounts (in insertion order)."""

    __slots__ = ("_by_key",)

    def __init__(self, mounts: Iterable[Mount] = ()) -> None:
        self._by_key: dict[int, Mount] = {m.key: m for m in mounts}

    def get(self, key: int) -> Mount | None:
        return self._by_key.get(key)

    def __getitem__(self, key: int) -> Mount:
        return self._by_key[key]

    def __setitem__(self, key: int, mount: Mount) -> None:
        self._by_key[key] = mount

    def __delitem__(self, key: int) -> None:
        del self._by_key[key]

    def pop(self, key: int) -> Mount | None:
        return self._by_key.pop(key, None)

    def add(self, mount: Mount) -> None:
        self._by_key[mount.key] = mount

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Mount]:
        return iter(self._by_key.values())

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MountTable):
            return NotImplemented
        return self._by_key == other._by_key

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"MountTable({len(self._by_key)} mounts)"

    def keys(self) -> KeysView[int]:
        return self._by_key.keys()

    def items(self) -> Iterable[tuple[int, Mount]]:
        return self._by_key.items()

    def copy(self) -> MountTable:
        """A shallow copy: the records are shared (treat them as immutable)."""
        t = MountTable()
        t._by_key = self._by_key.copy()
        return t

    def depth(self, key: int) -> int:
        """How many ancestors `key` has in this table (0 when its parent is not here)."""
        return _Depths(self._by_key, {})(key)

    def mounts(self) -> list[Mount]:
        """Tree order: parents before children (by depth, then target, then key)."""
        depth = _Depths(self._by_key, {})
        return sorted(
            self._by_key.values(),
            key=lambda m: (depth(m.key), m.target or "", m.key),
        )

    def children(self, key: int) -> list[Mount]:
        """The mounts whose parent is `key`, in tree order. O(n): for tools and tests."""
        kids = [m for k, m in self._by_key.items() if k != key and parent_key(m) == key]
        kids.sort(key=lambda m: (m.target or "", m.key))
        return kids


class _Depths:
    """Depths by following parent keys, memoized; a self-parent or a cycle stops the walk."""

    __slots__ = ("_by_key", "_memo")

    def __init__(self, by_key: dict[int, Mount], memo: dict[int, int]) -> None:
        self._by_key = by_key
        self._memo = memo

    def __call__(self, key: int) -> int:
        memo = self._memo
        d = memo.get(key)
        if d is not None:
            return d
        by_key = self._by_key
        chain: list[int] = []
        seen: set[int] = set()
        k: int | None = key
        base = -1
        while k is not None and k in by_key:
            d = memo.get(k)
            if d is not None:
                base = d
                break
            if k in seen:  # a cycle (or a self-parent): treat the walk's end as a root
                break
            seen.add(k)
            chain.append(k)
            k = parent_key(by_key[k])
        for k in reversed(chain):
            base += 1
            memo[k] = base
        return memo[key]


def same_mount(a: Mount, b: Mount) -> bool:
    """True when `b` can be `a` later on.

    Unique IDs are never reused, so they decide. The 32-bit IDs are reused by the kernel
    at once: with only those, a different device, root, type or source means one mount
    went and another came under the same ID.
    """
    if a.id is not None and b.id is not None:
        return a.id == b.id
    return (
        a.legacy_id == b.legacy_id
        and a.dev == b.dev
        and a.root == b.root
        and a.fstype == b.fstype
        and a.source == b.source
    )


def classify(old: Mount, new: Mount) -> Action | None:
    """What changed between two states of the same mount (None: nothing we name)."""
    if (
        old.target != new.target
        or old.parent_id != new.parent_id
        or old.legacy_parent_id != new.legacy_parent_id
    ):
        return "move"
    if old.options != new.options or old.fs_options != new.fs_options:
        return "remount"
    if old.propagation != new.propagation:
        return "propagation"
    return None


def split_change(old: Mount, new: Mount) -> list[tuple[Action, Mount, Mount]]:
    """One (action, before, after) per kind of change between two states of one mount.

    A mount whose propagation changed along with anything else (its options, say) gives
    `propagation` first (only the propagation changed: `old` with `new`'s), then the
    rest as a `remount`: applying them in order gives `new`. A move stays one event
    (its record is the mount's whole new state).
    """
    action = classify(old, new)
    if action is None:
        if old == new:
            return []
        action = "remount"  # a field classify does not name
    if action != "remount" or old.propagation == new.propagation:
        return [(action, old, new)]
    mid = msgspec.structs.replace(old, propagation=new.propagation)
    return [("propagation", old, mid), ("remount", mid, new)]


def diff(
    old: MountTable,
    new: MountTable,
    *,
    via: Via,
    time: float,
    ns_id: int | None = None,
) -> list[Event]:
    """The events that turn `old` into `new`, in an order that respects the trees.

    1. moves whose new parent is already there (before any umount: a mount moved out
       of a parent that is then unmounted left it first);
    2. umounts, children before parents (by the old tree);
    3. mounts and the remaining moves, parents before children (by the new tree), so
       a mount moved under a new mount comes after that mount;
    4. remounts and propagation changes, in tree order: a mount whose propagation and
       options both changed gives two events, `propagation` then `remount`
       (`split_change`), one per kind of change.

    Applying the events to a copy of `old` in order gives exactly `new`: a record that
    changed in a field `classify` does not name (e.g. a field a source filled in
    later) is reported as a `remount` carrying `old`. `ns_id`, if given, is stamped on
    event records that have none.
    """
    old_by, new_by = old._by_key, new._by_key
    umounts: list[Mount] = []
    mounted: list[Mount] = []
    moves: list[tuple[Mount, Mount]] = []
    changes: list[tuple[Mount, list[tuple[Action, Mount, Mount]]]] = []
    for key, o in old_by.items():
        n = new_by.get(key)
        if n is None:
            umounts.append(o)
        elif n is o or n == o:
            continue
        elif same_mount(o, n):
            if classify(o, n) == "move":
                moves.append((o, n))
            else:
                changes.append((n, split_change(o, n)))
        else:
            umounts.append(o)
            mounted.append(n)
    if len(new_by) != len(old_by) - len(umounts) + len(mounted):
        mounted.extend(n for key, n in new_by.items() if key not in old_by)

    old_depth = _Depths(old_by, {})
    new_depth = _Depths(new_by, {})
    mounted_keys = {m.key for m in mounted}

    def stamp(m: Mount) -> Mount:
        if ns_id is not None and m.ns_id is None:
            return msgspec.structs.replace(m, ns_id=ns_id)
        return m

    def event(action: Action, m: Mount, o: Mount | None = None) -> Event:
        return Event(
            seq=0,
            time=time,
            action=action,
            via=via,
            mount=stamp(m),
            old=None if o is None else stamp(o),
        )

    def tree(m: Mount) -> tuple[int, str, int]:
        return (new_depth(m.key), m.target or "", m.key)

    out: list[Event] = []
    early = [(o, n) for o, n in moves if parent_key(n) not in mounted_keys]
    late = [(o, n) for o, n in moves if parent_key(n) in mounted_keys]
    early.sort(key=lambda p: tree(p[1]))
    out.extend(event("move", n, o) for o, n in early)

    umounts.sort(key=lambda m: (-old_depth(m.key), m.target or "", m.key))
    out.extend(event("umount", m) for m in umounts)

    arrivals: list[tuple[tuple[int, str, int], Mount, Mount | None]] = [
        (tree(m), m, None) for m in mounted
    ]
    arrivals.extend((tree(n), n, o) for o, n in late)
    arrivals.sort(key=lambda a: a[0])
    out.extend(event("mount", m) if o is None else event("move", m, o) for _, m, o in arrivals)

    changes.sort(key=lambda c: tree(c[0]))
    out.extend(event(action, n, o) for _, steps in changes for action, o, n in steps)
    return out


def apply(table: MountTable, event: Event) -> None:
    """One event, in place. An umount of a key the table lacks is no error (filtered views)."""
    m = event.mount
    if event.action == "umount":
        table.pop(m.key)
    else:
        table[m.key] = m


def apply_frame(table: MountTable, frame: Frame) -> MountTable:
    """What a consumer does with each frame: a snapshot replaces the table, an event
    changes it, the rest leave it alone. Returns the table to keep."""
    if isinstance(frame, Snapshot):
        return MountTable(frame.mounts)
    if isinstance(frame, Event):
        apply(table, frame)
    return table


class Follower:
    """A consumer's table kept across resyncs: after the first snapshot, a fresh one
    (after `resync`) becomes the events that turn what the consumer held into it,
    `via: "resync"` and numbered with the snapshot's seq, so a person sees what changed
    while they were not told (an umount during a server's restart) rather than the
    whole table again."""

    __slots__ = ("table",)

    def __init__(self) -> None:
        self.table: MountTable | None = None

    def feed(self, frame: Frame, now: float) -> list[Frame]:
        """The frames to hand on for `frame` (the snapshot replaced by its difference)."""
        if isinstance(frame, Snapshot):
            new = MountTable(frame.mounts)
            old, self.table = self.table, new
            if old is None:
                return [frame]
            events = diff(old, new, via="resync", time=now)
            return [msgspec.structs.replace(e, seq=frame.seq) for e in events]
        if isinstance(frame, Event) and self.table is not None:
            apply(self.table, frame)
        return [frame]
