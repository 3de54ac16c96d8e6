"""What bounds a hostile local client: connection caps, throttled logs, slowed token guesses.

Pure bookkeeping (the caller passes the clock), so each rule is unit-tested without a
socket; the server asks before it spends anything on a connection.

- `Connections`: how many connections are open, in all and per peer (a uid; for a peer
  on another machine, its address), and whether one more may come in.
- `RateLog`: a message per key at most once per interval, with the count of those
  held back, so a flood of refusals costs one log line a second per uid.
- `Guesses`: failed token checks per peer, each one making the next answer wait a
  little longer (bounded), forgotten after a quiet while; the table itself is bounded.
- `nofile_limit`: raise the soft RLIMIT_NOFILE to the hard one (the one I/O here).
"""

from __future__ import annotations

import resource
from collections import OrderedDict
from collections.abc import Hashable

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_UID",
    "DEFAULT_STALL_TIMEOUT",
    "FD_RESERVE",
    "Connections",
    "Guesses",
    "RateLog",
    "effective_cap",
    "raise_nofile",
]

DEFAULT_MAX_CONNECTIONS = 1024
"""Connections open at once, all peers together (`--max-connections`)."""
DEFAULT_MAX_CONNECTIONS_PER_UID = 128
"""Connections open at once from one uid, or one remote address (`--max-connections-per-uid`)."""
DEFAULT_STALL_TIMEOUT = 60.0
"""Seconds a subscriber may read nothing while frames wait for it (`--stall-timeout`)."""
FD_RESERVE = 64
"""File descriptors kept back from connections: the source, listeners, logs, /proc reads."""

Key = Hashable


class Connections:
    """Open connections, in all and per key (uid). `exempt` keys are counted but never
    held to the per-key cap (root: it could stop the server anyway); every connection is
    held to the total one."""

    __slots__ = ("_by_key", "exempt", "limit", "per_key", "refused", "total")

    def __init__(self, limit: int, per_key: int, exempt: frozenset[Key] = frozenset({0})) -> None:
        if limit < 1 or per_key < 1:
            raise ValueError("connection limits must be at least 1")
        self.limit = limit
        self.per_key = per_key
        self.exempt = exempt
        self.total = 0
        self.refused = 0
        self._by_key: dict[Key, int] = {}

    def open(self) -> bool:
        """A connection was accepted (its peer not known yet): False if over the total cap
        (then it is not counted)."""
        if self.total >= self.limit:
            self.refused += 1
            return False
        self.total += 1
        return True

    def close(self) -> None:
        """A connection admitted by `open` is gone (call `leave` first if it was keyed)."""
        self.total -= 1

    def join(self, key: Key) -> bool:
        """The peer of an open connection is known: False if that peer is at its cap
        (then it is not counted under the key)."""
        n = self._by_key.get(key, 0)
        if n >= self.per_key and key not in self.exempt:
            self.refused += 1
            return False
        self._by_key[key] = n + 1
        return True

    def leave(self, key: Key) -> None:
        n = self._by_key.get(key, 0) - 1
        if n > 0:
            self._by_key[key] = n
        else:
            self._by_key.pop(key, None)

    def count(self, key: Key) -> int:
        return self._by_key.get(key, 0)

    def by_key(self) -> dict[Key, int]:
        return dict(self._by_key)


def effective_cap(configured: int, nofile: int, reserve: int = FD_RESERVE) -> int:
    """The total cap the fd limit allows: connections past it would make accept() fail."""
    return max(1, min(configured, nofile - reserve))


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a unit without LimitNOFILE= gets
    1,024); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class RateLog:
    """At most one message per key per `interval` seconds; the rest are counted and the
    next message says how many were held back. Keeps at most `keys` keys."""

    __slots__ = ("_last", "interval", "keys")

    def __init__(self, interval: float = 1.0, keys: int = 4096) -> None:
        self.interval = interval
        self.keys = keys
        self._last: OrderedDict[Key, tuple[float, int]] = OrderedDict()

    def allow(self, key: Key, now: float) -> int | None:
        """None: hold this one back. Else log it now, saying that the returned count of
        others was held back since the last message for `key`."""
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self.keys:
            self._last.popitem(last=False)
        return 0 if last is None else last[1]


class Guesses:
    """Failed token checks per peer: the answer to the next one waits `step` seconds
    more per recent failure, up to `cap`; a peer quiet for `forget` seconds starts over.
    Keeps at most `peers` peers (the least recently seen go first)."""

    __slots__ = ("_seen", "cap", "forget", "peers", "step")

    def __init__(
        self, step: float = 0.1, cap: float = 2.0, forget: float = 60.0, peers: int = 4096
    ) -> None:
        self.step = step
        self.cap = cap
        self.forget = forget
        self.peers = peers
        self._seen: OrderedDict[Key, tuple[float, int]] = OrderedDict()

    def failed(self, key: Key, now: float) -> float:
        """One more failure from `key`: the seconds to wait before answering it."""
        last = self._seen.get(key)
        n = 1 if last is None or now - last[0] > self.forget else last[1] + 1
        self._seen[key] = (now, n)
        self._seen.move_to_end(key)
        while len(self._seen) > self.peers:
            self._seen.popitem(last=False)
        return min(self.cap, self.step * n)

    def failures(self, key: Key) -> int:
        last = self._seen.get(key)
        return 0 if last is None else last[1]

    def __len__(self) -> int:
        return len(self._seen)
