"""Container names from real cgroups (v2), named as each runtime names them, with a
private namespace's process in them."""

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

from amountd.cgroups import ContainerLookup, container_of_pid

from ..conftest import MakeNs, PrivateNs, run_cli

H1 = "3f" * 32
H2 = "a1b2c3d4" * 8
POD = "0d5f1e3a-8c6b-4e2f-9a7d-1b2c3d4e5f60"


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

    def make(self, rel: str) -> Path:
        path = self.base
        for part in rel.strip("/").split("/"):
            path = path / part
            if not path.exists():
                path.mkdir()
                self.made.append(path)
        return path

    def place(self, pid: int, rel: str) -> Path:
        path = self.make(rel)
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
    from ..multihelp import Serve
    from ..nsharness import ns_id_of

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


def test_a_namespace_found_later_is_announced_with_its_container(
    cgroups: Cgroups, tmp_path: Path
) -> None:
    """Under --all-namespaces, a namespace made later (its process born in a docker
    scope) comes as `resync` (reason `found`) naming its container, then its mounts; its
    `end` names the container too, though no process is left to read it from."""
    import anyio

    from amountd.model import End, Event, Resync

    from ..multihelp import RawSub, Serve, wait_for
    from ..nsharness import kernel_table, ns_id_of

    scope = cgroups.make(f"system.slice/docker-{H1}.scope")
    srv = Serve(tmp_path / "s.sock", "asyncio", "--all-namespaces", "--queue", "1000000").start()
    late = None
    try:

        async def body() -> None:
            nonlocal late
            sub = await RawSub.open(srv.sock, fmt="json")
            async with anyio.create_task_group() as tg:
                tg.start_soon(sub.run)
                # Born in the scope: the server cannot meet it outside.
                late = subprocess.Popen(
                    [
                        "sh",
                        "-c",
                        f'echo $$ > "{scope}/cgroup.procs" && '
                        "exec unshare -m --propagation private sleep infinity",
                    ]
                )
                await wait_for(lambda: ns_id_of(late.pid) != ns_id_of(os.getpid()), 10)
                late_id = ns_id_of(late.pid)
                await wait_for(
                    lambda: sub.ns_table(late_id) == kernel_table(late.pid), 30, "the new ns"
                )
                mine = [
                    f
                    for f in sub.frames
                    if (isinstance(f, Resync) and f.ns_id == late_id)
                    or (isinstance(f, Event) and f.mount.ns_id == late_id)
                ]
                first = mine[0]
                assert isinstance(first, Resync) and first.reason == "found"
                assert first.container is not None
                assert (first.container.runtime, first.container.id) == ("docker", H1)
                assert all(isinstance(f, Event) and f.via == "resync" for f in mine[1:])
                late.kill()
                late.wait()
                await wait_for(lambda: bool(sub.ends(late_id)), 30, "its end")
                [end] = [f for f in sub.frames if isinstance(f, End) and f.ns_id == late_id]
                assert end.container == first.container
                tg.cancel_scope.cancel()
            await sub.aclose()

        anyio.run(body)
        assert "new mount namespace" in srv.text()
    finally:
        if late is not None and late.poll() is None:
            late.kill()
            late.wait()
        srv.stop()
