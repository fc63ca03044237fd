# -*- test-case-name: tests.test_config -*-
"""
The TOML configuration, loaded into frozen dataclasses.

Every key has a default, so no file at all is a valid configuration (the
embedded SQLite default).  Every problem in a file is collected and reported
together, each naming the file, the key and what was expected; nothing
starts on a configuration that did not validate.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import math
import os
import re
import tomllib
import typing
import zoneinfo
from dataclasses import dataclass, field
from typing import Any

from snq.handlers.targets import TargetPolicy
from snq.secret import Secret, isSecretName, maskURL
from snq.xmpp.settings import SettingsError, XmppSettings

ENV_VAR = "SNQ_CONFIG"
BACKENDS = ("db", "stomp", "redis")
#: [transports.NAME] unique: off, drop or replace.
UNIQUE_MODES = ("", "drop", "replace")
#: The backends that keep items unique by key.
UNIQUE_BACKENDS = ("db", "redis")
#: How the URL of a Redis starts.
REDIS_SCHEMES = ("redis://", "rediss://", "redis+sentinel://")
#: Where an IoManager runs (C{[iomanagers.NAME] worker}): every queue worker,
#: the pool's first one, a worker of its own, or the XMPP worker.
PLACEMENTS = ("every", "one", "dedicated", "xmpp")
#: Worker roles (L{snq.routing.ROLES}), which an IoManager's name must not be:
#: a dedicated one's worker has its name as its role.
RESERVED_NAMES = ("all", "first", "queues", "xmpp")
CATCHUP = ("none", "last", "all")
#: Where the built-in IoManagers run unless told: feeds spread over every
#: queue worker (a lease each), confirmations need the XMPP connections.
DEFAULT_PLACEMENT = {"feedpoll": "every", "xmppconfirm": "xmpp"}


class ConfigError(Exception):
    """One or more problems, each a line: C{file: key: what was expected}."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _check(predicate, expected: str, **more):
    return {"check": (predicate, expected), **more}


def _count(low: int, high: int):
    return _check(lambda v: low <= v <= high, f"a number from {low} to {high}")


_positive = _check(lambda v: v > 0, "a number greater than 0")
_notNegative = _check(lambda v: v >= 0, "a number not below 0")
#: Items held or run at once: more would only exhaust memory.
_window = _count(1, 100_000)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_name = _check(lambda v: bool(_NAME.match(v)), "a name of letters, digits, _ . -")
_OID = re.compile(r"^\.?\d+(\.\d+){1,63}$")


def isName(value: str) -> bool:
    """Letters, digits, _ . - (daemon ids, groups, IoManagers)."""
    return bool(_NAME.match(value))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parseSize(value: int | str) -> int | None:
    """C{512m} → bytes; C{""} or 0 → None (no limit)."""
    if isinstance(value, int):
        return value or None
    if not value.strip():
        return None
    m = _SIZE.match(value)
    if not m:
        raise ValueError(value)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()]) or None


def _isSize(value) -> bool:
    try:
        parseSize(value)
    except (ValueError, AttributeError):
        return False
    return True


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_PER = {"s": 1, "m": 60, "h": 3600}


def parseRate(value: str) -> float | None:
    """C{"50/s"}, C{"600/m"}, C{"10/h"} → items per second; C{""} → None."""
    if not value.strip():
        return None
    m = _RATE.match(value)
    if not m or not float(m.group(1)):
        raise ValueError(value)
    return float(m.group(1)) / _PER[m.group(2)]


def _isRate(value) -> bool:
    try:
        parseRate(value)
    except (ValueError, AttributeError):
        return False
    return True


_RATE_EXPECTED = 'a rate like "50/s", "600/m" or "10/h" ("" = no limit)'


#: Secrets are immutable: defaults may be shared.
_NO_SECRET, _GUEST = Secret(""), Secret("guest")
_DB_URL = Secret.url("sqlite:///snq.sqlite")
_REDIS_URL = Secret.url("redis://127.0.0.1:6379/0")

