# -*- test-case-name: tests.test_dispatcher -*-
"""
What every backend shares: the L{Queue} store interface, the L{Dispatcher}
that runs one item's life (decode, route, limit, run, settle), and the
L{QueueManager} that keeps the dispatcher fed.

A backend supplies only storage: claiming, acknowledging, retrying later,
dead-lettering.  The rules of an item's life live here, once.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from snq.handlers import HandlerError, HandlerRegistry, Reject, Retry
from snq.iomanager import PollingManager
from snq.item import DEFAULT_SITE, BadItem, Item
from snq.stats import Stats


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


@dataclass(frozen=True)
class TransportFilter:
    """
    Which transports a worker claims: those in C{include}, or, when C{include}
    is None (the "main" group is active, which catches every transport no
    other group claims), all but those in C{exclude}.
    """

    include: frozenset | None = None
    exclude: frozenset = field(default_factory=frozenset)
    #: Only this site's items (a daemon run with C{--site}); None = any.
    site: str | None = None
    #: The groups it stands for: brokers consume their queues by name.
    groups: tuple = ()

    @classmethod
    def forGroups(cls, groups, groupOf: dict[str, str],
                  site: str | None = None) -> TransportFilter:
        if "main" in groups:
            return cls(exclude=frozenset(
                t for t, g in groupOf.items() if g not in groups),
                site=site, groups=tuple(groups))
        return cls(include=frozenset(t for t, g in groupOf.items() if g in groups),
                   site=site, groups=tuple(groups))

    def accepts(self, transport: str) -> bool:
        if self.include is not None:
            return transport in self.include
        return transport not in self.exclude


def consumedSpecs(groups, breakouts, site: str | None = None) -> list[str]:
    """
    The broker queues (or Redis lists), as group names and breakout specs,
    that a worker of C{groups} consumes: the groups' own and their
    breakouts.  With C{site}, only that site's breakouts: a group's queue
    carries every site's items.
    """
    ours = sorted(b for b in breakouts if b.split("/", 1)[0] in groups)
    if site is None:
        return [*groups, *ours]
    return [b for b in ours if b.count("/") == 2 and b.rsplit("/", 1)[1] == site]


class Routing:
    """
    Where an item goes on a broker (a STOMP queue, a Redis list), as a group
    name or breakout spec: the most specific breakout of its transport (and
    site), else its transport's group: C{[transports.NAME] group}, else its
    handler's, else C{main}.
    """

    log = Logger()

    def __init__(self, config):
        self.config = config
        self.breakouts = frozenset(config.queue.breakout)
        self._registry = None

    def registry(self) -> HandlerRegistry:
        """The handlers, for their groups; loaded when first needed."""
        if self._registry is None:
            try:
                self._registry = HandlerRegistry.load(self.config.handlers)
            except HandlerError as e:
                self.log.warn("routing without the configured handlers: {why}",
                              why=e)
                self._registry = HandlerRegistry.load({})
        return self._registry

    def groupOf(self, transport: str) -> str:
        return self.registry().groupOf(transport,
                                       self.config.transport(transport).group)

    def route(self, transport: str, site: str) -> str:
        group = self.groupOf(transport)
        for spec in (f"{group}/{transport}/{site}", f"{group}/{transport}"):
            if spec in self.breakouts:
                return spec
        return group


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

    def describe(self) -> str:
        """Where the queue is, for logs (no passwords)."""
        raise NotImplementedError

    def reconfigure(self, config):
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
        raise NotImplementedError

    def claim(self, limit: int, transports: TransportFilter):
        """Up to C{limit} ready L{Delivery}s, leased to this worker."""
        raise NotImplementedError

    def ack(self, delivery: Delivery):
        raise NotImplementedError

    def retry(self, delivery: Delivery, item: Item, delay: float, error: str):
        """Put C{item} (attempts already raised) back, due in C{delay} s."""
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
        and return others' expired leases to the queue.
        """
        raise NotImplementedError

    def depth(self):
        """
        A L{Depth}, or None where the backend cannot tell (a broker that
        does not say how much it holds).
        """
        return defer.succeed(None)

    def deadList(self, limit: int = 50):
        raise NotImplementedError

    def deadShow(self, deadId):
        raise NotImplementedError

    def deadRetry(self, deadIds=None):
        """Requeue these dead letters (None: all), attempts reset; → count."""
        raise NotImplementedError

    def deadPurge(self, deadIds=None):
        raise NotImplementedError


