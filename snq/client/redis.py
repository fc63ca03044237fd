# -*- test-case-name: tests.test_client,tests.test_client_servers -*-
"""
Enqueueing on the Redis backend with redis-py: the daemon's own ENQUEUE
script, so that ready items go onto their list and later ones into that
list's delayed set exactly as a worker would put them there.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from snq.client.errors import EnqueueError
from snq.redis import scripts
from snq.redis.address import RedisAddress, redisPy
from snq.redis.keys import enqueueCall


class RedisBackend:
    def __init__(self, config, routing):
        address = RedisAddress.fromURL(config.redis.url.reveal())
        self.where = address.describe()
        self.prefix = config.redis.prefix
        self.routing = routing
        settings = config.redis
        tls = {}
        if address.tls:
            tls = dict(ssl=True, ssl_ca_certs=settings.ca_file or None,
                       ssl_certfile=settings.cert_file or None,
                       ssl_keyfile=settings.key_file or None)
        # redis-py's pool is thread-safe, and starts afresh in a forked
        # child.  A command that fails on a connection the server dropped is
        # sent once more, on a new one.
        self.client = redisPy(
            address, socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            retry=Retry(NoBackoff(), 1), client_name=(
                f"snq-producer-{socket.gethostname()}-{os.getpid()}-"
                f"{uuid.uuid4().hex[:6]}"), **tls)
        self.script = self.client.register_script(scripts.ENQUEUE.source)

    def route(self, item) -> str:
        return self.routing.route(item.transport, item.site)

    def store(self, items):
        # The item's id tells apart two delayed items with the same frame.
        keys, args = enqueueCall(items, self.route, self.prefix, time.time(),
                                 0.0, lambda item: item.id)
        try:
            self.script(keys=keys, args=args)
        except redis.RedisError as e:
            raise EnqueueError(f"cannot enqueue on {self.where}: {e}") from e

    def close(self):
        self.client.close()
