# -*- test-case-name: tests.test_redis -*-
"""
The Redis backend.

Producers C{LPUSH} envelopes onto C{<prefix>q:<group>} or a breakout list
C{<prefix>q:<group>/<transport>[/<site>]}.  A worker claims with one Lua
script that pops frames, in batches, from the lists it consumes into the
C{<prefix>processing} sorted set, scored by the lease deadline; acknowledging
removes the member; every worker's housekeeping returns members whose
deadline passed, so a worker killed mid-item loses nothing.  Retries wait in
C{<prefix>delayed:<list>} sorted sets, dead letters in C{<prefix>dead}.

The wire (connections, doorbells, the Lua scripts) is L{snq.redis}'s; an
idle worker is woken by a push rather than polling.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import os
import re
import socket
import uuid

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from snq.item import BadItem, Item, plainPart
from snq.queues.interface import Cancelled, DeadLetter, Delivery, Depth, Queue
from snq.queues.manager import QueueManager
from snq.redis import scripts
from snq.redis.address import RedisAddress, tlsOptions
from snq.redis.connection import CONNECTION_ERRORS, RedisConnection
from snq.redis.doorbell import Doorbell, Listener
from snq.redis.keys import (
    anyUnique,
    delayedKey,
    delayedMember,
    enqueueCall,
    listKey,
    processingKey,
    uniqueCall,
)
from snq.routing import Routing, consumedSpecs
from snq.service import defaultReactor

#: Commands needed: RPOP with a count, BLMOVE.
MIN_VERSION = (6, 2)
#: What every frame with a key holds (C{lua/keys.lua} looks for the same).
KEYED = b'"key"'


class Lease:
    """A claimed item in Redis: its member of the processing set."""

    __slots__ = ("frame", "member", "origin", "token")

    def __init__(self, member: bytes):
        self.member = member
        token, origin, self.frame = member.split(b"\n", 2)
        self.token = token.decode()
        self.origin = origin.decode()

    def __str__(self):
        return self.token


class RedisManager(QueueManager):
    """
    Claims while items come; when a claim finds nothing, it arms the
    doorbells (a producer pushes) and a timer for the earliest delayed retry,
    instead of polling.  Window, lease renewal and graceful stop are
    L{QueueManager}'s.
    """

    def __init__(self, queue, dispatcher, config, transports, clock=None,
                 transportsFor=None):
        super().__init__(queue, dispatcher, config, transports, clock,
                         transportsFor)
        self._dueCall = None
        self._asleep = False

    @property
    def idle(self) -> bool:
        return self._asleep

    def startService(self):
        self._consume()
        super().startService()

    def stopService(self):
        if self._dueCall is not None and self._dueCall.active():
            self._dueCall.cancel()
        self._dueCall = None
        return super().stopService()

    def _consume(self):
        """
        The lists of this worker's groups (and site): see L{consumedSpecs}.
        A worker that consumes no group (a dedicated IoManager's) has none.
        """
        if self.transports is not None and self.transports.groups:
            self.queue.consumed = consumedSpecs(
                self.transports.groups, self.queue.breakouts, self.transports.site)
        elif self.parent is not None and not self.parent.groups:
            self.queue.consumed = []

    @defer.inlineCallbacks
    def follow(self, old):
        before = list(self.queue.consumed)
        self._consume()
        after = self.queue.consumed
        if self._listening is not None:
            yield self._listening.follow([self.queue.listKey(s) for s in after])
        # Items claimed from a list no longer consumed are leased like any
        # other: they run, and are acknowledged, as they would have.
        return ([f"consuming {self.queue.listKey(s)}" for s in after
                 if s not in before] +
                [f"no longer consuming {self.queue.listKey(s)}" for s in before
                 if s not in after])

    def poll(self):
        d = super().poll()
        if d is None:
            return None
        return d.addCallbacks(self._idleUnlessFound, self._claimFailed)

    def _claimFailed(self, failure):
        if failure.check(*CONNECTION_ERRORS) and self._listening is not None:
            # A doorbell waits for its own reconnection: the first push
            # after Redis is back wakes us, not the poll's backoff.
            self._listening.arm()
        return failure

    def _idleUnlessFound(self, found):
        self._asleep = not found
        if found:
            return True
        if self._listening is not None:
            self._listening.arm()
        self._scheduleDue()
        # None: sleep until a doorbell, the due timer or a settled item wakes us.
        return None

    def _scheduleDue(self):
        due = self.queue.nextDue
        if due is None or not self.running:
            return
        call = self._dueCall
        if call is not None and call.active():
            if call.getTime() <= due:
                return
            call.cancel()
        self._dueCall = self.clock.callLater(
            max(0.0, due - self.clock.seconds()), self.wake)

    def _settled(self):
        super()._settled()
        # A retry may have made an earlier due time.
        self._scheduleDue()

    def _tend(self):
        # A claim now and then also moves retries that fell due while their
        # worker was gone, whoever's they were.
        return super()._tend().addCallback(lambda _: self.wake())


class RedisQueue(Queue):
    log = Logger()
    managerClass = RedisManager

    def __init__(self, config, clock=None, claimant=None, reactor=None):
        """
        C{clock} gives the time (leases, due times); C{reactor} makes the
        connections.  Both default to the global reactor.
        """
        clock = defaultReactor(clock)
        self.config = config
        self.clock = clock
        self.reactor = reactor
        self.address = RedisAddress.fromURL(config.redis.url.reveal())
        self.prefix = config.redis.prefix
        self.lease = config.queue.lease
        #: Unique per process, so a respawned worker never takes over the
        #: leases of its killed predecessor.
        self.claimant = re.sub(
            r"[^\w.-]", "_",
            claimant or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.processing = processingKey(self.prefix)
        self.dead = self.prefix + "dead"
        #: Sites' weights and rate limits for the claims (L{_writeLimits}),
        #: and the rate limits' token buckets.
        self.limits = self.prefix + "limits"
        self.buckets = self.prefix + "buckets"
        self.deadIds = self.prefix + "dead:id"
        self.breakouts = frozenset(config.queue.breakout)
        #: The lists (group names and breakout specs) this worker consumes;
        #: its manager sets them from the worker's groups and site.
        self.consumed = consumedSpecs(config.queue.groups, self.breakouts)
        self.routing = Routing(config)
        #: The earliest due time of a retry on those lists, as of the last
        #: claim or retry; None = none waiting.
        self.nextDue: float | None = None
        self.connection: RedisConnection | None = None
        self._seq = itertools.count()
        self._turn = 0
        self._acks: list[tuple[bytes, defer.Deferred]] = []
        self._acking: defer.Deferred | None = None

    def describe(self) -> str:
        return f"{self.address.describe()} (keys {self.prefix}*)"

    def reconfigService(self, config):
        """Routing (groups, breakouts, handlers) and the lease follow a reload."""
        self.config = config
        self.breakouts = frozenset(config.queue.breakout)
        self.lease = config.queue.lease
        self.routing = Routing(config)
        if self.connection is not None:
            self._writeLimits().addErrback(
                lambda f: self.log.failure("writing the sites' weights and the"
                                           " rate limits", f))

    def _writeLimits(self):
        """
        The sites' weights and the rate limits where every worker's claim
        reads them (see C{claim.lua}): the weights that are not 1 ("w:"
        holds [sites.default]'s), the rates by bucket name.
        """
        default = self.config.siteWeight("default")
        limits = {"w:": default} if default != 1 else {}
        limits.update((f"w:{site}", w) for site in self.config.sites
                      if (w := self.config.siteWeight(site)) != default)
        limits.update((name, repr(rate)) for name, rate in self.config.rates().items())
        args = [x for pair in sorted(limits.items()) for x in pair]
        return self._eval(scripts.LIMITS, [self.limits], args, again=True)

    # -- keys and routing ---------------------------------------------------

    def listKey(self, spec: str) -> str:
        return listKey(self.prefix, spec)

    def delayedKey(self, spec: str) -> str:
        return delayedKey(self.prefix, spec)

    def _spec(self, listKey: str) -> str:
        return listKey[len(self.prefix) + 2:]

    def route(self, item: Item) -> str:
        """The list spec an item goes to: a matching breakout, or its group."""
        return self.routing.route(item.transport, item.site)

    def _token(self) -> str:
        return f"{self.claimant}/{next(self._seq)}"

    # -- connections --------------------------------------------------------

    def _connect(self, role: str) -> RedisConnection:
        tls = tlsOptions(self.address, self.config.redis) if self.address.tls else None
        return RedisConnection(
            self.address, f"snq:{self.claimant}:{role}",
            self.config.redis.timeout, tls=tls, reactor=self.reactor,
            scripts=scripts.ALL if role == "cmd" else ())

    @defer.inlineCallbacks
    def open(self):
        self.connection = self._connect("cmd")
        self.connection.start()
        try:
            protocol = yield self.connection.whenConnected()
            info = yield protocol.execute_command("INFO", "server")
        except Exception as e:
            yield self.close()
            if isinstance(e, txredisapi.ConnectionError):
                raise
            raise txredisapi.ConnectionError(
                f"cannot connect to {self.address.describe()}: {e}")
        version = re.search(rb"redis_version:(\d+)\.(\d+)", info)
        if version and tuple(map(int, version.groups())) < MIN_VERSION:
            yield self.close()
            raise txredisapi.ConnectionError(
                f"{self.address.describe()} runs Redis "
                f"{version.group(1).decode()}.{version.group(2).decode()}; "
                f"snq needs {'.'.join(map(str, MIN_VERSION))} or later")
        yield self._writeLimits()

    def close(self):
        # The manager waited for the acknowledgements; any still going fail.
        connection, self.connection = self.connection, None
        if connection is None:
            return defer.succeed(None)
        return connection.stop()

    def listen(self, wake) -> Listener:
        """
        A doorbell per consumed list, each on a connection of its own; the
        L{RedisManager} arms them when it runs out of work.
        """
        bells = itertools.count()
        return Listener(
            [self.listKey(spec) for spec in self.consumed],
            lambda key: Doorbell(self._connect(f"wait{next(bells)}"), key, wake))

    def eval(self, script: scripts.Script, keys, args, again=False):
        """Run one of L{snq.redis.scripts} (also the ledger's)."""
        return self._eval(script, keys, args, again)

    def _eval(self, script: scripts.Script, keys, args, again=False):
        d = self.connection.execute("EVALSHA", script.sha, len(keys), *keys,
                                    *args, again=again)
        d.addErrback(self._noScript, script, keys, args, again)
        return d

    def _noScript(self, failure, script, keys, args, again):
        # Only after a SCRIPT FLUSH: each connection loads them when made.
        failure.trap(txredisapi.ResponseError)
        if "NOSCRIPT" not in str(failure.value):
            return failure
        return self.connection.execute("EVAL", script.source, len(keys), *keys,
                                       *args, again=again)

    # -- the Queue interface ------------------------------------------------

    def enqueue(self, items, delay=0.0):
        """→ whether each was taken: keyed items of unique transports go
        through the key index (C{unique.lua}), the others are pushed."""
        if not items:
            return defer.succeed([])
        # Not idempotent: a lost answer is an error, not a second push.
        if anyUnique(items, self.config.transport):
            d = self._eval(scripts.UNIQUE, *self.enqueueArguments(items, delay))
            return d.addCallback(lambda taken: [bool(t) for t in taken])
        keys, args = enqueueCall(items, self.route, self.prefix,
                                 self.clock.seconds(), delay,
                                 lambda item: self._token())
        d = self._eval(scripts.ENQUEUE, keys, args)
        return d.addCallback(lambda _: [True] * len(items))

    def enqueueArguments(self, items, delay=0.0) -> tuple[list, list]:
        """
        The KEYS and ARGV of C{unique.lua} for C{items}, which the
        ledger's C{once_enqueue.lua} takes too (L{snq.ledger.redis}).
        """
        return uniqueCall(items, self.route, self.prefix, self.clock.seconds(),
                          delay, lambda item: self._token(),
                          self.config.transport)

    def claim(self, limit, transports=None):
        """C{transports} is SQL's filter; here the consumed lists are."""
        if not self.consumed:
            return defer.succeed([])
        now = self.clock.seconds()
        # Start at a different list each time, so no list starves another.
        self._turn = (self._turn + 1) % len(self.consumed)
        order = self.consumed[self._turn:] + self.consumed[:self._turn]
        keys = [self.processing, self.limits, self.buckets]
        for spec in order:
            keys += [self.listKey(spec), self.delayedKey(spec)]
        d = self._eval(scripts.CLAIM, keys, [
            f"{now:.6f}", f"{now + self.lease:.6f}", limit, self._token() + ".",
            self.prefix])
        return d.addCallback(self._claimed)

    def _claimed(self, result):
        due, packed = result
        self.nextDue = float(due) if due else None
        return [Delivery(frame=lease.frame, token=lease)
                for lease in _unpack(packed)]

    def journalKey(self, delivery) -> bytes:
        return delivery.token.token.encode()

    def ack(self, delivery):
        """
        Acknowledgements are grouped: while one is on its way, the next
        ones gather for the one after, so a busy worker sends one command
        for many items and an idle one still sends each at once.  A batch
        with keyed items goes through C{ack.lua}, which also clears their
        key index entries; others are one ZREM, as fast as ever.
        """
        done = defer.Deferred()
        self._acks.append((delivery.token.member, done))
        if self._acking is None:
            self._flushAcks()
        return done

    def _flushAcks(self):
        batch, self._acks = self._acks, []
        members = [member for member, _ in batch]
        if any(KEYED in member for member in members):
            self._acking = self._eval(scripts.ACK, [self.processing],
                                      [self.prefix, *members], again=True)
        else:
            self._acking = self.connection.execute("ZREM", self.processing,
                                                   *members, again=True)

        def sent(result):
            self._acking = None
            if self._acks:
                self._flushAcks()
            for _, done in batch:
                if isinstance(result, Failure):
                    done.errback(result)
                else:
                    done.callback(None)

        self._acking.addBoth(sent)

    def retry(self, delivery, item, delay, error):
        lease = delivery.token
        due = self.clock.seconds() + delay
        d = self._eval(scripts.RETRY,
                       [self.processing, self.delayedKey(self._spec(lease.origin))],
                       [lease.member, f"{due:.6f}",
                        delayedMember(self._token(), item.toJSON()), self.prefix],
                       again=True)

        def moved(_):
            if self.nextDue is None or due < self.nextDue:
                self.nextDue = due

        return d.addCallback(moved)

    def release(self, deliveries):
        if not deliveries:
            return defer.succeed(None)
        # Pushed last first, so the first given back is the first out again.
        leases = [d.token for d in reversed(deliveries)]
        return self._return(leases, [lease.frame for lease in leases], "")

    def _return(self, leases, frames, cutoff):
        keys = [self.processing, *(lease.origin for lease in leases)]
        args = [cutoff, self.prefix]
        for lease, frame in zip(leases, frames, strict=True):
            args += [lease.member, frame]
        return self._eval(scripts.RETURN, keys, args, again=True)

    def deadLetter(self, delivery, reason, error, attempts):
        lease = delivery.token
        try:
            item = Item.fromJSON(delivery.frame)
        except BadItem:
            item = None
        record = {
            "item_id": item.id if item else None,
            "transport": item.transport if item else delivery.transport,
            "site": item.site if item else delivery.site,
            "reason": reason, "error": error, "attempts": attempts,
            "died": self.clock.seconds(), "list": lease.origin}
        try:
            record["frame"] = delivery.frame.decode("utf-8")
        except UnicodeDecodeError:
            # Kept byte for byte all the same.
            record["frame_base64"] = base64.b64encode(delivery.frame).decode()
        record = json.dumps(record)
        return self._eval(scripts.BURY,
                          [self.processing, self.dead, self.deadIds],
                          [lease.member, record, self.prefix], again=True)

    @defer.inlineCallbacks
    def tend(self, deliveries):
        now = self.clock.seconds()
        for start in range(0, len(deliveries), 500):
            args = []
            for delivery in deliveries[start:start + 500]:
                args += [f"{now + self.lease:.6f}", delivery.token.member]
            # XX: a lease that was acknowledged or reaped meanwhile stays gone.
            yield self.connection.execute("ZADD", self.processing, "XX", *args,
                                          again=True)
        yield self.reapExpired()

    @defer.inlineCallbacks
    def reapExpired(self):
        reaped = yield self.reap(self.clock.seconds())
        if reaped:
            self.log.info("returned {count} items whose lease expired",
                          count=reaped)
        return reaped

    @defer.inlineCallbacks
    def returnClaims(self, claimant, started):
        packed = yield self._eval(scripts.HELD, [self.processing],
                                  [f"{claimant}/"], again=True)
        # Pushed last first, so the first claimed is the first out again.
        leases = list(reversed(_unpack(packed)))
        charged = [lease.token.encode() in started for lease in leases]
        frames = [_retried(lease.frame) if c else lease.frame
                  for lease, c in zip(leases, charged, strict=True)]
        returned = (yield self._return(leases, frames, "")) if leases else 0
        return returned, sum(charged)

    @defer.inlineCallbacks
    def reap(self, now, batch=200):
        """
        Return items whose lease expired before C{now} to their lists, one
        attempt more: a worker died holding them, and an item that kills
        every worker must end in the dead letters, not go round for ever.
        Safe with many reapers: the script moves only what is still expired.
        """
        total = 0
        while True:
            members = yield self.connection.execute(
                "ZRANGEBYSCORE", self.processing, "-inf", f"({now:.6f}",
                "LIMIT", 0, batch)
            if not members:
                return total
            # Pushed last first: the first to expire is the first out again.
            leases = [Lease(m) for m in reversed(members)]
            total += yield self._return(
                leases, [_retried(lease.frame) for lease in leases],
                f"{now:.6f}")
            if len(members) < batch:
                return total

    def knownLists(self) -> list[str]:
        """
        Every list this config sends items to: groups (active, configured
        per transport, of the handlers) and breakouts.
        """
        registry = self.routing.registry()
        groups = {"main", *self.config.queue.groups,
                  *(t.group for t in self.config.transports.values() if t.group),
                  *(registry.groupOf(name) for name in registry.classes)}
        return sorted(groups | self.breakouts)

    @defer.inlineCallbacks
    def depth(self):
        now = self.clock.seconds()
        keys = [self.processing, self.dead]
        for spec in self.knownLists():
            keys += [self.listKey(spec), self.delayedKey(spec)]
        ready, delayed, held, dead, due, *tails = yield self._eval(
            scripts.DEPTH, keys, [f"{now:.6f}", self.prefix])
        since = [float(due)] if due else []
        for tail in tails:
            with contextlib.suppress(BadItem):
                since.append(Item.fromJSON(tail).created)
        return Depth(ready=ready, delayed=delayed, held=held, dead=dead,
                     oldest=max(now - min(since), 0.0) if since else None)

    def cancel(self, itemId=None, key=None):
        field, value = ("id", itemId) if key is None else ("key", key)
        keys = [self.processing]
        for spec in self.knownLists():
            keys += [self.listKey(spec), self.delayedKey(spec)]
        d = self._eval(scripts.CANCEL, keys,
                       [self.prefix, field, value, plainPart(value)])
        return d.addCallback(lambda found: Cancelled(*found))

    # -- dead letters -------------------------------------------------------

    def deadList(self, limit=50):
        d = self.connection.execute("ZREVRANGE", self.dead, 0, int(limit) - 1)
        return d.addCallback(lambda records: [_deadLetter(r) for r in records])

    def deadShow(self, deadId):
        d = self.connection.execute("ZRANGEBYSCORE", self.dead, int(deadId),
                                    int(deadId))
        return d.addCallback(lambda records: _deadLetter(records[0])
                             if records else None)

    @defer.inlineCallbacks
    def deadRetry(self, deadIds=None):
        if deadIds is not None:
            records = []
            for deadId in deadIds:
                records += yield self.connection.execute(
                    "ZRANGEBYSCORE", self.dead, int(deadId), int(deadId))
            return (yield self._resurrect(records))
        # All of them, as of now: what dies again meanwhile stays dead.
        newest = yield self.connection.execute("ZREVRANGE", self.dead, 0, 0,
                                               "WITHSCORES")
        if not newest:
            return 0
        total = 0
        while True:
            records = yield self.connection.execute(
                "ZRANGEBYSCORE", self.dead, "-inf", newest[1], "LIMIT", 0, 500)
            if not records:
                return total
            total += yield self._resurrect(records)

    def _resurrect(self, records):
        if not records:
            return defer.succeed(0)
        keys, args = [self.dead], []
        for record in records:
            dead = json.loads(record)
            frame = _frame(dead)
            # A bad frame goes back as it came, to die again the same way.
            with contextlib.suppress(BadItem):
                frame = dataclasses.replace(Item.fromJSON(frame),
                                            attempts=0).toJSON()
            keys.append(dead["list"])
            args += [record, frame]
        return self._eval(scripts.RESURRECT, keys, args)

    def deadPurge(self, deadIds=None):
        ids = [] if deadIds is None else [int(i) for i in deadIds]
        if deadIds is not None and not ids:
            return defer.succeed(0)
        return self._eval(scripts.PURGE, [self.dead], ids)


def _unpack(packed: bytes) -> list[Lease]:
    """Members packed as C{LENGTH:MEMBER} by a script (see C{claim.lua})."""
    leases = []
    start = 0
    while start < len(packed):
        colon = packed.index(b":", start)
        end = colon + 1 + int(packed[start:colon])
        leases.append(Lease(packed[colon + 1:end]))
        start = end
    return leases


def _retried(frame: bytes) -> bytes:
    try:
        return Item.fromJSON(frame).retried().toJSON()
    except BadItem:
        return frame


def _frame(dead: dict) -> bytes:
    """A dead letter's frame, as it came."""
    if "frame_base64" in dead:
        return base64.b64decode(dead["frame_base64"])
    return dead["frame"].encode("utf-8")


def _deadLetter(record: bytes) -> DeadLetter:
    dead = json.loads(record)
    return DeadLetter(
        id=dead["id"], item_id=dead["item_id"], transport=dead["transport"],
        site=dead["site"], reason=dead["reason"], error=dead["error"],
        attempts=dead["attempts"], died=dead["died"], frame=_frame(dead))
