# -*- test-case-name: tests.test_client_wire,tests.test_client_servers -*-
"""
Enqueueing on the STOMP backend: a SEND per item to the queue the daemon
routes it to (written as the broker wants it, L{onTheWire}), each
confirmed by a RECEIPT, which RabbitMQ gives only once the message is
safe.  A later item goes to the delay queue a worker's retry would use,
which hands it back in time.

Per call, only what changes is built (a destination's headers are encoded
once), the SENDs of a call go out in one write, and the receipts are read
with a parser that knows the few frames a broker answers a producer with.
stompest's session does the login.
"""

from __future__ import annotations

import functools
import itertools
import time

from stompest.error import StompError
from stompest.protocol import StompFrame, StompSession, StompSpec

from snq.client.errors import EnqueueError
from snq.client.pool import Pool
from snq.client.wire import Wire, tlsContext
from snq.stomp.destinations import Destinations, onTheWire

JSON = (("persistent", "true"), ("content-type", "application/json"))
#: SENDs written at once, between two looks for receipts.
WINDOW = 500


class BrokerError(Exception):
    """The broker refused (an ERROR frame) or did not answer in time."""


class StompBackend:
    def __init__(self, config, routing):
        self.config = config.stomp
        self.where = ", ".join(self.config.servers)
        self.destinations = Destinations(config, routing)
        self.pool = Pool(self._connect, lambda conn: conn.close())

    def _connect(self) -> _Connection:
        """The first server of C{[stomp] servers} that answers."""
        errors = []
        for url in self.config.servers:
            try:
                return _Connection(self._wire(url), self.config)
            except (OSError, StompError, BrokerError) as e:
                errors.append(f"{url}: {e}")
        raise BrokerError("no STOMP server answers (" + "; ".join(errors) + ")")

    def _wire(self, url: str) -> Wire:
        scheme, _, hostPort = url.partition("://")
        host, _, port = hostPort.rpartition(":")
        return Wire(host, int(port), self.config.connect_timeout,
                    tlsContext() if scheme == "ssl" else None)

    def store(self, items):
        now = time.time()
        messages = []
        for item in items:
            destination = self.destinations.route(item.transport, item.site)
            messages.append((destination, item.toJSON(), item.dueAt(now) - now,
                             item.priority))
        try:
            self.pool.use(lambda conn: conn.sendAll(
                [self._frame(conn, *m) for m in messages]),
                (OSError, StompError))
        except (OSError, StompError, BrokerError) as e:
            raise EnqueueError(f"cannot enqueue on {self.where}: {e}") from e

    def _frame(self, conn, destination, body, delay, priority):
        """C{(head, body)}: the SEND's headers up to its receipt, and its body."""
        headers = JSON + tuple(
            self.destinations.itemHeaders(priority, delay > 0).items())
        if delay > 0:
            # Never late: a worker sends one that comes early round again.
            destination, wait = self.destinations.delayed(
                destination, delay, conn.rabbitmq, early=True)
            headers += tuple(wait.items())
        return _head(onTheWire(destination, conn.escape), headers), body

    def close(self):
        self.pool.close()


@functools.lru_cache(maxsize=1024)
def _head(destination: str, headers: tuple) -> bytes:
    """A SEND frame (STOMP 1.2) up to its receipt header: the same for
    every item to one queue (and one delay)."""
    lines = "".join(f"{_escape(k)}:{_escape(v)}\n" for k, v in headers)
    return f"SEND\ndestination:{_escape(destination)}\n{lines}".encode()


def _escape(text: str) -> str:
    """STOMP 1.2's escapes in a header name or value."""
    if any(c in text for c in "\\\r\n:"):
        text = (text.replace("\\", "\\\\").replace("\r", "\\r")
                .replace("\n", "\\n").replace(":", "\\c"))
    return text


