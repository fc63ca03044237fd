# -*- test-case-name: tests.test_schedule -*-
"""
C{[schedule.NAME]}: the cron of a queue daemon.  At each tick of a
schedule (C{every = "30s"} or C{cron = "*/5 * * * *"}) an item is enqueued
for its transport, once for its site or once per configured site
(C{sites = "all"}).

Exactly once per tick across every worker, daemon and host sharing the
backend: each item's name in the ledger is the schedule, the tick (UNIX
seconds) and the site, claimed together with the item's enqueueing
(L{snq.ledger.Ledger.enqueueOnce}); whoever comes second finds it taken.
An C{every} schedule ticks at multiples of its interval since the epoch,
and a cron one in its time zone, so every daemon names the same ticks.

After downtime, C{catchup} decides about the ticks nobody fired (since
the last fired tick, kept in the ledger): C{none} skips them, C{last}
fires the latest, C{all} fires them all, at most C{catchup_limit}.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import random
import zoneinfo

from cronsim import CronSim
from twisted.internet import defer
from twisted.logger import Logger

from snq.backoff import backoff
from snq.config import parseDuration
from snq.iomanager import IoManager

#: Seconds the last fired tick of a schedule is remembered.
LAST_KEPT = 400 * 86400.0
#: A tick's claim lives at least this long (and two periods at least).
CLAIM_KEPT = 3600.0
#: Missed cron ticks beyond C{catchup_limit} are counted up to this.
COUNT_LIMIT = 10000


def lastKey(name: str) -> str:
    """The ledger's name for a schedule's last fired tick."""
    return f"schedule:{name}:last"


class Ticks:
    """The ticks of a L{snq.config.ScheduleConfig}, as UNIX seconds."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.every = parseDuration(schedule.every) if schedule.every else None
        self.zone = zoneinfo.ZoneInfo(schedule.timezone)

    def _cron(self, at: float, reverse: bool) -> float:
        start = datetime.datetime.fromtimestamp(at, self.zone)
        return next(CronSim(self.schedule.cron, start, reverse=reverse)).timestamp()

    def after(self, t: float) -> float:
        """The first tick later than C{t}."""
        if self.every is not None:
            return (math.floor(t / self.every) + 1) * self.every
        return self._cron(t, reverse=False)

    def atOrBefore(self, t: float) -> float:
        """The last tick not later than C{t}."""
        if self.every is not None:
            return math.floor(t / self.every) * self.every
        return self._cron(t + 1e-6, reverse=True)

    def period(self, t: float) -> float:
        """Seconds from the tick after C{t} to the one after that."""
        first = self.after(t)
        return self.after(first) - first

    def between(self, start: float, end: float, limit: int) -> tuple[list, int]:
        """
        The ticks in C{(start, end]}: the last C{limit} of them, and how
        many more there were before those (for cron, counted up to
        L{COUNT_LIMIT}).
        """
        ticks = []
        t = self.atOrBefore(end)
        while t > start and len(ticks) < limit:
            ticks.append(t)
            t = self.atOrBefore(t - 1e-3)
        skipped = 0
        if self.every is not None:
            skipped = max(0, round(t / self.every) - math.floor(start / self.every))
        else:
            while t > start and skipped < COUNT_LIMIT:
                skipped += 1
                t = self.atOrBefore(t - 1e-3)
        return ticks[::-1], skipped


def describeTick(t: float | None, zone=None) -> str:
    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t, zone).isoformat(" ", "seconds")


