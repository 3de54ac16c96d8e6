"""Pure tests of amountd.kernel.layouts on captured kernel buffers and hand-built ones.

The captured fixtures (tests/data/kernel/*.json, made by capture.py on Linux 6.18) hold
each statmount answer next to the mountinfo line the kernel wrote for the same mount,
so the decoding is checked against the kernel's own rendering, with no kernel needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amountd.kernel import consts as c
from amountd.kernel.errors import (
    KernelError,
    MalformedBuffer,
    MountGone,
    PermissionDenied,
    Unsupported,
    from_errno,
)
from amountd.kernel.layouts import (
    FanEvent,
    StatMount,
    build_mnt_id_req,
    diff_id_lists,
    fs_options_of,
    options_of,
    pack_ids,
    parse_fanotify_events,
    parse_statmount,
    propagation_of,
    statmount_to_mount,
    unpack_ids,
)
from amountd.model import Mount, fspath_bytes

DATA = Path(__file__).parent.parent / "data" / "kernel"
STATMOUNT = json.loads((DATA / "statmount.json").read_text())["cases"]
FANOTIFY = json.loads((DATA / "fanotify.json").read_text())["cases"]
SM_BY_NAME = {case["name"]: case for case in STATMOUNT}
A, D, OVF = c.FAN_MNT_ATTACH, c.FAN_MNT_DETACH, c.FAN_Q_OVERFLOW
COMPARED = [f for f in Mount.__struct_fields__ if f not in ("id", "parent_id", "ns_id")]


def _mountinfo(case: dict[str, Any]) -> Mount:
    from amountd.mountinfo import parse_line

    return parse_line(bytes.fromhex(case["mountinfo_hex"]))


def _decode(name: str) -> tuple[StatMount, Mount]:
    case = SM_BY_NAME[name]
    sm = parse_statmount(bytes.fromhex(case["hex"]))
    return sm, statmount_to_mount(sm, case["mask"])


# ----------------------------------------------------------------- statmount, captured


@pytest.mark.parametrize(
    "case",
    [case for case in STATMOUNT if case["mask"] & c.STATMOUNT_MOUNT == c.STATMOUNT_MOUNT],
    ids=lambda case: case["name"],
)
def test_statmount_equals_the_kernels_mountinfo_line(case: dict[str, Any]) -> None:
    sm = parse_statmount(bytes.fromhex(case["hex"]))
    got = statmount_to_mount(sm)
    want = _mountinfo(case)
    assert {f: getattr(got, f) for f in COMPARED} == {f: getattr(want, f) for f in COMPARED}
    assert got.id == sm.mnt_id and got.id is not None and got.id >= 1 << 31
    assert got.parent_id == sm.mnt_parent_id
    assert got.ns_id == sm.mnt_ns_id and got.ns_id


def test_sizes_and_masks_of_the_captures() -> None:
    for case in STATMOUNT:
        raw = bytes.fromhex(case["hex"])
        sm = parse_statmount(raw)
        assert sm.size == len(raw) >= c.STATMOUNT_FIXED_SIZE
        assert sm.mask & ~case["mask"] == 0  # the kernel answers only what was asked


def test_tmpfs_options_come_from_mnt_opts_and_sb_flags() -> None:
    sm, m = _decode("tmpfs_size")
    assert sm.mnt_opts == b"size=1024k,nr_inodes=1000,mode=700"
    assert m.fs_options == "rw,size=1024k,nr_inodes=1000,mode=700"
    assert m.options == "rw,relatime" and m.source == "tsrc" and m.fstype == "tmpfs"
    assert m.propagation == ""


def test_all_fields_answer_has_arrays_and_supported_mask() -> None:
    sm, m = _decode("tmpfs_size_all_fields")
    assert sm.opt_array == (b"size=1024k", b"nr_inodes=1000", b"mode=700")
    assert sm.supported_mask is not None and sm.supported_mask & c.STATMOUNT_MOUNT
    assert sm.mnt_uidmap is None  # not idmapped: left out of the mask
    assert m == statmount_to_mount(parse_statmount(bytes.fromhex(SM_BY_NAME["tmpfs_size"]["hex"])))


def test_answer_without_strings_leaves_string_fields_none() -> None:
    sm, m = _decode("tmpfs_no_strings")
    assert sm.size == c.STATMOUNT_FIXED_SIZE
    assert (sm.fs_type, sm.mnt_point, sm.sb_source, sm.mnt_opts) == (None,) * 4
    assert (m.target, m.root, m.source, m.fstype, m.fs_options) == (None,) * 5
    assert m.options == "rw,relatime" and m.dev is not None and m.legacy_id is not None


def test_bind_of_a_subdirectory_has_its_root() -> None:
    _, m = _decode("bind_subdir")
    assert m.root == "/sub"


def test_ro_bind_is_ro_per_mount_but_rw_superblock() -> None:
    _, m = _decode("ro_bind")
    assert m.options == "ro,relatime"
    assert m.fs_options is not None and m.fs_options.startswith("rw,")


def test_remount_ro_is_a_superblock_flag() -> None:
    sm, m = _decode("remount_ro_superblock")
    assert sm.sb_flags is not None and sm.sb_flags & c.SB_RDONLY
    assert m.fs_options == "ro" and m.options == "ro,relatime"


def test_mount_flags_in_kernel_order() -> None:
    _, m = _decode("mnt_flags_noatime")
    assert m.options == "rw,nosuid,nodev,noexec,noatime,nodiratime,nosymfollow"


def test_strictatime_shows_no_atime_word_and_sb_flags_show() -> None:
    sm, m = _decode("strictatime_sync_dirsync_lazytime")
    assert sm.mnt_attr is not None and sm.mnt_attr & c.MOUNT_ATTR__ATIME == c.MOUNT_ATTR_STRICTATIME
    assert m.options == "rw"
    assert m.fs_options == "rw,sync,dirsync,lazytime"


def test_shared_slave_unbindable() -> None:
    shared, m_shared = _decode("shared")
    slave, m_slave = _decode("shared_and_slave")
    _, m_unb = _decode("unbindable")
    assert m_shared.propagation == f"shared:{shared.mnt_peer_group}"
    assert m_slave.propagation == f"shared:{slave.mnt_peer_group} master:{shared.mnt_peer_group}"
    assert m_unb.propagation == "unbindable"


def test_propagate_from_is_shown_when_it_differs_from_master() -> None:
    sm, m = _decode("slave_propagate_from")
    assert sm.propagate_from and sm.mnt_master and sm.propagate_from != sm.mnt_master
    assert m.propagation == f"master:{sm.mnt_master} propagate_from:{sm.propagate_from}"


def test_paths_and_source_are_raw_bytes() -> None:
    sm, m = _decode("escaped_path_and_source")
    assert sm.mnt_point is not None and sm.mnt_point.endswith(b"/we ird\n\\tab\there \xff\xfe")
    assert m.target is not None and fspath_bytes(m.target) == sm.mnt_point
    assert m.source is not None and fspath_bytes(m.source) == b"my src\\with\tspace"
    line = bytes.fromhex(SM_BY_NAME["escaped_path_and_source"]["mountinfo_hex"])
    assert b"we\\040ird\\012\\134tab\\011here\\040\xff\xfe" in line  # mountinfo escapes


def test_a_mount_made_without_source() -> None:
    # fsopen/fsmount with no "source": 6.18 itself answers "none", as mountinfo shows;
    # statmount_to_mount would also say "none" for an answer without sb_source.
    sm, m = _decode("no_source_none")
    assert sm.sb_source == b"none"
    assert m.source == "none"


def test_filesystem_options_are_unescaped() -> None:
    sm, m = _decode("overlay_escaped_option")
    assert sm.mnt_opts is not None and b"lo\\040w" in sm.mnt_opts  # escaped like mountinfo
    assert m.fs_options is not None and "/lo w," in m.fs_options


def test_fuse_subtype() -> None:
    if "fuse_subtype" not in SM_BY_NAME:
        pytest.skip("no fuse capture (the capture machine had no /dev/fuse)")
    sm, m = _decode("fuse_subtype")
    assert (sm.fs_type, sm.fs_subtype) == (b"fuse", b"amountdtest")
    assert m.fstype == "fuse.amountdtest"


def test_idmapped() -> None:
    if "idmapped" not in SM_BY_NAME:
        pytest.skip("no idmapped capture")
    sm, m = _decode("idmapped")
    assert sm.mnt_attr is not None and sm.mnt_attr & c.MOUNT_ATTR_IDMAP
    assert sm.mnt_uidmap and sm.mnt_gidmap
    assert m.options is not None and m.options.endswith(",idmapped")


# ---------------------------------------------------------------- statmount, hand-built

_SM = struct.Struct("<IIQIIQIIQQIIQQQQQIIQIIIIIIQIIII")
_STRING_FIELDS = {  # name -> (offset field index in _SM, mask bit)
    "mnt_opts": (1, c.STATMOUNT_MNT_OPTS),
    "fs_type": (7, c.STATMOUNT_FS_TYPE),
    "mnt_root": (17, c.STATMOUNT_MNT_ROOT),
    "mnt_point": (18, c.STATMOUNT_MNT_POINT),
    "fs_subtype": (20, c.STATMOUNT_FS_SUBTYPE),
    "sb_source": (21, c.STATMOUNT_SB_SOURCE),
}


def build_statmount(
    mask: int,
    strings: dict[str, bytes],
    *,
    ints: dict[int, int] | None = None,
    size: int | None = None,
    pad: int = 0,
) -> bytes:
    """A statmount answer laid out like the kernel's (for tests)."""
    values = [0] * 31
    values[2] = mask
    area = b""
    for name, raw in strings.items():
        idx, _bit = _STRING_FIELDS[name]
        values[idx] = len(area)
        area += raw + b"\0"
    for idx, v in (ints or {}).items():
        values[idx] = v
    total = c.STATMOUNT_FIXED_SIZE + len(area)
    values[0] = total if size is None else size
    fixed = _SM.pack(*values).ljust(c.STATMOUNT_FIXED_SIZE, b"\0")
    return fixed + area + b"\0" * pad


