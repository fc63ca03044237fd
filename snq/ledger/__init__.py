# -*- test-case-name: tests.test_ledger -*-
"""
The ledger: what daemons sharing a backend must do once among them, kept
in that backend, so that it holds across workers, daemons and hosts and
survives restarts.  A schedule's tick is fired once, a feed entry is
enqueued once, a feed has one poller at a time.

Three operations serve all of them: L{Ledger.once} (the first to claim a
name wins it until it expires), L{Ledger.lease} (held by one owner, renewed
by it, free once it lapses) and values (L{Ledger.get}, L{Ledger.put}) with
an expiry.  L{Ledger.enqueueOnce} claims names and enqueues their items
together: in one transaction (SQL) or one script (Redis) when the ledger is
the queue's own store, so that no crash can leave a name claimed without
its item or an item without its claim.

SQL keeps the table C{snq_ledger}; Redis keys C{<prefix>ledger:NAME}.  A
STOMP broker keeps nothing: with C{[queue] backend = "stomp"} the operator
names a store shared by every daemon in C{[ledger] url}, and snq refuses
to run what needs one without it (L{LedgerMissing}).
"""

from __future__ import annotations

import dataclasses
import hashlib

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from snq.config import REDIS_SCHEMES

#: Longest name kept as it is; longer ones (a feed entry id that is a long
#: URL) are kept as a hash, which the SQL column and Redis take alike.
MAX_NAME = 150
#: Seconds between two sweeps of expired SQL rows (Redis expires its keys).
PURGE_INTERVAL = 600.0


class LedgerMissing(Exception):
    """Something needs a ledger and the config names none it can use."""


def ledgerName(name: str) -> str:
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
    return f"{name[:MAX_NAME - 66]}#{digest}"


class Ledger:
    """
    The interface; every method returns a Deferred.  C{ttl} and expiries
    are seconds from now, on the clock of the process that asks: hosts
    sharing a ledger need clocks that agree to well within the shortest
    ttl (NTP does).
    """

    def open(self):
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)

    def once(self, name: str, ttl: float):
        """True for the first caller while C{name} has not expired."""
        raise NotImplementedError

    def lease(self, name: str, owner: str, ttl: float):
        """
        True if C{owner} holds C{name} for C{ttl} more seconds: taken when
        free or lapsed, renewed when C{owner} held it already.
        """
        raise NotImplementedError

    def release(self, name: str, owner: str):
        """Free C{name} if C{owner} holds it (a lease, or a claim)."""
        raise NotImplementedError

    def get(self, name: str):
        """The value put under C{name}, or None (never put, expired)."""
        raise NotImplementedError

    def put(self, name: str, value: str, ttl: float):
        raise NotImplementedError

    def purge(self):
        """Forget what has expired (where the store does not by itself)."""
        return defer.succeed(0)

    @defer.inlineCallbacks
    def enqueueOnce(self, entries, ttl: float, queue, delay: float = 0.0):
        """
        C{entries}: C{(name, item)} pairs.  Enqueue on C{queue} the items
        whose name nobody claimed before, claiming it for C{ttl}; → those
        items.  Here, for a ledger apart from the queue: claims first, and
        if the queue refuses the items their claims are given back, so the
        next try enqueues them; a crash between the two loses them.
        """
        new = []
        for name, item in entries:
            if (yield self.once(name, ttl)):
                new.append((name, item))
        if not new:
            return []
        try:
            yield queue.enqueue([item for _, item in new], delay)
        except Exception:
            for name, _ in new:
                yield self.release(name, "")
            raise
        return [item for _, item in new]


def makeLedger(config, queue, clock=None) -> Ledger:
    """
    The ledger C{config} names (C{[ledger] url}), or the queue's own store;
    L{LedgerMissing} for a STOMP queue without one.
    """
    url = config.ledger.url.reveal()
    backend = config.queue.backend
    if not url:
        if backend == "db":
            from snq.ledger.sql import SqlLedger

            return SqlLedger(queue, shared=True, clock=clock)
        if backend == "redis":
            from snq.ledger.redis import RedisLedger

            return RedisLedger(queue, shared=True, clock=clock)
        raise LedgerMissing(*checkLedger(config))
    if url.startswith(REDIS_SCHEMES):
        from snq.ledger.redis import RedisLedger
        from snq.queues.redis import RedisQueue

        if backend == "redis" and config.ledger.url == config.redis.url:
            return RedisLedger(queue, shared=True, clock=clock)
        own = dataclasses.replace(config, redis=dataclasses.replace(
            config.redis, url=config.ledger.url))
        return RedisLedger(RedisQueue(own, clock=clock), shared=False, clock=clock)
    from snq.ledger.sql import SqlLedger
    from snq.queues.db import DbQueue

    if backend == "db" and config.ledger.url == config.db.url:
        return SqlLedger(queue, shared=True, clock=clock)
    return SqlLedger(DbQueue(url, config.queue.lease, clock=clock), shared=False,
                     clock=clock)


def checkLedger(config) -> list[str]:
    """Why C{config} has no usable ledger, in words; [] when it has."""
    backend = config.queue.backend
    if config.ledger.url.reveal() or backend in ("db", "redis"):
        return []
    return [f"[queue] backend = {backend!r} keeps nothing but messages, so "
            "daemons cannot agree through it on what happens once (schedule "
            "ticks, feed entries, leases): set [ledger] url to a database or "
            "Redis that every daemon on this broker shares"]


class LedgerService(Service):
    """
    A worker's ledger, opened when first used (most workers never need
    one) and closed on stop; SQL rows that expired are swept now and then.
    """

    log = Logger()

    def __init__(self, config, queue, clock):
        self.config = config
        self.queue = queue
        self.clock = clock
        self._ledger: Ledger | None = None
        self._waiting: list[defer.Deferred] = []
        self._sweeper = LoopingCall(self._purge)
        self._sweeper.clock = clock

    def ledger(self) -> defer.Deferred:
        """Fires with the open L{Ledger} (L{LedgerMissing} if none can be)."""
        if self._ledger is not None:
            return defer.succeed(self._ledger)
        d = defer.Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            self._open()
        return d

    def _open(self):
        try:
            ledger = makeLedger(self.config, self.queue, self.clock)
        except LedgerMissing:
            self._tell(Failure())
            return

        def opened(_):
            if not self.running:
                ledger.close()
                self._tell(Failure(LedgerMissing("the worker is stopping")))
                return
            self._ledger = ledger
            self._sweeper.start(PURGE_INTERVAL, now=False)
            self._tell(ledger)

        defer.maybeDeferred(ledger.open).addCallbacks(opened, self._tell)

    def _tell(self, result):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _purge(self):
        d = self._ledger.purge()
        d.addErrback(lambda f: self.log.failure("sweeping the ledger failed", f))
        return d

    def reconfigService(self, config):
        # Where the ledger is changes only in new workers (snq.reconfig).
        self.config = config

    def stopService(self):
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()
        ledger, self._ledger = self._ledger, None
        return ledger.close() if ledger is not None else defer.succeed(None)
