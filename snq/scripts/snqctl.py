# -*- test-case-name: tests.test_snqctl -*-
"""
snqctl: the operator's command.  C{status}, C{stop}, C{restart},
C{reload}, and C{snmp} for snmpd, talk to a running daemon over its
control socket; everything else talks to the queue itself, so it works
whether or not a daemon is running.  C{status --cluster}, C{reload
--cluster}, C{pause} and C{resume} talk to every daemon through the
cluster's registry in the backend (L{snq.cluster}).
"""

import argparse
import dataclasses
import datetime
import json
import os
import socket as sockets
import sys
import tomllib

from twisted.internet import defer, error, task

from snq import amp, control
from snq import config as snqconfig
from snq.cluster import (
    RELOAD,
    ClusterMissing,
    Pauses,
    liveness,
    pauseKey,
    view,
    withStore,
)
from snq.item import DEFAULT_SITE, Item
from snq.monitor import check as plugin
from snq.monitor import snmp
from snq.queues import makeQueue
from snq.stomp import control as stompcontrol


class CommandError(Exception):
    """A failure to report in one line, exit status 1."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snqctl", description=(
        "The operator's command. status, stop, restart and reload talk to a "
        "running daemon over its control socket; everything else talks to the "
        "queue itself, so it works whether or not a daemon is running."))
    p.add_argument("-c", "--config",
                   help="TOML config file (default: $SNQ_CONFIG, else built-in)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("enqueue", help="put an item on the queue")
    e.add_argument("transport")
    e.add_argument("payload",
                   help="the payload as JSON, or - to read one payload per line "
                        "from standard input")
    e.add_argument("--site", default=DEFAULT_SITE)
    e.add_argument("--priority", type=int, default=None,
                   help="higher runs first (default: the transport's priority)")
    when = e.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, default=0.0,
                      help="seconds before the item may run")
    when.add_argument("--run-at", type=_runAt, default=None, metavar="TIME",
                      help="not before TIME: UNIX seconds, or ISO 8601 with a "
                           "timezone (2031-01-01T08:00:00+00:00)")

    cn = sub.add_parser("cancel", help="remove a waiting item (a running one "
                        "finishes)")
    which = cn.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="the item's id")
    which.add_argument("--key", help="every waiting item with this key")

    d = sub.add_parser("dead", help="inspect and handle dead letters")
    dsub = d.add_subparsers(dest="action", required=True)
    dl = dsub.add_parser("list", help="newest dead letters first")
    dl.add_argument("--limit", type=int, default=50)
    dl.add_argument("--json", action="store_true", help="one JSON object a line")
    ds = dsub.add_parser("show", help="one dead letter with its frame")
    ds.add_argument("id", type=int)
    for action, helpText in (("retry", "put dead letters back on the queue"),
                             ("purge", "delete dead letters")):
        a = dsub.add_parser(action, help=helpText)
        a.add_argument("ids", type=int, nargs="*")
        a.add_argument("--all", action="store_true")

    socket = argparse.ArgumentParser(add_help=False)
    socket.add_argument(
        "--socket", help="the daemon's control socket (default: [daemon] "
        "control_socket, relative to the current directory)")
    st = sub.add_parser("status", parents=[socket],
                        help="the workers of a running daemon")
    st.add_argument("--json", action="store_true",
                    help="everything the master knows, as JSON")
    st.add_argument("--cluster", action="store_true",
                    help="every daemon in the cluster's registry (the "
                         "backend's), live or gone, with its workers, and "
                         "what is paused")
    sub.add_parser("stop", parents=[socket],
                   help="stop the daemon gracefully and wait until it has")
    sub.add_parser("restart", parents=[socket],
                   help="replace the workers one at a time, losing nothing")
    rl = sub.add_parser("reload", parents=[socket],
                        help="reload the daemon's config file and print what "
                             "changed and how it was applied (exit status 1 "
                             "if the file is invalid: nothing changed)")
    rl.add_argument("--cluster", action="store_true",
                    help="ask every live daemon in the cluster's registry to "
                         "reload its own file, and print each one's answer "
                         "(exit status 1 if one failed or did not answer)")
    rl.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                    help="with --cluster: how long to wait for the answers "
                         "(default 60)")
    for action, helpText in (
            ("pause", "stop every daemon of the cluster from taking a "
                      "transport's or a site's items, until resumed"),
            ("resume", "let the daemons take them again")):
        pr = sub.add_parser(action, help=helpText)
        what = pr.add_mutually_exclusive_group(required=True)
        what.add_argument("transport", nargs="?")
        what.add_argument("--site", metavar="NICK")
    ck = sub.add_parser(
        "check", parents=[socket], description=plugin.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="a Nagios plugin: one status line with perfdata, exit status "
             "0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    plugin.addArguments(ck)
    ck.error = lambda message: plugin.usageError(ck, message)
    sn = sub.add_parser(
        "snmp", parents=[socket],
        help="for net-snmp's snmpd.conf (pass_persist): answer snmpd on "
             "standard input and output with the running daemon's figures "
             "(contrib/SNQ-MIB.txt, under [monitor] snmp_base_oid)")
    sn.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                    help="a daemon that has not answered after this long is "
                         "'unknown' (default 2; snmpd waits meanwhile)")
    sn.add_argument("--log", metavar="FILE",
                    help="append the agent's log lines here (default: none; "
                         "standard error would reach snmpd as answers)")
    #: Each command's parser, which reports arguments it does not know.
    p.commands = sub.choices

    c = sub.add_parser("control", help="publish on the STOMP control channel, "
                       "which every worker on every host obeys")
    csub = c.add_subparsers(dest="action", required=True)
    csub.add_parser("shutdown", help="workers stop and stay down")
    csub.add_parser("restart", help="workers are replaced by new ones")
    cu = csub.add_parser("update", help="a site's configuration changed")
    cu.add_argument("site")

    sc = sub.add_parser("schedule", help="the schedules ([schedule.NAME])")
    scsub = sc.add_subparsers(dest="action", required=True)
    sl = scsub.add_parser("list", help="each schedule, its next tick and the "
                          "last tick fired (by any daemon on this backend)")
    sl.add_argument("--json", action="store_true", help="one JSON object a line")

    db = sub.add_parser("db", help="database schema")
    dbsub = db.add_subparsers(dest="action", required=True)
    dbsub.add_parser("init", help="create or upgrade the tables")
    return p


def _payloads(text: str, stdin):
    lines = stdin if text == "-" else [text]
    for number, line in enumerate(lines, 1):
        if text == "-" and not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError as e:
            where = f"line {number}" if text == "-" else "payload"
            raise CommandError(f"{where} is not JSON: {e}")


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).isoformat(" ", "seconds")


@defer.inlineCallbacks
def run(reactor, args, out=sys.stdout, stdin=sys.stdin):
    if args.command == "check":
        # A plugin's exit status is its answer, for a bad config too.
        raise SystemExit((yield plugin.run(args, reactor, out)))
    # status and reload go to the control socket unless --cluster.
    if args.command in _CLUSTER and getattr(args, "cluster", True):
        config = snqconfig.load(args.config)
        try:
            result = yield _CLUSTER[args.command](config, args, out, reactor)
        except ClusterMissing as e:
            raise CommandError(str(e))
        return result
    if args.command in _CONTROL:
        result = yield _control(_controlConfig(args), args, out, reactor)
        return result
    if args.command == "snmp":
        # A config error still reaches the operator trying the command.
        config = snqconfig.load(args.config)
        snmp.quietStderr()
        yield snmp.run(config, args, reactor)
        return
    config = snqconfig.load(args.config)
    queue = makeQueue(config, reactor)
    try:
        yield queue.open()
    except Exception as e:
        raise CommandError(f"cannot open the queue {queue.describe()}: {e}")
    try:
        result = yield _COMMANDS[args.command](queue, config, args, out, stdin,
                                               reactor)
    finally:
        yield queue.close()
    return result


@defer.inlineCallbacks
def _enqueue(queue, config, args, out, stdin, reactor):
    priority = args.priority
    if priority is None:
        priority = config.transport(args.transport).priority
    items = [Item(transport=args.transport, payload=p, site=args.site,
                  priority=priority, created=reactor.seconds(),
                  run_at=args.run_at)
             for p in _payloads(args.payload, stdin)]
    # Large batches go in chunks: one transaction each, bounded memory.
    for start in range(0, len(items), 1000):
        yield queue.enqueue(items[start:start + 1000], args.delay)
    if args.payload == "-":
        print(f"enqueued {len(items)} items on {args.transport}", file=out)
    else:
        print(items[0].id, file=out)


def _runAt(text: str) -> float:
    """C{--run-at}: UNIX seconds, or an ISO 8601 time with its timezone."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither UNIX seconds nor "
                                         "an ISO 8601 time")
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no timezone (add +00:00 "
                                         "or Z)")
    return when.timestamp()


