# -*- test-case-name: tests.test_logger -*-
"""
A class's Twisted logger, made on first use.  The modules that
C{snq.client} imports in a web application (the handler API, routing, STOMP
destinations) must not import Twisted there; in the daemon they log like
every other class.
"""


class LazyLogger:
    """Stands for C{log = Logger()} in a class body."""

    _logger = None

    def __get__(self, instance, owner=None):
        if self._logger is None:
            from twisted.logger import Logger

            self._logger = Logger()
        # Logger is itself a descriptor: named for the class, with the
        # instance as the event's source, as a plain Logger() would be.
        return self._logger.__get__(instance, owner)
