# -*- test-case-name: tests.test_feedpoll -*-
"""
C{feedpoll} against feeds served by twisted.web on 127.0.0.1, the pollers'
time on a Clock (the requests are real), their ledger and queue an SQLite
file shared like two daemons' would be.
"""

import json
import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from twisted.web.resource import EncodingResourceWrapper
from twisted.web.server import GzipEncoderFactory

from snq import config as snqconfig
from snq.iomanagers import loadPlugin
from snq.iomanagers.feedpoll import FeedPoller, HostGate, retryAfter
from snq.monitor.tracker import Tracker
from snq.queues import makeQueue
from tests.plugin_helpers import managerContext
from tests.test_monitor import FakePool
from tests.test_redis import waitUntil

START = 1893456000.0


def atom(entries):
    """An Atom feed of C{(id, title, published ISO)} entries, newest first."""
    body = "".join(f"""
  <entry>
    <id>{i}</id><title>{title}</title>
    <link href="http://example.org/{i}"/>
    <published>{when}</published><updated>{when}</updated>
    <content type="text">text of {title}</content>
  </entry>""" for i, title, when in entries)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>News</title><id>urn:news</id><updated>2030-01-01T00:00:00Z</updated>
  {body}
</feed>""".encode()


class Feed(resource.Resource):
    """A feed whose entries and answers the test changes."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.entries = [("urn:1", "first", "2029-12-30T10:00:00Z"),
                        ("urn:2", "second", "2029-12-31T10:00:00Z")]
        self.version = 1
        #: (status, headers) to answer with instead of the feed.
        self.failWith = None
        self.conditional = True
        self.requests = []

    def render_GET(self, request):
        self.requests.append({k.decode(): request.getHeader(k) for k in (
            b"if-none-match", b"accept-encoding", b"user-agent")})
        if self.failWith is not None:
            code, headers = self.failWith
            request.setResponseCode(code)
            for name, value in headers.items():
                request.setHeader(name, value)
            return b"no"
        etag = f'"v{self.version}"'.encode()
        if self.conditional and request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"etag", etag)
        request.setHeader(b"content-type", b"application/atom+xml")
        return atom(self.entries[::-1])


class FeedServer:
    def __init__(self, testCase):
        self.feed = Feed()
        root = resource.Resource()
        root.putChild(b"news.xml", EncodingResourceWrapper(
            self.feed, [GzipEncoderFactory()]))
        site = server.Site(root)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        testCase.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/news.xml"


class FeedTestCase(TestCase):
    timeout = 60

    def setUp(self):
        self.server = FeedServer(self)
        self.clock = Clock()
        self.clock.advance(START)
        self.db = os.path.abspath(self.mktemp())

    def config(self, **settings):
        return snqconfig.parse({
            "db": {"url": f"sqlite:///{self.db}"},
            "iomanagers": {"feedpoll": {"host_interval": 0.001, **settings}},
            "sites": {"blog": {"feeds": {"news": {
                "url": self.server.url, "interval": 60}}}}})

    @defer.inlineCallbacks
    def poller(self, config=None, wid="host1.0"):
        """A daemon's feedpoll, on its own queue object on the shared file."""
        config = config or self.config()
        queue = makeQueue(config, self.clock)
        yield queue.open()
        self.addCleanup(queue.close)
        settings = loadPlugin(config, "feedpoll").settings
        context = managerContext(self, config, queue, self.clock, "feedpoll",
                                 settings=settings, wid=wid)
        poller = FeedPoller(context)
        yield poller.startService()
        self.addCleanup(lambda: poller.running and poller.stopService())
        return poller

    def idle(self, *pollers):
        return waitUntil(lambda: all(p._polling is None and p._timer is not None
                                     for f in pollers for p in f.pollers.values()),
                         what="the polls to end")

    @defer.inlineCallbacks
    def tick(self, seconds, *pollers):
        self.clock.advance(seconds)
        yield self.idle(*pollers)

    def items(self):
        with sqlite3.connect(self.db) as conn:
            return [json.loads(f) for (f,) in conn.execute(
                "SELECT frame FROM queue_item ORDER BY id")]

    def counts(self, poller):
        return {c.split(".")[1]: n for (c, key, _), n in
                poller.context.handlers.stats.counts.items()
                if c.startswith("feedpoll.") and key == "blog/news"}


