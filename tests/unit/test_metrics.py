"""Metrics: the exposition format read back line by line (and by prometheus_client's own
parser where it is installed), and real HTTP GETs against serve_metrics on loopback."""

from __future__ import annotations

import math
import re

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from amountd.metrics import (
    CONTENT_TYPE,
    EVENT_SECONDS_BUCKETS,
    MAX_REQUEST,
    Counter,
    Gauge,
    Histogram,
    Metrics,
    answer,
    serve_metrics,
)

# --------------------------------------------------------------------------- a reader

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"(?:,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), value)


def _parse_labels(text: str) -> dict[str, str]:
    inner = text[1:-1]
    out: dict[str, str] = {}
    pos = 0
    while pos < len(inner):
        m = _LABEL.match(inner, pos)
        assert m, f"bad labels at {inner[pos:]!r}"
        out[m["name"]] = _unescape(m["value"])
        pos = m.end()
    return out


Sample = tuple[str, frozenset[tuple[str, str]], float]


def parse_exposition(text: str) -> tuple[dict[str, str], dict[str, str], list[Sample]]:
    """(HELP by family, TYPE by family, samples), checking the format's rules on the way."""
    assert text.endswith("\n")
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: list[Sample] = []
    family = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            assert name not in helps, f"{name} described twice"
            helps[name] = doc
            family = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == family, "TYPE follows its family's HELP"
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            assert family is not None
            name = m["name"]
            suffixes = ("_bucket", "_sum", "_count") if types[family] == "histogram" else ("",)
            assert any(name == family + s for s in suffixes), f"{name} outside {family}"
            labels = _parse_labels(m["labels"]) if m["labels"] else {}
            samples.append((name, frozenset(labels.items()), float(m["value"])))
    return helps, types, samples


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    want = frozenset(labels.items())
    found = [v for n, lab, v in samples if n == name and lab == want]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


# --------------------------------------------------------------------------- render


def _busy() -> Metrics:
    m = Metrics(version="1.2.3")
    for _ in range(3):
        m.events.inc("mount", "fanotify")
    m.events.inc("umount", "mountinfo")
    m.subscribers.set(4)
    m.queue_drops.inc()
    m.resyncs.inc("overflow")
    m.resyncs.inc("lagged")
    m.resyncs.inc("lagged")
    m.overflows.inc()
    for v in (0.000005, 0.00001, 0.00003, 0.002, 0.7, 3.0):
        m.event_seconds.observe(v)
    return m


def test_render_has_every_family_with_help_and_type() -> None:
    helps, types, _ = parse_exposition(_busy().render().decode())
    assert types == {
        "amountd_events_total": "counter",
        "amountd_subscribers": "gauge",
        "amountd_queue_drops_total": "counter",
        "amountd_resyncs_total": "counter",
        "amountd_overflows_total": "counter",
        "amountd_event_processing_seconds": "histogram",
        "amountd_connections": "gauge",
        "amountd_connection_limit": "gauge",
        "amountd_connection_limit_per_uid": "gauge",
        "amountd_connections_refused_total": "counter",
        "amountd_stalled_total": "counter",
        "amountd_token_failures_total": "counter",
        "amountd_snapshot_cache_bytes": "gauge",
        "amountd_up": "gauge",
        "amountd_start_time_seconds": "gauge",
        "amountd_build_info": "gauge",
    }
    assert all(helps[name] for name in types)


def test_render_values() -> None:
    _, _, s = parse_exposition(_busy().render().decode())
    assert _value(s, "amountd_events_total", action="mount", source="fanotify") == 3
    assert _value(s, "amountd_events_total", action="umount", source="mountinfo") == 1
    assert _value(s, "amountd_subscribers") == 4
    assert _value(s, "amountd_queue_drops_total") == 1
    assert _value(s, "amountd_resyncs_total", reason="lagged") == 2
    assert _value(s, "amountd_resyncs_total", reason="overflow") == 1
    assert _value(s, "amountd_overflows_total") == 1
    assert _value(s, "amountd_up") == 1
    assert _value(s, "amountd_build_info", version="1.2.3") == 1