def test_statmount_strings_roundtrip_by_mask() -> None:
    mask = c.STATMOUNT_FS_TYPE | c.STATMOUNT_MNT_POINT
    raw = build_statmount(mask, {"fs_type": b"ext4", "mnt_point": b"/a b", "sb_source": b"x"})
    sm = parse_statmount(raw)
    assert (sm.fs_type, sm.mnt_point) == (b"ext4", b"/a b")
    assert sm.sb_source is None  # present in the bytes but not in the mask
    assert parse_statmount(bytearray(raw)) == sm == parse_statmount(memoryview(raw))


def test_statmount_buffer_longer_than_size_is_cut_at_size() -> None:
    raw = build_statmount(c.STATMOUNT_FS_TYPE, {"fs_type": b"tmpfs"}, pad=100)
    assert parse_statmount(raw).size == len(raw) - 100


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "shorter than the 512-byte fixed part"),
        (b"\0" * 100, "shorter than the 512-byte fixed part"),
        (build_statmount(0, {}, size=10_000), "size field 10000"),
        (build_statmount(0, {}, size=100), "size field 100 "),
        (
            build_statmount(c.STATMOUNT_FS_TYPE, {}, ints={7: 50}),
            "fs_type at string offset 50",
        ),
        (
            # the string runs to the end with no NUL
            build_statmount(c.STATMOUNT_MNT_ROOT, {"mnt_root": b"/x"})[:-1] + b"y",
            "mnt_root .* NUL-terminated",
        ),
        (
            build_statmount(c.STATMOUNT_OPT_ARRAY, {"fs_type": b"a"}, ints={22: 3}),
            "opt_array",
        ),
    ],
)
def test_malformed_statmount(raw: bytes, match: str) -> None:
    with pytest.raises(MalformedBuffer, match=match):
        parse_statmount(raw)


