# -*- test-case-name: tests.test_client,tests.test_client_servers -*-
"""
Enqueueing on the Redis backend, on snq's own lean RESP client
(L{snq.client.resp}): one command per call, storing the items where the
daemon's ENQUEUE script would (L{snq.redis.keys}), in one round trip with
nothing around it.  Keyed items of unique transports go through the
daemon's UNIQUE script instead, which looks their keys up.  Behind
Sentinels, each new connection goes to the primary they name
(L{snq.client.sentinel}).
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from snq.client.errors import EnqueueError
from snq.client.pool import Pool
from snq.client.resp import ReplyError, RespConnection, command
from snq.client.sentinel import checkPrimary, findPrimary
from snq.client.wire import Wire, tlsContext
from snq.redis import scripts
from snq.redis.address import RedisAddress
from snq.redis.keys import anyUnique, enqueueCall, uniqueCall


class RedisBackend:
    def __init__(self, config, routing):
        self.address = RedisAddress.fromURL(config.redis.url.reveal())
        self.where = self.address.describe()
        self.prefix = config.redis.prefix
        self.timeout = config.redis.timeout
        self.routing = routing
        self.transports = config.transport
        settings = config.redis
        self.tls = None
        if self.address.tls:
            self.tls = tlsContext(settings.ca_file, settings.cert_file,
                                  settings.key_file)
        self.pool = Pool(self._connect, lambda conn: conn.close())

    def _connect(self) -> RespConnection:
        # Named for CLIENT LIST, with the process it belongs to.
        name = (f"snq-producer-{socket.gethostname()}-{os.getpid()}-"
                f"{uuid.uuid4().hex[:6]}")
        if self.address.master is None:
            return RespConnection(self._wire(), self.address, name)
        primary = findPrimary(self.address, self.timeout, name)
        conn = RespConnection(Wire(primary.host, primary.port, self.timeout),
                              primary, name)
        checkPrimary(conn, primary)
        return conn

    def _wire(self) -> Wire:
        return Wire(self.address.host, self.address.port, self.timeout, self.tls)

    def route(self, item) -> str:
        return self.routing.route(item.transport, item.site)

    def store(self, items) -> list[bool] | None:
        """→ whether each item was taken, None for all (no key looked up)."""
        # The item's id tells apart two delayed items with the same frame.
        if anyUnique(items, self.transports):
            keys, args = uniqueCall(items, self.route, self.prefix, time.time(),
                                    0.0, _token, self.transports)
            taken = self._use(lambda conn: _eval(conn, scripts.UNIQUE, keys,
                                                 args))
            return [bool(t) for t in taken]
        keys, args = enqueueCall(items, self.route, self.prefix, time.time(),
                                 0.0, _token)
        request = _oneCommand(keys, args)
        self._use(lambda conn: conn.execute(request))
        return None

    def _use(self, call):
        try:
            return self.pool.use(call, OSError)
        except (OSError, ReplyError) as e:
            raise EnqueueError(f"cannot enqueue on {self.where}: {e}") from e

    def close(self):
        self.pool.close()


def _token(item) -> str:
    return item.id


def _eval(conn: RespConnection, script: scripts.Script, keys: list, args: list):
    """Run C{script}; sent whole the first time a server lacks it."""
    try:
        return conn.execute(command("EVALSHA", script.sha, len(keys), *keys,
                                    *args))
    except ReplyError as e:
        if not str(e).startswith("NOSCRIPT"):
            raise
    return conn.execute(command("EVAL", script.source, len(keys), *keys, *args))


def _oneCommand(keys: list, args: list) -> bytes:
    """
    What the ENQUEUE script would do with C{keys} and C{args}, as one
    plain command: the items of one call share their transport, site and
    due time, so they go to one list, all ready (C{LPUSH}, in the script's
    order) or all later (C{ZADD} to its delayed set), all or none.
    """
    dues = args[1::3]
    if len(keys) != 2 or dues.count(dues[0]) != len(dues):
        raise ValueError("the items of one call go to one list, due at once")
    if dues[0] == "":
        return command("LPUSH", keys[0], *args[2::3])
    scored = [x for pair in zip(dues, args[2::3], strict=True) for x in pair]
    return command("ZADD", keys[1], *scored)
