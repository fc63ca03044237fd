"""
The peer for L{bench.stomp}: a Dramatiq no-op actor on the same RabbitMQ
(over AMQP), stamping like snq's handler.  Imported by C{dramatiq} worker
processes, configured by the environment L{bench.stomp} sets.
"""

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.stomp import stamp

dramatiq.set_broker(RabbitmqBroker(url="amqp://guest:guest@127.0.0.1:5672/%2F"))


@dramatiq.actor(queue_name=os.environ.get("SNQ_BENCH_QUEUE", "snq-bench"),
                max_retries=0)
def noop(n):
    stamp(os.environ["SNQ_BENCH_DIR"])
