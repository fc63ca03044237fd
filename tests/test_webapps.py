# -*- test-case-name: tests.test_webapps -*-
"""
A Django project and a Flask app (L{tests.webapps}) enqueue from a view,
each in a process of its own that imports no Twisted, and a running daemon
handles the items: Django's in the view's own transaction (a view that
fails after enqueueing leaves neither its row nor its item), Flask's on
Redis.
"""

import json
import os
import sqlite3
import subprocess
import sys

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.daemon import environ, waitFor
from tests.rabbitmq import uniqueName
from tests.stampdaemon import StampDaemon, deleteRedisKeys


class WebAppTests(TestCase):
    timeout = 120

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = os.path.join(self.dir, "app.sqlite")
        self.name = uniqueName()

    @defer.inlineCallbacks
    def serve(self, backend):
        """The daemon for C{backend}, started; → the config's path."""
        self.stamps = StampDaemon(self, self.dir, backend, self.name,
                                  dbUrl=f"sqlite:///{self.db}")
        yield self.stamps.start()
        return self.stamps.config

    @defer.inlineCallbacks
    def request(self, app, config):
        result = yield threads.deferToThread(
            subprocess.run, [sys.executable, "-m", "tests.webapps.run", app],
            capture_output=True, text=True, cwd=self.dir, timeout=60,
            env=environ(SNQ_CONFIG=config, SNQ_WEBAPP_DB=self.db))
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertFalse(report["twisted"], f"{app} imported Twisted")
        return report["answers"]

    def handled(self):
        return self.stamps.handledIds()

    def sql(self, statement):
        conn = sqlite3.connect(self.db)
        try:
            rows = conn.execute(statement).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()

    @defer.inlineCallbacks
    def test_djangoViewInItsTransaction(self):
        config = yield self.serve("db")
        self.sql("CREATE TABLE signup (name TEXT)")
        [(ok, body), (failed, _)] = yield self.request("django", config)
        self.assertEqual((ok, failed), (200, 500))
        yield waitFor(lambda: self.handled() == [body["id"]],
                      what="the signup's item handled")
        self.assertEqual(self.sql("SELECT name FROM signup"), [("alice",)])
        self.assertEqual(self.sql("SELECT count(*) FROM queue_item"), [(0,)])

    @defer.inlineCallbacks
    def test_flaskView(self):
        self.addCleanup(deleteRedisKeys, f"{self.name}:")
        config = yield self.serve("redis")
        [(status, body)] = yield self.request("flask", config)
        self.assertEqual(status, 200)
        yield waitFor(lambda: self.handled() == [body["id"]],
                      what="the item handled")
