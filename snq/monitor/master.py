# -*- test-case-name: tests.test_snmp -*-
"""
The running master, asked from outside over its control socket: what the
monitors that run as commands of their own (the Nagios check, the SNMP
agent) know of the daemon, told apart the same way by both.
"""

import os

from twisted.internet import defer, error

from snq import amp, control


class NotRunning(Exception):
    """No daemon listens on the control socket."""


class Unreachable(Exception):
    """The control socket is there, but this process may not use it."""


@defer.inlineCallbacks
def askStatus(path: str, reactor):
    """
    The master's answer to C{Status} (L{snq.amp.Status}).  Fails with
    L{NotRunning} when the socket is missing or refuses connections, with
    L{Unreachable} for any other failure to connect.
    """
    where = os.path.abspath(path)
    try:
        client = yield control.connect(path, reactor)
    except error.ConnectError as e:
        if isinstance(e, error.ConnectionRefusedError) or not os.path.exists(path):
            raise NotRunning(f"no snq daemon answers on {where}")
        raise Unreachable(f"cannot use the control socket {where}: {e}")
    try:
        return (yield client.callRemote(amp.Status))["status"]
    finally:
        if client.transport is not None:
            client.transport.loseConnection()


def workerCounts(status: dict) -> tuple[int, int]:
    """→ (slots running, slots): processes being replaced do not count."""
    current = [w for w in status["workers"] if w["role"] == "current"]
    return sum(w["state"] == "running" for w in current), len(current)
