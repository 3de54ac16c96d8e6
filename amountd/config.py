"""`amountd serve`'s settings file (TOML), command-line overrides, and SIGHUP reloads.

The file is decoded with msgspec into a Struct that forbids unknown keys: a typo in
/etc/amountd/amountd.toml is an error that names the key and the file, never a
setting silently ignored. Every error is one AmountdError line a sysadmin can act on.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

import msgspec
import msgspec.toml

from .constants import DEFAULT_SOCKET
from .errors import AmountdError, UsageError
from .filter import Filter, FilterError, check_filter
from .limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_UID,
    DEFAULT_STALL_TIMEOUT,
)
from .model import Action, fspath
from .snapcache import DEFAULT_SNAPSHOT_CACHE
from .sweep import SWEEP_BUDGET, SWEEP_INTERVAL

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "LIVE_KEYS",
    "Config",
    "ConfigError",
    "FilterConfig",
    "PublishConfig",
    "apply_live",
    "load_config",
    "merge",
    "parse_config",
    "parse_hostport",
    "reloadable",
]

DEFAULT_CONFIG_PATH = "/etc/amountd/amountd.toml"

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["text", "json"]
SourceKind = Literal["auto", "fanotify", "listmount", "mountinfo"]


class ConfigError(AmountdError):
    """The settings file (or a flag merged into it) is wrong: one line naming file and key."""


class FilterConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """`[filter]`: what the server shows at all, applied before each subscriber's own filter.

    Lets a host expose only part of its table (say, `under = "/mnt"`) to the socket's
    group. Same meaning as a subscriber's filter (`fstypes` like `findmnt -t`, with a
    "no" prefix to exclude).
    """

    actions: list[Action] | None = None
    fstypes: list[str] | None = None
    under: str | None = None

    def to_filter(self) -> Filter | None:
        """The amountd.filter.Filter to apply, or None when nothing is filtered."""
        if not self.actions and not self.fstypes and self.under is None:
            return None
        return Filter(
            actions=self.actions or None,
            fstypes=self.fstypes or None,
            under=None if self.under is None else fspath(self.under),
        )


class PublishConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """`[publish]`: send every event and the tables to NATS JetStream (amountd.fleet).

    Credentials are given as nats-py takes them: a `.creds` file, a token (from a file:
    a secret does not belong in a world-readable settings file), an nkey seed file, TLS.
    """

    urls: list[str] = []
    """NATS servers (several for a cluster); none: publishing is off."""
    host_id: str | None = None
    """This host's name in subjects and keys (default: the machine ID's first 12 hex
    digits, else the host name; only [A-Za-z0-9_-] is kept)."""
    credentials: str | None = None
    token_file: str | None = None
    nkey_seed: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    stream_max_age: Annotated[float, msgspec.Meta(gt=0)] = 7 * 86400.0
    """Seconds the stream keeps an event (default: 7 days)."""
    stream_max_bytes: Annotated[int, msgspec.Meta(ge=-1)] = 1 << 30
    """Bytes the stream keeps, oldest dropped first (default: 1 GiB; -1: no limit)."""
    duplicate_window: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    """Seconds JetStream remembers a Nats-Msg-Id to drop a re-sent frame (default: 120)."""
    backlog: Annotated[int, msgspec.Meta(ge=1)] = 65536
    """Frames the publisher may fall behind before it reconciles instead (default: 65536)."""
    ack_timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """Seconds without an acknowledgement before NATS counts as down (default: 5)."""
    tombstone_ttl: Annotated[int, msgspec.Meta(ge=1)] = 3600
    """Seconds the marker of a deleted or purged key stays in the buckets (default: 3600):
    without a limit every mount ever unmounted would leave one, and every reader of the
    bucket would read them all. Needs nats-server 2.11+ (per-message TTL)."""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Everything `amountd serve` can be told, with the CLI's defaults.

    In the file `socket_mode` is an octal string ("0660": a TOML integer 660 would be
    decimal); here it is an int. `unix = ""` in the file means no Unix socket.
    """

    unix: str | None = DEFAULT_SOCKET
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660
    socket_group: str | None = None
    tcp: str | None = None
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    source: SourceKind = "auto"
    ns: list[str] = []
    all_namespaces: bool = False
    queue: Annotated[int, msgspec.Meta(ge=1)] = 1024
    ring: Annotated[int, msgspec.Meta(ge=0)] = 65536
    unlimited_queue: bool = False
    sweep_interval: Annotated[float, msgspec.Meta(gt=0)] = SWEEP_INTERVAL
    sweep_budget: Annotated[float, msgspec.Meta(gt=0, le=1)] = SWEEP_BUDGET
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_CONNECTIONS
    max_connections_per_uid: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_CONNECTIONS_PER_UID
    stall_timeout: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_STALL_TIMEOUT
    snapshot_cache: Annotated[int, msgspec.Meta(ge=0)] = DEFAULT_SNAPSHOT_CACHE
    metrics: str | None = None
    metrics_public: bool = False
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    filter: FilterConfig = FilterConfig()
    publish: PublishConfig = PublishConfig()


