# -*- test-case-name: tests.test_files -*-
"""
Files and directories the daemon makes are its user's alone: the SQLite
queue (whose C{-wal} and C{-shm} SQLite makes with the database file's
mode) and the dead-letter files hold whole items, which may hold anything
a producer put there.  Made 0600 and 0700 whatever the umask; what exists
already keeps the mode the operator gave it.
"""

import os


def privateDirectory(path: str) -> None:
    """Make C{path} and any missing parent, each 0700."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    privateDirectory(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    # mkdir's mode is filtered by the umask, which may only take away.
    os.chmod(path, 0o700)


def createPrivate(path: str) -> None:
    """Make C{path} an empty 0600 file, unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def writePrivate(path: str, text: str) -> None:
    """Write a new 0600 file (never an existing one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
