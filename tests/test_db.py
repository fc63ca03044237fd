# -*- test-case-name: tests.test_db -*-
"""
The SQL queue on a real SQLite file.  The queue's own clock is a Clock (it
only reads the time from it), so leases and delays are driven; the queries
run in adbapi's threads on the real reactor.
"""

import json
import sqlite3

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from snq.item import Item
from snq.queues.db import DbQueue
from snq.routing import TransportFilter

ALL = TransportFilter()


class DbQueueTests(TestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1000)
        return self.open("a")

    def open(self, claimant, lease=60.0):
        queue = DbQueue(f"sqlite:///{self.path}", lease, clock=self.clock,
                        claimant=claimant)
        self.addCleanup(queue.close)
        setattr(self, claimant, queue)
        return queue.open()

    def items(self, n, transport="log", **kw):
        return [Item(transport=transport, payload=i, created=0, **kw)
                for i in range(n)]

    def rows(self, sql="SELECT id, attempts, claimed_by, run_at FROM queue_item"):
        with sqlite3.connect(self.path) as conn:
            return conn.execute(sql).fetchall()

    @defer.inlineCallbacks
    def test_schemaIsIdempotent(self):
        yield self.open("b")
        yield self.a.enqueue(self.items(1))
        yield self.open("c")
        self.assertEqual(len(self.rows()), 1)

    @defer.inlineCallbacks
    def test_claimOrderAndExclusivity(self):
        """Priority first, then FIFO; a claimed row is nobody else's."""
        yield self.a.enqueue(self.items(3))
        [urgent] = self.items(1, priority=5)
        yield self.a.enqueue([urgent])
        first = yield self.a.claim(2, ALL)
        self.assertEqual([Item.fromJSON(d.frame).payload for d in first], [0, 0])
        self.assertEqual(Item.fromJSON(first[0].frame).priority, 5)
        yield self.open("b")
        rest = yield self.b.claim(10, ALL)
        self.assertEqual([Item.fromJSON(d.frame).payload for d in rest], [1, 2])
        again = yield self.a.claim(10, ALL)
        self.assertEqual(again, [])

    @defer.inlineCallbacks
    def test_delayedItemsWait(self):
        yield self.a.enqueue(self.items(1), delay=30)
        self.assertEqual((yield self.a.claim(10, ALL)), [])
        self.clock.advance(30)
        self.assertEqual(len((yield self.a.claim(10, ALL))), 1)

    @defer.inlineCallbacks
    def test_acksGroupedAndAllDeleted(self):
        yield self.a.enqueue(self.items(500))
        deliveries = yield self.a.claim(500, ALL)
        yield defer.gatherResults([self.a.ack(d) for d in deliveries])
        self.assertEqual(self.rows(), [])

    @defer.inlineCallbacks
    def test_retryFreesAndDelays(self):
        yield self.a.enqueue(self.items(1))
        [d] = yield self.a.claim(1, ALL)
        item = Item.fromJSON(d.frame).retried()
        yield self.a.retry(d, item, 20, "HTTP 503")
        [(_, attempts, claimedBy, runAt)] = self.rows()
        self.assertEqual((attempts, claimedBy, runAt), (1, None, 1020))
        self.clock.advance(20)
        [d] = yield self.a.claim(1, ALL)
        self.assertEqual((d.attempts, Item.fromJSON(d.frame).attempts), (1, 1))

    @defer.inlineCallbacks
    def test_release(self):
        yield self.a.enqueue(self.items(2))
        deliveries = yield self.a.claim(2, ALL)
        yield self.a.release(deliveries)
        self.assertEqual([r[2] for r in self.rows()], [None, None])

    @defer.inlineCallbacks
    def test_tendRenewsOwnAndReapsExpired(self):
        """
        A worker that died leaves leases that expire; the reaper returns
        those items with one more attempt, and leaves live workers' alone.
        """
        yield self.open("dead")
        yield self.a.enqueue(self.items(2))
        yield self.a.claim(1, ALL)
        yield self.dead.claim(1, ALL)
        self.clock.advance(45)
        yield self.a.tend([])
        self.clock.advance(45)
        yield self.a.tend([])
        rows = sorted(self.rows(), key=lambda r: r[2] or "")
        self.assertEqual([(r[1], r[2]) for r in rows], [(1, None), (0, "a")])
        [d] = yield self.a.claim(5, ALL)
        self.assertEqual(d.attempts, 1)

    @defer.inlineCallbacks
    def test_transportFilter(self):
        yield self.a.enqueue(self.items(1, "log") + self.items(1, "xmppout")
                             + self.items(1, "other"))
        xmpp = yield self.a.claim(10, TransportFilter(include=frozenset(
            {"xmppout"})))
        self.assertEqual([d.transport for d in xmpp], ["xmppout"])
        main = yield self.a.claim(10, TransportFilter(exclude=frozenset(
            {"xmppout"})))
        self.assertEqual(sorted(d.transport for d in main), ["log", "other"])
        none = yield self.a.claim(10, TransportFilter(include=frozenset()))
        self.assertEqual(none, [])

    @defer.inlineCallbacks
    def test_deadLetters(self):
        yield self.a.enqueue(self.items(3, site="ex"))
        deliveries = yield self.a.claim(3, ALL)
        for d in deliveries:
            yield self.a.deadLetter(d, "rejected", "HTTP 404", 2)
        self.assertEqual(self.rows(), [])
        letters = yield self.a.deadList(2)
        self.assertEqual([(dl.reason, dl.error, dl.attempts, dl.site, dl.died)
                          for dl in letters], [("rejected", "HTTP 404", 2, "ex",
                                                1000)] * 2)
        shown = yield self.a.deadShow(letters[0].id)
        self.assertEqual(Item.fromJSON(shown.frame).payload, 2)
        self.assertIsNone((yield self.a.deadShow(99999)))
        self.assertEqual((yield self.a.deadRetry([letters[0].id])), 1)
        [d] = yield self.a.claim(5, ALL)
        self.assertEqual((d.attempts, Item.fromJSON(d.frame).attempts), (0, 0))
        self.assertEqual((yield self.a.deadPurge()), 2)
        self.assertEqual((yield self.a.deadList()), [])

    @defer.inlineCallbacks
    def test_badFrameDeadLetterKeepsRowColumns(self):
        yield self.a.open()
        with sqlite3.connect(self.path) as conn:
            conn.execute("INSERT INTO queue_item (frame, transport, site, created,"
                         " run_at) VALUES ('{broken', 'log', 'ex', 0, 0)")
        [d] = yield self.a.claim(1, ALL)
        yield self.a.deadLetter(d, "baditem", "frame is not JSON", 0)
        [dl] = yield self.a.deadList()
        self.assertEqual((dl.item_id, dl.transport, dl.site, dl.frame),
                         (None, "log", "ex", b"{broken"))

    @defer.inlineCallbacks
    def test_producerInsertWithPlainSql(self):
        """The documented INSERT, from outside snq, makes a claimable item."""
        frame = json.dumps({"transport": "log", "payload": {"hi": 1}})
        with sqlite3.connect(self.path) as conn:
            conn.execute(
                "INSERT INTO queue_item (frame, transport, site, created, run_at)"
                " VALUES (?, 'log', 'default', strftime('%s','now'), 0)", (frame,))
        [d] = yield self.a.claim(1, ALL)
        self.assertEqual(Item.fromJSON(d.frame).payload, {"hi": 1})

    @defer.inlineCallbacks
    def test_concurrentClaimersNeverShare(self):
        """Two workers (connections) claiming at once split the rows."""
        yield self.open("b")
        yield self.a.enqueue(self.items(400))
        claimed = []
        for _ in range(20):
            batches = yield defer.gatherResults([self.a.claim(15, ALL),
                                                 self.b.claim(15, ALL)])
            claimed += [d.token for batch in batches for d in batch]
        self.assertEqual(len(claimed), 400)
        self.assertEqual(len(set(claimed)), 400)

    @defer.inlineCallbacks
    def test_otherWritersWakeUs(self):
        """
        A producer's commit wakes an idle worker at once (inotify on the
        WAL); the worker's own empty claims do not, or it would spin.
        """
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        wakes = []
        listener = self.a.listen(lambda: wakes.append(1))
        self.assertIsNotNone(listener)
        yield self.a.claim(10, ALL)
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(wakes, [], "an empty claim writes nothing")
        with sqlite3.connect(self.path) as conn:
            conn.execute("INSERT INTO queue_item (frame, transport, site, created,"
                         " run_at) VALUES ('{}', 'log', 'default', 0, 0)")
        for _ in range(100):
            if wakes:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(wakes)
        yield listener.stopListening()

    def test_describeHidesPassword(self):
        q = DbQueue("sqlite:///x.sqlite", 60)
        self.assertEqual(q.describe(), "sqlite:///x.sqlite")


