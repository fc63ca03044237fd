"""
Dramatiq on RabbitMQ (over AMQP), a peer in L{bench.peers}: the jobs of
L{bench.job} as actors on the queue named in C{$BENCH_QUEUE}.

Run by the benchmark as C{dramatiq bench.rabbitmq_dramatiq --processes 2}.
"""

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench import job

broker = RabbitmqBroker(url="amqp://guest:guest@127.0.0.1:5672/%2F")
dramatiq.set_broker(broker)
QUEUE = os.environ["BENCH_QUEUE"]


@dramatiq.actor(queue_name=QUEUE, max_retries=0, broker=broker)
def noop():
    job.noop()


@dramatiq.actor(queue_name=QUEUE, max_retries=0, broker=broker)
def incr():
    job.incr()


@dramatiq.actor(queue_name=QUEUE, max_retries=0, broker=broker)
def probe(sent):
    job.probe(sent)
