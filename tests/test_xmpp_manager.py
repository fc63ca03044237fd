# -*- test-case-name: tests.test_xmpp_manager -*-
"""
Tests for L{snq.xmpp.manager}, L{snq.xmpp.xmppout} and the C{[xmpp]}
config: a whole worker (IoMaster, in-memory queue) on a fake reactor, with
the server's end of each XMPP stream played by L{FakeServer}.
"""

import json

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.words.protocols.jabber import xmlstream
from twisted.words.xish import domish

from snq import config as snqconfig
from snq.child import Worker
from snq.handlers import Reject
from snq.iomaster import IoMaster
from snq.ledger.memory import MemoryLedger
from snq.pool import WorkerPool
from snq.queues.memory import MemoryQueue
from snq.routing import groupsOf
from snq.xmpp.ping import NS_PING
from snq.xmpp.xmppout import NotConnected, stanzaFor

SNQ = "snq@example.org"


class ServerTransport(StringTransport):
    """
    Closing ends the connection a moment later, as a reactor would.
    """

    def __init__(self, server):
        super().__init__()
        self.server = server

    def loseConnection(self):
        self._end(ConnectionDone())

    def abortConnection(self):
        self.aborted = True
        self._end(ConnectionAborted())

    def _end(self, reason):
        if not self.disconnecting:
            self.disconnecting = True
            self.server.reactor.callLater(0, self.server.lose, reason)


