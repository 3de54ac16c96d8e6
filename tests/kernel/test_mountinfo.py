"""mountinfo parsing against the kernel's own escapes, in a private namespace (the
parser's pure tests are in tests/unit/)."""

from __future__ import annotations

import os

from hypothesis import strategies as st

from amountd.model import Mount, fspath, fspath_bytes
from amountd.mountinfo import format_line, parse_mountinfo

from ..conftest import PrivateNs


def by_target(mounts: list[Mount]) -> dict[bytes, Mount]:
    return {fspath_bytes(m.target or ""): m for m in mounts}


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


# --- the live kernel (private namespace) --------------------------------------------

NASTY = [
    b"sp ace",
    b"t\tab",
    b"new\nline",
    b"back\\slash",
    b"\\040literal",
    b"not\xffutf8\xc3",
    b"caf\xc3\xa9",
    b" lead",
    b"-",
    b"a - b",
]


def test_kernel_escapes_round_trip(private_ns: PrivateNs) -> None:
    """Mounts with hostile names in a private namespace: the kernel's own escaping."""
    ns = private_ns
    dirs = [ns.path(name) for name in NASTY]
    ns.mkdir(*dirs)
    for d, name in zip(dirs, NASTY, strict=True):
        ns.run("mount", "-t", "tmpfs", b"src:" + name, d)
    data = ns.mountinfo()
    ms = by_target(parse_mountinfo(data))
    for d, name in zip(dirs, NASTY, strict=True):
        m = ms[d]
        assert fspath_bytes(m.source or "") == b"src:" + name
        assert m.fstype == "tmpfs"
        assert m.legacy_parent_id == ms[os.fsencode(ns.base)].legacy_id
    lines = data.split(b"\n")[:-1]
    assert [format_line(m) for m in parse_mountinfo(data)] == lines
