# -*- test-case-name: tests.test_monitor -*-
"""
StatusNet's UDP monitor (C{[monitor] udp = "udp://HOST:PORT"}), and what it
shares with statsd: datagrams that are never in the way.

StatusNet's daemons sent form-encoded datagrams, so its monitors read
these unchanged::

    thread_id=generic.1&state=queue&substate=webhook&ts=1764340000.123456
    counter=handled&owners%5B%5D=queue%3Awebhook&owners%5B%5D=site%3Adefault
        &owners%5B%5D=thread%3Ageneric.1

A state datagram goes out when a worker's state changes (init, listening,
queue, poll, idle, shutdown); a counter datagram per event, as StatusNet
sent them: a listener counts datagrams.
"""

from urllib.parse import urlencode

from twisted.application.service import Service
from twisted.internet import abstract, defer, error
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from snq.config import parseHostPort
from snq.monitor.tracker import Sink
from snq.service import defaultReactor


class UdpSender(Sink, Service):
    """
    Datagrams to one C{HOST:PORT}.  Sending never blocks and never fails
    the caller: what cannot go (no route, a full socket buffer, a name that
    does not resolve yet) is counted in C{dropped} and let go.
    """

    log = Logger()
    #: Seconds before a name that did not resolve is tried again.
    retryDelay = 30.0

    def __init__(self, host: str, port: int, reactor=None):
        reactor = defaultReactor(reactor)
        self.host = host
        self.port = port
        self.reactor = reactor
        #: (IP address, port) once known.
        self.address = None
        self.dropped = 0
        self._socket = None
        self._retry = None

    def __repr__(self):
        return f"<{type(self).__name__} {self.host}:{self.port}>"

    def startService(self):
        super().startService()
        ipv6 = abstract.isIPv6Address(self.host)
        self._socket = self.reactor.listenUDP(
            0, DatagramProtocol(), interface="::" if ipv6 else "")
        if ipv6 or abstract.isIPAddress(self.host):
            self.address = (self.host, self.port)
        else:
            self._resolve()

    def _resolve(self):
        self._retry = None

        def resolved(ip):
            self.address = (ip, self.port)

        def failed(failure):
            self.log.warn("{sender}: cannot resolve {host} ({why}); trying again "
                          "in {delay:g} s", sender=self, host=self.host,
                          why=failure.getErrorMessage(), delay=self.retryDelay)
            if self.running:
                self._retry = self.reactor.callLater(self.retryDelay, self._resolve)

        self.reactor.resolve(self.host).addCallbacks(resolved, failed)

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        socket, self._socket = self._socket, None
        return defer.maybeDeferred(socket.stopListening)

    def send(self, datagram: bytes):
        if self.address is None or self._socket is None:
            self.dropped += 1
            return
        try:
            self._socket.write(datagram, self.address)
        except (OSError, error.MessageLengthError) as e:
            self.dropped += 1
            if self.dropped == 1:
                self.log.warn("{sender}: cannot send ({why}); datagrams that "
                              "cannot go are dropped and counted", sender=self,
                              why=e)


def stateDatagram(threadId: str, state: str, substate: str, ts: float) -> bytes:
    return urlencode([("thread_id", threadId), ("state", state),
                      ("substate", substate), ("ts", f"{ts:.6f}")]).encode()


def counterDatagram(counter: str, transport: str, site: str,
                    threadId: str) -> bytes:
    """An IoManager's event (C{NAME.EVENT}) is owned by C{NAME:KEY}."""
    manager, dot, _ = counter.partition(".")
    owners = [f"{manager if dot else 'queue'}:{transport}" if transport else None,
              f"site:{site}" if site else None, f"thread:{threadId}"]
    return urlencode([("counter", counter)] + [("owners[]", owner)
                                               for owner in owners if owner]
                     ).encode()


class StatusNetMonitor(UdpSender):
    """C{[monitor] udp}: state and counter datagrams in StatusNet's format."""

    @classmethod
    def fromConfig(cls, value: str, reactor=None):
        return cls(*parseHostPort(value, "udp://"), reactor=reactor)

    def counted(self, counter, transport, site, worker, n):
        datagram = counterDatagram(counter, transport, site, worker)
        for _ in range(n):
            self.send(datagram)

    def stateChanged(self, worker, state, substate, when):
        self.send(stateDatagram(worker, state, substate, when))
