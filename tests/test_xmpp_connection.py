# -*- test-case-name: tests.test_xmpp_connection -*-
"""
Tests for L{snq.xmpp.connection}, mostly against the Prosody that
C{scripts/setup-services} runs on 127.0.0.1:5222 (host "localhost", user
snq, certificate signed by the test CA).
"""

import os
import time

from service_identity import VerificationError
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.words.protocols.jabber.sasl import SASLAuthError
from twisted.words.protocols.jabber.xmlstream import XMPPHandler

from snq.xmpp.connection import (
    ConnectTimeoutError,
    TLSHandshakeError,
    XmppClient,
    XmppSettings,
    trustRootFromFile,
)

CA_FILE = "/etc/prosody/certs/snq-test-ca.crt"
# Other test runs may use snq@localhost at the same time; a resource of our
# own keeps their sessions and ours from replacing each other.
RESOURCE = f"conn-test-{os.getpid()}"
OBSERVER = f"conn-observer-{os.getpid()}"
JID = f"snq@localhost/{RESOURCE}"


def settings(**overrides):
    values = dict(jid="snq@localhost", password="snq-pass", host="127.0.0.1",
                  resource=RESOURCE, tls="required", ca_file=CA_FILE,
                  connect_timeout=5.0)
    values.update(overrides)
    return XmppSettings(**values)


class StreamRecorder(XMPPHandler):
    """
    Records stream events and received presence.
    """

    def __init__(self):
        super().__init__()
        self.events = []
        self.presence = defer.DeferredQueue()
        self.lost = defer.DeferredQueue()

    def connectionInitialized(self):
        self.events.append("initialized")
        self.xmlstream.addObserver("/presence", self.presence.put)

    async def available(self, sender):
        """
        The next available presence from C{sender}.
        """
        while True:
            presence = await self.presence.get()
            if (presence.getAttribute("from") == sender
                    and not presence.hasAttribute("type")):
                return presence

    def connectionLost(self, reason):
        self.events.append("lost")
        self.lost.put(reason.type)
        super().connectionLost(reason)


class SilentServer(protocol.Protocol):
    """
    Accepts a connection and never says a word.
    """

    def connectionMade(self):
        self.factory.connections.append(self)
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


