"""The settings file: decoding, one-line errors naming file and key, flags on top, and
what a SIGHUP may change live."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from amountd.config import (
    LIVE_KEYS,
    Config,
    ConfigError,
    FilterConfig,
    PublishConfig,
    apply_live,
    load_config,
    merge,
    parse_config,
    parse_hostport,
    reloadable,
)
from amountd.errors import AmountdError, UsageError
from amountd.filter import Filter
from amountd.model import fspath

ETC = "/etc/amountd/amountd.toml"


def test_defaults_are_the_servers() -> None:
    c = Config()
    assert c.unix == "/run/amountd/amountd.sock"
    assert c.socket_mode == 0o660
    assert c.source == "auto"
    assert c.ns == []
    assert c.all_namespaces is False
    assert c.queue == 1024
    assert c.ring == 65536
    assert c.unlimited_queue is False
    assert c.metrics is None
    assert c.log_level == "info"
    assert c.log_format == "text"
    assert c.filter.to_filter() is None


def test_no_path_and_no_default_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(None, default_path=str(tmp_path / "absent.toml")) == Config()


def test_no_path_reads_the_default_file_when_it_exists(tmp_path: Path) -> None:
    path = tmp_path / "amountd.toml"
    path.write_text("queue = 10\n")
    assert load_config(None, default_path=str(path)).queue == 10


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=f"cannot read the config file {re.escape(str(path))}"):
        load_config(str(path))


def test_errors_are_amountd_errors() -> None:
    assert issubclass(ConfigError, AmountdError)


def test_full_file() -> None:
    c = parse_config(
        b"""
unix = "/run/x.sock"
socket_mode = "0600"
socket_group = "wheel"
tcp = "[::1]:7333"
token_file = "/etc/amountd/token"
tls_cert = "/etc/amountd/c.pem"
tls_key = "/etc/amountd/k.pem"
source = "mountinfo"
ns = [1, "/proc/42/ns/mnt"]
all_namespaces = true
queue = 16
ring = 0
unlimited_queue = true
sweep_interval = 2.5
sweep_budget = 0.1
metrics = "9733"
log_level = "DEBUG"
log_format = "json"

