# -*- test-case-name: tests.test_cluster -*-
"""
The cluster in Redis: a key per daemon, C{<prefix>cluster:daemon:NAME},
expiring by itself once it has not been written for C{[cluster] forget};
the set C{<prefix>cluster:daemons} of their names (members whose key has
expired are dropped as they are found); the hash C{<prefix>cluster} of the
settings.
"""

from twisted.internet import defer

from snq.cluster import DAEMON, ClusterStore, decode, encode


class RedisStore(ClusterStore):
    def __init__(self, queue):
        super().__init__(queue)
        self.hash = f"{queue.prefix}cluster"
        self.names = f"{queue.prefix}cluster:daemons"

    def _key(self, name: str) -> str:
        return f"{self.hash}:{DAEMON}{name}"

    def _execute(self, *args):
        return self.queue.connection.execute(*args, again=True)

    @defer.inlineCallbacks
    def beat(self, name, record, ttl):
        yield self._execute("SET", self._key(name), encode(record), "PX",
                            str(max(1, int(ttl * 1000))))
        yield self._execute("SADD", self.names, name)

    @defer.inlineCallbacks
    def daemons(self):
        names = sorted(n.decode("utf-8") for n in
                       (yield self._execute("SMEMBERS", self.names)))
        if not names:
            return {}
        values = yield self._execute("MGET", *[self._key(n) for n in names])
        records, gone = {}, []
        for name, value in zip(names, values, strict=True):
            record = decode(value.decode("utf-8")) if value is not None else None
            if record is None:
                gone.append(name)
            else:
                records[name] = record
        if gone:
            yield self._execute("SREM", self.names, *gone)
        return records

    @defer.inlineCallbacks
    def settings(self):
        flat = yield self._execute("HGETALL", self.hash)
        if isinstance(flat, dict):
            pairs = flat.items()
        else:
            pairs = zip(flat[::2], flat[1::2], strict=True)
        settings = {}
        for name, value in pairs:
            value = decode(value.decode("utf-8") if isinstance(value, bytes)
                           else value)
            if value is not None:
                settings[name.decode("utf-8") if isinstance(name, bytes)
                         else name] = value
        return settings

    def put(self, name, value):
        return self._execute("HSET", self.hash, name, encode(value))

    def remove(self, name):
        d = self._execute("HDEL", self.hash, name)
        return d.addCallback(lambda n: int(n) == 1)
