# -*- test-case-name: tests.test_logger -*-
"""L{snq.logger.LazyLogger}: a class's Twisted logger, made on first use."""

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from snq.logger import LazyLogger


class Lazy:
    log = LazyLogger()


class Plain:
    log = Logger()


class LazyLoggerTests(SynchronousTestCase):
    def test_likeAPlainLogger(self):
        """Named for the class, with the instance (or class) as the source."""
        lazy, plain = Lazy(), Plain()
        self.assertIsInstance(lazy.log, Logger)
        self.assertEqual(lazy.log.namespace,
                         plain.log.namespace.replace("Plain", "Lazy"))
        self.assertIs(lazy.log.source, lazy)
        self.assertIs(Lazy.log.source, Lazy)