[filter]
actions = ["mount", "umount"]
fstypes = ["notmpfs"]
under = "/mnt"
""",
        ETC,
    )
    assert c == Config(
        unix="/run/x.sock",
        socket_mode=0o600,
        socket_group="wheel",
        tcp="[::1]:7333",
        token_file="/etc/amountd/token",
        tls_cert="/etc/amountd/c.pem",
        tls_key="/etc/amountd/k.pem",
        source="mountinfo",
        ns=["1", "/proc/42/ns/mnt"],
        all_namespaces=True,
        queue=16,
        ring=0,
        unlimited_queue=True,
        sweep_interval=2.5,
        sweep_budget=0.1,
        metrics="9733",
        log_level="debug",
        log_format="json",
        filter=FilterConfig(actions=["mount", "umount"], fstypes=["notmpfs"], under="/mnt"),
    )
    f = c.filter.to_filter()
    assert f == Filter(actions=["mount", "umount"], fstypes=["notmpfs"], under=fspath("/mnt"))


def test_empty_string_switches_an_optional_setting_off() -> None:
    c = parse_config(b'unix = ""\nmetrics = ""\ntcp = "127.0.0.1:1"', ETC)
    assert c.unix is None
    assert c.metrics is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"queu = 5", f"unknown key 'queu' in {ETC} (known keys: unix, socket_mode, "),
        (b"[filter]\nunder_ = '/'", f"unknown key 'filter.under_' in {ETC} (known keys: actions,"),
        (b"[nope]\nx = 1", f"unknown key 'nope' in {ETC}"),
        (b'queue = "5"', f"wrong type for 'queue' in {ETC}: expected integer, got string"),
        (b"queue = 1.5", f"wrong type for 'queue' in {ETC}: expected integer, got float"),
        (b"all_namespaces = 1", f"wrong type for 'all_namespaces' in {ETC}: expected boolean"),
        (b"filter = 3", f"wrong type for 'filter' in {ETC}: expected table, got integer"),
        (b"ns = [true]", f"wrong type for 'ns[0]' in {ETC}: expected string, got boolean"),
        (b"queue = 0", f"bad value for 'queue' in {ETC}: expected int >= 1"),
        (b"ring = -1", f"bad value for 'ring' in {ETC}: expected int >= 0"),
        (b"sweep_budget = 1.5", f"bad value for 'sweep_budget' in {ETC}: expected float <= 1"),
        (b"sweep_interval = 0", f"bad value for 'sweep_interval' in {ETC}: expected float > 0"),
        (
            b'source = "magic"',
            f"bad value for 'source' in {ETC}: invalid enum value 'magic' (choose from auto, "
            "fanotify, listmount, mountinfo)",
        ),
        (b'log_format = "xml"', f"bad value for 'log_format' in {ETC}: invalid enum value 'xml'"),
        (
            b'[filter]\nactions = ["mount", "explode"]',
            f"bad value for 'filter.actions[1]' in {ETC}: invalid enum value 'explode' (choose "
            "from mount, umount, move, remount, propagation)",
        ),
        (b"socket_mode = 660", f"wrong type for 'socket_mode' in {ETC}: expected an octal string"),
        (b'socket_mode = "rw"', f"bad value for 'socket_mode' in {ETC}: 'rw' is not a file mode"),
        (b'socket_mode = "1777"', f"bad value for 'socket_mode' in {ETC}: '1777' is not a file"),
        (b'metrics = "localhost:http"', f"bad value for 'metrics' in {ETC}: bad address"),
        (b'tcp = "::1:80"', f"bad value for 'tcp' in {ETC}: bad address '::1:80': write an IPv6"),
        (b'ns = [""]', f"bad value for 'ns[0]' in {ETC}: empty"),
        (b'[filter]\nfstypes = ["no"]', f"bad value for 'filter.fstypes[0]' in {ETC}: 'no' is"),
        (b'[filter]\nunder = "mnt"', f"bad value for 'filter.under' in {ETC}: 'mnt' is not an"),
        (b"queue = = 3", f"TOML syntax error in {ETC}: invalid value (at line 1, column 9)"),
        (b"a = 1\n\n[x\n", f"TOML syntax error in {ETC}: "),
        (b"queue = 1\nqueue = 2", f"TOML syntax error in {ETC}: cannot overwrite a value"),
        (b"\xff = 1", f"{ETC} is not UTF-8 (byte 0)"),
    ],
)
def test_errors_name_the_file_and_the_key(doc: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, ETC)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = tmp_path / "amountd.toml"
    path.write_text('queue = 5\nlog_level = "info"\nsource = auto\n')
    with pytest.raises(ConfigError, match=r"TOML syntax error in .*amountd.toml: .*line 3"):
        load_config(str(path))


# --------------------------------------------------------------------------- the example


def _example() -> str:
    return (resources.files("amountd") / "data" / "amountd.toml.example").read_text()


_ASSIGNMENT = re.compile(r"^# (?P<key>[a-z_]+) = ", re.MULTILINE)


def test_example_parses_as_it_is_and_is_all_defaults() -> None:
    assert parse_config(_example().encode(), "amountd.toml.example") == Config()


def test_example_names_every_key_once_and_uncommented_it_is_valid() -> None:
    text = _example()
    top, _, flt = text.partition("\n[filter]\n")
    flt, _, pub = flt.partition("\n[publish]\n")
    assert sorted(_ASSIGNMENT.findall(top)) == sorted(
        k for k in Config.__struct_fields__ if k not in ("filter", "publish")
    )
    assert sorted(_ASSIGNMENT.findall(flt)) == sorted(FilterConfig.__struct_fields__)
    assert sorted(_ASSIGNMENT.findall(pub)) == sorted(PublishConfig.__struct_fields__)
    uncommented = _ASSIGNMENT.sub(lambda m: f"{m['key']} = ", text)
    c = parse_config(uncommented.encode(), "amountd.toml.example, uncommented")
    # The defaults shown are the defaults.
    for key in (
        "unix",
        "socket_mode",
        "source",
        "ns",
        "all_namespaces",
        "queue",
        "ring",
        "unlimited_queue",
        "sweep_interval",
        "sweep_budget",
        "log_level",
        "log_format",
    ):
        assert getattr(c, key) == getattr(Config(), key), key


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9733", ("127.0.0.1", 9733)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:80", ("::1", 80)),
        ("localhost:65535", ("localhost", 65535)),
        (":9733", ("127.0.0.1", 9733)),
        ("9733", ("127.0.0.1", 9733)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:0", "host:65536", "::1:80", "h:x", "h:-1"])
def test_parse_hostport_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="bad address"):
        parse_hostport(text)


def test_parse_hostport_strict_and_listening() -> None:
    """URLs and `--tcp` name the host; a listener may ask for port 0."""
    assert parse_hostport("0.0.0.0:7000", default_host=None) == ("0.0.0.0", 7000)
    assert parse_hostport("[fe80::1]:1", default_host=None) == ("fe80::1", 1)
    assert parse_hostport("127.0.0.1:0", port_zero=True) == ("127.0.0.1", 0)
    for text in (":7000", "7000", "[]:7000"):
        with pytest.raises(UsageError, match="expected HOST:PORT"):
            parse_hostport(text, default_host=None)
    with pytest.raises(UsageError, match="port 0"):
        parse_hostport("h:0", default_host=None)


# --------------------------------------------------------------------------- merge


def test_merge_flags_given_override_the_file() -> None:
    file = parse_config(b'queue = 10\nsource = "mountinfo"\nns = [1]', ETC)
    merged = merge(file, {"queue": 20, "source": None, "ns": "/proc/7/ns/mnt", "tcp": None})
    assert merged.queue == 20
    assert merged.source == "mountinfo"  # flag not given: the file's value stays
    assert merged.ns == ["/proc/7/ns/mnt"]
    assert merged.tcp is None


def test_merge_nothing_given_is_the_file() -> None:
    file = parse_config(b"queue = 10", ETC)
    assert merge(file, {}) is file
    assert merge(file, {"queue": None, "metrics": None}) is file


def test_merge_accepts_a_filter_with_exact_bytes() -> None:
    f = Filter(actions=["mount"], under=fspath(b"/mnt/\xff"))
    merged = merge(Config(), {"filter": f, "socket_mode": 0o600})
    assert merged.socket_mode == 0o600
    assert merged.filter.to_filter() == f


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"queue": 0}, "bad value for --queue: expected int >= 1"),
        ({"queue": "many"}, "bad value for --queue: expected int, got str"),
        ({"source": "magic"}, "bad value for --source: invalid enum value 'magic'"),
        ({"metrics": "a:b"}, "bad value for --metrics: bad address 'a:b'"),
        ({"ns": ["1", ""]}, "bad value for --ns: empty"),
        ({"socket_mode": 0o1777}, "bad value for --socket-mode: expected int <= 511"),
    ],
)
def test_merge_bad_flags_are_usage_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as info:
        merge(Config(), overrides)
    assert str(info.value) == message or str(info.value).startswith(message), str(info.value)


def test_merge_unknown_key_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="not Config keys: typo"):
        merge(Config(), {"typo": 1})


# --------------------------------------------------------------------------- reload


def test_reloadable_splits_changes() -> None:
    old = Config()
    new = msgspec.structs.replace(
        old,
        log_level="debug",
        queue=5,
        filter=FilterConfig(fstypes=["notmpfs"]),
        unix="/run/other.sock",
        tcp="127.0.0.1:1",
        tls_cert="c",
        tls_key="k",
        source="mountinfo",
        ns=["1"],
    )
    now, later = reloadable(old, new)
    assert now == ["queue", "log_level", "filter"]
    assert later == ["unix", "tcp", "tls_cert", "tls_key", "source", "ns"]
    applied = apply_live(old, new)
    assert applied.queue == 5
    assert applied.log_level == "debug"
    assert applied.filter.fstypes == ["notmpfs"]
    assert applied.unix == old.unix
    assert applied.source == old.source
    assert applied.ns == []


def test_reload_of_a_file_that_did_not_change() -> None:
    doc = b'queue = 7\n[filter]\nfstypes = ["ext4"]'
    assert reloadable(parse_config(doc), parse_config(doc)) == ([], [])


_VALUES: dict[str, Any] = {
    "unix": "/run/a.sock",
    "socket_mode": 0o600,
    "socket_group": "g",
    "tcp": "127.0.0.1:5",
    "token_file": "/t",
    "tls_cert": "/c",
    "tls_key": "/k",
    "source": "fanotify",
    "ns": ["1"],
    "all_namespaces": True,
    "queue": 3,
    "ring": 3,
    "unlimited_queue": True,
    "sweep_interval": 0.5,
    "sweep_budget": 0.2,
    "max_connections": 5,
    "max_connections_per_uid": 2,
    "stall_timeout": 1.5,
    "snapshot_cache": 1024,
    "metrics": "9733",
    "metrics_public": True,
    "log_level": "error",
    "log_format": "json",
    "filter": FilterConfig(under="/x"),
    "publish": PublishConfig(urls=["nats://127.0.0.1:4222"]),
}


def test_every_key_has_a_test_value() -> None:
    assert set(_VALUES) == set(Config.__struct_fields__)
    assert set(Config.__struct_fields__) >= LIVE_KEYS


@given(st.sets(st.sampled_from(sorted(_VALUES))))
def test_reloadable_partitions_exactly_the_changed_keys(keys: set[str]) -> None:
    old = Config()
    new = msgspec.structs.replace(old, **{k: _VALUES[k] for k in keys})
    now, later = reloadable(old, new)
    assert set(now) | set(later) == keys
    assert not set(now) & set(later)
    assert set(now) <= LIVE_KEYS
    assert not set(later) & LIVE_KEYS
    applied = apply_live(old, new)
    assert reloadable(applied, new) == ([], later)


def test_metrics_on_a_public_address_needs_metrics_public() -> None:
    with pytest.raises(ConfigError, match="reachable from other machines: set metrics_public"):
        parse_config(b'metrics = "0.0.0.0:9733"', "/etc/amountd/amountd.toml")
    ok = parse_config(b'metrics = "0.0.0.0:9733"\nmetrics_public = true')
    assert ok.metrics == "0.0.0.0:9733" and ok.metrics_public
    assert parse_config(b'metrics = "[::1]:9733"').metrics == "[::1]:9733"
    assert parse_config(b'metrics = "localhost:9733"').metrics == "localhost:9733"
    with pytest.raises(UsageError, match="add --metrics-public"):
        merge(Config(), {"metrics": "10.0.0.1:9733"})
    assert merge(Config(), {"metrics": "10.0.0.1:9733", "metrics_public": True}).metrics_public


def test_limits_have_their_defaults_and_are_checked() -> None:
    c = Config()
    assert (c.max_connections, c.max_connections_per_uid) == (1024, 128)
    assert (c.stall_timeout, c.snapshot_cache) == (60.0, 32 * 1024 * 1024)
    with pytest.raises(ConfigError, match="'max_connections'"):
        parse_config(b"max_connections = 0")
    with pytest.raises(ConfigError, match="'stall_timeout'"):
        parse_config(b"stall_timeout = 0")
    assert parse_config(b"stall_timeout = 5\nsnapshot_cache = 0").stall_timeout == 5.0


def test_publish_section_is_read_and_checked() -> None:
    c = parse_config(b'[publish]\nurls = ["nats://a:4222", "nats://b:4222"]\nhost_id = "web-1"')
    assert c.publish.urls == ["nats://a:4222", "nats://b:4222"]
    assert c.publish.host_id == "web-1"
    assert c.publish.backlog == 65536
    with pytest.raises(ConfigError, match=r"unknown key 'publish.url'.*known keys: urls"):
        parse_config(b'[publish]\nurl = "nats://a:4222"')
    with pytest.raises(ConfigError, match=r"publish\.backlog"):
        parse_config(b"[publish]\nbacklog = 0")
    # Publishing needs a restart: a reload only logs it.
    assert reloadable(Config(), c) == ([], ["publish"])


def test_sweep_flags_override_the_file_and_reach_the_server() -> None:
    """`serve --sweep-interval/--sweep-budget` over the settings file's keys, else the
    file's, into what the sources are opened with."""
    from amountd.cli import build_parser
    from amountd.serve import serve_config

    file = Config(sweep_interval=5.0, sweep_budget=0.2)
    parser = build_parser()
    names = ("sweep_interval", "sweep_budget")
    args = parser.parse_args(["serve"])
    cfg = serve_config(merge(file, {k: getattr(args, k) for k in names}))
    assert (cfg.sweep_interval, cfg.sweep_budget) == (5.0, 0.2)
    args = parser.parse_args(["serve", "--sweep-interval", "0.5", "--sweep-budget", "0.01"])
    cfg = serve_config(merge(file, {k: getattr(args, k) for k in names}))
    assert (cfg.sweep_interval, cfg.sweep_budget) == (0.5, 0.01)
    args = parser.parse_args(["watch"])
    assert (args.sweep_interval, args.sweep_budget) == (30.0, 0.05)
    with pytest.raises(SystemExit):
        parser.parse_args(["watch", "--sweep-budget", "0"])
