"""`amountd fleet` and `amountd.fleet.watch()`: every host's frames from JetStream.

With `snapshot`, the consumer first subscribes to the stream (new messages only),
then reads the tables from the `amountd_mounts` bucket, hands them out as one
`snapshot` frame per host and namespace, and then the stream's frames: nothing is
missed between the two, and an event of that moment may come twice (applying it again
to a table changes nothing).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ..errors import AmountdError
from ..filter import Filter, filter_event, filter_mounts
from ..model import Event, Frame, Mount, Resync, Snapshot, decode_json
from .kvread import read_bucket
from .naming import (
    MOUNTS_BUCKET,
    STREAM,
    decode_mount,
    frame_payload,
    host_subject,
    parse_key,
)

__all__ = ["DEFAULT_URL", "FleetFrame", "fleet_json", "watch"]

DEFAULT_URL = "nats://127.0.0.1:4222"


class FleetFrame(msgspec.Struct, frozen=True):
    """One host's frame."""

    host: str
    frame: Frame


def fleet_json(f: FleetFrame) -> bytes:
    """The frame's JSON as `--json` prints it, with `"host"` added (no newline)."""
    return frame_payload(f.frame, f.host)


def _check_loop() -> None:
    import sniffio

    if sniffio.current_async_library() != "asyncio":
        raise AmountdError("amountd.fleet runs on asyncio only (nats-py): drop --backend trio")


async def _snapshots(js: Any, hosts: str, flt: Filter, timeout: float) -> list[FleetFrame]:
    from nats.js.errors import BucketNotFoundError

    try:
        await js.key_value(MOUNTS_BUCKET)
    except BucketNotFoundError:
        return []
    pattern = f"{hosts}.>" if host_subject(hosts) != "amountd.>" else ">"
    try:
        entries = await read_bucket(js, MOUNTS_BUCKET, pattern, timeout)
    except Exception as e:
        raise AmountdError(
            f"cannot read the bucket {MOUNTS_BUCKET}: {e or type(e).__name__}"
        ) from None
    tables: dict[tuple[str, int | None], list[Mount]] = {}
    for key, value in entries.items():
        try:
            host, ns, _ = parse_key(key)
        except ValueError:
            continue
        if not fnmatch.fnmatchcase(host, hosts):
            continue
        tables.setdefault((host, ns), []).append(decode_mount(value))
    out = []
    for (host, ns), table in sorted(tables.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        mounts = table if flt.is_empty else filter_mounts(flt, table)
        out.append(FleetFrame(host, Snapshot(seq=0, ns_id=ns, mounts=mounts)))
    return out


@contextlib.asynccontextmanager
async def watch(
    url: str | list[str] = DEFAULT_URL,
    hosts: str = "*",
    snapshot: bool = True,
    *,
    filter: Filter | None = None,
    timeout: float = 10.0,
    **connect: Any,
) -> AsyncIterator[AsyncIterator[FleetFrame]]:
    """Every host's frames (hosts matching the glob `hosts`): with `snapshot`, the
    tables first (from the KV bucket), then the stream's events, resyncs and ends.

    `connect` goes to nats.connect() (credentials, TLS). asyncio only.
    """
    _check_loop()
    import nats
    from nats.js.api import DeliverPolicy
    from nats.js.errors import NotFoundError

    flt = filter if filter is not None else Filter()
    servers = [url] if isinstance(url, str) else list(url)
    try:
        nc = await nats.connect(servers=servers, connect_timeout=timeout, **connect)
    except Exception as e:
        raise AmountdError(f"cannot connect to NATS at {', '.join(servers)}: {e}") from None
    try:
        js = nc.jetstream()
        try:
            sub = await js.subscribe(
                host_subject(hosts),
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
                stream=STREAM,
            )
        except NotFoundError:
            raise AmountdError(
                f"no stream {STREAM} at {', '.join(servers)}: is an `amountd serve --publish` "
                "running?"
            ) from None
        first = await _snapshots(js, hosts, flt, timeout) if snapshot else []

        async def frames() -> AsyncIterator[FleetFrame]:
            for f in first:
                yield f
            async for msg in sub.messages:
                parts = msg.subject.split(".")
                if len(parts) != 4:
                    continue
                host = parts[1]
                if not fnmatch.fnmatchcase(host, hosts):
                    continue
                try:
                    frame = decode_json(msg.data)
                except msgspec.DecodeError:
                    continue
                if type(frame) is Event and not flt.is_empty:
                    seen = filter_event(flt, frame)
                    if seen is None:
                        continue
                    frame = seen
                elif type(frame) is Resync and not flt.ns_matches(frame.ns_id):
                    continue
                yield FleetFrame(host, frame)

        yield frames()
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
