# -*- test-case-name: tests.test_iomanagers -*-
"""
IoManagers as plugins: what a worker runs beside its queue, found by name
among the C{snq.iomanagers} entry points (or C{[iomanagers.NAME] plugin =
"package.module:Class"}) and configured by C{[iomanagers.NAME]}.

A plugin is an L{snq.iomanager.IoManager} subclass built as C{cls(context)}
with its L{ManagerContext}: the clock, the queue to enqueue on, its
settings, its sites' settings, counters that reach every monitor, and the
ledger.  It is a child of the worker's IoMaster (through L{IoManagers}), so
it starts and stops with it and follows reloads in place.  A plugin that
does not load, or whose settings are wrong, is refused with its name and
the reason before a daemon starts and before a reload is applied
(L{checkPlugins}), as handlers are.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from twisted.internet import defer
from twisted.logger import Logger

from snq import config as snqconfig
from snq.handlers import LoadError, importClass
from snq.iomanager import IoManager
from snq.routing import runsManager
from snq.service import AsyncMultiService

ENTRY_POINT_GROUP = "snq.iomanagers"


class PluginError(Exception):
    """One or more plugins cannot run; each problem names its table."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def pluginPath(name: str, manager) -> str | None:
    """C{"module:Class"} of IoManager C{name}: its table's, else its entry point's."""
    if manager.plugin:
        return manager.plugin
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return ep.value
    return None


def pluginPaths(config) -> dict[str, str]:
    """Name → C{"module:Class"} of every IoManager C{config} runs; none imported."""
    paths = {name: pluginPath(name, m) for name, m in config.managers().items()}
    return {name: path for name, path in paths.items() if path}


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: its class and its parsed settings."""

    name: str
    path: str
    cls: type
    settings: object


def loadPlugin(config, name: str) -> Plugin:
    """
    IoManager C{name} of C{config}, imported and its settings checked; or
    L{PluginError} saying why not.
    """
    where = f"iomanagers.{name}"
    manager = config.managers()[name]
    path = pluginPath(name, manager)
    if path is None:
        raise PluginError([f"{where}: no plugin of that name (no {name!r} entry "
                           f"point in {ENTRY_POINT_GROUP}, no plugin = "
                           "\"package.module:Class\" in the table)"])
    try:
        cls = importClass(path, IoManager)
    except LoadError as e:
        raise PluginError([f"{where}: {e}"])
    settings = None
    if cls.Settings is not None:
        try:
            settings = snqconfig.buildSettings(cls.Settings, manager.settings, where)
        except snqconfig.ConfigError as e:
            raise PluginError(e.problems)
    elif manager.settings:
        raise PluginError([f"{where}.{key}: unknown key ({path} takes no "
                           "settings)" for key in sorted(manager.settings)])
    problems = []
    if manager.worker == "xmpp" and "xmpp" not in config.queue.groups:
        problems.append(f"{where}.worker: \"xmpp\", but no XMPP worker runs "
                        "(no [xmpp] account, or \"xmpp\" not in [queue] groups)")
    if cls.usesLedger:
        from snq.ledger import checkLedger  # not in the master (pluginPaths)

        problems += [f"{where}: {why}" for why in checkLedger(config)]
    try:
        problems += [f"{where}: {why}" for why in cls.check(config, settings)]
    except Exception as e:
        problems.append(f"{where}: checking it failed: {type(e).__name__}: {e}")
    if problems:
        raise PluginError(problems)
    return Plugin(name, path, cls, settings)


def loadPlugins(config, role: str = "all") -> dict[str, Plugin]:
    """
    Every IoManager a worker of C{role} runs, loaded; or L{PluginError}
    with every problem.
    """
    plugins, problems = {}, []
    for name, manager in sorted(config.managers().items()):
        if not runsManager(role, name, manager):
            continue
        try:
            plugins[name] = loadPlugin(config, name)
        except PluginError as e:
            problems += e.problems
    if problems:
        raise PluginError(problems)
    return plugins


def checkPlugins(config) -> list[str]:
    """What keeps C{config}'s IoManagers from running, each in words."""
    try:
        loadPlugins(config)
    except PluginError as e:
        return e.problems
    return []


