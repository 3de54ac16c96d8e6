"""The socket directory's pure decisions (amountd.sockdir): what makes a directory unsafe,
which peer may serve the socket. The real attacks are in tests/kernel/."""

from __future__ import annotations

import stat

import pytest

from amountd.sockdir import Node, peer_problem, unsafe_reason

NOBODY = 65534
D = stat.S_IFDIR
L = stat.S_IFLNK


# --- pure: the stat chain ------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "problem"),
    [
        ([Node("/", 0, D | 0o755), Node("/run", 0, D | 0o755)], None),
        ([Node("/", 0, D | 0o755), Node("/tmp", 0, D | 0o1777)], None),  # sticky
        ([Node("/", 0, D | 0o755), Node("/home/me", 1000, D | 0o700)], None),  # our own
        ([Node("/", 0, D | 0o755), Node("/x", NOBODY, D | 0o755)], "owned by uid 65534"),
        ([Node("/", 0, D | 0o755), Node("/x", 0, D | 0o777)], "writable by other users"),
        ([Node("/", 0, D | 0o755), Node("/x", 0, D | 0o775)], "writable by its group"),
        ([Node("/", 0, D | 0o777), Node("/x", 0, D | 0o755)], "/ is writable"),  # an ancestor
        ([Node("/", 0, D | 0o755), Node("/l", NOBODY, L | 0o777)], "symlink owned by uid"),
        ([Node("/", 0, D | 0o755), Node("/l", 0, L | 0o777)], None),  # root's symlink
        ([Node("/", 0, D | 0o755), Node("/f", 0, stat.S_IFREG | 0o644)], "not a directory"),
        # sticky does not excuse another owner: that owner can rename inside it
        ([Node("/", 0, D | 0o755), Node("/x", NOBODY, D | 0o1777)], "owned by uid 65534"),
    ],
)
def test_unsafe_reason(nodes: list[Node], problem: str | None) -> None:
    why = unsafe_reason(nodes, own_uid=1000)
    if problem is None:
        assert why is None
    else:
        assert why is not None and problem in why, why


def test_peer_problem() -> None:
    assert peer_problem(0, 1000, None) is None
    assert peer_problem(1000, 1000, None) is None
    assert peer_problem(1001, 1000, 1001) is None
    why = peer_problem(NOBODY, 0, None)
    assert why is not None and "uid 65534" in why and "--server-uid 65534" in why
    assert peer_problem(NOBODY, 0, 1001) is not None
