# -*- test-case-name: tests.test_db,tests.test_sql_servers -*-
"""
What differs between SQL servers: connecting, placeholders, the schema's
types, locking and the statement that claims rows.  L{snq.queues.db} is
the rest.
"""

import contextlib
import importlib
import os
import zlib
from urllib.parse import parse_qsl, unquote

from snq.files import createPrivate, privateDirectory

#: No limit on a frame's size, as a number SQL can compare with.
NO_LIMIT = 2**62

#: Rows of queue_key_lock: enqueues of keys hashed to one wait for each other.
KEY_SLOTS = 256

#: Connections per worker on a server: one claim, one acknowledgement
#: batch, housekeeping and handlers' enqueues can then run side by side.
POOL_SIZE = 4


class Dialect:
    """
    What differs between servers.  Importable without Twisted: producers
    outside the daemon (L{snq.client}) connect the same way.
    """

    placeholder = "?"
    #: The same, as DB-API names it (for L{snq.queues.sqlitems}).
    paramstyle = "qmark"
    #: Connections a worker keeps.
    poolSize = POOL_SIZE
    #: The driver's keyword for a connect timeout in seconds; None = none.
    connectTimeout: str | None = None
    #: One tuple of statements per schema version, oldest first: SQL, or a
    #: function of the cursor.  Each is idempotent, so a step interrupted
    #: half-way (MySQL cannot roll DDL back) simply runs again.
    schema: tuple[tuple[str, ...], ...] = ()
    #: Errors after which the transaction was rolled back (or its connection
    #: is gone) and is worth running again on a fresh connection.
    retryable: tuple[type[BaseException], ...] = ()
    #: Ends the claim's inner SELECT.
    lockRows = ""

    def connectArgs(self, url) -> tuple[str, tuple, dict]:
        """The DB-API module's name, and what its C{connect} takes."""
        raise NotImplementedError

    def prepare(self, conn):
        """Set up a new connection (pragmas and the like)."""

    def connectionPool(self, url):
        """The worker's pool of connections, on its own threads."""
        from twisted.enterprise import adbapi

        module, args, kwargs = self.connectArgs(url)
        return adbapi.ConnectionPool(
            module, *args, cp_min=1, cp_max=self.poolSize, cp_reconnect=True,
            cp_openfun=self.prepare, **kwargs)

    def connect(self, url, timeout: float | None = None):
        """
        One connection of one's own, outside any pool; C{timeout} bounds
        connecting where the driver can, unless the URL sets it.
        """
        module, args, kwargs = self.connectArgs(url)
        option = self.connectTimeout
        if (timeout is not None and option is not None
                and option not in dict(parse_qsl(url.query))):
            kwargs[option] = max(1, round(timeout))
        conn = importlib.import_module(module).connect(*args, **kwargs)
        self.prepare(conn)
        return conn

    def begin(self, txn):
        """Start a transaction that will write."""

    def redoable(self, txn):
        """
        This transaction (a claim) need not wait for the disk: lost in a
        crash of the server, its items are claimed again, as those in
        flight would be; and a later transaction that does wait makes it
        durable too, the log being written in order.
        """

    #: SQL for the schema (namespace) that unqualified table names are in.
    currentSchema = "current_schema()"

    @contextlib.contextmanager
    def schemaLock(self, txn):
        """Keep two processes from creating or upgrading the schema at once."""
        yield

    def columns(self, txn, table) -> set[str]:
        """The names of C{table}'s columns; empty if there is no such table."""
        txn.execute("SELECT column_name FROM information_schema.columns"
                    f" WHERE table_schema = {self.currentSchema}"
                    f" AND table_name = {self.placeholder}", (table,))
        return {name.lower() for (name,) in txn.fetchall()}

    def addColumn(self, txn, name: str, definition: str):
        """A column of queue_item unless it is there (not every server has
        ADD COLUMN IF NOT EXISTS)."""
        if name not in self.columns(txn, "queue_item"):
            txn.execute(f"ALTER TABLE queue_item ADD COLUMN {name} {definition}")

    def lockKey(self, txn, transport: str, key: str):
        """
        Hold, until the transaction ends, what keeps another enqueue of
        C{key} from looking at the same rows meanwhile: one of
        C{queue_key_lock}'s rows (SQLite's write lock is held already).
        """
        slot = zlib.crc32(f"{transport}\n{key}".encode()) % KEY_SLOTS
        txn.execute(f"SELECT slot FROM queue_key_lock WHERE slot ="
                    f" {self.placeholder} FOR UPDATE", (slot,))
        txn.fetchall()

    def raw(self, column: str) -> str:
        """
        C{column} as stored, whatever that is: the servers with typed
        columns hold only what their type allows.
        """
        return column

    def octets(self, column: str) -> str:
        """The length of C{column} in bytes."""
        return f"octet_length({column})"

    #: Rows a claim takes: due ones (SQLite adds those with a run_at that is
    #: no number, which would otherwise wait for ever).
    due = "run_at <= {p}"

    def claimColumns(self) -> str:
        """
        What a claim returns per row (L{snq.queues.db.DbQueue._delivery}
        reads it): id, the frame (NULL when over the limit, the one
        parameter), its size in bytes, transport, site, attempts, priority,
        and run_at when it is not a number (else NULL).
        """
        size = self.octets("frame")
        return (f"id, CASE WHEN {size} > {self.placeholder} THEN NULL ELSE"
                f" {self.raw('frame')} END, {size}, {self.raw('transport')},"
                f" {self.raw('site')}, {self.raw('attempts')},"
                f" {self.raw('priority')}, {self.oddRunAt}")

    #: run_at when it is not a number, else NULL.
    oddRunAt = "NULL"

    def claim(self, txn, claimant, leaseUntil, now, limit, where, params,
              maxFrame):
        p = self.placeholder
        txn.execute(
            f"UPDATE queue_item SET claimed_by = {p}, lease_until = {p}"
            f" WHERE id IN (SELECT id FROM queue_item"
            f" WHERE claimed_by IS NULL AND {self.due.format(p=p)}{where}"
            f" ORDER BY priority DESC, id LIMIT {p}{self.lockRows})"
            f" RETURNING {self.claimColumns()}",
            (claimant, leaseUntil, now, *params, limit, maxFrame))
        # RETURNING comes in no particular order.
        return sorted(txn.fetchall(), key=claimOrder)

    #: How the pair probes name their table (an index hint where the
    #: planner would otherwise sort the backlog).
    pairTable = "queue_item"

    def nextPair(self, txn, after, where, params, siteWhere="", siteParams=(),
                 include=None):
        """
        The first (transport, site) after C{after} (None: the first of all)
        with rows waiting, among those C{where} selects; None if none.  One
        step of an index skip scan (the next site of the same transport,
        else the first pair of the next transport: each the first entry of
        a range of C{queue_item_site}): the sites with work, not their rows.

        C{where} is C{siteWhere} and, for a worker of some transports only,
        C{transport IN include}: within a transport only the site part
        applies, and the next transport is sought among the others, so
        that no planner walks that transport's rows to check the list.
        """
        p = self.placeholder
        if after is None:
            return self._first(txn, "", params, where)
        transport, site = after
        pair = self._first(txn, f" AND transport = {p} AND site > {p}",
                           [transport, site, *siteParams], siteWhere)
        if pair is not None:
            return pair
        if include is not None:
            others = [name for name in include if name != transport]
            if not others:
                return None
            where = f"{siteWhere} AND transport IN ({self.params(len(others))})"
            params = [*siteParams, *others]
        return self._first(txn, f" AND transport > {p}", [transport, *params],
                           where)

    def _first(self, txn, since, params, where):
        """
        The first pair of the rows waiting that C{since} and C{where} select
        (as stored: text if it is UTF-8), or None.
        """
        txn.execute(f"SELECT {self.raw('transport')}, {self.raw('site')} FROM"
                    f" {self.pairTable} WHERE claimed_by IS NULL{since}{where}"
                    " ORDER BY transport, site LIMIT 1", params)
        row = txn.fetchone()
        return None if row is None else tuple(asStored(v) for v in row)

    #: Ends the SELECT of the buckets a claim draws on: held until it
    #: commits, so that claims on many hosts spend each token once.
    lockBuckets = ""
    #: Adds a bucket unless it is there.
    newBucket = ("INSERT INTO queue_bucket (name, tokens, stamp) VALUES ({p}, {p},"
                 " {p}) ON CONFLICT (name) DO NOTHING")

    def takeTokens(self, txn, rates: dict[str, float], now) -> dict[str, float]:
        """
        The tokens in each of the buckets C{rates} names (bucket → items per
        second), refilled up to now: a bucket holds at most one second's
        worth, at least one item, and starts full.
        """
        p = self.placeholder
        names = sorted(rates)
        txn.executemany(self.newBucket.format(p=p),
                        [(name, max(rates[name], 1.0), now) for name in names])
        txn.execute(f"SELECT name, tokens, stamp FROM queue_bucket WHERE name IN"
                    f" ({self.params(len(names))}){self.lockBuckets}", names)
        return {name: min(max(rates[name], 1.0),
                          tokens + max(now - stamp, 0.0) * rates[name])
                for name, tokens, stamp in txn.fetchall()}

    def putTokens(self, txn, tokens: dict[str, float], now):
        """What is left in the buckets after a claim took from them."""
        p = self.placeholder
        txn.executemany(
            f"UPDATE queue_bucket SET tokens = {p}, stamp = {p} WHERE name = {p}",
            [(left, now, name) for name, left in sorted(tokens.items())])

    def listener(self, url, wake, reactor):
        """
        Something that calls C{wake()} when rows are inserted, with
        C{start()} and C{stopListening()}; None if this server cannot.
        """
        return None

    def params(self, n: int) -> str:
        return ", ".join([self.placeholder] * n)