@defer.inlineCallbacks
def _cancel(queue, config, args, out, stdin, reactor):
    what = f"item {args.id}" if args.key is None else f"items with key {args.key!r}"
    try:
        found = yield queue.cancel(args.id, args.key)
    except NotImplementedError:
        raise CommandError(f"cancel: the {config.queue.backend} backend cannot "
                           "remove an item it has been given")
    running = (f"{found.running} running, left to finish" if found.running
               else "")
    if found.removed:
        print(f"cancelled {found.removed} waiting "
              f"{'item' if found.removed == 1 else 'items'}"
              f"{'; ' + running if running else ''}", file=out)
    elif found.running:
        raise CommandError(f"{what}: {running}; nothing waiting to cancel")
    else:
        raise CommandError(f"{what}: not found (not waiting, not running)")


@defer.inlineCallbacks
def _dead(queue, config, args, out, stdin, reactor):
    if args.action == "list":
        letters = yield queue.deadList(args.limit)
        for dl in letters:
            if args.json:
                record = {k: v for k, v in dl.__dict__.items() if k != "frame"}
                print(json.dumps(record), file=out)
            else:
                print(f"{dl.id:>6}  {_when(dl.died)}  {dl.transport or '-':<12} "
                      f"{dl.site or '-':<10} {dl.reason:<10} {dl.error}", file=out)
        if not letters and not args.json:
            print("no dead letters", file=out)
    elif args.action == "show":
        dl = yield queue.deadShow(args.id)
        if dl is None:
            raise CommandError(f"no dead letter {args.id}")
        for key in ("id", "item_id", "transport", "site", "reason", "error",
                    "attempts"):
            print(f"{key}: {getattr(dl, key)}", file=out)
        print(f"died: {_when(dl.died)}", file=out)
        print(f"frame: {dl.frame.decode('utf-8', 'replace')}", file=out)
    else:
        if bool(args.ids) == args.all:
            raise CommandError(f"dead {args.action}: give ids or --all, not both")
        ids = None if args.all else args.ids
        method = queue.deadRetry if args.action == "retry" else queue.deadPurge
        count = yield method(ids)
        verb = "requeued" if args.action == "retry" else "purged"
        print(f"{verb} {count} dead letters", file=out)


