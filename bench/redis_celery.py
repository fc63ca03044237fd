"""
Celery's side of C{bench.redis}: a Redis broker with Celery's at-least-once
settings (C{acks_late}: acknowledged after the task returns; requeued when
a worker process is lost), a no-op task and a probe that notes how long a
message waited.

Run by the benchmark as C{celery -A bench.redis_celery worker -P prefork -c 2}.
"""

import os
import time

from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="noop")
def noop():
    pass


@app.task(name="probe")
def probe(sent):
    started = time.time()
    with open(os.environ["BENCH_PROBE_FILE"], "a") as f:
        f.write(f"{started - sent}\n")
