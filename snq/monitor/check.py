# -*- test-case-name: tests.test_monitor_check -*-
"""
C{snqctl check}: a Nagios plugin (also for Icinga, Naemon, Sensu, …).

It asks the queue how much it holds and the running daemon, over its
control socket, how many workers run, and answers as the Nagios plugin
guidelines say: one line, C{SNQ STATE - text | perfdata}, and the exit
status 0 (OK), 1 (WARNING), 2 (CRITICAL) or 3 (UNKNOWN).

Thresholds are Nagios ranges: C{10} alerts above 10, C{10:} below 10,
C{~:10} above 10, C{10:20} outside 10..20, C{@10:20} inside it.  A daemon
that does not answer on its socket (none listens, or the socket is not
there) is CRITICAL: no worker runs; so is a worker whose claims have been
failing for C{--claim-crit} seconds: the queue cannot be claimed.  What
keeps the check from knowing (invalid arguments or config, a queue that
cannot be asked, a socket it may not use, the time running out) is
UNKNOWN.

With C{--cluster} it reads the cluster's registry (L{snq.cluster}) instead
of one daemon's control socket, so it can run on any host: CRITICAL with
fewer than C{--min-daemons} daemons live, WARNING for a daemon whose
heartbeat is stale or for daemons that run different configs.
"""

import argparse
import math
import re
from dataclasses import dataclass

from twisted.internet import defer

from snq import config as snqconfig
from snq.cluster import ClusterMissing, liveness, withStore
from snq.monitor import master
from snq.queues import makeQueue

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")

_RANGE = re.compile(r"^(@)?(?:(~|-?\d+(?:\.\d+)?):)?(-?\d+(?:\.\d+)?)?$")


@dataclass(frozen=True)
class Range:
    """A Nagios threshold range, as given."""

    text: str
    start: float
    end: float
    inside: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        m = _RANGE.match(text.strip())
        if not text.strip() or not m or (m.group(3) is None and ":" not in text):
            raise ValueError(f"{text!r} is not a Nagios range (10, 10:, ~:10, "
                             "10:20, @10:20)")
        start = m.group(2)
        start = -math.inf if start == "~" else float(start or 0)
        end = math.inf if m.group(3) is None else float(m.group(3))
        if start > end:
            raise ValueError(f"{text!r}: the start is above the end")
        return cls(text.strip(), start, end, m.group(1) == "@")

    def alerts(self, value: float) -> bool:
        within = self.start <= value <= self.end
        return within if self.inside else not within


DESCRIPTION = """\
A Nagios plugin: one line, "SNQ STATE - text | perfdata", and the exit
status 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN.  RANGE is a Nagios range:
10 alerts above 10, 10: below 10, 10:20 outside 10..20, @10:20 inside it.
No daemon answering on the control socket is CRITICAL, and so is a worker
whose claims keep failing (the queue cannot be claimed); what keeps the
check from knowing (bad arguments or config, a queue that does not answer,
running out of time) is UNKNOWN.  With --cluster, every daemon in the
cluster's registry instead of this host's: fewer than --min-daemons live is
CRITICAL; a stale heartbeat, or daemons running different configs, is a
WARNING."""


