# -*- test-case-name: tests.test_xmpp_ping -*-
"""
XEP-0199 XMPP Ping: answer pings, and ping the server to notice a dead stream.

Written here because C{wokkel.ping} no longer imports with current Twisted.
"""

from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import internJID
from twisted.words.protocols.jabber.xmlstream import toResponse
from wokkel.generic import Request
from wokkel.subprotocols import XMPPHandler

from snq.service import defaultReactor

NS_PING = "urn:xmpp:ping"
PING_REQUEST = f"/iq[@type='get']/ping[@xmlns='{NS_PING}']"


class PingRequest(Request):
    """
    A ping to C{recipient}, for wokkel's C{StreamManager.request}, which
    tracks the reply and fails it when the stream is lost.
    """

    def __init__(self, recipient, timeout=None):
        super().__init__(internJID(recipient))
        self.timeout = timeout

    def toElement(self):
        element = super().toElement()
        element.addElement((NS_PING, "ping"))
        return element


class PingHandler(XMPPHandler):
    """
    Answer pings from anyone, and keep the stream to C{server} alive.

    A peer that vanished without closing TCP can go unnoticed for many
    minutes; an unanswered keepalive ping drops the stream instead, so the
    stream factory reconnects. Any reply counts, an error too: only a live
    server answers.
    """

    log = Logger()

    def __init__(self, server, interval=120.0, timeout=30.0, clock=None):
        super().__init__()
        clock = defaultReactor(clock)
        self.server = server
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self._nextPing = None
        self._pingID = None
        self._pingTimeout = None

    def connectionInitialized(self):
        self.xmlstream.addObserver(PING_REQUEST, self._onPing)
        self._schedulePing()

    def connectionLost(self, reason):
        for call in (self._nextPing, self._pingTimeout):
            if call is not None and call.active():
                call.cancel()
        self._nextPing = self._pingTimeout = self._pingID = None
        super().connectionLost(reason)

    def _onPing(self, iq):
        iq.handled = True
        self.xmlstream.send(toResponse(iq, "result"))

    def _schedulePing(self):
        self._nextPing = self._clock.callLater(self.interval, self._sendPing)

    def _sendPing(self):
        self._nextPing = None
        iq = PingRequest(self.server).toElement()
        self._pingID = iq["id"]
        self.xmlstream.addObserver(self._replyQuery(), self._onReply)
        self._pingTimeout = self._clock.callLater(self.timeout, self._onTimeout)
        self.xmlstream.send(iq)

    def _replyQuery(self):
        return f"/iq[@id='{self._pingID}']"

    def _onReply(self, iq):
        if iq.getAttribute("type") not in ("result", "error"):
            return
        iq.handled = True
        self.xmlstream.removeObserver(self._replyQuery(), self._onReply)
        self._pingTimeout.cancel()
        self._pingTimeout = self._pingID = None
        if iq["type"] == "error":
            self.log.debug(
                "{server} answered ping with an error; it is alive",
                server=self.server,
            )
        self._schedulePing()

    def _onTimeout(self):
        self.log.warn(
            "No reply from {server} to ping {pingID} within {timeout} s;"
            " dropping the stream",
            server=self.server,
            pingID=self._pingID,
            timeout=self.timeout,
        )
        self.xmlstream.removeObserver(self._replyQuery(), self._onReply)
        self._pingTimeout = self._pingID = None
        # Abort: a graceful close would wait on a peer that does not answer.
        self.xmlstream.transport.abortConnection()
