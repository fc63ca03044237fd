# -*- test-case-name: tests.test_snmp -*-
"""
C{snqctl snmp}: the daemon's figures for SNMP managers, through net-snmp's
own extension mechanism rather than an SNMP stack of snq's.  C{snmpd}
starts the command once (C{pass_persist OID COMMAND} in C{snmpd.conf}) and
talks to it on its standard input and output, a request at a time:
C{PING} → C{PONG}; C{get} or C{getnext} and an OID → the OID, its type and
its value on three lines, or C{NONE}; C{set} → C{not-writable}.

The figures are the master's answer to C{Status} on its control socket
(L{snq.monitor.master}), read at most once a second, so a walk of every
object costs the daemon one request.  The objects, their numbers and
types are those of C{contrib/SNQ-MIB.txt}; the two must change together.

snmpd reads the command's standard error as if it were its output, so
nothing may be written there: the command sends stderr to C{/dev/null} or
to the C{--log} file.
"""

import bisect
import os
import sys
from typing import NamedTuple

from twisted.internet import defer, stdio
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    PredicateResult,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from snq.monitor import master

#: snqStatus values.
UP, DOWN, UNKNOWN = 1, 2, 3
#: Seconds a status is answered from before the master is asked again.
CACHE = 1.0
#: The longest name (octets) that indexes a row (SIZE (1..64) in the MIB).
MAX_NAME = 64

_GAUGE_MAX = 2**32 - 1
_COUNTER64 = 2**64

# The tree below the base OID, as in contrib/SNQ-MIB.txt.
_DAEMON = (1, 1)
_QUEUE = (1, 2)
_WORKER_ENTRY = (1, 3, 1)
_TRANSPORT_ENTRY = (1, 4, 1)


class Value(NamedTuple):
    """An object's pass_persist type and its value, as written."""

    type: str
    text: str


def integer(n) -> Value:
    return Value("integer", str(int(n)))


def gauge(n) -> Value:
    """Gauge32 (and Unsigned32: the same on the wire); it sticks at its max."""
    return Value("gauge", str(min(max(int(n), 0), _GAUGE_MAX)))


def counter64(n) -> Value:
    return Value("counter64", str(int(n) % _COUNTER64))


def timeticks(seconds) -> Value:
    """Hundredths of a second, wrapping as sysUpTime does."""
    return Value("timeticks", str(int(max(seconds, 0) * 100) % 2**32))


def string(text: str) -> Value:
    """One line of printable text: a line break would end the answer."""
    return Value("string", "".join(c if c.isprintable() else "?" for c in text))


def parseOid(text: str) -> tuple[int, ...]:
    """C{".1.3.6"} or C{"1.3.6"} → C{(1, 3, 6)}; ValueError if it is not one."""
    arcs = text.strip().removeprefix(".").split(".")
    oid = tuple(int(arc) for arc in arcs)
    if any(arc < 0 for arc in oid) or not all(a.isdigit() for a in arcs):
        raise ValueError(text)
    return oid


def formatOid(oid: tuple[int, ...]) -> str:
    return "." + ".".join(map(str, oid))


def nameIndex(name: str) -> tuple[int, ...] | None:
    """
    A row's index for a name (an SnmpAdminString: its length, then its
    octets); None for a name that cannot index a row.
    """
    octets = name.encode("utf-8")
    if not 1 <= len(octets) <= MAX_NAME:
        return None
    return (len(octets), *octets)


