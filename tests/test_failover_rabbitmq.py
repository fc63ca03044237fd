# -*- test-case-name: tests.test_failover_rabbitmq -*-
"""
A RabbitMQ cluster end to end: three nodes of the test's own
(L{tests.rabbitcluster}), snq's queues declared as quorum queues
(C{[stomp] queue_type = "quorum"}), a real daemon whose workers consume
from every node, and the node holding the queue's leader (the first of
C{[stomp] servers}, where the workers also send) stopped mid-drain: every
item is handled, none lost.
"""

import itertools
import os
import time
from collections import Counter

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.client import Producer
from tests.daemon import Daemon, waitFor
from tests.rabbitcluster import RabbitCluster
from tests.recorder import recorded

CONFIG = """
[daemon]
workers = 2
kill_time = 5

[queue]
backend = "stomp"
concurrency = 20

[stomp]
servers = {servers}
queue_type = "quorum"
heartbeat = 2
connect_timeout = 5

[handlers]
stamp = "tests.recorder:Stamp"

[sites.default]
record_file = "{dir}/handled.txt"
"""

ITEMS = 3000
QUEUE = "snq/main"
#: What the workers may hold unacknowledged: 2 workers, a subscription on
#: each of 3 nodes, prefetch-count twice the concurrency.
WINDOW = 2 * 3 * 2 * 20


class RabbitClusterFailoverTests(TestCase):
    timeout = 300

    def setUp(self):
        self.cluster = RabbitCluster()
        self.addCleanup(self.cluster.stop)
        self.cluster.start()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.record = os.path.join(self.dir, "handled.txt")
        self.config = os.path.join(self.dir, "snq.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(servers=str(self.cluster.urls).replace("'", '"'),
                                  dir=self.dir))

    def handled(self):
        return [itemId for itemId, *_ in recorded(self.record)]

    def mainQueue(self, node):
        """C{snq/main} as C{node} sees it: type, leader, members, messages."""
        rows = [row for row in self.cluster.queues(
            node, "name", "type", "leader", "members", "messages")
            if row[0] == QUEUE]
        self.assertEqual(len(rows), 1, rows)
        _, kind, leader, members, messages = rows[0]
        return kind, leader, members, int(messages)

    @defer.inlineCallbacks
    def test_leaderNodeStoppedMidDrain(self):
        producer = Producer(config=snqconfig.load(self.config))
        self.addCleanup(producer.close)
        began = time.monotonic()
        ids = set(producer.enqueue_many("stamp", [{"sleep": 0.02}] * ITEMS))
        enqueued = time.monotonic() - began
        self.assertEqual(len(ids), ITEMS)
        first = self.cluster.nodes[0]
        # Its counts are the broker's statistics, a few seconds late.
        yield waitFor(lambda: self.mainQueue(first)[3] == ITEMS, timeout=60,
                      interval=1, what=f"{ITEMS} messages on the queue")
        kind, leader, members, _ = self.mainQueue(first)
        self.assertEqual(kind, "quorum")
        self.assertTrue(all(n.name in members for n in self.cluster.nodes),
                        f"a replica on every node: {members}")
        # The producer sent on node 1, which declared the queue: its leader
        # is there, and the workers send there too.
        self.assertEqual(leader, first.name)

        Daemon(self, self.dir, "-c", self.config)
        yield waitFor(lambda: len(self.handled()) >= ITEMS // 4, timeout=120,
                      what="a quarter of the items handled")
        connections = self.cluster.ctl(first, "list_stomp_connections", "-q",
                                       "--no-table-headers", "peer_port")
        # Each worker's (and the producer's, which it keeps).
        self.assertGreaterEqual(len(connections.split()), 2, connections)
        stopped = time.time()
        yield threads.deferToThread(self.cluster.stopNode, first)
        stopSeconds = time.time() - stopped
        yield waitFor(lambda: ids <= set(self.handled()), timeout=180,
                      what="every item handled after the node stopped")
        # A producer goes on the next node, and that item is handled too.
        late = producer.enqueue("stamp", {})
        yield waitFor(lambda: late in self.handled(), timeout=60,
                      what="an item enqueued after the stop handled")
        second = self.cluster.nodes[1]
        yield waitFor(lambda: self.mainQueue(second)[3] == 0, timeout=60,
                      interval=1, what="nothing left on the queue")
        kind, leader, members, _ = self.mainQueue(second)
        self.assertNotEqual(leader, first.name, "a new leader was elected")

        handled = self.handled()
        lost = ids - set(handled)
        twice = sum(n - 1 for n in Counter(handled).values())
        self.assertEqual(lost, set())
        self.assertLessEqual(twice, WINDOW, "more duplicates than in flight")
        starts = sorted(float(started) for *_, started in recorded(self.record))
        pause = max(b - a for a, b in itertools.pairwise(starts) if b >= stopped)
        print(f"\ncluster of 3 booted and joined in "
              f"{self.cluster.bootSeconds:.1f} s; {ITEMS} items enqueued on a "
              f"quorum queue in {enqueued:.2f} s, its leader's node stopped "
              f"after {ITEMS // 4}+ "
              f"(rabbitmqctl stop took {stopSeconds:.1f} s): {len(lost)} lost, "
              f"{twice} twice, longest pause between two items started "
              f"{pause:.1f} s, new leader {leader}")