LIVE_KEYS = frozenset({"log_level", "log_format", "queue", "filter"})
"""What SIGHUP applies without dropping a subscriber; every other key needs a restart.

`queue` bounds the queues made from then on (and may shrink existing ones); a changed
`filter` changes what every subscriber may see, so each gets a resync and a fresh
snapshot. Sockets, TLS, tokens, the source, the namespaces, the ring and the metrics
listener are opened once at start.
"""


def parse_hostport(
    text: str, *, default_host: str | None = "127.0.0.1", port_zero: bool = False
) -> tuple[str, int]:
    """(host, port) from HOST:PORT or [V6]:PORT; UsageError naming the problem.

    The one host:port grammar of amountd (settings file, `--tcp`, `tcp://` URLs, the
    listener). With a `default_host`, `:PORT` and `PORT` mean that host (loopback);
    `port_zero` lets a listener ask the kernel for a free port.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(
            f"bad address {text!r}: write an IPv6 address in brackets, [{host}]:{port_text}"
        )
    if not host:
        if default_host is None:
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
        host = default_host
    if not (port_text.isascii() and port_text.isdigit()):
        raise UsageError(
            f"bad address {text!r}: bad port {port_text!r}, expected HOST:PORT "
            "with a port from 1 to 65535"
        )
    port = int(port_text)
    if port == 0 and not port_zero:
        raise UsageError(f"bad address {text!r}: port 0, give a port from 1 to 65535")
    if port > 65535:
        raise UsageError(f"bad address {text!r}: port {port} is out of range (1-65535)")
    return host, port


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_TYPE = re.compile(r"^Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)`$")
_CHOICES: dict[str, tuple[str, ...]] = {
    "source": get_args(SourceKind),
    "log_level": get_args(LogLevel),
    "log_format": get_args(LogFormat),
    "filter.actions": get_args(Action),
}
_TOML_NAMES = {
    "str": "string",
    "int": "integer",
    "float": "float",
    "bool": "boolean",
    "array": "array",
    "object": "table",
}


def _key(path: str) -> str:
    """msgspec's "$.filter.actions[1]" as the TOML key "filter.actions[1]"."""
    return path.removeprefix(".")


def _describe(e: msgspec.ValidationError, where: str) -> str:
    """msgspec's validation message as one line naming the key and the file."""
    text = str(e)
    path = ""
    m = _AT.search(text)
    if m:
        path = _key(m["path"])
        text = text[: m.start()]
    if u := _UNKNOWN.match(text):
        key = f"{path}.{u['name']}" if path else u["name"]
        known = _known_keys(path)
        hint = f" (known keys: {', '.join(known)})" if known else ""
        return f"unknown key {key!r} in {where}{hint}"
    if t := _TYPE.match(text):
        want = _TOML_NAMES.get(t["want"], t["want"])
        got = _TOML_NAMES.get(t["got"], t["got"])
        return f"wrong type for {path!r} in {where}: expected {want}, got {got}"
    text = _lower(text.replace("`", ""))
    choices = _CHOICES.get(re.sub(r"\[\d+\]$", "", path))
    if choices and text.startswith("invalid enum value"):
        text += f" (choose from {', '.join(choices)})"
    return f"bad value for {path!r} in {where}: {text}"


def _known_keys(path: str) -> list[str]:
    struct: Any = {"": Config, "filter": FilterConfig, "publish": PublishConfig}.get(path)
    return list(struct.__struct_fields__) if struct is not None else []


