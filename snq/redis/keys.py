# -*- test-case-name: tests.test_redis -*-
"""
Where items live in Redis, for the worker's queue and for producers outside
the daemon (L{snq.client}): ready lists C{<prefix>q:<spec>}, beside each a
sorted set C{<prefix>delayed:<spec>} of items waiting for their time
(members C{TOKEN \\n FRAME}, scored by the due time in UNIX seconds), and
the arguments that store items with the ENQUEUE script.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from snq.item import Item


def listKey(prefix: str, spec: str) -> str:
    return f"{prefix}q:{spec}"


def delayedKey(prefix: str, spec: str) -> str:
    return f"{prefix}delayed:{spec}"


def delayedMember(token: str, frame: bytes) -> bytes:
    """The token keeps two identical frames apart in the set."""
    return token.encode() + b"\n" + frame


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
        index = pairs.setdefault(route(item), len(pairs) + 1)
        due = item.dueAt(now, delay)
        if due > now:
            args += [index, f"{due:.6f}", delayedMember(token(item), item.toJSON())]
        else:
            args += [index, "", item.toJSON()]
    keys = [key for spec in pairs
            for key in (listKey(prefix, spec), delayedKey(prefix, spec))]
    return keys, args
