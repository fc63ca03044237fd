# -*- test-case-name: tests.test_config -*-
from twisted.trial.unittest import SynchronousTestCase

from snq import config


class ConfigTests(SynchronousTestCase):
    def test_embeddedDefault(self):
        """No file, no environment: the SQLite default, usable as is."""
        c = config.load(None, environ={})
        self.assertEqual((c.queue.backend, c.db.url.reveal(), c.source),
                         ("db", "sqlite:///snq.sqlite", None))
        self.assertEqual(c.queue.groups, ["main"])
        self.assertEqual(c.maxRetries("anything"), 10)

    def test_siteWeight(self):
        """[sites.NICK] weight, over [sites.default]'s, 1 unless set."""
        c = config.parse({"sites": {"default": {"weight": 2},
                                    "big": {"weight": 10}, "small": {}}})
        self.assertEqual([c.siteWeight(s) for s in ("big", "small", "other")],
                         [10, 2, 2])
        self.assertEqual(config.parse({}).siteWeight("any"), 1)
        for bad in (0, -1, 1.5, True, "2", 1001):
            e = self.assertRaises(config.ConfigError, config.parse,
                                  {"sites": {"x": {"weight": bad}}}, "f")
            self.assertEqual(e.problems, [
                f"f: sites.x.weight: expected an integer from 1 to 1000, got"
                f" {bad!r}"])

    def test_rates(self):
        """Rate limits of transports and sites, as bucket names → per second."""
        c = config.parse({
            "transports": {"webhook": {"rate": "50/s"}, "log": {}},
            "sites": {"default": {"rate": "600/m"}, "big": {"rate": "2 / s"},
                      "same": {"rate": "10/s"}, "free": {}}})
        self.assertEqual(c.transport("webhook").ratePerSecond(), 50)
        self.assertIsNone(c.transport("log").ratePerSecond())
        self.assertEqual((c.siteRate("big"), c.siteRate("free")), (2, 10))
        self.assertEqual(c.rates(), {"t:webhook": 50, "s:": 10, "s:big": 2})
        self.assertEqual(config.parse({}).rates(), {})
        self.assertEqual(config.parseRate("36/h"), 0.01)
        for bad in ("0/s", "fast", "5/d", 5, "-1/s"):
            e = self.assertRaises(config.ConfigError, config.parse, {
                "transports": {"x": {"rate": bad}},
                "sites": {"x": {"rate": bad}}}, "f")
            self.assertEqual(len(e.problems), 2, e.problems)
            self.assertIn('f: sites.x.rate: expected a rate like "50/s", "600/m"'
                          ' or "10/h" ("" = no limit), got', str(e))

    def test_environment(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[queue]\nmax_retries = 3\n')
        c = config.load(None, environ={"SNQ_CONFIG": path})
        self.assertEqual((c.queue.max_retries, c.source), (3, path))

    def test_everyProblemNamed(self):
        """All problems at once, each with file, key and expectation."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[queue]\nbackend = "kafka"\nmax_retries = "ten"\n'
                    'typo = 1\n[transports.webhook]\nconcurrency = -1\n'
                    '[handlers]\nx = "not a path"\n[nonsense]\n')
        e = self.assertRaises(config.ConfigError, config.load, path, {})
        self.assertEqual(sorted(e.problems), sorted([
            f"{path}: nonsense: unknown section (known: cluster, daemon, db, "
            "handlers, iomanagers, ledger, monitor, queue, redis, schedule, sites, "
            "stomp, transports, xmpp)",
            f"{path}: queue.typo: unknown key (known: backend, groups, "
            "max_retries, retry_delay, retry_max_delay, prefetch, concurrency, "
            "poll_interval, lease, dead_letter_dir, basename, breakout, "
            "memory_limit, softlimit, max_items, spawndelay, max_frame, "
            "threads)",
            f"{path}: queue.backend: expected db | stomp | redis, got 'kafka'",
            f"{path}: queue.max_retries: expected an integer, got string 'ten'",
            f"{path}: transports.webhook.concurrency: expected a number from "
            "0 to 100000, got -1",
            f'{path}: handlers.x: expected "package.module:Class"',
        ]))

    def test_notToml(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[queue\n")
        e = self.assertRaises(config.ConfigError, config.load, path, {})
        self.assertIn(f"{path}: not valid TOML", str(e))

    def test_missingFile(self):
        e = self.assertRaises(config.ConfigError, config.load, "/nonexistent.toml")
        self.assertIn("/nonexistent.toml: cannot read", str(e))

    def test_transportsAndSites(self):
        c = config.parse({
            "queue": {"max_retries": 4},
            "transports": {"webhook": {"concurrency": 2, "timeout": 5,
                                       "max_retries": 1}},
            "sites": {"default": {"webhook_url": "http://a", "x": 1},
                      "ex": {"webhook_url": "http://b"}},
        })
        self.assertEqual(c.transport("webhook").concurrency, 2)
        self.assertEqual(c.transport("webhook").timeout, 5.0)
        self.assertIsInstance(c.transport("webhook").timeout, float)
        self.assertEqual((c.maxRetries("webhook"), c.maxRetries("log")), (1, 4))
        self.assertEqual(c.siteConfig("ex"), {"webhook_url": "http://b", "x": 1})
        self.assertEqual(c.siteConfig("other"), {"webhook_url": "http://a", "x": 1})

    def test_sizes(self):
        self.assertEqual(config.parseSize("512m"), 512 * 1024**2)
        self.assertEqual(config.parseSize("1.5k"), 1536)
        self.assertEqual(config.parseSize(""), None)
        self.assertEqual(config.parseSize(4096), 4096)
        c = config.parse({"queue": {"memory_limit": "100m"}})
        self.assertEqual(c.queue.softLimitBytes(), 90 * 1024**2)
        c = config.parse({"queue": {"memory_limit": "100m", "softlimit": "20m"}})
        self.assertEqual(c.queue.softLimitBytes(), 20 * 1024**2)
        self.assertIsNone(config.parse({}).queue.softLimitBytes())
        e = self.assertRaises(config.ConfigError, config.parse,
                              {"queue": {"softlimit": "lots"}}, "f")
        self.assertIn("f: queue.softlimit: expected bytes", str(e))

    def test_quorumQueues(self):
        """
        [stomp] queue_type is classic or quorum; quorum with max_priority is
        refused, naming the file, the key and why (RabbitMQ would refuse it
        at the first SUBSCRIBE).
        """
        self.assertEqual(config.parse({}).stomp.queue_type, "classic")
        self.assertEqual(config.parse({"stomp": {"queue_type": "quorum"}})
                         .stomp.queue_type, "quorum")
        e = self.assertRaises(config.ConfigError, config.parse,
                              {"stomp": {"queue_type": "stream"}}, "f")
        self.assertIn("f: stomp.queue_type: expected classic | quorum", str(e))
        e = self.assertRaises(config.ConfigError, config.parse, {"stomp": {
            "queue_type": "quorum", "max_priority": 5}}, "f")
        self.assertIn("f: stomp.queue_type: quorum cannot go with "
                      "stomp.max_priority (5): RabbitMQ refuses x-max-priority",
                      str(e))
