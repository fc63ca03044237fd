# -*- test-case-name: tests.test_db -*-
"""
The SQL backend: the C{queue_item} table StatusNet used, claimed with a
lease, plus C{queue_dead} for dead letters.

Everything but the dialect (L{snq.queues.dialects}: placeholders,
connecting, the claim statement) is one code path for every server.

Acknowledgements are grouped: while one DELETE is being committed, the next
ones gather, so a busy worker commits many items per transaction and an
idle one still commits each at once.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from snq.item import Item
from snq.queues.base import DeadLetter, Delivery, Queue, TransportFilter
from snq.queues.dialects import DIALECTS


class DbQueue(Queue):
    log = Logger()

    def __init__(self, url: str, lease: float, clock=None, claimant=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self._url = url
        self.url = urlsplit(url)
        self.dialect = DIALECTS[self.url.scheme]()
        self.lease = lease
        self.clock = clock
        #: Unique per process, so that a respawned worker with the same id
        #: never renews the leases its killed predecessor held.
        self.claimant = claimant or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.pool = None
        self._acks: list[tuple[int, defer.Deferred]] = []
        self._flushing = False

    def describe(self) -> str:
        if self.url.password:
            return self._url.replace(f":{self.url.password}@", ":***@")
        return self._url

    def open(self):
        self.pool = self.dialect.connectionPool(self.url)
        return self.pool.runInteraction(self._createSchema)

    def _createSchema(self, txn):
        for statement in self.dialect.schema:
            txn.execute(statement)

    @defer.inlineCallbacks
    def close(self):
        while self._acks or self._flushing:
            yield self._flush()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _write(self, interaction, *args):
        def transaction(txn):
            self.dialect.begin(txn)
            return interaction(txn, *args)

        return self.pool.runInteraction(transaction)

    def enqueue(self, items, delay=0.0):
        now = self.clock.seconds()
        rows = [(i.toJSON().decode("utf-8"), i.transport, i.site, i.priority,
                 i.created, now + delay, i.attempts) for i in items]
        p = self.dialect.params(7)

        def insert(txn):
            txn.executemany(
                "INSERT INTO queue_item (frame, transport, site, priority,"
                f" created, run_at, attempts) VALUES ({p})", rows)

        return self._write(insert)

    def claim(self, limit, transports: TransportFilter):
        now = self.clock.seconds()
        where, params = self._filter(transports)
        d = self._write(self.dialect.claim, self.claimant, now + self.lease,
                        now, limit, where, params)
        d.addCallback(lambda rows: [
            Delivery(frame=frame.encode("utf-8"), token=rowId,
                     attempts=attempts, transport=transport, site=site)
            for rowId, frame, transport, site, attempts, *_ in rows])
        return d

    def _filter(self, transports: TransportFilter):
        if transports.include is not None:
            names = sorted(transports.include)
            if not names:
                return " AND 1 = 0", ()
            return f" AND transport IN ({self.dialect.params(len(names))})", names
        if transports.exclude:
            names = sorted(transports.exclude)
            return (f" AND transport NOT IN ({self.dialect.params(len(names))})",
                    names)
        return "", ()

    def ack(self, delivery):
        d = defer.Deferred()
        self._acks.append((delivery.token, d))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self):
        """Delete everything acknowledged so far in one transaction."""
        if self._flushing or not self._acks:
            return defer.succeed(None)
        batch, self._acks = self._acks, []
        self._flushing = True
        p = self.dialect.placeholder

        def delete(txn):
            txn.executemany(f"DELETE FROM queue_item WHERE id = {p}",
                            [(rowId,) for rowId, _ in batch])

        def done(result):
            self._flushing = False
            for _, waiter in batch:
                if isinstance(result, Exception):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            if self._acks:
                self._flush()

        d = self._write(delete)
        d.addCallbacks(done, lambda f: done(f.value))
        return d

    def retry(self, delivery, item: Item, delay, error):
        p = self.dialect.placeholder

        def update(txn):
            txn.execute(
                f"UPDATE queue_item SET frame = {p}, attempts = {p},"
                f" run_at = {p}, claimed_by = NULL, lease_until = NULL"
                f" WHERE id = {p}",
                (item.toJSON().decode("utf-8"), item.attempts,
                 self.clock.seconds() + delay, delivery.token))

        return self._write(update)

    def release(self, deliveries):
        if not deliveries:
            return defer.succeed(None)
        p = self.dialect.placeholder

        def update(txn):
            txn.executemany(
                "UPDATE queue_item SET claimed_by = NULL, lease_until = NULL"
                f" WHERE id = {p} AND claimed_by = {p}",
                [(d.token, self.claimant) for d in deliveries])

        return self._write(update)

    def deadLetter(self, delivery, reason, error, attempts):
        p = self.dialect.placeholder
        frame = delivery.frame.decode("utf-8", "replace")
        try:
            itemId = Item.fromJSON(delivery.frame).id
        except ValueError:
            itemId = None

        def move(txn):
            txn.execute(
                "INSERT INTO queue_dead (item_id, frame, transport, site, reason,"
                f" error, attempts, died) VALUES ({self.dialect.params(8)})",
                (itemId, frame, delivery.transport, delivery.site, reason, error,
                 attempts, self.clock.seconds()))
            txn.execute(f"DELETE FROM queue_item WHERE id = {p}", (delivery.token,))

        return self._write(move)

    def tend(self, deliveries):
        now = self.clock.seconds()
        p = self.dialect.placeholder

        def renewAndReap(txn):
            txn.execute(
                f"UPDATE queue_item SET lease_until = {p} WHERE claimed_by = {p}",
                (now + self.lease, self.claimant))
            # An expired lease is a worker that died holding the item: that
            # counts as an attempt, so an item that kills every worker ends
            # in the dead letters instead of going round for ever.
            txn.execute(
                "UPDATE queue_item SET claimed_by = NULL, lease_until = NULL,"
                f" attempts = attempts + 1 WHERE lease_until < {p}", (now,))
            return txn.rowcount

        def reaped(count):
            if count and count > 0:
                self.log.info("returned {count} items whose lease expired",
                              count=count)

        return self._write(renewAndReap).addCallback(reaped)

    def deadList(self, limit=50):
        d = self.pool.runQuery(
            "SELECT id, item_id, transport, site, reason, error, attempts, died,"
            f" frame FROM queue_dead ORDER BY id DESC LIMIT {int(limit)}")
        return d.addCallback(lambda rows: [self._dead(r) for r in rows])

    def deadShow(self, deadId):
        d = self.pool.runQuery(
            "SELECT id, item_id, transport, site, reason, error, attempts, died,"
            f" frame FROM queue_dead WHERE id = {self.dialect.placeholder}",
            (deadId,))
        return d.addCallback(lambda rows: self._dead(rows[0]) if rows else None)

    @staticmethod
    def _dead(row) -> DeadLetter:
        *fields, frame = row
        return DeadLetter(*fields, frame=frame.encode("utf-8"))

    def deadRetry(self, deadIds=None):
        now = self.clock.seconds()
        where, params = self._ids(deadIds)

        def requeue(txn):
            txn.execute(f"SELECT id, frame, transport, site FROM queue_dead{where}",
                        params)
            rows = txn.fetchall()
            items = []
            for _, frame, transport, site in rows:
                try:
                    item = Item.fromJSON(frame)
                except ValueError:
                    # A frame that never decoded goes back as it came; it
                    # will be dead-lettered again, with the same reason.
                    items.append((frame, transport or "", site or "default", 0,
                                  now, now, 0))
                    continue
                item = dataclasses.replace(item, attempts=0)
                items.append((item.toJSON().decode("utf-8"), item.transport,
                              item.site, item.priority, item.created, now, 0))
            txn.executemany(
                "INSERT INTO queue_item (frame, transport, site, priority,"
                f" created, run_at, attempts) VALUES ({self.dialect.params(7)})",
                items)
            txn.executemany(
                f"DELETE FROM queue_dead WHERE id = {self.dialect.placeholder}",
                [(r[0],) for r in rows])
            return len(rows)

        return self._write(requeue)

    def deadPurge(self, deadIds=None):
        where, params = self._ids(deadIds)

        def purge(txn):
            txn.execute(f"DELETE FROM queue_dead{where}", params)
            return txn.rowcount

        return self._write(purge)

    def _ids(self, deadIds):
        if deadIds is None:
            return "", ()
        ids = [int(i) for i in deadIds]
        return f" WHERE id IN ({self.dialect.params(len(ids))})", ids
