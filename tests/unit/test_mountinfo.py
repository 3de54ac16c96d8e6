"""mountinfo parsing: captured kernel output, hand-made lines, and generated round trips."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from amountd.model import Mount, fspath, fspath_bytes
from amountd.mountinfo import format_line, mangle, parse_line, parse_mountinfo, unescape

DATA = Path(__file__).parent.parent / "data"
FIXTURES = sorted(DATA.glob("*.mountinfo"))


def by_target(mounts: list[Mount]) -> dict[bytes, Mount]:
    return {fspath_bytes(m.target or ""): m for m in mounts}


# --- captured kernel output ---------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fixture_parses_and_formats_back(path: Path) -> None:
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]
    mounts = parse_mountinfo(data)
    assert len(mounts) == len(lines) > 0
    for line, m in zip(lines, mounts, strict=True):
        assert m == parse_line(line)
        assert m.id is None and m.parent_id is None
        assert m.legacy_id == int(line.split(b" ")[0])
        # None of these captures has a `,` or `=` escaped inside an option value, so
        # the kernel's line comes back byte for byte.
        assert format_line(m) == line


def test_host_capture() -> None:
    mounts = parse_mountinfo((DATA / "host.mountinfo").read_bytes())
    root = by_target(mounts)[b"/"]
    assert root == Mount(
        legacy_id=27,
        legacy_parent_id=1,
        dev="254:0",
        root=fspath(b"/"),
        target=fspath(b"/"),
        options="rw,relatime",
        propagation="",
        fstype="ext4",
        source=fspath(b"/dev/vda"),
        fs_options=fspath(b"rw,discard,resv_strict,resuid=65534,resgid=65534"),
    )
    shm = [m for m in mounts if m.target == "/dev/shm"]
    assert [m.legacy_parent_id for m in shm] == [24, 25]  # a mount on top of a mount


def test_private_ns_capture_escapes_and_propagation() -> None:
    """Captured in `unshare -m --propagation private` (see data/README.md)."""
    mounts = by_target(parse_mountinfo((DATA / "private_ns.mountinfo").read_bytes()))
    base = b"/tmp/mi_cap/base"
    assert mounts[base].propagation == "shared:1"
    assert mounts[base].source == "basefs"

    space = mounts[base + b"/with space"]
    assert fspath_bytes(space.source or "") == b"src with space"
    assert space.options == "ro,relatime"  # remount,ro,bind: per-mount flag
    assert space.fs_options == "rw"  # the superblock stays rw
    assert fspath_bytes(mounts[base + b"/tab\there"].target or "").endswith(b"\there")
    assert fspath_bytes(mounts[base + b"/back\\slash"].source or "") == b"back\\src"
    assert base + b"/nl\nx" in mounts
    bad = mounts[base + b"/bad\xff\xfe"]  # not UTF-8: shown raw by the kernel
    assert bad.source == "badsrc"
    assert isinstance(bad.target, str)
    assert fspath_bytes(bad.target).endswith(b"bad\xff\xfe")

    assert mounts[base + b"/shared"].propagation == "shared:7"
    assert mounts[base + b"/slave"].propagation == "shared:8 master:7"
    assert mounts[base + b"/unb"].propagation == "unbindable"
    assert mounts[base + b"/empty"].source == ""  # mount -t tmpfs "" DIR
    peer = mounts[base + b"/peer"]
    assert peer.root == "/sub dir"
    assert peer.dev == mounts[base + b"/shared"].dev
    ovl = mounts[base + b"/ovl/merged"]
    assert ovl.fstype == "overlay"
    assert ovl.fs_options is not None
    assert "lowerdir=/tmp/mi_cap/base/ovl/lower dir," in ovl.fs_options


def test_chroot_capture_propagate_from() -> None:
    """Read from inside a chroot whose master peer group lies outside it."""
    mounts = by_target(parse_mountinfo((DATA / "chroot_propagate_from.mountinfo").read_bytes()))
    assert mounts[b"/p"].propagation == "shared:1"
    assert mounts[b"/q"].propagation == "master:2 propagate_from:1"
    ids = {m.legacy_id for m in mounts.values()}
    assert mounts[b"/q"].legacy_parent_id not in ids  # the parent lies outside the root


# --- hand-made lines ----------------------------------------------------------------


def test_every_optional_field_and_fuse_subtype() -> None:
    line = (
        b"120 36 0:77 /home/u /mnt/remote rw,nosuid,nodev,relatime "
        b"shared:5 master:3 propagate_from:2 unbindable - fuse.sshfs u@host:/home/u "
        b"rw,user_id=0,group_id=0"
    )
    m = parse_line(line, ns_id=4026531841)
    assert m == Mount(
        legacy_id=120,
        legacy_parent_id=36,
        ns_id=4026531841,
        dev="0:77",
        root=fspath(b"/home/u"),
        target=fspath(b"/mnt/remote"),
        options="rw,nosuid,nodev,relatime",
        propagation="shared:5 master:3 propagate_from:2 unbindable",
        fstype="fuse.sshfs",
        source=fspath(b"u@host:/home/u"),
        fs_options=fspath(b"rw,user_id=0,group_id=0"),
    )
    assert m.key == 120
    assert format_line(m) == line


def test_proc5_example_line() -> None:
    m = parse_line(
        b"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    )
    assert (m.legacy_id, m.legacy_parent_id, m.dev) == (36, 35, "98:0")
    assert (m.root, m.target, m.options) == ("/mnt1", "/mnt2", "rw,noatime")
    assert (m.propagation, m.fstype, m.source, m.fs_options) == (
        "master:1",
        "ext3",
        "/dev/root",
        "rw,errors=continue",
    )


def test_source_none_is_kept_literally() -> None:
    m = parse_line(b"30 25 0:27 / /sys/kernel/debug rw,relatime - debugfs none rw")
    assert m.source == "none"


def test_fuse_subtype_with_escaped_space() -> None:
    m = parse_line(b"50 1 0:50 / /x rw - fuse.my\\040fs src rw")
    assert m.fstype == "fuse.my fs"
    assert format_line(m) == b"50 1 0:50 / /x rw - fuse.my\\040fs src rw"


def test_any_octal_escape_becomes_its_byte() -> None:
    # \303\251 is UTF-8 for "é": the bytes join up after unescaping.
    m = parse_line(b"7 1 0:5 /a\\303\\251 /t\\377\\134x rw - tmpfs s\\011rc rw,opt=a\\054b\\075c")
    assert m.root == "/a\u00e9"
    assert fspath_bytes(m.target or "") == b"/t\xff\\x"
    assert m.source == "s\trc"
    assert m.fs_options == "rw,opt=a,b=c"


def test_lone_backslash_is_left_alone() -> None:
    assert unescape(b"a\\b\\12\\0") == b"a\\b\\12\\0"
    assert unescape(b"\\400") == b"\\400"  # not a byte
    assert unescape(b"\\040\\134") == b" \\"
    assert parse_line(b"7 1 0:5 / /a\\b rw - tmpfs s rw").target == "/a\\b"


def test_mangle_matches_kernel_escapes() -> None:
    assert mangle(b"a b\tc\nd\\e\xff,=") == b"a\\040b\\011c\\012d\\134e\xff,="
    assert unescape(mangle(b"a b\tc\nd\\e")) == b"a b\tc\nd\\e"


def test_empty_and_trailing_newline() -> None:
    assert parse_mountinfo(b"") == []
    line = b"7 1 0:5 / / rw - tmpfs s rw"
    assert parse_mountinfo(line) == parse_mountinfo(line + b"\n") == [parse_line(line)]
    assert parse_mountinfo(line + b"\n" + line + b"\n", ns_id=9)[1].ns_id == 9


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"7 1 0:5 / / rw tmpfs s rw", "separator"),
        (b"7 1 0:5 / - tmpfs s rw", "separator"),
        (b"7 1 0:5 / / rw - tmpfs s", "fields after the separator"),
        (b"7 1 0:5 / / rw - tmpfs s rw extra", "fields after the separator"),
        (b"x 1 0:5 / / rw - tmpfs s rw", "invalid literal"),
        (b"7 1 05 / / rw - tmpfs s rw", "major:minor"),
        (b"", "separator"),
    ],
)
def test_malformed_line_raises_clear_error(line: bytes, why: str) -> None:
    with pytest.raises(ValueError, match="malformed mountinfo line") as info:
        parse_line(line)
    assert why in str(info.value)
    if line:  # parse_mountinfo skips empty lines
        with pytest.raises(ValueError, match="malformed mountinfo line"):
            parse_mountinfo(b"7 1 0:5 / / rw - tmpfs s rw\n" + line + b"\n")


# --- generated round trips ----------------------------------------------------------

paths = st.binary(max_size=40).map(fspath)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_=", min_size=1, max_size=8)
options = st.lists(words, min_size=1, max_size=4).map(",".join)
group = st.integers(1, 2**31 - 1)


@st.composite
def propagations(draw: st.DrawFn) -> str:
    parts = []
    if draw(st.booleans()):
        parts.append(f"shared:{draw(group)}")
    if draw(st.booleans()):
        parts.append(f"master:{draw(group)}")
        if draw(st.booleans()):
            parts.append(f"propagate_from:{draw(group)}")
    if draw(st.booleans()):
        parts.append("unbindable")
    return " ".join(parts)


fstypes = st.builds(
    lambda t, sub: t if sub is None else f"{t}.{sub}",
    st.sampled_from(["ext4", "tmpfs", "fuse", "overlay", "proc", "-"]),
    st.none() | st.binary(min_size=1, max_size=10).map(fspath),
)

mounts = st.builds(
    Mount,
    legacy_id=st.integers(0, 2**31 - 1),
    legacy_parent_id=st.integers(0, 2**31 - 1),
    ns_id=st.none() | st.integers(1, 2**64 - 1),
    dev=st.builds("{}:{}".format, st.integers(0, 4095), st.integers(0, 2**20 - 1)),
    root=paths,
    target=paths,
    options=options,
    propagation=propagations(),
    fstype=fstypes,
    source=paths,
    fs_options=paths,
)


@given(mounts)
def test_format_then_parse_is_identity(m: Mount) -> None:
    line = format_line(m)
    assert b"\n" not in line
    assert parse_line(line, ns_id=m.ns_id) == m


@given(st.lists(mounts, max_size=8))
def test_whole_file_round_trip(ms: list[Mount]) -> None:
    data = b"".join(format_line(m) + b"\n" for m in ms)
    assert parse_mountinfo(data, ns_id=5) == [msgspec.structs.replace(m, ns_id=5) for m in ms]
