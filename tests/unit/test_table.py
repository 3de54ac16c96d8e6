"""The mount table: tree order, identity, classification, diff and apply.

The property tests check the invariant every source and consumer rely on: applying
diff(A, B) to A, in order, gives exactly B, and the order respects both trees.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amountd.model import End, Event, Mount, Ready, Resync, Snapshot, fspath
from amountd.mountinfo import parse_mountinfo
from amountd.table import (
    MountTable,
    apply,
    apply_frame,
    classify,
    diff,
    parent_key,
    same_mount,
    split_change,
)

from ..factories import mount

DATA = Path(__file__).parent.parent / "data"


def mk(
    key: int,
    parent: int,
    target: str,
    *,
    unique: bool = False,
    dev: str | None = None,
    **kw: object,
) -> Mount:
    """A tmpfs record; with `unique`, `key`/`parent` are unique IDs and legacy IDs are small."""
    dev = dev if dev is not None else f"0:{key % 1000}"
    if unique:
        return mount(
            key, target, parent, legacy_id=key % 100, legacy_parent_id=parent % 100, dev=dev, **kw
        )
    return mount(key, target, parent, ids="legacy", dev=dev, **kw)


def run(old: MountTable, new: MountTable) -> list[Event]:
    return diff(old, new, via="mountinfo", time=1.5)


def actions(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.action, e.mount.key) for e in events]


def applied(table: MountTable, events: list[Event]) -> MountTable:
    t = table.copy()
    for e in events:
        apply(t, e)
    return t


# --- MountTable ---------------------------------------------------------------------


def test_table_basics() -> None:
    a, b = mk(10, 1, "/"), mk(11, 10, "/a")
    t = MountTable([b, a])
    assert len(t) == 2
    assert 10 in t and 12 not in t
    assert t.get(11) is b and t.get(12) is None and t[10] is a
    assert sorted(m.key for m in t) == [10, 11]
    c = t.copy()
    del c[11]
    assert 11 in t and 11 not in c
    assert t != c and t == MountTable([a, b])
    assert MountTable() == MountTable([])
    assert t.children(10) == [b] and t.children(11) == []
    t.add(mk(12, 10, "/b"))
    assert t.pop(12) is not None and t.pop(12) is None


def test_key_needs_an_id() -> None:
    with pytest.raises(ValueError, match="id"):
        MountTable([Mount(target=fspath("/x"))])


def test_unique_id_is_the_key() -> None:
    m = mk(2**32 + 5, 2**32 + 1, "/a", unique=True)
    assert MountTable([m]).get(2**32 + 5) is m
    assert parent_key(m) == 2**32 + 1


def test_tree_order_on_captured_table() -> None:
    mounts = parse_mountinfo((DATA / "host.mountinfo").read_bytes())
    t = MountTable(mounts)
    ordered = t.mounts()
    assert sorted(m.key for m in ordered) == sorted(m.key for m in mounts)
    seen: set[int] = set()
    for m in ordered:
        p = parent_key(m)
        assert p not in t or p in seen, f"{m.target} before its parent"
        seen.add(m.key)
    assert ordered[0].target == "/"
    assert [t.depth(m.key) for m in ordered] == sorted(t.depth(m.key) for m in ordered)
    # the /dev/shm on /dev/shm sits one deeper than the first
    shm = [m for m in ordered if m.target == "/dev/shm"]
    assert [t.depth(m.key) for m in shm] == [2, 3]


def test_tree_order_survives_self_parent_and_cycles() -> None:
    t = MountTable([mk(1, 1, "/"), mk(5, 6, "/x"), mk(6, 5, "/y"), mk(7, 1, "/a")])
    assert t.depth(1) == 0 and t.depth(7) == 1
    assert t.depth(5) in (0, 1) and t.depth(6) in (0, 1)
    ordered = t.mounts()
    assert len(ordered) == 4 and ordered[0].key == 1


# --- same_mount and classify --------------------------------------------------------


def test_same_mount_unique_ids() -> None:
    a = mk(2**32, 2**32 - 1, "/a", unique=True)
    assert same_mount(a, replace_(a, source=fspath("other"), dev="9:9"))
    assert not same_mount(a, replace_(a, id=2**32 + 1))


def test_same_mount_legacy_reuse() -> None:
    a = mk(30, 1, "/a", dev="0:40")
    assert same_mount(a, replace_(a, target=fspath("/b"), options="ro"))
    for change in ({"dev": "0:41"}, {"root": fspath("/sub")}, {"fstype": "ext4"}):
        assert not same_mount(a, replace_(a, **change)), change
    assert not same_mount(a, replace_(a, source=fspath("other")))


def test_classify() -> None:
    a = mk(30, 1, "/a")
    assert classify(a, a) is None
    assert classify(a, replace_(a, target=fspath("/b"))) == "move"
    assert classify(a, replace_(a, legacy_parent_id=2)) == "move"
    assert classify(a, replace_(a, target=fspath("/b"), options="ro")) == "move"
    assert classify(a, replace_(a, options="ro,relatime")) == "remount"
    assert classify(a, replace_(a, fs_options=fspath("rw,size=4k"))) == "remount"
    assert classify(a, replace_(a, options="ro", propagation="shared:1")) == "remount"
    assert classify(a, replace_(a, propagation="shared:1")) == "propagation"
    u = mk(2**32, 2**32 - 1, "/a", unique=True)
    assert classify(u, replace_(u, parent_id=2**32 - 2)) == "move"


def replace_(m: Mount, **kw: object) -> Mount:
    return msgspec.structs.replace(m, **kw)


# --- diff: scenarios ----------------------------------------------------------------


def test_diff_of_equal_tables_is_empty() -> None:
    t = MountTable(parse_mountinfo((DATA / "private_ns.mountinfo").read_bytes()))
    assert run(t, t.copy()) == []
    assert run(MountTable(), MountTable()) == []


def test_diff_fills_event_fields() -> None:
    old = MountTable([mk(10, 1, "/")])
    new = MountTable([mk(10, 1, "/"), mk(11, 10, "/a")])
    (ev,) = diff(old, new, via="resync", time=12.5)
    assert ev == Event(seq=0, time=12.5, action="mount", via="resync", mount=new[11])


def test_diff_stamps_ns_id_only_where_missing() -> None:
    old = MountTable([mk(10, 1, "/")])
    new = MountTable([mk(10, 1, "/"), mk(11, 10, "/a"), mk(12, 10, "/b", ns_id=3)])
    evs = diff(old, new, via="mountinfo", time=0.0, ns_id=7)
    assert [e.mount.ns_id for e in evs] == [7, 3]


def test_umounts_children_first_then_mounts_parents_first() -> None:
    old = MountTable([mk(10, 1, "/"), mk(20, 10, "/a"), mk(21, 20, "/a/b"), mk(22, 21, "/a/b/c")])
    new = MountTable([mk(10, 1, "/"), mk(30, 10, "/x"), mk(31, 30, "/x/y"), mk(32, 31, "/x/y/z")])
    evs = run(old, new)
    assert actions(evs) == [
        ("umount", 22),
        ("umount", 21),
        ("umount", 20),
        ("mount", 30),
        ("mount", 31),
        ("mount", 32),
    ]
    assert evs[0].mount == old[22] and evs[0].old is None
    assert applied(old, evs) == new


def test_move_remount_propagation_carry_old() -> None:
    a, b, c = mk(10, 1, "/"), mk(11, 10, "/a"), mk(12, 10, "/b")
    old = MountTable([a, b, c, mk(13, 10, "/c")])
    b2 = replace_(b, target=fspath("/moved"))
    c2 = replace_(c, options="ro,relatime")
    d2 = replace_(old[13], propagation="shared:4")
    new = MountTable([a, b2, c2, d2])
    evs = run(old, new)
    assert actions(evs) == [("move", 11), ("remount", 12), ("propagation", 13)]
    assert [(e.mount, e.old) for e in evs] == [(b2, b), (c2, c), (d2, old[13])]
    assert applied(old, evs) == new


def test_propagation_and_options_changed_together_are_two_events() -> None:
    """One event per kind of change: `propagation` (only that changed), then `remount`;
    applied in order they give the kernel's record."""
    a, b = mk(10, 1, "/"), mk(11, 10, "/a", fs_options=fspath("rw,size=1024k"))
    old = MountTable([a, b])
    b2 = replace_(
        b, options="ro,relatime", fs_options=fspath("ro,size=2048k"), propagation="shared:7"
    )
    new = MountTable([a, b2])
    evs = run(old, new)
    assert actions(evs) == [("propagation", 11), ("remount", 11)]
    prop, rem = evs
    assert prop.old == b
    assert prop.mount == replace_(b, propagation="shared:7")
    assert (rem.old, rem.mount) == (prop.mount, b2)
    assert applied(old, evs) == new
    # a change of propagation alone, or of options alone, stays one event
    assert [s[0] for s in split_change(b, replace_(b, propagation="shared:7"))] == ["propagation"]
    assert [s[0] for s in split_change(b, replace_(b, options="ro"))] == ["remount"]
    assert split_change(b, b) == []


