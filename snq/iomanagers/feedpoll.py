# -*- test-case-name: tests.test_feedpoll -*-
"""
C{feedpoll}: the feed importer, heir of StatusNet's Twitter importers.
Each site's feeds (C{[sites.NICK.feeds]}: a name → its URL, or a table
with C{url}, C{interval}, C{transport}) are polled, parsed with
feedparser, and each new entry becomes one item (transport C{feedentry}
unless the feed says otherwise) with the feed, the entry's id, link,
title, published time and content.

* Conditional GET (C{ETag}, C{Last-Modified}), gzip; at most one request
  at a time per host from a worker, and C{host_interval} seconds between
  two (politeness).
* On errors the delay doubles from the feed's interval up to
  C{max_backoff}; a 429 or 503 waits at least its C{Retry-After}.
* Each entry is enqueued once, ever: its id is claimed in the ledger with
  its item (across restarts and hosts) for C{retention}, and entries
  published longer ago than that are not imported.  A feed has one
  poller at a time across the pool and hosts: a lease in the ledger,
  renewed at each poll for as long as the poller will wait.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import feedparser
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    ContentDecoderAgent,
    GzipDecoder,
    HTTPConnectionPool,
    ResponseFailed,
    readBody,
)
from twisted.web.http_headers import Headers

from snq.backoff import backoff
from snq.config import DURATION, NAME, check, isName, parseDuration
from snq.iomanager import IoManager, PollingManager
from snq.service import defaultReactor

#: Seconds a poller's lease outlives its next poll.
LEASE_MARGIN = 30.0
#: The feed's state (validators) in the ledger lives this long unused.
STATE_KEPT = 30 * 86400.0


@dataclass(frozen=True)
class FeedSettings:
    """C{[iomanagers.feedpoll]}."""

    #: Between two polls of a feed, unless the feed says otherwise.
    interval: str | float = field(default="15m", metadata=DURATION)
    transport: str = field(default="feedentry", metadata=NAME)
    #: Seconds between two requests to one host (and one at a time).
    host_interval: str | float = field(default="2s", metadata=DURATION)
    #: Longest wait after errors.
    max_backoff: str | float = field(default="6h", metadata=DURATION)
    #: How long an entry's id is remembered; older entries are not imported.
    retention: str | float = field(default="180d", metadata=DURATION)
    timeout: str | float = field(default="30s", metadata=DURATION)
    #: Bytes; a larger feed is an error.
    max_size: int = field(default=10 * 2**20, metadata=check(
        lambda v: v > 0, "a number of bytes above 0"))
    user_agent: str = "snq feedpoll (+https://pypi.org/project/snq/)"


@dataclass(frozen=True)
class Feed:
    """One site's feed, as its poller runs it."""

    site: str
    name: str
    url: str
    interval: float
    transport: str

    @property
    def key(self) -> str:
        return f"{self.site}/{self.name}"


def feedsOf(config, settings) -> tuple[dict[str, Feed], list[str]]:
    """Key → L{Feed} of every site's C{feeds}, and the problems, in words."""
    feeds, problems = {}, []
    for site, table in sorted(config.sites.items()):
        entries = table.get("feeds", {})
        where = f"sites.{site}.feeds"
        if not isinstance(entries, dict):
            problems.append(f"{where}: expected a table of name = URL")
            continue
        for name, spec in sorted(entries.items()):
            spec = {"url": spec} if isinstance(spec, str) else spec
            if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
                problems.append(f"{where}.{name}: expected a URL, or a table "
                                "with url (and interval, transport)")
                continue
            unknown = sorted(set(spec) - {"url", "interval", "transport"})
            url = spec["url"]
            interval = spec.get("interval", settings.interval)
            transport = spec.get("transport", settings.transport)
            if unknown:
                problems.append(f"{where}.{name}: unknown keys {', '.join(unknown)}"
                                " (known: url, interval, transport)")
            elif urlsplit(url).scheme not in ("http", "https") or not urlsplit(
                    url).hostname:
                problems.append(f"{where}.{name}.url: expected an http:// or "
                                f"https:// URL, got {url!r}")
            elif not DURATION["check"][0](interval):
                problems.append(f"{where}.{name}.interval: expected seconds or "
                                f'a duration like "15m", got {interval!r}')
            elif not isinstance(transport, str) or not isName(transport):
                problems.append(f"{where}.{name}.transport: expected a "
                                f"transport name, got {transport!r}")
            elif not isName(name):
                problems.append(f"{where}.{name}: expected a name of letters, "
                                "digits, _ . -")
            else:
                feed = Feed(site, name, url, parseDuration(interval), transport)
                feeds[feed.key] = feed
    return feeds, problems


