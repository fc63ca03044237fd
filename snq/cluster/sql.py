# -*- test-case-name: tests.test_cluster -*-
"""
The cluster on SQL: the table C{snq_cluster} (schema version 2, made by
L{snq.queues.db.DbQueue.open}), one row per daemon (C{daemon:NAME}) and
per setting, with when it was last written.
"""

from snq.cluster import DAEMON, ClusterStore, decode, encode
from snq.service import defaultReactor


class SqlStore(ClusterStore):
    def __init__(self, queue, clock=None):
        super().__init__(queue)
        self.clock = defaultReactor(clock)

    def _write(self, txn, name, value, seen):
        p = self.queue.dialect.placeholder
        txn.execute(f"DELETE FROM snq_cluster WHERE name = {p}", (name,))
        txn.execute("INSERT INTO snq_cluster (name, value, seen)"
                    f" VALUES ({p}, {p}, {p})", (name, encode(value), seen))

    def beat(self, name, record, ttl):
        # Rows do not expire: forget() sweeps them (ttl is Redis's).
        return self.queue.transaction(self._write, DAEMON + name, record,
                                      record["seen"])

    def _rows(self, daemons: bool):
        p = self.queue.dialect.placeholder
        which = "" if daemons else "NOT "

        def read(txn):
            txn.execute(f"SELECT name, value FROM snq_cluster WHERE name"
                        f" {which}LIKE {p}", (DAEMON + "%",))
            return [(name, decode(value)) for name, value in txn.fetchall()]

        return self.queue.transaction(read)

    def daemons(self):
        d = self._rows(daemons=True)
        return d.addCallback(lambda rows: {
            name[len(DAEMON):]: record for name, record in rows
            if record is not None})

    def settings(self):
        d = self._rows(daemons=False)
        return d.addCallback(lambda rows: {
            name: value for name, value in rows if value is not None})

    def put(self, name, value):
        return self.queue.transaction(self._write, name, value,
                                      self.clock.seconds())

    def remove(self, name):
        p = self.queue.dialect.placeholder

        def delete(txn):
            txn.execute(f"DELETE FROM snq_cluster WHERE name = {p}", (name,))
            return txn.rowcount == 1

        return self.queue.transaction(delete)

    def forget(self, before):
        p = self.queue.dialect.placeholder

        def sweep(txn):
            txn.execute(f"DELETE FROM snq_cluster WHERE name LIKE {p} AND"
                        f" seen < {p}", (DAEMON + "%", before))
            return txn.rowcount

        return self.queue.transaction(sweep)
