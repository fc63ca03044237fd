"""
Redis on the wire: addresses and TLS, connections kept up with backoff,
the doorbells that wake an idle worker, and the Lua scripts.  The queue
built on them is L{snq.queues.redis}.
"""
