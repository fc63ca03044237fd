# -*- test-case-name: tests.test_xmpp_integration -*-
"""
snq's XMPP side against the real Prosody that C{scripts/setup-services}
runs on 127.0.0.1:5222 (domain "localhost", users snq, alice, bob, a
certificate signed by the test CA): a worker in this process on an SQLite
queue, a peer client as the person at the other end, and once the whole
C{twistd -n snq}.

Every session uses a resource of its own (pid and counter), so parallel
runs and other tests do not replace each other's sessions; messages go to
full JIDs for the same reason.
"""

import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time

from twisted.internet import defer, reactor
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase
from twisted.words.protocols.jabber.xmlstream import XMPPHandler
from twisted.words.xish import domish

from snq import config as snqconfig
from snq.handlers import QueueHandler
from snq.iomaster import IoMaster
from snq.xmpp.connection import XmppClient, XmppSettings
from snq.xmpp.xmppout import NotConnected
from tests.daemon import Daemon, snqctl, waitFor

CA_FILE = "/etc/prosody/certs/snq-test-ca.crt"
PROSODY_CFG = "/etc/prosody/snq-test.cfg.lua"
PROSODY_PID = "/run/prosody-snq/prosody.pid"
PROSODY_LOG = "/var/log/prosody/snq-test.log"
_sessions = itertools.count()


def resource(what):
    return f"{what}-{os.getpid()}-{next(_sessions)}"


def prosodyPid():
    """Prosody's pid if it runs with the test config (as setup-services checks)."""
    try:
        with open(PROSODY_PID) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ")
    except (OSError, ValueError):
        return None
    return pid if PROSODY_CFG.encode() in command else None


def portOpen(port=5222):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def requireProsody():
    if not portOpen():
        raise AssertionError(
            "Prosody does not answer on 127.0.0.1:5222; run scripts/"
            "setup-services (as root) to install and start it")


@defer.inlineCallbacks
def startProsody():
    """Start Prosody exactly as scripts/setup-services does, if it is down."""
    if prosodyPid() is None:
        with open(os.devnull, "w") as quiet:
            subprocess.run(["rm", "-f", PROSODY_PID], check=True)
            subprocess.run(
                ["start-stop-daemon", "--start", "--background",
                 "--chuid", "prosody:prosody", "--user", "prosody",
                 "--pidfile", PROSODY_PID, "--output", PROSODY_LOG,
                 "--startas", "/usr/bin/prosody", "--",
                 "-F", "--config", PROSODY_CFG],
                check=True, stdout=quiet)
    yield waitFor(portOpen, timeout=30, what="Prosody on 127.0.0.1:5222")


@defer.inlineCallbacks
def stopProsody():
    pid = prosodyPid()
    if pid is None:
        raise AssertionError(f"no Prosody running with {PROSODY_CFG}")
    os.kill(pid, signal.SIGTERM)
    yield waitFor(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10,
                  what=f"Prosody (pid {pid}) to exit")


class Peer(XMPPHandler):
    """The person at the other end: collects chat messages, says things."""

    def __init__(self):
        super().__init__()
        self.messages = defer.DeferredQueue()

    def connectionInitialized(self):
        self.xmlstream.addObserver("/message[@type='chat']", self._onMessage)

    def _onMessage(self, message):
        if message.body is not None:
            self.messages.put(message)

    def say(self, to, body):
        message = domish.Element((None, "message"))
        message["to"], message["type"], message["id"] = to, "chat", "m1"
        message.addElement("body", content=body)
        self.send(message)


@defer.inlineCallbacks
def connectPeer(testCase, session=None):
    """alice@localhost with a session of its own, connected; → (client, peer)."""
    peer = Peer()
    client = XmppClient(XmppSettings(
        jid="alice@localhost", password="alice-pass", host="127.0.0.1",
        resource=session or resource("alice"), tls="off"))
    peer.setHandlerParent(client)
    client.startService()
    testCase.addCleanup(lambda: client.running and client.stopService())
    yield client.whenInitialized()
    return client, peer


class RecordPayload(QueueHandler):
    """For the twistd test: an xmppin handler writing each payload a line."""

    def handle(self, item):
        path = self.context.siteConfig(item.site)["record_file"]
        with open(path, "a") as f:
            f.write(json.dumps(item.payload) + "\n")


