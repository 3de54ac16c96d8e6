"""Many hosts: mount events and tables through NATS JetStream (README, "Many hosts").

    async with amountd.fleet.watch("nats://127.0.0.1:4222", hosts="*") as frames:
        async for f in frames:
            print(f.host, f.frame)

`amountd serve --publish URL` writes; `watch` (and `amountd fleet`) reads. nats-py is
imported only when one of them runs, and both run on asyncio only (nats-py's loop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["FleetFrame", "watch"]

if TYPE_CHECKING:
    from .consumer import FleetFrame, watch


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import consumer

        return getattr(consumer, name)
    raise AttributeError(f"module 'amountd.fleet' has no attribute {name!r}")