def test_legacy_id_reused_at_once_is_umount_then_mount() -> None:
    old = MountTable([mk(10, 1, "/"), mk(20, 10, "/mnt", dev="0:50")])
    new = MountTable([mk(10, 1, "/"), mk(20, 10, "/mnt", dev="0:51")])
    evs = run(old, new)
    assert actions(evs) == [("umount", 20), ("mount", 20)]
    assert evs[0].mount.dev == "0:50" and evs[1].mount.dev == "0:51"
    assert applied(old, evs) == new


def test_move_out_of_a_parent_comes_before_its_umount() -> None:
    old = MountTable([mk(10, 1, "/"), mk(20, 10, "/old"), mk(21, 20, "/old/x")])
    new = MountTable([mk(10, 1, "/"), mk(21, 10, "/x")])
    evs = run(old, new)
    assert actions(evs) == [("move", 21), ("umount", 20)]
    assert applied(old, evs) == new


def test_move_under_a_new_mount_comes_after_it() -> None:
    old = MountTable([mk(10, 1, "/"), mk(21, 10, "/x")])
    new = MountTable([mk(10, 1, "/"), mk(30, 10, "/new"), mk(21, 30, "/new/x")])
    evs = run(old, new)
    assert actions(evs) == [("mount", 30), ("move", 21)]
    assert applied(old, evs) == new


