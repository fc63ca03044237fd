# -*- test-case-name: tests.test_stomp_backend -*-
"""
The STOMP backend, StatusNet's way to scale past one machine: every worker
on every host subscribes to the same broker queues.

Producers SEND envelopes to C{basename + group} (L{snq.stomp.destinations},
where RabbitMQ's spelling of those names is explained).  A worker
subscribes with C{ack: client-individual} to its groups' queues and
breakouts on every server in C{[stomp] servers} (StatusNet's manual
failover: whichever server a producer reached, its items are consumed), and
sends on the first server that is up, failing over to the next.  The
broker pushes at most C{prefetch-count} unacknowledged messages per
subscription: that is the worker's window; there is nothing to poll.

An item is acknowledged once its handler finished, or once its retry or
dead letter has been confirmed by the broker (a SEND with a receipt, which
RabbitMQ answers only when the message is safe).  A retry waits in a TTL
queue that dead-letters it back (L{Destinations.delayed}): nothing of it is
held by the worker.  Dead letters are messages on C{basename + "dead"},
with the reason in C{snq-*} headers; listing them reads the queue on a
connection of its own and hangs up without acknowledging, which puts
everything back in order.

Giving back what a worker holds but has not started (on stop, or when
one of its connections went) is a NACK, which requeues it for any worker;
a stopping worker stays subscribed (RabbitMQ refuses an ACK after an
UNSUBSCRIBE, and the items in flight still need theirs) and leaves what
comes next unacknowledged, for the broker to take back when it disconnects.

A reload that adds a queue to consume subscribes to it on the connections
there are.  One that drops a queue cannot simply UNSUBSCRIBE: RabbitMQ
then neither takes an ACK for what that subscription delivered nor gives
it back before the connection ends, and a NACK sent just before the
UNSUBSCRIBE comes straight back.  So the worker opens new connections with
the new subscriptions, and retires the old ones as it does when it stops:
what waits is NACKed, what runs finishes and is acknowledged on its own
connection, what comes meanwhile is left alone, and the DISCONNECT gives
that back.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import heapq
import os
from dataclasses import dataclass

from stompest.error import StompProtocolError
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger

from snq.item import Item
from snq.queues.interface import DeadLetter, Delivery, Queue
from snq.queues.manager import QueueManager
from snq.secret import maskURL
from snq.service import defaultReactor
from snq.stomp.connection import DISCONNECT_TIMEOUT, BrokerConnection, Subscription
from snq.stomp.control import ControlVerifier, Duplicate, controlHeaders, isOpen
from snq.stomp.destinations import Destinations
from snq.stomp.protocol import StompClientProtocol

JSON = {"persistent": "true", "content-type": "application/json"}
#: Dead letters carry these; the body is the frame as it came.
DEAD_ID, REASON, ERROR, ATTEMPTS, DIED, ORIGIN = (
    "snq-dead-id", "snq-reason", "snq-error", "snq-attempts", "snq-died",
    "snq-origin")
ITEM_ID, TRANSPORT, SITE = "snq-item-id", "snq-transport", "snq-site"
#: Ends a walk through the dead letters (see L{StompQueue._walkDead}).
MARKER = "snq-browse-marker"
#: A marker older than this was left by a walk that died: dropped.
STALE_MARKER = 3600.0
#: Longest error text kept in a header.
ERROR_LENGTH = 1000
#: The default window per subscription with [stomp] max_priority.
PRIORITY_WINDOW = 20


class NoBrokerError(ConnectionLost):
    """No STOMP server of C{[stomp] servers} can be reached."""


@dataclass(slots=True, eq=False)
class Received:
    """A Delivery's token: what it takes to acknowledge a MESSAGE."""

    #: The server's connection it came on, which a reload may retire.
    connection: BrokerConnection
    stomp: StompClientProtocol
    frame: object
    #: The destination it came from, where a retry goes back to.
    origin: str


