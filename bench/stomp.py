"""
STOMP on RabbitMQ: how fast snq drains a backlog of no-op items with 1 and
2 worker processes, against, on the same broker in the same run:

* the raw ceiling: stompest's sync client consuming the same backlog with
  C{ack: client-individual} and snq's prefetch-count, doing nothing else;
* the peer: Dramatiq (C{--processes 2}, AMQP) with a no-op actor.

The daemons and the peer run through L{bench.peers} (its options apply).
Run from the repository root, RabbitMQ on 127.0.0.1 (5672, 61613),
C{pip install -e '.[bench]'}:

    python -m bench.stomp [--items 20000]
"""

import argparse
import time
import uuid

from bench import peers
from bench.common import Timer, table
from snq.item import Item

#: snq's default: twice [queue] concurrency (50).
PREFETCH = 100


def rawCeiling(n):
    """Items/s and CPU µs per item of a bare consumer, after publishing."""
    from tests.rabbitmq import deleteQueues, producer

    name = f"snqbench-{uuid.uuid4().hex[:8]}-raw"
    destination = f"/queue/{name}"
    client = producer()
    try:
        body = Item(transport="noop", payload={}).toJSON()
        for i in range(n):
            client.send(destination, body, {"persistent": "true"},
                        receipt="last" if i == n - 1 else None)
        assert client.receiveFrame().command == "RECEIPT"
        client.subscribe(destination, {"ack": "client-individual", "id": "raw",
                                       "prefetch-count": str(PREFETCH)})
        cpu = time.process_time()
        with Timer() as t:
            for _ in range(n):
                client.ack(client.receiveFrame())
        cpu = time.process_time() - cpu
    finally:
        client.disconnect()
        client.close()
        deleteQueues(name)
    return {"consumer": "stompest sync client (raw ceiling)", "items/s": n / t.seconds,
            "CPU us/item": cpu / n * 1e6}


def main():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--items", type=int, default=20_000)
    args, _ = parser.parse_known_args()
    from tests.rabbitmq import requireRabbitMQ

    requireRabbitMQ()
    raw = rawCeiling(args.items)
    rows = peers.main(systems="snq-stomp:1,snq-stomp,dramatiq-rabbitmq",
                      job="noop", rounds=1)
    print(f"\nraw ceiling, same backlog (prefetch-count {PREFETCH}):\n")
    table([raw], ["consumer", "items/s", "CPU us/item"])
    one, two, peer = (row["items/s"] for _, row in rows)
    print(f"\nsnq 1 worker / raw ceiling: {one / raw['items/s']:.0%} (target >= 50%)")
    print(f"snq 2 workers / Dramatiq 2 processes: {two / peer:.1f}x (target >= 2x)")


if __name__ == "__main__":
    main()
