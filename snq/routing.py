# -*- test-case-name: tests.test_routing -*-
"""
Which items a worker takes and where an item goes: the filter a worker
claims with (its groups and site), the broker queues or Redis lists it
consumes, and the queue a new item is routed to (groups and breakouts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from snq.handlers import HandlerError, HandlerRegistry, handlerPaths
from snq.handlers.source import Unreadable, sourceGroup
from snq.logger import LazyLogger


@dataclass(frozen=True)
class TransportFilter:
    """
    Which transports a worker claims: those in C{include}, or, when C{include}
    is None (the "main" group is active, which catches every transport no
    other group claims), all but those in C{exclude}.
    """

    include: frozenset | None = None
    exclude: frozenset = field(default_factory=frozenset)
    #: Only this site's items (a daemon run with C{--site}); None = any.
    site: str | None = None
    #: The groups it stands for: brokers consume their queues by name.
    groups: tuple = ()

    @classmethod
    def forGroups(cls, groups, groupOf: dict[str, str],
                  site: str | None = None) -> TransportFilter:
        if "main" in groups:
            return cls(exclude=frozenset(
                t for t, g in groupOf.items() if g not in groups),
                site=site, groups=tuple(groups))
        return cls(include=frozenset(t for t, g in groupOf.items() if g in groups),
                   site=site, groups=tuple(groups))

    @classmethod
    def forWorker(cls, config, registry: HandlerRegistry, role: str,
                  site: str | None = None, without=()) -> TransportFilter:
        """
        What a worker of C{role} (see L{groupsOf}) claims under C{config},
        leaving out the groups C{without}.
        """
        groupOf = {name: registry.groupOf(name, config.transport(name).group)
                   for name in {*registry.classes, *config.transports}}
        groups = [g for g in groupsOf(config, role) if g not in without]
        return cls.forGroups(groups, groupOf, site)

    def accepts(self, transport: str) -> bool:
        if self.include is not None:
            return transport in self.include
        return transport not in self.exclude


#: What a worker does: every active group and IoManager (C{--inline}); the
#: queues, every active group but "xmpp" (the pool's numbered workers, of
#: which the first also runs the IoManagers that want one worker); or one
#: thing on a worker of its own: the "xmpp" group (so each account has one
#: connection), or a dedicated IoManager, whose name is the role.
ROLES = ("all", "first", "queues", "xmpp")


def groupsOf(config, role: str) -> list[str]:
    """The groups a worker of C{role} consumes under C{config}."""
    if role == "xmpp":
        return ["xmpp"]
    groups = list(config.queue.groups)
    if role == "all":
        return groups
    if role in ("first", "queues"):
        return [g for g in groups if g != "xmpp"]
    return []


def dedicatedRoles(config) -> list[str]:
    """The roles that get a worker of their own: "xmpp", dedicated IoManagers."""
    roles = ["xmpp"] if "xmpp" in config.queue.groups else []
    return roles + sorted(name for name, m in config.managers().items()
                          if m.worker == "dedicated")


def runsManager(role: str, name: str, manager) -> bool:
    """Whether a worker of C{role} runs IoManager C{name} (its C{manager} table)."""
    where = manager.worker
    if role == "all":
        return True
    if role in ("first", "queues"):
        return where == "every" or (where == "one" and role == "first")
    if role == "xmpp":
        return where == "xmpp"
    return where == "dedicated" and name == role


def consumedSpecs(groups, breakouts, site: str | None = None) -> list[str]:
    """
    The broker queues (or Redis lists), as group names and breakout specs,
    that a worker of C{groups} consumes: the groups' own and their
    breakouts.  With C{site}, only that site's breakouts: a group's queue
    carries every site's items.
    """
    ours = sorted(b for b in breakouts if b.split("/", 1)[0] in groups)
    if site is None:
        return [*groups, *ours]
    return [b for b in ours if b.count("/") == 2 and b.rsplit("/", 1)[1] == site]


class RoutingError(ValueError):
    """Where an item goes cannot be known here; the message says what to set."""


class Routing:
    """
    Where an item goes on a broker (a STOMP queue, a Redis list), as a group
    name or breakout spec: the most specific breakout of its transport (and
    site), else its transport's group: C{[transports.NAME] group}, else its
    handler's, else C{main}.
    """

    log = LazyLogger()

    def __init__(self, config):
        self.config = config
        self.breakouts = frozenset(config.queue.breakout)
        self._registry = None

    def registry(self) -> HandlerRegistry:
        """The handlers, for their groups; loaded when first needed."""
        if self._registry is None:
            try:
                self._registry = HandlerRegistry.load(self.config.handlers)
            except HandlerError as e:
                self.log.warn("routing without the configured handlers: {why}",
                              why=e)
                self._registry = HandlerRegistry.load({})
            self._compareSources(self._registry)
        return self._registry

    def _compareSources(self, registry: HandlerRegistry):
        """
        Producers outside the daemon read handlers' groups from their source
        (L{SourceRouting}): say where they would send items elsewhere.
        """
        paths = handlerPaths(self.config.handlers)
        for name, cls in sorted(registry.classes.items()):
            if self.config.transport(name).group:
                continue
            try:
                read = sourceGroup(paths[name])
            except Unreadable as e:
                read = f"unreadable: {e}"
            if read != cls.group:
                self.log.warn(
                    "handler {name} is in group {group}, but producers that do "
                    "not import handlers (snq.client) read its source as "
                    "{read}; set [transports.{name}] group = \"{group}\"",
                    name=name, group=cls.group, read=read)

    def groupOf(self, transport: str) -> str:
        return self.config.transport(transport).group or self.handlerGroup(
            transport)

    def handlerGroup(self, transport: str) -> str:
        """The group of the transport's handler; C{main} if it has none."""
        return self.registry().groupOf(transport)

    def route(self, transport: str, site: str) -> str:
        group = self.groupOf(transport)
        for spec in (f"{group}/{transport}/{site}", f"{group}/{transport}"):
            if spec in self.breakouts:
                return spec
        return group


class SourceRouting(Routing):
    """
    L{Routing} for producers outside the daemon (L{snq.client}): handlers'
    groups are read from their source (L{sourceGroup}), so that neither
    they nor Twisted are imported into a web application.  A group that
    cannot be read is a L{RoutingError}, never a guess.
    """

    def __init__(self, config):
        super().__init__(config)
        self._paths = handlerPaths(config.handlers)
        self._groups: dict[str, str] = {}

    def handlerGroup(self, transport: str) -> str:
        group = self._groups.get(transport)
        if group is None:
            path = self._paths.get(transport)
            try:
                group = "main" if path is None else sourceGroup(path)
            except Unreadable as e:
                raise RoutingError(
                    f"the group of transport {transport!r} (handler {path}) "
                    f"cannot be read without importing the handler ({e}); set "
                    f"[transports.{transport}] group in the config")
            self._groups[transport] = group
        return group


def describeFilter(transports: TransportFilter) -> str:
    """A filter in words, for logs."""
    if transports.include is not None:
        what = ", ".join(sorted(transports.include)) or "nothing"
    elif transports.exclude:
        what = "all transports but " + ", ".join(sorted(transports.exclude))
    else:
        what = "all transports"
    return what + (f" of site {transports.site}" if transports.site else "")
