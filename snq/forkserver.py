# -*- test-case-name: tests.test_forkserver -*-
"""
How the pool starts a worker: a fresh C{python -m snq.child}
(L{ExecSpawner}), or a fork of a template process that has already
imported what a worker of the config imports (L{ForkSpawner}): the
imported pages stay shared between the workers (copy-on-write, with the
collector's objects frozen), and a replacement handles items without
paying for the imports again.

The template (C{python -m snq.forkserver}, a child of the master) reads
the config on stdin, loads what a worker would (L{snq.child.check}), says
C{ready} on stdout and then serves requests on fd 3, a UNIX socket: each
brings a worker's arguments and the descriptors of its pipes (0, 1, 2, 3,
4 and the journal's 5, as L{snq.pool} made them), and is answered with the
new worker's pid.  The template reports each worker's end on stdout
(C{exit PID STATUS}, the raw wait status), which ends the master's
L{ForkedProcess} as a reaped child would.  A worker's pipes are the
master's own, so a worker whose master dies sees them close and stops, as
a spawned one does; one whose template dies is killed (Linux's parent
death signal), and the master, seeing the template gone, ends them all.
The template exits once its socket closes and its workers are gone.
"""

import contextlib
import ctypes
import fcntl
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback

TEMPLATE_FD = 3
#: A request carries at most this many descriptors.
MAX_FDS = 16
PR_SET_PDEATHSIG = 1
#: [queue] backend → the module of its queue.
BACKENDS = {"db": "snq.queues.db", "redis": "snq.queues.redis",
            "stomp": "snq.queues.stomp"}


def serve(sock, out) -> int:
    """The template's loop: fork on request, report ends; → its exit status."""
    children = set()
    wakeR, wakeW = os.pipe()
    for fd in (wakeR, wakeW):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wakeW)
    # Woken by SIGCHLD; TERM and Ctrl-C's INT are for the master and the
    # workers, which stop gracefully: the template goes with the last one.
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *a: None)
    open_ = True
    while open_ or children:
        readable = [wakeR, sock] if open_ else [wakeR]
        try:
            ready, _, _ = select.select(readable, [], [], 1.0)
        except InterruptedError:
            ready = []
        if wakeR in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeR, 512)
        if sock in ready:
            try:
                message, fds, _, _ = socket.recv_fds(sock, 65536, MAX_FDS)
            except OSError:
                message, fds = b"", []
            if not message:
                open_ = False  # the master has gone, or retired this template
            else:
                request = json.loads(message)
                answer = {"id": request["id"]}
                try:
                    pid = _fork(request, fds, sock, (wakeR, wakeW))
                except Exception as e:
                    answer["error"] = f"{type(e).__name__}: {e}"
                else:
                    children.add(pid)
                    answer["pid"] = pid
                finally:
                    for fd in fds:
                        os.close(fd)
                try:
                    sock.send(json.dumps(answer).encode())
                except OSError:
                    open_ = False
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            out.write(f"exit {pid} {status}\n")
            out.flush()
    return 0


def _fork(request, fds, sock, wake) -> int:
    if not fds or len(fds) != len(request["fds"]):
        raise ValueError(f"{len(fds)} descriptors for {request['fds']}")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _dieWithParent()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        sock.close()
        for fd in wake:
            os.close(fd)
        reactor = sys.modules.get("twisted.internet.reactor")
        if reactor is not None:
            _dropDescriptors(reactor)
        _place(dict(zip(request["fds"], fds, strict=True)))
        if reactor is not None:
            _newDescriptors(reactor)
        from snq import child

        sys.argv = ["snq.child", *request["args"]]
        code = child.main(request["args"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code or 0)


def _place(fdmap: dict[int, int]):
    """Put each received descriptor on its number in the worker, close the rest."""
    top = max(fdmap) + 1
    moved = {target: fcntl.fcntl(fd, fcntl.F_DUPFD, top + MAX_FDS)
             for target, fd in fdmap.items()}
    for target, fd in moved.items():
        os.dup2(fd, target)
    os.closerange(top, os.sysconf("SC_OPEN_MAX"))


def _dropDescriptors(reactor):
    """
    An import installed the global reactor in the template (txredisapi
    does, and handlers that import it at their top); it never ran there.
    Its epoll and waker are the template's: closed here, in the worker.
    """
    reactor._poller.close()
    reactor.waker.connectionLost(None)


def _newDescriptors(reactor):
    """The worker's own epoll and waker, once its descriptors are placed."""
    reactor._poller = select.epoll(1024)
    reactor._reads.clear()
    reactor._writes.clear()
    reactor._selectables.clear()
    reactor._internalReaders.clear()
    reactor.waker = None
    reactor.installWaker()


def _dieWithParent():
    """Linux: killed when the template dies (its master then ends it too)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def prepare(text: bytes, source: str) -> list[str]:
    """
    Import what a worker of this config imports (L{snq.child.check}, under
    the reactor's TLS rule of L{snq.lean}) without installing the reactor,
    which each worker does after the fork (if an import installs it, each
    worker gets descriptors of its own for it).  → problems, if any.
    """
    from snq import config as snqconfig
    from snq.lean import needsStartTLS, withoutTLS

    installed = "twisted.internet.reactor" in sys.modules
    try:
        config = snqconfig.parseText(text, source)
        guard = (contextlib.nullcontext() if needsStartTLS(config, "all")
                 else withoutTLS())
        with guard:
            from twisted.internet import default, epollreactor  # noqa: F401

            from snq import child
        # The backend's module (its queue is each worker's own), outside
        # the guard: txredisapi imports TLS as it loads.
        importlib.import_module(BACKENDS[config.queue.backend])
        problems = child.check(text, source, queue=False)
    except Exception as e:
        return [f"{source}: {type(e).__name__}: {e}"]
    if not installed and "twisted.internet.reactor" in sys.modules:
        from twisted.internet import epollreactor, reactor

        # Only this one's descriptors are known well enough to renew.
        if type(reactor) is not epollreactor.EPollReactor or reactor.running:
            problems.append(f"{source}: an import installed the "
                            f"{type(reactor).__name__}; workers are spawned")
    return problems


def main(argv=None) -> int:
    """C{python -m snq.forkserver --config PATH}: the config's text on stdin."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m snq.forkserver")
    parser.add_argument("--config", default="<stdin>")
    args = parser.parse_args(argv)
    text = sys.stdin.buffer.read()
    problems = prepare(text, args.config)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print("failed", flush=True)
        return 1
    gc.collect()
    gc.freeze()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sock = socket.socket(fileno=TEMPLATE_FD)
    print("ready", flush=True)
    return serve(sock, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
