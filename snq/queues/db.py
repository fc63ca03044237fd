# -*- test-case-name: tests.test_db -*-
"""
The SQL backend: the C{queue_item} table StatusNet used, claimed with a
lease, plus C{queue_dead} for dead letters.

Everything but the dialect (L{snq.queues.dialects}: placeholders,
connecting, the schema, the claim statement) is one code path for every
server.

Acknowledgements are grouped: while one DELETE is being committed, the next
ones gather, so a busy worker commits many items per transaction and an
idle one still commits each at once.

A transaction that fails because its connection died (a server restart, an
operator's KILL, an idle timeout) runs again on a fresh connection.  When
the connection died just as a claim committed, the claim's rows are in
nobody's hands: this worker renews only the leases of rows it knows it
holds, so theirs run out and the reaper returns them.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from snq.item import BadItem, Item, plainPart
from snq.queues.dialects import DIALECTS, NO_LIMIT, asStored, claimOrder
from snq.queues.interface import (
    Cancelled,
    DeadLetter,
    Delivery,
    Depth,
    Queue,
    TransportDepth,
)
from snq.queues.sqlitems import insertStatement, itemRow, storeItems
from snq.routing import TransportFilter
from snq.secret import maskURL
from snq.service import defaultReactor

#: The columns of the contract (DESIGN.md, "SQL").
ITEM_COLUMNS = frozenset({"id", "frame", "transport", "site", "priority", "created",
                          "run_at", "attempts", "claimed_by", "lease_until"})

#: Seconds during which claims do not look for other sites with work after
#: finding a single one: what a lone flood's claims save, and what another
#: site's item may wait more.
ALONE = 0.01

#: Ids per statement in C{id IN (…)} lists (SQLite allows 32,766 parameters,
#: PostgreSQL 65,535; shorter statements also keep lock times short).
CHUNK = 500
#: Seconds before the second retry of a transaction whose connection was
#: lost, doubled for each one after (0.5 + 1 + 2 s with 4 connections).
RETRY_PAUSE = 0.25


class SchemaError(Exception):
    """The database's schema is newer than this snq understands."""


def _chunks(ids):
    for start in range(0, len(ids), CHUNK):
        yield ids[start:start + CHUNK]


def _likeEscaped(text: str) -> str:
    """C{text} as itself in a LIKE pattern with C{ESCAPE '!'}."""
    return "".join("!" + c if c in "!%_" else c for c in text)


def _bytes(value) -> bytes:
    """A frame as the dispatcher takes it, whatever the column held."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return b"" if value is None else str(value).encode()


def _text(value) -> str | None:
    """A transport or site, for display: bytes that are not UTF-8 shown."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)