@settings(max_examples=200)
@given(st.binary(min_size=0, max_size=800))
def test_statmount_on_garbage_decodes_or_raises_malformed(raw: bytes) -> None:
    for buf in (raw, raw.ljust(c.STATMOUNT_FIXED_SIZE, b"\0")):
        with contextlib.suppress(MalformedBuffer):
            parse_statmount(buf)


_path_bytes = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)


@given(
    point=_path_bytes,
    root=_path_bytes,
    source=st.one_of(st.none(), _path_bytes),
    opts=st.one_of(st.none(), _path_bytes),
    fstype=st.sampled_from([b"tmpfs", b"ext4", b"fuse"]),
    subtype=st.one_of(st.none(), st.sampled_from([b"sshfs", b"x"])),
    attr=st.integers(0, 0x3FFFFF),
    sb_flags=st.integers(0, 2**32 - 1),
)
def test_statmount_to_mount_properties(
    *,
    point: bytes,
    root: bytes,
    source: bytes | None,
    opts: bytes | None,
    fstype: bytes,
    subtype: bytes | None,
    attr: int,
    sb_flags: int,
) -> None:
    strings = {"mnt_point": point, "mnt_root": root, "fs_type": fstype}
    if source is not None:
        strings["sb_source"] = source
    if opts is not None:
        strings["mnt_opts"] = opts
    if subtype is not None:
        strings["fs_subtype"] = subtype
    mask = c.STATMOUNT_SB_BASIC | c.STATMOUNT_MNT_BASIC
    for name in strings:
        mask |= _STRING_FIELDS[name][1]
    ints = {6: sb_flags, 12: attr, 13: c.MS_PRIVATE, 4: 7, 3: 0, 10: 42, 11: 1}
    m = statmount_to_mount(parse_statmount(build_statmount(mask, strings, ints=ints)))
    assert m.target is not None and fspath_bytes(m.target) == point
    assert m.root is not None and fspath_bytes(m.root) == root
    assert m.source is not None and fspath_bytes(m.source) == (
        b"none" if source is None else source
    )
    assert m.fstype == (fstype + (b"." + subtype if subtype else b"")).decode()
    assert m.dev == "0:7" and m.legacy_id == 42 and m.legacy_parent_id == 1
    assert m.propagation == ""
    words = (m.options or "").split(",")
    assert words[0] == ("ro" if attr & c.MOUNT_ATTR_RDONLY else "rw")
    assert ("noexec" in words) == bool(attr & c.MOUNT_ATTR_NOEXEC)
    assert ("relatime" in words) == (attr & c.MOUNT_ATTR__ATIME == 0)
    assert m.fs_options is not None
    assert m.fs_options.split(",")[0] == ("ro" if sb_flags & c.SB_RDONLY else "rw")


