"""What every source is: armed once, then an async stream of batches of changes."""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import ClassVar, Self

from ..model import End, Event, Resync
from ..ns import Namespace
from ..table import MountTable

__all__ = ["Change", "Source"]

Change = Event | Resync | End


class Source(abc.ABC):
    """One kernel fd (or a few) turned into changes of one mount namespace.

    `arm()` opens everything and reads the table; from then on every change is reported
    by `changes()`. The source applies each batch to `table` right before yielding it,
    with no await in between, so while it waits `table` is the namespace's table as of
    the last change yielded: it is the one table, the server's broker and the API take
    their snapshots from it. Events carry seq=0; whoever fans them out numbers them.
    """

    kind: ClassVar[str]

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.table = MountTable()
        self.reason: str | None = None

    @property
    def ns_id(self) -> int | None:
        return self.ns.ns_id

    @abc.abstractmethod
    async def arm(self) -> None: ...

    @abc.abstractmethod
    def changes(self) -> AsyncGenerator[list[Change], None]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        try:
            await self.arm()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
