# -*- test-case-name: tests.test_ledger -*-
"""
The ledger in an SQL database: the table C{snq_ledger}, one row per name,
with its owner (a lease's), value and expiry.  Uniqueness is the primary
key's, so two daemons inserting the same name at once cannot both win.
"""

from twisted.internet import defer

from snq.ledger import Ledger, ledgerName
from snq.service import defaultReactor

_TABLE = """CREATE TABLE IF NOT EXISTS snq_ledger (
    name VARCHAR(191) NOT NULL PRIMARY KEY,
    owner VARCHAR(191) NOT NULL DEFAULT '',
    value TEXT NULL,
    expires DOUBLE PRECISION NOT NULL)"""

#: An INSERT that does nothing when the name is taken, per server.
_INSERT = {
    "sqlite": "INSERT OR IGNORE INTO snq_ledger (name, owner, value, expires)"
              " VALUES (?, ?, ?, ?)",
    "mysql": "INSERT IGNORE INTO snq_ledger (name, owner, value, expires)"
             " VALUES (%s, %s, %s, %s)",
    "postgresql": "INSERT INTO snq_ledger (name, owner, value, expires)"
                  " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
}
_MYSQL_TABLE = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"


class SqlLedger(Ledger):
    """
    On C{queue}'s database (a L{snq.queues.db.DbQueue}).  C{shared}: it is
    the worker's own queue, already open, and L{enqueueOnce} claims and
    inserts the items in one transaction; otherwise this ledger opens a
    connection pool of its own on that database.
    """

    def __init__(self, queue, shared: bool, clock=None):
        self.queue = queue
        self.shared = shared
        self.clock = defaultReactor(clock)
        self.scheme = queue.url.scheme
        self.p = queue.dialect.placeholder

    def open(self):
        if not self.shared:
            self.queue.pool = self.queue.dialect.connectionPool(self.queue.url)
        return self.queue.transaction(self._create)

    def _create(self, txn):
        with self.queue.dialect.schemaLock(txn):
            txn.execute(_TABLE + (_MYSQL_TABLE if self.scheme == "mysql" else ""))

    def close(self):
        if not self.shared and self.queue.pool is not None:
            self.queue.pool.close()
            self.queue.pool = None
        return defer.succeed(None)

    def _claim(self, txn, name, owner, value, ttl, now) -> bool:
        """C{name} for C{owner} unless held and not expired; → taken."""
        p = self.p
        txn.execute(f"DELETE FROM snq_ledger WHERE name = {p} AND expires <= {p}",
                    (name, now))
        txn.execute(_INSERT[self.scheme], (name, owner, value, now + ttl))
        return txn.rowcount == 1

    def once(self, name, ttl):
        now = self.clock.seconds()
        return self.queue.transaction(self._claim, ledgerName(name), "", None,
                                      ttl, now)

    def lease(self, name, owner, ttl):
        now = self.clock.seconds()
        name = ledgerName(name)
        p = self.p

        def take(txn):
            if self._claim(txn, name, owner, None, ttl, now):
                return True
            txn.execute(f"UPDATE snq_ledger SET expires = {p} WHERE name = {p}"
                        f" AND owner = {p}", (now + ttl, name, owner))
            # Not the UPDATE's row count: MySQL counts only rows it changed.
            txn.execute(f"SELECT owner FROM snq_ledger WHERE name = {p}", (name,))
            row = txn.fetchone()
            return row is not None and row[0] == owner

        return self.queue.transaction(take)

    def release(self, name, owner):
        p = self.p

        def free(txn):
            txn.execute(f"DELETE FROM snq_ledger WHERE name = {p} AND owner = {p}",
                        (ledgerName(name), owner))

        return self.queue.transaction(free)

    def get(self, name):
        now = self.clock.seconds()
        p = self.p

        def read(txn):
            txn.execute(f"SELECT value FROM snq_ledger WHERE name = {p} AND"
                        f" expires > {p}", (ledgerName(name), now))
            row = txn.fetchone()
            return row[0] if row else None

        return self.queue.transaction(read)

    def put(self, name, value, ttl):
        now = self.clock.seconds()
        name = ledgerName(name)
        p = self.p

        def write(txn):
            txn.execute(f"DELETE FROM snq_ledger WHERE name = {p}", (name,))
            txn.execute(_INSERT[self.scheme], (name, "", value, now + ttl))

        return self.queue.transaction(write)

    def purge(self):
        now = self.clock.seconds()

        def sweep(txn):
            txn.execute(f"DELETE FROM snq_ledger WHERE expires <= {self.p}", (now,))
            return txn.rowcount

        return self.queue.transaction(sweep)

    def enqueueOnce(self, entries, ttl, queue, delay=0.0):
        if not self.shared or queue is not self.queue:
            return super().enqueueOnce(entries, ttl, queue, delay)
        now = self.clock.seconds()

        def claimAndInsert(txn):
            new = [item for name, item in entries
                   if self._claim(txn, ledgerName(name), "", None, ttl, now)]
            if new:
                self.queue.insertItems(txn, new, delay)
            return new

        return self.queue.transaction(claimAndInsert)
