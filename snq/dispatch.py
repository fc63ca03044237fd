# -*- test-case-name: tests.test_dispatch -*-
"""
An item's life: the L{Dispatcher} decodes a claimed delivery, routes it to
its handler, runs it within the limits, and settles it exactly once.
The rules live here, once for every backend.

Whatever a delivery holds, it is settled: a row or frame that cannot become
an item is a C{baditem} dead letter with the reason, and anything
unexpected while decoding or routing it makes it one too, with the
exception's type in the error, rather than leaving it held for ever.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import json
import os
import random
import re
import threading
import time

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from snq.backoff import backoff
from snq.cluster import Pauses
from snq.files import privateDirectory, writePrivate
from snq.handlers import Defer, HandlerRegistry, Reject, Retry
from snq.handlers.context import HandlerContext
from snq.item import BadItem, Item
from snq.queues.interface import Delivery, Queue
from snq.service import defaultReactor
from snq.stats import Stats

#: Longest error kept with a dead letter or a retry, in characters.
ERROR_LENGTH = 4000


def printable(text: str) -> str:
    """
    C{text} as every store takes it: no lone surrogate (SQLite and Redis
    refuse them), no NUL (PostgreSQL and STOMP headers do), bounded.
    """
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= ERROR_LENGTH else text[:ERROR_LENGTH - 1] + "…"


class Dispatcher:
    """
    Runs claimed deliveries through their handlers and settles each one
    exactly once: acknowledged, retried later, or dead-lettered.

    At most C{concurrency} items run at once, and at most a transport's own
    C{concurrency} of that transport, so one slow remote cannot take every
    slot; the rest wait, the highest priority first, else in arrival order.

    Blocking handlers run in a thread pool of the dispatcher's own
    (C{[queue] threads}), apart from the reactor's, where name resolution
    runs: busy handlers cannot starve DNS.  A blocking call that times out
    cannot be stopped, so it keeps its slot until its thread returns, and
    only then is it settled (as timed out): the same item never runs twice
    at once in one worker.

    C{journal} (L{snq.journal.Journal}, in a worker of the pool) records
    which items are running, for the master after a death; C{deaths(key)},
    when given, asks the master how often a redelivered message killed the
    worker running it (L{snq.reaper}), so that such a message is charged as
    leased items are.
    """

    log = Logger()

    def __init__(self, queue: Queue, registry: HandlerRegistry, config,
                 stats: Stats | None = None, clock=None, rng=random,
                 onSettled=None, runBlocking=None, journal=None,
                 deaths=None):
        """
        C{runBlocking(f, item)}, when given, runs a C{blocking} handler's
        C{handle} and returns a Deferred (L{snq.testing} calls it at once);
        by default it runs in the dispatcher's thread pool.
        """
        clock = defaultReactor(clock)
        self.queue = queue
        self.config = config
        self.stats = stats or Stats()
        self.clock = clock
        self.rng = rng
        self.runBlocking = runBlocking
        self.journal = journal
        self.deaths = deaths
        self.context = HandlerContext(config, queue, self.stats, clock)
        self.registry = registry
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
        #: What the cluster has paused (L{snq.cluster.pauses.PauseWatch}).
        self.pauses = Pauses()
        self._waiting: collections.deque = collections.deque()
        self._running: collections.Counter = collections.Counter()
        self._drained: list[defer.Deferred] = []
        #: The blocking handlers' threads, started with the first such item.
        self._threads: ThreadPool | None = None
        #: Blocking calls waiting for a thread, and running in one.
        self.threadsQueued = self.threadsBusy = 0

    @property
    def running(self) -> int:
        return sum(self._running.values())

    def runningTransports(self) -> list[str]:
        """The transports of the items running now, for monitors."""
        return sorted(t for t, n in self._running.items() if n)

    def threadStats(self) -> dict:
        """The blocking handlers' thread pool, for monitors."""
        return {"max": self.config.queue.threads, "busy": self.threadsBusy,
                "queued": self.threadsQueued}

    def dispatch(self, delivery: Delivery) -> defer.Deferred:
        """Fires (never fails) once the delivery has been settled."""
        self.held.add(delivery)
        done = defer.Deferred()
        try:
            accepted = self._accept(delivery, done)
        except Exception as e:
            self.log.failure("decoding or routing a delivery failed: it goes to "
                             "the dead letters")
            self._settle(defer.maybeDeferred(
                self._deadLetter, delivery, None, "baditem",
                f"{type(e).__name__} while decoding or routing it: {e}"),
                delivery, done)
            return done
        if accepted is not None:
            self._queue(*accepted, done)
        return done

    def _accept(self, delivery: Delivery, done: defer.Deferred):
        """
        Decode and route C{delivery} → C{(delivery, item, handler)} to run,
        or None when it is settled (or being charged) already.
        """
        def settle(outcome, *args):
            self._settle(defer.maybeDeferred(outcome, delivery, *args),
                         delivery, done)

        if delivery.problem is not None:
            return settle(self._deadLetter, None, "baditem", delivery.problem)
        limit = self.config.queue.maxFrameBytes()
        if limit and len(delivery.frame) > limit:
            return settle(self._deadLetter, None, "baditem",
                          f"frame is {len(delivery.frame)} bytes, over [queue] "
                          f"max_frame ({limit} bytes)")
        try:
            item = self._decode(delivery)
        except BadItem as e:
            return settle(self._deadLetter, None, "baditem", str(e))
        now = self.clock.seconds()
        if item.dueAt(now) > now:
            # Early: a producer pushed it straight onto a ready list, or a
            # broker's delay queue let it out before its time.  It waits
            # again, without an attempt charged.
            return settle(self.queue.retry, item, item.run_at - now,
                          "not due yet")
        if self.pauses.holds(item.transport, item.site):
            # Taken while paused (a broker's push, a list of several
            # transports, any site's items): back uncharged, and not before
            # the pauses are looked at again, so it cannot spin.
            return settle(self.queue.retry, item, self.pauses.putBack(
                item.transport, item.site, now, self.config.cluster.heartbeat),
                "paused")
        sites = self.config.knownSites()
        if sites is not None and item.site not in sites:
            # Usual while a reload that adds the site spreads over the
            # workers (and hosts): wait for it, within the item's retries.
            error = f"unknown site {item.site!r} (not under [sites])"
            self.log.warn("{transport} item {id}: {error}; retried later",
                          transport=item.transport, id=item.id, error=error)
            return settle(self._failed, item, error, "badsite")
        handler = self.handlers.get(item.transport)
        if handler is None:
            reason = f"no handler for transport {item.transport!r}"
            return settle(self._deadLetter, item, "badhandler", reason)
        limit = self.config.maxRetries(item.transport)
        if item.attempts > limit:
            # A lease that expired too often: the item keeps killing its
            # workers, so it must not come round again.
            error = f"{item.attempts} attempts, limit {limit} (its workers died)"
            return settle(self._deadLetter, item, "retries", error)
        if delivery.redelivered and self.deaths is not None:
            d = defer.maybeDeferred(self.deaths, self.queue.journalKey(delivery))
            d.addErrback(self._noDeaths, item)
            d.addCallback(self._charge, delivery, item, handler, done)
            return None
        return delivery, item, handler

    def _noDeaths(self, failure, item):
        self.log.failure("cannot ask the master whether {id} killed a worker; "
                         "running it", failure, id=item.id)
        return 0

    def _charge(self, deaths: int, delivery, item, handler, done):
        """
        A redelivered message, which killed C{deaths} workers on this host:
        charged one attempt per death, like a leased item (it keeps its
        place if it killed none: its worker held it without running it).
        """
        if not deaths:
            self._queue(delivery, item, handler, done)
            return
        item = dataclasses.replace(item, attempts=item.attempts + deaths - 1)
        times = "" if deaths == 1 else f" ({deaths} times)"
        self._settle(defer.maybeDeferred(
            self._failed, delivery, item,
            f"its worker died while running it{times}"), delivery, done)

    def _queue(self, delivery, item, handler, done):
        # The handler it was accepted for runs it, even if a reconfiguration
        # replaces that handler meanwhile.
        self._uses[handler] += 1
        done.addBoth(self._used, handler)
        # Behind the waiting items of its priority or higher, ahead of the
        # lower: an urgent item claimed into a full window starts next.
        index = len(self._waiting)
        while index and self._waiting[index - 1][1].priority < item.priority:
            index -= 1
        self._waiting.insert(index, (delivery, item, done, handler))
        self._pump()

    def reconfigService(self, config) -> list[str]:
        """
        Take C{config} in place: limits, retries and sites are read from it
        at use.  Its handlers are loaded first, so one that does not load
        changes nothing (L{HandlerError}).  Transports that gained a handler
        get one; a handler whose class changed is replaced, and one that is
        gone is stopped once its items are done.  → what changed, in words.
        """
        registry = HandlerRegistry.load(config.handlers)
        old, self.config = self.config, config
        self.context.config = config
        self.registry = registry
        applied = []
        if config.queue.threads != old.queue.threads:
            if self._threads is not None:
                self._threads.adjustPoolsize(0, config.queue.threads)
            applied.append(f"{config.queue.threads} threads for blocking "
                           "handlers")
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
        self._stopThreads()
        return defer.gatherResults(
            [defer.maybeDeferred(h.stop) for h in handlers])

    def _stopThreads(self):
        pool, self._threads = self._threads, None
        if pool is None:
            return
        if self.threadsBusy or self.threadsQueued:
            # Joining would wait for calls that may never return: their
            # threads are daemons, and end with the process.
            self.log.warn("{n} blocking handler calls still running as the "
                          "worker stops", n=self.threadsBusy + self.threadsQueued)
            return
        pool.stop()

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
            try:
                self._start(delivery, item, done, handler)
            except Exception as e:
                self.log.failure("starting {transport} item {id} failed",
                                 transport=item.transport, id=item.id)
                self._settle(defer.maybeDeferred(
                    self._failed, delivery, item,
                    f"{type(e).__name__} while starting it: {e}"), delivery, done)

    def _start(self, delivery: Delivery, item: Item, done: defer.Deferred,
               handler):
        timeout = self._timeout(item.transport, handler)
        # Marked before the handler is called: if this process dies now,
        # the master charges the item an attempt (and only this one).
        slot = (None if self.journal is None
                else self.journal.start(self.queue.journalKey(delivery)))
        self._running[item.transport] += 1
        started = self.clock.seconds()
        timer = None

        def expired():
            if handler.blocking:
                # A thread cannot be stopped: its slot stays taken until it
                # returns, and the item is settled only then.
                self.log.warn("{transport} item {id} timed out after {t:g} s; "
                              "its thread still runs, and keeps its slot",
                              transport=item.transport, id=item.id, t=timeout)
            else:
                # Cancelling surfaces as whatever the handler's library
                # raises (twisted.web's client: ResponseNeverReceived), so
                # remember that we did it.
                d.cancel()

        def startTimer():
            nonlocal timer
            if timeout:
                timer = self.clock.callLater(timeout, expired)

        def finished(result):
            # The slot is free once the handler is; settling needs none.
            timedOut = timer is not None and not timer.active()
            if timer is not None and not timedOut:
                timer.cancel()
            if self.journal is not None:
                self.journal.finish(slot)
            self._running[item.transport] -= 1
            self.stats.timing(item.transport, self.clock.seconds() - started)
            self._pump()
            return self._outcome(result, delivery, item,
                                 timeout if timedOut else None)

        d = self._call(item, handler, startTimer)
        d.addBoth(finished)
        self._settle(d, delivery, done)

    def _timeout(self, transport: str, handler) -> float:
        return self.config.transport(transport).timeout or handler.timeout

    def _call(self, item: Item, handler, started) -> defer.Deferred:
        """Run the handler; C{started()} once it runs (a thread may wait)."""
        if handler.blocking:
            if self.runBlocking is not None:
                started()
                return self.runBlocking(handler.handle, item)
            self.threadsQueued += 1
            return threads.deferToThreadPool(
                self.clock, self._threadPool(), self._inThread, handler, item,
                started)
        started()
        try:
            result = handler.handle(item)
        except BaseException:
            return defer.fail()
        if inspect.iscoroutine(result):
            return defer.Deferred.fromCoroutine(result)
        return defer.maybeDeferred(lambda: result)

    def _threadPool(self) -> ThreadPool:
        if self._threads is None:
            self._threads = ThreadPool(0, self.config.queue.threads,
                                       name="snq-handlers")
            self._threads.threadFactory = functools.partial(threading.Thread,
                                                            daemon=True)
            self._threads.start()
        return self._threads

    def _inThread(self, handler, item: Item, started):
        """In a handler thread: the call's timeout runs from here."""
        self.clock.callFromThread(self._threadStarted, started)
        try:
            return handler.handle(item)
        finally:
            self.clock.callFromThread(self._threadReturned)

    def _threadStarted(self, started):
        self.threadsQueued -= 1
        self.threadsBusy += 1
        started()

    def _threadReturned(self):
        self.threadsBusy -= 1

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
        if result.check(Defer):
            # Not the item's fault: back as it came, attempts unchanged.
            self.stats.count("deferred", item.transport, item.site)
            return self.queue.retry(delivery, item, result.value.delay,
                                    printable(f"deferred: {result.value}"))
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

    def _failed(self, delivery: Delivery, item: Item, error: str,
                kind: str = "retries"):
        """
        Retry C{item} after a backoff, or dead-letter it as C{kind} once
        its retries are spent.  A handler's failure counts as an error; an
        item waiting for its site's settings (C{badsite}) does not.
        """
        if kind == "retries":
            self.stats.count("error", item.transport, item.site)
        retried = item.retried()
        limit = self.config.maxRetries(item.transport)
        if retried.attempts > limit:
            return self._deadLetter(
                delivery, retried, kind,
                f"gave up after {retried.attempts} attempts; last error: {error}")
        delay = backoff(retried.attempts, self.config.queue.retry_delay,
                        self.config.queue.retry_max_delay, self.rng)
        self.stats.count("requeued", item.transport, item.site)
        return self.queue.retry(delivery, retried, delay, printable(error))

    def _deadLetter(self, delivery: Delivery, item: Item | None, kind: str,
                    error: str):
        """
        C{kind} is the reason's short name and, for C{baditem},
        C{badhandler} and C{badsite}, the counter bumped; every dead letter
        counts as C{deadletter} too.
        """
        error = printable(error)
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
        # An id is the producer's: only its harmless characters name a file.
        name = re.sub(r"[^\w.-]", "_", item.id) if item else os.urandom(6).hex()
        name = f"{time.time():.6f}-{name}.json"
        record = {"reason": kind, "error": error, "attempts": attempts,
                  "frame": delivery.frame.decode("utf-8", "replace")}
        try:
            privateDirectory(directory)
            writePrivate(os.path.join(directory, name), json.dumps(record))
        except OSError:
            self.log.failure("cannot write dead letter file in {dir}",
                             dir=directory)

    def _settle(self, d: defer.Deferred, delivery: Delivery,
                done: defer.Deferred):
        def failed(failure):
            # The store refused the outcome (connection lost, …).  The lease
            # will expire and the item come back: at least once, not lost.
            self.stats.count("settle_failed", delivery.transport or "",
                             delivery.site or "")
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
