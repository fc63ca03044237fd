# -*- test-case-name: tests.test_secret -*-
"""
Secrets never printed: the L{Secret} type, URLs masked, the config's
errors and a reload's diff.  The whole daemon is grepped for planted
secrets in L{tests.test_secret_integration}.
"""

import math

from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.queues.db import DbQueue
from snq.reconfig import diff
from snq.redis.address import RedisAddress
from snq.secret import Secret, maskURL, reveal


class SecretTests(SynchronousTestCase):
    def test_neverShown(self):
        s = Secret("hunter2")
        for shown in (repr(s), str(s), f"{s}", f"{s!r}", f"{s:>10}",
                      repr([s]), repr({"k": s}), repr(snqconfig.StompConfig(
                          passcode=s))):
            self.assertNotIn("hunter2", shown)
            self.assertIn("***", shown)
        self.assertEqual(s.reveal(), "hunter2")
        self.assertEqual(reveal(s), "hunter2")
        self.assertEqual(reveal("plain"), "plain")

    def test_emptyShowsEmpty(self):
        self.assertEqual((repr(Secret("")), bool(Secret("")), bool(Secret("x"))),
                         ("''", False, True))

    def test_comparedByValue(self):
        self.assertEqual(Secret("a"), Secret("a"))
        self.assertNotEqual(Secret("a"), Secret("b"))
        self.assertNotEqual(Secret("a"), "a")
        self.assertEqual(len({Secret("a"), Secret("a")}), 1)

    def test_url(self):
        s = Secret.url("postgresql://snq:pw@db/q")
        self.assertEqual(repr(s), "'postgresql://snq:***@db/q'")
        self.assertEqual(s.reveal(), "postgresql://snq:pw@db/q")


class MaskURLTests(SynchronousTestCase):
    def test_cases(self):
        for url, shown in (
            ("postgresql://snq:pa#ss@h/db", "postgresql://snq:***@h/db"),
            ("postgresql://snq:pa?ss@h/db", "postgresql://snq:***@h/db"),
            ("mysql://snq:p@ss/w:rd@h:3306/db", "mysql://snq:***@h:3306/db"),
            ("postgresql://snq@h/db?sslpassword=X&sslmode=require",
             "postgresql://snq@h/db?sslpassword=***&sslmode=require"),
            ("mysql://root@h/db?password=X", "mysql://root@h/db?password=***"),
            ("https://h/hook?token=T&x=1#access_token=Z",
             "https://h/hook?token=***&x=1#access_token=***"),
            ("https://h/hook?api_key=K&apikey=K&sig=S&keywords=a",
             "https://h/hook?api_key=***&apikey=***&sig=***&keywords=a"),
            ("http://h/x?token=S:x&e=a@b", "http://h/x?token=***&e=a@b"),
            ("http://example.org/hook?email=a@b", "http://example.org/hook?email=a@b"),
            ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
            ("sqlite:///var/lib/snq/snq.sqlite", "sqlite:///var/lib/snq/snq.sqlite"),
            ("tcp://127.0.0.1:61613", "tcp://127.0.0.1:61613"),
        ):
            self.assertEqual(maskURL(url), shown, url)

    def test_describers(self):
        """Every queue's describe() goes through maskURL."""
        for url in ("postgresql://snq:S3#CRET@h/db",
                    "postgresql://snq:S3?CRET@h/db",
                    "postgresql://snq@h/db?sslpassword=S3CRET",
                    "mysql://snq@h/db?password=S3CRET"):
            self.assertNotIn("S3", DbQueue(url, 60).describe(), url)
        address = RedisAddress.fromURL("rediss://u:S3%23C%3FRET@h:6380/2")
        self.assertEqual(address.describe(), "rediss://u:***@h:6380/2")


