"""
Enqueue rate from a web application's side: L{snq.client.Producer} on
every backend, one item per call and in batches, beside Celery's
C{apply_async} and Dramatiq's C{send} on the same brokers (Redis, and
RabbitMQ: snq over STOMP, the peers over AMQP), in the same run, one
thread, no worker running.  Each figure is items stored per second of wall
time, with what each call waits for:

* snq: every call returns once the item is stored: committed (SQL),
  Redis's answer to its LPUSH (one command per call, on snq's own RESP
  client), the broker's RECEIPT for a persistent message (STOMP; RabbitMQ
  answers once the message is safe).
* Celery 5 with its defaults: on Redis, LPUSH's answer; on AMQP, nothing
  (no publisher confirms), so also with C{confirm_publish}.
* Dramatiq 2 with its defaults: on Redis, its enqueue script's answer; on
  AMQP, nothing, so also with C{confirm_delivery}.

Run from the repository root (the servers of the integration tests, see
L{tests.sqlservers} and L{tests.rabbitmq}; C{pip install -e .[bench]}):

    python -m bench.enqueue [--items 2000] [--batch 100] [--rounds 3]
                            [--slices 10]

A round gives every contender its items in slices, taking turns slice by
slice, so that a burst of load elsewhere on the machine (a second or two)
falls on all contenders alike rather than on one; a contender's figure for
the round is its items over the sum of its slices' times.  The median of
the rounds is shown; every round's figure, with the machine and its load
before and after, goes to C{bench/results/enqueue-TIME.json}.

Uses a database of its own on PostgreSQL and MariaDB (dropped
afterwards), database 15 of the Redis on 127.0.0.1:6379 (emptied before
and after), and queues named C{snqbench-…} on RabbitMQ (deleted after).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import redis

from bench.common import machine, save, table
from snq import config as snqconfig
from snq.client import Producer
from tests import rabbitmq, sqlservers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIS_URL = "redis://127.0.0.1:6379/15"
#: The vhost "/", as kombu (Celery) and pika (Dramatiq) spell it.
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
PIKA_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
PAYLOAD = {"user": 42, "event": "follow", "url": "https://example.org/hook"}


def noop(**payload):
    """The peers' task: never run here (no worker), only enqueued."""


class Contender:
    """One way to enqueue: C{send(n)} stores one item, C{sendMany(ns)} several."""

    batch = None

    def __init__(self, broker, system):
        self.broker, self.system = broker, system
        self.rates = []

    def send(self, n):
        raise NotImplementedError

    def sendMany(self, ns):
        raise NotImplementedError

    def warm(self):
        """Connect, declare, load scripts: not part of the rate."""
        if self.batch:
            self.sendMany(list(range(self.batch)))
        else:
            self.send(-1)

    def run(self, items) -> float:
        """Send C{items}; → the seconds it took."""
        start = time.perf_counter()
        if self.batch:
            for first in range(0, items, self.batch):
                self.sendMany(list(range(first, min(first + self.batch, items))))
        else:
            for n in range(items):
                self.send(n)
        return time.perf_counter() - start

    def close(self):
        pass


class Snq(Contender):
    def __init__(self, broker, config, batch=None):
        super().__init__(broker, "snq Producer." + (
            f"enqueue_many ({batch})" if batch else "enqueue"))
        self.producer = Producer(config=config)
        self.batch = batch

    def send(self, n):
        self.producer.enqueue("noop", {**PAYLOAD, "n": n})

    def sendMany(self, ns):
        self.producer.enqueue_many("noop", [{**PAYLOAD, "n": n} for n in ns])

    def close(self):
        self.producer.close()


class CeleryApplyAsync(Contender):
    def __init__(self, broker, url, queue, **options):
        from celery import Celery

        super().__init__(broker, "celery apply_async" + (
            " (confirm_publish)" if options else ""))
        self.app = Celery(queue, broker=url)
        self.app.conf.update(
            task_ignore_result=True, broker_connection_retry_on_startup=True,
            task_default_queue=queue, broker_transport_options=options)
        self.task = self.app.task(name="noop")(noop)

    def send(self, n):
        self.task.apply_async(kwargs={**PAYLOAD, "n": n})

    def close(self):
        self.app.close()