# ------------------------------------------------------------------ option renderings


@pytest.mark.parametrize(
    ("attr", "want"),
    [
        (0, "rw,relatime"),
        (c.MOUNT_ATTR_RDONLY, "ro,relatime"),
        (c.MOUNT_ATTR_STRICTATIME, "rw"),
        (c.MOUNT_ATTR_NOATIME | c.MOUNT_ATTR_NODIRATIME, "rw,noatime,nodiratime"),
        (
            c.MOUNT_ATTR_RDONLY
            | c.MOUNT_ATTR_NOSUID
            | c.MOUNT_ATTR_NODEV
            | c.MOUNT_ATTR_NOEXEC
            | c.MOUNT_ATTR_NOATIME
            | c.MOUNT_ATTR_NOSYMFOLLOW
            | c.MOUNT_ATTR_IDMAP,
            "ro,nosuid,nodev,noexec,noatime,nosymfollow,idmapped",
        ),
        (c.MOUNT_ATTR_NODIRATIME | c.MOUNT_ATTR_IDMAP, "rw,nodiratime,relatime,idmapped"),
    ],
)
def test_options_of(attr: int, want: str) -> None:
    assert options_of(attr) == want
    assert options_of(attr) == want  # cached


def test_fs_options_of() -> None:
    assert fs_options_of(0, None) == b"rw"
    assert fs_options_of(c.SB_RDONLY, b"") == b"ro"
    flags = c.SB_LAZYTIME | c.SB_MANDLOCK | c.SB_DIRSYNC | c.SB_SYNCHRONOUS
    assert fs_options_of(flags, b"a=1") == b"rw,sync,dirsync,mand,lazytime,a=1"
    assert fs_options_of(0, b"dir=/a\\040b\\054c\\134") == b"rw,dir=/a b,c\\"
    assert fs_options_of(0, b"odd\\9x\\") == b"rw,odd\\9x\\"  # not an escape: kept


