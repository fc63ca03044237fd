# -*- test-case-name: tests.test_sql_servers -*-
"""
PostgreSQL LISTEN on its own connection, watched by the reactor.

adbapi's pooled connections live in threads and inside transactions, so
none of them can sit waiting for notifications; this one is in autocommit
mode and only ever listens.  Its socket becomes readable when a
notification arrives, and then nothing blocks.
"""

import os

import psycopg
from psycopg import sql
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, error, threads
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer


@implementer(IReadDescriptor)
class NotifyListener:
    """
    Calls C{wake()} for every batch of notifications on C{channel}.

    When the connection drops it reconnects at once, then with backoff while
    that fails; after every connect it wakes once, because notifications
    sent while it was away are gone.
    """

    log = Logger()

    def __init__(self, conninfo, channel, wake, reactor, options=None,
                 policy=None):
        self.conninfo = conninfo
        #: More libpq parameters (keepalives).
        self.options = options or {}
        self.channel = channel
        self.wake = wake
        self.reactor = reactor
        self.policy = policy or backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self.conn = None
        self._fd = -1
        self._failures = 0
        self._connecting = None
        self._retry = None
        self._stopped = False

    def start(self):
        self._connect()

    def stopListening(self):
        """Close the connection; fires once a connect in progress is over."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._disconnect()
        if self._connecting is not None:
            waiter = defer.Deferred()
            self._connecting.addBoth(lambda r: (waiter.callback(None), r)[1])
            return waiter
        return defer.succeed(None)

    def _connect(self):
        self._retry = None
        self._connecting = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._open)
        self._connecting.addCallbacks(self._connected, self._connectFailed)

    def _open(self):
        """In a thread: connecting blocks."""
        conn = psycopg.connect(self.conninfo, autocommit=True, **self.options)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _connected(self, conn):
        self._connecting = None
        if self._stopped:
            conn.close()
            return
        self.conn = conn
        # The reactor watches a descriptor of our own: libpq closes its
        # socket as soon as it sees the connection fail, before the reactor
        # has stopped watching it (epoll would then fail to unregister it).
        self._fd = os.dup(conn.fileno())
        self._failures = 0
        self.reactor.addReader(self)
        self.log.info("listening on {channel} for new items", channel=self.channel)
        self.wake()

    def _connectFailed(self, failure):
        self._connecting = None
        if self._stopped:
            return
        delay = self.policy(self._failures)
        self._failures += 1
        self.log.warn("cannot LISTEN on {channel} ({error}); again in {delay:.1f} s",
                      channel=self.channel, error=failure.getErrorMessage().strip(),
                      delay=delay)
        self._retry = self.reactor.callLater(delay, self._connect)

    def _disconnect(self):
        if self.conn is not None:
            self.reactor.removeReader(self)
            self._close()

    def _close(self):
        self.conn.close()
        self.conn = None
        os.close(self._fd)
        self._fd = -1

    def fileno(self):
        return self._fd

    def logPrefix(self):
        return "NotifyListener"

    def doRead(self):
        try:
            notified = list(self.conn.notifies(timeout=0))
        except psycopg.Error as e:
            return error.ConnectionLost(str(e).strip())
        if notified:
            self.wake()
        return None

    def connectionLost(self, reason):
        """The reactor dropped us (doRead reported the loss): reconnect."""
        if self.conn is not None:
            self._close()
        if self._stopped:
            return
        self.log.warn("LISTEN connection lost ({why}); reconnecting",
                      why=reason.getErrorMessage())
        self._connect()
