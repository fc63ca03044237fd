"""
A prototype, not part of snq: what starting workers from a pre-imported
template process (a fork server) would save against starting each one as a
fresh C{python -m snq.child}, as the pool does today.

Two stand-in masters run real snq workers (the unmodified C{snq.child.main},
the same config, AMP pipes on fds 3 and 4 whose reports are read and
dropped):

* C{spawn}: a bare Python process that starts each worker as
  C{python -m snq.child}, like L{snq.pool};
* C{fork}: a template that first imports every module a running worker has
  loaded (taken from a real worker's import log), calls C{gc.freeze()} so
  the collector does not write to the shared objects, and then C{fork()}s
  each worker; the child gets a fresh epoll and waker (the template's
  reactor was installed by the imports, never run) and calls
  C{snq.child.main}.

Both restart a worker that dies, at once.  Measured per mode: the PSS of
the template (or bare master) and of each worker after C{--items} items and
a moment idle, the time from spawn/fork to a worker's first item at boot,
and from C{kill -9} of a worker to its replacement's first item.

    python -m bench.forkserver [--backend snq-redis] [--items 20000] [--kills 5]
"""

import argparse
import fcntl
import gc
import importlib
import os
import select
import signal
import statistics
import subprocess
import sys
import time

# Nothing heavy at the top: the spawn mode's master is this module, and it
# should weigh what a bare Python process does.
from bench.common import pssBytes, rssBytes, save, table, tree, waitUntil

MB = 2**20


def freshReactor(placeFds):
    """
    After fork: the template's reactor (installed by the imports, never
    run) with an epoll and a waker of this process's own.  C{placeFds} puts
    the AMP pipes on fds 3 and 4 once the template's epoll is closed, so
    neither can land on the other.
    """
    from twisted.internet import reactor

    reactor._poller.close()
    placeFds()
    reactor._poller = select.epoll(1024)
    reactor._reads.clear()
    reactor._writes.clear()
    reactor._selectables.clear()
    reactor._internalReaders.clear()
    reactor.waker = None
    reactor.installWaker()


def placeOn3And4(toChild, toMaster):
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 20) for fd in (toChild, toMaster)]
    os.dup2(high[0], 3)
    os.dup2(high[1], 4)
    for fd in high:
        os.close(fd)


def serve(mode, config, workers, modulesFile, spawnedFile):
    """The stand-in master: start C{workers}, restart the dead, stop on TERM."""
    if mode == "fork":
        with open(modulesFile) as f:
            for name in f.read().split():
                try:
                    importlib.import_module(name)
                except Exception:  # an optional part of a package: skip it
                    continue
        gc.freeze()
    children = {}
    stopping = []

    def start(wid):
        toChild, fromMaster = os.pipe()
        fromChild, toMaster = os.pipe()
        argv = ["--config", config, "--id", wid]
        began = time.time()
        if mode == "fork":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                    for signum in (signal.SIGTERM, signal.SIGCHLD):
                        signal.signal(signum, signal.SIG_DFL)

                    def placeFds():
                        placeOn3And4(toChild, toMaster)
                        for fd in [toChild, fromMaster, fromChild, toMaster,
                                   *(c[1] for c in children.values()),
                                   *(c[2] for c in children.values())]:
                            if fd > 4:
                                os.close(fd)

                    freshReactor(placeFds)
                    from snq import child

                    code = child.main(argv)
                finally:
                    os._exit(code or 0)
        else:
            pid = subprocess.Popen(
                [sys.executable, "-m", "snq.child", *argv], stdin=subprocess.DEVNULL,
                pass_fds=(toChild, toMaster),
                preexec_fn=lambda: placeOn3And4(toChild, toMaster)).pid
        os.close(toChild)
        os.close(toMaster)
        children[pid] = (wid, fromMaster, fromChild)
        with open(spawnedFile, "a") as f:
            f.write(f"{pid} {began}\n")

    signal.signal(signal.SIGTERM, lambda *a: stopping.append(True))
    for n in range(workers):
        start(f"proto.{n}")
    terminated = False
    while children:
        if stopping and not terminated:
            terminated = True
            for pid in children:
                os.kill(pid, signal.SIGTERM)
        readable = [c[2] for c in children.values()]
        try:
            ready, _, _ = select.select(readable, [], [], 0.005)
        except InterruptedError:
            ready = []
        for fd in ready:
            os.read(fd, 65536)  # reports: read and dropped
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in children:
                wid, fromMaster, fromChild = children.pop(pid)
                os.close(fromMaster)
                os.close(fromChild)
                if not stopping:
                    start(wid)


