"""
Celery on Redis, a peer in L{bench.peers}, with its at-least-once settings
(C{acks_late}: acknowledged after the task returns; requeued when a worker
process is lost) and the jobs of L{bench.job} as tasks.

Run by the benchmark as C{celery -A bench.redis_celery worker -P prefork
-c 2 -O fair}, the broker's URL in C{$BENCH_REDIS_URL}.
"""

import os

from celery import Celery

from bench import job

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="noop")
def noop():
    job.noop()


@app.task(name="incr")
def incr():
    job.incr()


@app.task(name="probe")
def probe(sent):
    job.probe(sent)
