# -*- test-case-name: tests.test_reconfig -*-
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from snq import config, reconfig
from snq.handlers import handlerPaths


class DiffTests(SynchronousTestCase):
    def diff(self, old, new):
        return reconfig.diff(config.parse(old), config.parse(new))

    def test_nothingChanged(self):
        data = {"queue": {"concurrency": 5}, "sites": {"a": {"x": 1}}}
        self.assertEqual(self.diff(data, data), [])

    def test_liveChanges(self):
        changes = self.diff(
            {"queue": {"concurrency": 5, "groups": ["main"]},
             "daemon": {"workers": 2},
             "transports": {"webhook": {"concurrency": 2}},
             "sites": {"a": {"x": 1}, "gone": {}}},
            {"queue": {"concurrency": 8, "groups": ["main", "xmpp"]},
             "daemon": {"workers": 3},
             "transports": {"webhook": {"concurrency": 4}},
             "sites": {"a": {"x": 2}, "new": {"y": 1}}})
        self.assertEqual(
            [(c.key, c.kind, c.how) for c in changes],
            [("daemon.workers", "changed", "live"),
             ("queue.groups", "changed", "live"),
             ("queue.concurrency", "changed", "live"),
             ("transports.webhook", "changed", "live"),
             ("sites.a.x", "changed", "live"),
             ("sites.gone", "removed", "live"),
             ("sites.new", "added", "live")])
        self.assertFalse(reconfig.needsRollingRestart(changes))
        self.assertEqual(changes[0].describe(),
                         "daemon.workers: 2 → 3 (applied in place)")
        self.assertEqual(changes[-1].describe(),
                         "sites.new added (applied in place)")

    def test_backendSwitchRolls(self):
        changes = self.diff({}, {"queue": {"backend": "redis"},
                                 "db": {"url": "sqlite:///other.sqlite"}})
        self.assertEqual([(c.key, c.how) for c in changes],
                         [("queue.backend", "rolling"), ("db.url", "rolling")])
        self.assertTrue(reconfig.needsRollingRestart(changes))

    def test_handlerCodeChangeRolls(self):
        directory = self.mktemp()
        os.makedirs(directory)
        sys.path.insert(0, directory)
        self.addCleanup(sys.path.remove, directory)
        source = os.path.join(directory, "myhandlers_reconfig.py")
        paths = {"mine": "myhandlers_reconfig:Mine",
                 "missing": "no_such_module_anywhere:X"}
        with open(source, "w") as f:
            f.write("A = 1\n")
        before = reconfig.codeFingerprints(paths)
        self.assertEqual(list(before), ["myhandlers_reconfig"])
        self.assertEqual(reconfig.codeFingerprints(paths), before)
        with open(source, "w") as f:
            f.write("A = 2\n")
        after = reconfig.codeFingerprints(paths)
        changes = reconfig.diff(config.Config(code=before), config.Config(code=after))
        self.assertEqual([(c.key, c.how) for c in changes],
                         [("code myhandlers_reconfig", "rolling")])
        self.assertNotIn("myhandlers_reconfig", sys.modules, "never imported")

    def test_stampedCarriesTheCode(self):
        """What a reload compares: the code as it was when each was loaded."""
        paths = {"mine": "snq.handlers.builtin:NoopHandler"}
        conf = config.parse({"handlers": paths})
        stamped = reconfig.stamped(conf, 3, 12.5)
        self.assertEqual((stamped.generation, stamped.loaded), (3, 12.5))
        self.assertEqual(stamped.code, reconfig.codeFingerprints(
            handlerPaths(paths)))
        self.assertEqual(stamped, conf, "provenance is not compared")
        self.assertEqual(reconfig.diff(conf, stamped), [],
                         "no fingerprints before: nothing to compare")

    def test_builtinHandlersFingerprinted(self):
        prints = reconfig.codeFingerprints(handlerPaths({}))
        self.assertIn("snq.handlers.webhook", prints)
        self.assertIn("snq.handlers.builtin", prints)
