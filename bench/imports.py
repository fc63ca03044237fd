"""
Where a worker's and the master's start-up goes: every import of a real
C{twistd -n snq} (master and first worker, C{PYTHONPROFILEIMPORTTIME}) from
start to 200 items handled, lazy imports included, per backend; or
C{-X importtime} of modules in a fresh interpreter.  Printed: the time per
top-level package, and for each heavy package the chain of imports that
first pulled it in.

    python -m bench.imports [--backends snq-redis,...]
    python -m bench.imports --import snq.child [--import snq.tap,snq.pool]

The chains answer "who imports TLS in a worker that uses none": the first
line under each package is the module that needed it, then its importer,
up to the module named on the command line.
"""

import argparse
import os
import re
import subprocess
import sys
import time

from bench.common import table, waitUntil
from bench.systems import SNQ

#: Packages worth knowing the way in of (a worker needs few of them).
HEAVY = ["twisted.internet.ssl", "OpenSSL", "cryptography", "service_identity",
         "ssl", "treq", "twisted.web", "wokkel", "prometheus_client", "psycopg",
         "pymysql", "txredisapi", "stompest", "twisted.internet.reactor",
         "twisted.protocols.amp", "asyncio", "email", "http.client", "sqlite3",
         "twisted.enterprise.adbapi", "twisted.conch", "hyperlink", "idna",
         "redis"]

class Node:
    def __init__(self, name, own, cumulative, depth):
        self.name, self.own, self.cumulative, self.depth = (
            name, own, cumulative, depth)
        self.parent = None


def parse(lines):
    """The import tree in C{-X importtime} output lines."""
    nodes, pending = [], {}
    for line in lines:
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        node = Node(name.strip(), int(own), int(cumulative), depth)
        # importtime prints children before their parent.
        for child in pending.pop(depth + 1, []):
            child.parent = node
        pending.setdefault(depth, []).append(node)
        nodes.append(node)
    return nodes


def statementTree(statement):
    """The import tree of running C{statement} in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", statement],
                            capture_output=True, text=True, check=True)
    return parse(result.stderr.splitlines())


def daemonTrees(key, items=200):
    """
    Every import of a real daemon's master and of its first worker, from
    start to C{items} handled: lazy imports included.
    """
    from bench.systems import SYSTEMS

    system = SYSTEMS[key](job="incr")
    try:
        system.reset()
        system.enqueue(items)
        system.env["PYTHONPROFILEIMPORTTIME"] = "1"
        system.start()
        waitUntil(lambda: system.handled() >= items, 60, f"{system.label}")
        time.sleep(1.5)
        system.stop()
        with open(os.path.join(system.dir, "processes.log")) as f:
            lines = f.read().splitlines()
    finally:
        system.close()
    # The master's own lines start with "import time:"; a worker's stderr
    # comes relogged by the master, tagged "[ID.N:PID#error] import time: …".
    master = [line for line in lines if line.startswith("import time:")]
    tag = re.compile(r"^\S+ \[[^\]]*\.0:\d+#error\] (import time:.*)$")
    worker = [m.group(1) for m in map(tag.match, lines) if m]
    return {f"{system.label}: master": parse(master),
            f"{system.label}: worker": parse(worker)}


def chain(node):
    names = []
    while node is not None:
        names.append(node.name)
        node = node.parent
    return " <- ".join(names)


def report(title, nodes, top=15):
    roots = [n for n in nodes if n.parent is None]
    total = sum(n.cumulative for n in roots) / 1000
    print(f"\n== {title}: {len(nodes)} modules, {total:.0f} ms "
          "(importtime's own figures; unprofiled imports are faster)\n")
    byTop = {}
    for n in nodes:
        top_ = n.name.split(".")[0]
        byTop[top_] = byTop.get(top_, 0) + n.own
    table([{"package": k, "own ms": v / 1000, "share": f"{v / 10 / total:.0f}%"}
           for k, v in sorted(byTop.items(), key=lambda kv: -kv[1])[:top]],
          ["package", "own ms", "share"])
    print()
    rows = []
    for name in HEAVY:
        found = next((n for n in nodes if n.name == name), None)
        if found is not None:
            own = sum(n.own for n in nodes
                      if n.name == name or n.name.startswith(name + "."))
            rows.append({"module": name, "own ms": own / 1000,
                         "first imported by": chain(found.parent)})
    table(rows, ["module", "own ms", "first imported by"])
    return nodes


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(SNQ))
    parser.add_argument("--import", dest="modules", action="append", default=[],
                        help="MODULE[,MODULE…] in a fresh interpreter instead")
    args = parser.parse_args(argv)
    trees = {}
    if args.modules:
        for modules in args.modules:
            trees[f"import {modules}"] = statementTree(f"import {modules}")
    else:
        for key in args.backends.split(","):
            trees.update(daemonTrees(key))
    for title, nodes in trees.items():
        report(title, nodes)


if __name__ == "__main__":
    main()
