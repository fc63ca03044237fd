# -*- test-case-name: tests.test_cluster_stomp -*-
"""
The cluster on a RabbitMQ broker alone (a STOMP queue, no C{[ledger]
url}), with nothing but RabbitMQ's own queues: each record is the one
message of a durable queue of its own declared with C{x-max-length: 1}, a
last-value slot (a new message drops the old one, RabbitMQ's default
overflow being drop-head), a quorum queue with C{[stomp] queue_type =
"quorum"}.  The slots, under C{[queue] basename}:

  - C{cluster.daemon.NAME}: a daemon's record, sent persistent with the
    C{expiration} of C{[cluster] forget}, so that it leaves by itself;
  - C{cluster.daemons}: the index, C{{"names": [...]}}: each daemon puts
    its name back at every heartbeat if it is missing (two daemons
    writing it at once: the one left out adds itself a heartbeat later),
    and a reader takes out the names whose slot has emptied;
  - C{cluster.settings}: every setting in one object, written by snqctl.

A slot is read without being consumed: SUBSCRIBE with C{ack:
client-individual} and C{prefetch-count: 1}, take the message, and close
the session without ACK: RabbitMQ puts it back.  A session reads one
slot (RabbitMQ 3.10 refuses a NACK once unsubscribed, so a message is
given back only by closing).  Meanwhile the slot looks
empty to other readers, who get the message as soon as it is back: a read
waits up to L{EMPTY_WAIT} for each slot.  Replacing the value read (the
index, the settings) ACKs the old message once the new one is in.

Anyone who may publish on the broker may write there, so the registry is
on the broker only with C{[stomp] control_secret} set, and then a message
counts only if signed with it (HMAC-SHA256 over its slot and body):
others are ignored.  Without one (and without
C{control_allow_unsigned = true}) there is no registry, as the control
channel is closed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from urllib.parse import quote

from stompest.error import StompProtocolError
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger

from snq.cluster import ClusterStore, decode, encode
from snq.service import defaultReactor
from snq.stomp.connection import DISCONNECT_TIMEOUT, BrokerConnection
from snq.stomp.destinations import MAX_TTL, Destinations

#: How every slot is declared (SEND and SUBSCRIBE must say the same), with
#: C{[stomp] queue_type}'s header.
SLOT_ARGUMENTS = {"x-max-length": "1"}
#: Seconds a read waits for a slot's message: RabbitMQ delivers it after
#: SUBSCRIBE's receipt, and a slot another reader holds looks empty until
#: that reader is done.
EMPTY_WAIT = 2.0
SIGNATURE_HEADER = "snq-signature"


class NotRabbitMQ(Exception):
    """The broker has no last-value queues (C{x-max-length})."""


def slotSignature(secret: str, slot: str, body: bytes) -> str:
    """What a slot's message is signed with: bound to its slot."""
    return hmac.new(secret.encode("utf-8"),
                    b"snq-cluster\n" + slot.encode("utf-8") + b"\n" + body,
                    hashlib.sha256).hexdigest()


