"""Pure: what runs in a mount namespace, named from the cgroup of a process inside it.

Container runtimes put each container's processes in a cgroup whose name carries the
runtime and the container ID (`systemd-cgls` shows them; `machinectl` names the
nspawn ones). Reading `/proc/PID/cgroup` is one small read and needs no runtime API,
so the answer is cheap, works for every runtime, and stays right when a runtime's
daemon is down. The shapes (cgroup v2 `0::/path`, systemd and cgroupfs drivers):

    /system.slice/docker-<64hex>.scope                      docker (systemd driver)
    /docker/<64hex>                                         docker (cgroupfs driver)
    /machine.slice/libpod-<64hex>.scope                     podman
    /kubepods.slice/kubepods-burstable.slice/
        kubepods-burstable-pod<uid>.slice/cri-containerd-<64hex>.scope   containerd (CRI)
    .../kubepods-pod<uid>.slice/crio-<64hex>.scope          CRI-O
    /kubepods/burstable/pod<uid>/<64hex>                    Kubernetes, cgroupfs driver
    /lxc.payload.<name>                                     LXC
    /machine.slice/systemd-nspawn@<name>.service            systemd-nspawn
    /machine.slice/machine-<name>.scope                     systemd-machined (nspawn, VMs)
    /system.slice/foo.service                               a systemd unit

The deepest component that names a container wins (a container's own inner cgroups,
e.g. `.../docker-<id>.scope/init.scope`, still belong to it).
"""

from __future__ import annotations

import re

import msgspec

__all__ = ["Container", "container_of_cgroup", "parse_cgroup"]


class Container(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a namespace's processes run in: `runtime` (docker, podman, containerd,
    cri-o, kubernetes, lxc, systemd-nspawn, machine, systemd) and `id` (the container
    ID, the LXC or machine name, or the systemd unit); `pod` is the Kubernetes pod UID
    where the cgroup names one; `cgroup` the path it was read from."""

    runtime: str
    id: str
    pod: str | None = None
    cgroup: str = ""

    @property
    def short(self) -> str:
        """`docker:0123456789ab`: IDs of 64 hex digits cut to 12, as `docker ps` does."""
        ident = self.id[:12] if _HEX64.fullmatch(self.id) else self.id
        return f"{self.runtime}:{ident}"

    def matches(self, spec: str) -> bool:
        """`--container ID|PREFIX`: an ID prefix, a name, or `runtime:PREFIX`."""
        if not spec:
            return False
        runtime, sep, rest = spec.partition(":")
        if sep and runtime == self.runtime:
            spec = rest
        elif sep and rest:
            return False
        return self.id.startswith(spec) or (self.pod is not None and self.pod.startswith(spec))


_HEX64 = re.compile(r"[0-9a-f]{64}")
_SCOPED = [  # systemd-driver scopes: prefix-<64hex>.scope
    (re.compile(r"^docker-([0-9a-f]{64})\.scope$"), "docker"),
    (re.compile(r"^libpod-([0-9a-f]{64})\.scope$"), "podman"),
    (re.compile(r"^cri-containerd-([0-9a-f]{64})\.scope$"), "containerd"),
    (re.compile(r"^crio-([0-9a-f]{64})\.scope$"), "cri-o"),
    (re.compile(r"^nerdctl-([0-9a-f]{64})\.scope$"), "containerd"),
]
_POD = re.compile(r"^(?:kubepods-(?:[a-z]+-)?)?pod([0-9a-f_-]{32,36})(?:\.slice)?$")
_SYSTEMD_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


def _unescape_unit(name: str) -> str:
    """systemd escapes `-` in a machine's name as `\\x2d` (systemd-escape)."""
    return _SYSTEMD_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


def parse_cgroup(text: str) -> str | None:
    """The cgroup path of `/proc/PID/cgroup`: the v2 line (`0::/path`), else the
    `name=systemd` line of a v1 hierarchy; None if there is neither."""
    v1: str | None = None
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, sep, path = rest.partition(":")
        if not sep:
            continue
        if hid == "0" and controllers == "":
            return path
        if controllers == "name=systemd":
            v1 = path
    return v1


def container_of_cgroup(path: str | None) -> Container | None:
    """The container (or unit) a cgroup path names; None for the root cgroup."""
    if path is None:
        return None
    parts = [p for p in path.split("/") if p]
    if not parts:
        return None
    pod: str | None = None
    for p in parts:
        m = _POD.match(p)
        if m:
            pod = m.group(1).replace("_", "-")
    for i in range(len(parts) - 1, -1, -1):
        name = parts[i]
        for rx, runtime in _SCOPED:
            m = rx.match(name)
            if m:
                kind = "kubernetes" if pod is not None and runtime == "docker" else runtime
                return Container(runtime=kind, id=m.group(1), pod=pod, cgroup=path)
        parent = parts[i - 1] if i else ""
        if _HEX64.fullmatch(name):
            if parent == "docker":
                return Container(runtime="docker", id=name, cgroup=path)
            if pod is not None:
                return Container(runtime="kubernetes", id=name, pod=pod, cgroup=path)
            if parent in ("libpod_parent",) or parent.startswith("libpod-"):
                return Container(runtime="podman", id=name, cgroup=path)
        if name.startswith("libpod-") and _HEX64.fullmatch(name[7:]):
            return Container(runtime="podman", id=name[7:], cgroup=path)
        if name.startswith("lxc.payload."):
            return Container(runtime="lxc", id=name[len("lxc.payload.") :], cgroup=path)
        if parent == "lxc" and i == 1:
            return Container(runtime="lxc", id=name, cgroup=path)
        if name.startswith("systemd-nspawn@") and name.endswith(".service"):
            ident = _unescape_unit(name[len("systemd-nspawn@") : -len(".service")])
            return Container(runtime="systemd-nspawn", id=ident, cgroup=path)
        if name.startswith("machine-") and name.endswith(".scope"):
            ident = _unescape_unit(name[len("machine-") : -len(".scope")])
            return Container(runtime="machine", id=ident, cgroup=path)
    for name in reversed(parts):
        if name.endswith((".service", ".scope")):
            return Container(runtime="systemd", id=name, cgroup=path)
    return Container(runtime="cgroup", id=path, cgroup=path)
