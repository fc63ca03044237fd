# -*- test-case-name: tests.test_client,tests.test_client_servers -*-
"""
Enqueueing on the STOMP backend with stompest's synchronous client: a SEND
per item to the queue the daemon routes it to (written as the broker wants
it, L{onTheWire}), each confirmed by a RECEIPT, which RabbitMQ gives only
once the message is safe.  A later item goes to the delay queue a worker's
retry would use, which hands it back in time.
"""

from __future__ import annotations

import itertools
import ssl
import time

from stompest.config import StompConfig
from stompest.error import StompConnectionError, StompError
from stompest.protocol import StompSpec
from stompest.sync import Stomp

from snq.client.errors import EnqueueError
from snq.client.pool import Pool
from snq.stomp.destinations import Destinations, onTheWire

JSON = {"persistent": "true", "content-type": "application/json"}
#: SENDs between two looks for receipts, so that neither side's buffers fill.
WINDOW = 200


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
        while True:
            reused = False
            try:
                with self.pool.connection() as (conn, reused):
                    conn.sendAll([self._frame(conn, *m) for m in messages])
                return
            except (OSError, StompError):
                if not reused:
                    raise
                # Kept idle and closed by the broker meanwhile: the pool
                # closed it; again on the next.  (Had the broker taken some
                # before it went, those come twice: at least once.)

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
    """One logged-in STOMP connection, used by one thread at a time."""

    def __init__(self, url: str, config):
        scheme, _, hostPort = url.partition("://")
        context = ssl.create_default_context() if scheme == "ssl" else None
        self.timeout = config.connect_timeout
        self.client = Stomp(StompConfig(
            f"tcp://{hostPort}", login=config.login, passcode=config.passcode,
            version=StompSpec.VERSION_1_2, sslContext=context))
        self.client.connect(host=config.vhost, connectTimeout=self.timeout,
                            connectedTimeout=self.timeout)
        server = self.client.session.server or ""
        self.rabbitmq = server.startswith("RabbitMQ/")
        self.escape = (config.escape_slashes == "always" or (
            config.escape_slashes == "auto" and self.rabbitmq))
        self._receipts = itertools.count()

    def sendAll(self, frames):
        """SEND each C{(destination, body, headers)}; return once all are confirmed."""
        if self.client.canRead(0):
            # Nothing is due on an idle connection: the broker is closing it
            # (an ERROR before it goes).
            raise StompConnectionError("closed by the broker while idle")
        waiting = set()
        for n, (destination, body, headers) in enumerate(frames, 1):
            receipt = f"snq-{next(self._receipts)}"
            self.client.send(destination, body, headers, receipt=receipt)
            waiting.add(receipt)
            if n % WINDOW == 0:
                while self.client.canRead(0):
                    waiting.discard(self._read())
        deadline = time.monotonic() + self.timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0 or not self.client.canRead(left):
                raise BrokerError(f"{len(waiting)} SENDs not confirmed within "
                                  f"{self.timeout:g} s")
            waiting.discard(self._read())

    def _read(self):
        """The receipt id of the next frame; an ERROR raises."""
        frame = self.client.receiveFrame()
        if frame.command == StompSpec.ERROR:
            message = frame.headers.get("message", "")
            details = frame.body.decode("utf-8", "replace").strip()
            raise BrokerError(f"the broker refused: {message}"
                              + (f": {details}" if details else ""))
        if frame.command == StompSpec.RECEIPT:
            return self.client.receipt(frame)
        return None

    def close(self):
        try:
            self.client.disconnect()
        finally:
            self.client.close()
