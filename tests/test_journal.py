# -*- test-case-name: tests.test_journal -*-
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from snq.journal import MAX_KEY, SLOT, Journal, fit


class JournalTests(SynchronousTestCase):
    def setUp(self):
        self.master = Journal.create(4)
        self.addCleanup(self.master.close)
        self.worker = Journal.attach(self.master.fd)
        self.addCleanup(self.worker.close)

    def test_runningUntilFinished(self):
        a = self.worker.start(b"17")
        b = self.worker.start(b"host-w.0-1a2b3c4d/3.1")
        self.assertEqual(self.master.running(), {b"17", b"host-w.0-1a2b3c4d/3.1"})
        self.worker.finish(a)
        self.assertEqual(self.master.running(), {b"host-w.0-1a2b3c4d/3.1"})
        self.worker.finish(b)
        self.assertEqual(self.master.running(), set())

    def test_slotsAreReused(self):
        for n in range(100):
            self.worker.finish(self.worker.start(b"%d" % n))
        self.assertEqual(os.fstat(self.master.fd).st_size, 4 * SLOT)
        self.assertEqual(self.master.running(), set())

    def test_growsWhenMoreRunThanExpected(self):
        slots = [self.worker.start(b"%d" % n) for n in range(9)]
        self.assertEqual(os.fstat(self.master.fd).st_size, 16 * SLOT)
        self.assertEqual(self.master.running(), {b"%d" % n for n in range(9)})
        self.assertEqual(len(set(slots)), 9)

    def test_longKeysAreDigested(self):
        key = b"k" * (MAX_KEY + 1)
        self.worker.start(key)
        self.assertEqual(self.master.running(), {fit(key)})
        self.assertEqual(fit(b"short"), b"short")
        self.assertLessEqual(len(fit(key)), MAX_KEY)

    def test_halfWrittenSlotIsFree(self):
        """The key goes in before the state byte: a death between is no start."""
        slot = self.worker.start(b"42")
        self.worker._map[slot * SLOT] = 0
        self.assertEqual(self.master.running(), set())

    def test_survivesKillOfTheWriter(self):
        """A process killed with SIGKILL leaves its marks for the master."""
        code = ("import os, signal, sys\n"
                "from snq.journal import Journal\n"
                "j = Journal.attach(int(sys.argv[1]))\n"
                "j.start(b'running-at-death')\n"
                "j.finish(j.start(b'finished'))\n"
                "os.kill(os.getpid(), signal.SIGKILL)\n")
        process = subprocess.run(
            [sys.executable, "-c", code, str(self.master.fd)],
            pass_fds=[self.master.fd], timeout=60)
        self.assertEqual(process.returncode, -9)
        self.assertEqual(self.master.running(), {b"running-at-death"})