def objects(health: int, status: dict | None) -> dict[tuple, Value]:
    """
    Every object of the MIB there is a value for, by its OID below the
    base: from the master's C{Status} answer when C{health} is L{UP};
    otherwise only what says it is not.
    """
    if health != UP:
        return {(*_DAEMON, 1, 0): integer(health),
                (*_DAEMON, 2, 0): timeticks(0),
                (*_DAEMON, 6, 0): gauge(0)}
    running, slots = master.workerCounts(status)
    found = {(*_DAEMON, 1, 0): integer(UP),
             (*_DAEMON, 2, 0): timeticks(status["uptime"]),
             (*_DAEMON, 3, 0): integer(status["pid"]),
             (*_DAEMON, 4, 0): gauge(status["config"]["generation"]),
             (*_DAEMON, 5, 0): gauge(slots),
             (*_DAEMON, 6, 0): gauge(running)}
    monitor = status.get("monitor") or {}
    queue = monitor.get("queue")
    if queue is not None:
        for n, key in enumerate(("ready", "delayed", "held", "dead"), 1):
            found[(*_QUEUE, n, 0)] = gauge(queue[key])
        found[(*_QUEUE, 5, 0)] = gauge(queue["oldest"] or 0)
    found.update(_workerRows(monitor.get("workers", ())))
    found.update(_transportRows(monitor.get("transports", {}),
                                (queue or {}).get("transports")))
    return found