def asStored(value):
    """A raw column's value (L{Dialect.raw}) to store or compare again: text
    if it is UTF-8, else bytes."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def claimOrder(row):
    """Priority first, as the claim chose them; a priority that is no number
    (SQLite stores anything) counts as 0."""
    priority = row[6]
    if isinstance(priority, bool) or not isinstance(priority, (int, float)):
        priority = 0
    return -priority, row[0]


#: Schema version 2: the cluster's registry and settings (L{snq.cluster.sql}).
CLUSTER_TABLE = """CREATE TABLE IF NOT EXISTS snq_cluster (
    name VARCHAR(191) NOT NULL PRIMARY KEY,
    value TEXT NOT NULL,
    seen DOUBLE PRECISION NOT NULL)"""

#: Partial indexes and DOUBLE PRECISION: SQLite's and PostgreSQL's spelling
#: (MariaDB has its own below).
SITE_INDEX = """CREATE INDEX IF NOT EXISTS queue_item_site
    ON queue_item (transport, site, priority DESC, id)
    WHERE claimed_by IS NULL"""
BUCKET_TABLE = """CREATE TABLE IF NOT EXISTS queue_bucket (
    name VARCHAR(80) PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    stamp DOUBLE PRECISION NOT NULL)"""


class Sqlite(Dialect):
    #: One connection: SQLite has one writer at a time anyway, and a single
    #: thread keeps its transactions from waiting on each other.
    poolSize = 1
    schema = ((
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
        # A group's worker (transport IN …) would otherwise walk the whole
        # backlog of other groups' items on every poll.
        """CREATE INDEX IF NOT EXISTS queue_item_transport
            ON queue_item (transport, priority DESC, id) WHERE claimed_by IS NULL""",
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
    ), (
        # Version 2: the cluster's registry (snq.cluster).
        CLUSTER_TABLE,
    ), (
        # Version 3: the sites with work waiting, per transport (fairness).
        SITE_INDEX,
    ), (
        # Version 4: token buckets of rate limits, shared by every worker.
        BUCKET_TABLE,
    ), (
        # Version 5: items' keys, looked up by unique transports.
        lambda txn: Sqlite().addColumn(txn, "item_key", "VARCHAR(255) NULL"),
        """CREATE INDEX IF NOT EXISTS queue_item_key
            ON queue_item (transport, item_key) WHERE item_key IS NOT NULL""",
    ))

    @staticmethod
    def path(url) -> str:
        # sqlite:///rel.sqlite → "rel.sqlite"; sqlite:////abs → "/abs"
        path = url.path[1:] if url.path.startswith("/") else url.path
        if not path:
            raise ValueError(f"{url.geturl()}: no database file")
        return path

    def connectArgs(self, url):
        path = self.path(url)
        privateDirectory(os.path.dirname(os.path.abspath(path)))
        # SQLite makes its -wal and -shm files with the database's mode.
        createPrivate(path)
        return "sqlite3", (path,), dict(check_same_thread=False,
                                        isolation_level=None, timeout=30)

    def prepare(self, conn):
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")

    def columns(self, txn, table):
        txn.execute(f"PRAGMA table_info({table})")
        return {row[1].lower() for row in txn.fetchall()}

    def raw(self, column):
        # A column holds whatever a producer put there: text that is not
        # UTF-8, which the sqlite3 module would fail to decode (failing the
        # whole claim), or a BLOB.  Text and BLOBs come as bytes.
        return (f"CASE WHEN typeof({column}) IN ('integer', 'real', 'null')"
                f" THEN {column} ELSE CAST({column} AS BLOB) END")

    def octets(self, column):
        return f"length(CAST({column} AS BLOB))"

    due = "(run_at <= {p} OR typeof(run_at) NOT IN ('integer', 'real'))"
    pairTable = "queue_item INDEXED BY queue_item_site"
    oddRunAt = ("CASE WHEN typeof(run_at) IN ('integer', 'real') THEN NULL"
                " ELSE CAST(run_at AS BLOB) END")

    def lockKey(self, txn, transport, key):
        """The transaction holds the database's one write lock already."""

    def begin(self, txn):
        # Take the write lock up front: a reader upgrading to a writer later
        # can fail with SQLITE_BUSY without waiting for busy_timeout.
        txn.execute("BEGIN IMMEDIATE")

    def listener(self, url, wake, reactor):
        from snq.queues.sqlitewatch import walWatcher

        return walWatcher(self.path(url), wake, reactor)


