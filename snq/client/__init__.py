# -*- test-case-name: tests.test_client,tests.test_client_servers -*-
"""
Putting work on snq's queues from a web application (Django, Flask, any
WSGI or ASGI server, a script): L{Producer}.

Synchronous, and free of Twisted: importing and using it starts no reactor
and imports nothing of Twisted, nor the handlers.  One producer may be
shared by every thread of a process, and survives a fork (gunicorn's
workers): connections are made per process, when first needed.

Items are routed exactly as a worker routes those its handlers enqueue:
groups, breakouts and each transport's default priority come from the same
config, through the same code (L{snq.routing}, L{snq.item}).
"""

from __future__ import annotations

import math
import os
import time
from datetime import datetime, timedelta
from urllib.parse import unquote, urlsplit

from snq import config as snqconfig
from snq.client.errors import EnqueueError
from snq.client.sql import SqlBackend, storeWith
from snq.config import keptUnique
from snq.item import DEFAULT_SITE, MAX_KEY, Item, checkName
from snq.routing import RoutingError, SourceRouting

__all__ = ["EnqueueError", "Producer", "RoutingError"]

#: URL schemes → the backend they name.
SCHEMES = {"sqlite": "db", "postgresql": "db", "mysql": "db", "redis": "redis",
           "rediss": "redis", "redis+sentinel": "redis",
           "stomp": "stomp", "stomp+ssl": "stomp"}


class Producer:
    """
    Enqueues items on one backend: C{Producer(url)}, or
    L{Producer.from_config} to use the daemon's own config file.
    """

    def __init__(self, url: str | None = None, *, config=None):
        """
        C{url}: C{sqlite:///PATH}, C{postgresql://…}, C{mysql://…},
        C{redis://…} or C{rediss://…} as in the config, or
        C{stomp://[LOGIN:PASSCODE@]HOST[:PORT][/VHOST]} (C{stomp+ssl://}
        for TLS); everything else as the embedded default config has it.
        Or C{config}, a loaded L{snq.config.Config}.
        """
        if (url is None) == (config is None):
            raise TypeError("Producer(url) or Producer(config=config)")
        self.config = configFor(url) if config is None else config
        self._backend = _backend(self.config)

    @classmethod
    def from_config(cls, path: str | None = None) -> Producer:
        """The backend of a config file: C{path}, else C{$SNQ_CONFIG}, else
        the embedded default (SQLite C{./snq.sqlite})."""
        return cls(config=snqconfig.load(path))

    def __repr__(self):
        return f"<Producer {self.config.queue.backend} {self._backend.where}>"

    def enqueue(self, transport: str, payload, *, site: str = DEFAULT_SITE,
                priority: int | None = None,
                delay: float | timedelta | None = None,
                run_at: float | datetime | None = None, key: str | None = None,
                connection=None) -> str | None:
        """
        Store one item; → its id, or None when it was not taken: its
        transport is unique (C{[transports.NAME] unique = "drop"}) and an
        item with the same C{key} waits (or runs).  C{payload} is any JSON
        value.
        C{priority} defaults to C{[transports.NAME] priority} (higher runs
        first); C{delay} (seconds) or C{run_at} (UNIX seconds, or an aware
        datetime) holds it back until then.  C{key} is carried to the
        handler as C{item.key}; with C{unique} set for the transport it
        also keeps a second item with that key from being queued (see the
        chapter on floods).

        With C{connection} (SQL backend only): written with the
        application's own connection, in its open transaction, and there
        if and only if that transaction commits.

        Raises L{EnqueueError} (the driver's exception as its cause) when
        the backend does not take it; C{ValueError} or C{TypeError} for
        arguments an envelope cannot carry.
        """
        [item] = self._items(transport, [payload], site, priority, delay,
                             run_at, [key])
        [taken] = self._store([item], connection)
        return item.id if taken else None

    def enqueue_many(self, transport: str, payloads, *, site: str = DEFAULT_SITE,
                     priority: int | None = None,
                     delay: float | timedelta | None = None,
                     run_at: float | datetime | None = None, keys=None,
                     connection=None) -> list[str | None]:
        """
        Store one item per payload, all or none (one transaction on SQL,
        one script on Redis); → their ids, None for each one not taken.
        C{keys}, if given, has one key (or None) per payload.  Otherwise as
        L{enqueue}.
        """
        payloads = list(payloads)
        keys = [None] * len(payloads) if keys is None else list(keys)
        if len(keys) != len(payloads):
            raise ValueError(f"{len(keys)} keys for {len(payloads)} payloads")
        items = self._items(transport, payloads, site, priority, delay, run_at,
                            keys)
        taken = self._store(items, connection) if items else []
        return [item.id if t else None for item, t in zip(items, taken,
                                                          strict=True)]

    def close(self):
        """Close the connections this process opened."""
        self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _items(self, transport, payloads, site, priority, delay, runAt, keys):
        checkName("transport", transport)
        checkName("site", site)
        if priority is None:
            priority = self.config.transport(transport).priority
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError(f"priority must be an integer, not {priority!r}")
        for key in keys:
            if key is not None and (not isinstance(key, str) or not key
                                    or len(key) > MAX_KEY):
                raise ValueError(f"key must be a non-empty string of at most "
                                 f"{MAX_KEY} characters, not {key!r}")
        now = time.time()
        due = _due(now, delay, runAt)
        return [Item(transport=transport, payload=payload, site=site,
                     id=_newId(), priority=priority, created=now, run_at=due,
                     key=key)
                for payload, key in zip(payloads, keys, strict=True)]

    def _store(self, items, connection) -> list[bool]:
        """→ whether each item was taken."""
        if connection is None:
            taken = self._backend.store(items)
            return [True] * len(items) if taken is None else taken
        if self.config.queue.backend != "db":
            raise ValueError(
                "connection= (enqueueing in the application's transaction) "
                "needs the SQL backend; this producer's is "
                f"{self.config.queue.backend}")
        for item in items:
            if keptUnique(item, self.config.transport):
                raise ValueError(
                    f"connection= cannot enqueue an item with a key on "
                    f"{item.transport!r}, whose items are unique: the check "
                    f"needs the producer's own connection")
        storeWith(connection, items)
        return [True] * len(items)