def _db(queue, config, args, out, stdin, reactor):
    # Opening the queue created or upgraded the schema already.
    print(f"schema ready in {queue.describe()}", file=out)


def _broadcast(queue, config, args, out, stdin, reactor):
    if config.queue.backend != "stomp":
        raise CommandError("the control channel is STOMP's; [queue] backend is "
                           f"{config.queue.backend!r}")
    if not stompcontrol.isOpen(config.stomp):
        raise CommandError(stompcontrol.startWarning(config.stomp))
    command = f"update:{args.site}" if args.action == "update" else args.action
    signed = " (signed)" if config.stomp.control_secret else " (unsigned)"
    d = queue.publishControl(command)
    d.addCallback(lambda _: print(f"published {command} on "
                                  f"{config.stomp.control_channel}{signed}",
                                  file=out))
    return d


@defer.inlineCallbacks
def _schedule(queue, config, args, out, stdin, reactor):
    from snq.iomanagers.schedule import Ticks, describeTick, lastKey
    from snq.ledger import LedgerMissing, makeLedger

    if not config.schedule:
        print("no [schedule.NAME] in the config", file=out)
        return
    try:
        ledger = makeLedger(config, queue, reactor)
    except LedgerMissing as e:
        raise CommandError(str(e))
    yield ledger.open()
    now = reactor.seconds()
    rows = [("schedule", "when", "transport", "site", "next tick", "last fired")]
    try:
        for name, schedule in sorted(config.schedule.items()):
            ticks = Ticks(schedule)
            last = yield ledger.get(lastKey(name))
            last = float(last) if last else None
            when = (f"every {schedule.every}" if schedule.every
                    else f"cron {schedule.cron} {schedule.timezone}")
            site = "all sites" if schedule.sites == "all" else schedule.site
            if args.json:
                print(json.dumps({"name": name, "when": when,
                                  "transport": schedule.transport, "site": site,
                                  "next": ticks.after(now), "last": last}),
                      file=out)
            rows.append((name, when, schedule.transport, site,
                         describeTick(ticks.after(now), ticks.zone),
                         describeTick(last, ticks.zone)))
    finally:
        yield ledger.close()
    if not args.json:
        _table(rows, out)