class FakeServer:
    """
    The server's end of an L{XmppClient}'s streams on a MemoryReactorClock:
    accepts the pending attempt as an authenticated stream, parses what the
    client writes, injects stanzas, loses connections.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.xs = self.transport = None
        #: Connection attempts after the first, made by the factory's retry.
        self.reconnects = 0

    def accept(self):
        _, _, self.factory, _, _ = self.reactor.tcpClients[0]
        self.connector = self.reactor.connectors[0]
        self.connector.connect = self._reconnect
        self.transport = ServerTransport(self)
        self.xs = self.factory.buildProtocol(None)
        self.xs.makeConnection(self.transport)
        self._start = len(self.transport.value())  # after the stream header
        self.xs.dataReceived(
            b"<stream:stream xmlns='jabber:client' xmlns:stream="
            b"'http://etherx.jabber.org/streams' from='example.org' id='s1'"
            b" version='1.0'>")
        # As if the authenticator had negotiated TLS and SASL.
        self.xs.dispatch(self.xs, xmlstream.STREAM_AUTHD_EVENT)

    def _reconnect(self):
        self.reconnects += 1
        self.factory.startedConnecting(self.connector)

    def lose(self, reason):
        xs, self.xs = self.xs, None
        xs.connectionLost(Failure(reason))
        self.factory.clientConnectionLost(self.connector, Failure(reason))

    def sent(self):
        """The stanzas the client wrote on the current stream."""
        stanzas = []
        stream = domish.elementStream()
        stream.DocumentStartEvent = lambda root: None
        stream.ElementEvent = stanzas.append
        stream.parse(b"<stream xmlns='jabber:client'>"
                     + self.transport.value()[self._start:])
        return stanzas

    def sentOf(self, name):
        return [s for s in self.sent() if s.name == name]

    def receive(self, xml):
        self.xs.dataReceived(xml.encode("utf-8"))

    def answer(self, iq, kind="result"):
        self.receive(f"<iq type='{kind}' id='{iq['id']}'"
                     " from='example.org'/>")


def makeConfig(xmpp=None, **sections):
    account = dict(jid=SNQ, password="secret", host="127.0.0.1", tls="off",
                   ping_interval=120, ping_timeout=30)
    account.update(xmpp or {})
    sections.setdefault("queue", {}).update(
        retry_delay=1.0, retry_max_delay=4.0, poll_interval=0.5)
    return snqconfig.parse({"xmpp": account, **sections}, "snq.toml")


class WorkerMixin:
    """
    A worker of the given role on a fake reactor; stopped at the end.  Its
    ledger is C{self.ledger}, in memory (the config says SQL), so the
    "xmpp" group's lease is taken there.
    """

    def startWorker(self, config=None, role="xmpp"):
        self.reactor = MemoryReactorClock()
        self.queue = MemoryQueue(self.reactor)
        self.master = IoMaster(config or makeConfig(), "test.xmpp",
                               clock=self.reactor, queue=self.queue,
                               role=role)
        if not hasattr(self, "ledger"):
            self.ledger = MemoryLedger(None)
        self.ledger.clock = self.reactor
        self.master.ledger._ledger = self.ledger
        self.context = self.master.dispatcher.context
        self.server = FakeServer(self.reactor)
        self.successResultOf(self.master.startService())
        self.addCleanup(self.stopWorker)

    def stopWorker(self):
        d = self.master.stopService()
        for _ in range(40):
            self.reactor.advance(1)
        self.successResultOf(d)
        self.flushLoggedErrors(NotConnected)

    def elapse(self, seconds, step=0.1):
        for _ in range(round(seconds / step)):
            self.reactor.advance(step)

    def enqueue(self, transport, payload, site="default"):
        self.successResultOf(self.context.enqueue(transport, payload, site=site))
        [rowId] = [r for r, row in self.queue.rows.items()
                   if row["transport"] == transport]
        return rowId

    def payloads(self, transport):
        return [json.loads(row["frame"])["payload"]
                for row in self.queue.rows.values()
                if row["transport"] == transport]


class ConnectionTests(WorkerMixin, SynchronousTestCase):
    def test_pingTimeoutReconnects(self):
        """
        An unanswered keepalive drops the stream; the factory reconnects and
        presence is sent again on the new stream.
        """
        self.startWorker()
        self.server.accept()
        self.assertEqual(len(self.server.sentOf("presence")), 1)
        firstTransport = self.server.transport
        self.reactor.advance(120)
        [ping] = self.server.sentOf("iq")
        self.assertEqual(ping.ping.uri, NS_PING)
        self.reactor.advance(29.9)
        self.assertFalse(firstTransport.disconnecting)
        self.reactor.advance(0.1)
        self.assertTrue(firstTransport.aborted)
        self.reactor.advance(0)
        [manager] = self.context.xmppManagers.values()
        self.assertFalse(manager.client.initialized)
        self.assertEqual(self.server.reconnects, 0)
        self.elapse(10)
        self.assertEqual(self.server.reconnects, 1)
        self.server.accept()
        self.assertTrue(manager.client.initialized)
        self.assertEqual(len(self.server.sentOf("presence")), 1)

    def test_answeredPingKeepsStream(self):
        self.startWorker()
        self.server.accept()
        self.reactor.advance(120)
        [ping] = self.server.sentOf("iq")
        self.server.answer(ping)
        self.elapse(60)
        self.assertFalse(self.server.transport.disconnecting)
        self.assertEqual(self.server.reconnects, 0)

    def test_streamConflictExplained(self):
        """
        A server ending the stream because the same JID and resource logged
        in elsewhere is logged with what that means.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.startWorker()
        self.server.accept()
        self.server.receive(
            "<stream:error>"
            "<conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            "</stream:error>")
        [event] = [e for e in events if e.get("condition") == "conflict"]
        self.assertIn("another client logged in", event["hint"])
        self.assertTrue(self.server.transport.disconnecting)


class OutboundTests(WorkerMixin, SynchronousTestCase):
    def sendHi(self):
        return self.enqueue("xmppout", {"to": "alice@example.org",
                                        "body": "hi"})

    def test_whileDisconnectedRetriedThenSent(self):
        """
        An item that finds no stream fails and waits in the queue; after
        the connection is made it is sent, and done once the server answers
        the ping that follows it.
        """
        self.startWorker()
        rowId = self.sendHi()
        self.elapse(0.5)
        row = self.queue.rows[rowId]
        self.assertEqual(row["attempts"], 1)
        self.assertIn(f"NotConnected: XMPP account {SNQ}/snq is not connected",
                      row["error"])
        # Expected while disconnected: one warning line, no traceback.
        self.assertEqual(self.flushLoggedErrors(NotConnected), [])
        self.server.accept()
        self.elapse(2)
        [message] = self.server.sentOf("message")
        itemId = json.loads(row["frame"])["id"]
        self.assertEqual(
            (message["to"], message["type"], message["id"], str(message.body)),
            ("alice@example.org", "chat", itemId, "hi"))
        [ping] = self.server.sentOf("iq")
        self.assertEqual((ping["to"], ping.ping.uri), ("example.org", NS_PING))
        self.assertIn(rowId, self.queue.rows)
        self.server.answer(ping)
        self.assertNotIn(rowId, self.queue.rows)

    def test_errorAnswerConfirmsToo(self):
        self.startWorker()
        self.server.accept()
        rowId = self.sendHi()
        self.elapse(0.2)
        [ping] = self.server.sentOf("iq")
        self.server.answer(ping, "error")
        self.assertNotIn(rowId, self.queue.rows)

    def test_lostBeforeConfirmedIsRetried(self):
        """
        A stream lost before the server confirmed: the item may not have
        arrived, so it is retried.
        """
        self.startWorker()
        self.server.accept()
        rowId = self.sendHi()
        self.elapse(0.2)
        self.assertEqual(len(self.server.sentOf("message")), 1)
        self.server.transport.abortConnection()
        self.reactor.advance(0)
        row = self.queue.rows[rowId]
        self.assertEqual(row["attempts"], 1)
        self.assertIn("ConnectionAborted", row["error"])
        self.flushLoggedErrors(ConnectionAborted)

    def test_unconfirmedDropsStream(self):
        """
        No answer within ping_timeout: the item fails and the stream, which
        is probably dead, is dropped.
        """
        self.startWorker()
        self.server.accept()
        rowId = self.sendHi()
        self.elapse(0.2)
        transport = self.server.transport
        # Sent at the first poll, 0.1 s in.
        self.reactor.advance(29.8)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.queue.rows[rowId]["attempts"], 1)
        self.flushLoggedErrors(xmlstream.TimeoutError)

    def test_rawStanza(self):
        self.startWorker()
        self.server.accept()
        self.enqueue("xmppout", {"stanza": "<message to='bob@example.org' "
                                 "type='headline'><body>news</body></message>"})
        self.elapse(0.2)
        [message] = self.server.sentOf("message")
        self.assertEqual((message["to"], message["type"], str(message.body)),
                         ("bob@example.org", "headline", "news"))
        self.assertTrue(message.getAttribute("id"))
        self.server.answer(self.server.sentOf("iq")[-1])

    def test_badPayloadDeadLettered(self):
        self.startWorker()
        self.server.accept()
        self.enqueue("xmppout", {"to": "alice@example.org", "bdy": "typo"})
        self.elapse(0.2)
        [dead] = self.queue.dead.values()
        self.assertEqual(dead.reason, "rejected")
        self.assertIn("unknown keys bdy", dead.error)
        self.assertEqual(self.server.sentOf("message"), [])

    def test_siteWithoutAccount(self):
        """
        A site that opts out of the [xmpp] account: its items are rejected
        at once, nothing is sent.
        """
        config = makeConfig(sites={"quiet": {"xmpp": {"jid": ""}}})
        self.startWorker(config)
        self.server.accept()
        self.enqueue("xmppout", {"to": "alice@example.org", "body": "x"},
                     site="quiet")
        self.elapse(0.2)
        [dead] = self.queue.dead.values()
        self.assertIn("site 'quiet' has no XMPP account", dead.error)
        self.assertEqual(self.server.sentOf("message"), [])


