# -*- test-case-name: tests.test_cluster -*-
"""
One view of the cluster: the daemons sharing a backend register in it
with a heartbeat, and it holds what applies to all of them (transports
and sites paused, the last reload asked for).  Nothing is elected and no
daemon talks to another: each writes its own record and reads the rest,
in the store the queue already is (SQL: the table C{snq_cluster}; Redis:
keys under C{<prefix>cluster}), or in C{[ledger] url} beside a STOMP
broker, else in RabbitMQ queues (L{snq.cluster.stomp}).

A record is a JSON object: C{name} (C{<daemon id>@<host>}), C{host},
C{pid}, C{version}, C{generation} and C{digest} of the config it runs,
C{started}, C{seen} (its last heartbeat), C{state} (C{running} or
C{stopped}), C{workers} and C{totals}, and C{reload} (the last cluster
reload it carried out, with its result).
"""

from __future__ import annotations

import dataclasses
import json

from twisted.internet import defer

#: Record names in the store: C{daemon:<name>}; settings are the others.
DAEMON = "daemon:"
#: The setting a C{snqctl reload --cluster} writes: C{{"nonce", "asked"}}.
RELOAD = "reload"
#: Settings C{pause:transport:NAME} and C{pause:site:NICK}: C{{"since", "by"}}.
PAUSE = "pause:"
KINDS = ("transport", "site")


class ClusterMissing(Exception):
    """
    There is no store the daemons share (a STOMP broker, no [ledger] url,
    no [stomp] control_secret).
    """


def pauseKey(kind: str, name: str) -> str:
    return f"{PAUSE}{kind}:{name}"


#: Longest a paused item that was taken anyway waits before it is taken
#: again (L{Pauses.putBack}).
MAX_PUT_BACK = 60.0


@dataclasses.dataclass(frozen=True)
class Pauses:
    """The transports and sites no daemon of the cluster claims for now."""

    transports: frozenset = frozenset()
    sites: frozenset = frozenset()
    #: C{(kind, name)} → when it was paused (UNIX seconds).
    since: dict = dataclasses.field(default_factory=dict, compare=False,
                                    hash=False)

    @classmethod
    def fromSettings(cls, settings: dict) -> Pauses:
        found = {kind: set() for kind in KINDS}
        since = {}
        for key, value in settings.items():
            if key.startswith(PAUSE):
                kind, _, name = key[len(PAUSE):].partition(":")
                if kind in found and name:
                    found[kind].add(name)
                    when = value.get("since")
                    if isinstance(when, (int, float)):
                        since[kind, name] = float(when)
        return cls(frozenset(found["transport"]), frozenset(found["site"]),
                   since)

    def __bool__(self):
        return bool(self.transports or self.sites)

    def holds(self, transport: str, site: str) -> bool:
        """Whether an item of C{transport} and C{site} must wait."""
        return transport in self.transports or site in self.sites

    def putBack(self, transport: str, site: str, now: float,
                heartbeat: float) -> float:
        """
        Seconds until a paused item that was taken may be taken again: a
        heartbeat at first, then as long as the pause has lasted, up to
        L{MAX_PUT_BACK}.  However big a paused backlog, each of its items
        is taken at most once in that time, and the items behind it in the
        same queue are reached.
        """
        started = [self.since.get(key, now)
                   for key in (("transport", transport), ("site", site))
                   if key[1] in (self.transports if key[0] == "transport"
                                 else self.sites)]
        lasted = now - max(started) if started else 0.0
        return min(max(heartbeat, lasted), max(MAX_PUT_BACK, heartbeat))

    def narrow(self, transports):
        """
        A L{snq.routing.TransportFilter} that leaves the paused transports
        out, so that a backend filtering its claims (SQL) does not even
        claim them.
        """
        if not self.transports:
            return transports
        if transports.include is not None:
            return dataclasses.replace(
                transports, include=transports.include - self.transports)
        return dataclasses.replace(
            transports, exclude=transports.exclude | self.transports)


def liveness(record: dict, now: float, stale: float) -> str:
    """C{live}, C{stale} (no heartbeat for C{stale} s) or C{stopped}."""
    if record.get("state") == "stopped":
        return "stopped"
    return "live" if now - record.get("seen", 0) <= stale else "stale"