class HttpError(Exception):
    """A feed answered with another status than 200 or 304."""

    def __init__(self, code: int, retryAfter: float | None = None):
        super().__init__(f"HTTP {code}")
        self.code = code
        self.retryAfter = retryAfter


#: Failures of a feed rather than of snq: logged without a traceback.
EXPECTED = (HttpError, ValueError, defer.TimeoutError, error.ConnectError,
            error.ConnectionLost, ResponseFailed)


def retryAfter(value: bytes | None, now: float) -> float | None:
    """A C{Retry-After} header (seconds or an HTTP date) → seconds from now."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - now)
    except (TypeError, ValueError):
        return None


class Fetcher:
    """HTTP GET with gzip, a timeout and a size limit, over Twisted's Agent."""

    def __init__(self, reactor=None):
        self.reactor = defaultReactor(reactor)
        # Not persistent: a worker polls each host every few minutes at most.
        self.agent = ContentDecoderAgent(
            Agent(self.reactor, pool=HTTPConnectionPool(self.reactor, False)),
            [(b"gzip", GzipDecoder)])

    @defer.inlineCallbacks
    def get(self, url: str, headers: dict, timeout: float, maxSize: int):
        """→ C{(code, headers, body)}; body b"" for a 304."""
        d = self.agent.request(b"GET", url.encode("utf-8"), Headers(
            {k.encode(): [v.encode("latin-1")] for k, v in headers.items()}))
        d.addTimeout(timeout, self.reactor)
        response = yield d
        if isinstance(response.length, int) and response.length > maxSize:
            response.deliverBody(_Discard())
            raise ValueError(f"the feed is {response.length} bytes, over "
                             f"max_size {maxSize}")
        body = yield readBody(response).addTimeout(timeout, self.reactor)
        if len(body) > maxSize:
            raise ValueError(f"the feed is {len(body)} bytes, over max_size "
                             f"{maxSize}")
        return response.code, response.headers, body


class _Discard:
    """Reads and drops a body that is not wanted."""

    def makeConnection(self, transport):
        transport.stopProducing()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


class HostGate:
    """One request at a time per host, C{interval} seconds apart."""

    def __init__(self, clock, interval: float):
        self.clock = clock
        self.interval = interval
        self._waiting: dict[str, list[defer.Deferred]] = {}
        self._busy: set[str] = set()
        #: host → when its last request ended.
        self._ended: dict[str, float] = {}

    def enter(self, host: str) -> defer.Deferred:
        """
        Fires, once this worker may send a request to C{host}, with the
        callable to call when that request is over.
        """
        d = defer.Deferred()
        self._waiting.setdefault(host, []).append(d)
        if host not in self._busy:
            self._next(host)
        return d

    def _next(self, host):
        waiting = self._waiting.get(host)
        if not waiting:
            self._waiting.pop(host, None)
            return
        self._busy.add(host)
        d = waiting.pop(0)
        ended = self._ended.get(host)
        pause = 0.0 if ended is None else max(
            0.0, ended + self.interval - self.clock.seconds())
        leave = lambda: self._leave(host)  # noqa: E731
        if pause:
            self.clock.callLater(pause, d.callback, leave)
        else:
            d.callback(leave)

    def _leave(self, host):
        self._ended[host] = self.clock.seconds()
        self._busy.discard(host)
        self._next(host)


