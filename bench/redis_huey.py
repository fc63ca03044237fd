"""
Huey on Redis, a peer in L{bench.peers}: the jobs of L{bench.job} as tasks,
results not stored (nothing reads them).

Run by the benchmark as C{huey_consumer bench.redis_huey.huey -k process
-w 2}, the broker's URL in C{$BENCH_REDIS_URL}.
"""

import os

from huey import RedisHuey

from bench import job

huey = RedisHuey("bench", url=os.environ["BENCH_REDIS_URL"], results=False)


@huey.task()
def noop():
    job.noop()


@huey.task()
def incr():
    job.incr()


@huey.task()
def probe(sent):
    job.probe(sent)
