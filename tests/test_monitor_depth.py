# -*- test-case-name: tests.test_monitor_depth -*-
"""
C{Queue.depth()}: the same numbers from the in-memory queue and from the
SQL queue on SQLite, MariaDB and PostgreSQL (real servers on 127.0.0.1,
each test in a database of its own).
"""

import uuid

from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from snq.item import Item
from snq.queues.db import DbQueue
from snq.queues.interface import Depth, Queue, TransportDepth
from snq.queues.memory import MemoryQueue
from snq.routing import TransportFilter


class DepthScenario:
    """
    Four items of C{t} due at t=1000, two of C{u} enqueued at t=1010 with a
    delay of 100 s, two claimed, one of those dead-lettered.
    """

    def makeQueue(self, clock):
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_depth(self):
        clock = Clock()
        clock.advance(1000)
        queue = yield self.makeQueue(clock)
        empty = yield queue.depth()
        self.assertEqual(empty, Depth(ready=0, delayed=0, held=0, dead=0,
                                      oldest=None, transports={}))
        yield queue.enqueue([Item(transport="t", payload=i, created=1000)
                             for i in range(4)])
        clock.advance(10)
        yield queue.enqueue([Item(transport="u", payload=i, created=1010)
                             for i in range(2)], delay=100)
        claimed = yield queue.claim(2, TransportFilter())
        self.assertEqual(len(claimed), 2)
        yield queue.deadLetter(claimed[0], "rejected", "no", 1)
        depth = yield queue.depth()
        self.assertEqual(depth, Depth(
            ready=2, delayed=2, held=1, dead=1, oldest=10.0, transports={
                "t": TransportDepth(ready=2, delayed=0, held=1, oldest=10.0),
                "u": TransportDepth(ready=0, delayed=2, held=0, oldest=None)}))
        self.assertEqual(depth.transports["t"].waiting, 3)
        yield queue.ack(claimed[1])
        rest = yield queue.claim(10, TransportFilter())
        for delivery in rest:
            yield queue.ack(delivery)
        depth = yield queue.depth()
        self.assertEqual(depth, Depth(
            ready=0, delayed=2, held=0, dead=1, oldest=None, transports={
                "u": TransportDepth(ready=0, delayed=2, held=0, oldest=None)}))


class MemoryDepthTests(DepthScenario, TestCase):
    def makeQueue(self, clock):
        return defer.succeed(MemoryQueue(clock))


class DbDepth(DepthScenario):
    @defer.inlineCallbacks
    def makeQueue(self, clock):
        url = yield self.database()
        queue = DbQueue(url, 60.0, clock=clock, claimant="depth")
        self.addCleanup(queue.close)
        yield queue.open()
        return queue


class SqliteDepthTests(DbDepth, TestCase):
    def database(self):
        return defer.succeed(f"sqlite:///{self.mktemp()}")


def _serverDatabase(testCase, connect, url):
    """
    A fresh database on a server, dropped after the test; the test fails,
    saying so, when the server does not answer.
    """
    name = f"snq_depth_{uuid.uuid4().hex[:10]}"

    def run(statement):
        try:
            conn = connect()
        except Exception as e:
            raise AssertionError(f"cannot connect to {url}: {e} (run "
                                 "scripts/setup-services)") from e
        try:
            conn.cursor().execute(statement)
        finally:
            conn.close()

    d = threads.deferToThread(run, f"CREATE DATABASE {name}")

    def created(_):
        testCase.addCleanup(threads.deferToThread, run, f"DROP DATABASE {name}")
        return f"{url}/{name}"

    return d.addCallback(created)


class MariadbDepthTests(DbDepth, TestCase):
    def database(self):
        import pymysql

        return _serverDatabase(
            self, lambda: pymysql.connect(host="127.0.0.1", port=3306,
                                          user="root", autocommit=True),
            "mysql://root@127.0.0.1:3306")


class PostgresDepthTests(DbDepth, TestCase):
    def database(self):
        import psycopg

        return _serverDatabase(
            self, lambda: psycopg.connect("host=127.0.0.1 port=5432 "
                                          "user=postgres dbname=postgres",
                                          autocommit=True),
            "postgresql://postgres@127.0.0.1:5432")


class NoDepthTests(TestCase):
    def test_defaultIsNotAvailable(self):
        """A backend that cannot count says None, not zero."""
        self.assertIsNone(self.successResultOf(Queue().depth()))