class FeedPollTests(FeedTestCase):
    async def test_entriesThenNotModified(self):
        poller = await self.poller()
        await self.tick(0, poller)
        items = self.items()
        self.assertEqual([(i["transport"], i["site"], i["payload"]["id"])
                          for i in items],
                         [("feedentry", "blog", "urn:1"),
                          ("feedentry", "blog", "urn:2")])
        self.assertEqual(items[0]["payload"], {
            "feed": "news", "feed_url": self.server.url, "id": "urn:1",
            "link": "http://example.org/urn:1", "title": "first",
            "published": 1893319200, "content": "text of first", "author": None})
        # Gzip asked for; the next poll is conditional, and 304 adds nothing.
        self.assertIn(b"gzip", self.server.feed.requests[0]["accept-encoding"])
        await self.tick(60, poller)
        self.assertEqual(self.server.feed.requests[1]["if-none-match"], b'"v1"')
        self.assertEqual(len(self.items()), 2)
        # A new entry: one new item.
        self.server.feed.entries.append(("urn:3", "third", "2030-01-01T09:00:00Z"))
        self.server.feed.version = 2
        await self.tick(60, poller)
        self.assertEqual([i["payload"]["id"] for i in self.items()],
                         ["urn:1", "urn:2", "urn:3"])
        self.assertEqual(self.counts(poller), {"polled": 3, "not_modified": 1,
                                               "new_entries": 3})
        [row] = poller.status()
        self.assertEqual((row["key"], row["state"]), ("blog/news", "ok"))

    async def test_seenAgainAfterRestart(self):
        """
        Another process, the feed answering in full again: what was
        enqueued is remembered in the ledger, not enqueued twice.
        """
        first = await self.poller()
        await self.tick(0, first)
        await first.stopService()
        self.server.feed.conditional = False
        second = await self.poller(wid="host2.0")
        await self.tick(0, second)
        self.assertEqual(len(self.server.feed.requests), 2)
        self.assertEqual([i["payload"]["id"] for i in self.items()], ["urn:1", "urn:2"])
        self.assertEqual(self.counts(second), {"polled": 1})

    async def test_oldEntriesNotImported(self):
        poller = await self.poller(self.config(retention="3d"))
        self.server.feed.entries.insert(0, ("urn:0", "old", "2029-01-01T00:00:00Z"))
        await self.tick(0, poller)
        self.assertEqual([i["payload"]["id"] for i in self.items()], ["urn:1", "urn:2"])

    async def test_twoDaemonsOnePoller(self):
        """
        Two daemons, one feed: polled once per interval, by the lease's
        holder; when it stops, the other takes over.
        """
        one = await self.poller(wid="host1.0")
        two = await self.poller(wid="host2.0")
        await self.tick(0, one, two)
        for _ in range(4):
            await self.tick(60, one, two)
        self.assertEqual(len(self.server.feed.requests), 5)
        holders = [p for p in (one, two) if p.status()]
        self.assertEqual(len(holders), 1)
        [holder] = holders
        other = two if holder is one else one
        await holder.stopService()
        await self.tick(60, other)
        self.assertEqual(len(self.server.feed.requests), 6)
        self.assertEqual(len(other.status()), 1)
        self.assertEqual(len(self.items()), 2)

    async def test_failingFeedBacksOffAndShows(self):
        poller = await self.poller()
        [feed] = poller.pollers.values()
        self.server.feed.failWith = (503, {b"retry-after": b"600"})
        await self.tick(0, poller)
        self.assertEqual(feed._timer.getTime() - self.clock.seconds(), 600)
        [row] = poller.status()
        self.assertEqual(row["state"], "failing")
        self.assertIn("1 failures in a row: HTTP 503", row["detail"])
        self.server.feed.failWith = (500, {})
        delays = []
        for _ in range(3):
            await self.tick(feed._timer.getTime() - self.clock.seconds(), poller)
            delays.append(feed._timer.getTime() - self.clock.seconds())
        # Doubling from the interval (60 s), with jitter: (60 … 480].
        self.assertTrue(60 <= delays[0] <= 120 < delays[1] <= 240 < delays[2] <= 480,
                        delays)
        self.assertEqual(self.counts(poller)["errors"], 4)
        # Seen from the master: /status.json and the dashboard's rows.
        pool = FakePool()
        pool.rows = [{"id": "host1.0", "role": "current", "pid": 1,
                      "state": "running", "restarts": 0, "last_exit": None,
                      "report": {"iomanagers": {"feedpoll": poller.status()}}}]
        [shown] = Tracker(pool, self.clock).status()["iomanagers"]["feedpoll"][
            "status"]
        self.assertEqual((shown["key"], shown["state"], shown["worker"]),
                         ("blog/news", "failing", "host1.0"))
        self.server.feed.failWith = None
        await self.tick(feed._timer.getTime() - self.clock.seconds(), poller)
        self.assertEqual(poller.status()[0]["state"], "ok")
        self.assertEqual(len(self.items()), 2)

    async def test_reloadAddsAndRemovesFeeds(self):
        poller = await self.poller()
        await self.tick(0, poller)
        config = snqconfig.parse({
            "db": {"url": f"sqlite:///{self.db}"},
            "sites": {"blog": {"feeds": {"other": self.server.url}}}})
        poller.context.handlers.config = config
        applied = await poller.reconfigService(config)
        self.assertEqual(applied, ["feed blog/news removed", "feed blog/other polled"])
        # One host: the second request waits host_interval after the first.
        await self.tick(1, poller)
        self.assertEqual(sorted(poller.pollers), ["blog/other"])
        # Another feed name: its entries are its own.
        self.assertEqual(len(self.items()), 4)


