# -*- test-case-name: tests.test_xmpp_confirm -*-
"""
C{xmppconfirm}: the handler and the IoManager on a Clock, with an
in-memory ledger and a stand-in for the site's XMPP connection; then the
whole of it in an XMPP worker against the real Prosody, with the suite's
second account (alice) at the other end.
"""

import json
import sqlite3

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from wokkel.xmppim import NS_ROSTER, RosterItem, RosterRequest

from snq import config as snqconfig
from snq.handlers import Reject, Retry
from snq.iomanagers import loadPlugin
from snq.iomaster import IoMaster
from snq.item import Item
from snq.ledger.memory import MemoryLedger
from snq.queues.memory import MemoryQueue
from snq.xmpp.confirm import ConfirmManager, XmppConfirmHandler
from snq.xmpp.xmppout import NotConnected
from tests.daemon import waitFor
from tests.plugin_helpers import managerContext
from tests.test_xmpp_integration import (
    CA_FILE,
    ProsodyTestCase,
    connectPeer,
    resource,
)

ACCOUNT = {"jid": "snq@localhost", "password": "snq-pass"}


def parse(settings=None, sites=None):
    return snqconfig.parse({"xmpp": ACCOUNT,
                            "iomanagers": {"xmppconfirm": settings or {}},
                            "sites": sites or {}})


class FakeXmpp:
    """The site's XmppManager as the plugin uses it."""

    def __init__(self):
        self.sent = []
        self.asked = []
        self.connected = True

    def ensureSubscribed(self, jid):
        self.asked.append(jid.full())
        return defer.succeed(True)

    def send(self, element):
        if not self.connected:
            raise NotConnected("down")
        self.sent.append((element["to"], str(element.body)))
        return defer.succeed(None)


class ConfirmTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.queue = MemoryQueue(self.clock)
        self.ledger = MemoryLedger(self.clock)
        self.xmpp = FakeXmpp()
        self.start(parse({"keyword": "yes", "expiry": "1h", "keep": "1d"},
                         {"shop": {"xmppconfirm": {
                             "template": "Code {code} for {site}"}}}))

    def start(self, config):
        settings = loadPlugin(config, "xmppconfirm").settings
        context = managerContext(self, config, self.queue, self.clock,
                                 "xmppconfirm", settings=settings,
                                 ledger=self.ledger)
        context.handlers.xmppManagers = {"default": self.xmpp, "shop": self.xmpp}
        self.manager = ConfirmManager(context)
        context.handlers.iomanagers["xmppconfirm"] = self.manager
        self.manager.startService()
        self.addCleanup(self.manager.stopService)
        self.handler = XmppConfirmHandler(context.handlers)
        self.context = context

    def handle(self, payload, site="default"):
        item = Item(transport="xmppconfirm", payload=payload, site=site)
        return defer.maybeDeferred(self.handler.handle, item)

    def reply(self, body, sender="ann@example.org/phone", site="default"):
        return self.successResultOf(self.manager.inbound(
            site, {"from": sender, "body": body}))

    def queued(self, transport):
        return [Item.fromJSON(r["frame"]).payload for r in self.queue.rows.values()
                if r["transport"] == transport]

    def counts(self):
        return {c.split(".")[1]: n for (c, _, _), n in
                self.context.handlers.stats.counts.items()
                if c.startswith("xmppconfirm.")}

    def test_sentOnceThenConfirmedOnce(self):
        payload = {"jid": "ann@example.org", "code": "K7Q2",
                   "url": "https://example.org/c/K7Q2"}
        self.successResultOf(self.handle(payload))
        self.successResultOf(self.handle(payload))  # Enqueued twice.
        [(to, body)] = self.xmpp.sent
        self.assertEqual(to, "ann@example.org")
        self.assertIn("reply with this code: K7Q2", body)
        self.assertEqual(self.xmpp.asked, ["ann@example.org"])

        self.assertFalse(self.reply("hello"))  # Any other message: xmppin.
        self.assertFalse(self.reply("it is Z9Z9"))  # A wrong code too.
        self.assertTrue(self.reply("sure, K7Q2!"))
        self.assertTrue(self.reply("K7Q2"))  # Again: no second item.
        self.assertEqual(self.queued("xmppconfirmed"), [
            {"jid": "ann@example.org", "code": "K7Q2", "site": "default"}])
        [thanks] = self.queued("xmppout")
        self.assertEqual(thanks, {"to": "ann@example.org/phone", "body":
                                  "Thank you: ann@example.org is confirmed on "
                                  "default."})
        self.assertEqual(self.counts(), {"sent": 1, "duplicate": 1, "confirmed": 1,
                                         "repeated": 1})

    def test_keywordConfirmsTheNewest(self):
        for code in ("AAA1", "BBB2"):
            self.successResultOf(self.handle({"jid": "ann@example.org", "code": code}))
            self.clock.advance(1)
        self.assertTrue(self.reply(" YES "))
        self.assertEqual([p["code"] for p in self.queued("xmppconfirmed")], ["BBB2"])

    def test_expired(self):
        self.successResultOf(self.handle({"jid": "ann@example.org", "code": "K7Q2"}))
        self.clock.advance(3601)
        self.assertTrue(self.reply("K7Q2"))
        self.assertEqual(self.queued("xmppconfirmed"), [])
        [answer] = self.queued("xmppout")
        self.assertIn("That code has expired", answer["body"])
        self.clock.advance(86400)  # Past keep: forgotten, just a message.
        self.assertFalse(self.reply("K7Q2"))

    def test_siteTemplateAndFullJid(self):
        self.successResultOf(self.handle({"jid": "ann@example.org/laptop",
                                          "code": "S1"}, site="shop"))
        self.assertEqual(self.xmpp.sent, [("ann@example.org/laptop",
                                           "Code S1 for shop")])
        self.assertTrue(self.reply("S1", sender="ann@example.org/phone",
                                   site="shop"))
        self.assertFalse(self.reply("S1", sender="ann@example.org/phone"))

    def test_failedSendIsRetriedAndSentOnce(self):
        self.xmpp.connected = False
        self.failureResultOf(self.handle({"jid": "ann@example.org", "code": "K"}),
                             NotConnected)
        self.xmpp.connected = True
        self.successResultOf(self.handle({"jid": "ann@example.org", "code": "K"}))
        self.assertEqual(len(self.xmpp.sent), 1)

    def test_beingSentByAnother(self):
        self.successResultOf(self.ledger.lease(
            "xmppconfirm:sent:default:ann@example.org:K", "other-item", 120))
        self.failureResultOf(self.handle({"jid": "ann@example.org", "code": "K"}),
                             Retry)

    def test_badPayloads(self):
        for payload, why in [
                ([], "must be a JSON object"),
                ({"jid": "nobody", "code": "K"}, "must be user@domain"),
                ({"jid": "a@b", "code": "two words"}, "'code' must be a word"),
                ({"jid": "a@b", "code": "K", "site": "shop"}, "not the item's site"),
                ({"jid": "a@b", "code": "K", "colour": 1}, "unknown keys colour")]:
            failure = self.failureResultOf(self.handle(payload), Reject)
            self.assertIn(why, str(failure.value))

    def test_settingsChecked(self):
        config = parse({"template": "{nope}"}, {"shop": {"xmppconfirm": {
            "expiry": "soon"}}})
        from snq.iomanagers import checkPlugins

        self.assertEqual(checkPlugins(config), [
            "iomanagers.xmppconfirm.template: expected text whose {fields} are "
            "among {jid}, {code}, {url}, {site}, got '{nope}'",
        ])
        config = parse({}, {"shop": {"xmppconfirm": {"expiry": "soon"}}})
        [problem] = checkPlugins(config)
        self.assertIn("iomanagers.xmppconfirm: sites.shop.xmppconfirm.expiry: "
                      "expected seconds", problem)

    def test_needsTheXmppWorker(self):
        config = snqconfig.parse({"iomanagers": {"xmppconfirm": {}}})
        from snq.iomanagers import checkPlugins

        [problem] = checkPlugins(config)
        self.assertIn('iomanagers.xmppconfirm.worker: "xmpp", but no XMPP worker '
                      "runs", problem)