class Gate:
    """
    A TCP forwarder to Prosody that the test can shut: snq connects through
    it, so the test decides when snq can get back in after a restart.
    """

    def __init__(self):
        self.factory = portforward.ProxyFactory("127.0.0.1", 5222)
        self.listening = reactor.listenTCP(0, self.factory,
                                           interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def shut(self):
        return self.listening.stopListening()

    def open(self):
        self.listening = reactor.listenTCP(self.port, self.factory,
                                           interface="127.0.0.1")

    def close(self):
        if self.listening.connected:
            return self.listening.stopListening()
        return None


class ProsodyTestCase(TestCase):
    """A test against Prosody, with a directory and an SQLite queue file."""

    timeout = 60

    def setUp(self):
        requireProsody()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = os.path.join(self.dir, "snq.sqlite")


class XmppIntegrationTests(ProsodyTestCase):

    def config(self, **xmpp):
        account = dict(jid="snq@localhost", password="snq-pass",
                       host="127.0.0.1", resource=resource("snq"),
                       tls="required", ca_file=CA_FILE, connect_timeout=5)
        account.update(xmpp)
        return snqconfig.parse({
            "db": {"url": f"sqlite:///{self.db}"},
            "queue": {"retry_delay": 0.2, "retry_max_delay": 1.0,
                      "poll_interval": 0.1},
            "xmpp": account,
            "sites": {"b": {"xmpp": dict(account, jid="bob@localhost",
                                         password="bob-pass",
                                         resource=resource("bob"))}},
        }, "snq.toml")

    @defer.inlineCallbacks
    def startWorker(self, config):
        """The pool's xmpp worker, in this process."""
        master = IoMaster(config, "it.xmpp", role="xmpp")
        yield master.startService()
        self.addCleanup(master.stopService)
        # It connects once it holds the xmpp group's lease (in the SQLite file).
        yield waitFor(lambda: master.dispatcher.context.xmppManagers.keys() ==
                      config.xmppAccounts().keys(), timeout=10,
                      what="the xmpp group's lease")
        return master

    def startPeer(self, session=None):
        return connectPeer(self, session)

    def rows(self, transport):
        with sqlite3.connect(self.db, timeout=30) as conn:
            return conn.execute(
                "SELECT frame, site, attempts FROM queue_item "
                "WHERE transport = ?", (transport,)).fetchall()

    async def received(self, peer, n):
        messages = []
        for _ in range(n):
            messages.append(await peer.messages.get())
        return sorted((m["from"], str(m.body)) for m in messages)

    async def test_deliversToPeer(self):
        """
        xmppout items of two sites reach the peer, each from its site's
        account, over TLS verified with the CA file; then the queue is
        empty.
        """
        client, peer = await self.startPeer()
        master = await self.startWorker(self.config())
        managers = master.dispatcher.context.xmppManagers
        for manager in managers.values():
            xs = await manager.client.whenInitialized()
            self.assertTrue(ISSLTransport.providedBy(xs.transport))
        to = client.jid.full()
        context = master.dispatcher.context
        for n in range(3):
            await context.enqueue("xmppout", {"to": to, "body": f"hi {n}"})
        await context.enqueue("xmppout", {"to": to, "body": "from b"}, site="b")
        snq, bob = (managers[s].client.jid.full() for s in ("default", "b"))
        self.assertEqual(await self.received(peer, 4), sorted(
            [(snq, f"hi {n}") for n in range(3)] + [(bob, "from b")]))
        await waitFor(lambda: self.rows("xmppout") == [], timeout=5,
                      what="the xmppout items to be acknowledged")

    async def test_messageBecomesItem(self):
        client, peer = await self.startPeer()
        master = await self.startWorker(self.config())
        manager = master.dispatcher.context.xmppManagers["default"]
        await manager.client.whenInitialized()
        snq = manager.client.jid.full()
        peer.say(snq, "hello snq")
        await waitFor(lambda: self.rows("xmppin"), timeout=10,
                      what="an xmppin item")
        [(frame, site, attempts)] = self.rows("xmppin")
        self.assertEqual((site, attempts), ("default", 0))
        self.assertEqual(json.loads(frame)["payload"], {
            "from": client.jid.full(), "to": snq, "body": "hello snq",
            "id": "m1", "type": "chat"})

    async def test_prosodyRestart(self):
        """
        Prosody restarts: items queued meanwhile fail and wait, snq
        reconnects by itself and delivers them.
        """
        self.addCleanup(startProsody)
        gate = Gate()
        self.addCleanup(gate.close)
        master = await self.startWorker(self.config(port=gate.port))
        manager = master.dispatcher.context.xmppManagers["default"]
        # The factory's backoff grows to minutes; the test need not wait it.
        manager.client.factory.maxDelay = 1.0
        await manager.client.whenInitialized()
        client, _ = await self.startPeer()
        to = client.jid.full()
        await client.stopService()

        # snq stays out until the peer is back: Prosody keeps no messages
        # for the offline, so one sent before the peer's login would be lost.
        await gate.shut()
        await stopProsody()
        context = master.dispatcher.context
        for n in range(3):
            await context.enqueue("xmppout", {"to": to, "body": f"meanwhile {n}"})
        await waitFor(lambda: all(a >= 1 for _, _, a in self.rows("xmppout")),
                      timeout=10, what="every item to have failed once")
        self.assertFalse(manager.client.initialized)

        await startProsody()
        client, peer = await self.startPeer(client.jid.resource)
        gate.open()
        await manager.client.whenInitialized()
        bodies = [body for _, body in await self.received(peer, 3)]
        self.assertEqual(bodies, [f"meanwhile {n}" for n in range(3)])
        await waitFor(lambda: self.rows("xmppout") == [], timeout=5,
                      what="the xmppout items to be acknowledged")
        self.flushLoggedErrors(NotConnected)

    async def test_tlsWithoutCAFile(self):
        """
        Without the CA file the test certificate does not verify: an error
        saying so in the log, and items fail saying the account gave up.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        master = await self.startWorker(self.config(ca_file=""))
        manager = master.dispatcher.context.xmppManagers["default"]
        await waitFor(lambda: not manager.client.running, timeout=10,
                      what="the client to give up")
        # One for each account: the default site's and site b's.
        [message, _] = [text for text in map(formatEvent, events)
                        if "TLS handshake" in text]
        self.assertIn("TLS handshake with 127.0.0.1:5222 failed; the "
                      "certificate for localhost must verify against the "
                      "system trust store", message)
        self.assertIn("certificate verify failed", message)
        await master.dispatcher.context.enqueue(
            "xmppout", {"to": "alice@localhost", "body": "never"})
        await waitFor(lambda: self.rows("xmppout")[0][2] >= 1, timeout=5,
                      what="the item to fail")
        # An expected failure: a warning with the reason, no traceback.
        self.assertEqual(self.flushLoggedErrors(NotConnected), [])
        [error] = [e["error"] for e in events
                   if "NotConnected" in str(e.get("error", ""))]
        self.assertIn("gave up, see the log", error)


class TwistdTests(TestCase):
    """
    What a new user does: fill in [xmpp], run twistd, enqueue with snqctl.
    """

    timeout = 60

    async def startDaemon(self):
        """
        C{twistd snq} with the account (its resource: C{self.snqResource})
        and an xmppin recorder, and alice; → (config path, record path,
        daemon, alice's client, her peer).
        """
        requireProsody()
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        record = os.path.join(work, "xmppin.jsonl")
        snqResource = resource("twistd")
        path = os.path.join(work, "snq.toml")
        with open(path, "w") as f:
            f.write(f"""
[daemon]
workers = 1

[xmpp]
jid = "snq@localhost"
password = "snq-pass"
host = "127.0.0.1"
resource = "{snqResource}"
ca_file = "{CA_FILE}"

[handlers]
xmppin = "tests.test_xmpp_integration:RecordPayload"

[sites.default]
record_file = "{record}"
""")
        client, peer = await connectPeer(self)
        daemon = Daemon(self, work, "-c", path)
        self.snqResource = snqResource
        return path, record, daemon, client, peer

    async def test_enqueueAndReply(self):
        path, record, daemon, client, peer = await self.startDaemon()
        work, snqResource = os.path.dirname(path), self.snqResource
        to = client.jid.full()
        snqctl("-c", path, "enqueue", "xmppout",
               json.dumps({"to": to, "body": "hi"}), cwd=work)
        message = await peer.messages.get()
        self.assertEqual(str(message.body), "hi")
        self.assertEqual(message["from"], f"snq@localhost/{snqResource}")
        peer.say(message["from"], "hi yourself")
        await waitFor(lambda: os.path.exists(record), timeout=20,
                      what="the reply as an xmppin item")
        with open(record) as f:
            [payload] = [json.loads(line) for line in f]
        self.assertEqual((payload["from"], payload["body"]),
                         (to, "hi yourself"))
        output = daemon.output()
        self.assertTrue(daemon.alive(), output)
        # The pool's arrangement: the connection lives in generic.xmpp alone.
        logins = re.findall(r"\[(generic\.\w+):\d+#info\] XMPP stream "
                            r"initialized as (\S+)", output)
        self.assertEqual(logins, [("generic.xmpp", message["from"])])

    async def test_restartHandsTheLeaseOn(self):
        """
        C{snqctl restart}: the new generic.xmpp waits while the old one
        holds the xmpp group's lease (in the SQLite file), takes it once
        the old one gives it back on stop, and sends; never two sessions
        at once, so no conflict.
        """
        path, _, daemon, client, peer = await self.startDaemon()
        work, to = os.path.dirname(path), client.jid.full()
        snqctl("-c", path, "enqueue", "xmppout",
               json.dumps({"to": to, "body": "before"}), cwd=work)
        self.assertEqual(str((await peer.messages.get()).body), "before")
        started = time.monotonic()
        snqctl("-c", path, "restart", cwd=work)
        snqctl("-c", path, "enqueue", "xmppout",
               json.dumps({"to": to, "body": "after"}), cwd=work)
        self.assertEqual(str((await peer.messages.get()).body), "after")
        handover = time.monotonic() - started
        output = daemon.output()
        takes = re.findall(r"\[generic\.xmpp:(\d+)#info\] worker generic\.xmpp "
                           r"takes the xmpp group", output)
        self.assertEqual(len(takes), 2, output)
        self.assertNotEqual(*takes)
        self.assertNotIn("conflict", output)
        # The rolling restart, then at most a third of the 30 s lease.
        self.assertLess(handover, 40)
        print(f"\nsnqctl restart: the new xmpp worker sent {handover:.1f} s "
              "after the restart began")