def test_unnamed_field_change_is_a_remount() -> None:
    """A source that learns a field later (a null filled in) still converges."""
    u = mk(2**32, 2**32 - 1, "/a", unique=True)
    bare = replace_(u, source=None, fstype=None)
    evs = run(MountTable([bare]), MountTable([u]))
    assert actions(evs) == [("remount", 2**32)]
    assert evs[0].old == bare


def test_diff_on_captured_tables() -> None:
    old = MountTable(parse_mountinfo((DATA / "private_ns.mountinfo").read_bytes()))
    base = next(m for m in old if m.target == "/tmp/mi_cap/base")
    kids = {m.key for m in old if m.target and m.target.startswith("/tmp/mi_cap/base/")}
    new = old.copy()
    for k in kids:
        del new[k]
    del new[base.key]
    evs = run(old, new)
    assert [e.action for e in evs] == ["umount"] * (len(kids) + 1)
    assert evs[-1].mount == base  # the parent goes last
    assert applied(old, evs) == new
    back = run(new, old)
    assert back[0].mount == base and all(e.action == "mount" for e in back)
    assert applied(new, back) == old


# --- apply_frame --------------------------------------------------------------------


def test_apply_frame() -> None:
    t = MountTable([mk(10, 1, "/")])
    m = mk(11, 10, "/a")
    ev = Event(seq=1, time=0.0, action="mount", via="mountinfo", mount=m)
    assert apply_frame(t, ev) is t and t.get(11) == m
    moved = replace_(m, target=fspath("/b"))
    apply_frame(t, Event(seq=2, time=0.0, action="move", via="mountinfo", mount=moved, old=m))
    assert t[11] == moved
    apply_frame(t, Event(seq=3, time=0.0, action="umount", via="mountinfo", mount=moved))
    assert 11 not in t
    apply_frame(t, Event(seq=4, time=0.0, action="umount", via="mountinfo", mount=moved))
    for frame in (
        Ready(source="mountinfo", ns_id=None),
        Resync(seq=5, reason="overflow"),
        End(reason="x"),
    ):
        assert apply_frame(t, frame) is t
    assert t == MountTable([mk(10, 1, "/")])
    snap = apply_frame(t, Snapshot(seq=6, ns_id=None, mounts=[m]))
    assert snap == MountTable([m]) and snap is not t