class StompManager(QueueManager):
    """
    Feeds the dispatcher from subscriptions instead of claims; the window,
    the graceful stop and the settling are L{QueueManager}'s.  Also obeys
    the control channel, through its worker's C{shutdown} and C{recycle}.

    Its parent is the worker's L{snq.iomaster.IoMaster}: C{groups} to
    consume, and the hooks (None under C{--inline}).
    """

    def __init__(self, queue, dispatcher, config, transports, clock=None,
                 transportsFor=None):
        super().__init__(queue, dispatcher, config, transports, clock,
                         transportsFor)
        self.verifier = ControlVerifier(config.stomp.control_secret.reveal(),
                                        config.stomp.control_window, self.clock)
        #: When the last connected server went, if none is connected now.
        self._downSince = None

    @property
    def claimTrouble(self):
        """While no server is connected, nothing can come: since when."""
        if any(c.stomp is not None for c in self.queue.connections):
            self._downSince = None
            return None
        if self._downSince is None:
            self._downSince = self.clock.seconds()
        return {"since": self._downSince, "failures": None,
                "error": "no STOMP server of [stomp] servers is connected"}

    def startService(self):
        super().startService()
        self.queue.consume(self._wanted(), self._delivered, self._connectionLost)
        if isOpen(self.config.stomp):
            self.queue.listenControl(self._control)

    def _wanted(self) -> list[str]:
        """The queues of the worker's groups (and site, if it has one)."""
        if self.transports is not None and self.transports.groups:
            return self.queue.destinations.consumed(self.transports.groups,
                                                    self.transports.site)
        return self.queue.destinations.consumed(self.parent.groups)

    @defer.inlineCallbacks
    def follow(self, old):
        if not self.running:
            return []
        queue = self.queue
        wanted, before = self._wanted(), list(queue.consumed)
        removed = [d for d in before if d not in wanted]
        applied = ([f"subscribed to {d}" for d in wanted if d not in before] +
                   [f"unsubscribed from {d}" for d in removed])
        if not removed and queue.prefetch == queue.consumedPrefetch:
            yield queue.subscribe([d for d in wanted if d not in before])
            return applied
        if queue.prefetch != queue.consumedPrefetch:
            applied.append(f"prefetch-count {queue.prefetch}")
        retired = yield queue.replaceConnections(wanted)

        def cameOnThem(delivery):
            return delivery.token.connection in retired

        yield self.dispatcher.releaseWaiting(cameOnThem)
        yield self._waitForInFlight(cameOnThem)
        yield queue.retire(retired)
        return applied

    def poll(self):
        """Nothing to claim: the broker pushes, up to its prefetch-count."""
        return None

    def _delivered(self, delivery):
        # Once stopping, what comes is left unacknowledged: the broker takes
        # it back when the connection closes.
        if self.running:
            self.dispatcher.dispatch(delivery)

    def _connectionLost(self):
        """
        What waits for a slot may have come on that connection, which the
        broker has taken back and will deliver again: running it too would
        only do it twice.  Give back all that waits (what came on another
        connection is NACKed, and comes again).
        """
        if self.running:
            self.dispatcher.releaseWaiting()

    def _control(self, body, headers):
        stats = self.dispatcher.stats
        try:
            command, site = self.verifier.check(body, headers)
        except Duplicate as e:
            self.log.debug("control message ignored: {why}", why=e)
            return
        except ValueError as e:
            stats.count("controlrejected")
            self.log.warn("control message refused: {why}", why=e)
            return
        master = self.parent
        if command == "update":
            stats.count("siteupdate", "", site)
            if master.reload is None:
                self.log.warn("control channel: update:{site} ignored: this "
                              "worker runs without a pool (--inline); send "
                              "the daemon SIGHUP", site=site)
                return
            self.log.info("control channel: update:{site}: asking the master "
                          "to reload the config", site=site)
            master.reload(f"update:{site} from the control channel")
            return
        hook = master.shutdown if command == "shutdown" else master.recycle
        if hook is None:
            self.log.warn("control channel: {command} ignored: this worker "
                          "runs without a pool (--inline)", command=command)
            return
        self.log.info("control channel: {command}", command=command)
        hook(f"{command} from the control channel")


