"""mountinfo parsing against the kernel's own escapes, in a private namespace (the
parser's pure tests are in tests/unit/)."""

from __future__ import annotations

import os

from amountd.model import Mount, fspath_bytes
from amountd.mountinfo import format_line, parse_mountinfo

from ..conftest import PrivateNs


def by_target(mounts: list[Mount]) -> dict[bytes, Mount]:
    return {fspath_bytes(m.target or ""): m for m in mounts}


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