class DbQueue(Queue):
    log = Logger()

    def __init__(self, url: str, lease: float, clock=None, claimant=None,
                 reactor=None, maxFrame: int | None = None,
                 weight=lambda site: 1, rates: dict[str, float] | None = None,
                 transports=lambda name: None):
        reactor = defaultReactor(reactor)
        self._url = url
        self.url = urlsplit(url)
        self.dialect = DIALECTS[self.url.scheme]()
        self.lease = lease
        #: Frames bigger than this many bytes are not read (None: any size).
        self.maxFrame = maxFrame
        self.clock = reactor if clock is None else clock
        #: Connections and threads for the LISTEN connection, where there is
        #: one; the clock may be a test's Clock.
        self.reactor = reactor
        #: Unique per process, so that a respawned worker with the same id
        #: never renews the leases its killed predecessor held.
        self.claimant = claimant or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.pool = None
        self._acks: list[tuple[int, defer.Deferred]] = []
        self._flushing = False
        #: Rows claimed and not yet settled: the leases L{tend} renews.
        self._out: set[int] = set()
        #: A site's weight (L{snq.config.Config.siteWeight}).
        self.weight = weight
        #: Rate limits by bucket name (L{snq.config.Config.rates}).
        self.rates = rates or {}
        #: A transport's settings (L{snq.config.Config.transport}): which
        #: keep their items unique.
        self.transports = transports
        #: The (transport, site) pair the last claim in turns ended with.
        self._cursor = None
        #: Whether the last claim left items waiting (at first: maybe).
        self._crowded = True
        #: Until when claims do not look for turns (see L{ALONE}).
        self._aloneUntil = 0.0
        #: The site part of the last claim's filter (L{_siteFilter}), and
        #: its transports when it names them (for L{Dialect.nextPair}).
        self._sites = ("", [], None)
        self._listeners = []

    def describe(self) -> str:
        return maskURL(self._url)

    def open(self):
        self.pool = self.dialect.connectionPool(self.url)

        def upgraded(old):
            if old is not None:
                self.log.info("schema of {db} upgraded from version {old} to "
                              "{new}", db=self.describe(), old=old,
                              new=len(self.dialect.schema))

        return self._write(self._upgradeSchema).addCallback(upgraded)

    def _upgradeSchema(self, txn):
        """
        Bring the schema to the newest version this snq knows (→ the version
        it had), or nothing when it is there already: every worker runs
        this as it starts.
        """
        steps = self.dialect.schema
        with self.dialect.schemaLock(txn):
            txn.execute("CREATE TABLE IF NOT EXISTS snq_schema"
                        " (version INTEGER NOT NULL)")
            txn.execute("SELECT max(version) FROM snq_schema")
            version = txn.fetchone()[0] or 0
            if version > len(steps):
                raise SchemaError(
                    f"{self.describe()} has schema version {version}, newer than"
                    f" this snq's {len(steps)}: upgrade snq")
            if version == len(steps):
                return None
            self._checkItemTable(txn)
            for step in steps[version:]:
                for statement in step:
                    if callable(statement):
                        statement(txn)
                    else:
                        txn.execute(statement)
            txn.execute("DELETE FROM snq_schema")
            txn.execute("INSERT INTO snq_schema (version) VALUES"
                        f" ({self.dialect.placeholder})", (len(steps),))
            return version

    def _checkItemTable(self, txn):
        """
        C{CREATE TABLE IF NOT EXISTS} would leave alone a C{queue_item} that
        was there before: StatusNet's own, say, which snq must not touch.
        """
        existing = self.dialect.columns(txn, "queue_item")
        missing = ITEM_COLUMNS - existing
        if existing and missing:
            raise SchemaError(
                f"{self.describe()}: queue_item exists without snq's columns "
                f"({', '.join(sorted(missing))}); if it is StatusNet's own queue "
                "table, rename or drop it, then run snqctl db init")

    @defer.inlineCallbacks
    def close(self):
        # Stopping twice is harmless: a manager may have stopped its own.
        while self._listeners:
            yield self._listeners.pop().stopListening()
        while self._acks or self._flushing:
            yield self._flush()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def reconfigService(self, config):
        self.lease = config.queue.lease
        self.maxFrame = config.queue.maxFrameBytes()
        self.weight = config.siteWeight
        self.rates = config.rates()
        self.transports = config.transport

    def listen(self, wake):
        listener = self.dialect.listener(self.url, wake, self.reactor)
        if listener is None:
            return None
        self._listeners.append(listener)
        listener.start()
        return listener

    def _write(self, interaction, *args):
        def transaction(txn):
            self.dialect.begin(txn)
            return interaction(txn, *args)

        return self._run(transaction, interaction.__name__)

    @defer.inlineCallbacks
    def _run(self, transaction, name):
        """
        Run C{transaction}; when its connection was lost, again on another.
        Every pooled connection may be dead (the server restarted), so as
        many times as there are connections, plus one on a new one; after
        the first retry with a growing pause, so that a failover (a standby
        being promoted) is ridden through instead of failing an ack.
        """
        for attempt in range(self.pool.max + 1):
            try:
                return (yield self.pool.runInteraction(transaction))
            except self.dialect.retryable as e:
                if attempt == self.pool.max:
                    raise
                self.log.warn("{name} failed ({error}); trying again on a new "
                              "connection", name=name, error=str(e).strip())
                if attempt:
                    yield deferLater(self.clock, RETRY_PAUSE * 2 ** attempt,
                                     lambda: None)

    def enqueue(self, items, delay=0.0):
        return self._write(self.insertItems, items, delay)

    def insertItems(self, txn, items, delay=0.0) -> list[bool]:
        """
        Insert C{items} within C{txn} (also the ledger's, L{transaction});
        → whether each was taken (unique items: L{storeItems}).
        """
        now = self.clock.seconds()
        style = self.dialect.paramstyle
        return storeItems(txn, self.dialect, items,
                          [itemRow(i, i.dueAt(now, delay), style) for i in items],
                          self.transports)

    def transaction(self, interaction, *args):
        """
        Run C{interaction(txn, *args)} as one write transaction, again on a
        fresh connection if its connection died: the ledger's statements
        (L{snq.ledger.sql}), which may enqueue in the same transaction.
        """
        return self._write(interaction, *args)

    def claim(self, limit, transports: TransportFilter):
        where, params = self._filter(transports)
        self._sites = (*self._siteFilter(transports),
                       None if transports.include is None
                       else sorted(transports.include))
        d = self._write(self._claim, self.clock.seconds(), limit, where, params)
        d.addCallback(self._claimed)
        return d

    def _claim(self, txn, now, limit, where, params):
        """
        Claim in turns when several (transport, site) pairs have work: each
        its weight's share of the window (L{_turns}), the rest of the window
        in plain order; one pair alone (the usual case, and a flood's) is
        the plain claim: priority, then age.  With rate limits, each pair's
        share is what its buckets allow, and the rest of the window is
        filled only with items no limit applies to.
        """
        self.dialect.redoable(txn)

        def claim(n, where, params):
            return self.dialect.claim(txn, self.claimant, now + self.lease, now,
                                      n, where, params, self.maxFrame or NO_LIMIT)

        # When the last claim took all there was, whatever came since is
        # claimed in plain order, without looking for turns first: an idle
        # worker's claims stay one statement.
        # Nor again for ALONE seconds after finding a single site with work
        # (a lone flood), so that its claims stay as cheap as they were.
        look = self.rates or (self._crowded and now >= self._aloneUntil)
        turns = self._turns(txn, limit, where, params) if look else []
        if look and len(turns) == 1:
            self._aloneUntil = now + ALONE
        if len(turns) < 2 and not self.rates:
            rows = claim(limit, where, params)
        else:
            rows = self._claimInTurns(claim, txn, now, turns, limit, where,
                                      params)
        self._crowded = len(rows) >= limit
        return rows

    def _claimInTurns(self, claim, txn, now, turns, limit, where, params):
        limits = {pair: self._limits(pair) for pair, _ in turns}
        rates = dict(bucket for both in limits.values() for bucket in both)
        tokens = self.dialect.takeTokens(txn, rates, now) if rates else {}
        p = self.dialect.placeholder
        rows, rank, drawn = [], {}, {}
        for pair, quota in turns:
            quota = min([quota, *(int(tokens[b]) for b, _ in limits[pair])])
            if quota <= 0:
                continue
            taken = claim(quota, f"{where} AND transport = {p} AND site = {p}",
                          [*params, *pair])
            for bucket, _ in limits[pair]:
                tokens[bucket] -= len(taken)
                drawn[bucket] = tokens[bucket]
            rank.update((row[0], n) for n, row in enumerate(taken))
            rows += taken
        if drawn:
            # Only what changed: a claim that took nothing writes nothing
            # (on SQLite, a write wakes every idle worker).
            self.dialect.putTokens(txn, drawn, now)
        free = self._unlimited(where, params)
        if len(rows) < limit and free is not None:
            rows += claim(limit - len(rows), *free)
        # Urgent first; within a priority, the pairs' turns interleaved.
        return sorted(rows, key=lambda row: (claimOrder(row)[0],
                                             rank.get(row[0], limit), row[0]))

    def _limits(self, pair) -> list[tuple[str, float]]:
        """
        The token buckets a pair draws on, with their rates: its
        transport's, its site's (at C{[sites.default]}'s rate when it has
        none of its own).
        """
        transport, site = (_text(v) for v in pair)
        t, s = f"t:{transport}", f"s:{site}"
        rate = self.rates.get(s, self.rates.get("s:"))
        return ([(t, self.rates[t])] if t in self.rates else []) + (
            [(s, rate)] if rate is not None else [])

    def _unlimited(self, where, params):
        """C{where} narrowed to the items no rate limit applies to; None if
        every item has one."""
        if "s:" in self.rates:
            return None
        for column, prefix in (("transport", "t:"), ("site", "s:")):
            names = [n[2:] for n in self.rates if n.startswith(prefix)]
            if names:
                where += f" AND {column} NOT IN ({self.dialect.params(len(names))})"
                params = [*params, *names]
        return where, params

    def _turns(self, txn, limit, where, params):
        """
        The (transport, site) pairs with work, from the one after the last
        served, each with its quota: its site's weight, scaled so the window
        is shared out when all the pairs fit in it (a pair alone: all of
        it).  Finding them costs an index probe per pair with work: nothing
        for the idle sites.
        """
        pairs, after, start, wrapped = [], self._cursor, self._cursor, False
        while len(pairs) < limit:
            pair = self.dialect.nextPair(txn, after, where, params, *self._sites)
            if pair is None:
                if wrapped or start is None:
                    break
                after, wrapped = None, True
                continue
            if pair in pairs:
                break
            pairs.append(pair)
            if pair == start:
                break
            after = pair
        if len(pairs) < 2:
            return [(pair, limit) for pair in pairs]
        weights = [self.weight(_text(site)) for _, site in pairs]
        scale = max(limit // sum(weights), 1)
        turns, left = [], limit
        for pair, weight in zip(pairs, weights, strict=True):
            quota = min(weight * scale, left)
            turns.append((pair, quota))
            left -= quota
            self._cursor = pair
            if not left:
                break
        return turns

    def _claimed(self, rows):
        deliveries = [self._delivery(row) for row in rows]
        self._out.update(d.token for d in deliveries)
        return deliveries

    def _delivery(self, row) -> Delivery:
        """
        A claimed row (L{Dialect.claimColumns}) as a Delivery.  A row that
        cannot become an item (SQLite stores anything in any column) carries
        its problem instead, and becomes a dead letter on its own: the rest
        of its batch runs.
        """
        rowId, frame, size, transport, site, attempts, _, runAt = row[:8]
        delivery = Delivery(frame=_bytes(frame), token=rowId,
                            transport=_text(transport), site=_text(site))
        if frame is None:
            delivery.problem = (f"frame is {size} bytes, over [queue] max_frame"
                                f" ({self.maxFrame} bytes); left unread")
        elif isinstance(attempts, bool) or not isinstance(attempts, int) \
                or attempts < 0:
            delivery.problem = (f"attempts column holds {attempts!r}, not a "
                                "non-negative integer")
        elif runAt is not None:
            delivery.problem = (f"run_at column holds {runAt!r}, not UNIX "
                                "seconds")
        else:
            delivery.attempts = attempts
        return delivery

    def journalKey(self, delivery) -> bytes:
        return b"%d" % delivery.token

    def _siteFilter(self, transports: TransportFilter):
        """The part of L{_filter} that is about sites."""
        if transports.site is None:
            return "", []
        return f" AND site = {self.dialect.placeholder}", [transports.site]

    def _filter(self, transports: TransportFilter):
        where, params = self._siteFilter(transports)
        if transports.include is not None:
            names = sorted(transports.include)
            if not names:
                return " AND 1 = 0", ()
            return (f"{where} AND transport IN ({self.dialect.params(len(names))})",
                    params + names)
        if transports.exclude:
            names = sorted(transports.exclude)
            return (f"{where} AND transport NOT IN "
                    f"({self.dialect.params(len(names))})", params + names)
        return where, params

    def ack(self, delivery):
        self._out.discard(delivery.token)
        d = defer.Deferred()
        self._acks.append((delivery.token, d))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self):
        """Delete everything acknowledged so far in one transaction."""
        if self._flushing or not self._acks:
            return defer.succeed(None)
        batch, self._acks = self._acks, []
        self._flushing = True

        def delete(txn):
            self._deleteIds(txn, "queue_item", [rowId for rowId, _ in batch])

        def done(result):
            self._flushing = False
            for _, waiter in batch:
                if isinstance(result, Exception):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            if self._acks:
                self._flush()

        d = self._write(delete)
        d.addCallbacks(done, lambda f: done(f.value))
        return d

    def _deleteIds(self, txn, table, ids):
        for chunk in _chunks(ids):
            txn.execute(f"DELETE FROM {table} WHERE id IN"
                        f" ({self.dialect.params(len(chunk))})", chunk)

    def retry(self, delivery, item: Item, delay, error):
        self._out.discard(delivery.token)
        p = self.dialect.placeholder

        def update(txn):
            # Only while still ours: after a lost lease another worker may
            # hold the row, and its outcome is the one that counts.
            txn.execute(
                f"UPDATE queue_item SET frame = {p}, attempts = {p},"
                f" run_at = {p}, claimed_by = NULL, lease_until = NULL"
                f" WHERE id = {p} AND claimed_by = {p}",
                (item.toJSON().decode("utf-8"), item.attempts,
                 self.clock.seconds() + delay, delivery.token, self.claimant))

        return self._write(update)

    def release(self, deliveries):
        if not deliveries:
            return defer.succeed(None)
        ids = [d.token for d in deliveries]
        self._out.difference_update(ids)

        def update(txn):
            for chunk in _chunks(ids):
                txn.execute(
                    "UPDATE queue_item SET claimed_by = NULL, lease_until = NULL"
                    f" WHERE claimed_by = {self.dialect.placeholder}"
                    f" AND id IN ({self.dialect.params(len(chunk))})",
                    (self.claimant, *chunk))

        return self._write(update)

    def deadLetter(self, delivery, reason, error, attempts):
        self._out.discard(delivery.token)
        p = self.dialect.placeholder
        try:
            itemId = Item.fromJSON(delivery.frame).id
        except BadItem:
            itemId = None

        def move(txn):
            # The server copies the row, so the dead letter keeps its frame
            # byte for byte, even one left unread.  If this runs twice (the
            # first commit's answer was lost with its connection), the row
            # is gone and no second dead letter is written.
            txn.execute(
                "INSERT INTO queue_dead (item_id, frame, transport, site, reason,"
                f" error, attempts, died) SELECT {p}, frame, transport, site,"
                f" {p}, {p}, {p}, {p} FROM queue_item WHERE id = {p}",
                (itemId, reason, error, attempts, self.clock.seconds(),
                 delivery.token))
            txn.execute(f"DELETE FROM queue_item WHERE id = {p}", (delivery.token,))

        return self._write(move)

    def tend(self, deliveries):
        now = self.clock.seconds()
        p = self.dialect.placeholder
        held = sorted(self._out)

        def renew(txn):
            for chunk in _chunks(held):
                txn.execute(
                    f"UPDATE queue_item SET lease_until = {p} WHERE claimed_by = {p}"
                    f" AND id IN ({self.dialect.params(len(chunk))})",
                    (now + self.lease, self.claimant, *chunk))

        d = self._write(renew) if held else defer.succeed(None)
        return d.addCallback(lambda _: self.reapExpired())

    def reapExpired(self):
        now = self.clock.seconds()

        def reap(txn):
            # An expired lease is a worker (or its host) that died holding
            # the item: that counts as an attempt, so an item that kills
            # every worker ends in the dead letters instead of going round
            # for ever.
            txn.execute(
                "UPDATE queue_item SET claimed_by = NULL, lease_until = NULL,"
                " attempts = attempts + 1 WHERE lease_until <"
                f" {self.dialect.placeholder}", (now,))
            return max(txn.rowcount, 0)

        def reaped(count):
            if count:
                self.log.info("returned {count} items whose lease expired",
                              count=count)
            return count

        return self._write(reap).addCallback(reaped)

    def returnClaims(self, claimant, started):
        p = self.dialect.placeholder
        # Only ids: a key that is no row id is not this backend's.
        charged = sorted({int(k) for k in started if k.isdigit()})

        def giveBack(txn):
            # "lease_until IS NOT NULL" lets PostgreSQL use its index of
            # leased rows, which are few, instead of reading the table.
            held = f" WHERE lease_until IS NOT NULL AND claimed_by = {p}"
            count = 0
            for chunk in _chunks(charged):
                txn.execute(
                    "UPDATE queue_item SET claimed_by = NULL, lease_until = NULL,"
                    f" attempts = attempts + 1{held}"
                    f" AND id IN ({self.dialect.params(len(chunk))})",
                    (claimant, *chunk))
                count += max(txn.rowcount, 0)
            txn.execute("UPDATE queue_item SET claimed_by = NULL,"
                        f" lease_until = NULL{held}", (claimant,))
            return max(txn.rowcount, 0) + count, count

        return self._write(giveBack)

    def depth(self):
        now = self.clock.seconds()
        p = self.dialect.placeholder

        def count(txn):
            # Portable SQL; MariaDB's SUM is a DECIMAL.  One pass, by
            # transport: the totals are the sums.
            txn.execute(
                "SELECT transport, SUM(CASE WHEN claimed_by IS NULL AND run_at"
                f" <= {p} THEN 1 ELSE 0 END), SUM(CASE WHEN claimed_by IS NULL"
                f" AND run_at > {p} THEN 1 ELSE 0 END), SUM(CASE WHEN"
                " claimed_by IS NOT NULL THEN 1 ELSE 0 END), MIN(CASE WHEN"
                f" run_at <= {p} THEN run_at END) FROM queue_item GROUP BY"
                " transport", (now, now, now))
            transports = {
                transport: TransportDepth(
                    ready=int(ready), delayed=int(delayed), held=int(held),
                    oldest=None if due is None else max(now - due, 0.0))
                for transport, ready, delayed, held, due in txn.fetchall()}
            txn.execute("SELECT COUNT(*) FROM queue_dead")
            return Depth.byTransport(transports, int(txn.fetchone()[0]))

        return self._run(count, "depth")

    def cancel(self, itemId=None, key=None):
        needle = plainPart(itemId if key is None else key)
        match = (lambda item: item.id == itemId) if key is None else (
            lambda item: item.key == key)
        raw = self.dialect.raw

        def remove(txn):
            txn.execute(f"SELECT id, claimed_by, {raw('frame')} FROM queue_item"
                        f" WHERE frame LIKE {self.dialect.placeholder} ESCAPE '!'",
                        (f"%{_likeEscaped(needle)}%",))
            waiting, running = [], 0
            for rowId, claimant, frame in txn.fetchall():
                try:
                    if not match(Item.fromJSON(_bytes(frame))):
                        continue
                except BadItem:
                    continue
                if claimant is None:
                    waiting.append(rowId)
                else:
                    running += 1
            self._deleteIds(txn, "queue_item", waiting)
            return Cancelled(removed=len(waiting), running=running)

        return self._write(remove)

    def _deadColumns(self) -> str:
        raw = self.dialect.raw
        return (f"id, item_id, {raw('transport')}, {raw('site')}, reason, error,"
                f" attempts, died, {raw('frame')}")

    def deadList(self, limit=50):
        d = self.pool.runQuery(
            f"SELECT {self._deadColumns()} FROM queue_dead ORDER BY id DESC"
            f" LIMIT {int(limit)}")
        return d.addCallback(lambda rows: [self._dead(r) for r in rows])

    def deadShow(self, deadId):
        d = self.pool.runQuery(
            f"SELECT {self._deadColumns()} FROM queue_dead WHERE id ="
            f" {self.dialect.placeholder}", (deadId,))
        return d.addCallback(lambda rows: self._dead(rows[0]) if rows else None)

    @staticmethod
    def _dead(row) -> DeadLetter:
        deadId, itemId, transport, site, *fields, frame = row
        return DeadLetter(deadId, itemId, _text(transport), _text(site), *fields,
                          frame=_bytes(frame))

    def deadRetry(self, deadIds=None):
        now = self.clock.seconds()
        where, params = self._ids(deadIds)

        raw = self.dialect.raw

        def requeue(txn):
            txn.execute(f"SELECT id, {raw('frame')}, {raw('transport')},"
                        f" {raw('site')} FROM queue_dead{where}", params)
            rows = txn.fetchall()
            items = []
            for _, frame, transport, site in rows:
                try:
                    item = Item.fromJSON(_bytes(frame))
                except BadItem:
                    # A frame that never decoded goes back as it came; it
                    # will be dead-lettered again, with the same reason.
                    items.append((asStored(frame), asStored(transport) or "",
                                  asStored(site) or "default", 0, now, now, 0))
                    continue
                item = dataclasses.replace(item, attempts=0)
                items.append(itemRow(item, now, self.dialect.paramstyle))
            if items:
                txn.executemany(insertStatement(self.dialect.paramstyle), items)
            self._deleteIds(txn, "queue_dead", [r[0] for r in rows])
            return len(rows)

        return self._write(requeue)

    def deadPurge(self, deadIds=None):
        where, params = self._ids(deadIds)

        def purge(txn):
            txn.execute(f"DELETE FROM queue_dead{where}", params)
            return txn.rowcount

        return self._write(purge)

    def _ids(self, deadIds):
        if deadIds is None:
            return "", ()
        ids = [int(i) for i in deadIds]
        return f" WHERE id IN ({self.dialect.params(len(ids))})", ids
