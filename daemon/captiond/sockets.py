"""Unix socket paths and peers: what makes a path unusable, or a socket another user could stand in for."""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

SUN_PATH_MAX = 107
"""Bytes of a Unix socket's path (sockaddr_un's 108, with its terminating NUL)."""


def too_long(path: Path, key: str = "server.socket") -> str:
    """Why `path` cannot be a Unix socket's ("" if it can); `key` is the setting to change."""
    size = len(os.fsencode(path))
    if size <= SUN_PATH_MAX:
        return ""
    return f"{path} is {size} bytes long, and a Unix socket's path may have at most {SUN_PATH_MAX}; set {key} to a shorter path"


def shared_tmp_folder() -> Path:
    """The socket's folder when there is no runtime directory: in /tmp, where any user may have made it."""
    return Path(f"/tmp/captiond-{os.getuid()}")


def unsafe_folder(folder: Path) -> str:
    """Why a socket in `folder` could be replaced by another user ("" if it could not, or there is no
    such folder): another user owns it, or others may write to it and it is not sticky like /tmp."""
    try:
        link = folder.lstat()
    except OSError:
        return ""
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.geteuid(), 0):
        # It leads where its maker chose: /tmp itself, say, where they put a socket first.
        return f"{folder} is a link another user made (uid {link.st_uid})"
    try:
        st = folder.stat()
    except OSError:
        return f"{folder} is a link that leads nowhere" if stat.S_ISLNK(link.st_mode) else ""
    if st.st_uid not in (os.geteuid(), 0):
        return f"{folder} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"{folder} may be written by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def peer_ids(sock: socket.socket) -> tuple[int, int, int] | None:
    """The pid, uid and gid of the process at the other end of a Unix socket; None if the system does not say."""
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return None