def backoff(attempts: int, base: float, ceiling: float, rng=random) -> float:
    """
    Exponential backoff with "equal jitter": half the delay is fixed, so a
    retry never comes at once, and half random, so a burst of failures does
    not come back as a burst.
    """
    delay = min(ceiling, base * 2 ** max(attempts - 1, 0))
    return delay / 2 + rng.uniform(0, delay / 2)


class HandlerContext:
    """What a handler may use of the daemon: config, enqueueing, the clock."""

    def __init__(self, config, queue: Queue, stats: Stats, clock):
        self.config = config
        self.queue = queue
        self.stats = stats
        self.clock = clock
        #: Site → its XmppManager, in a worker that runs the "xmpp" group.
        self.xmppManagers: dict = {}

    def siteConfig(self, site: str) -> dict:
        return self.config.siteConfig(site)

    def xmpp(self, site: str):
        """The XmppManager that serves C{site} in this worker, or None."""
        return self.xmppManagers.get(self.config.xmppSite(site))

    def item(self, transport: str, payload, site: str = DEFAULT_SITE,
             priority: int | None = None) -> Item:
        if priority is None:
            priority = self.config.transport(transport).priority
        return Item(transport=transport, payload=payload, site=site,
                    priority=priority, created=self.clock.seconds())

    def enqueue(self, transport: str, payload, site: str = DEFAULT_SITE,
                priority: int | None = None, delay: float = 0.0):
        """Put a new item on the queue; fires when it is stored."""
        return self.enqueueItems([self.item(transport, payload, site, priority)],
                                 delay)

    def enqueueItems(self, items: list[Item], delay: float = 0.0):
        """Store several items at once (in one transaction where there is one)."""

        def counted(_):
            for item in items:
                self.stats.count("enqueued", item.transport, item.site)

        return self.queue.enqueue(items, delay).addCallback(counted)


