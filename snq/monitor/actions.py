# -*- test-case-name: tests.test_monitor_actions -*-
"""
What the dashboard may do, not only show: retry or purge dead letters,
pause or resume a transport or a site on every daemon of the cluster
(L{snq.cluster}).  Each is a C{POST /action?do=…} without a body, taken
only

* when C{[monitor] token} is set (without one, anyone who reaches the
  monitor could act), and with C{Authorization: Bearer TOKEN};
* with C{X-Snq-Csrf} carrying the token C{/status.json} hands out (a
  random value of this master's, which another site's page cannot read),
  and, when the browser sends an C{Origin}, one of the monitor's own
  names: a form on another site can neither set the header nor pass.
"""

from __future__ import annotations

import hmac
import os
import socket

from twisted.internet import defer

from snq.cluster import pauseKey, withStore
from snq.queues import makeQueue


class ActionError(Exception):
    """An action refused; C{code} is the HTTP status to answer with."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _ids(values: list[bytes]) -> list[int] | None:
    """C{id=3&id=4} → [3, 4]; C{id=all} → None (every dead letter)."""
    if values == [b"all"]:
        return None
    try:
        ids = [int(v) for v in values]
    except ValueError:
        ids = []
    if not ids:
        raise ActionError(400, "give id=N (one or more) or id=all")
    return ids


class Actions:
    """The actions, on C{config}'s queue and cluster store, each opened for it."""

    def __init__(self, config, token: str, hosts, reactor):
        self.config = config
        self.token = token
        self.hosts = hosts
        self.reactor = reactor
        #: What a page must echo in C{X-Snq-Csrf}: new with each master.
        self.csrf = os.urandom(16).hex()

    def authorize(self, headers) -> None:
        """L{ActionError} unless C{headers} (a name → value getter) may act."""
        if not self.token:
            raise ActionError(403, "actions need [monitor] token to be set")
        given = headers(b"authorization") or b""
        if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
            raise ActionError(401, "this needs Authorization: Bearer TOKEN "
                              "([monitor] token)")
        csrf = headers(b"x-snq-csrf") or b""
        if not hmac.compare_digest(csrf, self.csrf.encode()):
            raise ActionError(403, "no valid X-Snq-Csrf header (the token "
                              "/status.json gives as csrf)")
        origin = headers(b"origin")
        if origin is not None and _originHost(origin) not in self.hosts:
            raise ActionError(403, f"Origin {origin.decode('ascii', 'replace')}"
                              " is not the monitor's")

    def run(self, args: dict) -> defer.Deferred:
        """C{args}: the query's name → [values]; → a message in words."""
        do = (args.get(b"do") or [b""])[0].decode("ascii", "replace")
        if do in ("pause", "resume"):
            kind = (args.get(b"kind") or [b""])[0].decode("utf-8", "replace")
            name = (args.get(b"name") or [b""])[0].decode("utf-8", "replace")
            if kind not in ("transport", "site") or not name:
                raise ActionError(400, "give kind=transport|site and name=NAME")
            return self.pause(do, kind, name)
        if do in ("retry", "purge"):
            return self.dead(do, _ids(args.get(b"id") or []))
        raise ActionError(400, "do= pause, resume, retry or purge")

    def pause(self, do: str, kind: str, name: str):
        key = pauseKey(kind, name)

        def change(store):
            if do == "pause":
                by = f"dashboard@{socket.gethostname()}"
                return store.put(key, {"since": self.reactor.seconds(), "by": by})
            return store.remove(key)

        d = withStore(self.config, self.reactor, change)
        return d.addCallback(lambda _: f"{kind} {name} {do}d")

    @defer.inlineCallbacks
    def dead(self, do: str, ids: list[int] | None):
        queue = makeQueue(self.config, self.reactor,
                          claimant=f"{self.config.daemon.id}.dashboard")
        yield queue.open()
        try:
            method = queue.deadRetry if do == "retry" else queue.deadPurge
            count = yield method(ids)
        finally:
            yield queue.close()
        verb = "requeued" if do == "retry" else "purged"
        return f"{verb} {count} dead letters"


def _originHost(origin: bytes) -> str:
    """C{http://example.org:8750} → C{example.org}."""
    text = origin.decode("ascii", "replace").strip().lower()
    rest = text.partition("://")[2]
    if rest.startswith("["):
        return rest[1:].partition("]")[0]
    return rest.partition(":")[0].partition("/")[0]
