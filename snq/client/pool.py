# -*- test-case-name: tests.test_client -*-
"""
Connections shared by the threads of one process, and never by two
processes: a web server's workers forked after the application opened a
connection must not talk over the same socket as their parent.
"""

from __future__ import annotations

import contextlib
import os
import threading


class Pool:
    """
    Idle connections: a thread takes one (or a new one is made), uses it
    alone, and gives it back; one that failed in use is closed instead.
    As many are kept as threads used them at once.
    """

    def __init__(self, connect, close):
        self._connect = connect
        self._close = close
        self._lock = threading.Lock()
        self._idle: list = []
        self._pid = os.getpid()

    def use(self, work, retryable: type[BaseException] | tuple = ()):
        """
        C{work(connection)}'s result.  A connection kept idle that fails
        with C{retryable} was most likely dropped by the server meanwhile
        (a restart, an idle timeout, C{CLIENT KILL}): it is closed, and
        C{work} runs again on the next, a new one at the latest.  (Had the
        server taken the request before it went, it is taken twice: at
        least once.)
        """
        while True:
            conn, reused = self._take()
            try:
                result = work(conn)
            except retryable:
                self.discard(conn)
                if not reused:
                    raise
                continue
            except BaseException:
                self.discard(conn)
                raise
            with self._lock:
                if self._pid == os.getpid():
                    self._idle.append(conn)
            return result

    def _take(self):
        """C{(connection, reused)}: C{reused} says it was made before."""
        with self._lock:
            if self._pid != os.getpid():
                # Forked: these belong to the parent.  Forgotten, not
                # closed: closing could say goodbye to the server on the
                # parent's behalf (a DISCONNECT, a QUIT).
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def discard(self, conn):
        if self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._close(conn)

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self.discard(conn)
