"""A key-value bucket's live entries under a pattern, read exactly once.

Not `KeyValue.watch()`: the watcher ends its initial values on a marker it places from
a race between the consumer's info and messages already on their way, and under load
it can place the marker before the entries (an empty table, read as "no mounts") or
after a write made during the read. A pull consumer delivers nothing until it is
asked, so the `num_pending` it is created with counts exactly the entries to read: the
read takes that many messages and stops, whatever is written meanwhile.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["read_bucket"]

_BATCH = 1024
"""Messages asked for per fetch."""
_DELETED = frozenset({"DEL", "PURGE"})
_MARKER_DELETED = frozenset({"MaxAge", "Purge", "Remove"})


def _deleted(headers: dict[str, str] | None) -> bool:
    """A tombstone (KV-Operation), or a server's expiry marker (Nats-Marker-Reason)."""
    if not headers:
        return False
    op = headers.get("KV-Operation")
    if op is not None:
        return op in _DELETED
    return headers.get("Nats-Marker-Reason") in _MARKER_DELETED


async def read_bucket(js: Any, bucket: str, pattern: str, timeout: float) -> dict[str, bytes]:
    """Key -> value of the bucket's live entries matching `pattern` (NATS wildcards),
    deleted ones left out. Raises what nats-py raises (a timeout among them)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    stream = f"KV_{bucket}"
    prefix = f"$KV.{bucket}."
    config = ConsumerConfig(
        filter_subject=prefix + pattern,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=max(5.0, 4 * timeout),
        mem_storage=True,
        max_ack_pending=-1,
    )
    sub = await js.pull_subscribe(prefix + pattern, stream=stream, config=config)
    out: dict[str, bytes] = {}
    consumer: str | None = None
    try:
        info = await sub.consumer_info()
        consumer = info.name
        left = info.num_pending
        while left > 0:
            for msg in await sub.fetch(min(_BATCH, left), timeout=timeout):
                left -= 1
                key = msg.subject[len(prefix) :]
                if _deleted(msg.headers):
                    out.pop(key, None)
                else:
                    out[key] = bytes(msg.data)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, consumer)
    return out