class ConfigTests(SynchronousTestCase):
    def problems(self, data):
        return snqconfig.ConfigError.__str__(self.assertRaises(
            snqconfig.ConfigError, snqconfig.parse, data))

    def test_errorsDoNotEchoSecrets(self):
        text = self.problems({
            "db": {"url": "postgres://snq:LEAKED-PW@h/db"},
            "redis": {"url": "http://:LEAKED-REDIS@h/"},
            "stomp": {"passcode": 12345, "control_secret": ["LEAKED-CS"]},
            "monitor": {"token": 42.5},
            "xmpp": {"jid": "a@b", "password": 98765},
        })
        for leaked in ("LEAKED", "12345", "98765", "42.5"):
            self.assertNotIn(leaked, text)
        self.assertIn("db.url: expected sqlite:///PATH, mysql://USER:PASS@HOST:"
                      "PORT/DB or postgresql://USER:PASS@HOST:PORT/DB, got "
                      "'postgres://snq:***@h/db'", text)
        self.assertIn("stomp.passcode: expected a string, got integer (not "
                      "shown: a secret)", text)

    def test_otherValuesCutShort(self):
        text = self.problems({"queue": {"backend": "x" * 500}})
        self.assertLess(len(text), 200)

    def test_nonFiniteDurationsRefused(self):
        for section, key in (("queue", "lease"), ("daemon", "kill_time"),
                             ("redis", "timeout"), ("stomp", "connect_timeout"),
                             ("queue", "poll_interval"), ("stomp", "heartbeat")):
            for value in (math.inf, math.nan):
                self.assertIn(f"<config>: {section}.{key}: expected a finite "
                              f"number, got {value}",
                              self.problems({section: {key: value}}))
        self.assertIn("transports.webhook.timeout: expected a finite number",
                      self.problems({"transports": {"webhook": {"timeout": math.inf}}}))
        self.assertIn("xmpp.connect_timeout: expected a finite number",
                      self.problems({"xmpp": {"jid": "a@b", "password": "p",
                                              "connect_timeout": math.inf}}))

    def test_absurdCountsRefused(self):
        for section, key, value, expected in (
                ("daemon", "workers", 100_000_000, "a number from 0 to 1024"),
                ("queue", "prefetch", 10**9, "a number from 1 to 100000"),
                ("queue", "concurrency", 0, "a number from 1 to 100000"),
                ("queue", "max_retries", 10**12, "a number from 0 to 10000"),
                ("stomp", "prefetch", 10**7, "a number from 0 to 100000")):
            self.assertIn(f"<config>: {section}.{key}: expected {expected}, got "
                          f"{value}", self.problems({section: {key: value}}))
        snqconfig.parse({"daemon": {"workers": 64}})

    def test_siteSecrets(self):
        """Secret-named site keys are Secrets; handlers reveal() them."""
        config = snqconfig.parse({"sites": {"ex": {
            "webhook_secret": "W", "api_token": "T", "db_password": "P",
            "private_key": "K", "webhook_url": "https://h/?token=Q", "x": 1,
            "nested": {"auth": "A"}}}})
        site = config.siteConfig("ex")
        for key in ("webhook_secret", "api_token", "db_password", "private_key"):
            self.assertIsInstance(site[key], Secret, key)
        self.assertEqual(site["webhook_secret"].reveal(), "W")
        self.assertEqual((site["webhook_url"], site["x"]), ("https://h/?token=Q", 1))
        self.assertIsInstance(site["nested"]["auth"], Secret)


class DiffTests(SynchronousTestCase):
    def test_secretsMasked(self):
        old = snqconfig.parse({
            "db": {"url": "postgresql://snq:OLD-PG@h/db"},
            "stomp": {"passcode": "OLD-PC", "control_secret": "OLD-CS"},
            "monitor": {"token": "OLD-TOKEN"},
            "xmpp": {"jid": "a@b", "password": "OLD-XMPP"},
            "sites": {"ex": {"webhook_secret": "OLD-WH", "webhook_url":
                             "https://h/?token=OLD-Q", "x": 1,
                             "xmpp": {"jid": "c@d", "password": "OLD-SX"}}}})
        new = snqconfig.parse({
            "db": {"url": "postgresql://snq:NEW-PG@h/db"},
            "stomp": {"passcode": "NEW-PC", "control_secret": "NEW-CS"},
            "monitor": {"token": "NEW-TOKEN"},
            "xmpp": {"jid": "a@b", "password": "NEW-XMPP"},
            "sites": {"ex": {"webhook_secret": "NEW-WH", "webhook_url":
                             "https://h/?token=NEW-Q", "x": 2,
                             "xmpp": {"jid": "c@d", "password": "NEW-SX"}},
                      "added": {"api_token": "NEW-T", "u": "https://u:NEW-U@h/"}}})
        lines = [c.describe() for c in diff(old, new)]
        text = "\n".join(lines + [repr(c) for c in diff(old, new)])
        for word in ("OLD", "NEW"):
            self.assertNotIn(word, text)
        self.assertIn("xmpp.password: '***' → '***' (applied in place)", lines)
        self.assertIn("db.url: 'postgresql://snq:***@h/db' → 'postgresql://snq:"
                      "***@h/db' (rolling restart)", lines)
        self.assertIn("sites.ex.x: 1 → 2 (applied in place)", lines)
        self.assertIn("sites.ex.webhook_url: 'https://h/?token=***' → "
                      "'https://h/?token=***' (applied in place)", lines)
