"""
The real SQL servers behind the SQL backend's integration tests and
benchmark: a database of one's own (created, then dropped), plain SQL from
outside snq, the servers' own command-line clients, and killing sessions
the way an operator or a failover would.

A server that does not answer is a failure saying how to start it, never
a skip.
"""

import contextlib
import os
import sqlite3
import subprocess
import uuid

import psycopg
import pymysql


class ServerMissing(AssertionError):
    pass


class Server:
    """One database on one server, named uniquely for this run."""

    name = ""
    start = ""
    #: The URL scheme, a key of L{snq.queues.dialects.DIALECTS}.
    scheme = ""
    placeholder = "%s"
    #: The INSERT the README documents for producers, with %(frame)s,
    #: %(transport)s and %(site)s to fill in as SQL literals.
    producerInsert = ""

    def __init__(self, prefix="snq_test"):
        self.database = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"

    def url(self) -> str:
        raise NotImplementedError

    def create(self):
        raise NotImplementedError

    def drop(self):
        raise NotImplementedError

    def connect(self):
        """A new DB-API connection to this database (closed by the caller)."""
        raise NotImplementedError

    def sql(self, statement, params=()):
        """Run one statement on a fresh connection, committed; → its rows."""
        conn = self.connect()
        try:
            cursor = conn.cursor()
            cursor.execute(statement, params)
            rows = cursor.fetchall() if cursor.description else []
            conn.commit()
            return [tuple(r) for r in rows]
        finally:
            conn.close()

    def insertMany(self, rows):
        """(frame, transport, site, created, run_at) rows in one transaction."""
        p = self.placeholder
        conn = self.connect()
        try:
            conn.cursor().executemany(
                "INSERT INTO queue_item (frame, transport, site, created, run_at)"
                f" VALUES ({p}, {p}, {p}, {p}, {p})", rows)
            conn.commit()
        finally:
            conn.close()

    #: The names of queue_item's indexes, as a query.
    indexQuery = ("SELECT index_name FROM information_schema.statistics"
                  " WHERE table_schema = DATABASE() AND table_name = 'queue_item'")

    def indexes(self) -> set[str]:
        return {name for (name, *_) in self.sql(self.indexQuery)}

    def count(self, table="queue_item") -> int:
        return self.sql(f"SELECT count(*) FROM {table}")[0][0]

    def cli(self, statement):
        """Run C{statement} with the server's own command-line client."""
        result = subprocess.run(self.cliCommand(statement), capture_output=True,
                                text=True, timeout=60)
        if result.returncode:
            raise AssertionError(f"{self.cliCommand(statement)[0]} failed: "
                                 f"{result.stderr}")
        return result.stdout

    def cliCommand(self, statement) -> list[str]:
        raise NotImplementedError

    def producerSql(self, frame, transport, site="default") -> str:
        def literal(text):
            return "'" + text.replace("'", "''") + "'"

        return self.producerInsert % {"frame": literal(frame),
                                      "transport": literal(transport),
                                      "site": literal(site)}

    def killSessions(self) -> int:
        """End every session on this database from the server side → count."""
        raise NotImplementedError

    def _missing(self, e):
        return ServerMissing(f"{self.name} is not answering ({e}); start it: "
                             f"{self.start}")


class Postgres(Server):
    name = "PostgreSQL on 127.0.0.1:5432"
    scheme = "postgresql"
    start = ("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) "
             "main start")
    producerInsert = (
        "INSERT INTO queue_item (frame, transport, site, created, run_at)\n"
        "VALUES (%(frame)s, %(transport)s, %(site)s,\n"
        "        extract(epoch FROM now()), extract(epoch FROM now()));")
    ROOT = "postgresql://postgres@127.0.0.1:5432/"
    indexQuery = "SELECT indexname FROM pg_indexes WHERE tablename = 'queue_item'"

    def url(self):
        return self.ROOT + self.database

    def _admin(self):
        try:
            return psycopg.connect(self.ROOT + "postgres", autocommit=True)
        except psycopg.OperationalError as e:
            raise self._missing(e)

    def create(self):
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')

    def drop(self):
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def connect(self):
        return psycopg.connect(self.url())

    def cliCommand(self, statement):
        return ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                "-p", "5432", "-U", "postgres", "-d", self.database, "-c",
                statement]

    def killSessions(self):
        with self._admin() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.database,)).fetchall()
        return len(rows)


class MariaDb(Server):
    name = "MariaDB on 127.0.0.1:3306"
    scheme = "mysql"
    start = "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"
    producerInsert = (
        "INSERT INTO queue_item (frame, transport, site, created, run_at)\n"
        "VALUES (%(frame)s, %(transport)s, %(site)s,\n"
        "        UNIX_TIMESTAMP(NOW(6)), UNIX_TIMESTAMP(NOW(6)));")

    def url(self):
        return f"mysql://root:@127.0.0.1:3306/{self.database}"

    def _connect(self, database=None):
        try:
            return pymysql.connect(host="127.0.0.1", port=3306, user="root",
                                   password="", database=database,
                                   charset="utf8mb4", autocommit=database is None)
        except pymysql.OperationalError as e:
            raise self._missing(e)

    def create(self):
        conn = self._connect()
        try:
            conn.cursor().execute(f"CREATE DATABASE `{self.database}`"
                                  " CHARACTER SET utf8mb4")
        finally:
            conn.close()

    def drop(self):
        self.killSessions()
        conn = self._connect()
        try:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS `{self.database}`")
        finally:
            conn.close()

    def connect(self):
        return self._connect(self.database)

    def cliCommand(self, statement):
        return ["mariadb", "-h", "127.0.0.1", "-P", "3306", "-u", "root",
                self.database, "-e", statement]

    def killSessions(self):
        conn = self._connect()
        try:
            cursor = conn.cursor()
            cursor.execute("SELECT id FROM information_schema.processlist"
                           " WHERE db = %s AND id <> CONNECTION_ID()",
                           (self.database,))
            ids = [row[0] for row in cursor.fetchall()]
            for session in ids:
                # It may have ended by itself meanwhile.
                with contextlib.suppress(pymysql.OperationalError):
                    cursor.execute(f"KILL {int(session)}")
            return len(ids)
        finally:
            conn.close()


class Sqlite(Server):
    """The embedded default, for the benchmark's comparison."""

    name = "SQLite"
    scheme = "sqlite"
    placeholder = "?"
    indexQuery = "SELECT name FROM pragma_index_list('queue_item')"

    def __init__(self, directory, prefix="snq_test"):
        super().__init__(prefix)
        self.path = os.path.join(directory, f"{self.database}.sqlite")

    def url(self):
        return f"sqlite:///{self.path}"

    def create(self):
        pass

    def drop(self):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.remove(self.path + suffix)

    def connect(self):
        return sqlite3.connect(self.path, timeout=30)


def forTest(testCase, serverClass):
    """A fresh database for this test, dropped when it ends."""
    server = serverClass()
    server.create()
    testCase.addCleanup(server.drop)
    return server
