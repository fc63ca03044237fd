# -*- test-case-name: tests.test_control -*-
"""
The AMP commands the processes of a daemon speak: master ↔ worker (over
extra pipes, see L{snq.pool}) and C{snqctl} → master (over the control
socket, L{snq.control}); and the exit statuses by which a worker tells the
master what to do next.
"""

import json

from snq.lean import withoutTLS

# AMP's StartTLS is not used here: no TLS for it (see snq.lean).
with withoutTLS():
    from twisted.protocols import amp

#: A worker exiting with this asks not to be started again (shutdown).
EXIT_SHUTDOWN = 100
#: A worker exiting with this asks to be replaced at once (it recycled
#: itself: soft memory limit or max_items).  0, 1 and signals are failures.
EXIT_RECYCLE = 101


class JSON(amp.Argument):
    """
    Any JSON value.  AMP caps one value at 64 KiB; a worker's counters grow
    with its sites, so a long document is split over C{name}, C{name.1}, ….
    """

    CHUNK = 0xFFFF

    def toString(self, inObject):
        return json.dumps(inObject, separators=(",", ":")).encode("utf-8")

    def fromString(self, inString):
        return json.loads(inString)

    def toBox(self, name, strings, objects, proto):
        super().toBox(name, strings, objects, proto)
        data = strings[name]
        strings[name] = data[:self.CHUNK]
        for n, start in enumerate(range(self.CHUNK, len(data), self.CHUNK), 1):
            strings[b"%s.%d" % (name, n)] = data[start:start + self.CHUNK]

    def fromBox(self, name, strings, objects, proto):
        n = 1
        while (key := b"%s.%d" % (name, n)) in strings:
            strings[name] += strings[key]
            n += 1
        super().fromBox(name, strings, objects, proto)


class ControlError(Exception):
    """A control request that cannot be carried out; the message says why."""


class Report(amp.Command):
    """Worker → master, once a second and on each change of state."""

    arguments = [(b"report", JSON())]
    requiresAnswer = False


class Status(amp.Command):
    """
    snqctl → master: the pool's state, and (C{monitor}) the totals and
    queue depth the master's tracker keeps, for the monitors outside it.
    """

    response = [(b"status", JSON())]


class Stop(amp.Command):
    """snqctl → master: stop gracefully (the answer comes first)."""


class Restart(amp.Command):
    """snqctl → master: a rolling restart; answers once it is over."""

    response = [(b"restarted", JSON())]
    errors = {ControlError: b"CONTROL_ERROR"}


class Reload(amp.Command):
    """
    snqctl → master: reload the config file; answers once it is applied
    (L{snq.reload.Reloader.reload} says with what), or fails saying why
    nothing changed.
    """

    response = [(b"reloaded", JSON())]
    errors = {ControlError: b"CONTROL_ERROR"}


class Reconfigure(amp.Command):
    """
    Master → worker: run this config from now on, changing in place what
    changed.  C{config}: C{text} (the file as the master validated it),
    C{source} (its path, for messages), C{generation}, C{loaded} (when the
    master loaded it).  Answers with what the worker changed, in words.
    """

    arguments = [(b"config", JSON())]
    response = [(b"applied", JSON())]
    errors = {ControlError: b"CONTROL_ERROR"}


class RequestReload(amp.Command):
    """Worker → master: reload the config (the control channel said so)."""

    arguments = [(b"reason", amp.Unicode())]
    requiresAnswer = False


class Deaths(amp.Command):
    """
    Worker → master: how many workers on this host died while running the
    message whose journal key (L{snq.journal}) is C{key}?  Asked for a
    message a broker delivers again; the answer is that message's to carry
    (the master forgets it).
    """

    arguments = [(b"key", amp.String())]
    response = [(b"deaths", amp.Integer())]


class Channel(amp.AMP):
    """
    AMP without AMP's connection log lines, which ask the transport for
    addresses a pipe to a child process does not have (Twisted #6618).
    """

    def makeConnection(self, transport):
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
