"""Encoded snapshots kept for reuse, bounded in bytes, least recently used first out.

A snapshot is encoded once per (format, filter) and seq, and every subscriber of that
group asking for it at that seq gets the same bytes. Without a bound, a client that opens
short subscriptions with distinct filters while no event arrives leaves one whole
snapshot behind per filter (1,000 filters on 5,000 mounts: ~1 GiB). Here the total is
capped: the least recently used entries go first, an entry larger than the whole cap is
never kept, and entries of an older seq (never to be hit again: seqs only grow) go as
soon as a newer one is stored. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["DEFAULT_SNAPSHOT_CACHE", "SnapshotCache"]

DEFAULT_SNAPSHOT_CACHE = 32 * 1024 * 1024
"""Bytes of encoded snapshots kept at most (`--snapshot-cache`)."""


class SnapshotCache:
    """(key, seq) -> bytes, at most `limit` bytes in all."""

    __slots__ = ("_entries", "_seq", "bytes", "hits", "limit", "misses")

    def __init__(self, limit: int = DEFAULT_SNAPSHOT_CACHE) -> None:
        if limit < 0:
            raise ValueError("the snapshot cache limit must not be negative")
        self.limit = limit
        self.bytes = 0
        """Bytes held now."""
        self.hits = 0
        self.misses = 0
        self._seq = -1
        self._entries: OrderedDict[Hashable, tuple[int, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, seq: int) -> bytes | None:
        """The bytes stored for `key` as of `seq` (and it becomes the most recently used)."""
        hit = self._entries.get(key)
        if hit is None or hit[0] != seq:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return hit[1]

    def put(self, key: Hashable, seq: int, data: bytes) -> None:
        """Keep `data` for `key` as of `seq`, evicting what the limit requires."""
        if seq > self._seq:
            self.clear()  # every older entry is dead weight from now on
            self._seq = seq
        elif seq < self._seq:
            return  # already stale
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old[1])
        size = len(data)
        if size > self.limit:
            return
        while self._entries and self.bytes + size > self.limit:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= len(dropped)
        self._entries[key] = (seq, data)
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
