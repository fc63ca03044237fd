# -*- test-case-name: tests.test_stomp_protocol -*-
"""Tests for L{snq.stomp.protocol}, on StringTransport and Clock only."""

from stompest.error import StompFrameError, StompProtocolError
from stompest.protocol import StompFrame, StompParser, StompSpec
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from snq.stomp.protocol import (
    StompClientProtocol,
    StompFactory,
    StompServerError,
    StompTimeoutError,
)


def frameBytes(command, headers=None, body=b"", version=StompSpec.VERSION_1_2):
    """A wire frame as a broker would send it."""
    return bytes(StompFrame(command, headers or {}, body, version=version))


def message(messageId, subscription="sub-1", body=b"", **extra):
    headers = {
        StompSpec.DESTINATION_HEADER: "/queue/a",
        StompSpec.MESSAGE_ID_HEADER: messageId,
        StompSpec.SUBSCRIPTION_HEADER: subscription,
        **extra,
    }
    return frameBytes(StompSpec.MESSAGE, headers, body)


class StompTestCase(SynchronousTestCase):
    """A protocol connected to a StringTransport, with a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.transport = StringTransport()
        self.stomp = StompClientProtocol(clock=self.clock)
        self.stomp.makeConnection(self.transport)

    def sentFrames(self, version=StompSpec.VERSION_1_2):
        """Parse and clear what the protocol wrote (heart-beats left out)."""
        parser = StompParser(version)
        parser.add(self.transport.value())
        self.transport.clear()
        frames = []
        while parser.canRead():
            frame = parser.get()
            if frame:
                frame.unraw()
                frames.append(frame)
        return frames

    def handshake(self, version=StompSpec.VERSION_1_2, serverBeats=None, **kwargs):
        """Connect, answer CONNECTED, and check the negotiated version."""
        connecting = self.stomp.connect("guest", "guest", "/", **kwargs)
        self.transport.clear()
        headers = {StompSpec.VERSION_HEADER: version}
        if serverBeats is not None:
            headers[StompSpec.HEART_BEAT_HEADER] = serverBeats
        self.stomp.dataReceived(frameBytes(StompSpec.CONNECTED, headers))
        self.assertEqual(self.successResultOf(connecting), version)

    def subscribe(self, destination="/queue/a", headers=None):
        """Subscribe without receipt; returns the list MESSAGEs land in."""
        received = []
        self.successResultOf(
            self.stomp.subscribe(destination, received.append, headers, False)
        )
        self.transport.clear()
        return received

    def lose(self, reason=ConnectionDone):
        self.stomp.connectionLost(Failure(reason()))


class ConnectTests(StompTestCase):
    def test_connectFrame(self):
        """CONNECT carries credentials, vhost, versions and heart-beats."""
        connecting = self.stomp.connect(
            "guest", "secret", "/vh", heartBeats=(1000, 2000)
        )
        [frame] = self.sentFrames()
        self.assertEqual(frame.command, StompSpec.CONNECT)
        self.assertEqual(
            frame.headers,
            {
                "login": "guest",
                "passcode": "secret",
                "host": "/vh",
                "accept-version": "1.0,1.1,1.2",
                "heart-beat": "1000,2000",
            },
        )
        self.assertNoResult(connecting)

    def test_negotiatedVersion(self):
        """The Deferred fires with the version from CONNECTED."""
        self.handshake(StompSpec.VERSION_1_1)

    def test_onlyStomp10(self):
        """
        Offering only 1.0 sends neither accept-version nor heart-beat (1.0
        brokers refuse it), still names the vhost, and never heart-beats.
        """
        connecting = self.stomp.connect(
            "guest", "guest", "/", versions=("1.0",), heartBeats=(1000, 1000)
        )
        [frame] = self.sentFrames(StompSpec.VERSION_1_0)
        self.assertEqual(
            frame.headers, {"login": "guest", "passcode": "guest", "host": "/"}
        )
        self.stomp.dataReceived(
            frameBytes(StompSpec.CONNECTED, {"session": "s1"}, version="1.0")
        )
        self.assertEqual(self.successResultOf(connecting), "1.0")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_brokerFallsBackTo10(self):
        """
        A CONNECTED without version means 1.0, and frames in the same read
        after it are parsed as 1.0: no header unescaping.
        """
        connecting = self.stomp.connect("guest", "guest", "/")
        data = frameBytes(StompSpec.CONNECTED) + b"ERROR\nmessage:a\\cb\n\n\0"
        with capturedLogs() as events:
            self.stomp.dataReceived(data)
        self.assertEqual(self.successResultOf(connecting), "1.0")
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(error["errorMessage"], "a\\cb")

    def test_connectedByteByByte(self):
        """CONNECTED split into single bytes is still understood."""
        connecting = self.stomp.connect("guest", "guest", "/")
        data = frameBytes(StompSpec.CONNECTED, {"version": "1.2"})
        for i in range(len(data)):
            self.assertNoResult(connecting)
            self.stomp.dataReceived(data[i : i + 1])
        self.assertEqual(self.successResultOf(connecting), "1.2")

    def test_errorDuringConnect(self):
        """An ERROR reply fails connect with its message and closes."""
        connecting = self.stomp.connect("guest", "wrong", "/")
        with capturedLogs() as events:
            self.stomp.dataReceived(
                frameBytes(StompSpec.ERROR, {"message": "Access refused"}, b"Bad login")
            )
        error = self.failureResultOf(connecting, StompServerError).value
        self.assertEqual(error.message, "Access refused")
        self.assertIn("Bad login", str(error))
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("Access refused", [e.get("errorMessage") for e in events])

    def test_incompatibleVersion(self):
        """A version we did not offer fails connect and drops the connection."""
        connecting = self.stomp.connect("guest", "guest", "/", versions=("1.2",))
        self.stomp.dataReceived(frameBytes(StompSpec.CONNECTED, {"version": "1.1"}))
        self.failureResultOf(connecting, StompProtocolError)
        self.assertTrue(self.transport.disconnected)

    def test_connectTimeout(self):
        """Without CONNECTED in time, connect fails and the connection is cut."""
        connecting = self.stomp.connect("guest", "guest", "/", timeout=5)
        self.clock.advance(4.9)
        self.assertNoResult(connecting)
        self.clock.advance(0.1)
        self.failureResultOf(connecting, StompTimeoutError)
        self.assertTrue(self.transport.disconnected)
        self.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelAborts(self):
        """Cancelling connect (ClientService stopping) aborts the connection."""
        connecting = self.stomp.connect("guest", "guest", "/")
        connecting.cancel()
        self.failureResultOf(connecting, CancelledError)
        self.assertTrue(self.transport.disconnected)

    def test_lostBeforeConnected(self):
        """A connection lost during the handshake fails connect."""
        connecting = self.stomp.connect("guest", "guest", "/", timeout=5)
        self.lose()
        self.failureResultOf(connecting, ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FramingTests(StompTestCase):
    def setUp(self):
        super().setUp()
        self.handshake()
        self.received = self.subscribe()

    def test_byteByByte(self):
        """A MESSAGE arriving one byte at a time is delivered once, whole."""
        data = message("m1", body=b"hello", **{"content-type": "text/plain"})
        for i in range(len(data)):
            self.assertEqual(self.received, [])
            self.stomp.dataReceived(data[i : i + 1])
        [frame] = self.received
        self.assertEqual(frame.body, b"hello")
        self.assertEqual(frame.headers["message-id"], "m1")
        self.assertEqual(frame.headers["content-type"], "text/plain")

    def test_severalFramesAndHeartBeats(self):
        """Frames and LF or CRLF heart-beats in one read are all taken."""
        self.stomp.dataReceived(
            b"\n"
            + message("m1", body=b"one")
            + b"\n\r\n"
            + message("m2", body=b"two")
            + b"\n"
        )
        self.assertEqual([f.body for f in self.received], [b"one", b"two"])
        self.assertFalse(self.transport.disconnecting)

    def test_nulInBody(self):
        """With content-length, NUL bytes in a body are body, not framing."""
        body = b"a\0b\0c"
        self.stomp.dataReceived(
            message("m1", body=body, **{"content-length": str(len(body))})
            + message("m2", body=b"next")
        )
        self.assertEqual([f.body for f in self.received], [body, b"next"])

    def test_largeBodies(self):
        """Multi-megabyte bodies, with and without content-length, in chunks."""
        sized = bytes(range(256)) * 16384
        unsized = b"x" * (3 * 1024 * 1024)
        data = message(
            "m1", body=sized, **{"content-length": str(len(sized))}
        ) + message("m2", body=unsized)
        for start in range(0, len(data), 65536):
            self.stomp.dataReceived(data[start : start + 65536])
        self.assertEqual(len(self.received), 2)
        self.assertEqual(self.received[0].body, sized)
        self.assertEqual(self.received[1].body, unsized)

    def test_garbage(self):
        """Data that is not STOMP is logged and aborts the connection."""
        self.stomp.dataReceived(b"NONSENSE\n\n\0")
        self.assertEqual(len(self.flushLoggedErrors(StompFrameError)), 1)
        self.assertTrue(self.transport.disconnected)


class SubscriptionTests(StompTestCase):
    def setUp(self):
        super().setUp()
        self.handshake()

    def test_subscribeWaitsForReceipt(self):
        """SUBSCRIBE asks for a receipt and fires with the token on RECEIPT."""
        subscribed = self.stomp.subscribe(
            "/queue/a",
            [].append,
            {"ack": "client-individual", "prefetch-count": "100"},
        )
        [frame] = self.sentFrames()
        self.assertEqual(frame.command, StompSpec.SUBSCRIBE)
        self.assertEqual(frame.headers["destination"], "/queue/a")
        self.assertEqual(frame.headers["ack"], "client-individual")
        self.assertEqual(frame.headers["prefetch-count"], "100")
        self.assertNoResult(subscribed)
        self.stomp.dataReceived(
            frameBytes(StompSpec.RECEIPT, {"receipt-id": frame.headers["receipt"]})
        )
        self.assertEqual(self.successResultOf(subscribed), ("id", frame.headers["id"]))

    def test_subscribeWithoutReceipt(self):
        """With receipt=False the Deferred fires at once."""
        subscribed = self.stomp.subscribe("/queue/a", [].append, {"id": "s7"}, False)
        self.assertEqual(self.successResultOf(subscribed), ("id", "s7"))
        [frame] = self.sentFrames()
        self.assertNotIn("receipt", frame.headers)

    def test_dispatch(self):
        """Each MESSAGE goes to the callback of its own subscription."""
        first = self.subscribe("/queue/a", {"id": "s1"})
        second = self.subscribe("/queue/b", {"id": "s2"})
        self.stomp.dataReceived(
            message("m1", "s2", b"to b")
            + message("m2", "s1", b"to a")
            + message("m3", "s2", b"to b again")
        )
        self.assertEqual([f.body for f in first], [b"to a"])
        self.assertEqual([f.body for f in second], [b"to b", b"to b again"])

    def test_unsubscribe(self):
        """UNSUBSCRIBE names the subscription; its late MESSAGEs are dropped."""
        received = []
        token = self.successResultOf(
            self.stomp.subscribe("/queue/a", received.append, {"id": "s1"}, False)
        )
        self.transport.clear()
        self.successResultOf(self.stomp.unsubscribe(token))
        [frame] = self.sentFrames()
        self.assertEqual(
            (frame.command, frame.headers), (StompSpec.UNSUBSCRIBE, {"id": "s1"})
        )
        with capturedLogs() as events:
            self.stomp.dataReceived(message("m1", "s1"))
        self.assertEqual(received, [])
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])

    def test_handlerFailure(self):
        """A failing callback is logged; later messages still arrive."""
        received = []

        def onMessage(frame):
            received.append(frame)
            if frame.body == b"bad":
                raise ZeroDivisionError()

        self.stomp.subscribe("/queue/a", onMessage, {"id": "s1"}, False)
        self.stomp.dataReceived(
            message("m1", "s1", b"bad") + message("m2", "s1", b"good")
        )
        self.assertEqual([f.body for f in received], [b"bad", b"good"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertFalse(self.transport.disconnecting)


class AckTests(StompTestCase):
    """ACK/NACK headers per version, for a MESSAGE as each version sends it."""

    def acknowledge(self, version, headers):
        self.handshake(version)
        # A 1.0 subscription without id is matched by destination.
        received = self.subscribe(
            "/queue/a", None if version == StompSpec.VERSION_1_0 else {"id": "s1"}
        )
        self.stomp.dataReceived(
            frameBytes(StompSpec.MESSAGE, headers, b"x", version=version)
        )
        [frame] = received
        self.successResultOf(self.stomp.ack(frame))
        if version == StompSpec.VERSION_1_0:
            self.assertRaises(StompProtocolError, self.stomp.nack, frame)
        else:
            self.successResultOf(self.stomp.nack(frame))
        return [(f.command, f.headers) for f in self.sentFrames(version)]

    def test_stomp12(self):
        """1.2 acknowledges by the MESSAGE's ack header, sent as id."""
        sent = self.acknowledge(
            "1.2",
            {
                "destination": "/queue/a",
                "message-id": "m1",
                "subscription": "s1",
                "ack": "a1",
            },
        )
        self.assertEqual(sent, [("ACK", {"id": "a1"}), ("NACK", {"id": "a1"})])

    def test_stomp11(self):
        """1.1 acknowledges by message-id and subscription."""
        sent = self.acknowledge(
            "1.1", {"destination": "/queue/a", "message-id": "m1", "subscription": "s1"}
        )
        expected = {"message-id": "m1", "subscription": "s1"}
        self.assertEqual(sent, [("ACK", expected), ("NACK", expected)])

    def test_stomp10(self):
        """1.0 acknowledges by message-id and has no NACK."""
        sent = self.acknowledge("1.0", {"destination": "/queue/a", "message-id": "m1"})
        self.assertEqual(sent, [("ACK", {"message-id": "m1"})])