def entryId(entry) -> str:
    """An entry's id: its own, else its link, else a hash of what it says."""
    for key in ("id", "link"):
        if entry.get(key):
            return str(entry[key])
    text = json.dumps([entry.get("title"), entry.get("published"),
                       entry.get("summary")], sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _seconds(struct) -> float | None:
    return calendar.timegm(struct) if struct else None


def entryPayload(feed: Feed, entry) -> dict:
    content = entry.get("content")
    text = content[0].get("value") if content else entry.get("summary")
    return {"feed": feed.name, "feed_url": feed.url, "id": entryId(entry),
            "link": entry.get("link"), "title": entry.get("title"),
            "published": _seconds(entry.get("published_parsed")
                                  or entry.get("updated_parsed")),
            "content": text, "author": entry.get("author")}


class FeedPolling(PollingManager):
    """One feed's poller: lease, conditional GET, new entries, next time."""

    log = Logger()

    def __init__(self, poller, feed: Feed):
        super().__init__(feed.interval, poller.clock)
        self.poller = poller
        self.context = poller.context
        self.feed = feed
        self.lease = f"feedpoll:{feed.key}"
        self.failures = 0
        self.lastError = ""
        self.lastPoll: float | None = None
        self.lastStatus = ""
        self.holding = False
        self.nextPoll: float | None = None

    def __repr__(self):
        return f"<feed {self.feed.key}>"

    @defer.inlineCallbacks
    def poll(self):
        settings = self.context.settings
        ledger = yield self.context.ledger()
        timeout = parseDuration(settings.timeout)
        self.holding = yield ledger.lease(self.lease, self.poller.owner,
                                          timeout + 2 * LEASE_MARGIN)
        if not self.holding:
            # Another worker (or host) polls it: look again later, in case
            # it goes.
            return self._next(self.feed.interval)
        try:
            new = yield self._poll(ledger, settings, timeout)
        except Exception as e:
            delay = self._failed(e, settings)
        else:
            if self.failures:
                self.log.info("feed {feed} polled again after {n} failures",
                              feed=self.feed.key, n=self.failures)
            self.failures, self.lastError = 0, ""
            delay = self.feed.interval
            if new:
                self.log.info("feed {feed}: {n} new entries", feed=self.feed.key,
                              n=new)
        # Held until the next poll, so no other poller starts meanwhile.
        yield ledger.lease(self.lease, self.poller.owner, delay + LEASE_MARGIN)
        return self._next(delay)

    def _next(self, delay: float) -> float:
        self.nextPoll = self.clock.seconds() + delay
        return float(delay)

    @defer.inlineCallbacks
    def _poll(self, ledger, settings, timeout):
        feed = self.feed
        stateKey = f"feedstate:{feed.key}:{feed.url}"
        state = json.loads((yield ledger.get(stateKey)) or "{}")
        headers = {"User-Agent": settings.user_agent}
        if state.get("etag"):
            headers["If-None-Match"] = state["etag"]
        if state.get("modified"):
            headers["If-Modified-Since"] = state["modified"]
        over = yield self.poller.gate.enter(urlsplit(feed.url).hostname)
        try:
            code, responseHeaders, body = yield self.poller.fetcher.get(
                feed.url, headers, timeout, settings.max_size)
        finally:
            over()
        self.lastPoll = self.clock.seconds()
        self.lastStatus = f"HTTP {code}"
        self.context.count("polled", feed.key, feed.site)
        if code == 304:
            self.context.count("not_modified", feed.key, feed.site)
            return 0
        if code != 200:
            raise HttpError(code, retryAfter(
                responseHeaders.getRawHeaders(b"retry-after", [None])[0],
                self.clock.seconds()))
        parsed = feedparser.parse(body)
        if parsed.bozo and not parsed.entries:
            raise ValueError(f"not a feed: {parsed.bozo_exception}")
        new = yield self._enqueue(parsed.entries, settings)
        validators = {
            "etag": responseHeaders.getRawHeaders(b"etag", [None])[0],
            "modified": responseHeaders.getRawHeaders(b"last-modified", [None])[0]}
        validators = {k: v.decode("latin-1") for k, v in validators.items() if v}
        yield ledger.put(stateKey, json.dumps(validators), STATE_KEPT)
        return new

    @defer.inlineCallbacks
    def _enqueue(self, entries, settings):
        feed = self.feed
        retention = parseDuration(settings.retention)
        oldest = self.clock.seconds() - retention
        candidates = []
        # Feeds list the newest first: items go in the order written.
        for entry in reversed(entries):
            payload = entryPayload(feed, entry)
            if payload["published"] is not None and payload["published"] < oldest:
                continue
            candidates.append((f"feedentry:{feed.key}:{payload['id']}",
                               self.context.item(feed.transport, payload,
                                                 feed.site)))
        new = yield self.context.enqueueOnce(candidates, retention)
        if new:
            self.context.count("new_entries", feed.key, feed.site, len(new))
        return len(new)

    def _failed(self, problem, settings) -> float:
        self.failures += 1
        self.lastError = str(problem) or type(problem).__name__
        self.context.count("errors", self.feed.key, self.feed.site)
        delay = min(backoff(self.failures, self.feed.interval,
                            parseDuration(settings.max_backoff)),
                    parseDuration(settings.max_backoff))
        if isinstance(problem, HttpError) and problem.retryAfter is not None:
            delay = max(delay, problem.retryAfter)
        if self.failures == 1 and not isinstance(problem, EXPECTED):
            self.log.failure("feed {feed} cannot be polled; next try in "
                             "{delay:.0f} s", feed=self.feed.key, delay=delay)
        else:
            self.log.warn("feed {feed} cannot be polled ({n} in a row): {error}; "
                          "next try in {delay:.0f} s", feed=self.feed.key,
                          n=self.failures, error=self.lastError, delay=delay)
        return delay

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self.holding:
            # Free at once for another worker, rather than at its expiry.
            self.holding = False
            ledger = yield self.context.ledger()
            yield ledger.release(self.lease, self.poller.owner)

    def status(self) -> dict | None:
        """Only the poller holding the feed says anything about it."""
        if not self.holding:
            return None
        detail = [self.feed.url, self.lastStatus or (
            "no answer" if self.failures else "not polled yet")]
        if self.failures:
            detail.append(f"{self.failures} failures in a row: {self.lastError}")
        if self.nextPoll is not None:
            wait = max(0, self.nextPoll - self.clock.seconds())
            detail.append(f"next poll in {wait:.0f} s")
        return {"key": self.feed.key, "state": "failing" if self.failures else "ok",
                "detail": "; ".join(detail)}


class FeedPoller(IoManager):
    """
    The C{feedpoll} IoManager: a L{FeedPolling} per configured feed, which
    polls only while it holds the feed's lease.  Runs on every queue worker
    by default: the leases spread the feeds over them.
    """

    log = Logger()
    Settings = FeedSettings
    usesLedger = True

    def __init__(self, context, fetcher=None):
        super().__init__(context.clock)
        self.context = context
        self.fetcher = fetcher or Fetcher()
        #: This process's name in the leases.
        self.owner = f"{context.workerId}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.gate = HostGate(self.clock, parseDuration(context.settings.host_interval))
        self.pollers: dict[str, FeedPolling] = {}

    @classmethod
    def check(cls, config, settings):
        return feedsOf(config, settings)[1]

    def wanted(self, config) -> dict[str, Feed]:
        feeds, _ = feedsOf(config, self.context.settings)
        sites = set(self.context.sites())
        return {k: f for k, f in feeds.items() if f.site in sites}

    def startService(self):
        super().startService()
        return self._follow(self.context.config)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        pollers, self.pollers = self.pollers, {}
        yield defer.gatherResults([p.stopService() for p in pollers.values()])

    def reconfigService(self, config):
        self.gate.interval = parseDuration(self.context.settings.host_interval)
        return self._follow(config)

    @defer.inlineCallbacks
    def _follow(self, config):
        wanted = self.wanted(config)
        applied = []
        for key, poller in sorted(self.pollers.items()):
            if wanted.get(key) != poller.feed:
                del self.pollers[key]
                yield poller.stopService()
                if key not in wanted:
                    applied.append(f"feed {key} removed")
        for key, feed in sorted(wanted.items()):
            if key not in self.pollers:
                poller = self.pollers[key] = FeedPolling(self, feed)
                poller.startService()
                applied.append(f"feed {key} polled")
        return applied

    def status(self):
        rows = [p.status() for _, p in sorted(self.pollers.items())]
        return [row for row in rows if row is not None]
