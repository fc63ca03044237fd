# -*- test-case-name: tests.test_dispatch -*-
"""
The handler API, public: C{from snq.handlers import QueueHandler, Reject}.

A handler is found by its transport, first among the C{snq.handlers} entry
points (the built-ins are registered that way too), then in the config's
C{[handlers]} table, which wins, so an operator can replace a plugin's
handler without touching the plugin.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from snq.logger import LazyLogger

ENTRY_POINT_GROUP = "snq.handlers"


class Reject(Exception):
    """
    Raised by a handler for an item that can never succeed: it goes to the
    dead letters at once, with this exception's message as the reason.
    """


class Retry(Exception):
    """
    Raised by a handler for a failure expected to pass (a remote that is
    busy, a connection that is down): the item is retried like after any
    exception, and the log gets one line instead of a traceback.
    """


class Defer(Exception):
    """
    Raised by a handler for an item that cannot run now through no fault of
    its own (its remote host is at its limit, or known to be down): it goes
    back, due in C{delay} seconds, without an attempt charged.
    """

    def __init__(self, reason: str, delay: float):
        super().__init__(reason)
        self.delay = delay


class HandlerError(Exception):
    """A configured handler could not be loaded."""


class QueueHandler:
    """
    Subclass, set C{transport}, define C{handle(item)}.

    C{handle} returns True or None when done, False to have the item retried;
    it may return a Deferred or be a coroutine.  Raising retries the item too
    (L{Retry} for an expected failure: logged without a traceback), except
    L{Reject}, and L{Defer}, which puts it back for later uncharged.  Set
    C{blocking = True} for a handler that blocks: it then runs in a thread
    pool, off the event loop.

    Delivery is at least once: the same item can reach C{handle} twice (a
    worker killed between the work and its acknowledgement), so make
    handling idempotent, e.g. keyed on C{item.id}.
    """

    #: The transport (queue name) this handler is for.
    transport: str | None = None
    #: The group whose queue carries this transport; see the manual's
    #: handlers chapter, "Groups" (docs/handlers.rst).
    group: str = "main"
    #: True for a handler that blocks: it runs in the reactor's thread pool.
    blocking: bool = False
    #: Seconds before a running item counts as failed, unless the transport's
    #: config sets its own; 0 = none.
    timeout: float = 0

    def __init__(self, context):
        #: L{snq.handlers.context.HandlerContext}: config, enqueue, clock.
        self.context = context

    def handle(self, item):
        """Do C{item}'s work (an L{snq.item.Item}); see the class."""
        raise NotImplementedError(f"{type(self).__name__}.handle")

    def stop(self):
        """Called once as the worker stops: close connections (a Deferred)."""


class LoadError(Exception):
    """A class named in the config or by an entry point did not load."""


def importClass(path: str, base: type) -> type:
    """
    C{"package.module:Class"} → the class, a subclass of C{base}; or
    L{LoadError} saying why not (handlers, IoManager plugins).
    """
    moduleName, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(moduleName)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:
        raise LoadError(f"cannot load {path}: {type(e).__name__}: {e}")
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise LoadError(f"{path} is not a subclass of {base.__name__}")
    return obj


def importHandler(path: str) -> type[QueueHandler]:
    """C{"package.module:Class"} → the class, or L{HandlerError} saying why."""
    try:
        return importClass(path, QueueHandler)
    except LoadError as e:
        raise HandlerError(str(e))


def handlerPaths(configured: dict[str, str]) -> dict[str, str]:
    """
    Transport → C{"module:Class"}: the C{snq.handlers} entry points, then the
    config's C{[handlers]}, which win.  Nothing is imported.
    """
    paths = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    paths.update(configured)
    return paths


class HandlerRegistry:
    """Transport name → handler class, from entry points and config."""

    log = LazyLogger()

    def __init__(self, classes: dict[str, type[QueueHandler]]):
        self.classes = classes

    @classmethod
    def load(cls, configured: dict[str, str]) -> HandlerRegistry:
        """
        A broken plugin is logged and left out (its items then dead-letter as
        C{badhandler}); a broken C{[handlers]} entry raises L{HandlerError},
        since the operator asked for it by name.
        """
        classes = {}
        errors = []
        for name, path in handlerPaths(configured).items():
            try:
                classes[name] = importHandler(path)
            except HandlerError as e:
                if name in configured:
                    errors.append(f"handlers.{name}: {e}")
                else:
                    cls.log.error("plugin handler {name} left out: {why}",
                                  name=name, why=e)
        if errors:
            raise HandlerError("; ".join(errors))
        return cls(classes)

    def groupOf(self, transport: str, override: str | None = None) -> str:
        if override:
            return override
        handler = self.classes.get(transport)
        return handler.group if handler else "main"
