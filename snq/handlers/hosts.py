# -*- test-case-name: tests.test_webhook_hosts -*-
"""
Remote-host isolation for the C{webhook} handler: one slow or dead
receiver must not hold every slot of a worker.

Per remote host (its name and port), a worker runs at most the site's
C{webhook_host_concurrency} requests at once, and keeps a circuit breaker:
after C{webhook_circuit_failures} failures in a row (timeouts, connection
errors, 5xx) the circuit opens, and the host's items are put back without
being tried until C{webhook_circuit_cooldown} seconds have passed; then one
item is let through as a probe (half-open): its success closes the circuit,
its failure opens it again.  Items turned away either way raise
L{snq.handlers.Defer}: they wait, uncharged, and take no slot meanwhile.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from twisted.logger import Logger

from snq.handlers import Defer

#: Seconds an item waits when its host is at its limit (or probing),
#: give or take half, so that those waiting do not all come back at once.
BUSY_DELAY = 1.0


@dataclass
class _Host:
    running: int = 0
    #: Failures in a row.
    failures: int = 0
    #: While the circuit is open: until when no item is tried.
    openUntil: float | None = None
    #: A probe is running (half-open).
    probing: bool = False


class RemoteHosts:
    """The per-host limits and circuits of one worker's webhook handler."""

    log = Logger()

    def __init__(self, clock, stats, rng=random):
        self.clock = clock
        self.stats = stats
        self.rng = rng
        self._hosts: dict[str, _Host] = {}

    def running(self, host: str) -> int:
        known = self._hosts.get(host)
        return known.running if known else 0

    def isOpen(self, host: str) -> bool:
        known = self._hosts.get(host)
        return known is not None and known.openUntil is not None

    def enter(self, host: str, policy, item) -> bool:
        """
        Take a slot of C{host} for C{item}, under C{policy} (a
        L{snq.handlers.targets.TargetPolicy}), or raise L{Defer}; → whether
        this is the probe of a half-open circuit.  L{leave} gives it back.
        """
        state = self._hosts.setdefault(host, _Host())
        probe = False
        if state.openUntil is not None:
            wait = state.openUntil - self.clock.seconds()
            if wait > 0:
                raise Defer(f"{host}: circuit open after {state.failures} "
                            "failures in a row", wait + self._jitter())
            if state.probing:
                raise Defer(f"{host}: circuit half-open, a probe is running",
                            self._jitter(BUSY_DELAY))
            state.probing = probe = True
        elif state.running >= policy.hostConcurrency:
            raise Defer(f"{host}: {state.running} requests running, the "
                        "site's webhook_host_concurrency",
                        self._jitter(BUSY_DELAY))
        state.running += 1
        return probe

    def leave(self, host: str, policy, item, probe: bool, ok: bool):
        """
        Give back C{item}'s slot; C{ok}: the host answered (whatever it
        said), else it failed.
        """
        state = self._hosts[host]
        state.running -= 1
        if probe:
            state.probing = False
        if ok:
            if state.openUntil is not None:
                self.log.info("webhook host {host} answers again: circuit "
                              "closed", host=host)
            state.failures, state.openUntil = 0, None
        else:
            state.failures += 1
            if probe or (state.openUntil is None
                         and state.failures >= policy.circuitFailures):
                state.openUntil = self.clock.seconds() + policy.circuitCooldown
                self.stats.count("circuit_open", item.transport, item.site)
                self.log.warn("webhook host {host}: {n} failures in a row; "
                              "circuit open for {s:g} s", host=host,
                              n=state.failures, s=policy.circuitCooldown)
        if not state.running and not state.failures:
            del self._hosts[host]

    def _jitter(self, seconds: float = 0.0) -> float:
        """C{seconds} give or take half (or, for 0, up to a BUSY_DELAY)."""
        if not seconds:
            return self.rng.uniform(0, BUSY_DELAY)
        return self.rng.uniform(seconds / 2, seconds * 1.5)
