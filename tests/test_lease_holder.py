"""
L{snq.ledger.holder.LeaseHolder} on a clock and an in-memory ledger: who
holds, when it is taken over, and that a holder always lets go before
another can have the lease.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from snq.ledger.holder import LeaseHolder
from snq.ledger.memory import MemoryLedger

TTL = 30.0


class Ledgers:
    """The worker's L{snq.ledger.LedgerService}, as the holder uses it."""

    def __init__(self, ledger):
        self.memory = ledger
        #: None: answer; an exception: fail with it; "hang": never answer.
        self.trouble = None

    def ledger(self):
        if self.trouble == "hang":
            return defer.Deferred()
        if self.trouble is not None:
            return defer.fail(self.trouble)
        return defer.succeed(self.memory)


class LeaseHolderTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.memory = MemoryLedger(self.clock)
        self.ledgers = Ledgers(self.memory)
        self.events = []

    def holder(self, owner="a"):
        holder = LeaseHolder(
            self.ledgers, "xmpp", owner, lambda: TTL,
            lambda: self.events.append((owner, "gained", self.clock.seconds())),
            lambda why: self.events.append((owner, "lost", self.clock.seconds())),
            self.clock)
        holder.startService()
        self.addCleanup(lambda: holder.running and holder.stopService())
        return holder

    def advance(self, seconds, step=0.5):
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def test_freeLeaseTakenAtStart(self):
        holder = self.holder()
        self.assertTrue(holder.holding)
        self.assertEqual(self.events, [("a", "gained", 0)])
        self.assertEqual(holder.until, TTL * 5 / 6)
        self.advance(100)
        self.assertEqual(self.events, [("a", "gained", 0)], "renewed, kept")
        self.assertEqual(self.memory.entries["xmpp"][0], "a")

    def test_standbyTakesOverWhenTheHolderLapses(self):
        """
        While another holds the lease the holder waits; once the lease has
        lapsed in the store (the other stopped renewing at 0), it takes it
        at its next ask: at most a third of the lease later.
        """
        self.successResultOf(self.memory.lease("xmpp", "other", TTL))
        holder = self.holder()
        self.advance(29.5)
        self.assertFalse(holder.holding)
        self.assertEqual(self.events, [])
        self.advance(TTL / 3)
        self.assertTrue(holder.holding)
        [(_, _, at)] = self.events
        self.assertGreaterEqual(at, TTL)
        self.assertLessEqual(at, TTL + TTL / 3)

    def test_refusedRenewalLetsGoAtOnce(self):
        holder = self.holder()
        self.clock.advance(1)
        # The store says another holds it (its clock ran ahead, say).
        self.memory.entries["xmpp"] = ("other", 1000.0)
        self.clock.advance(TTL / 3)
        self.assertFalse(holder.holding)
        self.assertEqual(self.events, [("a", "gained", 0),
                                       ("a", "lost", 1 + TTL / 3)])

    def test_failedRenewalsLetGoBeforeTheLeaseLapses(self):
        """
        Cut off from the store (asks fail, or are never answered), the
        holder gives up at the lease's end less the margin, counted from
        its last successful ask: before anyone else can take it.
        """
        for trouble in (ConnectionError("store down"), "hang"):
            self.events = []
            self.memory.entries.clear()
            holder = self.holder(owner=repr(trouble))
            start = self.clock.seconds()
            self.ledgers.trouble = trouble
            self.advance(TTL)
            [(_, _, gained), (_, _, lost)] = self.events
            self.assertEqual(gained, start)
            self.assertEqual(lost, start + TTL * 5 / 6)
            # The store lets another have it only at start + TTL.
            other = self.successResultOf(
                self.memory.lease("xmpp", "other", TTL))
            self.assertTrue(other)
            self.assertGreater(self.clock.seconds(), lost)
            self.ledgers.trouble = None
            self.memory.entries.clear()
            self.advance(TTL)
            self.assertTrue(holder.holding, "asks again once the store answers")
            holder.stopService()

    def test_lateAnswerDoesNotCount(self):
        """An answer that comes after the lease would have ended is ignored."""
        late = defer.Deferred()
        self.ledgers.ledger = lambda: late
        holder = self.holder()
        self.clock.advance(TTL * 5 / 6)
        late.callback(self.memory)
        self.assertFalse(holder.holding)
        self.assertEqual(self.events, [])

    def test_stopGivesTheLeaseBack(self):
        """
        On stop the lease is released (the other takes it at its next ask,
        not at the lapse); C{lost} is not called: the services it gated
        are stopped by their parent.
        """
        holder = self.holder()
        other = self.holder("b")
        self.assertFalse(other.holding)
        self.successResultOf(holder.stopService())
        self.assertNotIn("xmpp", self.memory.entries)
        self.clock.advance(TTL / 3)
        self.assertTrue(other.holding)
        self.assertEqual(self.events, [("a", "gained", 0),
                                       ("b", "gained", TTL / 3)])

    def test_stopWaitsForAnAskInFlight(self):
        """
        An ask the store answers after the stop began would take the lease
        for a worker that is gone: the release waits for it.
        """
        answer = defer.Deferred()
        answers = iter([answer])
        self.ledgers.ledger = lambda: next(answers, defer.succeed(self.memory))
        holder = self.holder()
        stopped = holder.stopService()
        self.assertNoResult(stopped)
        answer.callback(self.memory)
        self.successResultOf(stopped)
        self.assertNotIn("xmpp", self.memory.entries)
        self.assertEqual(self.events, [])