class Dispatcher:
    """
    Runs claimed deliveries through their handlers and settles each one
    exactly once: acknowledged, retried later, or dead-lettered.

    At most C{concurrency} items run at once, and at most a transport's own
    C{concurrency} of that transport, so one slow remote cannot take every
    slot; the rest wait in arrival order.
    """

    log = Logger()

    def __init__(self, queue: Queue, registry: HandlerRegistry, config,
                 stats: Stats | None = None, clock=None, rng=random,
                 onSettled=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.queue = queue
        self.config = config
        self.stats = stats or Stats()
        self.clock = clock
        self.rng = rng
        self.context = HandlerContext(config, queue, self.stats, clock)
        self.handlers = {name: cls(self.context)
                         for name, cls in registry.classes.items()}
        #: Handler → its items waiting or running.
        self._uses: collections.Counter = collections.Counter()
        #: Handlers a reconfiguration replaced or removed while they still
        #: had items: each is stopped once its last one is settled.
        self._retired: set = set()
        #: Called after each settled item: the manager claims more.
        self.onSettled = onSettled
        #: Also called after each settled item, for whoever else counts
        #: them (the worker's memory watch).
        self.settledHooks: list = []
        self.held: set[Delivery] = set()
        self._waiting: collections.deque = collections.deque()
        self._running: collections.Counter = collections.Counter()
        self._drained: list[defer.Deferred] = []

    @property
    def running(self) -> int:
        return sum(self._running.values())

    def runningTransports(self) -> list[str]:
        """The transports of the items running now, for monitors."""
        return sorted(t for t, n in self._running.items() if n)

    def dispatch(self, delivery: Delivery) -> defer.Deferred:
        """Fires (never fails) once the delivery has been settled."""
        self.held.add(delivery)
        done = defer.Deferred()
        try:
            item = self._decode(delivery)
        except BadItem as e:
            self._settle(self._deadLetter(delivery, None, "baditem", str(e)),
                         delivery, done)
            return done
        sites = self.config.knownSites()
        if sites is not None and item.site not in sites:
            reason = f"unknown site {item.site!r} (not under [sites])"
            self._settle(self._deadLetter(delivery, item, "badsite", reason),
                         delivery, done)
            return done
        handler = self.handlers.get(item.transport)
        if handler is None:
            reason = f"no handler for transport {item.transport!r}"
            self._settle(self._deadLetter(delivery, item, "badhandler", reason),
                         delivery, done)
            return done
        limit = self.config.maxRetries(item.transport)
        if item.attempts > limit:
            # A lease that expired too often: the item keeps killing its
            # workers, so it must not come round again.
            error = f"{item.attempts} attempts, limit {limit} (leases expired)"
            self._settle(self._deadLetter(delivery, item, "retries", error),
                         delivery, done)
            return done
        # The handler it was accepted for runs it, even if a reconfiguration
        # replaces that handler meanwhile.
        self._uses[handler] += 1
        done.addBoth(self._used, handler)
        self._waiting.append((delivery, item, done, handler))
        self._pump()
        return done

    def reconfigure(self, config, registry: HandlerRegistry) -> list[str]:
        """
        Take C{config} in place: limits, retries and sites are read from it
        at use.  Transports that gained a handler get one; a handler whose
        class changed is replaced, and one that is gone is stopped once its
        items are done.  → what changed, in words.
        """
        self.config = config
        self.context.config = config
        applied = []
        for name in sorted(self.handlers.keys() | registry.classes.keys()):
            old, cls = self.handlers.get(name), registry.classes.get(name)
            if old is not None and type(old) is cls:
                continue
            if old is not None:
                del self.handlers[name]
                self._retire(old)
            if cls is not None:
                self.handlers[name] = cls(self.context)
            applied.append(f"handler {name} " + (
                "added" if old is None else "removed" if cls is None
                else "replaced"))
        # A higher limit lets waiting items start now.
        self._pump()
        return applied

    def _retire(self, handler):
        if self._uses[handler]:
            self._retired.add(handler)
        else:
            self._stopHandler(handler)

    def _used(self, result, handler):
        self._uses[handler] -= 1
        if not self._uses[handler]:
            del self._uses[handler]
            if handler in self._retired:
                self._retired.discard(handler)
                self._stopHandler(handler)
        return result

    def _stopHandler(self, handler):
        d = defer.maybeDeferred(handler.stop)
        d.addErrback(lambda f: self.log.failure("stopping {handler} failed", f,
                                                handler=handler))
        return d

    def releaseWaiting(self, which=None) -> defer.Deferred:
        """
        Hand back what has not started (or of it, the deliveries for which
        C{which(delivery)} is true), so other workers can take it.
        """
        waiting, kept = [], collections.deque()
        for entry in self._waiting:
            (waiting if which is None or which(entry[0]) else kept).append(entry)
        self._waiting = kept
        for delivery, _, done, _ in waiting:
            self.held.discard(delivery)
            done.callback(None)
        d = self.queue.release([delivery for delivery, _, _, _ in waiting])
        d.addErrback(lambda f: self.log.failure("releasing items failed", f))
        return d

    def drain(self, which=None) -> defer.Deferred:
        """
        Fires when nothing is held any more (or nothing for which
        C{which(delivery)} is true).
        """
        d = defer.Deferred()
        self._drained.append((which, d))
        self._fireDrained()
        return d

    def _fireDrained(self):
        for entry in list(self._drained):
            which, d = entry
            if d.called:  # Given up on (a timeout).
                self._drained.remove(entry)
            elif not any(which is None or which(h) for h in self.held):
                self._drained.remove(entry)
                d.callback(None)

    def stopHandlers(self) -> defer.Deferred:
        handlers = [*self.handlers.values(), *self._retired]
        self._retired.clear()
        return defer.gatherResults(
            [defer.maybeDeferred(h.stop) for h in handlers])

    def _decode(self, delivery: Delivery) -> Item:
        item = Item.fromJSON(delivery.frame)
        if delivery.attempts is not None and delivery.attempts != item.attempts:
            item = dataclasses.replace(item, attempts=delivery.attempts)
        return item

    def _pump(self):
        limit = self.config.queue.concurrency
        blocked = set()
        index = 0
        while self.running < limit and index < len(self._waiting):
            delivery, item, done, handler = self._waiting[index]
            own = self.config.transport(item.transport).concurrency
            if item.transport in blocked or (
                    own and self._running[item.transport] >= own):
                blocked.add(item.transport)
                index += 1
                continue
            del self._waiting[index]
            self._start(delivery, item, done, handler)

    def _start(self, delivery: Delivery, item: Item, done: defer.Deferred,
               handler):
        self._running[item.transport] += 1
        started = self.clock.seconds()
        d = self._call(item, handler)
        timeout = self._timeout(item.transport, handler)
        timer = None
        if timeout:
            # Cancelling surfaces as whatever the handler's library raises
            # (treq: ResponseNeverReceived), so remember that we did it.
            timer = self.clock.callLater(timeout, d.cancel)

        def finished(result):
            # The slot is free once the handler is; settling needs none.
            timedOut = timer is not None and not timer.active()
            if timer is not None and not timedOut:
                timer.cancel()
            self._running[item.transport] -= 1
            self.stats.timing(item.transport, self.clock.seconds() - started)
            self._pump()
            return self._outcome(result, delivery, item,
                                 timeout if timedOut else None)

        d.addBoth(finished)
        self._settle(d, delivery, done)

    def _timeout(self, transport: str, handler) -> float:
        return self.config.transport(transport).timeout or handler.timeout

    def _call(self, item: Item, handler) -> defer.Deferred:
        if handler.blocking:
            return threads.deferToThread(handler.handle, item)
        try:
            result = handler.handle(item)
        except BaseException:
            return defer.fail()
        if inspect.iscoroutine(result):
            return defer.Deferred.fromCoroutine(result)
        return defer.maybeDeferred(lambda: result)

    def _outcome(self, result, delivery: Delivery, item: Item,
                 timedOut: float | None):
        if timedOut is not None:
            return self._failed(delivery, item, f"timed out after {timedOut:g} s")
        if not isinstance(result, Failure):
            if result is True or result is None:
                self.stats.count("handled", item.transport, item.site)
                return self.queue.ack(delivery)
            return self._failed(delivery, item, f"handler returned {result!r}")
        if result.check(Reject):
            reason = str(result.value) or "rejected by the handler"
            return self._deadLetter(delivery, item, "rejected", reason)
        error = f"{result.type.__name__}: {result.getErrorMessage()}"
        if result.check(Retry):
            self.log.warn("{transport} item {id} failed (attempt {n}): {error}",
                          transport=item.transport, id=item.id,
                          n=item.attempts + 1, error=error)
        else:
            self.log.failure("{transport} item {id} failed (attempt {n})",
                             result, transport=item.transport, id=item.id,
                             n=item.attempts + 1)
        return self._failed(delivery, item, error)

    def _failed(self, delivery: Delivery, item: Item, error: str):
        self.stats.count("error", item.transport, item.site)
        retried = item.retried()
        limit = self.config.maxRetries(item.transport)
        if retried.attempts > limit:
            return self._deadLetter(
                delivery, retried, "retries",
                f"gave up after {retried.attempts} attempts; last error: {error}")
        delay = backoff(retried.attempts, self.config.queue.retry_delay,
                        self.config.queue.retry_max_delay, self.rng)
        self.stats.count("requeued", item.transport, item.site)
        return self.queue.retry(delivery, retried, delay, error)

    def _deadLetter(self, delivery: Delivery, item: Item | None, kind: str,
                    error: str):
        """
        C{kind} is the reason's short name and, for C{baditem},
        C{badhandler} and C{badsite}, the counter bumped; every dead letter
        counts as C{deadletter} too.
        """
        transport = item.transport if item else delivery.transport
        site = item.site if item else delivery.site
        attempts = item.attempts if item else (delivery.attempts or 0)
        if kind in ("baditem", "badhandler", "badsite"):
            self.stats.count(kind, transport or "", site or "")
        self.stats.count("deadletter", transport or "", site or "")
        self.log.warn("dead letter ({kind}) {transport} {id}: {error}",
                      kind=kind, transport=transport,
                      id=item.id if item else delivery.token, error=error)
        self._writeDeadFile(delivery, item, kind, error, attempts)
        return self.queue.deadLetter(delivery, kind, error, attempts)

    def _writeDeadFile(self, delivery, item, kind, error, attempts):
        """StatusNet's dead-letter files, for operators who grep."""
        directory = self.config.queue.dead_letter_dir
        if not directory:
            return
        name = f"{time.time():.6f}-{item.id if item else os.urandom(6).hex()}.json"
        record = {"reason": kind, "error": error, "attempts": attempts,
                  "frame": delivery.frame.decode("utf-8", "replace")}
        try:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, name), "w") as f:
                json.dump(record, f)
        except OSError:
            self.log.failure("cannot write dead letter file in {dir}",
                             dir=directory)

    def _settle(self, d: defer.Deferred, delivery: Delivery,
                done: defer.Deferred):
        def failed(failure):
            # The store refused the outcome (connection lost, …).  The lease
            # will expire and the item come back: at least once, not lost.
            self.log.failure("settling an item failed; its lease will expire",
                             failure)

        def settled(_):
            self.held.discard(delivery)
            done.callback(None)
            if self._drained:
                self._fireDrained()
            if self.onSettled is not None:
                self.onSettled()
            for hook in self.settledHooks:
                hook()

        d.addErrback(failed)
        d.addCallback(settled)


