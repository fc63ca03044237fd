# -*- test-case-name: tests.test_db -*-
"""
An item as a row of C{queue_item}: the one INSERT every SQL producer runs,
whether the worker's queue, L{snq.client}, or an application's own
transaction through whatever DB-API driver it uses.
"""

from __future__ import annotations

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