class ProsodyTests(ProsodyTestCase):
    """
    The XMPP worker in this process (SQLite queue and ledger), snq@localhost
    asking alice@localhost, whose session here is the test's own.
    """

    def rows(self, transport):
        with sqlite3.connect(self.db, timeout=30) as conn:
            return [json.loads(f)["payload"] for (f,) in conn.execute(
                "SELECT frame FROM queue_item WHERE transport = ?", (transport,))]

    async def test_confirmation(self):
        client, peer = await connectPeer(self)
        config = snqconfig.parse({
            "db": {"url": f"sqlite:///{self.db}"},
            "queue": {"poll_interval": 0.1, "retry_delay": 0.2},
            "xmpp": {**ACCOUNT, "host": "127.0.0.1", "resource": resource("snq"),
                     "ca_file": CA_FILE},
            "iomanagers": {"xmppconfirm": {}}}, "snq.toml")
        master = IoMaster(config, "it.xmpp", role="xmpp")
        await master.startService()
        self.addCleanup(master.stopService)
        managers = master.dispatcher.context.xmppManagers
        await waitFor(lambda: "default" in managers, timeout=10,
                      what="the xmpp group's lease")
        xmpp = managers["default"]
        await xmpp.client.whenInitialized()
        snq = xmpp.client.jid.full()

        alice = client.jid.full()
        context = master.dispatcher.context
        payload = {"jid": alice, "code": "K7Q2", "url": "https://example.org/c"}
        for _ in range(2):  # Enqueued twice: one message all the same.
            await context.enqueue("xmppconfirm", payload)
        message = await peer.messages.get()
        self.assertEqual(message["from"], snq)
        self.assertIn("reply with this code: K7Q2", str(message.body))
        await waitFor(lambda: self.rows("xmppconfirm") == [], timeout=10,
                      what="both xmppconfirm items done")
        self.assertEqual(peer.messages.pending, [], "sent once")
        # snq asked for alice's presence (or has it from an earlier run).
        answer = await xmpp.client.request(RosterRequest())
        [item] = [RosterItem.fromElement(e) for e in answer.query.elements(
            NS_ROSTER, "item") if e["jid"] == "alice@localhost"]
        self.assertTrue(item.subscriptionTo or item.pendingOut)

        peer.say(snq, "Z9Z9")
        await waitFor(lambda: self.rows("xmppin"), timeout=10,
                      what="the wrong code as an xmppin item")
        self.assertEqual(self.rows("xmppconfirmed"), [])

        peer.say(snq, "here it is: K7Q2")
        thanks = await peer.messages.get()
        self.assertIn("is confirmed", str(thanks.body))
        stats = master.stats.counts
        peer.say(snq, "K7Q2")
        await waitFor(lambda: stats["xmppconfirm.repeated", "", "default"] == 1,
                      timeout=10, what="the repeated reply taken")
        self.assertEqual(self.rows("xmppconfirmed"), [
            {"jid": "alice@localhost", "code": "K7Q2", "site": "default"}])
        self.assertEqual([p["body"] for p in self.rows("xmppin")], ["Z9Z9"])
        self.assertEqual((stats["xmppconfirm.sent", "", "default"],
                          stats["xmppconfirm.confirmed", "", "default"]), (1, 1))
