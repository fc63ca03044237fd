# -*- test-case-name: tests.test_db -*-
"""
An item as a row of C{queue_item}: the one INSERT every SQL producer runs,
whether the worker's queue, L{snq.client}, or an application's own
transaction through whatever DB-API driver it uses.
"""

from __future__ import annotations

from snq.config import keptUnique
from snq.item import Item

#: What a producer writes; the rest of the row is the workers'.
COLUMNS = ("frame", "transport", "site", "priority", "created", "run_at",
           "attempts")

#: DB-API paramstyle → the placeholder of column C{n} (0-based) named C{c}.
_MARKS = {
    "qmark": lambda n, c: "?",
    "format": lambda n, c: "%s",
    "pyformat": lambda n, c: "%s",
    "numeric": lambda n, c: f":{n + 1}",
    "named": lambda n, c: f":{c}",
}


def insertStatement(paramstyle: str) -> str:
    """The INSERT, with a driver of C{paramstyle}'s placeholders."""
    try:
        mark = _MARKS[paramstyle]
    except KeyError:
        raise ValueError(f"DB-API paramstyle {paramstyle!r} is not supported "
                         f"(known: {', '.join(_MARKS)})")
    values = ", ".join(mark(n, c) for n, c in enumerate(COLUMNS))
    return f"INSERT INTO queue_item ({', '.join(COLUMNS)}) VALUES ({values})"


def itemRow(item: Item, runAt: float, paramstyle: str = "qmark"):
    """The INSERT's parameters for C{item}, due at C{runAt}."""
    row = (item.toJSON().decode("utf-8"), item.transport, item.site,
           item.priority, item.created, runAt, item.attempts)
    return dict(zip(COLUMNS, row, strict=True)) if paramstyle == "named" else row


def storeItems(cursor, dialect, items, rows, transports) -> list[bool]:
    """
    Store C{items} (their L{itemRow}s C{rows}) in the open write
    transaction of C{cursor}, keyed ones of a unique transport
    (C{transports(name)}, its L{snq.config.TransportConfig}) only if no item
    with their key waits (or runs, with C{unique_running}): → whether each
    was taken.
    """
    plain, taken = [], []
    for item, row in zip(items, rows, strict=True):
        settings = keptUnique(item, transports)
        if settings is None:
            plain.append(row)
            taken.append(True)
        else:
            taken.append(_storeUnique(cursor, dialect, item, row, settings))
    if plain:
        cursor.executemany(insertStatement(dialect.paramstyle), plain)
    return taken


def _storeUnique(cursor, dialect, item, row, settings) -> bool:
    """
    A waiting item with the key is kept (drop) or takes the new one's
    frame, site, priority and due time (replace); a running one is never
    replaced, so with C{unique_running} the new one is then dropped.
    """
    p = dialect.placeholder
    dialect.lockKey(cursor, item.transport, item.key)
    cursor.execute(f"SELECT id, claimed_by FROM queue_item WHERE transport = {p}"
                   f" AND item_key = {p}", (item.transport, item.key))
    found = cursor.fetchall()
    waiting = [rowId for rowId, claimant in found if claimant is None]
    if waiting and settings.unique == "replace":
        frame, _, site, priority, created, due, attempts = row
        cursor.execute(f"UPDATE queue_item SET frame = {p}, site = {p},"
                       f" priority = {p}, created = {p}, run_at = {p},"
                       f" attempts = {p} WHERE id = {p}",
                       (frame, site, priority, created, due, attempts,
                        min(waiting)))
        return True
    if waiting or (settings.unique_running and found):
        return False
    cursor.execute(f"INSERT INTO queue_item ({', '.join(COLUMNS)}, item_key)"
                   f" VALUES ({dialect.params(len(COLUMNS) + 1)})",
                   (*row, item.key))
    return True
