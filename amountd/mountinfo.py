"""Pure parsing of /proc/PID/mountinfo (proc(5)) into `Mount` records, and back.

The fallback source re-reads and re-parses the whole file on every change, so this is
on the hot path: one `str` decode for the whole file, `str.split` per line, and the
slow unescape path only for fields that hold a backslash (rare in practice).

A line is

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2) (3)  (4)   (5)     (6)       (7...)  (-) (8)    (9)        (10)

The kernel writes root, target, fstype and source through mangle() (space, tab, newline
and backslash as `\\ooo`); filesystems write their super options with seq_show_option(),
which also escapes `,` and `=`. Any `\\ooo` is turned back into its byte.
"""

from __future__ import annotations

import re

from amountd.model import FsPath, Mount, fspath, fspath_bytes

__all__ = ["format_line", "mangle", "parse_line", "parse_mountinfo", "unescape"]

_OCTAL = re.compile(rb"\\([0-3][0-7][0-7])")
_MANGLE = re.compile(rb"[ \t\n\\]")


def _octal_byte(m: re.Match[bytes]) -> bytes:
    return bytes((int(m.group(1), 8),))


def unescape(raw: bytes) -> bytes:
    """Undo the kernel's `\\ooo` escapes; a backslash not followed by 3 octal digits stays."""
    if b"\\" not in raw:
        return raw
    return _OCTAL.sub(_octal_byte, raw)


def _slow_path(field: str) -> FsPath:
    # Unescaped bytes may join their neighbours into UTF-8, so go through bytes.
    return fspath(_OCTAL.sub(_octal_byte, field.encode("utf-8", "surrogateescape")))


def _intern(paths: dict[str, FsPath], field: str) -> FsPath:
    p = paths.get(field)
    if p is None:
        p = paths[field] = FsPath(field)
    return p


def _parse(line: str, ns_id: int | None, paths: dict[str, FsPath]) -> Mount:
    # `paths` interns FsPath values: roots, sources and super options repeat a lot, and
    # a dict lookup is cheaper than building a str subclass.
    f = line.split(" ")
    try:
        # No field before the separator can be a lone "-": roots and targets start
        # with "/", and escaped fields hold no spaces.
        try:
            sep = f.index("-", 6)
        except ValueError:
            raise ValueError("no ' - ' separator after 6 fields") from None
        if len(f) != sep + 4:
            raise ValueError(f"{len(f) - sep - 1} fields after the separator, need 3")
        dev = f[2]
        if ":" not in dev:
            raise ValueError(f"device {dev!r} is not major:minor")
        if "\\" in line:
            fstype: str = str(_slow_path(f[sep + 1]))
            root, target = _slow_path(f[3]), _slow_path(f[4])
            source, fs_options = _slow_path(f[sep + 2]), _slow_path(f[sep + 3])
        else:
            fstype = f[sep + 1]
            root, target = _intern(paths, f[3]), FsPath(f[4])
            source, fs_options = _intern(paths, f[sep + 2]), _intern(paths, f[sep + 3])
        return Mount(
            legacy_id=int(f[0]),
            legacy_parent_id=int(f[1]),
            ns_id=ns_id,
            dev=dev,
            root=root,
            target=target,
            options=f[5],
            propagation=" ".join(f[6:sep]) if sep > 6 else "",
            fstype=fstype,
            source=source,
            fs_options=fs_options,
        )
    except ValueError as e:
        raise ValueError(f"malformed mountinfo line ({e}): {line!r}") from None


def parse_line(line: bytes, *, ns_id: int | None = None) -> Mount:
    """One mountinfo line (with or without its newline). ValueError if malformed."""
    if line.endswith(b"\n"):
        line = line[:-1]
    return _parse(line.decode("utf-8", "surrogateescape"), ns_id, {})


def parse_mountinfo(data: bytes, *, ns_id: int | None = None) -> list[Mount]:
    """A whole mountinfo file, in the kernel's order. ValueError on a malformed line."""
    # Decoding once is the same as decoding each field: UTF-8 never puts an ASCII byte
    # (space, newline) inside a multibyte sequence, so the splits fall in the same places.
    text = data.decode("utf-8", "surrogateescape")
    paths: dict[str, FsPath] = {}
    return [_parse(line, ns_id, paths) for line in text.split("\n") if line]


def mangle(raw: bytes) -> bytes:
    """Escape like the kernel's mangle(): space, tab, newline and backslash as `\\ooo`."""
    return _MANGLE.sub(lambda m: b"\\%03o" % m.group()[0], raw)


def _field(value: str | None, what: str) -> bytes:
    if value is None:
        raise ValueError(f"cannot format a mount without {what}")
    return mangle(fspath_bytes(value))


def format_line(m: Mount) -> bytes:
    """The mountinfo line (no newline) the kernel would write for `m`; for tests and tools.

    Super options are escaped like the other fields (space, tab, newline, backslash);
    the `,` and `=` that seq_show_option() also escapes inside values are left alone,
    since in the record they cannot be told from the separators any more.
    """
    if m.legacy_id is None or m.legacy_parent_id is None:
        raise ValueError("cannot format a mount without legacy IDs")
    head = [
        b"%d %d %s" % (m.legacy_id, m.legacy_parent_id, _field(m.dev, "dev")),
        _field(m.root, "root"),
        _field(m.target, "target"),
        _field(m.options, "options"),
    ]
    if m.propagation:
        head.append(m.propagation.encode())
    tail = [
        _field(m.fstype, "fstype"),
        _field(m.source, "source"),
        _field(m.fs_options, "fs_options"),
    ]
    return b" ".join(head) + b" - " + b" ".join(tail)
