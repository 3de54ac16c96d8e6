"""Container names from cgroups: the pure parser on each runtime's real shapes, then real
cgroups (v2) named as each runtime names them, with a private namespace's process in them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from amountd.access import scope_filter
from amountd.cgroups import ContainerLookup, container_of_pid
from amountd.container import Container, container_of_cgroup, parse_cgroup
from amountd.filter import Filter
from amountd.protocol import ProtocolError

from .conftest import MakeNs, PrivateNs, run_cli

H1 = "3f" * 32
H2 = "a1b2c3d4" * 8
POD = "0d5f1e3a-8c6b-4e2f-9a7d-1b2c3d4e5f60"


@pytest.mark.parametrize(
    ("path", "want"),
    [
        (f"/system.slice/docker-{H1}.scope", Container(runtime="docker", id=H1)),
        (f"/system.slice/docker-{H1}.scope/init.scope", Container(runtime="docker", id=H1)),
        (f"/docker/{H1}", Container(runtime="docker", id=H1)),
        (f"/machine.slice/libpod-{H2}.scope", Container(runtime="podman", id=H2)),
        (
            f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{H2}.scope/container",
            Container(runtime="podman", id=H2),
        ),
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            + POD.replace("-", "_")
            + f".slice/cri-containerd-{H1}.scope",
            Container(runtime="containerd", id=H1, pod=POD),
        ),
        (
            f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{H2}.scope",
            Container(runtime="cri-o", id=H2, pod=POD),
        ),
        (f"/kubepods/burstable/pod{POD}/{H1}", Container(runtime="kubernetes", id=H1, pod=POD)),
        ("/lxc.payload.web01", Container(runtime="lxc", id="web01")),
        ("/lxc.payload.web01/system.slice/cron.service", Container(runtime="lxc", id="web01")),
        (
            "/machine.slice/systemd-nspawn@build\\x2dbox.service/payload",
            Container(runtime="systemd-nspawn", id="build-box"),
        ),
        (
            "/machine.slice/machine-build\\x2dbox.scope",
            Container(runtime="machine", id="build-box"),
        ),
        ("/system.slice/foo.service", Container(runtime="systemd", id="foo.service")),
        (
            "/user.slice/user-0.slice/session-4.scope",
            Container(runtime="systemd", id="session-4.scope"),
        ),
    ],
)
def test_each_runtime_is_named(path: str, want: Container) -> None:
    got = container_of_cgroup(path)
    assert got is not None
    assert (got.runtime, got.id, got.pod) == (want.runtime, want.id, want.pod)
    assert got.cgroup == path


def test_root_and_plain_cgroups() -> None:
    assert container_of_cgroup("/") is None
    assert container_of_cgroup(None) is None
    assert container_of_cgroup("/some/where") == Container(
        runtime="cgroup", id="/some/where", cgroup="/some/where"
    )


def test_parse_cgroup_prefers_v2_then_name_systemd() -> None:
    assert parse_cgroup(f"0::/system.slice/docker-{H1}.scope\n") == (
        f"/system.slice/docker-{H1}.scope"
    )
    hybrid = "9:name=systemd:/system.slice/a.service\n4:memory:/x\n0::/\n"
    assert parse_cgroup(hybrid) == "/"
    v1 = "9:name=systemd:/system.slice/a.service\n4:memory:/x\n"
    assert parse_cgroup(v1) == "/system.slice/a.service"
    assert parse_cgroup("") is None


def test_short_names_and_matching() -> None:
    c = Container(runtime="docker", id=H1)
    assert c.short == "docker:" + H1[:12]
    assert c.matches("3f3f") and c.matches("docker:3f3f") and not c.matches("podman:3f3f")
    assert not c.matches("") and not c.matches("ab")
    k = Container(runtime="containerd", id=H2, pod=POD)
    assert k.matches(POD[:8])
    assert Container(runtime="lxc", id="web01").short == "lxc:web01"


def test_the_container_filter_becomes_namespaces() -> None:
    f = Filter(containers=["3f3f"])
    scoped = scope_filter(f, None, {}, container_ns={"3f3f": {11, 12}})
    assert scoped.namespaces == [11, 12] and scoped.containers is None
    with pytest.raises(ProtocolError, match="no running container matches 'zz'"):
        scope_filter(Filter(containers=["zz"]), None, {}, container_ns={"zz": set()})
    with pytest.raises(ProtocolError) as e:
        scope_filter(f, frozenset({11}), {}, container_ns={"3f3f": {11, 12}})
    assert e.value.code == "forbidden"


# --- real cgroups -----------------------------------------------------------------------------


def _cgroup2_root() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return Path(fields[4])
    return None


class Cgroups:
    """A test cgroup (v2) subtree; processes moved into it go back to the root at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / f"amountd-test-{uuid.uuid4().hex[:8]}"
        self.base.mkdir()
        self.made: list[Path] = [self.base]
        self.moved: list[int] = []

    def place(self, pid: int, rel: str) -> Path:
        path = self.base
        for part in rel.strip("/").split("/"):
            path = path / part
            if not path.exists():
                path.mkdir()
                self.made.append(path)
        (path / "cgroup.procs").write_text(str(pid))
        self.moved.append(pid)
        return path

    def close(self) -> None:
        for pid in self.moved:
            with contextlib.suppress(OSError):  # it exited
                (self.root / "cgroup.procs").write_text(str(pid))
        for path in reversed(self.made):
            with contextlib.suppress(OSError):
                path.rmdir()


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    if os.geteuid() != 0:
        pytest.skip("needs root to make cgroups")
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    try:
        cg = Cgroups(root)
    except OSError as e:
        pytest.skip(f"cgroup v2 at {root} is not writable: {e}")
    try:
        yield cg
    finally:
        cg.close()