def view(where: str, records: dict, settings: dict, now: float,
         stale: float) -> dict:
    """
    The cluster as C{snqctl status --cluster --json} and the dashboard show
    it: each record with its C{liveness}, and what is paused.
    """
    pauses = Pauses.fromSettings(settings)
    return {"store": where, "time": now, "stale": stale,
            "daemons": [dict(r, liveness=liveness(r, now, stale))
                        for _, r in sorted(records.items())],
            "paused": {"transports": sorted(pauses.transports),
                       "sites": sorted(pauses.sites)}}


class ClusterStore:
    """
    Where the registry and the settings are, on C{queue}'s store; every
    method returns a Deferred.  Records and settings are JSON objects.
    """

    def __init__(self, queue):
        self.queue = queue
        #: The store opens and closes C{queue} (its own), else its caller does.
        self.owns = False

    def _owning(self) -> ClusterStore:
        self.owns = True
        return self

    def describe(self) -> str:
        return self.queue.describe()

    #: Whether L{ensureOpen} has opened it (so there is something to close).
    opened = False

    def open(self):
        return self.queue.open() if self.owns else defer.succeed(None)

    @defer.inlineCallbacks
    def ensureOpen(self):
        """Open unless opened: a store of its own ([ledger] url, a STOMP
        session) may be down for now, and its users try again later."""
        if not self.opened:
            yield self.open()
            self.opened = True

    def close(self):
        return self.queue.close() if self.owns else defer.succeed(None)

    def beat(self, name: str, record: dict, ttl: float):
        """Write this daemon's C{record} (with its C{seen}); kept C{ttl} s."""
        raise NotImplementedError

    def daemons(self):
        """→ every record not forgotten yet, by name."""
        raise NotImplementedError

    def settings(self):
        """→ the settings: name → value."""
        raise NotImplementedError

    def put(self, name: str, value: dict):
        raise NotImplementedError

    def remove(self, name: str):
        """→ whether there was such a setting."""
        raise NotImplementedError

    def forget(self, before: float):
        """Drop the records last seen before C{before} (where they do not expire)."""
        return defer.succeed(0)


def encode(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def decode(text) -> dict | None:
    """A stored value, or None when it is not a JSON object (left by hand)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def makeStore(config, queue=None, clock=None) -> ClusterStore:
    """
    The cluster's store: on C{queue} (open, the caller's) when the backend
    keeps one, else on C{[ledger] url}, opened and closed by the store, else
    on the STOMP broker (L{ClusterMissing} when its messages could not be
    signed).
    """
    from snq.queues import makeQueue

    backend = config.queue.backend
    if backend == "stomp":
        url = config.ledger.url
        if not url:
            return _onBroker(config, clock)
        scheme = "redis" if url.reveal().startswith(("redis://", "rediss://")) \
            else "db"
        own = dataclasses.replace(
            config, queue=dataclasses.replace(config.queue, backend=scheme),
            db=dataclasses.replace(config.db, url=url),
            redis=dataclasses.replace(config.redis, url=url))
        return makeStore(own, makeQueue(own, clock), clock)._owning()
    if queue is None:
        return makeStore(config, makeQueue(config, clock), clock)._owning()
    if backend == "redis":
        from snq.cluster.redis import RedisStore

        return RedisStore(queue)
    from snq.cluster.sql import SqlStore

    return SqlStore(queue, clock)


def _onBroker(config, clock) -> ClusterStore:
    """
    The store on the RabbitMQ broker itself (L{snq.cluster.stomp}), open
    when its control channel is: its messages are signed with the same
    secret.
    """
    from snq.cluster.stomp import StompStore
    from snq.stomp.control import isOpen

    if not isOpen(config.stomp):
        raise ClusterMissing(
            "set [ledger] url to a database or Redis every daemon on this "
            "broker shares, or [stomp] control_secret to keep the registry "
            "on the broker itself (its messages signed with it)")
    return StompStore(config, clock)


@defer.inlineCallbacks
def withStore(config, reactor, use):
    """
    C{use(store)} on a store of its own (snqctl's), opened and closed
    around it; → what it gives.
    """
    store = makeStore(config, clock=reactor)
    yield store.open()
    try:
        return (yield use(store))
    finally:
        yield store.close()
