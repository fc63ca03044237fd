# -*- test-case-name: tests.test_stomp_integration_daemon -*-
"""
Whole daemons on the real RabbitMQ: C{twistd -n snq} processes consuming
queues of their own (C{snqtest-…}), items put there by C{snqctl} or by a
plain STOMP producer; worker kills, a broker restart, two daemons, bad
frames, the control channel.
"""

import ast
import json
import os
import signal
import time

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from snq.item import Item
from tests import rabbitmq
from tests.daemon import Daemon, handledIds, snqctl, waitFor

CONFIG = """
[daemon]
workers = 1
kill_time = 5
threshold = 0.1

[queue]
backend = "stomp"
basename = "/queue/{name}/"
concurrency = {concurrency}
retry_delay = 0.2
dead_letter_dir = "{dir}/dead"

[stomp]
control_channel = "/topic/{name}/control"
control_secret = "{secret}"
heartbeat = 2

[handlers]
record = "tests.recorder:Record"

[sites.default]
record_file = "{dir}/handled.txt"
"""


class StompDaemonTests(TestCase):
    timeout = 180

    def setUp(self):
        rabbitmq.requireRabbitMQ()
        self.name = rabbitmq.uniqueName()
        self.addCleanup(rabbitmq.deleteQueues, self.name)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "snq.toml")
        self.configure()
        self.record = os.path.join(self.dir, "handled.txt")

    def configure(self, concurrency=50, secret=""):
        with open(self.config, "w") as f:
            f.write(CONFIG.format(name=self.name, dir=self.dir,
                                  concurrency=concurrency, secret=secret))

    def daemon(self, *args):
        return Daemon(self, self.dir, "-c", self.config, *args)

    @defer.inlineCallbacks
    def started(self, *args):
        daemon = self.daemon(*args)
        yield waitFor(lambda: "consuming groups" in daemon.output(),
                      what="the daemon to start")
        return daemon

    def enqueue(self, n, payload="{}"):
        result = snqctl("-c", self.config, "enqueue", "record", "-", cwd=self.dir,
                        stdin=(payload + "\n") * n)
        self.assertEqual(result.stdout.strip(), f"enqueued {n} items on record")

    def main(self):
        """The group queue's (ready, unacknowledged) messages."""
        return rabbitmq.queueDepths(self.name).get(f"{self.name}/main")

    def produce(self, bodies):
        return threads.deferToThread(rabbitmq.produce,
                                     f"/queue/{self.name}%2Fmain", bodies)

    @defer.inlineCallbacks
    def test_tenThousandItems(self):
        self.enqueue(10_000)
        self.assertEqual(self.main(), (10_000, 0))
        start = time.monotonic()
        daemon = self.daemon("--inline")
        yield waitFor(lambda: len(handledIds(self.record)) >= 10_000,
                      what="10,000 items handled")
        elapsed = time.monotonic() - start
        handled = handledIds(self.record)
        self.assertEqual(len(set(handled)), 10_000)
        self.assertEqual(len(handled), 10_000, "no item twice without a crash")
        yield waitFor(lambda: self.main() == (0, 0), what="all acknowledged")
        self.assertTrue(daemon.alive())
        print(f"\n10,000 items drained in {elapsed:.1f} s, process start "
              f"included ({10_000 / elapsed:,.0f} items/s)")

    @defer.inlineCallbacks
    def test_killDashNineRedelivers(self):
        self.configure(concurrency=20)
        self.enqueue(1_000, '{"sleep": 0.05}')
        first = yield self.started("--inline")
        yield waitFor(lambda: len(handledIds(self.record)) >= 200,
                      what="a drain under way")
        first.kill(signal.SIGKILL)
        before = set(handledIds(self.record))
        self.assertLess(len(before), 1_000, "killed mid-drain")
        yield waitFor(lambda: self.main()[1] == 0,
                      what="the killed worker's messages back in the queue")
        ready, _ = self.main()
        self.assertGreaterEqual(ready, 1_000 - len(before))
        self.daemon("--inline")
        yield waitFor(lambda: len(set(handledIds(self.record))) >= 1_000,
                      what="every item handled after the kill")
        handled = handledIds(self.record)
        self.assertEqual(len(set(handled)), 1_000)
        # Twice only what the killed worker had running (at most its
        # concurrency), whose acknowledgements it never sent.
        self.assertLessEqual(len(handled) - 1_000, 20)
        yield waitFor(lambda: self.main() == (0, 0), what="all acknowledged")

    @defer.inlineCallbacks
    def test_brokerRestartMidDrain(self):
        self.addCleanup(rabbitmq.rabbitmqctl, "start_app")
        self.configure(concurrency=20)
        self.enqueue(3_000, '{"sleep": 0.05}')
        daemon = yield self.started("--inline")
        yield waitFor(lambda: len(handledIds(self.record)) >= 300,
                      what="a drain under way")
        yield threads.deferToThread(rabbitmq.rabbitmqctl, "stop_app")
        during = len(set(handledIds(self.record)))
        self.assertLess(during, 3_000, "stopped mid-drain")
        yield threads.deferToThread(rabbitmq.rabbitmqctl, "start_app")
        rabbitmq.requireRabbitMQ()
        yield waitFor(lambda: len(set(handledIds(self.record))) >= 3_000,
                      timeout=120, what="every item handled after the restart")
        output = daemon.output()
        self.assertTrue(daemon.alive())
        self.assertIn("lost STOMP server", output)
        self.assertEqual(output.count("connected to STOMP server"), 2, output)
        yield waitFor(lambda: self.main() == (0, 0), what="all acknowledged")
        handled = handledIds(self.record)
        self.assertEqual(len(set(handled)), 3_000)
        # Twice only what the broker gives again: what the worker held (its
        # window, prefetch-count 40), which it may well finish while the
        # stopping broker keeps the connection open but no longer takes
        # acknowledgements, and the few acknowledgements in flight before.
        self.assertLessEqual(len(handled) - 3_000, 2 * 40)
        print(f"\n{len(handled) - 3_000} items handled twice")

    @defer.inlineCallbacks
    def test_twoDaemonsShareTheQueue(self):
        daemons = [self.daemon("--inline") for _ in range(2)]
        for daemon in daemons:
            yield waitFor(lambda d=daemon: "consuming groups" in d.output(),
                          what="both daemons to start")
        self.enqueue(4_000, '{"sleep": 0.001}')
        yield waitFor(lambda: len(handledIds(self.record)) >= 4_000,
                      what="4,000 items handled by two daemons")
        handled = handledIds(self.record)
        self.assertEqual(len(handled), 4_000)
        self.assertEqual(len(set(handled)), 4_000, "none twice")
        shares = []
        for daemon in daemons:
            daemon.process.send_signal(signal.SIGTERM)
            daemon.process.wait(30)
            stats = [line for line in daemon.output().splitlines()
                     if "stopped: {" in line]
            shares.append(ast.literal_eval(
                stats[-1].split("stopped: ", 1)[1])["handled"])
        self.assertEqual(sum(shares), 4_000)
        self.assertTrue(all(shares), f"both took a share: {shares}")
        self.assertEqual(self.main(), (0, 0))

    @defer.inlineCallbacks
    def test_malformedBodiesDeadLettered(self):
        daemon = yield self.started("--inline")
        bad = [b"not json", b"\xff\xfe", json.dumps({"payload": 1}).encode(),
               json.dumps({"transport": "nosuch", "payload": 1}).encode()]
        good = Item(transport="record", payload={})
        yield self.produce([*bad, good.toJSON()])
        yield waitFor(lambda: handledIds(self.record) == [good.id],
                      what="the good item after the bad ones")
        self.assertTrue(daemon.alive())
        listing = snqctl("-c", self.config, "dead", "list", "--json",
                         cwd=self.dir).stdout
        letters = [json.loads(line) for line in listing.splitlines()]
        self.assertEqual(sorted(dl["reason"] for dl in letters),
                         ["badhandler", "baditem", "baditem", "baditem"])
        errors = {dl["error"] for dl in letters}
        self.assertIn("no handler for transport 'nosuch'", errors)
        self.assertIn("envelope has no 'transport'", errors)
        self.assertTrue(any(e.startswith("frame is not JSON") for e in errors))
        self.assertTrue(any(e.startswith("frame is not UTF-8") for e in errors))
        self.assertEqual(len(os.listdir(os.path.join(self.dir, "dead"))), 4)
        shown = snqctl("-c", self.config, "dead", "show", str(letters[-1]["id"]),
                       cwd=self.dir).stdout
        self.assertIn("frame: not json", shown)
        self.assertEqual(self.main(), (0, 0))
        self.assertEqual(
            len(snqctl("-c", self.config, "dead", "list", "--json",
                       cwd=self.dir).stdout.splitlines()), 4, "still all there")

    @defer.inlineCallbacks
    def test_fanoutEnqueuesThroughTheBroker(self):
        """The handlers' enqueue API (fanout) routes new items by group."""
        daemon = yield self.started("--inline")
        snqctl("-c", self.config, "enqueue", "fanout", json.dumps(
            {"transports": ["record", "record", "xmppout"], "payload": {}}),
            cwd=self.dir)
        yield waitFor(lambda: len(handledIds(self.record)) == 2,
                      what="two record items from one fanout")
        yield waitFor(lambda: rabbitmq.queueDepths(self.name).get(
            f"{self.name}/xmpp") == (1, 0), what="xmppout on the xmpp queue")
        self.assertTrue(daemon.alive())
        self.assertEqual(self.main(), (0, 0))

    @defer.inlineCallbacks
    def test_controlChannelWithASecret(self):
        """
        Unsigned and forged control messages are refused and the worker
        keeps working; a signed shutdown (snqctl) stops the worker for good,
        and with its only worker down the daemon exits.
        """
        self.configure(secret="the-secret")
        daemon = yield self.started()
        control = f"/topic/{self.name}%2Fcontrol"
        yield threads.deferToThread(rabbitmq.produce, control, [b"shutdown"])
        forged = {"snq-timestamp": f"{time.time():.3f}", "snq-nonce": "abc",
                  "snq-signature": "0" * 64}
        yield threads.deferToThread(rabbitmq.produce, control, [b"shutdown"],
                                    forged)
        yield waitFor(lambda: daemon.output().count("control message refused")
                      == 2, what="two refusals")
        output = daemon.output()
        self.assertIn("it is not signed", output)
        self.assertIn("its signature is wrong", output)
        self.enqueue(1)
        yield waitFor(lambda: len(handledIds(self.record)) == 1,
                      what="an item handled after the refusals")
        self.assertTrue(daemon.alive())
        result = snqctl("-c", self.config, "control", "shutdown", cwd=self.dir)
        self.assertIn("(signed)", result.stdout)
        yield waitFor(lambda: not daemon.alive(), timeout=30,
                      what="the daemon to exit after a signed shutdown")
        self.assertIn("exit status 100", daemon.output())