class DramatiqSend(Contender):
    def __init__(self, broker, brokerObject, queue, confirm=False):
        import dramatiq

        super().__init__(broker, "dramatiq send" + (
            " (confirm_delivery)" if confirm else ""))
        self.broker_ = brokerObject
        self.actor = dramatiq.actor(noop, actor_name="noop", queue_name=queue,
                                    broker=brokerObject)

    def send(self, n):
        self.actor.send(**PAYLOAD, n=n)

    def close(self):
        self.broker_.close()


def initSchema(url, directory):
    path = os.path.join(directory, "snq.toml")
    with open(path, "w") as f:
        f.write(f'[db]\nurl = "{url}"\n')
    subprocess.run([sys.executable, "-m", "snq.scripts.snqctl", "-c", path,
                    "db", "init"], check=True, cwd=directory,
                   env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True)


def contenders(name, servers, batch):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from dramatiq.brokers.redis import RedisBroker

    parse = snqconfig.parse
    for label, server in servers:
        config = parse({"db": {"url": server.url()}})
        yield Snq(label, config)
        yield Snq(label, config, batch)
    config = parse({"queue": {"backend": "redis"},
                    "redis": {"url": REDIS_URL, "prefix": f"{name}:"}})
    yield Snq("Redis", config)
    yield Snq("Redis", config, batch)
    yield CeleryApplyAsync("Redis", REDIS_URL, f"{name}-celery")
    yield DramatiqSend("Redis", RedisBroker(url=REDIS_URL, namespace=name),
                       f"{name}-dramatiq")
    config = parse({"queue": {"backend": "stomp", "basename": f"/queue/{name}/"}})
    yield Snq("RabbitMQ", config)
    yield Snq("RabbitMQ", config, batch)
    yield CeleryApplyAsync("RabbitMQ", AMQP_URL, f"{name}-celery")
    yield CeleryApplyAsync("RabbitMQ", AMQP_URL, f"{name}-celeryc",
                           confirm_publish=True)
    yield DramatiqSend("RabbitMQ", RabbitmqBroker(url=PIKA_URL),
                       f"{name}-dramatiq")
    yield DramatiqSend("RabbitMQ", RabbitmqBroker(url=PIKA_URL,
                                                  confirm_delivery=True),
                       f"{name}-dramatiqc", confirm=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000,
                        help="items per run of a contender that sends one at "
                             "a time (batches: ten times as many)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=10,
                        help="turns the contenders take within a round")
    args = parser.parse_args()
    slice_ = max(1, args.items // args.slices)
    args.items = slice_ * args.slices
    before = machine()
    name = rabbitmq.uniqueName().replace("snqtest", "snqbench")
    directory = tempfile.mkdtemp(prefix="bench-enqueue-")
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    servers = [("SQLite", sqlservers.Sqlite(directory, "snq_bench"))]
    for label, cls in [("PostgreSQL", sqlservers.Postgres),
                       ("MariaDB", sqlservers.MariaDb)]:
        servers.append((label, cls("snq_bench")))
    running = []
    try:
        for _, server in servers:
            server.create()
            initSchema(server.url(), directory)
        for contender in contenders(name, servers, args.batch):
            running.append(contender)
            contender.warm()
        for _ in range(args.rounds):
            seconds = dict.fromkeys(running, 0.0)
            for _ in range(args.slices):
                for contender in running:
                    seconds[contender] += contender.run(
                        slice_ * (10 if contender.batch else 1))
            for contender in running:
                contender.rates.append(
                    slice_ * args.slices * (10 if contender.batch else 1)
                    / seconds[contender])
    finally:
        for contender in running:
            contender.close()
        for _, server in servers:
            server.drop()
        client.flushdb()
        client.close()
        rabbitmq.deleteQueues(name)
    rows = report(running, args.items)
    print(f"load average before: {before['load average']}, "
          f"after: {machine()['load average']}")
    save("enqueue", {"args": vars(args), "before": before, "rows": rows})


def report(contenders, items):
    rows = [{"broker": c.broker, "system": c.system,
             "items": items * (10 if c.batch else 1),
             "items/s": statistics.median(c.rates), "of": c}
            for c in contenders]
    for row in rows:
        mine = [r for r in rows if r["broker"] == row["broker"]
                and isinstance(r["of"], Snq)]
        single, batched = (r["items/s"] for r in mine)
        row["snq single: x"] = single / row["items/s"]
        row["snq batched: x"] = batched / row["items/s"]
    for row in rows:
        row["rounds"] = row.pop("of").rates
    table(rows, ["broker", "system", "items", "items/s", "snq single: x",
                 "snq batched: x"])
    return rows


if __name__ == "__main__":
    main()
