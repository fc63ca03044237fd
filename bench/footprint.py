"""
What each layer of a worker costs in memory: idle Python processes that
import one more thing each, from a bare interpreter to everything a worker
imports, with and without the TLS stack (pyOpenSSL, cryptography,
service_identity), which no worker without an C{ssl://}/C{rediss://} server
uses but C{twisted.protocols.amp} and C{twisted.web.client} import.

"Without TLS" blocks C{OpenSSL} the way a missing optional dependency
would (C{sys.modules["OpenSSL"] = None}): Twisted then leaves TLS out, as
it is written to.  Not for Redis: txredisapi imports
C{twisted.internet.ssl} unconditionally.  Two copies of each run at once,
as two workers would, so PSS shares their common pages between them.

    python -m bench.footprint
"""

import subprocess
import sys
import time

from bench.common import ROOT, privateBytes, pssBytes, rssBytes, save, table

MB = 2**20
NO_TLS = "import sys; sys.modules['OpenSSL'] = None\n"
HANDLERS = ("from snq.handlers import HandlerRegistry\n"
            "HandlerRegistry.load({})\n")
MASTER = ("from twisted.internet import reactor\n"
          "import twisted.scripts.twistd, snq.tap, snq.pool, snq.control, snq.reload\n")

LAYERS = [
    ("bare python", ""),
    ("+ twisted reactor", "from twisted.internet import reactor\n"),
    ("+ twisted.protocols.amp", "from twisted.internet import reactor\n"
     "import twisted.protocols.amp\n"),
    ("  the same, without TLS", NO_TLS + "from twisted.internet import reactor\n"
     "import twisted.protocols.amp\n"),
    ("import snq.child", "import snq.child\n"),
    ("  the same, without TLS", NO_TLS + "import snq.child\n"),
    ("snq.child + Redis backend + handlers", "import snq.child, snq.queues.redis\n"
     + HANDLERS),
    ("snq.child + STOMP backend + handlers", "import snq.child, snq.queues.stomp\n"
     + HANDLERS),
    ("  the same, without TLS", NO_TLS + "import snq.child, snq.queues.stomp\n"
     + HANDLERS),
    ("snq.child + SQL backend + handlers", "import snq.child, snq.queues.db\n"
     + HANDLERS),
    ("  the same, without TLS", NO_TLS + "import snq.child, snq.queues.db\n"
     + HANDLERS),
    ("  + redis-py (the incr job)", "import snq.child, snq.queues.db, redis\n"
     + HANDLERS),
    ("master: twistd, snq.tap, pool, control", MASTER),
    ("  + monitor (web, prometheus_client)", MASTER + "import snq.monitor.service\n"),
    ("  + handlers loaded (as makeService does)", MASTER
     + "import snq.monitor.service\n" + HANDLERS),
    ("  the same, without TLS", NO_TLS + MASTER + "import snq.monitor.service\n"
     + HANDLERS),
]


def measure(code, copies=2):
    """RSS, PSS, private bytes of C{copies} idle processes running C{code}."""
    script = code + "import sys, time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    processes = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
                 for _ in range(copies)]
    try:
        for p in processes:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        pids = [p.pid for p in processes]
        return (max(rssBytes(p) for p in pids), max(pssBytes(p) for p in pids),
                max(privateBytes(p) for p in pids))
    finally:
        for p in processes:
            p.kill()
            p.wait()


def startup(code, runs=5):
    """Fastest of C{runs}: seconds to start Python, run C{code} and exit; modules."""
    best, modules = float("inf"), 0
    for _ in range(runs):
        began = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code + "import sys\n"
                              "print(len(sys.modules))"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        best = min(best, time.perf_counter() - began)
        modules = int(out)
    return best, modules


def main():
    rows = []
    for name, code in LAYERS:
        rss, pss, private = measure(code)
        seconds, modules = startup(code)
        rows.append({"process": name, "modules": modules, "start s": seconds,
                     "RSS MB": rss / MB, "PSS MB": pss / MB,
                     "private MB": private / MB})
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"\nidle processes, two of each at once; start s = fastest of 5 "
          f"(load average {load})\n")
    table(rows, ["process", "modules", "start s", "RSS MB", "PSS MB", "private MB"])
    save("footprint", {"rows": rows})


if __name__ == "__main__":
    main()
