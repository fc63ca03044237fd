# -*- test-case-name: tests.test_testing -*-
"""
Helpers for testing handlers, in trial or pytest alike: run a handler on
an item in-process and get the outcome the daemon would settle it with
(L{runHandler}), a queue that records what a handler enqueues
(L{RecordingQueue}), and a clock the test moves (L{FakeClock}).

The item goes through the daemon's own L{Dispatcher}: returning, raising,
L{Retry}, L{Reject}, timeouts, retry delays and attempt limits mean here
what they mean in a worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from snq import config as snqconfig
from snq.dispatch import Dispatcher
from snq.handlers import HandlerRegistry, QueueHandler, Reject, Retry
from snq.item import DEFAULT_SITE, Item
from snq.queues.interface import Delivery
from snq.queues.memory import MemoryQueue

__all__ = ["FakeClock", "Outcome", "RecordingQueue", "Reject", "Retry",
           "StillRunning", "runHandler", "runHandlerAsync"]

#: Where a L{FakeClock} starts: a plausible "now", not 1970.
START = 1_800_000_000.0


class FakeClock(Clock):
    """
    Twisted's L{Clock}, starting at L{START}: time moves only when the
    test calls C{advance(seconds)}.
    """

    def __init__(self, start: float = START):
        super().__init__()
        self.rightNow = start


class RecordingQueue(MemoryQueue):
    """
    The queue a handler's C{self.context} enqueues on, in memory:
    C{enqueued} lists the items, in order, each with its C{run_at} set
    when the handler delayed it.
    """

    def __init__(self, clock=None):
        super().__init__(clock if clock is not None else FakeClock())
        self.enqueued: list[Item] = []
        #: Row id → how the dispatcher settled it: (method, arguments).
        self.settled: dict = {}

    def enqueue(self, items, delay=0.0):
        now = self.clock.seconds()
        for item in items:
            due = item.dueAt(now, delay)
            self.enqueued.append(item if due <= now or item.run_at is not None
                                 else dataclasses.replace(item, run_at=due))
        return super().enqueue(items, delay)

    def ack(self, delivery):
        self.settled[delivery.token] = ("ack", ())
        return super().ack(delivery)

    def retry(self, delivery, item, delay, error):
        self.settled[delivery.token] = ("retry", (delay, error))
        return super().retry(delivery, item, delay, error)

    def deadLetter(self, delivery, reason, error, attempts):
        self.settled[delivery.token] = ("deadLetter", (reason, error))
        return super().deadLetter(delivery, reason, error, attempts)


@dataclass(frozen=True)
class Outcome:
    """
    How the daemon would settle the item, C{kind}:

      - C{"done"}: acknowledged.
      - C{"retry"}: back in C{delay} seconds: the handler raised L{Retry},
        returned False, or ran past its timeout, or the item's site is not
        under C{[sites]} (yet); C{error} says which.  Also when it raised
        L{snq.handlers.Defer}, which charges no attempt (C{error} starts
        with "deferred:").
      - C{"error"}: back in C{delay} seconds: the handler raised
        C{failure} (the worker logs its traceback).
      - C{"rejected"}: dead-lettered at once: the handler raised L{Reject};
        C{error} is its message.
      - C{"dead"}: dead-lettered for another C{reason}: C{"retries"} (that
        was its last attempt; C{failure} is set if it raised),
        C{"badsite"} (a site not under C{[sites]}, and that was its last
        attempt).
    """

    kind: str
    item: Item
    delay: float | None = None
    error: str | None = None
    failure: Failure | None = None
    reason: str | None = None


class StillRunning(Exception):
    """
    The handler waits for something the fake clock does not bring (the
    network, a thread): use L{runHandlerAsync} from a trial test.
    """


def runHandler(handler: type[QueueHandler], payload=None, **kwargs) -> Outcome:
    """
    Run C{handler} on an item of C{payload} and return its L{Outcome}.
    The fake clock is moved on to each timer the handler (or its timeout)
    set, until the item is settled.  Keyword arguments: as
    L{runHandlerAsync}.
    """
    run = _Run(handler, payload, **kwargs)
    clock = run.clock
    if not hasattr(clock, "advance"):
        raise TypeError("runHandler drives a FakeClock; with another clock, "
                        "use runHandlerAsync")
    results = []
    run.start().addBoth(results.append)
    while not results and clock.getDelayedCalls():
        due = min(call.getTime() for call in clock.getDelayedCalls())
        clock.advance(max(0.0, due - clock.seconds()))
    if not results:
        raise StillRunning(f"{handler.__name__} is still running, waiting for "
                           "something other than the clock: use "
                           "runHandlerAsync in a trial test")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def runHandlerAsync(handler: type[QueueHandler], payload=None, *,
                    site: str = DEFAULT_SITE, config=None, attempts: int = 0,
                    key: str | None = None, transport: str | None = None,
                    queue: RecordingQueue | None = None,
                    clock=None) -> defer.Deferred:
    """
    Run C{handler} on an item of C{payload}: a Deferred that fires with its
    L{Outcome}, for handlers that wait on the reactor (a trial test can
    return or await it).

    C{config}: a L{snq.config.Config}, or a dict shaped like the TOML
    file (C{{"sites": {"default": {...}}}}); C{attempts}: how many times
    it failed before; C{transport}: when the handler class sets none;
    C{queue}: a L{RecordingQueue} to keep what the handler enqueues;
    C{clock}: the handler's C{self.context.clock} (a L{FakeClock} by
    default).
    """
    return _Run(handler, payload, site=site, config=config, attempts=attempts,
                key=key, transport=transport, queue=queue, clock=clock).start()


class _Run:
    """One item through a dispatcher of its own."""

    def __init__(self, handler, payload, *, site=DEFAULT_SITE, config=None,
                 attempts=0, key=None, transport=None, queue=None, clock=None):
        self.transport = transport or handler.transport
        if not self.transport:
            raise ValueError(f"{handler.__name__} sets no transport: pass "
                             "transport=")
        if not isinstance(config, snqconfig.Config):
            config = snqconfig.parse(config or {}, "runHandler config")
        if clock is None:
            clock = queue.clock if queue is not None else FakeClock()
        self.clock = clock
        self.queue = queue if queue is not None else RecordingQueue(clock)
        self.config = config
        self.events: list[dict] = []
        self.dispatcher = Dispatcher(
            self.queue, HandlerRegistry({self.transport: handler}), config,
            clock=clock, runBlocking=defer.maybeDeferred)
        # What the worker would log goes to the Outcome, not to the test's
        # log, where trial would count a handler's exception as an error.
        self.dispatcher.log = Logger(namespace="snq.dispatch.Dispatcher",
                                     observer=self.events.append)
        self.item = Item(transport=self.transport, payload=payload, site=site,
                         attempts=attempts, key=key, created=clock.seconds(),
                         priority=config.transport(self.transport).priority)

    def start(self) -> defer.Deferred:
        item, queue = self.item, self.queue
        row = queue.put(item.toJSON(), item.transport, item.site, item.priority,
                        item.attempts)
        queue.rows[row]["lease_until"] = self.clock.seconds() + queue.lease
        d = self.dispatcher.dispatch(Delivery(
            frame=item.toJSON(), token=row, attempts=item.attempts,
            transport=item.transport, site=item.site))
        d.addCallback(lambda _: self._outcome(row))
        return d.addCallback(self._stopped)

    def _stopped(self, outcome):
        d = self.dispatcher.stopHandlers()
        return d.addCallback(lambda _: outcome)

    def _outcome(self, row) -> Outcome:
        method, args = self.queue.settled.pop(row)
        failure = next((e["log_failure"] for e in self.events
                        if "log_failure" in e and e.get("id") == self.item.id),
                       None)
        if method == "ack":
            return Outcome("done", self.item)
        if method == "retry":
            delay, error = args
            return Outcome("error" if failure else "retry", self.item,
                           delay=delay, error=error, failure=failure)
        reason, error = args
        return Outcome("rejected" if reason == "rejected" else "dead",
                       self.item, error=error, failure=failure, reason=reason)