def test_histogram_buckets_are_cumulative() -> None:
    _, _, s = parse_exposition(_busy().render().decode())
    buckets = [(dict(lab)["le"], v) for n, lab, v in s if n.endswith("_bucket")]
    bounds = [float(le) for le, _ in buckets]
    assert bounds == [*EVENT_SECONDS_BUCKETS, math.inf]
    assert bounds[0] == 0.00001
    assert bounds[-2] == 1.0
    assert buckets[-1][0] == "+Inf"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    # 5 µs and 10 µs fall in le=1e-05 (le is "less or equal"); 30 µs in le=5e-05 ...
    assert dict(buckets)["1e-05"] == 2
    assert dict(buckets)["2.5e-05"] == 2
    assert dict(buckets)["5e-05"] == 3
    assert dict(buckets)["0.0025"] == 4
    assert dict(buckets)["1.0"] == 5
    assert counts[-1] == 6
    name = "amountd_event_processing_seconds"
    assert _value(s, name + "_count") == 6
    assert _value(s, name + "_sum") == pytest.approx(0.000005 + 0.00001 + 0.00003 + 0.002 + 3.7)


def test_empty_registry_renders_zeros_and_no_labelled_series() -> None:
    _, _, s = parse_exposition(Metrics().render().decode())
    assert _value(s, "amountd_queue_drops_total") == 0
    assert _value(s, "amountd_event_processing_seconds_count") == 0
    assert not [n for n, _, _ in s if n in ("amountd_events_total", "amountd_resyncs_total")]


@given(st.text())
def test_label_values_survive_escaping(value: str) -> None:
    m = Metrics()
    m.resyncs.inc(value)
    _, _, s = parse_exposition(m.render().decode())
    assert _value(s, "amountd_resyncs_total", reason=value) == 1


def test_help_text_is_escaped() -> None:
    m = Metrics()
    m.add(Counter("x_total", "back\\slash\nnewline"))
    helps, _, _ = parse_exposition(m.render().decode())
    assert helps["x_total"] == "back\\\\slash\\nnewline"


def test_callback_gauge_is_read_at_render() -> None:
    m = Metrics()
    box = [7]
    m.add(Gauge("x_subs", "callback", fn=lambda: box[0]))
    _, _, s = parse_exposition(m.render().decode())
    assert _value(s, "x_subs") == 7
    box[0] = 9
    _, _, s = parse_exposition(m.render().decode())
    assert _value(s, "x_subs") == 9


def test_callback_counter_reads_a_total_kept_elsewhere() -> None:
    m = Metrics()
    drops = {"n": 0}
    m.queue_drops.fn = lambda: drops["n"]
    drops["n"] = 5
    _, types, s = parse_exposition(m.render().decode())
    assert types["amountd_queue_drops_total"] == "counter"
    assert _value(s, "amountd_queue_drops_total") == 5
    assert m.queue_drops.get() == 5


def test_failing_callback_leaves_out_only_its_sample(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()

    def boom() -> float:
        raise RuntimeError("boom")

    m.add(Gauge("x_broken", "callback", fn=boom))
    _, types, s = parse_exposition(m.render().decode())
    assert "x_broken" in types
    assert not [n for n, _, _ in s if n == "x_broken"]
    assert _value(s, "amountd_up") == 1
    assert "x_broken" in caplog.text


def test_misuse_is_refused() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="already registered"):
        m.add(Counter("amountd_overflows_total", "again"))
    with pytest.raises(ValueError, match="only goes up"):
        m.overflows.add(-1)
    with pytest.raises(ValueError, match="no labels"):
        Gauge("g", "g", ("a",), fn=lambda: 1.0)
    with pytest.raises(ValueError, match="no labels"):
        Counter("c_total", "c", ("a",), fn=lambda: 1.0)


def test_counter_add_and_get() -> None:
    c = Counter("c_total", "c", ("k",))
    c.inc("a")
    c.add(2.5, "a")
    assert c.get("a") == 3.5
    assert c.get("b") == 0


def test_histogram_adds_inf_bucket_once() -> None:
    h = Histogram("h", "h", [1.0, math.inf])
    assert h.bounds == (1.0, math.inf)
    h.observe(math.inf)
    assert h.counts == [0, 1]