#: The version (4) and variant (RFC 4122) bits of a random UUID.
_UUID4_KEEP = ~((0xF << 76) | (0x3 << 62))
_UUID4_SET = (0x4 << 76) | (0x2 << 62)


def _newId() -> str:
    """
    What an L{Item} makes its own id with, C{uuid.uuid4().hex}, without
    building a C{UUID} on the way: that took a fifth of a producer's own
    time per item.
    """
    random = int.from_bytes(os.urandom(16), "big")
    return f"{random & _UUID4_KEEP | _UUID4_SET:032x}"


def _due(now: float, delay, runAt) -> float | None:
    """The item's C{run_at}: None for "as soon as possible"."""
    if delay is not None and runAt is not None:
        raise TypeError("give delay or run_at, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if not _isNumber(seconds) or seconds < 0:
            raise ValueError(f"delay must be seconds (a number, 0 or more) or a "
                             f"timedelta, not {delay!r}")
        return now + seconds if seconds > 0 else None
    if isinstance(runAt, datetime):
        if runAt.tzinfo is None:
            raise ValueError("run_at must be a datetime with a timezone (a "
                             "naive one means a different time on each server)")
        return runAt.timestamp()
    if runAt is not None and not _isNumber(runAt):
        raise ValueError(f"run_at must be UNIX seconds or a datetime, not {runAt!r}")
    return None if runAt is None else float(runAt)


def _isNumber(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def configFor(url: str):
    """A config whose backend is at C{url}, everything else the default."""
    scheme = url.partition("://")[0]
    backend = SCHEMES.get(scheme)
    if backend is None or "://" not in url:
        raise ValueError(
            f"{scheme or url!r}: not a URL snq knows (sqlite:///…, "
            "postgresql://…, mysql://…, redis://…, rediss://…, stomp://…, "
            "stomp+ssl://…)")
    data = {"queue": {"backend": backend}}
    if backend == "db":
        data["db"] = {"url": url}
    elif backend == "redis":
        data["redis"] = {"url": url}
    else:
        data["stomp"] = _stompSettings(urlsplit(url))
    return snqconfig.parse(data, source="Producer URL")


def _stompSettings(url) -> dict:
    try:
        port = url.port or 61613
    except ValueError:
        raise ValueError("stomp:// URL: the port must be a number")
    host = url.hostname or "127.0.0.1"
    settings = {"servers": [f"{'ssl' if url.scheme == 'stomp+ssl' else 'tcp'}"
                            f"://{host}:{port}"]}
    if url.username is not None:
        settings["login"] = unquote(url.username)
    if url.password is not None:
        settings["passcode"] = unquote(url.password)
    if url.path.strip("/"):
        settings["vhost"] = unquote(url.path[1:])
    return settings


def _backend(config):
    routing = SourceRouting(config)
    backend = config.queue.backend
    if backend == "db":
        return SqlBackend(config)
    if backend == "redis":
        from snq.client.redis import RedisBackend

        return RedisBackend(config, routing)
    from snq.client.stomp import StompBackend

    return StompBackend(config, routing)
