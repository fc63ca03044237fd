# -*- test-case-name: tests.test_control -*-
"""
The daemon's control socket: C{snqctl status|stop|restart|reload} talk to
the master over a UNIX socket only the daemon's user can use, with the AMP
commands of L{snq.amp}.
"""

import os
import signal

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from snq.amp import Channel, ControlError, Reload, Restart, Status, Stop
from snq.service import SignalHandler, defaultReactor


class ControlClient(Channel):
    """snqctl's end: knows when the master has closed the connection."""

    def __init__(self):
        super().__init__()
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.lost.callback(None)


def connect(path, reactor) -> defer.Deferred:
    """A L{ControlClient} connected to the master listening on C{path}."""
    # Here, not at the top: workers import this module and need no endpoints.
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    return connectProtocol(UNIXClientEndpoint(reactor, path, timeout=10),
                           ControlClient())


class _ControlProtocol(Channel):
    def __init__(self, service):
        super().__init__()
        self.service = service

    def connectionMade(self):
        super().connectionMade()
        self.service.connections.add(self)

    def connectionLost(self, reason):
        self.service.connections.discard(self)
        super().connectionLost(reason)

    @Status.responder
    def status(self):
        return {"status": self.service.status()}

    @Stop.responder
    def stop(self):
        self.service.log.info("stop requested on the control socket")
        self.service.reactor.callLater(0, self.service.stopDaemon)
        return {}

    @Restart.responder
    def restart(self):
        self.service.log.info("rolling restart requested on the control socket")
        return self.service.pool.restart().addCallback(
            lambda replaced: {"restarted": replaced})

    @Reload.responder
    def reload(self):
        if self.service.reloader is None:
            raise ControlError("this daemon does not reload its config")
        d = self.service.reloader.reload("snqctl reload")
        return d.addCallback(lambda result: {"reloaded": result})


class ControlService(Service):
    """
    The master's control: C{snqctl status|stop|restart|reload} on a UNIX
    socket that only the daemon's user can use (mode 0600), and SIGUSR1 for
    a rolling restart.  C{reloader} (L{snq.reload.Reloader}) carries out
    C{snqctl reload}; it owns SIGHUP.  SIGTERM and SIGINT are twistd's:
    they stop the daemon, which stops the pool gracefully.  With a C{tracker}
    (L{snq.monitor.tracker.Tracker}), C{Status} carries its summary.
    """

    log = Logger()

    def __init__(self, pool, path, reactor=None, stopDaemon=None, reloader=None,
                 tracker=None):
        reactor = defaultReactor(reactor)
        self.pool = pool
        self.tracker = tracker
        self.path = path
        self.reactor = reactor
        self.stopDaemon = stopDaemon or reactor.stop
        self.reloader = reloader
        self.started = None
        #: Open snqctl connections; closed on stop, which tells a waiting
        #: C{snqctl stop} that the daemon is done.
        self.connections: set = set()
        self._port = None
        self._sigusr1 = SignalHandler(signal.SIGUSR1, self._restart, reactor)

    def startService(self):
        self._port = self._listen(self.path)
        self._sigusr1.install()
        self.started = self.reactor.seconds()
        super().startService()
        self.log.info("control socket {path}", path=os.path.abspath(self.path))

    def _listen(self, path):
        factory = protocol.Factory.forProtocol(lambda: _ControlProtocol(self))
        factory.noisy = False
        # wantPID: a socket left by a dead master is replaced, one in use by
        # a live master makes this one refuse to start.  A relative path is
        # bound as it is (in twistd's run directory by now): socket paths
        # are limited to about 100 bytes.
        try:
            return self.reactor.listenUNIX(path, factory, mode=0o600,
                                           wantPID=True)
        except error.CannotListenError as e:
            raise ControlError(
                f"cannot listen on the control socket "
                f"{os.path.abspath(path)}: {e.socketError}; is another snq "
                f"daemon running with the same [daemon] control_socket?")

    def stopService(self):
        super().stopService()
        self._sigusr1.uninstall()
        for connection in list(self.connections):
            connection.transport.loseConnection()
        return defer.maybeDeferred(self._port.stopListening)

    def reconfigService(self, config):
        """
        A reloaded C{[daemon] control_socket}: listen there, then let go of
        the old socket (open connections, a waiting C{snqctl reload}
        among them, stay).  If the new one cannot be had, the old stays.
        """
        path = config.daemon.control_socket
        if path == self.path:
            return []
        try:
            port = self._listen(path)
        except ControlError as e:
            self.log.error("{why}; snqctl still finds this daemon on {old}",
                           why=e, old=os.path.abspath(self.path))
            return [f"control socket: {e}; still on {os.path.abspath(self.path)}"]
        old, self._port, self.path = self._port, port, path
        old.stopListening()
        return [f"control socket now {os.path.abspath(path)}"]

    def status(self) -> dict:
        pool = self.pool
        status = {"pid": os.getpid(), "started": self.started,
                  "uptime": self.reactor.seconds() - self.started,
                  "restarting": pool.restarting, "workers": pool.status(),
                  "config": {"generation": pool.config.generation,
                             "loaded": pool.config.loaded,
                             "source": pool.config.source}}
        if self.tracker is not None:
            status["monitor"] = self.tracker.summary()
        return status

    def _restart(self):
        self.log.info("rolling restart on SIGUSR1")

        def failed(failure):
            failure.trap(ControlError)
            self.log.error("rolling restart failed: {why}",
                           why=failure.getErrorMessage())

        d = self.pool.restart()
        d.addErrback(failed)
        d.addErrback(lambda f: self.log.failure("rolling restart failed", f))
