# -*- test-case-name: tests.test_client,tests.test_client_servers -*-
"""
Enqueueing on the SQL backend: rows of C{queue_item}, written on
connections of the producer's own, or, in a transaction of the
application's, on the application's connection.
"""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from snq.client.errors import EnqueueError
from snq.client.pool import Pool
from snq.queues.dialects import DIALECTS
from snq.queues.sqlitems import insertStatement, itemRow, storeItems
from snq.secret import maskURL

#: Seconds to connect to a server before giving up.
CONNECT_TIMEOUT = 10.0


class SqlBackend:
    def __init__(self, config):
        url = config.db.url.reveal()
        self.where = maskURL(url)
        self.url = urlsplit(url)
        self.dialect = DIALECTS[self.url.scheme]()
        self.transports = config.transport
        self.pool = Pool(lambda: self.dialect.connect(self.url, CONNECT_TIMEOUT),
                         lambda conn: conn.close())

    def store(self, items) -> list[bool]:
        """→ whether each item was taken (see L{storeItems})."""
        rows = _rows(items, self.dialect.paramstyle)

        def insert(conn):
            cursor = conn.cursor()
            self.dialect.begin(cursor)
            taken = storeItems(cursor, self.dialect, items, rows, self.transports)
            conn.commit()
            cursor.close()
            return taken

        try:
            return self.pool.use(insert, self.dialect.retryable)
        except Exception as e:
            raise EnqueueError(f"cannot enqueue on {self.where}: {e}"
                               f"{_hint(e)}") from e

    def close(self):
        self.pool.close()


def _rows(items, paramstyle):
    """New items are due when they were made, unless they say otherwise."""
    return [itemRow(i, i.dueAt(i.created), paramstyle) for i in items]


def _hint(error) -> str:
    text = str(error)
    missing = ("no such table", "does not exist", "doesn't exist")
    if "queue_item" in text and any(m in text for m in missing):
        return " (create the schema: snqctl db init, or start the daemon once)"
    return ""


def storeWith(connection, items):
    """
    Insert C{items} with the application's own C{connection}, inside
    whatever transaction it has open: a DB-API connection (psycopg, PyMySQL,
    sqlite3, or any other driver), an SQLAlchemy C{Connection} or
    C{Session}, or a Django connection.  Nothing is committed here.
    """
    execute, paramstyle = _executor(connection)
    rows = _rows(items, paramstyle)
    try:
        execute(insertStatement(paramstyle), rows)
    except Exception as e:
        raise EnqueueError(f"cannot enqueue in the application's transaction: "
                           f"{e}{_hint(e)}") from e


def _executor(connection):
    """C{(execute(statement, rows), paramstyle)} for a connection of any kind."""
    if hasattr(connection, "get_bind") and hasattr(connection, "connection"):
        # An SQLAlchemy Session: its connection, in its transaction.
        connection = connection.connection()
    if hasattr(connection, "exec_driver_sql"):
        # SQLAlchemy's Connection: SQL as the driver takes it.
        paramstyle = connection.dialect.dbapi.paramstyle
        return (lambda sql, rows: connection.exec_driver_sql(
            sql, rows if len(rows) > 1 else rows[0])), paramstyle
    if hasattr(connection, "vendor") and hasattr(connection, "ops"):
        # Django's: "%s" for every database (it converts for sqlite3).
        paramstyle = "format"
    else:
        root = type(connection).__module__.partition(".")[0]
        paramstyle = getattr(sys.modules.get(root), "paramstyle", None)
        if paramstyle is None or not hasattr(connection, "cursor"):
            raise TypeError(
                f"connection= takes a DB-API connection, an SQLAlchemy "
                f"Connection or Session, or a Django connection, not "
                f"{type(connection).__module__}.{type(connection).__qualname__}")

    def execute(sql, rows):
        cursor = connection.cursor()
        try:
            cursor.executemany(sql, rows)
        finally:
            cursor.close()

    return execute, paramstyle
