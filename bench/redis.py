"""
Redis: snq (1 and 2 workers) against Dramatiq and Celery on the same Redis,
each in a database of its own, each with a no-op job and its at-least-once
settings; L{bench.peers} with these systems.

    pip install -e '.[bench]'
    python -m bench.redis [--items 20000] [--probes 200] [--rounds 1]
"""

from bench import peers

if __name__ == "__main__":
    peers.main(systems="snq-redis:1,snq-redis,dramatiq-redis,celery", job="noop",
               rounds=1)
