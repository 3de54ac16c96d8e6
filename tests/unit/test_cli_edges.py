"""Filters checked wherever they enter (Filter(...), the wire request, the settings file)
by one pure function. The command's edges, as a process, are in tests/kernel/."""

from __future__ import annotations

import json

import pytest

from amountd.config import ConfigError, parse_config
from amountd.filter import Filter, FilterError, check_filter
from amountd.model import fspath
from amountd.protocol import ProtocolError, parse_request

# --- filters: the one check ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"under": "rel"}, "under", "not an absolute path"),
        ({"under": "relative/path"}, "under", "not an absolute path"),
        ({"under": ""}, "under", "an empty path"),
        ({"under": "/a/../b"}, "under", "holds '..'"),
        ({"under": "/a/./b"}, "under", "holds '.'"),
        ({"under": "/a/"}, "under", "ends with a slash"),
        ({"under": "//a"}, "under", "empty component"),
        ({"under": "/a//b"}, "under", "empty component"),
        ({"under": "/a\0b"}, "under", "NUL"),
        ({"actions": []}, "actions", "an empty list"),
        ({"actions": ["mnt"]}, "actions", "unknown action 'mnt'"),
        ({"actions": [""]}, "actions", "unknown action ''"),
        ({"fstypes": []}, "fstypes", "an empty list"),
        ({"fstypes": [""]}, "fstypes", "is not a filesystem type"),
        ({"fstypes": ["no"]}, "fstypes", "is not a filesystem type"),
        ({"fstypes": [" ext4"]}, "fstypes", "is not a filesystem type"),
        ({"pids": [0]}, "pids", "not a process ID"),
    ],
)
def test_check_filter_refuses(kwargs: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(FilterError) as info:
        check_filter(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert words in info.value.reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"under": "/"},
        {"under": "/mnt"},
        {"under": "/a b/c"},
        {"under": "/d\udcff"},  # a byte that is not UTF-8, as a path value holds it
        {"under": "/a..b/.c"},  # dots inside a name are fine
        {"actions": ["mount", "umount"]},
        {"fstypes": ["ext4", "notmpfs"]},
    ],
)
def test_check_filter_accepts(kwargs: dict[str, object]) -> None:
    check_filter(**kwargs)  # type: ignore[arg-type]


def test_the_api_refuses_a_bad_filter_when_it_is_made() -> None:
    with pytest.raises(ValueError, match="unknown action 'mnt'"):
        Filter(actions=["mnt"], under=fspath("rel"))  # type: ignore[list-item]
    with pytest.raises(FilterError, match="not an absolute path"):
        Filter(under=fspath("rel"))
    assert Filter(under=fspath("/mnt")).is_under("/mnt/x")


@pytest.mark.parametrize(
    ("flt", "words"),
    [
        ({"under": "rel"}, "bad filter 'under': 'rel' is not an absolute path"),
        ({"under": "/a/"}, "bad filter 'under': '/a/' ends with a slash"),
        ({"actions": []}, "bad filter 'actions': an empty list"),
        ({"fstypes": [""]}, "bad filter 'fstypes[0]'"),
    ],
)
def test_the_wire_request_is_checked(flt: dict[str, object], words: str) -> None:
    line = json.dumps({"type": "subscribe", "version": 1, "filter": flt}).encode()
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == "bad-request"
    assert words in info.value.message, info.value.message


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b'[filter]\nunder = "/a/"', "bad value for 'filter.under' in F: '/a/' ends with a slash"),
        (b'[filter]\nunder = "/a/../b"', "bad value for 'filter.under' in F: '/a/../b' holds"),
        (b'[filter]\nunder = ""', "bad value for 'filter.under' in F: an empty path"),
        (b"[filter]\nactions = []", "bad value for 'filter.actions' in F: an empty list"),
        (b"[filter]\nfstypes = []", "bad value for 'filter.fstypes' in F: an empty list"),
        (b'[filter]\nfstypes = ["ext4", ""]', "bad value for 'filter.fstypes[1]' in F: ''"),
    ],
)
def test_the_settings_files_filter_is_checked(doc: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "F")
    assert str(info.value).startswith(message), str(info.value)