class StompStore(ClusterStore):
    """
    The store on C{[stomp] servers}: the first one that takes a session
    (they must be one RabbitMQ cluster for all daemons to share the view).
    Each call is one or more STOMP sessions, each reading at most one
    slot, all closed before it returns.
    """

    log = Logger()

    def __init__(self, config, clock=None, reactor=None, endpoints=None):
        super().__init__(None)
        self.clock = defaultReactor(clock)
        stomp = config.stomp
        self.secret = stomp.control_secret.reveal() if stomp.control_secret \
            else ""
        self.base = config.queue.basename + "cluster."
        self.index = self.base + "daemons"
        self.settingsSlot = self.base + "settings"
        #: As snq's other queues: quorum ones on a cluster that asks so.
        self.arguments = {**SLOT_ARGUMENTS, **Destinations(config).queueType}
        #: Longest a session may last: to log in, wait for a slot, and say
        #: DISCONNECT; then it is aborted.
        self.deadline = stomp.connect_timeout + EMPTY_WAIT + DISCONNECT_TIMEOUT
        endpoints = endpoints or [None] * len(stomp.servers)
        # No heart-beats: a session lasts milliseconds, and RabbitMQ 3.10
        # may drop one whose heart-beats start while the broker is holding
        # back its reader (its log: {unexpected_message,resume}).
        quick = dataclasses.replace(stomp, heartbeat=0.0)
        self.brokers = [BrokerConnection(url, quick, self.clock, reactor,
                                         endpoint=endpoint)
                        for url, endpoint in zip(stomp.servers, endpoints,
                                                 strict=True)]
        for broker in self.brokers:
            # A session or more every heartbeat: not a line each in the log.
            broker.factory.noisy = False

    def describe(self) -> str:
        return f"{self.brokers[0].url} (STOMP, queues {self.base}*)"

    def open(self):
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)

    def slot(self, name: str) -> str:
        """Daemon C{name}'s slot."""
        return self.base + "daemon." + quote(name, safe="@._-")

    # Sessions

    @defer.inlineCallbacks
    def _session(self, use):
        """C{use(session)} on a new session, closed after; → what it gives."""
        failure = None
        for broker in self.brokers:
            try:
                stomp = yield broker.session()
            except Exception as e:
                failure = e
                continue
            break
        else:
            raise failure
        timer = self.clock.callLater(self.deadline,
                                     stomp.transport.abortConnection)
        try:
            if not (stomp.server or "").startswith("RabbitMQ/"):
                raise NotRabbitMQ(
                    f"{broker.url} is {stomp.server or 'not RabbitMQ'}: the "
                    "cluster registry on a broker needs RabbitMQ's "
                    "x-max-length queues; set [ledger] url instead")
            return (yield use(_Session(self, broker, stomp)))
        finally:
            yield _hangUp(stomp)
            if timer.active():
                timer.cancel()

    # The store

    def beat(self, name, record, ttl):
        @defer.inlineCallbacks
        def use(session):
            yield session.write(self.slot(name), record, ttl)
            found = yield session.read([self.index])
            names = _names(found.get(self.index))
            if name not in names:
                yield session.replace(self.index, found,
                                      {"names": sorted({*names, name})})

        return self._session(use)

    @defer.inlineCallbacks
    def daemons(self):
        # A session for each slot, so that none holds one slot while it
        # waits for another: two readers each holding what the other waits
        # for would both take the other's for empty.
        names = yield self._session(self._names)
        slots = {self.slot(n): n for n in names}
        found = yield defer.gatherResults(
            [self._session(lambda session, slot=slot: session.read([slot]))
             for slot in slots], consumeErrors=True).addErrback(
                 lambda f: f.value.subFailure)
        records = {s: value for one in found for s, (value, _) in one.items()}
        gone = {n for s, n in slots.items() if s not in records}
        if gone:
            yield self._session(lambda session: self._prune(session, gone))
        return {slots[s]: value for s, value in records.items()}

    @defer.inlineCallbacks
    def _names(self, session):
        return _names((yield session.read([self.index])).get(self.index))

    @defer.inlineCallbacks
    def _prune(self, session, gone):
        found = yield session.read([self.index])
        names = _names(found.get(self.index))
        if gone & set(names):
            yield session.replace(self.index, found,
                                  {"names": sorted(set(names) - gone)})

    def settings(self):
        @defer.inlineCallbacks
        def use(session):
            found = yield session.read([self.settingsSlot])
            return _settings(found.get(self.settingsSlot))

        return self._session(use)

    def _change(self, change):
        """Read the settings, C{change} them in place; → what it says."""
        @defer.inlineCallbacks
        def use(session):
            found = yield session.read([self.settingsSlot])
            settings = _settings(found.get(self.settingsSlot))
            changed = change(settings)
            if changed:
                yield session.replace(self.settingsSlot, found, settings)
            return changed

        return self._session(use)

    def put(self, name, value):
        def change(settings):
            settings[name] = value
            return True

        return self._change(change).addCallback(lambda _: None)

    def remove(self, name):
        return self._change(lambda settings: settings.pop(name, None)
                            is not None)


