"""
A fake STOMP broker for unit tests: endpoints whose connections are
L{StringTransport}s, and a broker side that answers CONNECT and receipts
when pumped, records what the client sent, and delivers MESSAGEs.
"""

import itertools

from stompest.protocol import StompFrame, StompParser, StompSpec
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure


class FakeConnection:
    def __init__(self, broker, protocol):
        self.broker = broker
        self.protocol = protocol
        self.transport = StringTransport()
        self.parser = StompParser(StompSpec.VERSION_1_2)
        self.open = True
        #: subscription id → (destination, headers)
        self.subscriptions = {}
        self.frames = []
        protocol.makeConnection(self.transport)

    def reply(self, command, headers=None, body=b""):
        frame = StompFrame(command, headers or {}, body,
                           version=StompSpec.VERSION_1_2)
        self.protocol.dataReceived(bytes(frame))

    def lose(self):
        if self.open:
            self.open = False
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def deliver(self, destination, body, headers=None):
        """A MESSAGE for the subscription to C{destination}; → its ack id."""
        for subId, (dest, _) in self.subscriptions.items():
            if dest == destination:
                ackId = f"T_{subId}@@{next(self.broker.ids)}"
                self.reply(StompSpec.MESSAGE, {
                    "destination": destination, "subscription": subId,
                    "message-id": ackId, "ack": ackId, "redelivered": "false",
                    **(headers or {})}, body)
                return ackId
        raise AssertionError(f"no subscription to {destination} in "
                             f"{self.subscriptions}")


class FakeBroker:
    """
    C{pump()} reads what clients wrote and answers: CONNECTED (unless
    C{connectError}), RECEIPT for every receipt asked (unless C{holdReceipts}).
    """

    def __init__(self, server="RabbitMQ/3.10.8", clock=None):
        self.server = server
        #: Also run what is due now on it (callLater(0, …)) while pumping.
        self.clock = clock
        self.connections: list[FakeConnection] = []
        self.refuse = False
        self.connectError = None
        self.answer = True
        self.holdReceipts = False
        self.heldReceipts = []
        self.ids = itertools.count(1)

    def endpoint(self):
        return FakeEndpoint(self)

    def pump(self):
        """Answer until nobody writes anything more."""
        busy = True
        while busy:
            busy = False
            if self.clock is not None:
                self.clock.advance(0)
            for conn in list(self.connections):
                data = conn.transport.value()
                if data:
                    busy = True
                    conn.transport.clear()
                    conn.parser.add(data)
                    while conn.parser.canRead():
                        frame = conn.parser.get()
                        if frame:
                            frame.unraw()
                            self._handle(conn, frame)
                if conn.transport.disconnecting and conn.open:
                    busy = True
                    conn.lose()

    def _handle(self, conn, frame):
        conn.frames.append(frame)
        headers = frame.headers
        if frame.command in (StompSpec.CONNECT, StompSpec.STOMP):
            if not self.answer:
                return
            if self.connectError is not None:
                conn.reply(StompSpec.ERROR, {"message": self.connectError})
                return
            # No heart-beats: tests move the clock by hours.
            conn.reply(StompSpec.CONNECTED, {
                "version": "1.2", "server": self.server, "session": "s",
                "heart-beat": "0,0"})
            return
        if frame.command == StompSpec.SUBSCRIBE:
            conn.subscriptions[headers["id"]] = (headers["destination"], headers)
        receipt = headers.get("receipt")
        closing = frame.command == StompSpec.DISCONNECT
        if receipt is not None and self.holdReceipts:
            self.heldReceipts.append((conn, receipt, closing))
            return
        if receipt is not None:
            conn.reply(StompSpec.RECEIPT, {"receipt-id": receipt})
        if closing:
            conn.transport.loseConnection()

    def releaseReceipts(self):
        held, self.heldReceipts = self.heldReceipts, []
        for conn, receipt, closing in held:
            if conn.open:
                conn.reply(StompSpec.RECEIPT, {"receipt-id": receipt})
                if closing:
                    conn.transport.loseConnection()

    def sent(self, command):
        """Every frame of C{command} any client sent, in order."""
        return [f for c in self.connections for f in c.frames
                if f.command == command]

    @property
    def last(self):
        return self.connections[-1]


class FakeEndpoint:
    def __init__(self, broker):
        self.broker = broker

    def connect(self, factory):
        if self.broker.refuse:
            return defer.fail(ConnectionRefusedError("refused by the test"))
        protocol = factory.buildProtocol(None)
        self.broker.connections.append(FakeConnection(self.broker, protocol))
        return defer.succeed(protocol)