@pytest.fixture
def second_ns(make_ns: MakeNs) -> PrivateNs:
    return make_ns(1)[0]


def test_real_cgroups_name_each_runtime(cgroups: Cgroups, private_ns: PrivateNs) -> None:
    pid = private_ns.pid
    shapes = {
        f"system.slice/docker-{H1}.scope": ("docker", H1, None),
        f"machine.slice/libpod-{H2}.scope": ("podman", H2, None),
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        + POD.replace("-", "_")
        + f".slice/cri-containerd-{H1}.scope": ("containerd", H1, POD),
        f"kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{H2}.scope": (
            "cri-o",
            H2,
            POD,
        ),
        "lxc.payload.web01": ("lxc", "web01", None),
        "machine.slice/systemd-nspawn@box.service": ("systemd-nspawn", "box", None),
        "machine.slice/machine-box2.scope": ("machine", "box2", None),
        "system.slice/foo.service": ("systemd", "foo.service", None),
    }
    for rel, (runtime, ident, pod) in shapes.items():
        cgroups.place(pid, rel)
        c = container_of_pid(pid)
        assert c is not None, rel
        assert (c.runtime, c.id, c.pod) == (runtime, ident, pod), rel
        assert c.cgroup.endswith("/" + rel)


def test_list_status_and_filters_show_containers(
    cgroups: Cgroups, private_ns: PrivateNs, second_ns: PrivateNs, tmp_path: Path
) -> None:
    from .multihelp import Serve
    from .nsharness import ns_id_of

    cgroups.place(private_ns.pid, f"system.slice/docker-{H1}.scope")
    cgroups.place(second_ns.pid, f"machine.slice/libpod-{H2}.scope")
    id1, id2 = ns_id_of(private_ns.pid), ns_id_of(second_ns.pid)
    lookup = ContainerLookup()
    c1 = lookup(id1)
    assert c1 is not None and c1.short == "docker:" + H1[:12]
    assert lookup(id1) is c1  # cached

    res = run_cli("list", "--all-namespaces", "-o", "TARGET,NS,CONTAINER")
    assert res.returncode == 0, res.stderr
    text = res.stdout.decode()
    assert f"# mount namespace {id1} (pid {private_ns.pid}, docker:{H1[:12]})" in text
    assert f"# mount namespace {id2} (pid {second_ns.pid}, podman:{H2[:12]})" in text
    assert f"{id1} docker:{H1[:12]}" in text and f"{id2} podman:{H2[:12]}" in text

    res = run_cli("list", "--json", "--ns", str(second_ns.pid))
    assert json.loads(res.stdout)["container"]["runtime"] == "podman"

    srv = Serve(
        tmp_path / "s.sock", "asyncio", "--ns", str(private_ns.pid), "--ns", str(second_ns.pid)
    ).start()
    try:
        st = run_cli("status", "--unix", str(srv.sock))
        assert st.returncode == 0, st.stderr
        assert f"docker:{H1[:12]}" in st.stdout.decode()
        assert f"podman:{H2[:12]}" in st.stdout.decode()
        # --container: only the podman one's mounts
        sub = subprocess.run(
            [
                sys.executable,
                "-m",
                "amountd",
                "subscribe",
                "--unix",
                str(srv.sock),
                "--json",
                "--snapshot",
                "--container",
                "podman:" + H2[:6],
                "--timeout",
                "1",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert sub.returncode == 0, sub.stderr
        snap = json.loads(sub.stdout.splitlines()[0])
        assert snap["type"] == "snapshot"
        assert {m["ns_id"] for m in snap["mounts"]} == {id2}
        bad = run_cli("subscribe", "--unix", str(srv.sock), "--container", "nope", "--timeout", "1")
        assert bad.returncode == 1 and b"no running container matches 'nope'" in bad.stderr
        # --pid and --ns, the protocol's `pids` and `namespaces`
        for flag, value in (("--pid", str(private_ns.pid)), ("--ns", str(id1))):
            sub = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "amountd",
                    "subscribe",
                    "--unix",
                    str(srv.sock),
                    "--json",
                    "--snapshot",
                    flag,
                    value,
                    "--timeout",
                    "1",
                ],
                capture_output=True,
                timeout=30,
                check=False,
            )
            snap = json.loads(sub.stdout.splitlines()[0])
            assert {m["ns_id"] for m in snap["mounts"]} == {id1}, flag
    finally:
        srv.stop()
