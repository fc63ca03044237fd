# -*- test-case-name: tests.test_dispatch -*-
"""
An in-process queue with the same contract as the real ones, for tests and
for embedding snq in a program's own test suite.  Nothing survives the
process, so it is never a configurable backend.
"""

import collections
import itertools

from twisted.internet import defer

from snq.queues.interface import DeadLetter, Delivery, Depth, Queue, TransportDepth


class MemoryQueue(Queue):
    def __init__(self, clock, lease=60.0):
        self.clock = clock
        self.lease = lease
        self._ids = itertools.count(1)
        #: row id → dict(frame, transport, site, priority, run_at, attempts,
        #: lease_until or None)
        self.rows = {}
        self.dead: dict[int, DeadLetter] = {}
        self.opened = False

    def describe(self):
        return "memory"

    def open(self):
        self.opened = True
        return defer.succeed(None)

    def close(self):
        self.opened = False
        return defer.succeed(None)

    def put(self, frame: bytes, transport="", site="default", priority=0,
            attempts=0, delay=0.0):
        """Store a raw frame, as a producer in another language would."""
        rowId = next(self._ids)
        self.rows[rowId] = dict(frame=frame, transport=transport, site=site,
                                priority=priority, attempts=attempts,
                                run_at=self.clock.seconds() + delay,
                                lease_until=None)
        return rowId

    def enqueue(self, items, delay=0.0):
        now = self.clock.seconds()
        for item in items:
            self.put(item.toJSON(), item.transport, item.site, item.priority,
                     item.attempts, item.dueAt(now, delay) - now)
        return defer.succeed(None)

    def claim(self, limit, transports):
        now = self.clock.seconds()
        ready = sorted(
            (rowId for rowId, r in self.rows.items()
             if r["lease_until"] is None and r["run_at"] <= now
             and transports.accepts(r["transport"])
             and transports.site in (None, r["site"])),
            key=lambda rowId: (-self.rows[rowId]["priority"], rowId))[:limit]
        deliveries = []
        for rowId in ready:
            row = self.rows[rowId]
            row["lease_until"] = now + self.lease
            deliveries.append(Delivery(frame=row["frame"], token=rowId,
                                       attempts=row["attempts"],
                                       transport=row["transport"],
                                       site=row["site"]))
        return defer.succeed(deliveries)

    def ack(self, delivery):
        del self.rows[delivery.token]
        return defer.succeed(None)

    def retry(self, delivery, item, delay, error):
        row = self.rows[delivery.token]
        row.update(frame=item.toJSON(), attempts=item.attempts,
                   run_at=self.clock.seconds() + delay, lease_until=None,
                   error=error)
        return defer.succeed(None)

    def release(self, deliveries):
        for delivery in deliveries:
            self.rows[delivery.token]["lease_until"] = None
        return defer.succeed(None)

    def deadLetter(self, delivery, reason, error, attempts):
        row = self.rows.pop(delivery.token)
        deadId = next(self._ids)
        self.dead[deadId] = DeadLetter(
            id=deadId, item_id=None, transport=row["transport"],
            site=row["site"], reason=reason, error=error, attempts=attempts,
            died=self.clock.seconds(), frame=row["frame"])
        return defer.succeed(None)

    def tend(self, deliveries):
        now = self.clock.seconds()
        held = {d.token for d in deliveries}
        for rowId, row in self.rows.items():
            if rowId in held:
                row["lease_until"] = now + self.lease
            elif row["lease_until"] is not None and row["lease_until"] < now:
                row.update(lease_until=None, attempts=row["attempts"] + 1)
        return defer.succeed(None)

    def reapExpired(self):
        return self.tend([])

    def journalKey(self, delivery):
        return b"%d" % delivery.token

    def returnClaims(self, claimant, started):
        """One process's queue: every claim is C{claimant}'s."""
        count = charged = 0
        for rowId, row in self.rows.items():
            if row["lease_until"] is not None:
                count += 1
                if b"%d" % rowId in started:
                    charged += 1
                    row["attempts"] += 1
                row["lease_until"] = None
        return defer.succeed((count, charged))

    def depth(self):
        now = self.clock.seconds()
        byTransport = collections.defaultdict(list)
        for row in self.rows.values():
            byTransport[row["transport"]].append(row)
        transports = {}
        for transport, rows in byTransport.items():
            free = [r["run_at"] for r in rows if r["lease_until"] is None]
            ready = sum(runAt <= now for runAt in free)
            # Claimed rows were due when claimed.
            due = [r["run_at"] for r in rows if r["run_at"] <= now]
            transports[transport] = TransportDepth(
                ready=ready, delayed=len(free) - ready,
                held=len(rows) - len(free),
                oldest=now - min(due) if due else None)
        return defer.succeed(Depth.byTransport(transports, len(self.dead)))

    def deadList(self, limit=50):
        return defer.succeed(sorted(self.dead.values(),
                                    key=lambda d: -d.id)[:limit])

    def deadShow(self, deadId):
        return defer.succeed(self.dead.get(deadId))

    def deadRetry(self, deadIds=None):
        ids = list(self.dead) if deadIds is None else deadIds
        for deadId in ids:
            dl = self.dead.pop(deadId)
            self.put(dl.frame, dl.transport, dl.site)
        return defer.succeed(len(ids))

    def deadPurge(self, deadIds=None):
        ids = list(self.dead) if deadIds is None else deadIds
        for deadId in ids:
            del self.dead[deadId]
        return defer.succeed(len(ids))
