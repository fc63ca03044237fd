# -*- test-case-name: tests.test_xmpp_ping -*-
"""
Tests for L{snq.xmpp.ping}.
"""

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from wokkel.generic import parseXml
from wokkel.test.helpers import XmlStreamStub

from snq.xmpp.ping import NS_PING, PingHandler


class PingHandlerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.stub = XmlStreamStub()
        self.transport = StringTransport()
        self.stub.xmlstream.transport = self.transport
        self.handler = PingHandler("example.org", interval=120, timeout=30,
                                   clock=self.clock)
        self.handler.makeConnection(self.stub.xmlstream)
        self.handler.connectionInitialized()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def reply(self, iq, stanzaType="result"):
        self.stub.send(parseXml(
            f"<iq xmlns='jabber:client' type='{stanzaType}' id='{iq['id']}'"
            " from='example.org'/>"))

    def sentPing(self):
        """
        Advance to the next keepalive ping and return it.
        """
        self.clock.advance(120)
        iq = self.stub.output[-1]
        self.assertEqual((iq["type"], iq["to"]), ("get", "example.org"))
        self.assertEqual(iq.ping.uri, NS_PING)
        return iq

    def test_answersPing(self):
        """
        A ping from anyone gets an empty result with the same id.
        """
        self.stub.send(parseXml(
            "<iq xmlns='jabber:client' type='get' id='p1'"
            " from='alice@example.org/x' to='snq@example.org/snq'>"
            f"<ping xmlns='{NS_PING}'/></iq>"))
        [result] = self.stub.output
        self.assertEqual(
            (result["type"], result["id"], result["to"]),
            ("result", "p1", "alice@example.org/x"))
        self.assertEqual(list(result.elements()), [])

    def test_pingsAfterInterval(self):
        self.clock.advance(119)
        self.assertEqual(self.stub.output, [])
        self.sentPing()

    def test_pongInTime(self):
        """
        A result within the timeout keeps the stream and schedules the next
        ping an interval later.
        """
        iq = self.sentPing()
        self.clock.advance(29)
        self.reply(iq)
        self.clock.advance(30)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.stub.output), 1)
        self.clock.advance(90)
        self.assertEqual(len(self.stub.output), 2)

    def test_errorReplyCountsAsAlive(self):
        iq = self.sentPing()
        self.reply(iq, "error")
        self.clock.advance(30)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_requestWithPingIDIsNoPong(self):
        """
        Only a result or error with the ping's id answers it.
        """
        iq = self.sentPing()
        self.reply(iq, "get")
        self.clock.advance(30)
        self.assertTrue(self.transport.disconnected)

    def test_noPong(self):
        """
        Silence for the timeout drops the stream and says so.
        """
        iq = self.sentPing()
        self.clock.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        # StringTransport.abortConnection sets disconnected, not aborted.
        self.assertTrue(self.transport.disconnected)
        [event] = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(event["pingID"], iq["id"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.reply(iq)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connectionLostWhileWaiting(self):
        self.sentPing()
        self.handler.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connectionLostBetweenPings(self):
        self.handler.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.handler.xmlstream)
