"""
Queue backends behind one interface (L{snq.queues.interface.Queue}); the config's
C{[queue] backend} picks one.
"""


def makeQueue(config, clock=None, claimant=None):
    """The configured backend's L{Queue}, not yet opened."""
    backend = config.queue.backend
    if backend == "db":
        from snq.queues.db import DbQueue

        return DbQueue(config.db.url.reveal(), config.queue.lease, clock=clock,
                       claimant=claimant)
    if backend == "redis":
        from snq.queues.redis import RedisQueue

        return RedisQueue(config, clock=clock, claimant=claimant)
    if backend == "stomp":
        from snq.queues.stomp import StompQueue

        return StompQueue(config, clock=clock, claimant=claimant)
    raise ValueError(f"unknown backend {backend!r}")