def _normalize(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The file's spellings as Config's types (before msgspec checks the rest)."""
    out = dict(raw)
    if "socket_mode" in out:
        mode = out["socket_mode"]
        if not isinstance(mode, str):
            got = _TOML_NAMES.get(type(mode).__name__, type(mode).__name__)
            raise ConfigError(
                f"wrong type for 'socket_mode' in {where}: expected an octal string "
                f'like "0660", got {got}'
            )
        try:
            value = int(mode, 8)
        except ValueError:
            value = -1
        if not 0 <= value <= 0o777:
            raise ConfigError(
                f"bad value for 'socket_mode' in {where}: {mode!r} is not a file mode "
                'from "0000" to "0777", like "0660"'
            )
        out["socket_mode"] = value
    if isinstance(out.get("log_level"), str):
        out["log_level"] = out["log_level"].lower()
    if "ns" in out and isinstance(out["ns"], list):
        # A PID may be written as a number: ns = [1, "/proc/1234/ns/mnt"].
        out["ns"] = [
            str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in out["ns"]
        ]
    for key in ("unix", "metrics", "tcp", "socket_group", "token_file", "tls_cert", "tls_key"):
        if out.get(key) == "":
            out[key] = None  # TOML has no null: "" switches an optional setting off
    return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(config: Config, where: str, name: Any = repr) -> None:
    """What the types alone cannot say; `name(key)` spells a key for the message."""
    for key in ("tcp", "metrics"):
        value = getattr(config, key)
        if value is not None:
            try:
                host, _ = parse_hostport(value)
            except UsageError as e:
                raise ConfigError(f"bad value for {name(key)} in {where}: {e}") from None
            if key == "metrics" and not config.metrics_public and not _loopback(host):
                allow = (
                    "set metrics_public = true" if name is repr else f"add {name('metrics_public')}"
                )
                raise ConfigError(
                    f"bad value for {name(key)} in {where}: {value} is reachable from other "
                    f"machines: {allow} to serve metrics there, or use 127.0.0.1:PORT"
                )
    for i, ns in enumerate(config.ns):
        if not ns:
            raise ConfigError(f"bad value for {name(f'ns[{i}]')} in {where}: empty")
    flt = config.filter
    try:
        check_filter(actions=flt.actions, fstypes=flt.fstypes, under=flt.under)
    except FilterError as e:
        raise ConfigError(
            f"bad value for {name(f'filter.{e.key}')} in {where}: {e.reason}"
        ) from None


def _from_builtins(raw: Mapping[str, Any], where: str) -> Config:
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(_describe(e, where)) from None
    _check(config, where)
    return config


def parse_config(data: bytes, where: str = "<config>") -> Config:
    """Pure: a TOML document's bytes as a Config; `where` names it in errors."""
    # Decoded here, not by the parser: which exception a TOML library raises for bad
    # UTF-8 differs between versions (msgspec 0.23 says DecodeError).
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 (byte {e.start}): TOML files must be") from None
    try:
        raw = msgspec.toml.decode(text)
    except msgspec.DecodeError as e:
        raise ConfigError(f"TOML syntax error in {where}: {_lower(str(e))}") from None
    return _from_builtins(_normalize(raw, where), where)


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def load_config(path: str | None, *, default_path: str = DEFAULT_CONFIG_PATH) -> Config:
    """The settings from `path` (`--config`); None: the default file if it exists, else defaults.

    A file named explicitly must exist; the default one may be absent.
    """
    if path is None:
        if not os.path.exists(default_path):
            return Config()
        path = default_path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}") from None
    return parse_config(data, path)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def merge(config: Config, overrides: Mapping[str, Any]) -> Config:
    """The file's settings with the command line's on top.

    `overrides` maps Config keys to the values of the flags the user gave; None means
    "not given" (so argparse flags should default to None, not to Config's defaults).
    A single `ns` string becomes a one-element list. Raises UsageError naming the flag.
    """
    unknown = set(overrides) - set(Config.__struct_fields__)
    if unknown:
        raise ValueError(f"not Config keys: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return config
    if isinstance(given.get("ns"), str):
        given["ns"] = [given["ns"]]
    if isinstance(given.get("filter"), Filter):
        f: Filter = given["filter"]
        under = None if f.under is None else str(f.under)  # a plain str for to_builtins
        given["filter"] = FilterConfig(actions=f.actions, fstypes=f.fstypes, under=under)
    raw = msgspec.to_builtins(config)
    raw.update(msgspec.to_builtins(given))
    try:
        merged = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        m = _AT.search(str(e))
        key = _key(m["path"]).split(".")[0].split("[")[0] if m else ""
        text = str(e)[: m.start()] if m else str(e)
        raise UsageError(f"bad value for {_flag(key)}: {_lower(text.replace('`', ''))}") from None
    try:
        _check(merged, "the command line", name=lambda k: _flag(k.split("[")[0]))
    except ConfigError as e:
        raise UsageError(str(e).replace(" in the command line", "")) from None
    return merged


def reloadable(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """SIGHUP: (keys that changed and apply now, keys that changed but need a restart).

    The server applies the first list and logs the second (keeping the old values for
    those until it is restarted).
    """
    changed = [k for k in Config.__struct_fields__ if getattr(old, k) != getattr(new, k)]
    return (
        [k for k in changed if k in LIVE_KEYS],
        [k for k in changed if k not in LIVE_KEYS],
    )


def apply_live(old: Config, new: Config) -> Config:
    """The config a server runs with after SIGHUP: `new`'s live keys, `old`'s others."""
    now, _ = reloadable(old, new)
    return msgspec.structs.replace(old, **{k: getattr(new, k) for k in now})
