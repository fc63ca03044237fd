"""
snq's handlers for the jobs of L{bench.job}, registered by the benchmarks'
configs (C{[handlers]}) under the transports C{job_noop}, C{job_incr} and
C{probe}.
"""

from bench import job
from snq.handlers import QueueHandler


class Noop(QueueHandler):
    def handle(self, item):
        job.noop()


class Incr(QueueHandler):
    def handle(self, item):
        job.incr()


class Probe(QueueHandler):
    def handle(self, item):
        job.probe(item.payload["sent"])


HANDLERS = {"job_noop": "bench.snq_jobs:Noop", "job_incr": "bench.snq_jobs:Incr",
            "probe": "bench.snq_jobs:Probe"}
