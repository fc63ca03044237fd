# -*- test-case-name: tests.test_reload_brokers -*-
"""
A reload on the listening backends: STOMP subscriptions and Redis lists
follow the config in a running worker.  STOMP on the fake broker of
L{tests.stomp_fakes} and a Clock; Redis's doorbells with fake connections.
The real servers are in L{tests.test_reload_integration}.
"""

from stompest.protocol import StompSpec
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.cluster import ClusterMissing, pauses
from snq.iomaster import IoMaster
from snq.item import Item
from snq.queues.stomp import StompQueue
from snq.redis.doorbell import Listener
from tests.test_stomp_backend import ConnectionTestCase, Recorder


def stompConfig(**queue):
    return snqconfig.parse({"queue": {"backend": "stomp", "concurrency": 1,
                                      **queue},
                            # StatusNet's unsigned control, as these tests send.
                            "stomp": {"servers": ["tcp://a:61613"],
                                      "control_allow_unsigned": True},
                            "handlers": {"rec": "tests.test_stomp_backend:Recorder"}})


class StompFollowTests(ConnectionTestCase):
    def setUp(self):
        super().setUp()
        # Reloads on the fake broker: the cluster's registry, which would
        # open sessions of its own on the STOMP broker, is tested apart
        # (tests.test_cluster_stomp).
        self.patch(pauses, "makeStore", self.noStore)
        Recorder.done = []
        self.reloads = []
        self.queue = StompQueue(stompConfig(), self.clock,
                                connect=lambda url: self.connection(url=url))
        self.master = IoMaster(stompConfig(), clock=self.clock, queue=self.queue,
                               reload=self.reloads.append)
        started = self.master.startService()
        self.broker.pump()
        self.successResultOf(started)

    @staticmethod
    def noStore(*args):
        raise ClusterMissing("not in these tests")

    def tearDown(self):
        for d in Recorder.done:
            if isinstance(d, defer.Deferred) and not d.called:
                d.callback(None)
        stopped = self.master.stopService()
        self.broker.pump()
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def reconfigure(self, config):
        d = self.master.reconfigService(config)
        self.broker.pump()
        return d

    def subscribed(self, connection):
        return sorted(d for d, _ in connection.subscriptions.values())

    def send(self, payload, destination="/queue/snq%2Fmain", connection=None):
        body = Item(transport="rec", payload=payload).toJSON()
        ackId = (connection or self.broker.last).deliver(destination, body)
        self.broker.pump()
        return ackId

    def acks(self, connection):
        return [f.headers["id"] for f in connection.frames
                if f.command == StompSpec.ACK]

    def nacks(self, connection):
        return [f.headers["id"] for f in connection.frames
                if f.command == StompSpec.NACK]

    def test_breakoutAddedIsSubscribedOnTheSameConnection(self):
        [connection] = self.broker.connections
        applied = self.successResultOf(self.reconfigure(stompConfig(
            breakout=["main/rec", "other/x"])))
        self.assertEqual(applied, ["subscribed to /queue/snq/main/rec"])
        self.assertEqual(self.broker.connections, [connection])
        self.assertEqual(self.subscribed(connection), [
            "/queue/snq%2Fmain", "/queue/snq%2Fmain%2Frec", "/topic/snq%2Fcontrol"])
        self.send("b", "/queue/snq%2Fmain%2Frec")
        self.assertEqual(Recorder.done, ["b"])

    def test_removalRetiresTheConnectionLosingNothing(self):
        """
        The new connection subscribes to what stays; on the old one the
        running item finishes and is acknowledged there, what waits is
        NACKed, what it delivers meanwhile is left to the broker, and it is
        then closed (RabbitMQ gives that back at DISCONNECT).
        """
        self.successResultOf(self.reconfigure(stompConfig(breakout=["main/rec"])))
        [old] = self.broker.connections
        running = self.send("wait", "/queue/snq%2Fmain%2Frec")
        waiting = [self.send(n) for n in range(2)]
        self.assertEqual(len(self.master.dispatcher.held), 3)
        d = self.reconfigure(stompConfig())
        self.assertNoResult(d)
        [_, new] = self.broker.connections
        self.assertEqual(self.subscribed(new),
                         ["/queue/snq%2Fmain", "/topic/snq%2Fcontrol"])
        self.assertEqual(self.nacks(old), waiting)
        late = self.send("late", connection=old)
        self.assertEqual(Recorder.done[1:], [], "neither the late one nor the "
                                                "waiting ones ran here")
        self.assertTrue(old.open)
        Recorder.done[0].callback(None)
        self.broker.pump()
        self.assertEqual(self.successResultOf(d),
                         ["unsubscribed from /queue/snq/main/rec"])
        self.assertEqual(self.acks(old), [running])
        self.assertNotIn(late, self.acks(old) + self.nacks(old))
        self.assertIn(StompSpec.DISCONNECT, [f.command for f in old.frames])
        self.assertFalse(old.open)
        self.assertEqual(self.queue.retiring, [])
        self.send(7, connection=new)
        self.assertEqual(Recorder.done[1:], [7])

    def test_prefetchChangeSubscribesAgain(self):
        applied = self.successResultOf(self.reconfigure(stompConfig(concurrency=4)))
        self.assertEqual(applied, ["prefetch-count 8"])
        new = self.broker.last
        self.assertEqual({h["prefetch-count"] for _, h in new.subscriptions.values()
                          if h["ack"] != "auto"}, {"8"})

    def test_routingFollows(self):
        self.successResultOf(self.reconfigure(stompConfig(breakout=["main/rec/big"])))
        self.assertEqual(self.queue.destinations.route("rec", "big"),
                         "/queue/snq/main/rec/big")

    def test_siteWorkerTakesOnlyItsBreakouts(self):
        self.master.site = "big"
        applied = self.successResultOf(self.reconfigure(stompConfig(
            breakout=["main/rec/big", "main/rec/small", "main/other"])))
        self.assertEqual(applied, ["subscribed to /queue/snq/main/rec/big",
                                   "unsubscribed from /queue/snq/main"])

    def test_controlUpdateAsksTheMasterToReload(self):
        self.broker.last.deliver("/topic/snq%2Fcontrol", b"update:big")
        self.assertEqual(self.reloads, ["update:big from the control channel"])
        self.assertEqual(self.master.stats.counts["siteupdate", "", "big"], 1)


class FakeDoorbell:
    def __init__(self, key):
        self.key = key
        self.stopped = True
        self.starts = 0

    def start(self):
        self.stopped = False
        self.starts += 1

    def stop(self):
        self.stopped = True
        return defer.succeed(None)


class RedisListenerTests(SynchronousTestCase):
    def test_followKeepsStartsStops(self):
        made = []

        def make(key):
            made.append(FakeDoorbell(key))
            return made[-1]

        listener = Listener(["q:main", "q:main/a"], make)
        main, a = made
        self.successResultOf(listener.follow(["q:main", "q:main/b"]))
        b = made[2]
        self.assertEqual(listener.doorbells, [main, b])
        self.assertEqual((main.starts, main.stopped), (1, False), "kept as it was")
        self.assertTrue(a.stopped)
        self.assertEqual((b.starts, b.stopped), (1, False))