def test_prometheus_client_parses_it() -> None:
    parser = pytest.importorskip(
        "prometheus_client.parser", reason="prometheus_client is not installed in this venv"
    )
    m = _busy()
    m.resyncs.inc('we"ird\\reason\nhere')
    families = {f.name: f for f in parser.text_string_to_metric_families(m.render().decode())}
    # prometheus_client names a counter family without its _total suffix.
    assert families["amountd_events"].type == "counter"
    assert families["amountd_event_processing_seconds"].type == "histogram"
    events = {
        (s.labels["action"], s.labels["source"]): s.value
        for s in families["amountd_events"].samples
        if s.name == "amountd_events_total"
    }
    assert events == {("mount", "fanotify"): 3.0, ("umount", "mountinfo"): 1.0}
    reasons = {
        s.labels["reason"]: s.value
        for s in families["amountd_resyncs"].samples
        if s.name == "amountd_resyncs_total"
    }
    assert reasons['we"ird\\reason\nhere'] == 1.0
    hist = families["amountd_event_processing_seconds"].samples
    inf = [s for s in hist if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
    assert inf[0].value == 6.0


# --------------------------------------------------------------------------- HTTP, pure


def _split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    return status, headers, body


def test_answer_get_metrics() -> None:
    m = _busy()
    status, headers, body = _split(answer(m, b"GET /metrics HTTP/1.1\r\nHost: x"))
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == CONTENT_TYPE
    assert int(headers["content-length"]) == len(body)
    assert body == m.render()


def test_answer_head_has_no_body() -> None:
    status, headers, body = _split(answer(Metrics(), b"HEAD /metrics?x=1 HTTP/1.0"))
    assert status == "HTTP/1.1 200 OK"
    assert int(headers["content-length"]) > 0
    assert body == b""


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET / HTTP/1.1", "404"),
        (b"GET /metricsx HTTP/1.1", "404"),
        (b"POST /metrics HTTP/1.1", "405"),
        (b"GET /metrics HTTP/2.0", "505"),
        (b"garbage", "400"),
        (b"", "400"),
    ],
)
def test_answer_errors(request_line: bytes, status: str) -> None:
    got, headers, body = _split(answer(Metrics(), request_line + b"\r\nHost: x"))
    assert got.split(" ")[1] == status
    assert int(headers["content-length"]) == len(body)


# --------------------------------------------------------------------------- HTTP, real


async def _get(port: int, request: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(request)
        data = b""
        while True:
            try:
                data += await conn.receive()
            except anyio.EndOfStream:
                return data


GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n"


@pytest.mark.anyio
async def test_serve_metrics_get() -> None:
    m = _busy()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, m, "127.0.0.1", 0)
            status, headers, body = _split(await _get(port, GET))
            assert status == "HTTP/1.1 200 OK"
            assert headers["content-type"] == CONTENT_TYPE
            _, _, s = parse_exposition(body.decode())
            assert _value(s, "amountd_events_total", action="mount", source="fanotify") == 3
            # A scrape sees the counts as they are now.
            m.events.inc("mount", "fanotify")
            _, _, body = _split(await _get(port, GET))
            _, _, s = parse_exposition(body.decode())
            assert _value(s, "amountd_events_total", action="mount", source="fanotify") == 4
            status, _, _ = _split(await _get(port, b"GET /nothing HTTP/1.1\r\n\r\n"))
            assert status.startswith("HTTP/1.1 404")
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_serve_metrics_bad_connections_do_not_hurt_others() -> None:
    m = Metrics()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, m, "127.0.0.1", 0)
            # A connection that goes away at once, and one cut off mid-request.
            async with await anyio.connect_tcp("127.0.0.1", port):
                pass
            async with await anyio.connect_tcp("127.0.0.1", port) as cut:
                await cut.send(b"GET /metr")
            # A slow one that stays open without finishing its request ...
            async with await anyio.connect_tcp("127.0.0.1", port) as slow:
                await slow.send(b"GET /metrics HTTP/1.1\r\n")
                # ... while another is answered in full.
                status, _, body = _split(await _get(port, GET))
                assert status == "HTTP/1.1 200 OK"
                parse_exposition(body.decode())
                # The slow one can still finish and be answered.
                await slow.send(b"Host: x\r\n\r\n")
                data = b""
                while True:
                    try:
                        data += await slow.receive()
                    except anyio.EndOfStream:
                        break
                assert _split(data)[0] == "HTTP/1.1 200 OK"
            # An oversize request gets 431 and the server goes on.
            big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST * 2) + b"\r\n\r\n"
            status, _, _ = _split(await _get(port, big))
            assert status.startswith("HTTP/1.1 431")
            status, _, _ = _split(await _get(port, GET))
            assert status == "HTTP/1.1 200 OK"
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_serve_metrics_port_in_use_fails_at_start() -> None:
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, Metrics(), "127.0.0.1", 0)
            with pytest.raises(OSError):
                await tg.start(serve_metrics, Metrics(), "127.0.0.1", port)
            tg.cancel_scope.cancel()