class Mysql(Dialect):
    """
    MariaDB ≥ 10.6 and MySQL ≥ 8.0 (both have SKIP LOCKED), over PyMySQL.
    """

    placeholder = "%s"
    paramstyle = "format"
    connectTimeout = "connect_timeout"
    lockRows = " FOR UPDATE SKIP LOCKED"
    schema = ((
        """CREATE TABLE IF NOT EXISTS queue_item (
            id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            frame LONGTEXT NOT NULL,
            transport VARCHAR(64) NOT NULL,
            site VARCHAR(64) NOT NULL DEFAULT 'default',
            priority INT NOT NULL DEFAULT 0,
            created DOUBLE NOT NULL,
            run_at DOUBLE NOT NULL,
            attempts INT NOT NULL DEFAULT 0,
            claimed_by VARCHAR(80) NULL,
            lease_until DOUBLE NULL,
            -- "transport" serves a group's worker (transport IN …),
            -- "due" a backlog where everything waits for its run_at.
            INDEX queue_item_ready (claimed_by, priority DESC, id),
            INDEX queue_item_transport (claimed_by, transport, priority DESC, id),
            INDEX queue_item_due (claimed_by, run_at),
            INDEX queue_item_lease (lease_until)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
        """CREATE TABLE IF NOT EXISTS queue_dead (
            id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            item_id VARCHAR(64) NULL,
            frame LONGTEXT NOT NULL,
            transport VARCHAR(64) NULL,
            site VARCHAR(64) NULL,
            reason VARCHAR(32) NOT NULL,
            error TEXT NOT NULL,
            attempts INT NOT NULL DEFAULT 0,
            died DOUBLE NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
    ), (
        # Version 2: the cluster's registry (snq.cluster).
        CLUSTER_TABLE + " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    ), (
        # Version 3: the sites with work waiting, per transport (fairness).
        # Without claimed_by in front: MariaDB would sort the rows instead
        # of reading the index in order (claimed rows are few).
        lambda txn: Mysql.addIndex(
            txn, "queue_item_site", "transport, site, priority DESC, id"),
    ), (
        # Version 4: token buckets of rate limits, shared by every worker.
        """CREATE TABLE IF NOT EXISTS queue_bucket (
            name VARCHAR(80) NOT NULL PRIMARY KEY,
            tokens DOUBLE NOT NULL,
            stamp DOUBLE NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
    ), (
        # Version 5: items' keys, looked up by unique transports, and the
        # rows that serialize enqueues of one key.
        lambda txn: Mysql().addColumn(txn, "item_key", "VARCHAR(255) NULL"),
        lambda txn: Mysql.addIndex(txn, "queue_item_key", "transport, item_key"),
        """CREATE TABLE IF NOT EXISTS queue_key_lock (
            slot INT NOT NULL PRIMARY KEY
        ) ENGINE=InnoDB""",
        lambda txn: txn.executemany("INSERT IGNORE INTO queue_key_lock (slot)"
                                    " VALUES (%s)", [(n,) for n in range(KEY_SLOTS)]),
    ))
    lockBuckets = " FOR UPDATE"
    newBucket = ("INSERT IGNORE INTO queue_bucket (name, tokens, stamp)"
                 " VALUES ({p}, {p}, {p})")

    currentSchema = "DATABASE()"
    pairTable = "queue_item FORCE INDEX (queue_item_site)"

    #: URL query parameters passed on to PyMySQL.
    OPTIONS = ("unix_socket",)

    def __init__(self):
        import pymysql

        self.retryable = (pymysql.OperationalError, pymysql.InterfaceError)

    def connectArgs(self, url):
        database = unquote(url.path.lstrip("/"))
        if not database:
            raise ValueError("mysql://USER:PASS@HOST:PORT/DB: no database name")
        options = dict(parse_qsl(url.query))
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise ValueError(f"mysql URL: unknown parameters {sorted(unknown)}"
                             f" (known: {', '.join(self.OPTIONS)})")
        return "pymysql", (), dict(
            host=url.hostname or "localhost", port=url.port or 3306,
            user=unquote(url.username or ""), password=unquote(url.password or ""),
            database=database, charset="utf8mb4", autocommit=False,
            # REPEATABLE READ would take gap locks while claiming, making
            # producers' INSERTs wait for claims to commit.
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            **options)

    @staticmethod
    def addIndex(txn, name, columns):
        """An index on queue_item unless it is there (MySQL has no CREATE
        INDEX IF NOT EXISTS)."""
        txn.execute("SELECT 1 FROM information_schema.statistics WHERE"
                    " table_schema = DATABASE() AND table_name = 'queue_item'"
                    " AND index_name = %s", (name,))
        if not txn.fetchall():
            txn.execute(f"ALTER TABLE queue_item ADD INDEX {name} ({columns})")

    @contextlib.contextmanager
    def schemaLock(self, txn):
        # DDL commits implicitly on MySQL, so a transaction cannot serialize
        # it: a named lock (per database) does.
        txn.execute("SELECT GET_LOCK(CONCAT(DATABASE(), '.snq_schema'), 60)")
        if txn.fetchone()[0] != 1:
            raise RuntimeError("another process held the schema lock for 60 s")
        try:
            yield
        finally:
            txn.execute("SELECT RELEASE_LOCK(CONCAT(DATABASE(), '.snq_schema'))")

    def octets(self, column):
        return f"LENGTH({column})"

    def claim(self, txn, claimant, leaseUntil, now, limit, where, params,
              maxFrame):
        # MariaDB has no UPDATE … RETURNING and no LIMIT in an IN subquery:
        # lock the rows, then mark them, in one transaction.
        txn.execute(
            f"SELECT {self.claimColumns()} FROM queue_item"
            f" WHERE claimed_by IS NULL AND run_at <= %s{where}"
            f" ORDER BY priority DESC, id LIMIT %s{self.lockRows}",
            (maxFrame, now, *params, limit))
        rows = txn.fetchall()
        if rows:
            txn.execute(
                "UPDATE queue_item SET claimed_by = %s, lease_until = %s"
                f" WHERE id IN ({self.params(len(rows))})",
                (claimant, leaseUntil, *[r[0] for r in rows]))
        return rows


class Postgres(Dialect):
    """PostgreSQL ≥ 11, over psycopg 3; wakes workers with LISTEN/NOTIFY."""

    placeholder = "%s"
    paramstyle = "format"
    connectTimeout = "connect_timeout"
    lockRows = " FOR UPDATE SKIP LOCKED"
    #: Every INSERT into queue_item, by snq or by anyone's plain SQL,
    #: notifies this channel when it commits.
    channel = "snq_queue_item"
    schema = ((
        """CREATE TABLE IF NOT EXISTS queue_item (
            id BIGSERIAL PRIMARY KEY,
            frame TEXT NOT NULL,
            transport VARCHAR(64) NOT NULL,
            site VARCHAR(64) NOT NULL DEFAULT 'default',
            priority INTEGER NOT NULL DEFAULT 0,
            created DOUBLE PRECISION NOT NULL,
            run_at DOUBLE PRECISION NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            claimed_by VARCHAR(80) NULL,
            lease_until DOUBLE PRECISION NULL)""",
        # Partial indexes: claimed rows leave them, so they stay as small
        # as the backlog.  Claims walk "ready" in order; a group's worker
        # (transport IN …) uses "transport" instead of walking other groups'
        # backlog; "due" answers at once when all that waits is delayed.
        """CREATE INDEX IF NOT EXISTS queue_item_ready
            ON queue_item (priority DESC, id) WHERE claimed_by IS NULL""",
        """CREATE INDEX IF NOT EXISTS queue_item_transport
            ON queue_item (transport, priority DESC, id) WHERE claimed_by IS NULL""",
        """CREATE INDEX IF NOT EXISTS queue_item_due
            ON queue_item (run_at) WHERE claimed_by IS NULL""",
        """CREATE INDEX IF NOT EXISTS queue_item_lease
            ON queue_item (lease_until) WHERE lease_until IS NOT NULL""",
        """CREATE TABLE IF NOT EXISTS queue_dead (
            id BIGSERIAL PRIMARY KEY,
            item_id VARCHAR(64) NULL,
            frame TEXT NOT NULL,
            transport VARCHAR(64) NULL,
            site VARCHAR(64) NULL,
            reason VARCHAR(32) NOT NULL,
            error TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            died DOUBLE PRECISION NOT NULL)""",
        f"""CREATE OR REPLACE FUNCTION snq_queue_item_notify() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('{channel}', '');
                RETURN NULL;
            END
            $$""",
        "DROP TRIGGER IF EXISTS snq_queue_item_notify ON queue_item",
        """CREATE TRIGGER snq_queue_item_notify AFTER INSERT ON queue_item
            FOR EACH STATEMENT EXECUTE FUNCTION snq_queue_item_notify()""",
    ), (
        # Version 2: the cluster's registry (snq.cluster).
        CLUSTER_TABLE,
    ), (
        # Version 3: the sites with work waiting, per transport (fairness).
        SITE_INDEX,
    ), (
        # Version 4: token buckets of rate limits, shared by every worker.
        BUCKET_TABLE,
    ), (
        # Version 5: items' keys, looked up by unique transports, and the
        # rows that serialize enqueues of one key.
        "ALTER TABLE queue_item ADD COLUMN IF NOT EXISTS item_key VARCHAR(255) NULL",
        """CREATE INDEX IF NOT EXISTS queue_item_key
            ON queue_item (transport, item_key) WHERE item_key IS NOT NULL""",
        """CREATE TABLE IF NOT EXISTS queue_key_lock (slot INTEGER PRIMARY KEY)""",
        f"""INSERT INTO queue_key_lock (slot) SELECT generate_series(0, {KEY_SLOTS - 1})
            ON CONFLICT DO NOTHING""",
    ))
    lockBuckets = " FOR UPDATE"

    def __init__(self):
        import psycopg

        self.retryable = (psycopg.OperationalError,)

    def redoable(self, txn):
        txn.execute("SET LOCAL synchronous_commit TO OFF")

    #: A cut network (rather than a closed connection) shows up within about
    #: a minute instead of the kernel's two hours, on connections waiting
    #: for an answer as on the idle LISTEN one.  The URL may say otherwise.
    KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30,
                  "keepalives_interval": 10, "keepalives_count": 3}

    def options(self, url) -> dict:
        given = dict(parse_qsl(url.query))
        return {k: v for k, v in self.KEEPALIVES.items() if k not in given}

    def connectArgs(self, url):
        # libpq reads the URL itself, query parameters (sslmode=…) included.
        return "psycopg", (url.geturl(),), self.options(url)

    @contextlib.contextmanager
    def schemaLock(self, txn):
        # Concurrent CREATE … IF NOT EXISTS can still collide in the
        # catalogs; the lock is released when the transaction ends.
        txn.execute("SELECT pg_advisory_xact_lock(hashtext('snq_schema'))")
        yield

    def listener(self, url, wake, reactor):
        from snq.queues.pgnotify import NotifyListener

        return NotifyListener(url.geturl(), self.channel, wake, reactor,
                              self.options(url))


#: URL scheme → dialect; the config accepts these schemes.
DIALECTS = {"sqlite": Sqlite, "mysql": Mysql, "postgresql": Postgres}
