# -*- test-case-name: tests.test_failover_redis -*-
"""
A producer behind Redis Sentinels: each new connection asks them in turn
where the primary is (the question and its answer are the daemon's,
L{snq.redis.address}) and checks with C{ROLE} that it reached one, so a
connection made after a failover goes to the promoted replica.
"""

from __future__ import annotations

from snq.client.resp import RespConnection, command
from snq.client.wire import Wire
from snq.redis.address import RedisAddress, masterQuery, primaryFromReply


def findPrimary(address: RedisAddress, timeout: float, name: str) -> RedisAddress:
    """The primary the first Sentinel that knows C{address.master} names."""
    problems = []
    for host, port in address.sentinels:
        try:
            conn = RespConnection(Wire(host, port, timeout), RedisAddress(host, port),
                                  name)
        except OSError as e:
            problems.append(f"{host}:{port}: {e}")
            continue
        try:
            primary = primaryFromReply(address, conn.execute(
                command(*masterQuery(address))))
        except OSError as e:
            problems.append(f"{host}:{port}: {e}")
            continue
        finally:
            conn.close()
        if primary is not None:
            return primary
        problems.append(f"{host}:{port} does not know {address.master}")
    raise ConnectionError(f"no sentinel names the primary: {'; '.join(problems)}")


def checkPrimary(conn: RespConnection, primary: RedisAddress):
    """A Sentinel may still name a primary that was just demoted."""
    role = conn.execute(command("ROLE"))[0]
    if role != b"master":
        conn.close()
        raise ConnectionError(f"{primary.host}:{primary.port} is a "
                              f"{role.decode()}, not the primary (a failover "
                              "under way)")
