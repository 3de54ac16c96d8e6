"""The shared secret a TCP subscriber sends and a server checks, read from a file.

Apart from the server so that the client commands (`subscribe`, `status`) read their
token without importing the server."""

from __future__ import annotations

import os
import stat

from .errors import AmountdError

__all__ = ["TOKEN_MIN", "read_token"]

TOKEN_MIN = 16
"""The shortest token a server accepts (bytes, surrounding whitespace left out)."""


def read_token(path: str, *, strict: bool = False) -> str:
    """The shared secret, from a file (surrounding whitespace ignored).

    `strict` (the server's own token): refuse a file that group or others may read, or
    a secret shorter than TOKEN_MIN bytes, which a local user could read or guess."""
    try:
        with open(path, "rb") as f:
            if strict:
                mode = os.fstat(f.fileno()).st_mode
                if mode & (stat.S_IRGRP | stat.S_IROTH):
                    raise AmountdError(
                        f"the token file {path} is readable by group or others (mode "
                        f"{stat.S_IMODE(mode):04o}): chmod 600 {path}"
                    )
            raw = f.read()
    except OSError as e:
        raise AmountdError(f"cannot read the token file {path}: {e.strerror or e}") from None
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise AmountdError(f"the token file {path} is not UTF-8 text") from None
    if not token:
        raise AmountdError(f"the token file {path} is empty: put a secret in it")
    if strict and len(token.encode()) < TOKEN_MIN:
        raise AmountdError(
            f"the token in {path} is {len(token.encode())} bytes: use at least {TOKEN_MIN} "
            f"(e.g. head -c 32 /dev/urandom | base64 > {path})"
        )
    return token
