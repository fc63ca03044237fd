# -*- test-case-name: tests.test_iomanager -*-
"""
IoManagers: the services an IoMaster runs.  Each is woken either by input on
a connection (a listening manager) or by its own timer (a L{PollingManager}).

They are also the plugin API (L{snq.iomanagers}): a plugin is a subclass
whose constructor takes its L{snq.iomanagers.ManagerContext}, with the
class attributes and methods below for what snq asks of a plugin.
"""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from snq.service import defaultReactor


class IoManager(Service):
    """
    A service with an injectable clock, so tests drive its time.

    As a plugin it is started and stopped with its worker (C{startService}
    and C{stopService} may return Deferreds, which are waited for), and a
    reloaded config reaches it through C{reconfigService(config)} if it has
    one (its new settings are in its context by then; it returns what it
    changed, in words).
    """

    log = Logger()

    #: A plugin's settings: a frozen dataclass whose fields are the keys of
    #: its C{[iomanagers.NAME]} table, checked as snq checks its own
    #: sections (types, and a field's C{metadata["check"]}); None: no keys.
    Settings = None
    #: It keeps what must happen once in the ledger (L{snq.ledger}): it is
    #: refused where there is none (a STOMP queue without C{[ledger] url}).
    usesLedger = False

    def __init__(self, clock=None):
        clock = defaultReactor(clock)
        self.clock = clock

    @classmethod
    def check(cls, config, settings) -> list[str]:
        """
        What keeps it from working under C{config} with C{settings} (the
        parsed L{Settings}), each in words: checked before a daemon starts
        and before a reload is applied.
        """
        return []

    def status(self) -> list[dict]:
        """
        Rows for C{/status.json} and the dashboard, each a dict of C{key}
        (what it is about: a feed, a schedule …), C{state} ("ok", or
        anything else that needs a look: "failing" …) and C{detail}.
        """
        return []


class PollingManager(IoManager):
    """
    Calls L{poll} repeatedly, never two at once.

    StatusNet's rule: after a poll that found work, poll again at once; after
    one that found nothing, wait 1, 2, 4 … seconds, at most C{pollInterval}.
    C{poll} returns (or fires with) True for "found work", False for "found
    nothing", and None for "cannot take work now": then it sleeps until
    L{wake} is called.  An error counts as "found nothing", so a database
    that is down is retried with the same backoff.  A poller that keeps its
    own time (a feed's interval, a server's C{Retry-After}) returns the
    seconds to wait instead, as a float.
    """

    def __init__(self, pollInterval: float, clock=None):
        super().__init__(clock)
        self.pollInterval = pollInterval
        self._delay = 0.0
        self._timer = None
        self._polling = None
        self._failures = 0

    @property
    def idle(self) -> bool:
        """Its last poll found nothing: it is waiting before the next."""
        return self._delay > 0

    def poll(self):
        """Look for work once; what it returns decides the next poll."""
        raise NotImplementedError

    def startService(self):
        super().startService()
        self._delay = 0.0
        self._schedule(0)

    def stopService(self):
        super().stopService()
        self._cancel()
        polling = self._polling or defer.succeed(None)
        # Callers wait for the poll in progress, not for its result.
        waiter = defer.Deferred()
        polling.addBoth(lambda r: (waiter.callback(None), r)[1])
        return waiter

    def wake(self):
        """Poll now, unless a poll is running (it will decide what is next)."""
        if self.running and self._polling is None:
            self._delay = 0.0
            self._schedule(0)

    def _cancel(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay):
        self._cancel()
        self._timer = self.clock.callLater(delay, self._run)

    def _run(self):
        self._timer = None
        self._polling = defer.maybeDeferred(self.poll)
        self._polling.addCallbacks(self._succeeded, self._failed)
        self._polling.addCallback(self._polled)

    def _succeeded(self, found):
        if self._failures:
            self.log.info("{manager} polls again after {n} failures",
                          manager=self, n=self._failures)
            self._failures = 0
        return found

    def _failed(self, failure):
        # An outage fails every poll: one traceback, then one line each.
        self._failures += 1
        if self._failures == 1:
            self.log.failure("{manager} poll failed", failure, manager=self)
        else:
            self.log.warn("{manager} poll failed again ({n} in a row): {error}",
                          manager=self, n=self._failures,
                          error=failure.getErrorMessage())
        return False

    def _polled(self, found):
        self._polling = None
        if not self.running or found is None:
            return
        if isinstance(found, float):
            self._delay = found
        elif found:
            self._delay = 0.0
        else:
            self._delay = min(max(self._delay * 2, 1.0), self.pollInterval)
        self._schedule(self._delay)
