"""The manual's examples of snq.client (L{tests.examples.producer}) run."""

import os
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from snq.client import EnqueueError, Producer
from snq.item import Item
from tests import sqlservers
from tests.daemon import freePort, snqctl
from tests.examples import producer as examples


class ProducerExamples(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = os.path.join(self.dir, "snq.sqlite")
        self.config = os.path.join(self.dir, "snq.toml")
        with open(self.config, "w") as f:
            f.write(f'[db]\nurl = "sqlite:///{self.db}"\n')
        snqctl("-c", self.config, "db", "init", cwd=self.dir)

    def frames(self):
        conn = sqlite3.connect(self.db)
        try:
            return [Item.fromJSON(frame) for (frame,) in
                    conn.execute("SELECT frame FROM queue_item ORDER BY id")]
        finally:
            conn.close()

    def test_basics(self):
        ids = examples.basics(self.config)
        items = self.frames()
        self.assertEqual(len(items), 7)
        self.assertEqual([items[0].id, *[i.id for i in items[4:]]], ids)
        self.assertEqual((items[1].site, items[1].priority), ("example", 5))
        self.assertAlmostEqual(items[2].run_at - items[2].created, 3600, places=3)
        self.assertEqual(items[3].run_at, 1925020800.0)

    def test_errors(self):
        down = Producer(f"redis://127.0.0.1:{freePort()}/0")
        self.addCleanup(down.close)
        kept = []
        examples.errors(down, kept.append)
        [error] = kept
        self.assertIsInstance(error, EnqueueError)

    def test_transactions(self):
        server = sqlservers.forTest(self, sqlservers.Postgres)
        server.sql("CREATE TABLE post (body TEXT)")
        with open(self.config, "w") as f:
            f.write(f'[db]\nurl = "{server.url()}"\n')
        snqctl("-c", self.config, "db", "init", cwd=self.dir)
        producer = Producer(server.url())
        self.addCleanup(producer.close)
        examples.dbApi(producer, server.url())
        examples.sqlalchemy(producer, server.url().replace(
            "postgresql://", "postgresql+psycopg://"))
        self.assertEqual(server.count("post"), 2)
        self.assertEqual(server.count(), 2)