def _table(rows, out):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width)
                        for cell, width in zip(row, widths, strict=True)).rstrip(),
              file=out)


_COMMANDS = {"enqueue": _enqueue, "cancel": _cancel, "dead": _dead, "db": _db,
             "control": _broadcast, "schedule": _schedule}


def _controlConfig(args):
    """
    The config, for its control socket.  A file that does not validate
    still names its socket for C{reload}: the daemon, which reads the file
    itself, then says what is wrong with it, and changes nothing.
    """
    try:
        return snqconfig.load(args.config)
    except snqconfig.ConfigError:
        if args.command != "reload":
            raise
    path = args.config or os.environ.get(snqconfig.ENV_VAR)
    try:
        with open(path, "rb") as f:
            socket = tomllib.load(f)["daemon"]["control_socket"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        socket = None
    daemon = snqconfig.DaemonConfig()
    if isinstance(socket, str):
        daemon = dataclasses.replace(daemon, control_socket=socket)
    return snqconfig.Config(daemon=daemon)


@defer.inlineCallbacks
def _control(config, args, out, reactor):
    path = args.socket or config.daemon.control_socket
    try:
        client = yield control.connect(path, reactor)
    except error.ConnectError as e:
        raise CommandError(
            f"no snq daemon answers on {os.path.abspath(path)}\n{e}\n(is it "
            "running? run snqctl in its run directory, or give --socket)")
    try:
        result = yield _CONTROL[args.command](client, args, out)
    finally:
        if client.transport is not None:
            client.transport.loseConnection()
    return result


@defer.inlineCallbacks
def _status(client, args, out):
    status = (yield client.callRemote(amp.Status))["status"]
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True), file=out)
        return
    restarting = ", rolling restart in progress" if status["restarting"] else ""
    print(f"snq master pid {status['pid']}, up {_duration(status['uptime'])}"
          f"{restarting}", file=out)
    config = status["config"]
    print(f"config generation {config['generation']}, loaded "
          f"{_when(config['loaded'])} from "
          f"{config['source'] or 'the embedded default'}", file=out)
    rows = [("worker", "pid", "state", "uptime", "handled", "errors", "rss",
             "restarts", "config")]
    for w in status["workers"]:
        report = w.get("report") or {}
        state = w["state"] if w["role"] == "current" else f"{w['state']} ({w['role']})"
        if "respawn_in" in w:
            state += f" ({w['respawn_in']:.1f} s)"
        rows.append((w["id"], str(w.get("pid") or "-"), state,
                     _duration(w["uptime"]) if "uptime" in w else "-",
                     str(report.get("handled", "-")), str(report.get("errors", "-")),
                     f"{report['rss'] / 2**20:.1f} MB" if "rss" in report else "-",
                     str(w["restarts"]), _generation(report, config)))
    _table(rows, out)


