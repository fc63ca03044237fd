# -*- test-case-name: tests.test_redis -*-
"""
Connections to Redis: snq's own L{ClientService}s running txredisapi's
protocol.  The handshake (AUTH, SELECT, the scripts) is snq's, so a
failing one is retried with backoff instead of stopping reconnection for
good, as txredisapi's own factory does (txredisapi#112, #146).

Behind Sentinels each connection attempt asks them where the primary is,
and the handshake checks that the server is one (C{ROLE}): a failover
closes the clients of the old primary (Sentinel kills them as it demotes
it, or it died), and the next attempt finds the new one.
"""

from __future__ import annotations

import contextlib
import random

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from snq.redis.address import RedisAddress, masterQuery, primaryFromReply
from snq.service import defaultReactor

#: What says "the connection is gone, try again on the next one".
CONNECTION_ERRORS = (txredisapi.ConnectionError, error.ConnectError,
                     error.ConnectionClosed)


class _Protocol(txredisapi.RedisProtocol):
    """
    txredisapi's protocol, returning bytes as they are (a frame of digits
    stays a frame), with snq's handshake once connected.
    """

    #: Why the handshake failed; such a connection is closed, never used.
    refused: str | None = None
    lostBecause = None

    def __init__(self, connection: RedisConnection):
        super().__init__(charset=None, convertNumbers=False,
                         replyTimeout=connection.timeout)
        self.connection = connection
        self.shaken = False
        self._waiters: list[defer.Deferred] = []

    def connectionMade(self):
        super().connectionMade()
        self._handshake()

    def whenShaken(self):
        """Fires with this protocol once the handshake worked or was refused."""
        if self.shaken:
            return defer.succeed(self)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def _handshake(self):
        """AUTH, SELECT, a name for CLIENT LIST, the scripts: in one go."""
        c = self.connection
        address = c.address
        commands = [("ROLE",)] if address.master is not None else []
        if address.password is not None:
            commands.append(("AUTH", *filter(None, [address.username]),
                             address.password))
        if address.db:
            commands.append(("SELECT", address.db))
        commands.append(("CLIENT", "SETNAME", c.name))
        commands += [("SCRIPT", "LOAD", s.source) for s in c.scripts]
        # TLS wraps the TCP transport and has no keepalive switch.
        with contextlib.suppress(AttributeError):
            self.transport.setTcpKeepAlive(True)
        d = defer.gatherResults([self.execute_command(*cmd) for cmd in commands],
                                consumeErrors=True)
        if address.master is not None:
            d.addCallback(self._checkRole)
        d.addCallbacks(lambda _: c._ready(self), self._refuse)
        d.addCallback(self._shaken)

    def _checkRole(self, replies):
        """A Sentinel may still name a primary that was just demoted."""
        role = replies[0][0]
        if role != b"master":
            raise txredisapi.ResponseError(
                f"{self.transport.getPeer().host}:{self.transport.getPeer().port}"
                f" is a {role.decode()}, not the primary (a failover under way)")
        return replies

    def _refuse(self, failure):
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure
        if self.lostBecause is not None:
            failure = self.lostBecause
        self.refused = failure.getErrorMessage()
        self.connection._refused(self)
        self.transport.loseConnection()

    def _shaken(self, _):
        self.shaken = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self)

    def connectionLost(self, why):
        # Before the base class fails the commands waiting with a plain
        # "Lost connection": a failed TLS handshake says why here only.
        self.lostBecause = why
        if self.connection.current is self:
            self.connection._lost(self, why)
        super().connectionLost(why)