def _names(found) -> list:
    names = (found[0] if found else {}).get("names")
    return [n for n in names if isinstance(n, str)] \
        if isinstance(names, list) else []


def _settings(found) -> dict:
    return {name: value for name, value in (found[0] if found else {}).items()
            if isinstance(value, dict)}


@defer.inlineCallbacks
def _hangUp(stomp):
    """DISCONNECT (what was read unacknowledged goes back) or just close."""
    if stomp.lost:
        return
    try:
        yield stomp.disconnect(timeout=DISCONNECT_TIMEOUT)
    except StompProtocolError:
        stomp.transport.abortConnection()


class _Session:
    """One logged-in connection of a L{StompStore}."""

    def __init__(self, store, broker, stomp):
        self.store = store
        self.broker = broker
        self.stomp = stomp

    def write(self, slot: str, value: dict, ttl: float | None = None):
        body = encode(value).encode("utf-8")
        headers = {"persistent": "true", "content-type": "application/json",
                   **self.store.arguments}
        if self.store.secret:
            headers[SIGNATURE_HEADER] = slotSignature(self.store.secret, slot,
                                                      body)
        if ttl is not None:
            headers["expiration"] = str(min(max(1, int(ttl * 1000)), MAX_TTL))
        return self.stomp.send(self.broker.wire(slot), body, headers,
                               receipt=True)

    @defer.inlineCallbacks
    def replace(self, slot: str, found: dict, value: dict):
        """Write C{value} to C{slot}, then drop what was read there."""
        yield self.write(slot, value)
        if slot in found:
            yield self.stomp.ack(found[slot][1], receipt=True)

    @defer.inlineCallbacks
    def read(self, slots: list[str]):
        """
        → slot → (value, its MESSAGE frame) for the slots holding a value
        signed as it must be, each message held (unacknowledged) until the
        session ends.
        """
        found, waiting = {}, set(slots)
        done = defer.Deferred()

        def settle(_=None):
            if not done.called:
                done.callback(None)

        def got(slot, frame):
            if done.called:
                # What is sent to the slot once read (by this session too)
                # is not what was read.
                return
            waiting.discard(slot)
            value = self._check(slot, frame)
            if value is not None:
                found[slot] = value, frame
            if not waiting:
                settle()

        headers = {"ack": "client-individual", "prefetch-count": "1",
                   **self.store.arguments}
        yield defer.gatherResults([
            self.stomp.subscribe(self.broker.wire(slot),
                                 lambda frame, slot=slot: got(slot, frame),
                                 headers, receipt=True)
            for slot in slots], consumeErrors=True).addErrback(
                lambda f: f.value.subFailure)
        if not waiting:
            settle()
        else:
            timer = self.store.clock.callLater(EMPTY_WAIT, settle)
            lost = []
            self.stomp.whenDisconnected().addCallback(
                lambda reason: (lost.append(reason), settle()))
            yield done
            if timer.active():
                timer.cancel()
            if lost:
                raise ConnectionLost(f"the STOMP connection closed while "
                                     f"reading the cluster: {lost[0]}")
        return found

    def _check(self, slot, frame):
        secret = self.store.secret
        if secret:
            given = frame.headers.get(SIGNATURE_HEADER, "")
            if not hmac.compare_digest(slotSignature(secret, slot, frame.body),
                                       given.lower()):
                self.store.log.warn(
                    "ignoring the message in {slot}: not signed with [stomp] "
                    "control_secret", slot=slot)
                return None
        value = decode(frame.body.decode("utf-8", "replace"))
        if value is None:
            self.store.log.warn("ignoring the message in {slot}: not a JSON "
                                "object", slot=slot)
        return value
