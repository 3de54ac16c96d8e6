"""The command line's constants: a leaf (it imports nothing), so that every command
group and the shared helpers can read them, and `--help` pays for none of amountd's
heavier modules."""

from __future__ import annotations

__all__ = ["COLUMN_NAMES", "FILTER_FLAGS", "SETTINGS"]

COLUMN_NAMES = [
    "ACTION",
    "TARGET",
    "SOURCE",
    "FSTYPE",
    "OPTIONS",
    "VFS-OPTIONS",
    "FS-OPTIONS",
    "PROPAGATION",
    "ID",
    "UNIQ-ID",
    "PARENT",
    "OLD-TARGET",
    "OLD-OPTIONS",
    "NS",
    "PID",
    "COMM",
    "TIME",
    "CONTAINER",
]
"""amountd.columns.COLUMNS's names, here so that --help does not import msgspec."""

FILTER_FLAGS = {"actions": "--action", "fstypes": "-t/--types", "under": "--under"}
"""The flag a filter field comes from, for a usage error that names it."""

SETTINGS = (
    "unix",
    "socket_group",
    "tcp",
    "token_file",
    "tls_cert",
    "tls_key",
    "ns",
    "all_namespaces",
    "source",
    "queue",
    "ring",
    "unlimited_queue",
    "sweep_interval",
    "sweep_budget",
    "max_connections",
    "max_connections_per_uid",
    "stall_timeout",
    "snapshot_cache",
    "metrics",
    "metrics_public",
    "log_level",
    "log_format",
)
"""The serve flags that are also settings-file keys (amountd.config.Config)."""
