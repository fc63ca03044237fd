"""
The worker pool on SQLite: drain rate, memory and CPU with 1 and 2 workers
(L{bench.peers}), and the time from C{kill -9} of a worker to its
replacement handling items (L{bench.startup}).

    python -m bench.pool [--items 30000] [--kills 5]
"""

import argparse

from bench import peers, startup

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=30_000)
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    peers.main(["--items", str(args.items)], systems="snq-sqlite:1,snq-sqlite",
               job="noop", rounds=1, probes=0)
    startup.main(["--backends", "snq-sqlite", "--boots", "1",
                  "--kills", str(args.kills)])
