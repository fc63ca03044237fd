# -*- test-case-name: tests.test_client,tests.test_client_servers -*-
"""
Redis's protocol (RESP2) as a producer needs it: a command encoded into
one buffer, written at once, and its reply parsed from what the socket
gave, no more.  The handshake (AUTH, SELECT, a client name) is pipelined
in one write, as the daemon's own connections do it.
"""

from __future__ import annotations

from snq.client.wire import Wire
from snq.redis.address import RedisAddress


class ReplyError(Exception):
    """Redis answered with an error (C{-WRONGPASS …}, C{-NOSCRIPT …})."""


class ProtocolError(ConnectionError):
    """A reply that is not RESP2: the connection cannot be trusted further."""


def command(*args) -> bytes:
    """One command as Redis reads it: arguments are bytes, str or numbers."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode()
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


class RespConnection:
    """A logged-in connection to Redis, used by one thread at a time."""

    def __init__(self, wire: Wire, address: RedisAddress, name: str):
        """Logs in on C{wire} (closed if that fails)."""
        self.name = name
        self.wire = wire
        self._buffer = b""
        self._at = 0
        hello = []
        if address.password is not None:
            hello.append(command("AUTH", *filter(None, [address.username]),
                                 address.password))
        if address.db:
            hello.append(command("SELECT", address.db))
        hello.append(command("CLIENT", "SETNAME", name))
        try:
            self.pipeline(hello)
        except BaseException:
            self.wire.close()
            raise

    def execute(self, request: bytes):
        """Send one encoded command; → its reply (an error reply raises)."""
        self.wire.write(request)
        reply = self._reply()
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def pipeline(self, requests: list[bytes]) -> list:
        """Send encoded commands in one write; → their replies.  The first
        error reply raises, once all are read."""
        self.wire.write(b"".join(requests))
        replies = [self._reply() for _ in requests]
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise reply
        return replies

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        if kind in (b"$", b"*") and rest.lstrip(b"-").isdigit():
            size = int(rest)
            if size < 0:
                return None
            if kind == b"*":
                return [self._reply() for _ in range(size)]
            return self._bulk(size)
        raise ProtocolError(f"not a RESP2 reply: {line[:40]!r}")

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n", self._at)) < 0:
            self._fill()
        line = self._buffer[self._at:end]
        self._at = end + 2
        return line

    def _bulk(self, size: int) -> bytes:
        while len(self._buffer) < self._at + size + 2:
            self._fill()
        value = self._buffer[self._at:self._at + size]
        self._at += size + 2
        return value

    def _fill(self):
        self._buffer = self._buffer[self._at:] + self.wire.read()
        self._at = 0

    def close(self):
        self.wire.close()
