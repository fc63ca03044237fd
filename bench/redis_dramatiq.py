"""
Dramatiq on Redis, a peer in L{bench.peers}: its Redis broker (at least
once by default: a message is acknowledged after its actor returns) and the
jobs of L{bench.job} as actors.

Run by the benchmark as C{dramatiq bench.redis_dramatiq --processes 2}, the
broker's URL in C{$BENCH_REDIS_URL}.
"""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench import job

broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"])
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0, broker=broker)
def noop():
    job.noop()


@dramatiq.actor(max_retries=0, broker=broker)
def incr():
    job.incr()


@dramatiq.actor(max_retries=0, broker=broker)
def probe(sent):
    job.probe(sent)