class SendTests(StompTestCase):
    def setUp(self):
        super().setUp()
        self.handshake()

    def test_send(self):
        """SEND carries destination, headers and a content-length; no wait."""
        sent = self.stomp.send("/queue/a", b"x\0y", {"persistent": "true"})
        self.assertIsNone(self.successResultOf(sent))
        [frame] = self.sentFrames()
        self.assertEqual(frame.command, StompSpec.SEND)
        self.assertEqual(
            frame.headers,
            {"destination": "/queue/a", "persistent": "true", "content-length": "3"},
        )
        self.assertEqual(frame.body, b"x\0y")

    def test_sendWithReceipt(self):
        """With receipt=True the Deferred waits for the broker's RECEIPT."""
        sent = self.stomp.send("/queue/a", b"x", receipt=True)
        [frame] = self.sentFrames()
        self.assertNoResult(sent)
        self.stomp.dataReceived(
            frameBytes(StompSpec.RECEIPT, {"receipt-id": frame.headers["receipt"]})
        )
        self.assertIsNone(self.successResultOf(sent))


class DisconnectTests(StompTestCase):
    def setUp(self):
        super().setUp()
        self.handshake()

    def test_waitsForReceipt(self):
        """The transport closes only after the RECEIPT for DISCONNECT."""
        disconnected = self.stomp.disconnect()
        [frame] = self.sentFrames()
        self.assertEqual(frame.command, StompSpec.DISCONNECT)
        self.assertFalse(self.transport.disconnecting)
        self.stomp.dataReceived(
            frameBytes(StompSpec.RECEIPT, {"receipt-id": frame.headers["receipt"]})
        )
        self.assertTrue(self.transport.disconnecting)
        self.assertNoResult(disconnected)
        self.lose()
        self.assertIsNone(self.successResultOf(disconnected))

    def test_withoutReceipt(self):
        """Without a receipt the transport closes at once."""
        disconnected = self.stomp.disconnect(receipt=False)
        [frame] = self.sentFrames()
        self.assertEqual(frame.headers, {})
        self.assertTrue(self.transport.disconnecting)
        self.lose()
        self.assertIsNone(self.successResultOf(disconnected))

    def test_timeout(self):
        """No RECEIPT in time: the connection is aborted."""
        disconnected = self.stomp.disconnect(timeout=3)
        self.clock.advance(2.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnected)
        self.lose()
        self.assertIsNone(self.successResultOf(disconnected))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lostFirst(self):
        """A connection lost before the RECEIPT still ends disconnect well."""
        disconnected = self.stomp.disconnect(timeout=3)
        self.lose(ConnectionLost)
        self.assertIsNone(self.successResultOf(disconnected))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HeartBeatTests(StompTestCase):
    def test_sendsWhenIdle(self):
        """
        An EOL goes out after a negotiated interval without sending; any
        frame sent restarts the interval.
        """
        # We can send every 1 s, the broker wants every 0.5 s: 1 s it is.
        self.handshake(serverBeats="0,500", heartBeats=(1000, 0))
        self.clock.advance(0.5)
        self.stomp.send("/queue/a", b"x")
        self.transport.clear()
        self.clock.advance(0.5)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(0.5)
        self.assertEqual(self.transport.value(), b"\n")
        self.clock.advance(1)
        self.assertEqual(self.transport.value(), b"\n\n")

    def test_notUnlessBothWant(self):
        """No timers when the broker offers no heart-beats."""
        self.handshake(serverBeats="0,0", heartBeats=(1000, 1000))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadConnection(self):
        """
        Silence for twice the broker's interval drops the connection; any
        data, heart-beats included, counts as life.
        """
        self.handshake(serverBeats="1000,0", heartBeats=(0, 1000))
        self.clock.advance(1.5)
        self.stomp.dataReceived(b"\n")
        self.clock.advance(1.9)
        self.assertFalse(self.transport.disconnected)
        with capturedLogs() as events:
            self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])
        self.lose(ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timersCancelledOnConnectionLost(self):
        """connectionLost leaves no DelayedCall behind."""
        self.handshake(serverBeats="1000,1000", heartBeats=(1000, 1000))
        self.stomp.disconnect(timeout=10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 3)
        self.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConnectionEndTests(StompTestCase):
    def setUp(self):
        super().setUp()
        self.handshake()

    def test_pendingReceiptsFail(self):
        """Whatever waits for a RECEIPT fails when the connection goes."""
        sent = self.stomp.send("/queue/a", b"x", receipt=True)
        subscribed = self.stomp.subscribe("/queue/a", [].append)
        self.lose()
        self.failureResultOf(sent, ConnectionLost)
        self.failureResultOf(subscribed, ConnectionLost)

    def test_errorFrame(self):
        """
        ERROR is logged with message and body, fails pending receipts with
        that message, and closes the connection.
        """
        sent = self.stomp.send("/queue/a", b"x", receipt=True)
        with capturedLogs() as events:
            self.stomp.dataReceived(
                frameBytes(StompSpec.ERROR, {"message": "not_found"}, b"no queue")
            )
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(
            (event["errorMessage"], event["details"]), ("not_found", "no queue")
        )
        self.assertEqual(
            self.failureResultOf(sent, StompServerError).value.message, "not_found"
        )
        self.assertTrue(self.transport.disconnecting)

    def test_whenDisconnected(self):
        """whenDisconnected fires with the reason, before and after the end."""
        before = self.stomp.whenDisconnected()
        self.assertNoResult(before)
        self.lose(ConnectionLost)
        self.assertIsInstance(self.successResultOf(before), ConnectionLost)
        after = self.stomp.whenDisconnected()
        self.assertIsInstance(self.successResultOf(after), ConnectionLost)

    def test_commandsAfterLoss(self):
        """Once disconnected, commands refuse to run."""
        self.lose()
        self.assertRaises(StompProtocolError, self.stomp.send, "/queue/a", b"x")


class FactoryTests(SynchronousTestCase):
    def test_buildProtocol(self):
        """Protocols get the factory's clock and tolerance."""
        clock = Clock()
        factory = StompFactory(clock, heartBeatTolerance=3)
        stomp = factory.buildProtocol(None)
        self.assertIsInstance(stomp, StompClientProtocol)
        self.assertIs(stomp.clock, clock)
        self.assertEqual(stomp.heartBeatTolerance, 3)
        self.assertIs(stomp.factory, factory)