class StompQueue(Queue):
    log = Logger()
    managerClass = StompManager
    leased = False

    def __init__(self, config, clock=None, claimant=None, reactor=None,
                 connections=None, connect=None):
        """
        C{claimant} is not needed: the broker knows which connection holds
        which message.  C{connect(url)} makes the L{BrokerConnection} to a
        server of C{[stomp] servers}; tests give fake ones, or the
        C{connections} themselves.
        """
        clock = defaultReactor(clock)
        self.config = config
        self.clock = clock
        self.destinations = Destinations(config)
        self._connect = connect or (
            lambda url: BrokerConnection(url, config.stomp, clock, reactor))
        self.connections = connections or [
            self._connect(url) for url in config.stomp.servers]
        #: Messages the broker may push ahead, per subscription.
        self.prefetch = self._prefetch(config)
        #: What the connections are subscribed to, and with which
        #: prefetch-count.
        self.consumed: list[str] = []
        self.consumedPrefetch: int | None = None
        #: Connections a reload replaced, finishing what came on them.
        self.retiring: list[BrokerConnection] = []
        self._onDelivery = self._onLost = self._onControl = None
        self._lastDeadId = 0

    @staticmethod
    def _prefetch(config) -> int:
        """
        The window: twice the concurrency, so that a slot never waits for
        the broker.  With priorities, at most L{PRIORITY_WINDOW}: an urgent
        message the broker sends waits behind those already on their way,
        which a worker busy with fast items takes a while to read.
        """
        if config.stomp.prefetch:
            return config.stomp.prefetch
        window = 2 * config.queue.concurrency
        return min(window, PRIORITY_WINDOW) if config.stomp.max_priority else window

    def reconfigService(self, config):
        """Routing (groups, breakouts) and the prefetch-count follow a reload."""
        self.config = config
        self.destinations = Destinations(config)
        self.prefetch = self._prefetch(config)

    def describe(self) -> str:
        stomp = self.config.stomp
        servers = ", ".join(map(maskURL, stomp.servers))
        return (f"STOMP {servers} (login {stomp.login}, vhost "
                f"{stomp.vhost}), queues {self.destinations.basename}*")

    # -- connections --------------------------------------------------------

    @defer.inlineCallbacks
    def open(self):
        """
        Connect to every server; fails only if none answers (the others are
        tried again in the background).
        """
        attempts = [c.firstAttempt() for c in self.connections]
        for connection in self.connections:
            connection.start()
        errors = yield defer.gatherResults(attempts)
        if all(errors):
            yield self.close()
            raise NoBrokerError("no STOMP server answers: " + "; ".join(
                f"{c.url}: {e}" for c, e in zip(self.connections, errors,
                                                 strict=True)))
        for connection, error in zip(self.connections, errors, strict=True):
            if error:
                self.log.warn("STOMP server {url} is not reachable ({why}); "
                              "trying again in the background",
                              url=connection.url, why=error)

    def close(self):
        return defer.gatherResults(
            [c.stop() for c in self.connections + self.retiring])

    def consume(self, destinations, onDelivery, onLost=None):
        """
        Subscribe on every server: C{onDelivery(Delivery)} for each MESSAGE,
        C{onLost()} when a connection goes.  Fires once the servers
        connected now have confirmed.
        """
        self._onDelivery, self._onLost = onDelivery, onLost
        if onLost is not None:
            for connection in self.connections:
                connection.lostHooks.append(onLost)
        return self.subscribe(destinations)

    def subscribe(self, destinations):
        """Subscribe to more destinations on every server, for L{consume}'s."""
        self.consumed += destinations
        self.consumedPrefetch = self.prefetch
        headers = {"ack": "client-individual",
                   "prefetch-count": str(self.prefetch),
                   "activemq.prefetchSize": str(self.prefetch),
                   **self.destinations.arguments}
        return defer.gatherResults([
            connection.subscribe(Subscription(destination, functools.partial(
                self._received, connection, destination, self._onDelivery),
                headers))
            for connection in self.connections for destination in destinations])

    def _received(self, connection, origin, onDelivery, stomp, frame):
        if connection in self.retiring:
            # Left unacknowledged: the broker takes it back at DISCONNECT.
            return
        onDelivery(Delivery(
            frame=frame.body, token=Received(connection, stomp, frame, origin),
            redelivered=frame.headers.get("redelivered") == "true"))

    @defer.inlineCallbacks
    def replaceConnections(self, destinations):
        """
        Connect to every server again, subscribed to C{destinations} (and
        the control channel), and use the new connections from now on.
        → the connections replaced: what came on them is still theirs to
        acknowledge; what they deliver from now on is left alone, for the
        broker to take back when they are retired (L{retire}).
        """
        old, self.connections = self.connections, [
            self._connect(c.url) for c in self.connections]
        for connection in old:
            connection.lostHooks.clear()
        self.retiring += old
        self.consumed = []
        self.consume(destinations, self._onDelivery, self._onLost)
        if self._onControl is not None:
            self.listenControl(self._onControl)
        attempts = [c.firstAttempt() for c in self.connections]
        for connection in self.connections:
            connection.start()
        errors = yield defer.gatherResults(attempts)
        for connection, error in zip(self.connections, errors, strict=True):
            if error:
                self.log.warn("STOMP server {url} is not reachable ({why}); "
                              "trying again in the background",
                              url=connection.url, why=error)
        return old

    @defer.inlineCallbacks
    def retire(self, connections):
        """DISCONNECT: what they delivered and nobody started goes back."""
        yield defer.gatherResults([c.stop() for c in connections])
        for connection in connections:
            self.retiring.remove(connection)

    def listenControl(self, onControl):
        """The control topic on every server: C{onControl(body, headers)}."""
        self._onControl = onControl
        return defer.gatherResults([
            connection.subscribe(Subscription(
                self.destinations.control,
                lambda stomp, frame: onControl(frame.body, frame.headers),
                {"ack": "auto"}))
            for connection in self.connections])

    def _sender(self):
        """The first server in the list that is connected, or the next to be."""
        for connection in self.connections:
            if connection.stomp is not None:
                return defer.succeed(connection)
        first = defer.Deferred()

        def ready(_, connection):
            if not first.called:
                first.callback(connection)

        for connection in self.connections:
            connection.whenReady().addCallbacks(ready, lambda _: None,
                                                (connection,))
        timeout = self.config.stomp.connect_timeout

        def noServer(failure):
            failure.trap(defer.TimeoutError, defer.CancelledError)
            raise NoBrokerError(f"no STOMP server connected within {timeout} s")

        return first.addTimeout(timeout, self.clock).addErrback(noServer)

    @defer.inlineCallbacks
    def _publish(self, messages):
        """
        SEND each C{(destination, body, headers, delay[, early])} (see
        L{Destinations.delayed}) with a receipt on the sending server; what
        a lost connection leaves unconfirmed goes again, on the next server
        up (at least once: maybe twice).
        """
        for _ in range(len(self.connections) + 1):
            connection = yield self._sender()
            results = yield defer.DeferredList(
                [self._send(connection, *m) for m in messages],
                consumeErrors=True)
            unconfirmed = []
            for (ok, result), message in zip(results, messages, strict=True):
                if ok:
                    continue
                if not result.check(ConnectionLost, StompProtocolError):
                    # The broker refused (an ERROR frame): no point repeating.
                    result.raiseException()
                unconfirmed.append(message)
            if not unconfirmed:
                return
            self.log.warn("{n} messages unconfirmed as {url} went away; "
                          "sending them again", n=len(unconfirmed),
                          url=connection.url)
            messages = unconfirmed
        raise NoBrokerError(f"{len(messages)} messages could not be sent: "
                            "every STOMP server went away")

    def _send(self, connection, destination, body, headers, delay,
              early=False):
        if delay > 0:
            destination, wait = self.destinations.delayed(
                destination, delay, connection.rabbitmq, early)
            headers = {**headers, **wait}
        return defer.maybeDeferred(connection.send, destination, body, headers)

    # -- the Queue interface --------------------------------------------------

    def enqueue(self, items, delay=0.0):
        now = self.clock.seconds()
        return self._publish([
            self._itemMessage(self.destinations.route(i.transport, i.site), i,
                              i.dueAt(now, delay) - now, i.run_at is not None)
            for i in items])

    def _itemMessage(self, destination, item, delay, early=False):
        """An item's SEND, for L{_publish}, with its priority."""
        headers = {**JSON, **self.destinations.itemHeaders(item.priority,
                                                           delay > 0)}
        return (destination, item.toJSON(), headers, delay, early)

    def claim(self, limit, transports):
        raise NotImplementedError("the broker pushes: see StompManager")

    def ack(self, delivery):
        received = delivery.token
        if received.stomp.lost:
            # That connection is gone, and with it the broker's hold: the
            # message is back in its queue and will come again.
            return defer.succeed(None)
        return defer.maybeDeferred(received.stomp.ack, received.frame)

    @defer.inlineCallbacks
    def retry(self, delivery, item, delay, error):
        # Waiting for its run_at (not a failure's backoff): never late.
        now = self.clock.seconds()
        early = item.dueAt(now) > now
        yield self._publish([self._itemMessage(delivery.token.origin, item,
                                               delay, early)])
        yield self.ack(delivery)

    def release(self, deliveries):
        """
        NACK (requeue) what came on a connection still up, so that another
        worker may take it now; what came on one that went, the broker has
        taken back already.  (A stopping worker ignores what comes next, and
        the broker takes that back when it disconnects.)
        """
        for delivery in deliveries:
            received = delivery.token
            if not received.stomp.lost:
                # STOMP 1.0 has no NACK: back on DISCONNECT, then.
                with contextlib.suppress(StompProtocolError):
                    received.stomp.nack(received.frame)
        return defer.succeed(None)

    @defer.inlineCallbacks
    def deadLetter(self, delivery, reason, error, attempts):
        died = self.clock.seconds()
        # Unique in this process, and across workers unless two die in the
        # same microsecond; and they sort by age.
        self._lastDeadId = max(int(died * 1e6), self._lastDeadId + 1)
        headers = {"persistent": "true", **self.destinations.queueType,
                   DEAD_ID: str(self._lastDeadId),
                   REASON: reason, ERROR: error[:ERROR_LENGTH],
                   ATTEMPTS: str(attempts), DIED: repr(died),
                   ORIGIN: delivery.token.origin}
        contentType = delivery.token.frame.headers.get("content-type")
        if contentType:
            headers["content-type"] = contentType
        try:
            item = Item.fromJSON(delivery.frame)
        except ValueError:
            pass
        else:
            headers.update({ITEM_ID: item.id, TRANSPORT: item.transport,
                            SITE: item.site})
        yield self._publish([(self.destinations.dead, delivery.frame, headers, 0)])
        yield self.ack(delivery)

    def tend(self, deliveries):
        """Nothing to renew: a message is held as long as its connection."""
        return defer.succeed(None)

    def journalKey(self, delivery) -> bytes:
        # The broker gives a redelivered message a new id: its body, which
        # stays the same, names it.
        return hashlib.sha1(delivery.frame).hexdigest().encode()

    def publishControl(self, command: str):
        """Publish C{command} on the control channel (signed if configured)."""
        headers = {"content-type": "text/plain", **controlHeaders(
            command, self.clock.seconds(),
            self.config.stomp.control_secret.reveal())}
        return self._publish([(self.destinations.control,
                               command.encode("utf-8"), headers, 0)])

    # -- dead letters ---------------------------------------------------------

    @defer.inlineCallbacks
    def deadList(self, limit=50):
        newest = []

        def keep(letter, origin, ack):
            heapq.heappush(newest, (letter.died, letter.id, letter))
            if len(newest) > limit:
                heapq.heappop(newest)

        yield self._walkDead(keep)
        return [letter for _, _, letter in sorted(newest, reverse=True)]

    @defer.inlineCallbacks
    def deadShow(self, deadId):
        found = []

        def match(letter, origin, ack):
            if letter.id == int(deadId):
                found.append(letter)

        yield self._walkDead(match)
        return found[0] if found else None

    @defer.inlineCallbacks
    def deadRetry(self, deadIds=None):
        wanted = None if deadIds is None else {int(i) for i in deadIds}
        count = collections.Counter()

        def requeue(letter, origin, ack):
            if wanted is not None and letter.id not in wanted:
                return None
            count["n"] += 1
            d = self._publish([self._resurrect(letter, origin)])
            return d.addCallback(lambda _: ack())

        yield self._walkDead(requeue)
        return count["n"]

    def _resurrect(self, letter, origin):
        """A dead letter as a message for its queue, attempts reset."""
        try:
            item = Item.fromJSON(letter.frame)
        except ValueError:
            # A frame that never decoded goes back as it came; it will be
            # dead-lettered again, with the same reason.
            return (origin or self.destinations.basename + "main",
                    letter.frame, {**JSON, **self.destinations.arguments}, 0)
        item = dataclasses.replace(item, attempts=0)
        return self._itemMessage(
            origin or self.destinations.route(item.transport, item.site), item, 0)

    @defer.inlineCallbacks
    def deadPurge(self, deadIds=None):
        wanted = None if deadIds is None else {int(i) for i in deadIds}
        count = collections.Counter()

        def purge(letter, origin, ack):
            if wanted is None or letter.id in wanted:
                count["n"] += 1
                ack()

        yield self._walkDead(purge)
        return count["n"]

    @defer.inlineCallbacks
    def _walkDead(self, visit):
        """
        Call C{visit(letter, origin, ack)} for each dead letter on every
        server that is up; C{ack()} removes it, and what is not removed
        goes back in its place.
        """
        for connection in self.connections:
            if connection.stomp is None:
                self.log.warn("STOMP server {url} is down: its dead letters "
                              "are left out", url=connection.url)
                continue
            stomp = yield connection.session()
            try:
                yield self._walkOne(connection, stomp, visit)
            finally:
                # Unacknowledged messages go back to the queue, in order.
                yield _hangUp(stomp)

    def _walkOne(self, connection, stomp, visit):
        """
        Queues cannot be browsed over STOMP: subscribe, take every message,
        acknowledge none but the removed.  The end is a marker sent just
        before: whatever comes after it arrived while we looked.
        """
        dead = connection.wire(self.destinations.dead)
        marker = os.urandom(8).hex()
        done = defer.Deferred()
        visits = []
        idle = self.config.stomp.connect_timeout

        def fail(failure):
            if not done.called:
                done.errback(failure)

        watchdog = self.clock.callLater(idle, fail, NoBrokerError(
            f"{connection.url}: the dead letter queue went quiet for {idle} s "
            "before the end"))

        def onMessage(frame):
            if done.called:
                return
            watchdog.reset(idle)
            headers = frame.headers
            if MARKER in headers:
                if headers[MARKER] == marker:
                    stomp.ack(frame)
                    done.callback(None)
                elif self.clock.seconds() - _float(headers.get(DIED)) > STALE_MARKER:
                    stomp.ack(frame)
                return
            visits.append(defer.maybeDeferred(
                visit, _deadLetter(frame), headers.get(ORIGIN),
                lambda: stomp.ack(frame)))

        declared = self.destinations.queueType
        d = stomp.send(dead, b"", {MARKER: marker, DIED: repr(self.clock.seconds()),
                                   **declared}, receipt=True)
        d.addCallback(lambda _: stomp.subscribe(
            dead, onMessage, {"ack": "client-individual", **declared},
            receipt=True))
        d.addErrback(fail)

        def finished(result):
            if watchdog.active():
                watchdog.cancel()
            visited = defer.gatherResults(visits, consumeErrors=True)
            return visited.addCallback(lambda _: result)

        return done.addBoth(finished)


def _hangUp(stomp):
    """DISCONNECT, or just wait for the end of a connection that is ending."""
    try:
        return stomp.disconnect(timeout=DISCONNECT_TIMEOUT)
    except StompProtocolError:
        return stomp.whenDisconnected()


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def _deadLetter(frame) -> DeadLetter:
    headers = frame.headers
    try:
        deadId = int(headers.get(DEAD_ID, 0))
    except ValueError:
        deadId = 0
    try:
        attempts = int(headers.get(ATTEMPTS, 0))
    except ValueError:
        attempts = 0
    return DeadLetter(
        id=deadId, item_id=headers.get(ITEM_ID),
        transport=headers.get(TRANSPORT), site=headers.get(SITE),
        reason=headers.get(REASON, "unknown"), error=headers.get(ERROR, ""),
        attempts=attempts, died=_float(headers.get(DIED)), frame=frame.body)