class SettingsTests(TestCase):
    def test_problemsReportedTogether(self):
        error = self.assertRaises(
            ValueError, XmppSettings, jid="nodomain", password="x",
            tls="maybe", port=0, priority=200, connect_timeout=0)
        for key in ("jid", "tls", "port", "priority", "connect_timeout"):
            self.assertIn(f"{key}:", str(error))

    def test_caFileWithoutCertificate(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        error = self.assertRaises(ValueError, trustRootFromFile, path)
        self.assertIn(f"no valid PEM certificate in {path}", str(error))

    def test_caFileWithBrokenCertificate(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nbroken\n"
                    "-----END CERTIFICATE-----\n")
        error = self.assertRaises(ValueError, trustRootFromFile, path)
        self.assertIn(f"no valid PEM certificate in {path}", str(error))

    def test_caFileMissing(self):
        path = self.mktemp()
        error = self.assertRaises(ValueError, XmppClient,
                                  settings(ca_file=path))
        self.assertIn(f"ca_file: cannot read {path}", str(error))

    def test_hostDefaultsToDomain(self):
        client = XmppClient(settings(host="", resource="", tls="off"))
        self.assertEqual((client.host, client.port, client.jid.full()),
                         ("localhost", 5222, "snq@localhost"))


class ClientUnitTests(TestCase):
    """
    L{XmppClient} on a fake reactor, with streams on L{StringTransport}.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.client = XmppClient(
            settings(tls="off", ca_file="", connect_timeout=5),
            reactor=self.clock)
        self.client.startService()
        self.transport = StringTransport()
        self.xs = self.client.factory.buildProtocol(None)
        self.xs.makeConnection(self.transport)

    def test_hostnameMismatch(self):
        """
        A certificate for another name stops the client with an error
        naming the trust used.
        """
        d = self.client.whenInitialized()
        self.xs.connectionLost(Failure(VerificationError("no match")))
        error = self.failureResultOf(d, TLSHandshakeError).value
        self.assertIn("must verify against the system trust store", str(error))
        self.assertFalse(self.client.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopAbortsHangingClose(self):
        """
        Stopping closes the stream gracefully, and aborts it if the peer
        does not let it close within the connect timeout.
        """
        self.client._authd(self.xs)
        self.transport.clear()
        d = self.client.stopService()
        self.assertIn(b"</stream:stream>", self.transport.value())
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(4.9)
        # StringTransport.abortConnection sets disconnected, not aborted.
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnected)
        self.assertNoResult(d)
        self.xs.connectionLost(Failure(ConnectionAborted()))
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopClosedInTime(self):
        self.client._authd(self.xs)
        d = self.client.stopService()
        self.xs.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ClientTestsMixin:
    timeout = 20

    def start(self, clientSettings):
        client = XmppClient(clientSettings)
        client.startService()
        self.addCleanup(client.stopService)
        return client


class ConnectTimeoutTests(ClientTestsMixin, TestCase):
    def test_tcpConnectTimeout(self):
        """
        A TCP connect still pending at the connect timeout is stopped.
        """
        clock = MemoryReactorClock()
        client = XmppClient(settings(tls="off", connect_timeout=5),
                            reactor=clock)
        client.startService()
        d = client.whenInitialized()
        [(host, port, _, timeout, _)] = clock.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 5222, 5))
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.failureResultOf(d, ConnectTimeoutError)
        [connector] = clock.connectors
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_silentServer(self):
        """
        A server that accepts TCP but never speaks XMPP fails the attempt
        after the connect timeout; the factory keeps retrying.
        """
        factory = protocol.Factory.forProtocol(SilentServer)
        factory.connections = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = self.start(settings(port=port.getHost().port, tls="off",
                                     connect_timeout=0.5))
        started = time.monotonic()
        with self.assertRaises(ConnectTimeoutError):
            await client.whenInitialized()
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertTrue(client.running)
        self.assertTrue(client.factory.continueTrying)
        await client.stopService()
        await defer.gatherResults([c.lost for c in factory.connections])


class ProsodyTests(ClientTestsMixin, TestCase):
    async def startObserver(self):
        """
        Connect snq@localhost/OBSERVER: a user's available resources get
        its other resources' presence, no roster needed.
        """
        observer = StreamRecorder()
        client = self.start(settings(resource=OBSERVER))
        client.addHandler(observer)
        await client.whenInitialized()
        return observer

    async def test_tlsRequiredWithCAFile(self):
        """
        With the test CA, snq authenticates over TLS and its presence (with
        priority and status) reaches its other resources.
        """
        observer = await self.startObserver()
        client = self.start(settings(priority=5, status="testing"))
        xs = await client.whenInitialized()
        self.assertTrue(ISSLTransport.providedBy(xs.transport))
        self.assertEqual(client.jid.full(), JID)
        presence = await observer.available(JID)
        self.assertEqual((str(presence.priority), str(presence.status)),
                         ("5", "testing"))

    async def test_tlsRequiredWithoutCAFile(self):
        """
        Against the system trust store the test certificate does not
        verify: an error saying so, before the connect timeout, no retry.
        """
        client = self.start(settings(ca_file=""))
        started = time.monotonic()
        with self.assertRaises(TLSHandshakeError) as caught:
            await client.whenInitialized()
        self.assertLess(time.monotonic() - started, 5.0)
        message = str(caught.exception)
        self.assertIn("certificate verify failed", message)
        self.assertIn("system trust store", message)
        self.assertFalse(client.running)
        self.assertFalse(client.factory.continueTrying)

    async def test_caBundle(self):
        """
        A CA file may hold several certificates.
        """
        other = ssl.KeyPair.generate().selfSignedCert(1, CN="other CA")
        path = self.mktemp()
        with open(path, "wb") as f, open(CA_FILE, "rb") as ca:
            f.write(other.dumpPEM() + ca.read())
        client = self.start(settings(ca_file=path))
        xs = await client.whenInitialized()
        self.assertTrue(ISSLTransport.providedBy(xs.transport))

    async def test_tlsOptional(self):
        client = self.start(settings(tls="optional"))
        xs = await client.whenInitialized()
        self.assertTrue(ISSLTransport.providedBy(xs.transport))

    async def test_tlsOff(self):
        client = self.start(settings(tls="off", ca_file=""))
        xs = await client.whenInitialized()
        self.assertFalse(ISSLTransport.providedBy(xs.transport))

    async def test_wrongPassword(self):
        client = self.start(settings(password="wrong"))
        with self.assertRaises(SASLAuthError):
            await client.whenInitialized()
        self.assertFalse(client.running)

    async def test_keepalive(self):
        """
        Prosody answers the keepalive pings; the stream stays up.
        """
        recorder = StreamRecorder()
        client = self.start(settings(ping_interval=0.1, ping_timeout=2))
        client.addHandler(recorder)
        xs = await client.whenInitialized()
        pongs = defer.DeferredQueue()
        xs.addObserver("/iq[@type='result'][@from='localhost']", pongs.put)
        await pongs.get()
        await pongs.get()
        self.assertEqual(recorder.events, ["initialized"])

    async def test_reconnects(self):
        """
        A lost stream is reconnected by the factory; handlers hear of both,
        and presence is sent again.
        """
        observer = await self.startObserver()
        recorder = StreamRecorder()
        client = self.start(settings())
        client.addHandler(recorder)
        xs = await client.whenInitialized()
        # Aborting at once would drop the presence not yet written.
        await observer.available(JID)
        xs.transport.abortConnection()
        await recorder.lost.get()
        await client.whenInitialized()
        self.assertEqual(recorder.events, ["initialized", "lost", "initialized"])
        await observer.available(JID)