@pytest.mark.parametrize(
    ("prop", "peer", "master", "pfrom", "want"),
    [
        (c.MS_PRIVATE, 0, 0, 0, ""),
        (c.MS_SHARED, 5, 0, 0, "shared:5"),
        (c.MS_SLAVE, 0, 3, 3, "master:3"),
        (c.MS_SLAVE, 0, 3, 0, "master:3"),
        (c.MS_SLAVE, 0, 3, 1, "master:3 propagate_from:1"),
        (c.MS_SHARED | c.MS_SLAVE, 7, 3, 0, "shared:7 master:3"),
        (c.MS_UNBINDABLE, 0, 0, 0, "unbindable"),
        (c.MS_SLAVE | c.MS_UNBINDABLE, 0, 2, 0, "master:2 unbindable"),
    ],
)
def test_propagation_of(prop: int, peer: int, master: int, pfrom: int, want: str) -> None:
    assert propagation_of(prop, peer, master, pfrom) == want


def test_requested_mask_tells_empty_from_not_asked() -> None:
    raw = build_statmount(c.STATMOUNT_SB_BASIC | c.STATMOUNT_FS_TYPE, {"fs_type": b"proc"})
    sm = parse_statmount(raw)
    asked = statmount_to_mount(sm)  # default: the Mount mask, so absent = empty
    assert (asked.source, asked.fs_options) == ("none", "rw")
    narrow = statmount_to_mount(sm, c.STATMOUNT_SB_BASIC | c.STATMOUNT_FS_TYPE)
    assert (narrow.source, narrow.fs_options, narrow.fstype) == (None, None, "proc")


# -------------------------------------------------------------------- mnt_id_req, list


def test_build_mnt_id_req() -> None:
    req = build_mnt_id_req(2**31 + 5, c.STATMOUNT_MOUNT, 77)
    assert len(req) == c.MNT_ID_REQ_SIZE_VER1 == 32
    assert struct.unpack("<IIQQQ", req) == (32, 0, 2**31 + 5, c.STATMOUNT_MOUNT, 77)
    assert struct.unpack("<IIQQQ", build_mnt_id_req(c.LSMT_ROOT))[2] == 2**64 - 1


# ------------------------------------------------------------------- ID lists as bytes

B = 2**31  # unique mount IDs start here


def _diff(old: list[int], new: list[int]) -> tuple[list[int], list[int]]:
    """diff_id_lists on packed lists, checked against plain set arithmetic."""
    got = diff_id_lists(pack_ids(old), pack_ids(new))
    assert got == (sorted(set(old) - set(new)), sorted(set(new) - set(old)))
    return got


def test_pack_and_unpack_ids() -> None:
    ids = [B, B + 7, 2**64 - 2]
    raw = pack_ids(ids)
    assert raw == struct.pack(f"={len(ids)}Q", *ids)  # listmount's layout: native u64s
    assert unpack_ids(raw) == ids and unpack_ids(memoryview(raw)) == ids
    assert pack_ids([]) == b"" and unpack_ids(b"") == []
    with pytest.raises(MalformedBuffer):
        unpack_ids(raw[:-1])


