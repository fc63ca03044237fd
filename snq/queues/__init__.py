"""
Queue backends behind one interface (L{snq.queues.interface.Queue}); the config's
C{[queue] backend} picks one.
"""


def location(config):
    """What says which queue a config uses (a change of it rolls)."""
    return (config.queue.backend, config.queue.basename, config.db, config.redis,
            config.stomp)


def makeQueue(config, clock=None, claimant=None):
    """The configured backend's L{Queue}, not yet opened."""
    backend = config.queue.backend
    if backend == "db":
        from snq.queues.db import DbQueue

        return DbQueue(config.db.url.reveal(), config.queue.lease, clock=clock,
                       claimant=claimant, maxFrame=config.queue.maxFrameBytes(),
                       weight=config.siteWeight, rates=config.rates())
    if backend == "redis":
        from snq.queues.redis import RedisQueue

        return RedisQueue(config, clock=clock, claimant=claimant)
    if backend == "stomp":
        from snq.queues.stomp import StompQueue

        return StompQueue(config, clock=clock, claimant=claimant)
    raise ValueError(f"unknown backend {backend!r}")