class CheckTests(SynchronousTestCase):
    def test_feedsChecked(self):
        config = snqconfig.parse({"sites": {"blog": {"feeds": {
            "a": "ftp://x/feed", "b": {"url": "http://x/", "interval": "soon"},
            "c": {"url": "http://x/", "colour": "red"}, "d": 3}}}})
        problems = []
        from snq.iomanagers import PluginError

        try:
            loadPlugin(config, "feedpoll")
        except PluginError as e:
            problems = e.problems
        self.assertEqual(problems, [
            "iomanagers.feedpoll: sites.blog.feeds.a.url: expected an http:// or "
            "https:// URL, got 'ftp://x/feed'",
            "iomanagers.feedpoll: sites.blog.feeds.b.interval: expected seconds or "
            "a duration like \"15m\", got 'soon'",
            "iomanagers.feedpoll: sites.blog.feeds.c: unknown keys colour (known: "
            "url, interval, transport)",
            "iomanagers.feedpoll: sites.blog.feeds.d: expected a URL, or a table "
            "with url (and interval, transport)"])

    def test_feedsImplyThePlugin(self):
        config = snqconfig.parse({"sites": {"blog": {"feeds": {"a": "http://x/"}}}})
        self.assertEqual(config.managers()["feedpoll"].worker, "every")


class HostGateTests(SynchronousTestCase):
    def test_oneAtATimeApart(self):
        clock = Clock()
        gate = HostGate(clock, 2.0)
        first = self.successResultOf(gate.enter("h"))
        second = gate.enter("h")
        other = gate.enter("elsewhere")
        self.assertNoResult(second)
        self.successResultOf(other)
        clock.advance(5)
        self.assertNoResult(second)
        first()
        clock.advance(1.9)
        self.assertNoResult(second)
        clock.advance(0.1)
        self.successResultOf(second)

    def test_retryAfter(self):
        self.assertEqual(retryAfter(b"120", 0), 120.0)
        self.assertEqual(retryAfter(b"Wed, 01 Jan 2030 00:01:00 GMT", START), 60.0)
        self.assertIsNone(retryAfter(b"soon", 0))
