"""Names every layer may import: the version, where the server listens, the words
that mark a server's stop. A leaf: it imports nothing, so the package, the client,
the server and the command line can all share it without a cycle."""

from __future__ import annotations

__all__ = ["DEFAULT_CONFIG", "DEFAULT_SOCKET", "STOPPING", "__version__"]

__version__ = "0.1.0"

DEFAULT_SOCKET = "/run/amountd/amountd.sock"
"""Where `serve` listens and clients look."""

DEFAULT_CONFIG = "/etc/amountd/amountd.toml"
"""The settings file `serve` reads when it exists (= amountd.config.DEFAULT_CONFIG_PATH)."""

STOPPING = "server stopping"
"""The start of the `end` reason a server sends when it stops (not when the namespace
ends): a reconnecting client takes it as a drop, not as the end of the stream."""
