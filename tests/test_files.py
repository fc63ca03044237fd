# -*- test-case-name: tests.test_files -*-
"""
What the daemon writes is its user's alone, under the usual umask 022:
the SQLite queue with its -wal and -shm, the dead-letter files and their
directory.
"""

import os
import stat

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from snq.item import Item
from snq.queues.db import DbQueue
from tests.test_dispatch import Harness


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class PrivateFilesTests(TestCase):
    def setUp(self):
        self.addCleanup(os.umask, os.umask(0o022))
        self.base = os.path.abspath(self.mktemp())
        os.mkdir(self.base)

    @defer.inlineCallbacks
    def test_sqliteAndItsWal(self):
        path = os.path.join(self.base, "new", "dir", "q.sqlite")
        queue = DbQueue(f"sqlite:///{path}", 60, clock=Clock())
        yield queue.open()
        self.addCleanup(queue.close)
        yield queue.enqueue([Item(transport="log", payload=1)])
        modes = {name: mode(os.path.join(os.path.dirname(path), name))
                 for name in os.listdir(os.path.dirname(path))}
        self.assertEqual(modes, {"q.sqlite": 0o600, "q.sqlite-wal": 0o600,
                                 "q.sqlite-shm": 0o600})
        self.assertEqual(mode(os.path.join(self.base, "new")), 0o700)
        self.assertEqual(mode(os.path.dirname(path)), 0o700)

    @defer.inlineCallbacks
    def test_existingFileKeepsItsMode(self):
        path = os.path.join(self.base, "q.sqlite")
        with open(path, "w"):
            pass
        os.chmod(path, 0o640)
        queue = DbQueue(f"sqlite:///{path}", 60, clock=Clock())
        yield queue.open()
        self.addCleanup(queue.close)
        self.assertEqual(mode(path), 0o640)
        self.assertEqual(mode(self.base), 0o755, "an existing directory too")

    def test_deadLetterFiles(self):
        directory = os.path.join(self.base, "dead", "letters")
        h = Harness(self, {"queue": {"dead_letter_dir": directory}})
        h.put("script", "reject")
        h.put("script", "reject")
        h.runAll()
        names = os.listdir(directory)
        self.assertEqual(len(names), 2)
        self.assertEqual({mode(os.path.join(directory, n)) for n in names},
                         {0o600})
        self.assertEqual((mode(directory), mode(os.path.dirname(directory))),
                         (0o700, 0o700))