class AnyRowTests(TestCase):
    """
    SQLite stores anything in any column: a claim reads frames as bytes and
    takes each row on its own, so no row can fail a claim or its batch.
    """

    def setUp(self):
        self.path = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1000)
        self.queue = DbQueue(f"sqlite:///{self.path}", 60, clock=self.clock,
                             claimant="a", maxFrame=1024)
        self.addCleanup(self.queue.close)
        return self.queue.open()

    def insert(self, frame, attempts=0, runAt=0, priority=0):
        with sqlite3.connect(self.path) as conn:
            conn.execute("INSERT INTO queue_item (frame, transport, site, created,"
                         " run_at, attempts, priority) VALUES (?, 'log', 'ex', 0,"
                         " ?, ?, ?)", (frame, runAt, attempts, priority))
            return conn.execute("SELECT max(id) FROM queue_item").fetchone()[0]

    @defer.inlineCallbacks
    def test_eachBadRowAloneTheBatchRuns(self):
        good = Item(transport="log", payload=1).toJSON()
        with sqlite3.connect(self.path) as conn:
            conn.execute("INSERT INTO queue_item (frame, transport, site, created,"
                         " run_at) VALUES (CAST(X'7B22FF' AS TEXT), 'log', 'ex',"
                         " 0, 0)")
        rows = {
            "notUtf8": 1,
            "blob": self.insert(good),
            "textAttempts": self.insert(good.decode(), attempts="abc"),
            "notUtf8Attempts": self.insert(good.decode(), attempts=b"\xff"),
            "textPriority": self.insert(good.decode(), priority="high"),
            "runAtSoon": self.insert(good.decode(), runAt="soon"),
            "huge": self.insert("x" * 2000),
            "number": self.insert(42),
            "good": self.insert(good.decode()),
        }
        deliveries = yield self.queue.claim(100, ALL)
        byRow = {d.token: d for d in deliveries}
        self.assertEqual(sorted(byRow), sorted(rows.values()),
                         "one claim took every row, the odd run_at too")
        problems = {name: byRow[rowId].problem for name, rowId in rows.items()}
        self.assertEqual(problems, {
            "notUtf8": None, "blob": None, "textPriority": None, "good": None,
            "number": None,
            "textAttempts": "attempts column holds b'abc', not a non-negative "
                            "integer",
            "notUtf8Attempts": "attempts column holds b'\\xff', not a "
                               "non-negative integer",
            "runAtSoon": "run_at column holds b'soon', not UNIX seconds",
            "huge": "frame is 2000 bytes, over [queue] max_frame (1024 bytes); "
                    "left unread",
        })
        self.assertEqual(byRow[rows["notUtf8"]].frame, b'{"\xff')
        self.assertEqual(byRow[rows["blob"]].frame, good)
        self.assertEqual(byRow[rows["huge"]].frame, b"")
        self.assertEqual(byRow[rows["number"]].frame, b"42", "TEXT affinity")
        self.assertEqual(self.queue.journalKey(byRow[rows["good"]]),
                         b"%d" % rows["good"])

    @defer.inlineCallbacks
    def test_deadLetterKeepsTheRowByteForByte(self):
        with sqlite3.connect(self.path) as conn:
            conn.execute("INSERT INTO queue_item (frame, transport, site, created,"
                         " run_at) VALUES (CAST(X'7B22FF' AS TEXT), CAST(X'6CFF'"
                         " AS TEXT), 'ex', 0, 0)")
        huge = self.insert("y" * 5000)
        deliveries = yield self.queue.claim(10, ALL)
        for d in deliveries:
            yield self.queue.deadLetter(d, "baditem", "why", 0)
        letters = yield self.queue.deadList()
        self.assertEqual(sorted((d.frame, d.transport) for d in letters),
                         [(b"y" * 5000, "log"),
                          (b'{"\xff', "l\N{REPLACEMENT CHARACTER}")])
        shown = yield self.queue.deadShow(letters[0].id)
        self.assertEqual(shown.frame, letters[0].frame)
        with sqlite3.connect(self.path) as conn:
            self.assertEqual(conn.execute(
                "SELECT count(*) FROM queue_item").fetchone()[0], 0)
        self.assertTrue(huge)
        # Back as they were: they die again the same way, nothing is lost.
        self.assertEqual((yield self.queue.deadRetry()), 2)
        again = yield self.queue.claim(10, ALL)
        self.assertEqual(sorted(d.frame for d in again),
                         [b"", b'{"\xff'])

    @defer.inlineCallbacks
    def test_deadWorkersClaimsBackChargingOnlyTheRunning(self):
        frames = [Item(transport="log", payload=n).toJSON().decode()
                  for n in range(4)]
        ids = [self.insert(f) for f in frames]
        deliveries = yield self.queue.claim(3, ALL)
        other = DbQueue(f"sqlite:///{self.path}", 60, clock=self.clock,
                        claimant="b")
        self.addCleanup(other.close)
        yield other.open()
        [theirs] = yield other.claim(10, ALL)
        returned = yield other.returnClaims(
            "a", {self.queue.journalKey(deliveries[0]), b"999"})
        self.assertEqual(returned, (3, 1))
        with sqlite3.connect(self.path) as conn:
            rows = conn.execute("SELECT id, attempts, claimed_by, lease_until"
                                " FROM queue_item ORDER BY id").fetchall()
        self.assertEqual(rows, [(ids[0], 1, None, None), (ids[1], 0, None, None),
                                (ids[2], 0, None, None),
                                (ids[3], 0, "b", 1060.0)])
        self.assertEqual(theirs.token, ids[3])
