# -*- test-case-name: tests.test_dispatch -*-
"""
L{Queue}, the storage interface every backend implements, and what it
hands over and reports: a L{Delivery}, a L{Depth}, a L{DeadLetter}.

A backend only stores: claiming, acknowledging, retrying later,
dead-lettering.  The rules of an item's life are the dispatcher's
(L{snq.dispatch}), once for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from snq.item import Item

if TYPE_CHECKING:
    from snq.routing import TransportFilter


@dataclass(eq=False)
class Delivery:
    """One claimed frame, as its backend handed it over."""

    frame: bytes
    #: The backend's own handle on it (a row id, a STOMP frame, …).
    token: Any = None
    #: The backend's attempt count, when it keeps one apart from the frame.
    attempts: int | None = None
    #: What the backend knows without decoding (for dead letters of bad frames).
    transport: str | None = None
    site: str | None = None
    #: Why the backend's row or message cannot become an item (a column of
    #: the wrong type, a frame over C{max_frame} left unread): it becomes a
    #: C{baditem} dead letter without being decoded.
    problem: str | None = None
    #: The broker delivered it before, to a consumer that did not settle it
    #: (one that died, or lost its connection).
    redelivered: bool = False


@dataclass(frozen=True)
class TransportDepth:
    """One transport's part of a L{Depth}; the fields mean the same."""

    ready: int
    delayed: int
    held: int
    oldest: float | None

    @property
    def waiting(self) -> int:
        """Items not done yet: due, waiting for a retry, or held."""
        return self.ready + self.delayed + self.held


@dataclass(frozen=True)
class Depth:
    """How much a backend holds, for monitors and C{snqctl check}."""

    #: Due and not claimed.
    ready: int
    #: Waiting for their time (a retry's backoff, an enqueue's delay).
    delayed: int
    #: Claimed by a worker: waiting in its window or running.
    held: int
    dead: int
    #: Seconds the oldest due item (ready or held) has been due; None when
    #: nothing is.
    oldest: float | None
    #: transport → L{TransportDepth}; None where the backend cannot tell
    #: without reading every item.
    transports: dict[str, TransportDepth] | None = None

    @classmethod
    def byTransport(cls, transports: dict[str, TransportDepth],
                    dead: int) -> Depth:
        """The whole from its parts, which a backend counted in one pass."""
        due = [t.oldest for t in transports.values() if t.oldest is not None]
        return cls(ready=sum(t.ready for t in transports.values()),
                   delayed=sum(t.delayed for t in transports.values()),
                   held=sum(t.held for t in transports.values()), dead=dead,
                   oldest=max(due) if due else None, transports=transports)


@dataclass(frozen=True)
class Cancelled:
    """What L{Queue.cancel} found."""

    #: Waiting items removed (ready or delayed).
    removed: int
    #: Items claimed by a worker, left to finish.
    running: int


@dataclass
class DeadLetter:
    id: Any
    item_id: str | None
    transport: str | None
    site: str | None
    reason: str
    error: str
    attempts: int
    died: float
    frame: bytes


class Queue:
    """
    A backend's storage.  Every method returns a Deferred.  Used by the
    dispatcher (settling items), by handlers (enqueueing) and by snqctl.
    """

    #: The IoManager that feeds a dispatcher from this backend; None = the
    #: polling L{QueueManager}.  Listening backends bring their own.
    managerClass = None
    #: Claims are leases (SQL, Redis): the master gives back a dead worker's
    #: at once (L{returnClaims}).  A broker takes back a lost connection's
    #: messages itself (STOMP).
    leased = True

    def describe(self) -> str:
        """Where the queue is, for logs (no passwords)."""
        raise NotImplementedError

    def reconfigService(self, config):
        """
        Follow a reloaded config in what can change in place (the lease,
        routing); where the queue is can only change in new worker
        processes.
        """

    def open(self):
        """Connect and create what is missing (tables, …)."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def listen(self, wake):
        """
        Call C{wake()} whenever new items may be ready, until the returned
        object's C{stopListening()} (a Deferred); None when this backend
        cannot tell, and the manager only polls.
        """
        return None

    def enqueue(self, items: list[Item], delay: float = 0.0):
        """Store new items, each due at its C{run_at}, else in C{delay} s."""
        raise NotImplementedError

    def claim(self, limit: int, transports: TransportFilter):
        """Up to C{limit} ready L{Delivery}s, leased to this worker."""
        raise NotImplementedError

    def ack(self, delivery: Delivery):
        raise NotImplementedError

    def retry(self, delivery: Delivery, item: Item, delay: float, error: str):
        """
        Put C{item} back, due in C{delay} s: with its attempts raised after
        a failure, as they were when it came before its C{run_at}.
        """
        raise NotImplementedError

    def release(self, deliveries: list[Delivery]):
        """Give back claimed, unstarted deliveries, unchanged, for others."""
        raise NotImplementedError

    def deadLetter(self, delivery: Delivery, reason: str, error: str,
                   attempts: int):
        raise NotImplementedError

    def tend(self, deliveries: list[Delivery]):
        """
        Periodic housekeeping: renew the leases of what this worker holds,
        and return others' expired leases to the queue (L{reapExpired}).
        """
        raise NotImplementedError

    def reapExpired(self):
        """
        Return the items whose lease expired to the queue, one attempt more
        (a worker, or its whole host, died holding them); → how many.
        """
        raise NotImplementedError

    def journalKey(self, delivery: Delivery) -> bytes:
        """
        What a worker's journal (L{snq.journal}) records while C{delivery}
        runs: the same bytes for the master after the worker's death (a row
        id, a lease token; for a broker, which redelivers a message under a
        new id, a digest of its body).
        """
        raise NotImplementedError

    def returnClaims(self, claimant: str, started: set[bytes]):
        """
        Give back at once all that C{claimant}, a worker that died, held:
        what its journal says it had started (L{journalKey}s) with one
        attempt more, the rest as it was.  → C{(returned, charged)}.
        """
        raise NotImplementedError

    def depth(self):
        """
        A L{Depth}, or None where the backend cannot tell (a broker that
        does not say how much it holds).
        """
        return defer.succeed(None)

    def cancel(self, itemId: str | None = None, key: str | None = None):
        """
        Remove the waiting items with this id (or envelope C{key}); those a
        worker holds run to their end.  → a L{Cancelled}.  It reads every
        waiting item: an operator's command, not a producer's.
        """
        raise NotImplementedError

    def deadList(self, limit: int = 50):
        raise NotImplementedError

    def deadShow(self, deadId):
        raise NotImplementedError

    def deadRetry(self, deadIds=None):
        """Requeue these dead letters (None: all), attempts reset; → count."""
        raise NotImplementedError

    def deadPurge(self, deadIds=None):
        raise NotImplementedError
