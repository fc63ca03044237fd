# -*- test-case-name: tests.test_xmpp_manager -*-
"""
One site's XMPP account, kept connected in the worker that runs the "xmpp"
group: it sends what C{xmppout} items carry and turns incoming chat into
C{xmppin} items.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import InvalidFormat, internJID
from wokkel.subprotocols import XMPPHandler
from wokkel.xmppim import (
    NS_ROSTER,
    PresenceProtocol,
    RosterItem,
    RosterRequest,
    SubscriptionPresence,
)

from snq.backoff import backoff
from snq.iomanager import IoManager
from snq.xmpp.connection import XmppClient
from snq.xmpp.ping import PingRequest
from snq.xmpp.xmppout import NotConnected

INBOUND_TYPES = ("chat", "normal")


class XmppManager(IoManager):
    """
    Composes an L{XmppClient} (itself a service, reconnecting with backoff)
    with what snq does over it.

    L{send} writes only to a live stream, never to wokkel's in-memory queue
    for the next one: an item is done once the server has it, and fails (to
    be retried from the queue) otherwise, so a dying worker loses nothing.
    """

    log = Logger()

    def __init__(self, site, settings, context, reactor=None):
        super().__init__(reactor)
        self.site = site
        self.settings = settings
        self.context = context
        self.client = XmppClient(settings, self.clock)
        InboundHandler(self).setHandlerParent(self.client)
        if settings.auto_subscribe:
            SubscriptionAcceptor().setHandlerParent(self.client)
        self._unstored = []
        self._storeAttempts = 0
        self._storeTimer = None

    def __repr__(self):
        return f"<XmppManager {self.site} {self.client.jid.full()}>"

    def startService(self):
        super().startService()
        self.client.startService()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.client.running:
            yield self.client.stopService()
        if self._storeTimer is not None:
            self._storeTimer.cancel()
            self._storeTimer = None
        for item in self._unstored:
            self.log.error("xmppin item lost, the queue would not take it: "
                           "{payload}", payload=item.payload)

    def send(self, element):
        """
        Send C{element} now; fire once the server has answered a ping sent
        after it (TCP keeps the order, so then the server has the stanza),
        or fail with L{NotConnected} or the reason the stream went.
        """
        if not self.client.initialized:
            why = "connecting" if self.client.running else (
                "gave up, see the log; fix the [xmpp] settings and restart")
            raise NotConnected(
                f"XMPP account {self.client.jid.full()} is not connected "
                f"({why})")
        self.client.xmlstream.send(element)
        d = self.client.request(
            PingRequest(self.client.jid.host, self.settings.ping_timeout))
        d.addCallbacks(lambda _: None, self._unconfirmed)
        return d

    def _unconfirmed(self, failure):
        if failure.check(error.StanzaError):
            return None  # An answer all the same: the server is there.
        if failure.check(xmlstream.TimeoutError) and self.client.initialized:
            self.log.warn(
                "{server} did not confirm a stanza within {timeout} s; "
                "dropping the stream", server=self.client.jid.host,
                timeout=self.settings.ping_timeout)
            self.client.xmlstream.transport.abortConnection()
        return failure

    @defer.inlineCallbacks
    def ensureSubscribed(self, jid):
        """
        Ask C{jid} (a bare JID) for a presence subscription unless the
        roster says this account has one; fires once asked (or not needed).
        """
        if not self.client.initialized:
            raise NotConnected(f"XMPP account {self.client.jid.full()} is not "
                               "connected")
        request = RosterRequest()
        request.timeout = self.settings.ping_timeout
        answer = yield self.client.request(request)
        for element in answer.query.elements(NS_ROSTER, "item") if answer.query \
                else ():
            item = RosterItem.fromElement(element)
            if item.entity.userhostJID() == jid.userhostJID():
                if item.subscriptionTo or item.pendingOut:
                    return False
                break
        presence = SubscriptionPresence(recipient=jid.userhostJID())
        presence.stanzaType = "subscribe"
        self.client.send(presence.toElement())
        return True

    def received(self, payload):
        """
        Store an inbound message as an C{xmppin} item of this site, unless
        a plugin takes it (C{context.xmppInbound}, as the C{xmppconfirm}
        plugin takes replies with a confirmation code).
        """
        self.context.stats.count("xmpp_process", "xmppin", self.site)
        d = self._takenByPlugin(payload)
        d.addCallback(lambda taken: None if taken else self._store(
            [self.context.item("xmppin", payload, site=self.site)]))

    @defer.inlineCallbacks
    def _takenByPlugin(self, payload):
        for take in list(self.context.xmppInbound):
            try:
                if (yield take(self.site, payload)):
                    return True
            except Exception:
                # Nothing is lost: the message becomes an xmppin item.
                self.log.failure("{take} failed on a message from {sender}",
                                 take=take, sender=payload.get("from"))
        return False

    def _store(self, items):
        d = self.context.enqueueItems(items)
        d.addCallbacks(self._stored, self._storeFailed, errbackArgs=(items,))

    def _stored(self, _):
        self._storeAttempts = 0

    def _storeFailed(self, failure, items):
        """
        XMPP has no acknowledgement to withhold, so keep the items and try
        again, with backoff, while the worker runs.
        """
        self.log.failure("storing {n} xmppin items failed; retrying", failure,
                         n=len(items))
        self._unstored.extend(items)
        if self._storeTimer is None and self.running:
            self._storeAttempts += 1
            self._storeTimer = self.clock.callLater(
                backoff(self._storeAttempts, 1.0, 60.0), self._retryStore)

    def _retryStore(self):
        self._storeTimer = None
        items, self._unstored = self._unstored, []
        self._store(items)


class InboundHandler(XMPPHandler):
    """
    Chat and normal messages with a body, from others, become C{xmppin}
    items; bounces and stream errors are logged.
    """

    log = Logger()

    def __init__(self, manager):
        super().__init__()
        self.manager = manager

    def connectionMade(self):
        self.xmlstream.addObserver(xmlstream.STREAM_ERROR_EVENT,
                                   self._onStreamError)

    def connectionInitialized(self):
        self.xmlstream.addObserver("/message", self._onMessage)

    def _onMessage(self, message):
        kind = message.getAttribute("type", "normal")
        if kind == "error":
            self._bounced(message)
            return
        body = message.body
        if kind not in INBOUND_TYPES or body is None or not str(body):
            return
        try:
            sender = internJID(message["from"])
        except (KeyError, InvalidFormat):
            return
        own = self.parent.jid
        if sender.userhostJID() == own.userhostJID():
            return
        message.handled = True
        self.manager.received({
            "from": sender.full(),
            "to": message.getAttribute("to", own.full()),
            "body": str(body),
            "id": message.getAttribute("id"),
            "type": kind,
        })

    def _bounced(self, message):
        reason = error.exceptionFromStanza(message)
        self.log.warn(
            "message {id} to {to} bounced: {condition} {text}",
            id=message.getAttribute("id"), to=message.getAttribute("from"),
            condition=reason.condition, text=reason.text or "")

    def _onStreamError(self, failure):
        hint = ""
        if failure.value.condition == "conflict":
            hint = (": another client logged in with the same JID and"
                    " resource; is a second snq (another host, or a worker"
                    " outside the pool) running this account?")
        self.log.error("{server} ended the XMPP stream of {jid}: {condition}"
                       "{hint}", server=self.parent.host,
                       jid=self.parent.jid.full(),
                       condition=failure.value.condition, hint=hint)


class SubscriptionAcceptor(PresenceProtocol):
    """
    With C{auto_subscribe}: accept everyone's presence subscription, so the
    bot shows online in their roster and strict servers pass its messages.
    """

    log = Logger()

    def subscribeReceived(self, presence):
        self.log.info("accepting the presence subscription of {sender}",
                      sender=presence.sender.full())
        self.subscribed(presence.sender)
