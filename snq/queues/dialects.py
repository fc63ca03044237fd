# -*- test-case-name: tests.test_db -*-
"""
What differs between SQL servers: connecting, placeholders, the schema's
types and the statement that claims rows.  L{snq.queues.db} is the rest.
"""

import os

from twisted.enterprise import adbapi

#: What a claim returns per row, in this order (then anything else).
COLUMNS = "id, frame, transport, site, attempts"


class Dialect:
    """What differs between servers."""

    placeholder = "?"
    schema: tuple[str, ...] = ()

    def connectionPool(self, url) -> adbapi.ConnectionPool:
        raise NotImplementedError

    def begin(self, txn):
        """Start a transaction that will write."""

    def claim(self, txn, claimant, leaseUntil, now, limit, where, params):
        raise NotImplementedError

    def params(self, n: int) -> str:
        return ", ".join([self.placeholder] * n)


class Sqlite(Dialect):
    schema = (
        """CREATE TABLE IF NOT EXISTS queue_item (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            frame TEXT NOT NULL,
            transport VARCHAR(64) NOT NULL,
            site VARCHAR(64) NOT NULL DEFAULT 'default',
            priority INTEGER NOT NULL DEFAULT 0,
            created DOUBLE PRECISION NOT NULL,
            run_at DOUBLE PRECISION NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            claimed_by VARCHAR(80) NULL,
            lease_until DOUBLE PRECISION NULL)""",
        """CREATE INDEX IF NOT EXISTS queue_item_ready
            ON queue_item (claimed_by, priority DESC, id)""",
        """CREATE INDEX IF NOT EXISTS queue_item_lease
            ON queue_item (lease_until)""",
        """CREATE TABLE IF NOT EXISTS queue_dead (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            item_id VARCHAR(64) NULL,
            frame TEXT NOT NULL,
            transport VARCHAR(64) NULL,
            site VARCHAR(64) NULL,
            reason VARCHAR(32) NOT NULL,
            error TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            died DOUBLE PRECISION NOT NULL)""",
    )

    def connectionPool(self, url):
        path = url.path
        # sqlite:///rel.sqlite → "rel.sqlite"; sqlite:////abs → "/abs"
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ValueError(f"{url.geturl()}: no database file")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)

        def prepare(conn):
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")

        # One connection: SQLite has one writer at a time anyway, and a
        # single thread keeps its transactions from waiting on each other.
        return adbapi.ConnectionPool(
            "sqlite3", path, check_same_thread=False, isolation_level=None,
            timeout=30, cp_min=1, cp_max=1, cp_openfun=prepare,
            cp_reconnect=True)

    def begin(self, txn):
        # Take the write lock up front: a reader upgrading to a writer later
        # can fail with SQLITE_BUSY without waiting for busy_timeout.
        txn.execute("BEGIN IMMEDIATE")

    def claim(self, txn, claimant, leaseUntil, now, limit, where, params):
        txn.execute(
            f"UPDATE queue_item SET claimed_by = ?, lease_until = ?"
            f" WHERE id IN (SELECT id FROM queue_item"
            f" WHERE claimed_by IS NULL AND run_at <= ?{where}"
            f" ORDER BY priority DESC, id LIMIT ?)"
            f" RETURNING {COLUMNS}, priority",
            (claimant, leaseUntil, now, *params, limit))
        rows = txn.fetchall()
        rows.sort(key=lambda r: (-r[5], r[0]))
        return rows


DIALECTS = {"sqlite": Sqlite}