_size = _check(_isSize, 'bytes as an integer or a string like "512m" ("" = none)')

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parseDuration(value: int | float | str) -> float:
    """C{"30s"}, C{"5m"}, C{"1h"}, C{"2d"} or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(value)
    return float(m.group(1)) * _SECONDS[m.group(2)]


def _isDuration(value) -> bool:
    try:
        seconds = parseDuration(value)
    except (ValueError, TypeError):
        return False
    return seconds > 0 and math.isfinite(seconds)


_duration = _check(lambda v: v == "" or _isDuration(v),
                   'seconds as a number or a string like "30s", "5m", "1h", "1d"')

#: For plugins' settings dataclasses (L{buildSettings}): a field's
#: C{metadata=check(predicate, "what is expected")}, and ready-made ones.
check = _check
DURATION = _check(_isDuration, 'seconds as a number or a string like "30s", '
                  '"5m", "1h", "1d"')
NAME = _name


#: The largest C{[sites.NICK] weight}.
MAX_WEIGHT = 1000


def _isWeight(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and 1 <= value <= MAX_WEIGHT)


@dataclass(frozen=True)
class DaemonConfig:
    #: The daemon's id, as in StatusNet: its workers are named <id>.<n>
    #: (generic.0, generic.1, …) and its XMPP worker <id>.xmpp.
    id: str = field(default="generic", metadata=_name)
    #: Worker processes; 0 = one per CPU.  twistd snq --workers wins over it.
    workers: int = field(default=0, metadata=_count(0, 1024))
    #: Seconds a stopping worker gets to finish the items it runs; then it
    #: is killed (SIGKILL), and what it did not finish is handled again.
    kill_time: float = field(default=30.0, metadata=_positive)
    #: A worker that fails within this many seconds of its start died young:
    #: its respawn waits (min_restart_delay, doubling).  One that lived
    #: longer is respawned at once.
    threshold: float = field(default=1.0, metadata=_positive)
    #: Seconds the respawn of a worker that died young waits the first
    #: time; the delay doubles with each young death.
    min_restart_delay: float = field(default=1.0, metadata=_positive)
    #: The respawn delay doubles up to this many seconds.
    max_restart_delay: float = field(default=60.0, metadata=_positive)
    #: Seconds a worker started by a rolling restart has to report ready.
    start_timeout: float = field(default=60.0, metadata=_positive)
    #: Fork workers from a template process that has imported what they
    #: import (shared memory, fast respawns); false: start each one as a
    #: fresh interpreter.
    fork_server: bool = True
    #: UNIX socket for snqctl (mode 0600); a relative path is in the run
    #: directory.
    control_socket: str = "snq.sock"


@dataclass(frozen=True)
class QueueConfig:
    #: Where the queue lives: db (SQLite, MariaDB/MySQL or PostgreSQL; see
    #: [db]), stomp (a message broker; see [stomp]) or redis (see [redis]).
    backend: str = field(
        default="db", metadata=_check(lambda v: v in BACKENDS, " | ".join(BACKENDS))
    )
    #: The groups this daemon consumes.  When an XMPP account is configured
    #: and the file does not set groups, they are ["main", "xmpp"].
    groups: list[str] = field(
        default_factory=lambda: ["main"],
        metadata=_check(
            lambda v: bool(v) and all(_NAME.match(g) for g in v),
            "a non-empty list of group names",
        ),
    )
    #: Failures before an item is dead-lettered;
    #: [transports.NAME] max_retries overrides it for one transport.
    max_retries: int = field(default=10, metadata=_count(0, 10_000))
    #: First retry delay in seconds; it doubles per attempt, half of it
    #: random (jitter).
    retry_delay: float = field(default=1.0, metadata=_positive)
    #: Longest retry delay, in seconds.
    retry_max_delay: float = field(default=3600.0, metadata=_positive)
    #: Items a worker holds at once (claimed, running or waiting for a slot).
    prefetch: int = field(default=100, metadata=_window)
    #: Items a worker runs at once, across transports.
    concurrency: int = field(default=50, metadata=_window)
    #: Longest wait between polls when a polling backend (SQL) finds
    #: nothing; with Redis, only the backoff after a failed claim.
    poll_interval: float = field(default=0.5, metadata=_positive)
    #: Seconds a claimed item stays reserved (SQL, Redis); renewed every
    #: third of it while the worker holds the item.
    lease: float = field(default=60.0, metadata=_positive)
    #: Also write each dead letter as a JSON file in this directory
    #: (StatusNet's habit); "" = no files.
    dead_letter_dir: str = ""
    #: STOMP destination prefix: a group's queue is basename + group, a
    #: breakout's basename + "group/transport[/site]".
    basename: str = "/queue/snq/"
    #: "group/transport" or "group/transport/site" entries that get a queue
    #: of their own (a STOMP queue, a Redis list).
    breakout: list[str] = field(
        default_factory=list,
        metadata=_check(
            lambda v: all(1 < len(b.split("/")) < 4 and all(b.split("/"))
                          for b in v),
            '"group/transport" or "group/transport/site" entries'))
    #: A worker's memory budget, e.g. "512m"; "" = none.  snq does not
    #: enforce it (softlimit is a part of it); for a hard limit use the
    #: service manager (systemd MemoryMax=).
    memory_limit: str | int = field(default="", metadata=_size)
    #: Where a worker recycles itself: bytes, or a percentage of
    #: memory_limit (a percentage with no memory_limit = no soft limit).
    softlimit: str | int = field(default="90%", metadata=_check(
        lambda v: (isinstance(v, str) and re.match(r"^\d+(\.\d+)?%$", v.strip()))
        or _isSize(v), 'bytes, a size like "400m", or a percentage like "90%"'))
    #: Recycle a worker after this many items; 0 = never.
    max_items: int = field(default=0, metadata=_notNegative)
    #: Seconds between starting two workers.
    spawndelay: float = field(default=0.2, metadata=_notNegative)
    #: Largest frame a worker takes: a bigger one is a baditem dead letter
    #: (on SQL its body is not even read); "" or 0 = no limit.
    max_frame: str | int = field(default="1m", metadata=_size)
    #: Threads for blocking handlers (blocking = True) in each worker, apart
    #: from the reactor's own (where name resolution runs).
    threads: int = field(default=10, metadata=_positive)

    def maxFrameBytes(self) -> int | None:
        return parseSize(self.max_frame)

    def softLimitBytes(self) -> int | None:
        """The soft limit in bytes, or None when neither key gives one."""
        soft = self.softlimit
        if isinstance(soft, str) and soft.strip().endswith("%"):
            hard = parseSize(self.memory_limit)
            if hard is None:
                return None
            return int(hard * float(soft.strip()[:-1]) / 100)
        return parseSize(soft)


@dataclass(frozen=True)
class DbConfig:
    #: The SQL database: sqlite:///relative/path, sqlite:////absolute/path,
    #: mysql://USER:PASSWORD@HOST:PORT/DATABASE or
    #: postgresql://USER:PASSWORD@HOST:PORT/DATABASE.  A secret: printed
    #: with its password masked.
    url: Secret = field(
        default=_DB_URL,
        metadata=_check(
            lambda v: v.split("://", 1)[0] in ("sqlite", "mysql", "postgresql")
            and "://" in v,
            "sqlite:///PATH, mysql://USER:PASS@HOST:PORT/DB "
            "or postgresql://USER:PASS@HOST:PORT/DB", url=True,
        ),
    )


@dataclass(frozen=True)
class StompConfig:
    #: The brokers, tcp://HOST:PORT or ssl://HOST:PORT (TLS, the system's
    #: CAs): each worker consumes from every one and sends on the first one
    #: that is up.
    servers: list[str] = field(
        default_factory=lambda: ["tcp://127.0.0.1:61613"],
        metadata=_check(lambda v: bool(v) and all(
            re.match(r"^(tcp|ssl)://[^:/]+:\d+$", s) for s in v),
            'a non-empty list of "tcp://HOST:PORT" or "ssl://HOST:PORT"'))
    #: STOMP login.
    login: str = "guest"
    #: STOMP passcode; a secret, never printed.
    passcode: Secret = _GUEST
    #: RabbitMQ virtual host (CONNECT's host header).
    vhost: str = "/"
    #: Seconds between heart-beats each way; a connection silent for twice
    #: that is dropped and made again; 0 = none.
    heartbeat: float = field(default=10.0, metadata=_notNegative)
    #: The control channel's topic.
    control_channel: str = "/topic/snq/control"
    #: HMAC-SHA256 key control messages must be signed with (a secret,
    #: never printed).  Without one, workers do not listen to the control
    #: channel, unless control_allow_unsigned is true.
    control_secret: Secret = _NO_SECRET
    #: Obey unsigned control messages when there is no control_secret:
    #: anyone who may publish on the broker can then stop or restart every
    #: worker.  For senders that cannot sign (StatusNet's).
    control_allow_unsigned: bool = False
    #: Seconds a signed control message is accepted after (or before) the
    #: time it was signed: clocks must agree this well.
    control_window: float = field(default=60.0, metadata=_positive)
    #: Messages the broker sends ahead per subscription (prefetch-count), a
    #: worker's window; 0 = twice [queue] concurrency (at most 20 with
    #: max_priority, so that an urgent item waits behind few others).
    prefetch: int = field(default=0, metadata=_count(0, 100_000))
    #: Seconds to connect, log in and subscribe before an attempt counts as
    #: failed.
    connect_timeout: float = field(default=10.0, metadata=_positive)
    #: RabbitMQ: the queues snq consumes are priority queues (x-max-priority)
    #: of this many levels above 0, and an item's priority, clamped into 0
    #: to it, orders what the broker delivers.  0 = plain queues, priorities
    #: ignored.  Every producer must then declare the same (see the manual's
    #: floods chapter, also for existing queues).
    max_priority: int = field(default=0, metadata=_count(0, 255))
    #: RabbitMQ: the type snq declares its queues (consumed, delay and
    #: dead) with: "classic" (declared as before, with no x-queue-type) or
    #: "quorum" (replicated over a cluster's nodes, so that one node's stop
    #: loses nothing; RabbitMQ 3.10 refuses x-max-priority on them).  Fixed
    #: when a queue is first declared: every producer must send the same
    #: (see the manual's STOMP chapter, "Quorum queues").
    queue_type: str = field(default="classic", metadata=_check(
        lambda v: v in ("classic", "quorum"), "classic | quorum"))
    #: Write "/" inside a destination's name as %2F, which RabbitMQ needs:
    #: "auto" (when the broker says it is RabbitMQ), "always" or "never".
    escape_slashes: str = field(default="auto", metadata=_check(
        lambda v: v in ("auto", "always", "never"), "auto | always | never"))


@dataclass(frozen=True)
class RedisConfig:
    #: redis://[USER:PASSWORD@]HOST:PORT/DB, or rediss://… for TLS, or
    #: redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER/DB:
    #: the Sentinels that name the primary (and follow its failover).  A
    #: secret: printed with its password masked.
    url: Secret = field(default=_REDIS_URL, metadata=_check(
        lambda v: v.startswith(REDIS_SCHEMES),
        "redis://[USER:PASSWORD@]HOST:PORT/DB, rediss://… or "
        "redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER/DB", url=True))
    #: Every key snq reads or writes starts with this: two installations
    #: on one Redis need different prefixes (or database numbers).
    prefix: str = field(default="snq:", metadata=_check(bool, "a non-empty prefix"))
    #: Seconds to connect or to wait for an answer before the connection is
    #: dropped and made again.
    timeout: float = field(default=10.0, metadata=_positive)
    #: rediss://: PEM file of the CAs to trust ("" = the system's); the
    #: server's certificate must name the host in url.
    ca_file: str = ""
    #: rediss://: a client certificate (PEM), for a server that asks for one
    #: (unless it sets tls-auth-clients no).
    cert_file: str = ""
    #: rediss://: the client certificate's key (PEM).
    key_file: str = ""


@dataclass(frozen=True)
class TransportConfig:
    #: Items of this transport a worker runs at once; 0 = only the
    #: [queue] concurrency limit.
    concurrency: int = field(default=0, metadata=_count(0, 100_000))
    #: Seconds before a running item counts as failed (cancelled, then
    #: retried); 0 = the handler's own timeout (none for most).
    timeout: float = field(default=0.0, metadata=_notNegative)
    #: This transport's retry limit; not set = [queue] max_retries.
    max_retries: int | None = field(default=None, metadata=_count(0, 10_000))
    #: Priority of this transport's items enqueued without one (higher
    #: runs first).
    priority: int = 0
    #: The group whose queue carries this transport; not set = the
    #: handler's own group (usually "main").
    group: str | None = field(default=None, metadata=_name)
    #: Most items of this transport started per second, second, minute
    #: or hour ("50/s", "600/m"), across every worker and host sharing the
    #: queue (SQL, Redis); an item over the limit waits, uncharged.  Up to
    #: one second's worth (at least one item) may start at once.
    rate: str = field(default="", metadata=_check(_isRate, _RATE_EXPECTED))
    #: What an item enqueued with a key does while an item of this
    #: transport with the same key waits: "drop" (the new one is not
    #: stored), "replace" (it takes the waiting one's place), or "" (off:
    #: keys are only carried).  SQL and Redis backends.
    unique: str = field(default="", metadata=_check(
        lambda v: v in UNIQUE_MODES, " | ".join(f'"{m}"' for m in UNIQUE_MODES)))
    #: Whether a running item with the key counts too (the new one is then
    #: dropped, even with unique = "replace").
    unique_running: bool = False

    def ratePerSecond(self) -> float | None:
        return parseRate(self.rate)


#: The names of this machine's loopback, which a monitor there answers to.
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
_HOST_NAME = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def keptUnique(item, transports) -> TransportConfig | None:
    """
    The settings (C{transports(name)}, a L{TransportConfig} or None) that
    keep C{item} unique: it has a key and its transport a C{unique} mode.
    None: it is stored as always, whatever waits.
    """
    if item.key is None:
        return None
    settings = transports(item.transport)
    return settings if settings is not None and settings.unique else None


def parseHostPort(value: str, scheme: str = "") -> tuple[str, int]:
    """C{[scheme]HOST:PORT} → (host, port); an IPv6 host in brackets."""
    m = _HOST_PORT.match(value.removeprefix(scheme))
    if not value.startswith(scheme) or not m or int(m.group(2)) > 65535:
        raise ValueError(value)
    return m.group(1).strip("[]"), int(m.group(2))


def _hostPort(scheme: str = ""):
    def valid(value):
        try:
            parseHostPort(value, scheme)
        except ValueError:
            return False
        return True

    return _check(lambda v: v == "" or valid(v), f'"{scheme}HOST:PORT" or "" (off)')


@dataclass(frozen=True)
class MonitorConfig:
    #: udp://HOST:PORT of StatusNet's UDP monitor; "" = off.
    udp: str = field(default="", metadata=_hostPort("udp://"))
    #: HOST:PORT of a statsd server; "" = off.
    statsd: str = field(default="", metadata=_hostPort())
    #: Every statsd name starts with this and a dot.
    statsd_prefix: str = field(default="snq", metadata=_name)
    #: HOST:PORT of the master's dashboard, /metrics and /status.json
    #: ("[::1]:8750" for IPv6); "" = off.
    http: str = field(default="127.0.0.1:8750", metadata=_hostPort())
    #: When set, /metrics and /status.json want "Authorization: Bearer
    #: TOKEN"; required when C{http} is not a loopback address.  A secret,
    #: never printed.
    token: Secret = _NO_SECRET
    #: The names (the Host header, without port) the monitor answers to;
    #: [] = the address of C{http}, and localhost's names when that is
    #: loopback.  Required when C{http} listens on every address (0.0.0.0).
    hosts: list[str] = field(default_factory=list, metadata=_check(
        lambda v: all(_HOST_NAME.match(h) for h in v), "a list of host names"))
    #: Seconds between two looks at the queue's depth and dead letters.
    depth_interval: float = field(default=2.0, metadata=_positive)
    #: Where C{snqctl snmp} answers: under net-snmp's experimental
    #: netSnmpPlaypen, for want of an enterprise number (contrib/SNQ-MIB.txt).
    snmp_base_oid: str = field(
        default=".1.3.6.1.4.1.8072.9999.9999.767",
        metadata=_check(lambda v: bool(_OID.match(v)),
                        'a numeric OID such as ".1.3.6.1.4.1.8072.9999.9999.767"'))

    def _host(self) -> str:
        return parseHostPort(self.http)[0].lower()

    def loopback(self) -> bool:
        """Whether C{http} listens where only this machine can reach it."""
        host = self._host()
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def wildcard(self) -> bool:
        """Whether C{http} listens on every address."""
        return self._host() in ("0.0.0.0", "::", "")

    def hostNames(self) -> frozenset[str]:
        """The Host header names (without port) the monitor answers to."""
        if self.hosts:
            return frozenset(h.lower().strip("[]") for h in self.hosts)
        names = {self._host()}
        if self.loopback():
            names |= LOOPBACK_NAMES
        return frozenset(names)


@dataclass(frozen=True)
class XmppConfig(XmppSettings):
    """
    An XMPP account: C{[xmpp]} for the default site, C{[sites.NICK.xmpp]}
    for another; C{jid} "" (the default) means none.  The keys and their
    checks are L{XmppSettings}', so this is what the connection takes.
    """

    #: The account, user@domain; "" = no XMPP.
    jid: str = ""
    #: Its password, required with a jid; a secret, never printed.
    password: Secret = _NO_SECRET

    def __post_init__(self):
        if self.jid:
            super().__post_init__()


@dataclass(frozen=True)
class IoManagerConfig:
    """
    C{[iomanagers.NAME]}: an IoManager plugin (L{snq.iomanagers}).  The keys
    here are snq's; every other key of the table is the plugin's own
    (C{settings}), which the plugin checks when it is loaded.
    """

    #: False: configured but not run.
    enabled: bool = True
    #: Which worker runs it: every (queue worker), one (the pool's first
    #: worker), dedicated (a worker of its own) or xmpp (the XMPP worker);
    #: "" = the plugin's usual place (feedpoll: every; xmppconfirm: xmpp;
    #: any other: one).
    worker: str = field(default="", metadata=_check(
        lambda v: v in ("", *PLACEMENTS), " | ".join(PLACEMENTS)))
    #: "package.module:Class"; "" = the C{snq.iomanagers} entry point NAME.
    plugin: str = field(default="", metadata=_check(
        lambda v: v == "" or bool(re.match(r"^[\w.]+:[\w.]+$", v)),
        '"package.module:Class", or "" for the entry point of that name'))
    #: Not a key: every other key of the table, the plugin's own settings.
    settings: dict = field(default_factory=dict, metadata={"rest": True})


@dataclass(frozen=True)
class ScheduleConfig:
    """
    C{[schedule.NAME]}: an item enqueued at every tick, once across every
    daemon sharing the backend (L{snq.iomanagers.schedule}).
    """

    #: An interval ("30s", 90): ticks at multiples of it since the epoch.
    every: str | float = field(default="", metadata=_duration)
    #: A cron expression (five fields), in C{timezone}; give C{every} or
    #: C{cron}.
    cron: str = ""
    #: The items' transport (required).
    transport: str = field(default="", metadata=_name)
    #: The items' payload.
    payload: Any = field(default_factory=dict)
    #: The items' site.
    site: str = field(default="default", metadata=_name)
    #: "all": one item per configured site instead of C{site}.
    sites: str = field(default="", metadata=_check(
        lambda v: v in ("", "all"), '"all", or "" for site alone'))
    #: The time zone of C{cron}, by its IANA name.
    timezone: str = "UTC"
    #: Seconds: each item waits a random part of this before it runs.
    jitter: float = field(default=0.0, metadata=_notNegative)
    #: After downtime, the ticks nobody fired: none, the latest, or all of
    #: them …
    catchup: str = field(default="none", metadata=_check(
        lambda v: v in CATCHUP, " | ".join(CATCHUP)))
    #: … at most this many, the latest.
    catchup_limit: int = field(default=100, metadata=_positive)
    #: None = the transport's priority.
    priority: int | None = None


@dataclass(frozen=True)
class LedgerConfig:
    """
    C{[ledger]}: where daemons sharing a backend record what must happen
    once among them (schedule ticks, feed entries, leases).  "" = the
    queue's own database or Redis; a STOMP queue needs one given.
    """

    #: A database or Redis every daemon on the backend shares; "" = the
    #: queue's own (a STOMP queue has none). May hold a password.
    url: Secret = field(default=_NO_SECRET, metadata=_check(
        lambda v: v == "" or (v.split("://", 1)[0] in (
            "sqlite", "mysql", "postgresql", "redis", "rediss", "redis+sentinel")
            and "://" in v),
        'a db URL (sqlite:///…, mysql://…, postgresql://…), a Redis URL '
        '(redis://…, rediss://…, redis+sentinel://…), or "" for the '
        'queue\'s own', url=True))


@dataclass(frozen=True)
class ClusterConfig:
    """
    C{[cluster]}: how daemons sharing a backend see each other (the
    registry behind C{snqctl status --cluster}, and the cluster-wide
    pauses).
    """

    #: Seconds between two heartbeats of a daemon in the registry; workers
    #: look at the cluster's pauses as often.
    heartbeat: float = field(default=5.0, metadata=_positive)
    #: A daemon whose last heartbeat is older than this is shown as gone
    #: (C{snqctl check --cluster}: a stale heartbeat).
    stale: float = field(default=20.0, metadata=_positive)
    #: … and leaves the registry once its last heartbeat is this old.
    forget: float = field(default=86400.0, metadata=_positive)
    #: Seconds of the lease in the ledger that keeps the "xmpp" group (the
    #: XMPP connections and the xmpp transports) to one worker among all
    #: daemons on the backend: on every other host the XMPP worker waits,
    #: unconnected, and takes over within about 1⅓ of this once the holder
    #: is gone.  0 = no lease: every daemon's XMPP worker connects (run the
    #: group on one host only).  Without a ledger (a STOMP queue without
    #: [ledger] url) there is none either.  A change restarts the workers.
    xmpp_lease: float = field(default=30.0, metadata=_notNegative)


@dataclass(frozen=True)
class Config:
    #: The master and its pool of worker processes.
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    #: The queue: its backend, the groups consumed, retries, limits, and
    #: when a worker recycles itself.
    queue: QueueConfig = field(default_factory=QueueConfig)
    #: The SQL database of backend = "db" (the default).
    db: DbConfig = field(default_factory=DbConfig)
    #: The message brokers of backend = "stomp".
    stomp: StompConfig = field(default_factory=StompConfig)
    #: The Redis server of backend = "redis".
    redis: RedisConfig = field(default_factory=RedisConfig)
    #: The default site's XMPP account; another site's is
    #: [sites.NICK.xmpp], with the same keys.
    xmpp: XmppConfig = field(default_factory=XmppConfig)
    #: What the master shows: the dashboard, /metrics, statsd, StatusNet's
    #: UDP monitor.
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    #: Limits of one transport, [transports.NAME], so that one slow remote
    #: cannot take every slot.
    transports: dict[str, TransportConfig] = field(default_factory=dict)
    #: transport name → "package.module:Class"
    handlers: dict[str, str] = field(default_factory=dict)
    #: site nick → free-form settings handed to handlers.
    sites: dict[str, dict] = field(default_factory=dict)
    #: C{[iomanagers.NAME]}: an IoManager plugin, its place and its own
    #: settings (see the chapter on IoManagers).
    iomanagers: dict[str, IoManagerConfig] = field(default_factory=dict)
    #: C{[schedule.NAME]}: items enqueued at each tick of a schedule, once
    #: across every daemon sharing the backend (see the chapter on
    #: schedules).
    schedule: dict[str, ScheduleConfig] = field(default_factory=dict)
    #: Where daemons sharing a backend record what must happen once among
    #: them (see the chapter on IoManagers, "The ledger").
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    #: How daemons sharing a backend see each other (see the chapter on
    #: scaling, "One view of the cluster").
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    #: The file this came from, or None for the embedded default.
    source: str | None = None
    #: What follows says where this config stands in a running daemon, not
    #: what it configures: not compared, so a diff sees only the keys.
    #: The file's text as validated; workers get exactly this.
    text: bytes | None = field(default=None, compare=False, repr=False)
    #: Counts the configs a master has run (a reload adds one) …
    generation: int = field(default=1, compare=False)
    #: … and when it loaded this one (UNIX seconds).
    loaded: float | None = field(default=None, compare=False)
    #: Handler module → fingerprint of its code (L{snq.reconfig.stamped}).
    code: dict = field(default_factory=dict, compare=False, repr=False)

    def transport(self, name: str) -> TransportConfig:
        return self.transports.get(name) or _DEFAULT_TRANSPORT

    def maxRetries(self, transport: str) -> int:
        own = self.transport(transport).max_retries
        return self.queue.max_retries if own is None else own

    def siteConfig(self, site: str) -> dict:
        """
        A site's settings: C{[sites.default]} overridden by C{[sites.SITE]}.
        """
        merged = dict(self.sites.get("default", {}))
        merged.update(self.sites.get(site, {}))
        return merged

    def siteWeight(self, site: str) -> int:
        """
        C{[sites.NICK] weight}: the site's share of a shared queue's claims
        against the other sites with work waiting (1 unless set).
        """
        return self.siteConfig(site).get("weight", 1)

    def siteRate(self, site: str) -> float | None:
        """
        C{[sites.NICK] rate} in items per second (each site its own limit;
        C{[sites.default]}'s applies to every site), None = no limit.
        """
        return parseRate(self.siteConfig(site).get("rate", ""))

    def rates(self) -> dict[str, float]:
        """
        Every rate limit, by bucket name: C{t:TRANSPORT}, C{s:SITE}, and
        C{s:} for the sites without one of their own.
        """
        limits = {f"t:{name}": t.ratePerSecond()
                  for name, t in self.transports.items() if t.rate}
        default = self.siteRate("default")
        if default is not None:
            limits["s:"] = default
        limits.update((f"s:{site}", rate) for site in self.sites
                      if (rate := self.siteRate(site)) is not None
                      and rate != default)
        return limits

    def knownSites(self) -> frozenset | None:
        """
        The sites items may be for: the nicks under C{[sites]} and
        C{default}, once a site other than C{default} is configured; None
        (any site) before, so that C{[sites.default]} alone stays the base
        of every site.
        """
        if not self.sites.keys() - {"default"}:
            return None
        return frozenset({*self.sites, "default"})

    def xmppAccounts(self) -> dict[str, XmppConfig]:
        """Site → its own XMPP account, for the sites that have one."""
        accounts = {"default": self.xmpp} if self.xmpp.jid else {}
        for nick, table in self.sites.items():
            account = table.get("xmpp")
            if isinstance(account, XmppConfig) and account.jid:
                accounts[nick] = account
        return accounts

    def managers(self) -> dict[str, IoManagerConfig]:
        """
        The IoManagers this config asks for: its C{[iomanagers]} tables, and
        the built-in ones its other sections imply (C{schedule} with a
        C{[schedule.NAME]}, C{feedpoll} with a site's C{feeds}) unless a
        table of their own says otherwise.
        """
        managers = dict(self.iomanagers)
        if self.schedule:
            managers.setdefault("schedule", IoManagerConfig())
        if any(isinstance(s.get("feeds"), dict) and s["feeds"]
               for s in self.sites.values()):
            managers.setdefault("feedpoll", IoManagerConfig())
        return {name: dataclasses.replace(
                    m, worker=m.worker or DEFAULT_PLACEMENT.get(name, "one"))
                for name, m in managers.items() if m.enabled}

    def xmppSite(self, site: str) -> str | None:
        """
        The site whose account serves C{site}'s XMPP: its own, else (unless
        its C{[sites.NICK.xmpp]} says C{jid = ""}) the C{[xmpp]} one.
        """
        account = self.sites.get(site, {}).get("xmpp")
        if isinstance(account, XmppConfig):
            return site if account.jid else None
        return "default" if self.xmpp.jid else None


_DEFAULT_TRANSPORT = TransportConfig()
_SECTIONS = {"daemon": DaemonConfig, "queue": QueueConfig, "db": DbConfig,
             "stomp": StompConfig, "redis": RedisConfig, "xmpp": XmppConfig,
             "monitor": MonitorConfig, "ledger": LedgerConfig,
             "cluster": ClusterConfig}


def load(path: str | None = None, environ: typing.Mapping = os.environ) -> Config:
    """
    Load C{path}, else the file named by C{$SNQ_CONFIG}, else the embedded
    default.  Raises L{ConfigError}.
    """
    path = path or environ.get(ENV_VAR) or None
    if path is None:
        return Config()
    return parseText(read(path), path)


def read(path: str) -> bytes:
    """The file's bytes, or L{ConfigError} saying why not."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"])


def parseText(text: bytes, source: str = "<config>") -> Config:
    """
    A config from the text of a file: a reload validates the text it read
    once and hands that same text to the workers, whatever the file says
    by the time they read it.
    """
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([f"{source}: not UTF-8: {e}"])
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"])
    return dataclasses.replace(parse(data, source), text=text)


def parse(data: dict, source: str = "<config>") -> Config:
    problems: list[str] = []

    def problem(key: str, message: str) -> None:
        problems.append(f"{source}: {key}: {message}")

    known = {*_SECTIONS, "transports", "handlers", "sites", "iomanagers",
             "schedule"}
    for key in sorted(set(data) - known):
        problem(key, f"unknown section (known: {', '.join(sorted(known))})")

    sections = {
        name: _build(cls, _table(data, name, problem), name, problem)
        for name, cls in _SECTIONS.items()
    }
    transports = {
        name: _build(TransportConfig, _asTable(table, f"transports.{name}", problem),
                     f"transports.{name}", problem)
        for name, table in _table(data, "transports", problem).items()
    }
    _unique(transports, sections["queue"].backend, problem)
    handlers = {}
    for name, path in _table(data, "handlers", problem).items():
        if not isinstance(path, str) or not re.match(r"^[\w.]+:[\w.]+$", path):
            problem(f"handlers.{name}", 'expected "package.module:Class"')
        else:
            handlers[name] = path
    sites = {
        nick: _asTable(table, f"sites.{nick}", problem)
        for nick, table in _table(data, "sites", problem).items()
    }
    _siteXmpp(sites, sections["xmpp"], problem)
    sites = {nick: _secrets(table) for nick, table in sites.items()}
    for nick, table in sites.items():
        for key, expected in TargetPolicy.problems(table):
            problem(f"sites.{nick}.{key}", expected)
        if "weight" in table and not _isWeight(table["weight"]):
            problem(f"sites.{nick}.weight", f"expected an integer from 1 to"
                    f" {MAX_WEIGHT}, got {table['weight']!r}")
        if "rate" in table and not _isRate(table["rate"]):
            problem(f"sites.{nick}.rate",
                    f"expected {_RATE_EXPECTED}, got {table['rate']!r}")
    _monitor(sections["monitor"], problem)
    _cluster(sections["cluster"], problem)
    _stomp(sections["stomp"], problem)
    iomanagers = {
        name: _ioManager(name, _asTable(table, f"iomanagers.{name}", problem),
                         problem)
        for name, table in _table(data, "iomanagers", problem).items()
    }
    schedule = {
        name: _schedule(name, _asTable(table, f"schedule.{name}", problem),
                        problem)
        for name, table in _table(data, "schedule", problem).items()
    }
    if problems:
        raise ConfigError(problems)
    config = Config(
        **sections, transports=transports, handlers=handlers, sites=sites,
        iomanagers=iomanagers, schedule=schedule, source=source,
    )
    queueTable = data.get("queue", {})
    if config.xmppAccounts() and "groups" not in queueTable:
        # Filling in [xmpp] is all it takes to use XMPP.
        config = dataclasses.replace(config, queue=dataclasses.replace(
            config.queue, groups=["main", "xmpp"]))
    return config


def _secrets(table: dict) -> dict:
    """
    A site's table with the values of secret-named keys (C{webhook_secret},
    C{api_token}, …) as L{Secret}s: handlers C{reveal()} them.
    """
    return {key: (_secrets(value) if isinstance(value, dict)
                  else Secret(value) if isSecretName(key) else value)
            for key, value in table.items()}


def _monitor(monitor: MonitorConfig, problem) -> None:
    """What the monitor must have to listen beyond this machine."""
    if not monitor.http:
        return
    if not monitor.loopback() and not monitor.token:
        problem("monitor.token", f"needed when monitor.http ({monitor.http}) is "
                "not a loopback address: anyone who reaches it would read the "
                "queue's state")
    if monitor.wildcard() and not monitor.hosts:
        problem("monitor.hosts", f"needed when monitor.http ({monitor.http}) "
                "listens on every address: the names clients reach it by")


def _cluster(cluster: ClusterConfig, problem) -> None:
    """A daemon must not look gone between two of its heartbeats."""
    if cluster.stale < 2 * cluster.heartbeat:
        problem("cluster.stale", f"expected at least twice cluster.heartbeat "
                f"({cluster.heartbeat:g} s), got {cluster.stale:g}")
    if cluster.forget < cluster.stale:
        problem("cluster.forget", f"expected at least cluster.stale "
                f"({cluster.stale:g} s), got {cluster.forget:g}")


def _unique(transports: dict, backend: str, problem) -> None:
    if backend in UNIQUE_BACKENDS:
        return
    why = {"stomp": "a message broker cannot look up a waiting message by its "
                    "key (RabbitMQ has no keyed deduplication snq could use)"}
    only = " or ".join(f'"{b}"' for b in UNIQUE_BACKENDS)
    for name, transport in transports.items():
        if transport.unique:
            problem(f"transports.{name}.unique",
                    f"not available with backend = {backend!r}: "
                    f"{why.get(backend, '')}; only with backend = {only}")


def _stomp(stomp: StompConfig, problem) -> None:
    """What RabbitMQ would refuse at the first SUBSCRIBE."""
    if stomp.queue_type == "quorum" and stomp.max_priority:
        problem("stomp.queue_type", f"quorum cannot go with stomp.max_priority "
                f"({stomp.max_priority}): RabbitMQ refuses x-max-priority on "
                "quorum queues; set max_priority = 0 or queue_type = \"classic\"")


def _table(data: dict, key: str, problem) -> dict:
    return _asTable(data.get(key, {}), key, problem)


def _asTable(value: Any, key: str, problem) -> dict:
    if not isinstance(value, dict):
        problem(key, f"expected a table, got {_typeName(value)}")
        return {}
    return value


def _build(cls, table: dict, where: str, problem):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in sorted(set(table) - set(fields)):
        problem(f"{where}.{key}", f"unknown key (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in table:
            continue
        key, value, hint = f"{where}.{name}", table[name], hints[name]
        expected = _coerce(hint, value)
        if expected is not None:
            problem(key, f"expected {expected}, got {_typeName(value)}"
                    f"{_shown(f, hint, value)}")
            continue
        if hint is float and not math.isfinite(value):
            problem(key, f"expected a finite number, got {value}")
            continue
        check = f.metadata.get("check")
        if check and value is not None and not check[0](value):
            problem(key, f"expected {check[1]}, got{_shown(f, hint, value)}")
            continue
        if hint is Secret:
            value = Secret.url(value) if f.metadata.get("url") else Secret(value)
        values[name] = float(value) if hint is float else value
    try:
        return cls(**values)
    except SettingsError as e:
        for key, expected in e.problems:
            problem(f"{where}.{key}", expected)
        return cls()


def _ioManager(name: str, table: dict, problem) -> IoManagerConfig:
    where = f"iomanagers.{name}"
    if not _NAME.match(name) or name in RESERVED_NAMES:
        problem(where, "expected a name of letters, digits, _ . - other than "
                + ", ".join(RESERVED_NAMES))
    own = {"enabled", "worker", "plugin"}
    manager = _build(IoManagerConfig, {k: v for k, v in table.items() if k in own},
                     where, problem)
    return dataclasses.replace(
        manager, settings={k: v for k, v in table.items() if k not in own})


def _schedule(name: str, table: dict, problem) -> ScheduleConfig:
    where = f"schedule.{name}"
    if not _NAME.match(name):
        problem(where, "expected a name of letters, digits, _ . -")
    schedule = _build(ScheduleConfig, {k: v for k, v in table.items()
                                       if k != "payload"}, where, problem)
    schedule = dataclasses.replace(schedule, payload=table.get("payload", {}))
    if bool(schedule.every) == bool(schedule.cron):
        problem(where, 'expected one of every = "30s" or cron = "*/5 * * * *"')
    if not schedule.transport:
        problem(f"{where}.transport", "expected the transport of its items")
    if schedule.cron:
        from cronsim import CronSim, CronSimError

        try:
            CronSim(schedule.cron, datetime.datetime.now(datetime.UTC))
        except CronSimError as e:
            problem(f"{where}.cron", f"expected a cron expression, got "
                    f"{schedule.cron!r}: {e}")
    try:
        zoneinfo.ZoneInfo(schedule.timezone)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        problem(f"{where}.timezone", f"expected a time zone like \"UTC\" or "
                f"\"Europe/Berlin\", got {schedule.timezone!r}")
    return schedule


def buildSettings(cls, table: dict, where: str):
    """
    A plugin's settings dataclass C{cls} from its table, checked as snq's
    own sections are; L{ConfigError} naming each key that is wrong.
    """
    problems = []
    settings = _build(cls, table, where,
                      lambda key, message: problems.append(f"{key}: {message}"))
    if problems:
        raise ConfigError(problems)
    return settings


def _siteXmpp(sites: dict, default: XmppConfig, problem) -> None:
    """
    Turn each C{[sites.NICK.xmpp]} table into an L{XmppConfig}, and refuse
    a JID two sites would log in with: two connections of one account throw
    each other out.
    """
    owners = {_bareJid(default.jid): "xmpp"} if default.jid else {}
    for nick, table in sites.items():
        if "xmpp" not in table:
            continue
        where = f"sites.{nick}.xmpp"
        if nick == "default":
            problem(where, "the default site's account is the [xmpp] section")
            continue
        account = _build(XmppConfig, _asTable(table["xmpp"], where, problem),
                         where, problem)
        sites[nick] = {**table, "xmpp": account}
        if not account.jid:
            continue
        other = owners.setdefault(_bareJid(account.jid), where)
        if other != where:
            problem(f"{where}.jid", f"{account.jid} is already the account of "
                    f"[{other}]; give each site its own JID, or leave out "
                    f"{where} to use the [xmpp] account")


def _bareJid(jid: str) -> str:
    return jid.partition("/")[0].lower()


def _shown(f, hint, value) -> str:
    """
    C{value} as an error may show it: never a secret's, a URL masked,
    anything long cut short.
    """
    if hint is Secret:
        if f.metadata.get("url") and isinstance(value, str):
            return f" {maskURL(value)!r}"
        return " (not shown: a secret)"
    if isinstance(value, str):
        value = maskURL(value)
    text = repr(value)
    return " " + (text if len(text) <= 80 else text[:77] + "...")


def _coerce(hint, value) -> str | None:
    """The expectation C{value} fails for C{hint}, or None if it fits."""
    if hint is Any:
        return None
    if hint is dict:
        return None if isinstance(value, dict) else "a table"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int or hint == (int | None):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a number"
    if hint is str or hint == (str | None) or hint is Secret:
        return None if isinstance(value, str) else "a string"
    if hint == (str | int):
        ok = isinstance(value, (str, int)) and not isinstance(value, bool)
        return None if ok else "a string or an integer"
    if hint == (str | float):
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        return None if ok else "a string or a number"
    if hint == list[str]:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "a list of strings"
    raise TypeError(f"no coercion for {hint}")


def _typeName(value: Any) -> str:
    return {
        bool: "boolean", int: "integer", float: "number", str: "string",
        list: "array", dict: "table",
    }.get(type(value), type(value).__name__)
