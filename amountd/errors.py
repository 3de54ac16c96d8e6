"""Failures a user can act on: each carries one line that says what to do."""

from __future__ import annotations


class AmountdError(Exception):
    """An expected failure: the CLI prints its message alone and exits 1 (no traceback)."""

    exit_code: int = 1


class UsageError(AmountdError):
    """Bad flags or arguments: exit 2, like argparse."""

    exit_code = 2


class NamespaceError(AmountdError):
    """A namespace that cannot be found, opened or watched."""