def _range(text: str) -> Range:
    try:
        return Range.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def addArguments(parser):
    for name, what in (("backlog", "items due and not done (ready + held)"),
                       ("age", "seconds the oldest due item has waited"),
                       ("dead", "dead letters")):
        for level in ("warn", "crit"):
            parser.add_argument(
                f"--{name}-{level}", type=_range, metavar="RANGE",
                help=f"{'WARNING' if level == 'warn' else 'CRITICAL'} when "
                     f"{what} are outside RANGE")
    parser.add_argument(
        "--min-workers", type=int, default=1, metavar="N",
        help="CRITICAL when fewer than N workers run (default 1; 0: do not "
             "ask the daemon)")
    parser.add_argument(
        "--claim-crit", type=float, default=5.0, metavar="SECONDS",
        help="CRITICAL when a worker's claims have been failing this long "
             "(default 5)")
    parser.add_argument(
        "--cluster", action="store_true",
        help="check every daemon in the cluster's registry (the backend's), "
             "not this host's over its control socket; --min-workers counts "
             "the workers of every live daemon")
    parser.add_argument(
        "--min-daemons", type=int, default=1, metavar="N",
        help="with --cluster: CRITICAL when fewer than N daemons are live "
             "(default 1)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="UNKNOWN after this long (default 10)")


class _Unknown(Exception):
    """The check cannot tell; the message says why."""


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class Check:
    """One run of the plugin: gather, judge, print one line."""

    def __init__(self, config, args, reactor):
        self.config = config
        self.args = args
        self.reactor = reactor
        self.state = OK
        self.alerts: list[str] = []
        self.facts: list[str] = []
        self.perfdata: list[str] = []

    def judge(self, label: str, value, warn: Range | None, crit: Range | None,
              text: str, unit: str = "", limits: str = "0;"):
        """Compare C{value} with the thresholds; note it, alert or not."""
        for level, threshold in ((CRITICAL, crit), (WARNING, warn)):
            if threshold is not None and threshold.alerts(value):
                self.state = max(self.state, level)
                self.alerts.append(f"{text} ({NAMES[level]}, range "
                                   f"{threshold.text})")
                break
        else:
            self.facts.append(text)
        self.perfdata.append(
            f"{label}={_fmt(value)}{unit};{warn.text if warn else ''};"
            f"{crit.text if crit else ''};{limits}")

    @defer.inlineCallbacks
    def run(self):
        args = self.args
        depth = yield self._depth()
        if depth is not None:
            backlog = depth.ready + depth.held
            self.judge("backlog", backlog, args.backlog_warn, args.backlog_crit,
                       f"backlog {backlog} ({depth.ready} ready, {depth.held} held)")
            self.judge("age", round(depth.oldest or 0.0, 3), args.age_warn,
                       args.age_crit, f"oldest {depth.oldest or 0:.1f} s", "s")
            self.judge("dead", depth.dead, args.dead_warn, args.dead_crit,
                       f"{depth.dead} dead")
            self.perfdata.append(f"delayed={depth.delayed};;;0;")
        if args.cluster:
            yield self._cluster()
        elif args.min_workers > 0:
            running, slots, text, failing = yield self._workers()
            self.judge("workers", running, None, Range.parse(f"{args.min_workers}:"),
                       text, limits=f"0;{slots}")
            self.judgeClaims(failing)

    @defer.inlineCallbacks
    def _cluster(self):
        """Judge every daemon in the registry, by its last heartbeat."""
        try:
            records = yield withStore(self.config, self.reactor,
                                      lambda store: store.daemons())
        except ClusterMissing as e:
            raise _Unknown(str(e))
        except Exception as e:
            raise _Unknown(f"cannot read the cluster's registry: {e}")
        now, stale = self.reactor.seconds(), self.config.cluster.stale
        states = {name: liveness(r, now, stale) for name, r in records.items()}
        live = {n: r for n, r in sorted(records.items()) if states[n] == "live"}
        self.judge("daemons", len(live), None,
                   Range.parse(f"{self.args.min_daemons}:"),
                   f"{len(live)} daemons live", limits=f"0;{len(records)}")
        silent = sorted(n for n, state in states.items() if state == "stale")
        for name in silent:
            self.state = max(self.state, WARNING)
            self.alerts.append(f"{name} silent for "
                               f"{now - records[name].get('seen', 0):.0f} s "
                               "(WARNING)")
        self.perfdata.append(f"stale={len(silent)};1;;0;")
        configs: dict = {}
        for name, record in live.items():
            configs.setdefault(record.get("digest"), []).append(
                f"{name} (generation {record.get('generation')})")
        if len(configs) > 1:
            self.state = max(self.state, WARNING)
            self.alerts.append("configs differ: " + "; ".join(
                f"{digest} on {', '.join(names)}"
                for digest, names in sorted(configs.items(), key=str)) +
                " (WARNING)")
        workers = [w for r in live.values() for w in r.get("workers") or []
                   if w.get("role") == "current"]
        if self.args.min_workers > 0:
            running = sum(w.get("state") == "running" for w in workers)
            self.judge("workers", running, None,
                       Range.parse(f"{self.args.min_workers}:"),
                       f"{running}/{len(workers)} workers running",
                       limits=f"0;{len(workers)}")
        self.judgeClaims([
            f"{w['id']} cannot claim for {w['claims_failing']:.0f} s: "
            f"{' '.join((w.get('claim_error') or '').split())}"
            for w in workers
            if (w.get("claims_failing") or 0) >= self.args.claim_crit])

    def judgeClaims(self, failing: list[str]):
        """CRITICAL while a worker cannot claim: items pile up unseen."""
        for text in failing:
            self.state = CRITICAL
            self.alerts.append(f"{text} (CRITICAL)")
        self.perfdata.append(f"claim_failing={len(failing)};;1;0;")

    @defer.inlineCallbacks
    def _depth(self):
        args = self.args
        wanted = any(getattr(args, f"{n}_{level}") is not None
                     for n in ("backlog", "age", "dead") for level in ("warn", "crit"))
        queue = makeQueue(self.config, self.reactor, claimant="snqctl-check")
        try:
            yield queue.open()
            try:
                depth = yield queue.depth()
            finally:
                yield queue.close()
        except Exception as e:
            raise _Unknown(f"cannot ask the queue {queue.describe()}: {e}")
        if depth is None and wanted:
            raise _Unknown(f"the {self.config.queue.backend} backend does not "
                           "tell how much it holds; drop the backlog, age and "
                           "dead thresholds")
        return depth

    @defer.inlineCallbacks
    def _workers(self):
        """
        → (workers running, slots, text, a sentence per worker whose claims
        have failed for C{--claim-crit} seconds).
        """
        path = self.args.socket or self.config.daemon.control_socket
        try:
            status = yield master.askStatus(path, self.reactor)
        except master.NotRunning as e:
            return 0, "", str(e), []
        except master.Unreachable as e:
            raise _Unknown(str(e))
        running, slots = master.workerCounts(status)
        now = self.reactor.seconds()
        failing = []
        for w in status["workers"]:
            claims = (w.get("report") or {}).get("claims")
            if (w["role"] == "current" and claims
                    and now - claims["since"] >= self.args.claim_crit):
                failures = claims.get("failures")
                failures = f", {failures} failures in a row" if failures else ""
                failing.append(f"{w['id']} cannot claim for "
                               f"{now - claims['since']:.0f} s{failures}: "
                               f"{' '.join(claims['error'].split())}")
        return running, slots, f"{running}/{slots} workers running", failing

    def line(self) -> str:
        text = "; ".join(self.alerts + self.facts)
        return f"SNQ {NAMES[self.state]} - {text} | {' '.join(self.perfdata)}"


def usageError(parser, message: str):
    """argparse's C{error}: a plugin's usage error is UNKNOWN, not 2."""
    print(f"SNQ UNKNOWN - {parser.prog}: {message}")
    raise SystemExit(UNKNOWN)


@defer.inlineCallbacks
def run(args, reactor, out) -> int:
    """Print the plugin's line; → its exit status."""
    try:
        config = snqconfig.load(args.config)
        check = Check(config, args, reactor)
        yield check.run().addTimeout(args.timeout, reactor)
    except defer.TimeoutError:
        why = f"no answer within {args.timeout:g} s"
    except snqconfig.ConfigError as e:
        why = f"invalid configuration: {'; '.join(e.problems)}"
    except _Unknown as e:
        why = str(e)
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
    else:
        print(check.line(), file=out)
        return check.state
    # One line: Nagios reads only the first.
    print(f"SNQ UNKNOWN - {' '.join(why.split())}", file=out)
    return UNKNOWN
