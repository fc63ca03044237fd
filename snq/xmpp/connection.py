# -*- test-case-name: tests.test_xmpp_connection -*-
"""
A client connection to an XMPP server, built from snq's C{[xmpp]} settings.

wokkel's L{client.XMPPClient} brings the stream manager and reconnection,
but takes no TLS options, has no connect timeout, and resets its backoff as
soon as TCP connects. L{XmppClient} adds those, keepalive pings and presence.
"""

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.application import service
from twisted.internet import defer, ssl
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish.xmlstream import XmlStreamFactoryMixin
from wokkel import client
from wokkel.subprotocols import StreamManager, XMPPHandler
from wokkel.xmppim import AvailabilityPresence

from snq.secret import reveal
from snq.service import defaultReactor
from snq.xmpp.ping import PingHandler

# Re-exported: the settings lived here first.
from snq.xmpp.settings import XmppSettings  # noqa: F401


class ConnectTimeoutError(Exception):
    """
    No initialized stream within the connect timeout; the factory retries.
    """


class TLSHandshakeError(Exception):
    """
    The TLS handshake failed, usually because the server's certificate does
    not verify; retrying cannot help, so the client stops.
    """


def trustRootFromFile(path):
    """
    The certificates of a PEM file (one CA or a bundle) as a trust root.

    L{ssl.Certificate.loadPEM} reads only the first certificate of a file.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"ca_file: cannot read {path}: {e.strerror}")
    end = b"-----END CERTIFICATE-----"
    blocks = [block + end for block in pem.split(end)
              if b"-----BEGIN CERTIFICATE-----" in block]
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except crypto.Error:
        certificates = []
    if not certificates:
        raise ValueError(f"ca_file: no valid PEM certificate in {path}")
    return ssl.trustRootFromCertificates(certificates)


class PolicyAuthenticator(client.HybridAuthenticator):
    """
    wokkel's authenticator with STARTTLS following snq's C{tls} setting.

    wokkel always requires STARTTLS and verifies against the platform trust
    store; C{XMPPClient} has no way to change that, so the TLS initializer
    is replaced here, on each new stream.
    """

    def __init__(self, jid, password, tls, tlsOptions):
        super().__init__(jid, password)
        self.tls = tls
        self.tlsOptions = tlsOptions

    def associateWithStream(self, xs):
        super().associateWithStream(xs)
        tlsInit = xmlstream.TLSInitiatingInitializer(
            xs, required=self.tls == "required",
            configurationForTLS=self.tlsOptions)
        # Not wanted rather than absent, so a server requiring TLS gives
        # TLSRequired instead of a confusing authentication failure.
        tlsInit.wanted = self.tls != "off"
        xs.initializers = [
            tlsInit if isinstance(init, xmlstream.TLSInitiatingInitializer)
            else init
            for init in xs.initializers]


class AttemptReportingFactory(xmlstream.XmlStreamFactory):
    """
    An XmlStreamFactory that reports the start and failure of each attempt,
    and leaves resetting the backoff to its client.

    XmlStreamFactory resets its delay when TCP connects, so a server that
    accepts connections but fails them later would be retried every second.
    """

    maxDelay = 300
    # Not "Starting factory …" on every reconnect: the client logs what matters.
    noisy = False

    def __init__(self, authenticator, attemptStarted, attemptFailed):
        super().__init__(authenticator)
        self.attemptStarted = attemptStarted
        self.attemptFailed = attemptFailed

    def startedConnecting(self, connector):
        self.attemptStarted(connector)

    def buildProtocol(self, addr):
        return XmlStreamFactoryMixin.buildProtocol(self, addr)

    def clientConnectionFailed(self, connector, reason):
        self.attemptFailed(reason)
        super().clientConnectionFailed(connector, reason)


class PresenceAnnouncer(XMPPHandler):
    """
    Send available presence on every initialized stream: the server forgets
    it with the stream.
    """

    def __init__(self, priority=0, status=""):
        super().__init__()
        self.priority = priority
        self.status = status

    def connectionInitialized(self):
        self.send(AvailabilityPresence(
            priority=self.priority, status=self.status).toElement())


class XmppClient(client.XMPPClient):
    """
    A reconnecting XMPP client service for snq.

    Handlers added with C{addHandler} (or C{setHandlerParent}) hear of every
    stream: C{connectionInitialized} once authenticated and presence sent,
    C{connectionLost} when it ends (also for streams that never
    initialized). L{whenInitialized} tells how the current attempt ends.

    Transport problems (refused, timed out, lost) are retried by the
    factory, with backoff. Failed authentication, TLS policy or certificate
    verification stop the service: retrying would fail the same way.
    """

    log = Logger()

    def __init__(self, settings, reactor=None):
        reactor = defaultReactor(reactor)
        jid = JID(settings.jid)
        if settings.resource:
            jid = JID(tuple=(jid.user, jid.host, settings.resource))
        tlsOptions = None
        if settings.tls != "off":
            trustRoot = (trustRootFromFile(settings.ca_file)
                         if settings.ca_file else None)
            tlsOptions = ssl.optionsForClientTLS(jid.host, trustRoot=trustRoot)
        authenticator = PolicyAuthenticator(
            jid, reveal(settings.password), settings.tls, tlsOptions)
        factory = AttemptReportingFactory(
            authenticator, self._attemptStarted, self._attemptFailed)
        factory.clock = reactor
        # Not XMPPClient.__init__: it builds a factory of its own, without
        # the TLS policy.
        StreamManager.__init__(self, factory, reactor)
        self.jid = jid
        self.host = settings.host or jid.host
        self.port = settings.port
        self.settings = settings
        self._attemptTimeout = None
        self._connector = None
        self._waiting = []
        self._closing = []
        self._closeTimeout = None
        PingHandler(jid.host, settings.ping_interval, settings.ping_timeout,
                    reactor).setHandlerParent(self)
        PresenceAnnouncer(settings.priority, settings.status
                          ).setHandlerParent(self)

    @property
    def initialized(self):
        """
        Whether a stream is up and authenticated now: what is sent then goes
        out at once instead of waiting in wokkel's memory for the next one.
        """
        return self._initialized

    def whenInitialized(self):
        """
        A Deferred firing with the XmlStream once a stream is initialized,
        or failing with the reason the current (or next) attempt failed.
        """
        if self._initialized:
            return defer.succeed(self.xmlstream)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def stopService(self):
        """
        Stop retrying and close the stream; the Deferred fires once closed.
        """
        service.Service.stopService(self)
        self.factory.stopTrying()
        if self.xmlstream is None:
            self._connection.disconnect()
            return defer.succeed(None)
        d = defer.Deferred()
        self._closing.append(d)
        if self._initialized:
            self.xmlstream.sendFooter()
            self.xmlstream.transport.loseConnection()
            # A dead peer would hold a graceful close until TCP gives up.
            self._closeTimeout = self._reactor.callLater(
                self.settings.connect_timeout,
                self.xmlstream.transport.abortConnection)
        else:
            # A half-done TLS handshake could hold a graceful close forever.
            self.xmlstream.transport.abortConnection()
        return d

    def _getConnection(self):
        return self._reactor.connectTCP(
            self.host, self.port, self.factory,
            timeout=self.settings.connect_timeout)

    def _attemptStarted(self, connector):
        self._connector = connector
        self._attemptTimeout = self._reactor.callLater(
            self.settings.connect_timeout, self._attemptTimedOut)

    def _attemptTimedOut(self):
        self.log.warn(
            "No initialized XMPP stream from {host}:{port} within {timeout} s;"
            " dropping this attempt",
            host=self.host, port=self.port,
            timeout=self.settings.connect_timeout)
        self._attemptFailed(Failure(ConnectTimeoutError(
            f"no initialized stream from {self.host}:{self.port} within"
            f" {self.settings.connect_timeout} s")))
        if self.xmlstream is None:
            self._connector.stopConnecting()
        else:
            self.xmlstream.transport.abortConnection()

    def _attemptFailed(self, reason, final=False):
        """
        End the current attempt (stopping the service if C{final}), then
        tell those waiting; later reports of the same attempt (its
        connection closing) are ignored.
        """
        if not self._endAttempt():
            return
        if final:
            self.stopService()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(reason)

    def _endAttempt(self):
        """
        Stop the current attempt's timeout; False if there was no attempt.
        """
        call, self._attemptTimeout = self._attemptTimeout, None
        if call is None:
            return False
        if call.active():
            call.cancel()
        return True

    def _authd(self, xs):
        super()._authd(xs)
        self._endAttempt()
        self.factory.resetDelay()
        self.log.info("XMPP stream initialized as {jid}", jid=self.jid.full())
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(xs)

    def initializationFailed(self, reason):
        """
        Authentication or the TLS policy failed: log, tell those waiting and
        stop, where wokkel would raise into the stream's dispatcher.
        """
        self.log.error(
            "XMPP stream initialization with {host}:{port} as {jid} failed,"
            " not retrying: {error!r}",
            host=self.host, port=self.port, jid=self.jid.full(),
            error=reason.value)
        self._attemptFailed(reason, final=True)

    def _disconnected(self, reason):
        wasInitialized = self._initialized
        super()._disconnected(reason)
        if self._closeTimeout is not None and self._closeTimeout.active():
            self._closeTimeout.cancel()
        closing, self._closing = self._closing, []
        for d in closing:
            d.callback(None)
        if wasInitialized:
            self.log.info("XMPP stream to {host}:{port} lost: {reason}",
                          host=self.host, port=self.port,
                          reason=reason.getErrorMessage())
        elif self._attemptTimeout is None:
            return
        elif reason.check(SSL.Error, VerificationError):
            self._tlsFailed(reason)
        else:
            self.log.warn(
                "XMPP connection to {host}:{port} closed before the stream"
                " was initialized: {reason}",
                host=self.host, port=self.port,
                reason=reason.getErrorMessage())
            self._attemptFailed(reason)

    def _tlsFailed(self, reason):
        trust = (f"the CA file {self.settings.ca_file}" if self.settings.ca_file
                 else "the system trust store")
        message = (
            f"TLS handshake with {self.host}:{self.port} failed; the"
            f" certificate for {self.jid.host} must verify against {trust}:"
            f" {reason.getErrorMessage()}")
        self.log.error("{error}; not retrying", error=message)
        self._attemptFailed(Failure(TLSHandshakeError(message)), final=True)