# --- diff: properties ---------------------------------------------------------------

ROOT = 1  # the parent of top-level mounts; never in a table


@dataclass
class Node:
    """One mount of a generated table; `target` comes from the tree."""

    key: int
    parent: int
    name: str
    dev: int
    lid: int = 0  # the legacy ID, for unique-ID tables
    source: str = "src"
    fstype: str = "tmpfs"
    options: str = "rw"
    fs_options: str = "rw"
    propagation: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def build(nodes: dict[int, Node], unique: bool) -> MountTable:
    def target(k: int) -> str:
        parts: list[str] = []
        while k != ROOT:
            parts.append(nodes[k].name)
            k = nodes[k].parent
        return "/" + "/".join(reversed(parts))

    out = []
    for n in nodes.values():
        fields: dict[str, object] = {
            "target": fspath(target(n.key)),
            "root": fspath("/"),
            "source": fspath(n.source),
            "fstype": n.fstype,
            "options": n.options,
            "fs_options": fspath(n.fs_options),
            "propagation": n.propagation,
            "dev": f"0:{n.dev}",
        }
        if unique:
            plid = nodes[n.parent].lid if n.parent != ROOT else ROOT
            fields.update(id=n.key, parent_id=n.parent, legacy_id=n.lid, legacy_parent_id=plid)
        else:
            fields.update(legacy_id=n.key, legacy_parent_id=n.parent)
        out.append(Mount(**fields))  # type: ignore[arg-type]
    return MountTable(out)


def descendants(nodes: dict[int, Node], key: int) -> set[int]:
    out = {key}
    grew = True
    while grew:
        grew = False
        for n in nodes.values():
            if n.parent in out and n.key not in out:
                out.add(n.key)
                grew = True
    return out


@st.composite
def table_pairs(draw: st.DrawFn, unique: bool) -> tuple[MountTable, MountTable]:
    """Two tables of one namespace, B some changes after A: umounts (with children
    umounted or moved away first), moves, remounts, propagation changes, new mounts,
    and (legacy IDs) keys reused at once by a different mount."""
    devs = iter(range(100, 10_000))
    fresh = iter(range(2**32, 2**33)) if unique else None
    names = st.sampled_from(["a", "b", "c", "ab", "a b"])
    legacy = st.integers(2, 40)

    def new_key(used: set[int], reusable: list[int]) -> int:
        if fresh is not None:
            return next(fresh)
        if reusable and draw(st.booleans()):
            k = draw(st.sampled_from(reusable))
            reusable.remove(k)
            return k
        k = draw(legacy.filter(lambda k: k not in used))
        return k

    def add(nodes: dict[int, Node], reusable: list[int]) -> None:
        key = new_key(set(nodes) | set(reusable), reusable)
        parent = draw(st.sampled_from([ROOT, *nodes]))
        nodes[key] = Node(
            key=key,
            parent=parent,
            name=draw(names),
            dev=next(devs),
            lid=draw(legacy),
            source=draw(st.sampled_from(["src", "other"])),
            propagation=draw(st.sampled_from(["", "shared:1"])),
        )

    a: dict[int, Node] = {}
    for _ in range(draw(st.integers(0, 10))):
        add(a, [])

    b = {k: replace(n) for k, n in a.items()}
    # umounts: a umounted mount's children are umounted too, or moved away first
    removed: list[int] = []
    for k in list(b):
        if k in b and draw(st.integers(0, 3)) == 0:
            for d in sorted(descendants(b, k) - {k}):
                if d not in b:
                    continue
                keep = [p for p in b if p not in descendants(b, k) | descendants(b, d)]
                if keep and draw(st.booleans()):
                    b[d].parent = draw(st.sampled_from(keep))
            for d in descendants(b, k):
                del b[d]
                removed.append(d)
    # moves, remounts, propagation changes
    for k, n in b.items():
        choice = draw(st.integers(0, 6))
        if choice == 0:
            n.parent = draw(st.sampled_from([ROOT, *(p for p in b if p not in descendants(b, k))]))
        elif choice == 1:
            n.name = draw(names)
        elif choice == 2:
            n.options = "ro"
        elif choice == 3:
            n.fs_options = "rw,size=4k"
        elif choice == 4:
            n.propagation = "shared:9" if n.propagation == "" else ""
        elif choice == 5:  # both at once: two events, propagation then remount
            n.options = "ro"
            n.propagation = "shared:9" if n.propagation == "" else ""
    # new mounts, some under the new ones, some (legacy) on a just-freed key
    reusable = [k for k in removed if k not in b]
    for _ in range(draw(st.integers(0, 6))):
        add(b, reusable)
    # and old mounts moved under new ones
    for k in [k for k in b if k in a]:
        if draw(st.integers(0, 5)) == 0:
            n = b[k]
            n.parent = draw(st.sampled_from([ROOT, *(p for p in b if p not in descendants(b, k))]))
    # now and then a reused key whose new mount looks like the old one
    if not unique and removed and draw(st.integers(0, 4)) == 0:
        k = draw(st.sampled_from(removed))
        if k not in b:
            b[k] = replace(a[k], parent=draw(st.sampled_from([ROOT, *b])))
    return build(a, unique), build(b, unique)


