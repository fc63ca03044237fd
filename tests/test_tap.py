# -*- test-case-name: tests.test_tap -*-
"""C{twistd snq}'s options and the service tree they build."""

import io
import os
import sys

from twisted.application.service import IServiceMaker
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from snq.cluster.registry import RegistryService
from snq.control import ControlService
from snq.iomaster import IoMaster
from snq.monitor.service import MonitorService
from snq.pool import WorkerPool
from snq.reaper import Reaper
from snq.tap import Daemon, Options, makeService


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_workers(self):
        self.assertIsNone(self.parse()["workers"])
        self.assertEqual(self.parse("--workers", "3")["workers"], 3)
        self.assertEqual(self.parse("-t", "2")["workers"], 2)
        self.assertEqual(self.parse("--threads=4")["workers"], 4)
        self.assertEqual(self.parse("--threads", "0")["workers"], 0)

    def test_badWorkers(self):
        for argv in (["--workers", "-1"], ["--threads", "many"]):
            self.assertRaises(usage.UsageError, self.parse, *argv)

    def test_helpNamesEveryOption(self):
        text = str(Options())
        for word in ("--workers", "-t", "--threads", "--inline", "--config",
                     "0 = one per CPU", "--pidfile"):
            self.assertIn(word, text)

    def test_missingConfigFile(self):
        e = self.assertRaises(usage.UsageError, self.parse, "-c", "/nonexistent.toml")
        self.assertIn("does not exist", str(e))


class MakeServiceTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "snq.toml")
        self.write("")
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def write(self, text):
        with open(self.config, "w") as f:
            f.write(text)

    def make(self, *argv):
        options = Options()
        options.parseOptions(["-c", self.config, *argv])
        return makeService(options)

    def test_poolByDefault(self):
        self.write('[daemon]\nworkers = 3\ncontrol_socket = "run/ctl.sock"\n')
        daemon = self.make()
        self.assertIsInstance(daemon, Daemon)
        control, monitor, registry, reaper, pool, reloader = list(daemon)
        self.assertIsInstance(control, ControlService)
        self.assertIsInstance(registry, RegistryService)
        self.assertIs(registry.tracker, monitor.tracker)
        self.assertIs(registry.reloader, reloader)
        self.assertIsInstance(pool, WorkerPool)
        self.assertIsInstance(reaper, Reaper)
        self.assertIs(pool.reaper, reaper)
        self.assertIn(reaper, pool.observers)
        self.assertIs(control.pool, pool)
        self.assertIs(control.reloader, reloader)
        self.assertIs(reloader.tree, daemon)
        self.assertTrue(reloader.rolling)
        self.assertIsInstance(monitor, MonitorService)
        self.assertIn(monitor.tracker, pool.observers)
        self.assertEqual(monitor.http.address, "127.0.0.1:8750")
        self.assertEqual(control.path, "run/ctl.sock")
        self.assertEqual([w.wid for w in pool.workers],
                         ["generic.0", "generic.1", "generic.2"])
        self.assertIn(os.path.abspath(self.config), pool.command)
        self.assertEqual(self.stderr.getvalue(),
                         f"snq: {self.config}, 3 workers, every site\n")

    def test_controlChannelWarnedAtStart(self):
        """On STOMP, the master says how the control channel stands."""
        warnings = {}
        for name, stomp in (("closed", ""), ("unsigned",
                                             "control_allow_unsigned = true\n"),
                            ("signed", 'control_secret = "k"\n')):
            self.write('[queue]\nbackend = "stomp"\n[stomp]\n' + stomp)
            with capturedLogs() as events:
                self.make()
            warnings[name] = [formatEvent(e) for e in events
                              if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings["closed"]), 1)
        self.assertIn("control channel /topic/snq/control is closed",
                      warnings["closed"][0])
        self.assertEqual(len(warnings["unsigned"]), 1)
        self.assertIn("obeys UNSIGNED messages", warnings["unsigned"][0])
        self.assertEqual(warnings["signed"], [])

    def test_commandLineWins(self):
        self.write("[daemon]\nworkers = 3\n")
        pool = list(self.make("--workers", "2"))[-2]
        self.assertEqual((len(pool.workers), pool.override), (2, 2))

    def test_zeroIsOnePerCPU(self):
        self.write("[daemon]\nworkers = 3\n")
        pool = list(self.make("-t", "0"))[-2]
        self.assertEqual(len(pool.workers), os.cpu_count())
        self.write("")
        self.assertEqual(len(list(self.make())[-2].workers), os.cpu_count())

    def test_inline(self):
        daemon = self.make("--inline", "--workers", "4")
        master, reloader = list(daemon)
        self.assertIsInstance(master, IoMaster)
        self.assertIs(reloader.tree, daemon)
        self.assertFalse(reloader.rolling, "--inline has no processes to roll")
        self.assertEqual(master.reload, reloader.requested)
        self.assertIsNone(master.watch)
        self.assertEqual(master.workerId, "generic.0")

    def test_unloadableHandlerRefusedBeforeAnyWorker(self):
        self.write('[handlers]\nx = "no_such_module:Handler"\n')
        e = self.assertRaises(SystemExit, self.make)
        self.assertIn("handlers.x: cannot load no_such_module:Handler", str(e))

    def test_invalidConfigRefused(self):
        self.write("[daemon]\nworkers = -2\n")
        e = self.assertRaises(SystemExit, self.make)
        self.assertIn("daemon.workers", str(e))


class PluginTests(SynchronousTestCase):
    def test_snqIsATwistdCommand(self):
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("snq", makers)
        self.assertIs(makers["snq"].options, Options)
