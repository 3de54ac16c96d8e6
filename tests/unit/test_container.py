"""Container names from cgroups: the pure parser on each runtime's real shapes (real
cgroups are in tests/kernel/)."""

from __future__ import annotations

import pytest

from amountd.access import scope_filter
from amountd.container import Container, container_of_cgroup, parse_cgroup
from amountd.filter import Filter
from amountd.protocol import ProtocolError

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
