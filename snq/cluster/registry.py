# -*- test-case-name: tests.test_cluster -*-
"""
The master's place in the cluster: L{RegistryService} writes its record
(L{snq.cluster}) every C{[cluster] heartbeat}, and carries out the reloads
asked of every daemon (C{snqctl reload --cluster}), writing each result
into its record for the command to read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

import snq
from snq.cluster import RELOAD, ClusterMissing, makeStore, view
from snq.service import defaultReactor

#: Fields of the tracker's worker rows that a record carries.
_WORKER_FIELDS = ("id", "role", "pid", "state", "uptime", "handled", "errors",
                  "inflight", "rss", "claims_failing", "claim_error")
#: Heartbeats between two sweeps of forgotten records.
_SWEEP_EVERY = 60
#: No cluster reload looked at yet.
_UNSEEN = object()


def daemonName(config) -> str:
    """How the registry names this daemon: C{<daemon id>@<host>}."""
    return f"{config.daemon.id}@{socket.gethostname()}"


#: What may differ from host to host: what a host runs (its id, workers,
#: socket), where its own monitor listens, where its file is.
_HOST_SECTIONS = ("daemon", "monitor", "source")


def digest(config) -> str:
    """
    The config as every host must share it, in 12 hex digits: all but the
    sections of a host's own (L{_HOST_SECTIONS}), with its handlers' code.
    Secrets count as C{***}: hosts with different secrets look alike.
    """
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.compare and f.name not in _HOST_SECTIONS}
    shared["code"] = config.code
    text = json.dumps(shared, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


class RegistryService(Service):
    """
    C{tracker} (L{snq.monitor.tracker.Tracker}) gives the workers and the
    counters; C{reloader} (L{snq.reload.Reloader}) carries out cluster
    reloads.  On a STOMP broker without C{[ledger] url} there is no store:
    the service says so once and does nothing.
    """

    log = Logger()

    def __init__(self, config, tracker, reloader=None, clock=None, store=None):
        self.config = config
        self.tracker = tracker
        self.reloader = reloader
        self.clock = defaultReactor(clock)
        self.store = store
        self.name = daemonName(config)
        self.started = None
        self._beats = 0
        self._failing = False
        #: The nonce of the last cluster reload seen (L{_UNSEEN} before the
        #: first look), and what came of it.
        self._reloadNonce = _UNSEEN
        self._reloaded: dict | None = None
        #: The records and settings as last read, for the dashboard.
        self._seen: tuple[dict, dict] | None = None
        #: The heartbeat in progress, or the last one.
        self.beating: defer.Deferred = defer.succeed(None)
        self._loop = LoopingCall(self.beat)
        self._loop.clock = self.clock
        self._looping: defer.Deferred = defer.succeed(None)

    def startService(self):
        super().startService()
        self.started = self.clock.seconds()
        if self.store is None:
            try:
                self.store = makeStore(self.config, clock=self.clock)
            except ClusterMissing as e:
                self.log.info("not in a cluster registry: {why}", why=e)
                return
        # Not waited for: a backend down now must not keep the daemon from
        # starting; the heartbeats try again.
        self._looping = self._loop.start(self.config.cluster.heartbeat,
                                         now=True)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        yield self._looping
        yield self.beating
        if self.store is None or not self.store.opened:
            return
        try:
            yield self._write("stopped")
        except Exception:
            self.log.failure("cannot mark {name} stopped in the registry",
                             name=self.name)
        yield self.store.close()

    def reconfigService(self, config):
        old, self.config = self.config, config
        interval = config.cluster.heartbeat
        if interval == old.cluster.heartbeat or not self._loop.running:
            return []
        self._loop.stop()
        self._looping = self._loop.start(interval, now=False)
        return [f"cluster: heartbeat every {interval:g} s"]

    def view(self) -> dict | None:
        """The cluster as the last heartbeat read it; None before one did."""
        if self._seen is None:
            return None
        records, settings = self._seen
        return view(self.store.describe(), records, settings,
                    self.clock.seconds(), self.config.cluster.stale)

    def record(self, state: str = "running") -> dict:
        """What this daemon says of itself."""
        config, summary = self.config, self.tracker.summary()
        return {
            "name": self.name, "host": socket.gethostname(), "pid": os.getpid(),
            "version": snq.__version__, "started": self.started,
            "seen": self.clock.seconds(), "state": state,
            "heartbeat": config.cluster.heartbeat,
            "generation": config.generation, "digest": digest(config),
            "loaded": config.loaded, "source": config.source,
            "workers": [{k: w.get(k) for k in _WORKER_FIELDS}
                        for w in summary["workers"]],
            "totals": summary["totals"], "transports": summary["transports"],
            "sites": summary["sites"],
            "reload": self._reloaded,
        }

    def _write(self, state="running"):
        return self.store.beat(self.name, self.record(state),
                               self.config.cluster.forget)

    def beat(self) -> defer.Deferred:
        """One heartbeat: look for a cluster reload, write the record."""
        self.beating = self._beat()
        return self.beating

    @defer.inlineCallbacks
    def _beat(self):
        try:
            if not self.store.opened:
                yield self.store.ensureOpen()
                self.log.info("registered as {name} in {store}, heartbeat "
                              "every {interval:g} s", name=self.name,
                              store=self.store.describe(),
                              interval=self.config.cluster.heartbeat)
            settings = yield self.store.settings()
            self._reloadAsked(settings.get(RELOAD))
            yield self._write()
            self._seen = (yield self.store.daemons()), settings
            self._beats += 1
            if self._beats % _SWEEP_EVERY == 0:
                yield self.store.forget(self.clock.seconds()
                                        - self.config.cluster.forget)
        except Exception as e:
            if not self._failing:
                self._failing = True
                self.log.warn("heartbeat to the cluster registry failed: "
                              "{error}", error=f"{type(e).__name__}: {e}")
            return
        if self._failing:
            self._failing = False
            self.log.info("heartbeat to the cluster registry works again")

    def _reloadAsked(self, asked: dict | None):
        nonce = (asked or {}).get("nonce")
        if self._reloadNonce is _UNSEEN:
            # A reload asked before this daemon started is not for it.
            self._reloadNonce = nonce
            return
        if nonce is None or nonce == self._reloadNonce:
            return
        self._reloadNonce = nonce
        if self.reloader is None:
            self._reloaded = {"nonce": nonce,
                              "error": "this daemon does not reload its config"}
            return
        self.log.info("reload asked of the whole cluster ({nonce})", nonce=nonce)
        self._reloaded = {"nonce": nonce, "running": True}
        d = self.reloader.reload("snqctl reload --cluster")

        def done(result):
            self._reloaded = {"nonce": nonce, "result": result}

        def failed(failure):
            self._reloaded = {"nonce": nonce,
                              "error": failure.getErrorMessage()}

        d.addCallbacks(done, failed)
        # The outcome goes out at once, not a heartbeat later.
        d.addCallback(lambda _: self._write() if self.running else None)
        d.addErrback(lambda f: self.log.failure(
            "cannot write the reload's outcome to the registry", f))