def workerModules(key):
    """Every module a real worker of C{key} had imported after 200 items."""
    from bench.imports import daemonTrees

    trees = daemonTrees(key)
    worker = next(nodes for title, nodes in trees.items() if title.endswith("worker"))
    return [n.name for n in worker]


def measure(mode, key, modules, items, kills):
    from bench.startup import trickle
    from bench.systems import SYSTEMS

    system = SYSTEMS[key](job="incr")
    spawned = os.path.join(system.dir, "spawned")
    modulesFile = os.path.join(system.dir, "modules")
    with open(modulesFile, "w") as f:
        f.write("\n".join(modules))
    config = system.command()[-1]  # writes the config; the path is last
    system.reset()
    system.enqueue(items)
    seen = {}

    def look():
        now = time.time()
        for pid, n in system.counts().items():
            if n > 0 and pid not in seen:
                seen[pid] = now
        return seen

    def spawnTimes():
        with open(spawned) as f:
            return {int(p): float(t) for p, t in (line.split() for line in f)}

    log = open(os.path.join(system.dir, "processes.log"), "a")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.forkserver", "--serve", mode, "--config",
         config, "--modules-file", modulesFile, "--spawned-file", spawned],
        env=system.env, cwd=system.dir, stdout=log, stderr=subprocess.STDOUT)
    try:
        def drained():
            look()  # each worker's first item noted as it happens
            return ((len(seen) >= 2 and sum(system.counts().values()) >= items)
                    or process.poll() is not None)

        waitUntil(drained, 300, f"{mode}: drain")
        boots = [seen[p] - t for p, t in spawnTimes().items() if p in seen]
        time.sleep(2)
        pids = tree(process.pid)
        memory = {"template PSS MB": pssBytes(pids[0]) / MB,
                  "template RSS MB": rssBytes(pids[0]) / MB,
                  "worker PSS MB": [pssBytes(p) / MB for p in pids[1:]],
                  "worker RSS MB": [rssBytes(p) / MB for p in pids[1:]]}
        respawns = []
        with trickle(system):
            for _ in range(kills):
                time.sleep(0.5)
                known = set(look())
                victim = next(p for p in tree(process.pid)[1:] if p in known)
                killed = time.time()
                os.kill(victim, signal.SIGKILL)
                waitUntil(lambda known=known: set(look()) - known, 30,
                          f"{mode}: a replacement for {victim}")
                respawns.append(min(seen[p] for p in set(seen) - known) - killed)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        log.close()
        system.close()
    return {"boot s": boots, "kill -9 to replacement s": respawns, **memory}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="snq-redis",
                        help="snq-redis, snq-stomp or snq-sqlite")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--serve", choices=("spawn", "fork"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--modules-file", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.config, 2, args.modules_file, args.spawned_file)
        return
    print("reading a real worker's imports ...", file=sys.stderr)
    modules = workerModules(args.backend)
    results, rows = {}, []
    for mode in ("spawn", "fork"):
        print(f"{mode} ...", file=sys.stderr)
        r = results[mode] = measure(mode, args.backend, modules, args.items, args.kills)
        rows.append({
            "mode": mode,
            "master/template PSS MB": r["template PSS MB"],
            "worker PSS MB": statistics.mean(r["worker PSS MB"]),
            "worker RSS MB": statistics.mean(r["worker RSS MB"]),
            "tree PSS MB": r["template PSS MB"] + sum(r["worker PSS MB"]),
            "boot to item s": statistics.median(r["boot s"]) if r["boot s"] else None,
            "respawn s": statistics.median(r["kill -9 to replacement s"])
            if r["kill -9 to replacement s"] else None})
    print(f"\n{args.backend}, 2 workers, {args.items:,} incr items, then "
          f"{args.kills} kills; {len(modules)} modules pre-imported in the "
          "template; medians\n")
    table(rows, ["mode", "master/template PSS MB", "worker PSS MB", "worker RSS MB",
                 "tree PSS MB", "boot to item s", "respawn s"])
    save("forkserver", {"args": vars(args), "modules": len(modules),
                        "results": results})


if __name__ == "__main__":
    main()