def test_diff_id_lists_edges() -> None:
    ids = [B + i for i in range(0, 3000, 3)]
    assert _diff([], []) == ([], [])
    assert _diff(ids, ids) == ([], [])
    assert _diff(ids, []) == (ids, [])
    assert _diff([], ids) == ([], ids)
    for k in (0, 1, len(ids) // 2, len(ids) - 2, len(ids) - 1):  # one gone, anywhere
        assert _diff(ids, ids[:k] + ids[k + 1 :]) == ([ids[k]], [])
    assert _diff(ids, [*ids, ids[-1] + 1]) == ([], [ids[-1] + 1])  # the usual mount
    # a clone attached with an old ID: below the max, between two listed ones
    assert _diff(ids, sorted([*ids, B + 1000])) == ([], [B + 1000])
    assert _diff(ids, sorted([*ids, B - 1])) == ([], [B - 1])  # below them all
    # an umount and an old clone at once: the count holds, the lists differ
    swapped = sorted([*ids[:10], *ids[11:], B + 31])
    assert len(swapped) == len(ids) and _diff(ids, swapped) == ([ids[10]], [B + 31])
    # a subtree gone (a run of IDs) while new ones arrive above
    assert _diff(ids, ids[:5] + ids[50:] + [B + 5000, B + 5001]) == (
        ids[5:50],
        [B + 5000, B + 5001],
    )
    assert _diff([B, B + 2], [B + 1, B + 3]) == ([B, B + 2], [B + 1, B + 3])  # all differ
    # hundreds scattered (past the budget of probes: the rest done with sets)
    assert _diff(ids, sorted([*ids[::2], B + 1, B + 3001, B + 3002])) == (
        ids[1::2],
        [B + 1, B + 3001, B + 3002],
    )


def test_diff_id_lists_rejects_a_torn_buffer() -> None:
    with pytest.raises(MalformedBuffer):
        diff_id_lists(pack_ids([B]) + b"\0", pack_ids([B]))
    with pytest.raises(MalformedBuffer):
        diff_id_lists(b"", b"\0" * 12)


class _Counted(bytes):
    """A buffer that counts the memcmp probes made on it."""

    probes = 0

    def startswith(self, *a: Any) -> bool:
        _Counted.probes += 1
        return super().startswith(*a)

    def endswith(self, *a: Any) -> bool:
        _Counted.probes += 1
        return super().endswith(*a)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_diff_id_lists_probes_grow_with_the_changes_not_the_length(k: int) -> None:
    n = 100_000
    old = list(range(B, B + n))
    rnd = random.Random(k)
    gone = sorted(rnd.sample(old, k))
    new = sorted(set(old) - set(gone))
    _Counted.probes = 0
    assert diff_id_lists(pack_ids(old), _Counted(pack_ids(new))) == (gone, [])
    assert _Counted.probes <= k * (2 * n.bit_length() + 2)  # gallop, halve, tail check


@pytest.mark.parametrize("seed", range(200))
def test_diff_id_lists_random(seed: int) -> None:
    """Random lists and random changes (few or many, in runs or scattered)."""
    rnd = random.Random(seed)
    n = rnd.choice([0, 1, 2, 3, 17, 64, 500, 2000])
    span = n * 4 + 8
    old = set(rnd.sample(range(B, B + span), n))
    new = set(old)
    for _ in range(rnd.choice([0, 1, 1, 2, 5, 40, n])):
        if new and rnd.random() < 0.5:
            new.discard(rnd.choice(sorted(new)))
        else:
            new.add(rnd.randrange(B, B + span + 20))
    _diff(sorted(old), sorted(new))


@settings(max_examples=300)
@given(
    st.sets(st.integers(min_value=0, max_value=2**64 - 1), max_size=60),
    st.sets(st.integers(min_value=0, max_value=2**64 - 1), max_size=8),
    st.sets(st.integers(min_value=0, max_value=2**64 - 1), max_size=8),
)
def test_diff_id_lists_matches_sets(base: set[int], gone: set[int], added: set[int]) -> None:
    _diff(sorted(base | gone), sorted((base - gone) | added))


# ------------------------------------------------------------------ fanotify, captured


@pytest.mark.parametrize("case", FANOTIFY, ids=lambda case: case["name"])
def test_fanotify_capture(case: dict[str, Any]) -> None:
    events = parse_fanotify_events(bytes.fromhex(case["hex"]))
    assert [tuple(e) for e in events] == [tuple(e) for e in case["events"]]


def test_fanotify_capture_shapes() -> None:
    by_name = {case["name"]: parse_fanotify_events(bytes.fromhex(case["hex"])) for case in FANOTIFY}
    (move,) = by_name["move"]
    assert move.attach and move.detach and move.mask == A | D
    *rest, overflow = by_name["overflow_tail"]
    assert overflow.overflow and overflow.mnt_id is None and not overflow.attach
    assert rest and all(e.mask == A and e.mnt_id for e in rest)
    assert len({e.mnt_id for e in by_name["rbind_tree"]}) == 3
    assert [e.mnt_id for e in by_name["umount_lazy_tree"]] == [
        e.mnt_id for e in by_name["rbind_tree"]
    ]


def test_fanotify_whole_capture_concatenated() -> None:
    raw = b"".join(bytes.fromhex(case["hex"]) for case in FANOTIFY)
    want = [tuple(e) for case in FANOTIFY for e in case["events"]]
    assert [tuple(e) for e in parse_fanotify_events(raw)] == want
    assert [tuple(e) for e in parse_fanotify_events(memoryview(raw))] == want


# ---------------------------------------------------------------- fanotify, hand-built

_META = struct.Struct("<IBBHQii")


def fan_record(
    mask: int,
    pid: int = 1,
    mnt_id: int | None = 2**31,
    *,
    vers: int = c.FANOTIFY_METADATA_VERSION,
    infos: bytes | None = None,
    event_len: int | None = None,
    meta_len: int = 24,
) -> bytes:
    if infos is None:
        infos = b"" if mnt_id is None else struct.pack("<BBHIQ", 7, 0, 16, 0, mnt_id)
    body = infos
    elen = meta_len + len(body) if event_len is None else event_len
    return _META.pack(elen, vers, 0, meta_len, mask, -1, pid) + b"\0" * (meta_len - 24) + body


def test_overflow_record_alone() -> None:
    assert parse_fanotify_events(fan_record(OVF, 0, None)) == [FanEvent(OVF, 0, None)]


def test_other_info_records_are_skipped() -> None:
    pidfd = struct.pack("<BBHi", c.FAN_EVENT_INFO_TYPE_PIDFD, 0, 8, 5)
    mnt = struct.pack("<BBHIQ", c.FAN_EVENT_INFO_TYPE_MNT, 0, 16, 0, 2**32)
    raw = fan_record(A, 9, infos=pidfd + mnt) + fan_record(D, 9, infos=mnt + pidfd)
    assert parse_fanotify_events(raw) == [FanEvent(A, 9, 2**32), FanEvent(D, 9, 2**32)]


def test_longer_metadata_is_honoured() -> None:
    # a future kernel may grow the metadata: metadata_len says where info records start
    assert parse_fanotify_events(fan_record(A, 3, 2**31 + 1, meta_len=32)) == [
        FanEvent(A, 3, 2**31 + 1)
    ]


def test_empty_buffer() -> None:
    assert parse_fanotify_events(b"") == []


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (fan_record(A)[:20], "shorter than the 24-byte"),
        (fan_record(A) + fan_record(A)[:30], "event at offset 40"),
        (fan_record(A, vers=2), "version 2"),
        (fan_record(A, event_len=20), "event_len 20"),
        (fan_record(A, event_len=400), "event_len 400"),
        (fan_record(A, meta_len=16, infos=b""), "metadata_len 16"),
        (fan_record(A, infos=struct.pack("<BBH", 7, 0, 0)), "length 0"),
        (fan_record(A, infos=struct.pack("<BBH", 7, 0, 64)), "length 64"),
        (fan_record(A, infos=b"\x07\x00"), "truncated info header"),
        (fan_record(A, infos=struct.pack("<BBHI", 7, 0, 8, 0)), "mount info record of 8"),
        (fan_record(A, mnt_id=None), "no mount info record"),
    ],
)
def test_malformed_fanotify(raw: bytes, match: str) -> None:
    with pytest.raises(MalformedBuffer, match=match):
        parse_fanotify_events(raw)