def check_diff(old: MountTable, new: MountTable) -> None:
    evs = run(old, new)
    assert applied(old, evs) == new
    assert all(e.seq == 0 and e.via == "mountinfo" and e.time == 1.5 for e in evs)

    pos: dict[tuple[str, int], int] = {}
    for i, e in enumerate(evs):
        k = (e.action, e.mount.key)
        assert k not in pos, f"two {k} events"
        pos[k] = i
        if e.action == "umount":
            assert e.mount == old[e.mount.key] and e.old is None
        elif e.action == "mount":
            assert e.old is None
        elif e.action == "propagation":
            # first of its key's changes: from the old record, only propagation changed
            o = old[e.mount.key]
            assert e.old == o
            assert e.mount == replace_(o, propagation=new[e.mount.key].propagation)
        elif e.action == "remount" and ("propagation", e.mount.key) in pos:
            assert e.old == evs[pos[("propagation", e.mount.key)]].mount
        else:
            assert e.old == old[e.mount.key]
        assert e.action in ("umount", "propagation") or e.mount == new[e.mount.key]

    # what each key's events say matches what the tables say
    for key in set(old.keys()) | set(new.keys()):
        o, n = old.get(key), new.get(key)
        said = sorted(a for a, k in pos if k == key)
        if o is None:
            assert said == ["mount"]
        elif n is None:
            assert said == ["umount"]
        elif not same_mount(o, n):
            assert said == ["mount", "umount"]
        elif o == n:
            assert said == []
        else:
            assert said == sorted(a for a, _, _ in split_change(o, n))

    for (action, key), i in pos.items():
        if action in ("mount", "move"):
            # an arrival comes after its (new) parent's mount
            p = parent_key(new[key])
            if p is not None and ("mount", p) in pos:
                assert pos[("mount", p)] < i, f"{action} {key} before its parent {p} is mounted"
        if action == "mount" and ("umount", key) in pos:
            assert pos[("umount", key)] < i, f"mount of reused {key} before the old one's umount"
        if action == "umount":
            # a umount comes after its children's umounts (by the old tree)
            for child in old:
                if child.key != key and parent_key(child) == key and ("umount", child.key) in pos:
                    assert pos[("umount", child.key)] < i, f"{key} umounted before {child.key}"
        if action in ("remount", "propagation"):
            assert all(j < i for (a, _), j in pos.items() if a not in ("remount", "propagation"))


@settings(max_examples=300)
@given(table_pairs(unique=False))
def test_diff_property_legacy_ids(pair: tuple[MountTable, MountTable]) -> None:
    a, b = pair
    check_diff(a, b)
    check_diff(b, a)


@settings(max_examples=300)
@given(table_pairs(unique=True))
def test_diff_property_unique_ids(pair: tuple[MountTable, MountTable]) -> None:
    a, b = pair
    check_diff(a, b)
    check_diff(b, a)
    # unique IDs are never reused: every key in both tables is one mount
    for m in b:
        if m.key in a:
            assert same_mount(a[m.key], m)


@given(table_pairs(unique=False), table_pairs(unique=False))
def test_diff_between_unrelated_tables(
    p: tuple[MountTable, MountTable], q: tuple[MountTable, MountTable]
) -> None:
    check_diff(p[0], q[1])
