# -*- test-case-name: tests.test_stomp_backend -*-
"""
One STOMP server of C{[stomp] servers}, kept connected by a
L{ClientService} with backoff: log in, subscribe again to everything
subscribed before, and on stop say DISCONNECT and wait for the broker's
receipt, so that every ACK sent has been taken.

ClientService is shown a connection only once the STOMP handshake (CONNECT,
then each SUBSCRIBE with a receipt) has succeeded (L{HandshakeEndpoint}): a
handshake that fails counts as a failed attempt, with backoff, and a
connection that closes before it is established is never reported to
ClientService, whose state machine has no transition for that (automat's
C{NoTransition} traceback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stompest.error import StompProtocolError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from snq.service import defaultReactor
from snq.stomp.destinations import onTheWire
from snq.stomp.protocol import StompClientProtocol, StompFactory

#: Seconds the broker has to confirm DISCONNECT before we hang up anyway.
DISCONNECT_TIMEOUT = 5.0


def serverEndpoint(url: str, timeout: float, reactor=None):
    """C{tcp://HOST:PORT} or C{ssl://HOST:PORT} (the system's CAs) → an endpoint."""
    reactor = defaultReactor(reactor)
    scheme, _, hostPort = url.partition("://")
    host, _, port = hostPort.rpartition(":")
    endpoint = HostnameEndpoint(reactor, host, int(port), timeout=timeout)
    if scheme == "ssl":
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


@dataclass
class Subscription:
    """What to subscribe to on every connection: C{onMessage(stomp, frame)}."""

    destination: str
    onMessage: Callable
    headers: dict


class _Gate(Protocol):
    """
    Between a transport and its STOMP protocol: ClientService's protocol
    (C{service}) hears of the connection's loss only once it has been told
    of the connection, after the handshake.
    """

    def __init__(self, stomp):
        self.stomp = stomp
        self.service = None

    def connectionMade(self):
        self.stomp.makeConnection(self.transport)

    def dataReceived(self, data):
        self.stomp.dataReceived(data)

    def connectionLost(self, reason):
        self.stomp.connectionLost(reason)
        if self.service is not None:
            self.service.connectionLost(reason)


class _Disconnector:
    """
    The transport ClientService is given: its C{stopService} calls
    C{loseConnection}, which here says DISCONNECT first.
    """

    def __init__(self, stomp):
        self.stomp = stomp

    def loseConnection(self):
        try:
            self.stomp.disconnect(timeout=DISCONNECT_TIMEOUT)
        except StompProtocolError:
            # No longer logged in (the broker sent ERROR): just hang up.
            self.stomp.transport.abortConnection()


class HandshakeEndpoint:
    """
    An endpoint that builds STOMP protocols with C{stompFactory} and hands
    ClientService a connection only once C{handshake(stomp)} succeeded;
    when it fails (or ClientService gives up on the attempt) the connection
    is aborted and the attempt fails.
    """

    def __init__(self, endpoint, stompFactory, handshake, name=""):
        self.endpoint = endpoint
        self.stompFactory = stompFactory
        self.handshake = handshake
        #: For ClientService's log lines ("Scheduling retry … to connect …").
        self.name = name
        #: Gates whose connection may still be open.
        self.gates: set[_Gate] = set()

    def connect(self, serviceFactory):
        gate = _Gate(self.stompFactory.buildProtocol(None))
        d = self.endpoint.connect(_OneProtocol(gate))
        d.addCallback(self._shake, serviceFactory)
        return d

    def _shake(self, gate, serviceFactory):
        self.gates.add(gate)
        gate.stomp.whenDisconnected().addCallback(
            lambda _: self.gates.discard(gate))

        def established(_):
            service = serviceFactory.buildProtocol(gate.transport.getPeer())
            service.makeConnection(_Disconnector(gate.stomp))
            gate.service = service
            return service

        def failed(failure):
            gate.transport.abortConnection()
            return failure

        d = defer.maybeDeferred(self.handshake, gate.stomp)
        return d.addCallbacks(established, failed)

    def __repr__(self):
        return self.name or super().__repr__()

    def closed(self):
        """Fires once every connection this endpoint made is closed."""
        return defer.gatherResults(
            [g.stomp.whenDisconnected() for g in self.gates])


class _OneProtocol(Factory):
    """Builds the one protocol given, quietly (no log line per connection)."""

    noisy = False

    def __init__(self, protocol):
        self.built = protocol

    def buildProtocol(self, addr):
        return self.built


class BrokerConnection:
    """
    One server, logged in as C{[stomp]} says.  C{stomp} is the protocol of
    the current connection once its handshake is done, else None.
    """

    log = Logger()

    def __init__(self, url: str, config, clock=None, reactor=None,
                 endpoint=None):
        clock = defaultReactor(clock)
        self.url = url
        self.config = config
        self.clock = clock
        self.endpoint = endpoint or serverEndpoint(url, config.connect_timeout,
                                                   reactor)
        self.factory = StompFactory(clock)
        #: Connections made so far: the first subscribes, later ones again.
        self._connects = 0
        self.subscriptions: list[Subscription] = []
        self.stomp: StompClientProtocol | None = None
        #: Whether the current connection's destinations are written with
        #: %2F (L{onTheWire}).
        self.escape = config.escape_slashes == "always"
        self._handshaker = HandshakeEndpoint(self.endpoint, self.factory,
                                             self._handshake, f"STOMP {url}")
        self.service = ClientService(
            self._handshaker, Factory.forProtocol(Protocol),
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=30.0),
            clock=clock)
        #: Called with no argument when an established connection is lost.
        self.lostHooks: list[Callable] = []
        self._ready: list[defer.Deferred] = []
        self._stopping = False

    def start(self):
        self._stopping = False
        self.service.startService()

    @defer.inlineCallbacks
    def stop(self):
        """DISCONNECT (waiting for the receipt) and stop reconnecting."""
        self._stopping = True
        yield self.service.stopService()
        yield self._handshaker.closed()
        ready, self._ready = self._ready, []
        for waiter in ready:
            waiter.errback(defer.CancelledError(f"{self.url}: stopped"))

    def firstAttempt(self):
        """
        Fires with None once connected, or with the exception that failed
        the first attempt; in a later reactor turn than ClientService's, so
        that the caller may stop it (automat refuses a reentrant stop).
        """
        d = self.service.whenConnected(failAfterFailures=1).addCallbacks(
            lambda _: None, lambda f: f.value)
        return d.addCallback(lambda result: deferLater(self.clock, 0,
                                                       lambda: result))

    def whenReady(self):
        """The logged-in protocol, now or once connected again."""
        if self.stomp is not None:
            return defer.succeed(self.stomp)
        waiter = defer.Deferred()
        self._ready.append(waiter)
        return waiter

    def wire(self, destination: str) -> str:
        return onTheWire(destination, self.escape)

    @property
    def rabbitmq(self) -> bool:
        server = self.stomp.server if self.stomp is not None else None
        return bool(server) and server.startswith("RabbitMQ/")

    def subscribe(self, subscription: Subscription):
        """
        Subscribe now if connected, and on every connection from now on;
        fires once the broker confirmed it (or at once when not connected).
        """
        self.subscriptions.append(subscription)
        if self.stomp is None:
            return defer.succeed(None)
        d = self._subscribe(self.stomp, subscription)
        return d.addCallbacks(lambda _: None, self._subscribeFailed,
                              errbackArgs=(subscription,))

    def _subscribeFailed(self, failure, subscription):
        # The broker refused (the protocol has closed the connection) or the
        # connection went: the next connection subscribes again.
        self.log.warn("subscribing to {destination} on {url} failed: {why}",
                      destination=subscription.destination, url=self.url,
                      why=failure.getErrorMessage())

    def send(self, destination, body, headers, receipt=True):
        """SEND on the current connection (raises if there is none)."""
        return self.stomp.send(self.wire(destination), body, headers,
                               receipt=receipt)

    @defer.inlineCallbacks
    def session(self):
        """
        A connection of its own, logged in and never reconnected: for
        browsing a queue, since what it leaves unacknowledged goes back to
        the queue only when the connection closes.  DISCONNECT it when done.
        """
        stomp = yield self.endpoint.connect(
            _OneProtocol(self.factory.buildProtocol(None)))
        timer = self._deadline(stomp)
        try:
            yield self._login(stomp)
        except Exception:
            stomp.transport.abortConnection()
            raise
        finally:
            if timer.active():
                timer.cancel()
        return stomp

    @defer.inlineCallbacks
    def _login(self, stomp):
        config = self.config
        beats = int(config.heartbeat * 1000)
        yield stomp.connect(config.login, config.passcode.reveal(), config.vhost,
                            heartBeats=(beats, beats))
        if config.escape_slashes == "auto":
            self.escape = bool(stomp.server) and stomp.server.startswith("RabbitMQ/")

    @defer.inlineCallbacks
    def _handshake(self, stomp):
        timer = self._deadline(stomp)
        try:
            yield self._login(stomp)
            # By index: what is subscribed meanwhile is subscribed here too.
            index = 0
            while index < len(self.subscriptions):
                yield self._subscribe(stomp, self.subscriptions[index])
                index += 1
        except Exception as e:
            self.log.warn("connecting to STOMP server {url} failed: {why}",
                          url=self.url, why=e)
            raise
        finally:
            if timer.active():
                timer.cancel()
        self.stomp = stomp
        stomp.whenDisconnected().addCallback(self._lost, stomp)
        self._connects += 1
        verb = "subscribed again" if self._connects > 1 else "subscribed"
        again = (f"; {verb} to {len(self.subscriptions)} destinations"
                 if self.subscriptions else "")
        self.log.info("connected to STOMP server {url} ({server}){again}",
                      url=self.url, server=stomp.server, again=again)
        ready, self._ready = self._ready, []
        for waiter in ready:
            waiter.callback(stomp)

    def _subscribe(self, stomp, subscription):
        return stomp.subscribe(
            self.wire(subscription.destination),
            lambda frame: subscription.onMessage(stomp, frame),
            subscription.headers, receipt=True)

    def _deadline(self, stomp):
        return self.clock.callLater(self.config.connect_timeout, self._tooSlow,
                                    stomp)

    def _tooSlow(self, stomp):
        self.log.warn("STOMP server {url} did not finish the handshake within "
                      "{timeout} s", url=self.url,
                      timeout=self.config.connect_timeout)
        stomp.transport.abortConnection()

    def _lost(self, reason, stomp):
        if self.stomp is stomp:
            self.stomp = None
        if not self._stopping:
            self.log.warn("lost STOMP server {url} ({why}); reconnecting",
                          url=self.url, why=reason)
        for hook in self.lostHooks:
            hook()
