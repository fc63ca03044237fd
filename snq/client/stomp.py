# -*- test-case-name: tests.test_client,tests.test_client_servers -*-
"""
Enqueueing on the STOMP backend, on stompest's protocol layer: a SEND
per item to the queue the daemon routes it to (written as the broker wants
it, L{onTheWire}), each confirmed by a RECEIPT, which RabbitMQ gives only
once the message is safe.  A later item goes to the delay queue a worker's
retry would use, which hands it back in time.
"""

from __future__ import annotations

import itertools
import select
import socket
import ssl
import time

from stompest.error import StompError
from stompest.protocol import StompFrame, StompParser, StompSession, StompSpec

from snq.client.errors import EnqueueError
from snq.client.pool import Pool
from snq.stomp.destinations import Destinations, onTheWire

JSON = {"persistent": "true", "content-type": "application/json"}
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
                return _Connection(url, self.config)
            except (OSError, StompError, BrokerError) as e:
                errors.append(f"{url}: {e}")
        raise BrokerError("no STOMP server answers (" + "; ".join(errors) + ")")

    def store(self, items):
        now = time.time()
        messages = []
        for item in items:
            destination = self.destinations.route(item.transport, item.site)
            messages.append((destination, item.toJSON(), item.dueAt(now) - now))
        try:
            self._send(messages)
        except (OSError, StompError, BrokerError) as e:
            raise EnqueueError(f"cannot enqueue on {self.where}: {e}") from e

    def _send(self, messages):
        self.pool.use(
            lambda conn: conn.sendAll([self._frame(conn, *m) for m in messages]),
            (OSError, StompError))

    def _frame(self, conn, destination, body, delay):
        headers = JSON
        if delay > 0:
            # Never late: a worker sends one that comes early round again.
            destination, wait = self.destinations.delayed(
                destination, delay, conn.rabbitmq, early=True)
            headers = {**JSON, **wait}
        return onTheWire(destination, conn.escape), body, headers

    def close(self):
        self.pool.close()


class _Connection:
    """
    One logged-in STOMP connection, used by one thread at a time: stompest
    builds the CONNECT and parses what comes back; SENDs are written here,
    a batch in one write.
    """

    def __init__(self, url: str, config):
        scheme, _, hostPort = url.partition("://")
        host, _, port = hostPort.rpartition(":")
        self.timeout = config.connect_timeout
        sock = socket.create_connection((host, int(port)), timeout=self.timeout)
        try:
            if scheme == "ssl":
                sock = ssl.create_default_context().wrap_socket(
                    sock, server_hostname=host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.parser = StompParser(StompSpec.VERSION_1_2)
        self._receipts = itertools.count()
        try:
            self._login(config)
        except BaseException:
            sock.close()
            raise
        self.escape = (config.escape_slashes == "always" or (
            config.escape_slashes == "auto" and self.rabbitmq))

    def _login(self, config):
        session = StompSession(StompSpec.VERSION_1_2)
        self.sock.sendall(bytes(session.connect(
            config.login, config.passcode.reveal(),
            {StompSpec.HOST_HEADER: config.vhost}, [StompSpec.VERSION_1_2],
            config.vhost, None)))
        deadline = time.monotonic() + self.timeout
        frames = []
        while not frames:
            self._recv(deadline - time.monotonic())
            frames = list(self._frames())
        session.connected(frames[0])
        self.rabbitmq = (session.server or "").startswith("RabbitMQ/")

    def sendAll(self, frames):
        """SEND each C{(destination, body, headers)}; return once all are confirmed."""
        if select.select([self.sock], [], [], 0)[0]:
            # Nothing is due on an idle connection: the broker is closing it
            # (an ERROR before it goes).
            raise ConnectionError("closed by the broker while idle")
        waiting = set()
        for start in range(0, len(frames), WINDOW):
            out = []
            for destination, body, headers in frames[start:start + WINDOW]:
                receipt = f"snq-{next(self._receipts)}"
                waiting.add(receipt)
                out.append(_send(destination, body, headers, receipt))
            self.sock.sendall(b"".join(out))
            # Take what receipts came meanwhile: unread, they would fill the
            # buffers until neither side could write.
            while select.select([self.sock], [], [], 0)[0]:
                self._recv(self.timeout)
            self._confirmed(waiting)
        deadline = time.monotonic() + self.timeout
        while waiting:
            self._recv(deadline - time.monotonic())
            self._confirmed(waiting)

    def _recv(self, timeout: float):
        if timeout <= 0:
            raise BrokerError(f"no answer within {self.timeout:g} s")
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise BrokerError(f"no answer within {self.timeout:g} s")
        if not data:
            raise ConnectionError("closed by the broker")
        self.parser.add(data)

    def _frames(self):
        """The frames received whole so far; an ERROR raises."""
        while self.parser.canRead():
            frame = self.parser.get()
            if not isinstance(frame, StompFrame):
                continue  # The end of line RabbitMQ writes after a frame.
            if frame.command == StompSpec.ERROR:
                message = frame.headers.get("message", "")
                details = frame.body.decode("utf-8", "replace").strip()
                raise BrokerError(f"the broker refused: {message}"
                                  + (f": {details}" if details else ""))
            yield frame

    def _confirmed(self, waiting: set):
        for frame in self._frames():
            waiting.discard(frame.headers.get(StompSpec.RECEIPT_ID_HEADER))

    def close(self):
        try:
            self.sock.sendall(b"DISCONNECT\n\n\0")
        finally:
            self.sock.close()


def _send(destination: str, body: bytes, headers: dict, receipt: str) -> bytes:
    """A SEND frame (STOMP 1.2), its body's length given."""
    head = "".join(f"{_escape(k)}:{_escape(v)}\n" for k, v in headers.items())
    return (f"SEND\ndestination:{_escape(destination)}\n{head}receipt:{receipt}\n"
            f"content-length:{len(body)}\n\n").encode() + body + b"\0"


def _escape(text: str) -> str:
    """STOMP 1.2's escapes in a header name or value."""
    if any(c in text for c in "\\\r\n:"):
        text = (text.replace("\\", "\\\\").replace("\r", "\\r")
                .replace("\n", "\\n").replace(":", "\\c"))
    return text
