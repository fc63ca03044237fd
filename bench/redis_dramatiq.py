"""
Dramatiq's side of C{bench.redis}: its Redis broker (at-least-once by
default: a message is acknowledged after its actor returns) and two actors,
a no-op and a probe that notes how long a message waited.

Run by the benchmark as C{dramatiq bench.redis_dramatiq --processes 2}.
"""

import os
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker

dramatiq.set_broker(RedisBroker(url=os.environ["BENCH_REDIS_URL"]))


@dramatiq.actor(max_retries=0)
def noop():
    pass


@dramatiq.actor(max_retries=0)
def probe(sent):
    started = time.time()
    with open(os.environ["BENCH_PROBE_FILE"], "a") as f:
        f.write(f"{started - sent}\n")
