"""
Building an IoManager plugin outside a worker, for its tests: its context
on a given queue and clock, with a ledger of the test's choosing.
"""

from twisted.internet import defer

from snq.handlers.context import HandlerContext
from snq.iomanagers import ManagerContext
from snq.ledger import LedgerService
from snq.stats import Stats


class FixedLedger:
    """A L{LedgerService} stand-in handing out one ledger."""

    def __init__(self, ledger):
        self._ledger = ledger

    def ledger(self):
        return defer.succeed(self._ledger)


def managerContext(testCase, config, queue, clock, name, settings=None,
                   ledger=None, wid="generic.0"):
    """
    A L{ManagerContext} for plugin C{name}: C{ledger} if given, else the
    ledger C{config} names (started, stopped at cleanup).
    """
    handlers = HandlerContext(config, queue, Stats(), clock)
    if ledger is not None:
        ledgers = FixedLedger(ledger)
    else:
        ledgers = LedgerService(config, queue, clock)
        ledgers.startService()
        testCase.addCleanup(ledgers.stopService)
    return ManagerContext(name, settings, handlers, ledgers, wid)