def _generation(report: dict, config: dict) -> str:
    """C{"3 12:00:01"}: the config a worker says it runs, and its load time."""
    own = report.get("config") or {}
    if not own.get("generation"):
        return "-"
    loaded = own.get("loaded")
    when = datetime.datetime.fromtimestamp(loaded).strftime(" %H:%M:%S") \
        if loaded else ""
    old = " (old)" if own["generation"] < config["generation"] else ""
    return f"{own['generation']}{when}{old}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    clock = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


@defer.inlineCallbacks
def _stop(client, args, out):
    yield client.callRemote(amp.Stop)
    print("snq is stopping: workers finish what they hold", file=out)
    yield client.lost
    print("snq stopped", file=out)


@defer.inlineCallbacks
def _restart(client, args, out):
    try:
        answer = yield client.callRemote(amp.Restart)
    except amp.ControlError as e:
        raise CommandError(f"restart: {e}")
    for r in answer["restarted"]:
        print(f"{r['id']}: pid {r['old']} -> {r['new']}", file=out)
    if not answer["restarted"]:
        print("no running worker to restart", file=out)


@defer.inlineCallbacks
def _reload(client, args, out):
    try:
        answer = (yield client.callRemote(amp.Reload))["reloaded"]
    except amp.ControlError as e:
        raise CommandError(f"reload: {e}")
    _printReload(answer, out)
    if answer["failed"]:
        raise CommandError("reload: config generation "
                           f"{answer['generation']} is the daemon's, but:\n"
                           + "\n".join(answer["failed"]))


def _printReload(answer: dict, out, indent=""):
    """What a daemon's reload changed and how it applied it."""
    changes = answer["changes"]
    if not changes:
        print(f"{indent}{answer['source']} has not changed: nothing to do "
              f"(config generation {answer['generation']})", file=out)
        return
    print(f"{indent}config generation {answer['generation']} from "
          f"{answer['source']}, {len(changes)} changes:", file=out)
    for change in changes:
        print(f"{indent}  {change['text']}", file=out)
    for line in answer["applied"]:
        print(f"{indent}{line}", file=out)
    for line in answer["failed"]:
        print(f"{indent}not applied: {line}", file=out)


_CONTROL = {"status": _status, "stop": _stop, "restart": _restart,
            "reload": _reload}


@defer.inlineCallbacks
def _registry(store):
    """→ (where, records, settings)."""
    return store.describe(), (yield store.daemons()), (yield store.settings())


def _clusterStatus(config, args, out, reactor):
    d = withStore(config, reactor, _registry)
    return d.addCallback(_showCluster, config, args, out, reactor.seconds())


def _showCluster(found, config, args, out, now):
    where, records, settings = found
    stale = config.cluster.stale
    states = {name: liveness(r, now, stale) for name, r in records.items()}
    pauses = Pauses.fromSettings(settings)
    if args.json:
        print(json.dumps(view(where, records, settings, now, stale), indent=2,
                         sort_keys=True), file=out)
        return
    live = sum(state == "live" for state in states.values())
    print(f"cluster in {where}: {live} daemons live, {len(records) - live} "
          "gone", file=out)
    paused = [f"transport {t}" for t in sorted(pauses.transports)] + [
        f"site {s}" for s in sorted(pauses.sites)]
    print(f"paused: {', '.join(paused) if paused else 'nothing'}", file=out)
    if not records:
        return
    rows = [("daemon", "pid", "state", "heartbeat", "uptime", "handled",
             "errors", "config")]
    # The live first, then the gone; by name within each.
    for name, r in sorted(records.items(),
                          key=lambda i: (states[i[0]] != "live", i[0])):
        state = states[name]
        shown = "live" if state == "live" else f"gone ({state})"
        workers = r.get("workers") or []
        rows.append((name, str(r.get("pid", "-")), shown,
                     f"{max(now - r.get('seen', 0), 0):.1f} s ago",
                     _duration(r["seen"] - r["started"])
                     if r.get("started") else "-",
                     str(sum(w.get("handled") or 0 for w in workers)),
                     str(sum(w.get("errors") or 0 for w in workers)),
                     f"{r.get('generation', '-')} {r.get('digest', '')}"))
        for w in workers:
            rows.append((f"  {w['id']}", str(w.get("pid") or "-"),
                         w.get("state") or "-", "",
                         _duration(w["uptime"]) if w.get("uptime") else "-",
                         str(w.get("handled", "-")), str(w.get("errors", "-")),
                         ""))
    _table(rows, out)