class _Connection:
    """
    One logged-in STOMP connection, used by one thread at a time: stompest
    builds the CONNECT and checks the CONNECTED; SENDs are written here, a
    call's in one write.
    """

    def __init__(self, wire: Wire, config):
        """Logs in on C{wire} (closed if that fails)."""
        self.timeout = config.connect_timeout
        self.wire = wire
        self.reader = FrameReader()
        self._receipts = itertools.count()
        try:
            self._login(config)
        except BaseException:
            self.wire.close()
            raise
        self.escape = (config.escape_slashes == "always" or (
            config.escape_slashes == "auto" and self.rabbitmq))

    def _login(self, config):
        session = StompSession(StompSpec.VERSION_1_2)
        self.wire.write(bytes(session.connect(
            config.login, config.passcode.reveal(),
            {StompSpec.HOST_HEADER: config.vhost}, [StompSpec.VERSION_1_2],
            config.vhost, None)))
        deadline = time.monotonic() + self.timeout
        frames = []
        while not frames:
            self._recv(deadline)
            frames = list(self._frames())
        command, headers, body = frames[0]
        session.connected(StompFrame(command, headers, body,
                                     version=StompSpec.VERSION_1_2))
        self.rabbitmq = (session.server or "").startswith("RabbitMQ/")

    def sendAll(self, frames):
        """SEND each C{(head, body)}; return once all are confirmed."""
        if self.wire.readable():
            # Nothing is due on an idle connection: the broker is closing it
            # (an ERROR before it goes).
            raise ConnectionError("closed by the broker while idle")
        waiting = set()
        for start in range(0, len(frames), WINDOW):
            # Take what receipts came meanwhile: unread, they would fill the
            # buffers until neither side could write.
            while start and self.wire.readable():
                self.reader.add(self.wire.read())
            out = []
            for head, body in frames[start:start + WINDOW]:
                receipt = f"snq-{next(self._receipts)}"
                waiting.add(receipt)
                out += (head, b"receipt:%s\ncontent-length:%d\n\n" % (
                    receipt.encode(), len(body)), body, b"\0")
            self.wire.write(b"".join(out))
        deadline = time.monotonic() + self.timeout
        while waiting:
            self._recv(deadline)
            self._confirmed(waiting)

    def _recv(self, deadline: float):
        if time.monotonic() >= deadline:
            raise BrokerError(f"no answer within {self.timeout:g} s")
        try:
            self.reader.add(self.wire.read())
        except TimeoutError:
            raise BrokerError(f"no answer within {self.timeout:g} s")

    def _frames(self):
        """The frames received whole so far; an ERROR raises."""
        for frame in self.reader.frames():
            command, headers, body = frame
            if command == "ERROR":
                details = body.decode("utf-8", "replace").strip()
                raise BrokerError(f"the broker refused: {headers.get('message', '')}"
                                  + (f": {details}" if details else ""))
            yield frame

    def _confirmed(self, waiting: set):
        for _, headers, _ in self._frames():
            waiting.discard(headers.get("receipt-id"))

    def close(self):
        try:
            self.wire.write(b"DISCONNECT\n\n\0")
        finally:
            self.wire.close()


class FrameReader:
    """
    The frames a broker sends, as C{(command, headers, body)}: a body ends
    after its C{content-length}, else at the NUL; the end of lines between
    frames (RabbitMQ's after each, heart-beats) are skipped.  Header
    values are unescaped (STOMP 1.2), the first of a repeated name wins.
    """

    def __init__(self):
        self._buffer = b""

    def add(self, data: bytes):
        self._buffer += data

    def frames(self):
        while frame := self._next():
            yield frame

    def _next(self):
        buffer = self._buffer.lstrip(b"\r\n")
        self._buffer = buffer
        end = buffer.find(b"\n\n")
        crlf = buffer.find(b"\n\r\n")
        if crlf >= 0 and (end < 0 or crlf < end):
            end, skip = crlf, 3
        else:
            skip = 2
        if end < 0:
            return None
        command, *lines = buffer[:end].decode("utf-8").split("\n")
        headers = {}
        for line in lines:
            name, _, value = line.rstrip("\r").partition(":")
            headers.setdefault(_unescape(name), _unescape(value))
        start = end + skip
        if "content-length" in headers:
            stop = start + int(headers["content-length"])
            if len(buffer) <= stop:
                return None
        else:
            stop = buffer.find(b"\0", start)
            if stop < 0:
                return None
        self._buffer = buffer[stop + 1:]
        return command.rstrip("\r"), headers, buffer[start:stop]


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return (text.replace("\\\\", "\0").replace("\\r", "\r").replace("\\n", "\n")
            .replace("\\c", ":").replace("\0", "\\"))