class ManagerContext:
    """
    What a plugin may use of the daemon.  C{settings} (its parsed
    L{snq.iomanager.IoManager.Settings}) and C{config} are the current
    ones: a reload changes them before the plugin's C{reconfigService}.
    """

    def __init__(self, name: str, settings, handlers, ledgers, workerId: str,
                 site: str | None = None):
        self.name = name
        self.settings = settings
        #: The handlers' context (L{snq.handlers.context.HandlerContext}).
        self.handlers = handlers
        self._ledgers = ledgers
        self.workerId = workerId
        #: Only this site's work (C{twistd snq --site}); None: every site.
        self.site = site

    @property
    def config(self):
        return self.handlers.config

    @property
    def clock(self):
        return self.handlers.clock

    @property
    def queue(self):
        return self.handlers.queue

    def siteConfig(self, site: str) -> dict:
        """A site's settings (C{[sites.default]} under C{[sites.SITE]})."""
        return self.handlers.siteConfig(site)

    def sites(self) -> list[str]:
        """The sites this worker serves: C{--site}'s, else every configured one."""
        if self.site is not None:
            return [self.site]
        return sorted(self.config.sites) or ["default"]

    def xmpp(self, site: str):
        """The XmppManager serving C{site}, in the XMPP worker; else None."""
        return self.handlers.xmpp(site)

    def item(self, transport, payload, site="default", priority=None):
        return self.handlers.item(transport, payload, site, priority)

    def enqueue(self, transport, payload, site="default", priority=None,
                delay=0.0):
        return self.handlers.enqueue(transport, payload, site, priority, delay)

    def enqueueItems(self, items, delay=0.0):
        return self.handlers.enqueueItems(items, delay)

    def count(self, event: str, key: str = "", site: str = "", n: int = 1):
        """
        Count C{event} (of C{key}, a feed, a schedule …): the monitors see
        it as C{NAME.EVENT} (C{/metrics}: C{snq_iomanager_events}).
        """
        self.handlers.stats.count(f"{self.name}.{event}", key, site, n)

    def ledger(self) -> defer.Deferred:
        """Fires with the open L{snq.ledger.Ledger}."""
        return self._ledgers.ledger()

    @defer.inlineCallbacks
    def enqueueOnce(self, entries, ttl: float, delay: float = 0.0):
        """
        C{entries}: C{(name, item)}; enqueue the items whose name was never
        claimed (for C{ttl} seconds), across every daemon; → those items.
        """
        ledger = yield self.ledger()
        new = yield ledger.enqueueOnce(entries, ttl, self.queue, delay)
        for item in new:
            self.handlers.stats.count("enqueued", item.transport, item.site)
        return new


class IoManagers(AsyncMultiService):
    """
    The plugins a worker of C{role} runs, compared by name in the manner of
    buildbot's service managers: on a reload a plugin that is gone (or
    whose class changed) is stopped, a new one started, and a kept one gets
    its new settings and C{reconfigService(config)}.
    """

    log = Logger()

    def __init__(self, config, handlers, ledgers, role: str, workerId: str,
                 site: str | None = None):
        super().__init__()
        self.handlers = handlers
        self.ledgers = ledgers
        self.role = role
        self.workerId = workerId
        self.site = site
        #: Name → its L{Plugin}, its service and the service's context.
        self.plugins: dict[str, tuple[Plugin, IoManager, ManagerContext]] = {}
        for plugin in loadPlugins(config, role).values():
            self._build(plugin).setServiceParent(self)

    def _build(self, plugin: Plugin) -> IoManager:
        context = ManagerContext(plugin.name, plugin.settings, self.handlers,
                                 self.ledgers, self.workerId, self.site)
        service = plugin.cls(context)
        self.plugins[plugin.name] = (plugin, service, context)
        self.handlers.iomanagers[plugin.name] = service
        return service

    @defer.inlineCallbacks
    def reconfigService(self, config):
        """→ what changed, in words; L{PluginError} (nothing changed) first."""
        wanted = loadPlugins(config, self.role)
        applied = []
        for name, (plugin, service, _) in sorted(self.plugins.items()):
            new = wanted.get(name)
            if new is None or new.cls is not plugin.cls:
                del self.plugins[name]
                del self.handlers.iomanagers[name]
                yield defer.maybeDeferred(service.disownServiceParent)
                applied.append(f"iomanager {name} stopped")
        for name, new in sorted(wanted.items()):
            if name not in self.plugins:
                service = self._build(new)
                service.parent = self
                yield self.addService(service)
                applied.append(f"iomanager {name} started")
                continue
            _, service, context = self.plugins[name]
            self.plugins[name] = (new, service, context)
            context.settings = new.settings
            reconfigure = getattr(service, "reconfigService", None)
            if reconfigure is not None:
                applied += (yield defer.maybeDeferred(reconfigure, config)) or []
        return applied

    def status(self) -> dict[str, list[dict]]:
        """Name → its status rows (L{snq.iomanager.IoManager.status})."""
        rows = {}
        for name, (_, service, _) in sorted(self.plugins.items()):
            try:
                rows[name] = service.status()
            except Exception:
                self.log.failure("status of iomanager {name} failed", name=name)
        return rows