@defer.inlineCallbacks
def _clusterReload(config, args, out, reactor):
    nonce = os.urandom(8).hex()
    stale = config.cluster.stale

    @defer.inlineCallbacks
    def ask(store):
        now = reactor.seconds()
        asked = sorted(name for name, r in (yield store.daemons()).items()
                       if liveness(r, now, stale) == "live")
        if not asked:
            raise CommandError(f"reload: no daemon is live in the cluster's "
                               f"registry in {store.describe()}")
        yield store.put(RELOAD, {"nonce": nonce, "asked": now})
        print(f"reload asked of {len(asked)} daemons: {', '.join(asked)}",
              file=out)
        deadline = now + args.wait
        while True:
            records = yield store.daemons()
            answers = {name: (records.get(name) or {}).get("reload") or {}
                       for name in asked}
            done = {name: a for name, a in answers.items()
                    if a.get("nonce") == nonce and not a.get("running")}
            gone = [name for name in asked if name not in done and liveness(
                records.get(name) or {}, reactor.seconds(), stale) != "live"]
            if len(done) + len(gone) == len(asked) or reactor.seconds() > deadline:
                return asked, done, gone
            yield task.deferLater(reactor, 0.25, lambda: None)

    asked, done, gone = yield withStore(config, reactor, ask)
    failed = []
    for name in asked:
        answer = done.get(name)
        if answer is None:
            why = "gone" if name in gone else f"no answer within {args.wait:g} s"
            print(f"{name}: {why}", file=out)
            failed.append(name)
        elif "error" in answer:
            print(f"{name}: reload failed: {answer['error']}", file=out)
            failed.append(name)
        else:
            print(f"{name}:", file=out)
            _printReload(answer["result"], out, indent="  ")
            if answer["result"]["failed"]:
                failed.append(name)
    if failed:
        raise CommandError(f"reload --cluster: not done on {', '.join(failed)}")


def _pause(config, args, out, reactor):
    kind, name = ("site", args.site) if args.site else ("transport",
                                                       args.transport)
    key = pauseKey(kind, name)

    def change(store):
        if args.command == "pause":
            by = f"{os.environ.get('USER', '?')}@{sockets.gethostname()}"
            d = store.put(key, {"since": reactor.seconds(), "by": by})
            return d.addCallback(lambda _: True)
        return store.remove(key)

    def done(changed):
        if args.command == "pause":
            print(f"{kind} {name} paused on every daemon of the cluster "
                  f"(within {config.cluster.heartbeat:g} s)", file=out)
        elif changed:
            print(f"{kind} {name} resumed", file=out)
        else:
            raise CommandError(f"resume: {kind} {name} was not paused")

    return withStore(config, reactor, change).addCallback(done)


_CLUSTER = {"status": _clusterStatus, "reload": _clusterReload,
            "pause": _pause, "resume": _pause}


def main(argv=None):
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:
        p.commands[args.command].error(
            f"unrecognized arguments: {' '.join(unknown)}")

    def react(reactor):
        d = run(reactor, args)

        def failed(failure):
            if failure.check(snqconfig.ConfigError):
                print(f"snqctl: invalid configuration:\n{failure.value}",
                      file=sys.stderr)
                raise SystemExit(2)
            if failure.check(CommandError):
                print(f"snqctl: {failure.value}", file=sys.stderr)
                raise SystemExit(1)
            return failure

        return d.addErrback(failed)

    task.react(react)


if __name__ == "__main__":
    main()