def describeFilter(transports: TransportFilter) -> str:
    """A filter in words, for logs."""
    if transports.include is not None:
        what = ", ".join(sorted(transports.include)) or "nothing"
    elif transports.exclude:
        what = "all transports but " + ", ".join(sorted(transports.exclude))
    else:
        what = "all transports"
    return what + (f" of site {transports.site}" if transports.site else "")


class QueueManager(PollingManager):
    """
    Keeps a dispatcher fed from a polling backend: claims while fewer than
    C{prefetch} items are held, renews held leases, and on stop gives back
    what has not started and waits (at most C{kill_time}) for what has.
    """

    def __init__(self, queue: Queue, dispatcher: Dispatcher, config,
                 transports: TransportFilter, clock=None):
        super().__init__(config.queue.poll_interval, clock)
        self.queue = queue
        self.dispatcher = dispatcher
        self.config = config
        self.transports = transports
        dispatcher.onSettled = self._settled
        self._paused = False
        self._tender = LoopingCall(self._tend)
        self._tender.clock = self.clock
        self._listening = None
        self._missed = False

    def startService(self):
        super().startService()
        # Polling stays on: the fallback, and the way to delayed items.
        self._listening = self.queue.listen(self._notified)
        self._tender.start(self.config.queue.lease / 3, now=False)

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self._listening is not None:
            yield self._listening.stopListening()
            self._listening = None
        yield self.dispatcher.releaseWaiting()
        yield self._waitForInFlight()
        if self._tender.running:
            self._tender.stop()
        yield self.dispatcher.stopHandlers()

    def _waitForInFlight(self, which=None):
        """
        The held deliveries (or those C{which} picks, see
        L{Dispatcher.drain}) settled, or C{kill_time} passed.
        """
        drained = self.dispatcher.drain(which)
        if drained.called:
            return drained
        killTime = self.config.daemon.kill_time

        def timedOut(failure):
            failure.trap(defer.TimeoutError, defer.CancelledError)
            n = len([d for d in self.dispatcher.held if which is None or which(d)])
            self.log.warn("{n} items still running after {t} s; their leases "
                          "will expire and others will retry them",
                          n=n, t=killTime)

        drained.addTimeout(killTime, self.clock)
        drained.addErrback(timedOut)
        return drained

    def poll(self):
        free = self.config.queue.prefetch - len(self.dispatcher.held)
        if free <= 0:
            self._paused = True
            return None
        d = self.queue.claim(free, self.transports)
        d.addCallback(self._claimed)
        return d

    def _claimed(self, deliveries):
        for delivery in deliveries:
            self.dispatcher.dispatch(delivery)
        return bool(deliveries)

    def _notified(self):
        """
        The backend says items may have arrived.  A poll in progress may
        have looked before they did: then poll once more as soon as it ends,
        instead of sleeping for up to C{poll_interval}.
        """
        if self._paused:
            # Waiting for room, not for items: a settled item will wake it,
            # and claiming into a nearly full window means tiny batches.
            return
        self._missed = self._polling is not None
        self.wake()

    def _polled(self, found):
        missed, self._missed = self._missed, False
        super()._polled(True if missed and found is False else found)

    def _settled(self):
        # Claim again once half the window is free: one query per item
        # settled would cost more than the items.
        lowWater = self.config.queue.prefetch // 2
        if self._paused and len(self.dispatcher.held) <= lowWater:
            self._paused = False
            self.wake()

    def reconfigService(self, config, transports: TransportFilter):
        """
        Follow a reloaded config: the window and retries are read at use,
        the poll interval and lease renewal reset here, and C{transports}
        is what to claim from now on.  → what changed, in words.
        """
        old, self.transports = self.transports, transports
        self.config = config
        self.pollInterval = config.queue.poll_interval
        interval = config.queue.lease / 3
        if self._tender.running and self._tender.interval != interval:
            self._tender.stop()
            self._tender.start(interval, now=False)
        d = defer.maybeDeferred(self.follow, old)
        return d.addCallback(lambda applied: (self.wake(), applied)[1])

    def follow(self, old: TransportFilter):
        """
        Consume what C{self.transports} says from now on, instead of what
        C{old} said; → what changed, in words (or a Deferred of it).  A
        polling backend just claims differently; brokers change their
        subscriptions.
        """
        if old == self.transports:
            return []
        return [f"claiming {describeFilter(self.transports)}"]

    def _tend(self):
        d = self.queue.tend(list(self.dispatcher.held))
        d.addErrback(lambda f: self.log.failure("queue housekeeping failed", f))
        return d
