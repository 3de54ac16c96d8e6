"""Pure: what one subscriber asked to see (actions, filesystem types, a subtree).

A filter works on a watcher's view: with `under`, a mount moved into the subtree
appears (`mount`) and one moved out of it disappears (`umount`), so a consumer that
applies the filtered frames holds exactly the filtered table.

A field that is null in a record (a mount that came and went before it could be
described) cannot exclude it: such a mount passes the type and subtree tests, so its
`mount` and its `umount` reach the consumer together.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import cast

import msgspec

from amountd.model import ACTIONS, Action, Event, FsPath, Mount

__all__ = [
    "Filter",
    "FilterError",
    "check_filter",
    "filter_event",
    "filter_mounts",
    "parse_actions",
    "parse_types",
]


class FilterError(ValueError):
    """A filter that cannot mean what its writer wanted: `field` names the part
    (actions, fstypes, under, pids), `reason` says what is wrong with it.

    A ValueError, so msgspec turns it into a ValidationError when a request is decoded
    (the wire's `error` frame) and the API raises it from `Filter(...)`."""

    def __init__(self, field: str, reason: str, index: int | None = None) -> None:
        key = field if index is None else f"{field}[{index}]"
        super().__init__(f"bad filter {key!r}: {reason}")
        self.field = field
        self.key = key
        """The field with the list index where one item is wrong (`fstypes[1]`)."""
        self.reason = reason


def _path_problem(path: str) -> str | None:
    """Why `path` is not an absolute, normalised path (None: it is)."""
    if not path:
        return "an empty path: give an absolute path like /mnt"
    if "\0" in path:
        return f"{path!r} holds a NUL byte"
    if not path.startswith("/"):
        return f"{path!r} is not an absolute path: start it with /"
    if path == "/":
        return None
    if path.endswith("/"):
        return f"{path!r} ends with a slash: write {path.rstrip('/') or '/'!r}"
    if "//" in path:
        return f"{path!r} holds an empty component (//)"
    for part in path.split("/")[1:]:
        if part in (".", ".."):
            return f"{path!r} holds {part!r}: write the path without it"
    return None


def check_filter(
    *,
    actions: Iterable[str] | None = None,
    fstypes: Iterable[str] | None = None,
    under: str | None = None,
    pids: Iterable[int] | None = None,
) -> None:
    """Raise FilterError for what no filter should hold: an unknown action, an empty
    list or string, a type that is no type, a relative or non-normalised path.

    The one check behind every entry: command-line flags, `Filter(...)`, the wire
    request, and the settings file's `[filter]`. Null means "not filtered" and passes.
    """
    if actions is not None:
        names = list(actions)
        if not names:
            raise FilterError("actions", f"an empty list: choose from {', '.join(ACTIONS)}")
        for i, name in enumerate(names):
            if name not in ACTIONS:
                raise FilterError(
                    "actions", f"unknown action {name!r}: choose from {', '.join(ACTIONS)}", i
                )
    if fstypes is not None:
        types = list(fstypes)
        if not types:
            raise FilterError("fstypes", "an empty list: name a type, or leave it out")
        for i, t in enumerate(types):
            if not isinstance(t, str) or t in ("", "no") or t != t.strip() or "," in t:
                raise FilterError(
                    "fstypes",
                    f"{t!r} is not a filesystem type (write notmpfs to exclude tmpfs)",
                    i,
                )
    if under is not None:
        problem = _path_problem(under)
        if problem is not None:
            raise FilterError("under", problem)
    if pids is not None:
        for i, pid in enumerate(pids):
            if pid <= 0:
                raise FilterError("pids", f"{pid} is not a process ID", i)


class Filter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True, dict=True):
    """A subscriber's filter; a field left null does not filter.

    Checked when made (check_filter): an empty list, an unknown action or a relative
    or non-normalised path raises FilterError (a ValueError).

    `fstypes` works like `findmnt -t`: `notmpfs` excludes tmpfs; with only exclusions,
    every other type passes; otherwise only the listed types pass. Types match exactly
    (`fuse` does not match `fuse.sshfs`). `under` is PATH itself and everything below
    it, on path-component boundaries.

    `namespaces` (mount namespace IDs) differs: null is every namespace, and a list,
    even an empty one, is exactly those (the server narrows it to what a client may
    see, which can be nothing). A mount whose `ns_id` is unknown is not in any listed
    namespace. `pids` names namespaces by a process in each: a server resolves them to
    `namespaces` when the subscription starts (the matching here ignores them).
    """

    actions: list[Action] | None = None
    fstypes: list[str] | None = None
    under: FsPath | None = None
    namespaces: list[int] | None = None
    pids: list[int] | None = None
    containers: list[str] | None = None
    """Namespaces by what runs in them (`--container`: an ID or pod UID prefix, or
    RUNTIME:PREFIX); a server resolves them to `namespaces` like `pids`."""

    def __post_init__(self) -> None:
        # On construction and on decoding alike (msgspec calls it for both).
        check_filter(actions=self.actions, fstypes=self.fstypes, under=self.under, pids=self.pids)

    @functools.cached_property
    def is_empty(self) -> bool:
        """Nothing is filtered: callers skip the filter entirely."""
        return (
            not self.actions
            and not self.fstypes
            and self.under is None
            and self.namespaces is None
            and not self.pids
            and not self.containers
        )

    @functools.cached_property
    def _namespaces(self) -> frozenset[int] | None:
        return None if self.namespaces is None else frozenset(self.namespaces)

    @functools.cached_property
    def _actions(self) -> frozenset[str] | None:
        return frozenset(self.actions) if self.actions else None

    @functools.cached_property
    def _types(self) -> tuple[frozenset[str], frozenset[str]] | None:
        """(included, excluded); an empty `included` means "all but the excluded"."""
        if not self.fstypes:
            return None
        inc = frozenset(t for t in self.fstypes if not t.startswith("no"))
        exc = frozenset(t[2:] for t in self.fstypes if t.startswith("no"))
        return inc, exc

    @functools.cached_property
    def _under(self) -> tuple[str, str] | None:
        """(the path without trailing slashes, that path + "/"); ("", "/") for the root."""
        if self.under is None:
            return None
        path: str = self.under.rstrip("/")  # normalised (check_filter): "/" is the one case
        return path, path + "/"

    def type_matches(self, fstype: str | None) -> bool:
        types = self._types
        if types is None or fstype is None:
            return True
        inc, exc = types
        if fstype in exc:
            return False
        return not inc or fstype in inc

    def is_under(self, target: str | None) -> bool:
        under = self._under
        if under is None or target is None:
            return True
        path, prefix = under
        return target == path or target.startswith(prefix)

    def ns_matches(self, ns_id: int | None) -> bool:
        """Whether a frame of namespace `ns_id` is shown (also for `resync`/`end`)."""
        spaces = self._namespaces
        return spaces is None or ns_id in spaces

    def action_matches(self, action: str) -> bool:
        actions = self._actions
        return actions is None or action in actions

    def matches_mount(self, m: Mount) -> bool:
        """The namespace, type and subtree tests (actions concern events, not mounts)."""
        return self.ns_matches(m.ns_id) and self.type_matches(m.fstype) and self.is_under(m.target)