def _workerRows(workers) -> dict:
    rows = {}
    for w in workers:
        index = nameIndex(w["id"])
        if w["role"] != "current" or index is None:
            continue
        columns = {2: integer(w["pid"] or 0), 3: string(w["state"]),
                   4: timeticks(w["uptime"] or 0), 5: counter64(w["handled"]),
                   6: counter64(w["errors"]), 8: counter64(w["restarts"]),
                   9: gauge(w["inflight"])}
        if w["rss"] is not None:
            columns[7] = gauge(w["rss"] // 1024)
        for column, value in columns.items():
            rows[(*_WORKER_ENTRY, column, *index)] = value
    return rows


def _transportRows(counted: dict, waiting: dict | None) -> dict:
    """C{waiting}: the queue's depth by transport, None where not known."""
    rows = {}
    for name in set(counted) | set(waiting or ()):
        index = nameIndex(name)
        if index is None:
            continue
        counts = counted.get(name, {})
        columns = {2: counter64(counts.get("handled", 0)),
                   3: counter64(counts.get("error", 0)),
                   4: counter64(counts.get("deadletter", 0))}
        if waiting is not None:
            part = waiting.get(name) or {"ready": 0, "delayed": 0, "held": 0,
                                         "oldest": None}
            columns[5] = gauge(part["ready"] + part["delayed"] + part["held"])
            columns[6] = gauge(part["oldest"] or 0)
        for column, value in columns.items():
            rows[(*_TRANSPORT_ENTRY, column, *index)] = value
    return rows


class View:
    """The objects of one status, in OID order, under the base."""

    def __init__(self, base: tuple[int, ...], values: dict[tuple, Value]):
        self.values = {(*base, *oid): value for oid, value in values.items()}
        self.order = sorted(self.values)

    def get(self, oid: tuple) -> tuple | None:
        value = self.values.get(oid)
        return None if value is None else (oid, value)

    def next(self, oid: tuple) -> tuple | None:
        """The first object after C{oid} (which need not exist)."""
        at = bisect.bisect_right(self.order, oid)
        if at == len(self.order):
            return None
        found = self.order[at]
        return found, self.values[found]


class Agent:
    """
    Keeps a L{View} of the master's status, asking again once it is older
    than L{CACHE} seconds.  C{ask} → a Deferred status; it fails with
    L{master.NotRunning} for a daemon that is down, anything else (no
    answer within C{timeout} included) is L{UNKNOWN}.
    """

    log = Logger()

    def __init__(self, ask, base: tuple[int, ...], clock, timeout: float = 2.0):
        self.ask = ask
        self.base = base
        self.clock = clock
        self.timeout = timeout
        self.health = None
        self._view = None
        self._taken = None

    @defer.inlineCallbacks
    def view(self):
        now = self.clock.seconds()
        if self._view is not None and now - self._taken < CACHE:
            return self._view
        health, status = yield self._status()
        self._view = View(self.base, objects(health, status))
        self._taken = self.clock.seconds()
        return self._view

    @defer.inlineCallbacks
    def _status(self):
        try:
            status = yield defer.maybeDeferred(self.ask).addTimeout(
                self.timeout, self.clock)
        except master.NotRunning as e:
            self._changed(DOWN, str(e))
            return DOWN, None
        except defer.TimeoutError:
            self._changed(UNKNOWN, f"no answer within {self.timeout:g} s")
            return UNKNOWN, None
        except Exception as e:
            self._changed(UNKNOWN, str(e) or type(e).__name__)
            return UNKNOWN, None
        self._changed(UP, "the daemon answers")
        return UP, status

    def _changed(self, health: int, why: str):
        if health != self.health:
            self.health = health
            self.log.info("snqStatus {status}: {why}",
                          status={UP: "up", DOWN: "down"}.get(health, "unknown"),
                          why=why)


@implementer(IHalfCloseableProtocol)
class PassPersist(LineOnlyReceiver):
    """
    net-snmp's side of the pipe.  Requests are answered in the order they
    came; snmpd waits for each answer, so one that takes long holds up the
    whole agent: the L{Agent}'s timeout bounds it.
    """

    delimiter = b"\n"
    log = Logger()

    def __init__(self, agent: Agent):
        self.agent = agent
        self.done = defer.Deferred()
        #: The command waiting for its OID (and, for set, its value) lines.
        self._pending: list[str] = []
        self._answering = defer.succeed(None)

    def lineReceived(self, line: bytes):
        text = line.decode("utf-8", "replace").strip()
        pending = self._pending
        if pending:
            pending.append(text)
            if pending[0] in ("get", "getnext") or len(pending) == 3:
                self._pending = []
                self._answer(pending)
        elif text == "PING":
            self._answer(["PING"])
        elif text in ("get", "getnext", "set"):
            self._pending = [text]
        elif text == "":
            # snmpd is done with us.
            self.readConnectionLost()
        else:
            self.log.warn("unknown pass_persist command {command!r}",
                          command=text)
            self._answer(["?"])

    def _answer(self, request):
        self._answering.addCallback(lambda _: self._respond(request))

    @defer.inlineCallbacks
    def _respond(self, request):
        """Always answers: snmpd would wait for ever."""
        command = request[0]
        try:
            if command == "PING":
                lines = ["PONG"]
            elif command == "set":
                lines = ["not-writable"]
            elif command in ("get", "getnext"):
                lines = yield self._lookup(command, request[1])
            else:
                lines = ["NONE"]
        except Exception:
            self.log.failure("cannot answer {request}", request=request)
            lines = ["NONE"]
        if self.transport is not None:
            self.transport.write("".join(f"{line}\n" for line in lines)
                                 .encode("utf-8"))

    @defer.inlineCallbacks
    def _lookup(self, command, text):
        try:
            oid = parseOid(text)
        except ValueError:
            return ["NONE"]
        view = yield self.agent.view()
        found = view.get(oid) if command == "get" else view.next(oid)
        if found is None:
            return ["NONE"]
        oid, value = found
        return [formatOid(oid), value.type, value.text]

    def readConnectionLost(self):
        """The requests are over: answer those that came, then end."""
        self._answering.addCallback(lambda _: self.transport.loseConnection())

    def writeConnectionLost(self):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(None)


def run(config, args, reactor):
    """
    Answer snmpd on standard input and output until it closes them.  The
    caller has moved standard error out of the way (L{quietStderr}).
    """
    if args.log:
        observer = FilteringLogObserver(
            textFileLogObserver(open(args.log, "a")),  # noqa: SIM115
            [_ownOrWarning])
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    path = args.socket or config.daemon.control_socket
    agent = Agent(lambda: master.askStatus(path, reactor),
                  parseOid(config.monitor.snmp_base_oid), reactor,
                  timeout=args.timeout)
    protocol = PassPersist(agent)
    stdio.StandardIO(protocol, reactor=reactor)
    return protocol.done


def _ownOrWarning(event) -> PredicateResult:
    """Not Twisted's lines for each connection: one a second, for ever."""
    if (event.get("log_namespace", "").startswith("snq.")
            or event["log_level"] >= LogLevel.warn):
        return PredicateResult.maybe
    return PredicateResult.no


def quietStderr():
    """snmpd reads our standard error as answers: nothing may go there."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
    os.close(devnull)