class ScheduleRunner:
    """One schedule's timer in the L{Scheduler}."""

    log = Logger()

    def __init__(self, scheduler, name: str, schedule):
        self.scheduler = scheduler
        self.context = scheduler.context
        self.clock = scheduler.clock
        self.name = name
        self.schedule = schedule
        self.ticks = Ticks(schedule)
        #: The latest tick this process has dealt with.
        self.done: float | None = None
        #: The latest tick fired here or, at start, in the ledger.
        self.lastFired: float | None = None
        self.failures = 0
        self.lastError = ""
        self._timer = None
        self._firing: defer.Deferred | None = None

    @defer.inlineCallbacks
    def start(self):
        """Catch up as C{catchup} says, then wait for the next tick."""
        now = self.clock.seconds()
        self.done = self.ticks.atOrBefore(now)
        try:
            ledger = yield self.context.ledger()
            last = yield ledger.get(lastKey(self.name))
        except Exception as e:
            self._failed(e)
            last = None
        self.lastFired = float(last) if last else None
        if self.lastFired is not None and self.schedule.catchup != "none":
            limit = (1 if self.schedule.catchup == "last"
                     else self.schedule.catchup_limit)
            missed, skipped = self.ticks.between(self.lastFired, now, limit)
            if skipped and self.schedule.catchup == "all":
                self.log.warn("schedule {name}: {n} missed ticks beyond "
                              "catchup_limit {limit} are not fired", name=self.name,
                              n=skipped, limit=limit)
                self.context.count("skipped", self.name, n=skipped)
            if missed:
                self.log.info("schedule {name}: catching up {n} missed ticks "
                              "since {last}", name=self.name, n=len(missed),
                              last=describeTick(self.lastFired))
                self.done = self.lastFired
                yield self._fire(missed)
                if self.done < self.ticks.atOrBefore(now):
                    # Catching up failed: the next attempt starts from now.
                    self.done = self.ticks.atOrBefore(now)
        self._wait()

    def stop(self) -> defer.Deferred:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        firing = self._firing
        if firing is None:
            return defer.succeed(None)
        waiter = defer.Deferred()
        firing.addBoth(lambda r: (waiter.callback(None), r)[1])
        return waiter

    def _wait(self, delay=None):
        if not self.scheduler.running:
            return
        if delay is None:
            delay = max(0.0, self.ticks.after(self.done) - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._due)

    def nextTick(self) -> float:
        return self.ticks.after(self.done if self.done is not None
                                else self.clock.seconds())

    def _due(self):
        self._timer = None
        now = self.clock.seconds()
        limit = self.schedule.catchup_limit if self.schedule.catchup == "all" else 1
        due, _ = self.ticks.between(self.done, now, limit)
        if not due:
            self._wait()
            return
        self._firing = self._fire(due)
        self._firing.addBoth(self._fired)

    def _fired(self, _):
        self._firing = None
        if self.failures:
            # Again soon, and at the latest when a new tick is due.
            now = self.clock.seconds()
            self._wait(min(backoff(min(self.failures, 10), 1.0, 30.0),
                           self.ticks.after(now) - now))
        else:
            self._wait()

    @defer.inlineCallbacks
    def _fire(self, ticks):
        """Enqueue each tick's items (once across daemons); never fails."""
        for tick in ticks:
            try:
                fired = yield self._fireTick(tick)
            except Exception as e:
                self._failed(e)
                return
            if self.failures:
                self.log.info("schedule {name} fires again after {n} failures",
                              name=self.name, n=self.failures)
            self.failures, self.lastError = 0, ""
            self.done = max(self.done or tick, tick)
            self.lastFired = max(self.lastFired or tick, tick)
            if fired:
                self.log.info("schedule {name}: tick {tick} fired: {n} items",
                              name=self.name, tick=describeTick(tick, self.ticks.zone),
                              n=len(fired))

    @defer.inlineCallbacks
    def _fireTick(self, tick):
        schedule = self.schedule
        sites = self.context.sites() if schedule.sites == "all" else [schedule.site]
        stamp = int(tick) if float(tick).is_integer() else tick
        # Created at its tick: every daemon makes the same item for it, and
        # a caught-up item says when it was due.
        entries = [(f"schedule:{self.name}:{stamp}:{site}", dataclasses.replace(
                    self.context.item(schedule.transport, schedule.payload, site,
                                      schedule.priority), created=tick))
                   for site in sites]
        delay = random.uniform(0, schedule.jitter) if schedule.jitter else 0.0
        ttl = max(CLAIM_KEPT, 2 * self.ticks.period(tick))
        fired = yield self.context.enqueueOnce(entries, ttl, delay)
        for item in fired:
            self.context.count("fired", self.name, item.site)
        ledger = yield self.context.ledger()
        last = yield ledger.get(lastKey(self.name))
        if not last or float(last) < tick:
            yield ledger.put(lastKey(self.name), repr(float(tick)), LAST_KEPT)
        return fired

    def _failed(self, error):
        self.failures += 1
        self.lastError = f"{type(error).__name__}: {error}"
        self.context.count("errors", self.name)
        if self.failures == 1:
            self.log.failure("schedule {name} cannot fire", name=self.name)
        else:
            self.log.warn("schedule {name} cannot fire ({n} in a row): {error}",
                          name=self.name, n=self.failures, error=self.lastError)

    def status(self) -> dict:
        zone = self.ticks.zone
        detail = (f"next {describeTick(self.nextTick(), zone)}, last fired "
                  f"{describeTick(self.lastFired, zone)}")
        if self.failures:
            detail += f"; {self.failures} failures: {self.lastError}"
        return {"key": self.name, "state": "failing" if self.failures else "ok",
                "detail": detail}


class Scheduler(IoManager):
    """
    The C{schedule} IoManager: a timer per C{[schedule.NAME]}, following
    reloads by name (added, changed: started again from its last fired
    tick; removed: stopped).  It runs on one worker of each daemon by
    default (C{[iomanagers.schedule] worker = "one"}); the ledger makes
    any number of them fire each tick once.
    """

    log = Logger()
    usesLedger = True

    def __init__(self, context):
        super().__init__(context.clock)
        self.context = context
        self.runners: dict[str, ScheduleRunner] = {}

    def startService(self):
        super().startService()
        return self._follow(self.context.config.schedule)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        runners, self.runners = self.runners, {}
        yield defer.gatherResults([r.stop() for r in runners.values()])

    def reconfigService(self, config):
        return self._follow(config.schedule)

    @defer.inlineCallbacks
    def _follow(self, schedules):
        applied = []
        for name, runner in sorted(self.runners.items()):
            if schedules.get(name) != runner.schedule:
                del self.runners[name]
                yield runner.stop()
                if name not in schedules:
                    applied.append(f"schedule {name} removed")
        starting = []
        for name, schedule in sorted(schedules.items()):
            if name not in self.runners:
                runner = self.runners[name] = ScheduleRunner(self, name, schedule)
                starting.append(runner.start())
                applied.append(f"schedule {name} (re)started")
        yield defer.gatherResults(starting)
        return applied

    def status(self):
        return [runner.status() for _, runner in sorted(self.runners.items())]