class SingleTests(WorkerMixin, SynchronousTestCase):
    """
    The "xmpp" group is single among the daemons on a backend: a worker
    connects and claims xmpp items only while it holds the group's lease
    in the ledger (C{[cluster] xmpp_lease}, 30 s by default).
    """

    def sendHi(self):
        return self.enqueue("xmppout", {"to": "alice@example.org",
                                        "body": "hi"})

    def test_standbyNeitherConnectsNorClaims(self):
        """
        While another worker holds the lease: no connection, the items
        wait unclaimed; once the lease lapses (30 s) the worker takes it
        at its next ask (every 10 s), connects and sends them.
        """
        self.ledger = MemoryLedger(None)
        self.ledger.entries["xmpp"] = ("other host", 30.0)
        self.startWorker()
        rowId = self.sendHi()
        self.elapse(29.5)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.context.xmppManagers, {})
        row = self.queue.rows[rowId]
        self.assertEqual((row["attempts"], row["lease_until"]), (0, None))
        # Brokers (Redis lists, STOMP queues) subscribe by the groups.
        self.assertEqual(self.master.groups, [])
        self.assertEqual(self.master.status()["xmpp"][0]["detail"],
                         "waiting: another worker holds it")
        self.elapse(10)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.master.groups, ["xmpp"])
        self.server.accept()
        self.elapse(5)  # Claimed while connecting, it is retried.
        [message] = self.server.sentOf("message")
        self.assertEqual(str(message.body), "hi")
        [ping] = self.server.sentOf("iq")
        self.server.answer(ping)
        self.assertNotIn(rowId, self.queue.rows)
        self.assertEqual(self.master.status()["xmpp"][0]["detail"],
                         "held by this worker")

    def test_lostLeaseDisconnectsAndStopsClaiming(self):
        """
        A renewal the store refuses (another holds it) closes the stream
        and stops the claims at once; xmpp items then wait for the holder.
        """
        self.startWorker()
        self.server.accept()
        manager = self.context.xmppManagers["default"]
        self.assertTrue(self.master.manager.transports.accepts("xmppout"))
        self.ledger.entries["xmpp"] = ("other host", 1000.0)
        self.elapse(10.5)
        self.assertFalse(manager.running)
        self.assertEqual(self.context.xmppManagers, {})
        self.assertFalse(self.master.manager.transports.accepts("xmppout"))
        rowId = self.sendHi()
        self.elapse(5)
        self.assertEqual(self.queue.rows[rowId]["attempts"], 0)

    def test_noLedgerNoLease(self):
        """
        A STOMP queue without [ledger] url has nowhere to keep the lease:
        the worker connects at once and says so.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.startWorker(makeConfig(queue={"backend": "stomp"}))
        self.assertIsNone(self.master.xmppLease)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        [warning] = [formatEvent(e) for e in events
                     if "not leased" in e.get("log_format", "")]
        self.assertIn("set [ledger] url", warning)
        self.assertIn("run it on one host only", warning)

    def test_withoutLease(self):
        """C{xmpp_lease = 0}: connected at once, whatever the ledger holds."""
        self.ledger = MemoryLedger(None)
        self.ledger.entries["xmpp"] = ("other host", 1e9)
        self.startWorker(makeConfig(cluster={"xmpp_lease": 0}))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertNotIn("xmpp", self.master.status())

    def test_stopGivesTheLeaseBack(self):
        self.startWorker()
        self.server.accept()
        self.assertEqual(self.ledger.entries["xmpp"][0].split("/")[2],
                         "test.xmpp")
        self.stopWorker()
        self.assertNotIn("xmpp", self.ledger.entries)


class PerSiteTests(WorkerMixin, SynchronousTestCase):
    def test_oneConnectionPerAccount(self):
        """
        Each site with an account gets a connection of its own; other sites
        use the [xmpp] account.
        """
        config = makeConfig(sites={
            "other": {"xmpp": {"jid": "bot@other.example", "password": "p",
                               "tls": "off", "port": 5223}},
            "plain": {"webhook_url": "http://example.org/"}})
        self.startWorker(config)
        self.assertEqual(
            sorted((host, port) for host, port, _, _, _ in
                   self.reactor.tcpClients),
            [("127.0.0.1", 5222), ("other.example", 5223)])
        managers = self.context.xmppManagers
        self.assertEqual(sorted(managers), ["default", "other"])
        self.assertIs(self.context.xmpp("other"), managers["other"])
        self.assertIs(self.context.xmpp("plain"), managers["default"])
        self.assertIs(self.context.xmpp("unknown"), managers["default"])
        self.assertEqual(managers["other"].client.jid.full(),
                         "bot@other.example/snq")

    def test_mainWorkerHoldsNoConnection(self):
        """
        A worker without the "xmpp" group neither connects nor claims
        xmppout items, which wait for the worker that does.
        """
        self.startWorker(role="queues")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.context.xmppManagers, {})
        rowId = self.enqueue("xmppout", {"to": "a@example.org", "body": "x"})
        self.elapse(2)
        self.assertEqual(self.queue.rows[rowId]["attempts"], 0)
        self.assertIsNone(self.queue.rows[rowId]["lease_until"])


class InboundTests(WorkerMixin, SynchronousTestCase):
    def setUp(self):
        self.startWorker()
        self.server.accept()

    def test_messageBecomesItem(self):
        self.server.receive(
            "<message type='chat' id='m1'"
            f" from='alice@example.org/phone' to='{SNQ}/snq'>"
            "<body>hello snq</body><active xmlns="
            "'http://jabber.org/protocol/chatstates'/></message>")
        self.assertEqual(self.payloads("xmppin"), [{
            "from": "alice@example.org/phone", "to": f"{SNQ}/snq",
            "body": "hello snq", "id": "m1", "type": "chat"}])
        [row] = self.queue.rows.values()
        self.assertEqual(row["site"], "default")
        self.assertEqual(
            self.master.stats.total("xmpp_process"), 1)

    def test_normalWithoutType(self):
        self.server.receive(
            "<message from='bob@example.org/x'>"
            "<body>note</body></message>")
        [payload] = self.payloads("xmppin")
        self.assertEqual((payload["type"], payload["id"], payload["to"]),
                         ("normal", None, f"{SNQ}/snq"))

    def test_ignored(self):
        """
        No body, a chat state, a headline, a group chat, an error, our own
        account, no sender: no item.
        """
        for xml in [
            "<message type='chat' from='a@example.org/x'><composing xmlns="
            "'http://jabber.org/protocol/chatstates'/></message>",
            "<message type='chat' from='a@example.org/x'><body/></message>",
            "<message type='headline' from='news.example.org'><body>n</body>"
            "</message>",
            "<message type='groupchat' from='room@muc.example.org/a'><body>g"
            "</body></message>",
            "<message type='error' from='a@example.org/x' id='i1'><body>e"
            "</body><error type='cancel'><service-unavailable xmlns="
            "'urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
            f"<message type='chat' from='{SNQ}/other'><body>me</body>"
            "</message>",
            "<message type='chat'><body>server</body></message>",
        ]:
            self.server.receive(xml)
        self.assertEqual(self.payloads("xmppin"), [])

    def test_queueRefusesThenTakes(self):
        """
        XMPP cannot take a message back: if the queue refuses it, it is
        kept and stored again later.
        """
        failing = [RuntimeError("database is locked")]
        enqueue = self.queue.enqueue

        def flaky(items, delay=0.0):
            if failing:
                from twisted.internet import defer
                return defer.fail(failing.pop())
            return enqueue(items, delay)

        self.queue.enqueue = flaky
        self.server.receive("<message type='chat'"
                            " from='a@example.org/x'><body>1</body></message>")
        self.assertEqual(self.payloads("xmppin"), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.elapse(1.1)
        self.assertEqual([p["body"] for p in self.payloads("xmppin")], ["1"])


class SubscriptionTests(WorkerMixin, SynchronousTestCase):
    REQUEST = ("<presence type='subscribe'"
               " from='alice@example.org'/>")

    def test_autoSubscribe(self):
        self.startWorker(makeConfig({"auto_subscribe": True}))
        self.server.accept()
        self.server.receive(self.REQUEST)
        answer = self.server.sentOf("presence")[-1]
        self.assertEqual((answer["type"], answer["to"]),
                         ("subscribed", "alice@example.org"))

    def test_notByDefault(self):
        self.startWorker()
        self.server.accept()
        self.server.receive(self.REQUEST)
        self.assertEqual([p.getAttribute("type")
                          for p in self.server.sentOf("presence")], [None])


class StanzaTests(SynchronousTestCase):
    def test_message(self):
        element = stanzaFor({"to": "a@example.org/r", "body": "b",
                             "type": "normal", "subject": "s", "thread": "t"},
                            "id1")
        self.assertEqual(
            element.toXml(),
            "<message to='a@example.org/r' type='normal' id='id1'>"
            "<subject>s</subject><body>b</body><thread>t</thread></message>")

    def test_rawKeepsItsId(self):
        element = stanzaFor({"stanza": "<presence id='p' to='a@example.org'"
                             " type='subscribe'/>"}, "id1")
        self.assertEqual(element["id"], "p")

    def test_rejected(self):
        for payload, why in [
            ("text", "must be a JSON object"),
            ({"body": "x"}, "'to' must be a JID"),
            ({"to": "a@@b", "body": "x"}, "'to' must be a JID"),
            ({"to": "a@b"}, "'body' must be a non-empty string"),
            ({"to": "a@b", "body": "x", "type": "error"}, "'type' must be"),
            ({"to": "a@b", "body": "x", "thread": 3}, "'thread' must be a"),
            ({"stanza": "<message", }, "not a complete XML element"),
            ({"stanza": "<a/><b/>"}, "not XML"),
            ({"stanza": "<db:result xmlns:db='jabber:server:dialback'/>"},
             "must be a jabber:client message"),
            ({"stanza": "<message/>", "to": "a@b"}, "comes alone"),
        ]:
            error = self.assertRaises(Reject, stanzaFor, payload, "i")
            self.assertIn(why, str(error))


class ConfigTests(SynchronousTestCase):
    def test_offByDefault(self):
        config = snqconfig.parse({})
        self.assertEqual((config.xmpp.jid, config.xmppAccounts(),
                          config.queue.groups), ("", {}, ["main"]))
        self.assertIsNone(config.xmppSite("default"))

    def test_accountTurnsOnGroup(self):
        """
        Filling in [xmpp] is enough: the "xmpp" group joins the default
        groups; groups set in the file are kept as they are.
        """
        self.assertEqual(makeConfig().queue.groups, ["main", "xmpp"])
        config = makeConfig(queue={"groups": ["main"]})
        self.assertEqual(config.queue.groups, ["main"])

    def test_problemsNamed(self):
        e = self.assertRaises(snqconfig.ConfigError, snqconfig.parse, {
            "xmpp": {"jid": "nodomain", "tls": "maybe", "port": "x"},
            "sites": {"a": {"xmpp": {"jid": "a@example.org",
                                     "password": "p"}},
                      "b": {"xmpp": {"jid": "A@example.org/other",
                                     "password": "p"}},
                      "c": {"xmpp": {"jid": "c@example.org",
                                     "password": "p", "priority": 500}},
                      "default": {"xmpp": {}}}}, "snq.toml")
        self.assertEqual(sorted(e.problems), sorted([
            "snq.toml: xmpp.port: expected an integer, got string 'x'",
            "snq.toml: xmpp.jid: expected user@domain, got 'nodomain'",
            "snq.toml: xmpp.password: expected the account's password",
            "snq.toml: xmpp.tls: expected one of required, optional, off, "
            "got 'maybe'",
            "snq.toml: sites.c.xmpp.priority: expected -128-127, got 500",
            "snq.toml: sites.b.xmpp.jid: A@example.org/other is already the "
            "account of [sites.a.xmpp]; give each site its own JID, or leave "
            "out sites.b.xmpp to use the [xmpp] account",
            "snq.toml: sites.default.xmpp: the default site's account is the "
            "[xmpp] section",
        ]))

    def test_passwordNotShown(self):
        self.assertNotIn("secret", repr(makeConfig().xmpp))


class PoolTests(SynchronousTestCase):
    """
    The pool runs the connections in one worker of their own.
    """

    def spawned(self, config, count):
        from tests.test_pool import FakeProcessReactor

        reactor = FakeProcessReactor()
        pool = WorkerPool(config, count, reactor=reactor)
        pool.startService()
        reactor.advance(10)
        return [p.args[p.args.index("--role"):] for p in reactor.processes]

    def test_oneXmppWorker(self):
        self.assertEqual(self.spawned(makeConfig(), 3), [
            ["--role", "first", "--id", "generic.0"],
            ["--role", "queues", "--id", "generic.1"],
            ["--role", "queues", "--id", "generic.2"],
            ["--role", "xmpp", "--id", "generic.xmpp"]])
        self.assertEqual(groupsOf(makeConfig(), "queues"), ["main"])
        self.assertEqual(groupsOf(makeConfig(), "xmpp"), ["xmpp"])

    def test_xmppOnly(self):
        """A host that runs only the xmpp group: one worker, whatever N."""
        config = makeConfig(queue={"groups": ["xmpp"]})
        self.assertEqual(self.spawned(config, 4),
                         [["--role", "xmpp", "--id", "generic.xmpp"]])

    def test_withoutXmpp(self):
        config = snqconfig.parse({"queue": {"groups": ["main", "slow"]}})
        self.assertEqual(self.spawned(config, 2),
                         [["--role", "first", "--id", "generic.0"],
                          ["--role", "queues", "--id", "generic.1"]])
        self.assertEqual(groupsOf(config, "queues"), ["main", "slow"])

    def test_childPassesItsRole(self):
        made = []
        worker = Worker(
            makeConfig(), "generic.xmpp", Clock(),
            lambda config, **kw: made.append(kw["role"]), role="xmpp")
        worker._build()
        self.assertEqual(made, ["xmpp"])
