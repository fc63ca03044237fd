# -*- test-case-name: tests.test_redis -*-
"""
Where items live in Redis, for the worker's queue and for producers outside
the daemon (L{snq.client}): ready lists C{<prefix>q:<spec>}, beside each a
sorted set C{<prefix>delayed:<spec>} of items waiting for their time
(members C{TOKEN \\n FRAME}, scored by the due time in UNIX seconds), the
key index of each unique transport, and the arguments that store items
with the ENQUEUE script, or with the UNIQUE script when some are kept
unique by key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from snq.config import keptUnique
from snq.item import Item


def listKey(prefix: str, spec: str) -> str:
    return f"{prefix}q:{spec}"


def delayedKey(prefix: str, spec: str) -> str:
    return f"{prefix}delayed:{spec}"


def delayedMember(token: str, frame: bytes) -> bytes:
    """The token keeps two identical frames apart in the set."""
    return token.encode() + b"\n" + frame


def processingKey(prefix: str) -> str:
    return f"{prefix}processing"


def indexKey(prefix: str, transport: str) -> str:
    """A unique transport's key index (C{lua/keys.lua})."""
    return f"{prefix}keys:{transport}"


def enqueueCall(items: Iterable[Item], route: Callable[[Item], str],
                prefix: str, now: float, delay: float,
                token: Callable[[Item], str]) -> tuple[list, list]:
    """
    KEYS and ARGV of the ENQUEUE script for C{items}: each pushed onto the
    list C{route(item)} names, or, when not due yet (its C{run_at}, else
    C{delay} from C{now}), added to that list's delayed set.
    """
    pairs: dict[str, int] = {}
    args: list = []
    for item in items:
        args += _placed(item, pairs, route, now, delay, token)
    return _pairKeys(prefix, pairs), args


def uniqueCall(items: Iterable[Item], route: Callable[[Item], str],
               prefix: str, now: float, delay: float,
               token: Callable[[Item], str], transports) -> tuple[list, list]:
    """
    KEYS and ARGV of the UNIQUE script: C{items} placed as by
    L{enqueueCall}, each one that its transport's settings
    (C{transports(name)}) keep unique (L{keptUnique}) with its key, its
    transport's index and mode.
    """
    pairs: dict[str, int] = {}
    indexes: dict[str, int] = {}
    args: list = []
    for item in items:
        args += _placed(item, pairs, route, now, delay, token)
        settings = keptUnique(item, transports)
        if settings is None:
            args += ["", "", ""]
        else:
            slot = indexes.setdefault(indexKey(prefix, item.transport),
                                      len(indexes) + 1)
            running = "+running" if settings.unique_running else ""
            args += [slot, item.key, settings.unique + running]
    keys = [processingKey(prefix), *_pairKeys(prefix, pairs), *indexes]
    return keys, [prefix, len(pairs), *args]


def anyUnique(items: Iterable[Item], transports) -> bool:
    """Whether some of C{items} need the UNIQUE script (L{uniqueCall})."""
    return any(keptUnique(item, transports) for item in items)


def _placed(item, pairs, route, now, delay, token) -> list:
    """(pair index, due time or "" for now, frame or delayed member)."""
    index = pairs.setdefault(route(item), len(pairs) + 1)
    due = item.dueAt(now, delay)
    if due > now:
        return [index, f"{due:.6f}", delayedMember(token(item), item.toJSON())]
    return [index, "", item.toJSON()]


def _pairKeys(prefix: str, pairs: dict[str, int]) -> list:
    return [key for spec in pairs
            for key in (listKey(prefix, spec), delayedKey(prefix, spec))]