_fan_events = st.lists(
    st.tuples(
        st.sampled_from([A, D, A | D, OVF]),
        st.integers(0, 2**31 - 1),
        st.integers(2**31, 2**64 - 1),
    ),
    max_size=30,
)


@given(_fan_events)
def test_fanotify_roundtrip(events: list[tuple[int, int, int]]) -> None:
    raw = b"".join(fan_record(m, p, None if m == OVF else i) for m, p, i in events)
    want = [FanEvent(m, p, None if m == OVF else i) for m, p, i in events]
    assert parse_fanotify_events(raw) == want


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_fanotify_on_garbage_decodes_or_raises_malformed(raw: bytes) -> None:
    for buf in (raw, fan_record(A) + raw):
        with contextlib.suppress(MalformedBuffer):
            parse_fanotify_events(buf)


# --------------------------------------------------------------------------- errors


def test_error_mapping_says_what_to_do() -> None:
    e = from_errno(errno.EPERM, "fanotify_mark")
    assert isinstance(e, PermissionDenied) and e.errno == errno.EPERM
    assert "CAP_SYS_ADMIN" in str(e) and "root" in str(e)
    u = from_errno(errno.ENOSYS, "listmount", feature="listmount()/statmount()", since="6.8")
    assert isinstance(u, Unsupported) and isinstance(u, KernelError)
    assert os.uname().release in str(u) and "Linux 6.8+" in str(u)
    g = MountGone(2**31 + 3)
    assert g.errno == errno.ENOENT and str(g) == f"mount {2**31 + 3} is gone"
    assert isinstance(g, OSError)
    plain = from_errno(errno.EBADF, "statmount")
    assert type(plain) is KernelError and "Bad file descriptor" in str(plain)