def filter_mounts(f: Filter | None, mounts: Iterable[Mount]) -> list[Mount]:
    """The mounts a snapshot for this filter holds, in the order given."""
    if f is None or f.is_empty:
        return list(mounts)
    return [m for m in mounts if f.matches_mount(m)]


def filter_event(f: Filter | None, ev: Event) -> Event | None:
    """The event as this filter's watcher sees it, or None if it does not see it."""
    if f is None or f.is_empty:
        return ev
    if not f.ns_matches(ev.mount.ns_id):
        return None
    if f.under is not None:
        if ev.action == "move" and ev.old is not None:
            was_in = f.is_under(ev.old.target)
            is_in = f.is_under(ev.mount.target)
            if not is_in:
                if not was_in:
                    return None
                ev = msgspec.structs.replace(ev, action="umount", mount=ev.old, old=None)
            elif not was_in:
                ev = msgspec.structs.replace(ev, action="mount", old=None)
        elif not f.is_under(ev.mount.target):
            return None
    if not f.action_matches(ev.action):
        return None
    if not f.type_matches(ev.mount.fstype):
        return None
    return ev


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_types(text: str) -> list[str]:
    """`-t ext4,notmpfs` as a list; ValueError if it names no type."""
    types = _split(text)
    if not types:
        raise ValueError(f"no filesystem types in {text!r}: give a comma-separated list")
    for t in types:
        if t == "no":
            raise ValueError("'no' alone is not a filesystem type: write notmpfs to exclude tmpfs")
    return types


def parse_actions(text: str) -> list[Action]:
    """`--action mount,umount` as a list; ValueError naming an unknown action."""
    names = _split(text)
    if not names:
        raise ValueError(f"no actions in {text!r}: choose from {', '.join(ACTIONS)}")
    out: list[Action] = []
    for name in names:
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r}: choose from {', '.join(ACTIONS)}")
        out.append(cast(Action, name))
    return out