class _Factory(Factory):
    noisy = False

    def __init__(self, connection):
        self.connection = connection

    def buildProtocol(self, addr):
        p = _Protocol(self.connection)
        p.factory = self
        return p


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Connects to the primary the Sentinels name: they are asked in turn,
    each time, until one knows the master.
    """

    log = Logger()

    def __init__(self, reactor, address: RedisAddress, timeout: float):
        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        #: The primary connected to last (for the logs).
        self.primary: RedisAddress | None = None

    @defer.inlineCallbacks
    def connect(self, factory):
        primary = yield self.findPrimary()
        if primary != self.primary:
            self.log.info("the sentinels name {primary} the primary of {master}",
                          primary=primary.describe(), master=self.address.master)
        self.primary = primary
        endpoint = HostnameEndpoint(self.reactor, primary.host, primary.port,
                                    timeout=self.timeout)
        return (yield endpoint.connect(factory))

    @defer.inlineCallbacks
    def findPrimary(self) -> RedisAddress:
        problems = []
        for host, port in self.address.sentinels:
            try:
                reply = yield self._ask(host, port)
            except Exception as e:
                problems.append(f"{host}:{port}: {e}")
                continue
            primary = primaryFromReply(self.address, reply)
            if primary is not None:
                return primary
            problems.append(f"{host}:{port} does not know {self.address.master}")
        raise error.ConnectError(
            string=f"no sentinel names the primary: {'; '.join(problems)}")

    def __repr__(self):
        return f"<SentinelEndpoint {self.address.describe()}>"

    @defer.inlineCallbacks
    def _ask(self, host, port):
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        factory = Factory.forProtocol(lambda: txredisapi.RedisProtocol(
            charset=None, replyTimeout=self.timeout))
        factory.noisy = False
        protocol = yield endpoint.connect(factory)
        try:
            return (yield protocol.execute_command(*masterQuery(self.address)))
        finally:
            protocol.transport.loseConnection()


def endpointFor(reactor, address: RedisAddress, timeout: float, tls=None):
    """Where a connection to C{address} is made: its server, or the primary."""
    if address.master is not None:
        return SentinelEndpoint(reactor, address, timeout)
    endpoint = HostnameEndpoint(reactor, address.host, address.port,
                                timeout=timeout)
    return endpoint if tls is None else wrapClientTLS(tls, endpoint)


class RedisConnection:
    """
    One connection to Redis, kept up by a L{ClientService} with backoff.

    The handshake runs once L{ClientService} has the connection, not in its
    C{prepareConnection}: closing a connection rejected there, or stopping
    while one is being prepared, upsets its state machine.  A failed
    handshake (wrong password, a SELECT refused while the server loads its
    data) closes the connection and counts as one more failed attempt, so
    the backoff grows, and reconnecting never stops.
    """

    log = Logger()

    def __init__(self, address: RedisAddress, name: str, timeout: float,
                 tls=None, reactor=None, scripts=()):
        reactor = defaultReactor(reactor)
        self.address = address
        self.name = name
        self.timeout = timeout
        self.reactor = reactor
        self.scripts = scripts
        self.current: _Protocol | None = None
        self._refusals = 0
        self._connectedBefore = False
        self._policy = backoffPolicy(0.2, 10.0, 2.0,
                                     jitter=lambda: random.uniform(0, 0.1))
        self.service = ClientService(
            endpointFor(reactor, address, timeout, tls), _Factory(self), clock=reactor,
            retryPolicy=lambda attempt: self._policy(max(attempt,
                                                         self._refusals)))

    def start(self):
        self.service.startService()

    def stop(self):
        self.current = None
        return self.service.stopService()

    def _ready(self, protocol: _Protocol):
        if self._connectedBefore:
            self.log.info("redis connection {name} to {where} is back",
                          name=self.name, where=self.address.describe())
        self._connectedBefore = True
        self._refusals = 0
        self.current = protocol

    def _lost(self, protocol: _Protocol, why):
        self.current = None
        if self.service.running:
            self.log.warn("redis connection {name} to {where} lost ({why}); "
                          "reconnecting", name=self.name,
                          where=self.address.describe(),
                          why=why.getErrorMessage())

    def _refused(self, protocol: _Protocol):
        self._refusals += 1
        if self.service.running:
            self.log.error("redis connection {name} to {where} refused: {why}",
                           name=self.name, where=self.address.describe(),
                           why=protocol.refused)

    def whenConnected(self, failAfterFailures: int | None = 1):
        """
        A usable protocol.  A refused handshake counts as a failure; with
        C{failAfterFailures=None}, wait for a connection that works.
        """
        d = self.service.whenConnected(failAfterFailures=failAfterFailures)
        if not d.called:
            # It will fire inside ClientService's state machine, which whoever
            # waits must not re-enter (to stop it, say): hand over a turn later.
            d.addBoth(lambda result: deferLater(self.reactor, 0, lambda: result))
        d.addCallback(lambda protocol: protocol.whenShaken())
        return d.addCallback(self._usable, failAfterFailures)

    def _usable(self, protocol: _Protocol, failAfterFailures):
        if protocol.refused is None and protocol.connected:
            return protocol
        if protocol.refused is None:
            # Just lost: ClientService learns it only once the protocol has
            # been told, so it still hands this one out.  Ask again a turn on.
            return deferLater(self.reactor, 0, self.whenConnected,
                              failAfterFailures)
        if failAfterFailures is None:
            gone = (protocol.whenDisconnected() if protocol.connected
                    else defer.succeed(None))
            return gone.addCallback(lambda _: deferLater(
                self.reactor, 0, self.whenConnected, None))
        raise txredisapi.ConnectionError(
            f"{self.address.describe()} refused the connection: "
            f"{protocol.refused}")

    def execute(self, *args, again: bool = False):
        """
        Run one command.  C{again} only for commands that may run twice
        (idempotent ones): after a lost connection they go again on the
        next, however long that takes, until the connection is stopped.
        """
        protocol = self.current
        if protocol is not None and protocol.connected:
            d = protocol.execute_command(*args)
        else:
            d = self.whenConnected().addCallback(
                lambda p: p.execute_command(*args))
        if again:
            d.addErrback(self._again, args)
        return d

    def _again(self, failure, args):
        failure.trap(*CONNECTION_ERRORS)
        # A turn later: failed from inside connectionLost, ClientService
        # would still hand out the connection that just died.
        return deferLater(self.reactor, 0, self.execute, *args, again=True)

    def blocking(self, seconds: float, *args):
        """
        A command that blocks up to C{seconds} on the server; if no answer
        comes well after that, the connection is dead and is dropped.
        """
        def send(protocol):
            d = protocol.execute_command(*args, apply_timeout=False)
            guard = self.reactor.callLater(seconds + self.timeout,
                                           protocol.transport.abortConnection)

            def answered(result):
                if guard.active():
                    guard.cancel()
                return result

            return d.addBoth(answered)

        return self.whenConnected().addCallback(send)
