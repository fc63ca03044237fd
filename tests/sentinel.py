"""
A Redis primary, its replica and three Sentinels on loopback ports of
their own, for failover tests and benchmarks: started from the installed
C{redis-server}, each in a temporary directory, all killed by C{stop}.
"""

import os
import shutil
import subprocess
import time

import redis

from tests.daemon import freePort

MASTER = "snqtest"


def _server(*args, cwd):
    return subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", *args], cwd=cwd,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


class SentinelSet:
    """
    C{primary} and C{replica} are the data nodes' ports (the roles they
    started with); C{url} is the C{redis+sentinel://} URL of database
    C{db}.  Sentinels declare the primary down after C{downAfter} ms.
    """

    def __init__(self, directory, db=1, downAfter=1000):
        self.directory = directory
        self.db = db
        self.processes = {}
        self.primary, self.replica = freePort(), freePort()
        self.sentinels = [freePort() for _ in range(3)]
        self.downAfter = downAfter
        self.url = (f"redis+sentinel://"
                    f"{','.join(f'127.0.0.1:{p}' for p in self.sentinels)}"
                    f"/{MASTER}/{db}")

    def start(self, timeout=60.0):
        """Start everything; return once the Sentinels agree on the set."""
        data = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        for port, extra in ((self.primary, []),
                            (self.replica, ["--replicaof", "127.0.0.1",
                                            str(self.primary)])):
            cwd = os.path.join(self.directory, f"redis-{port}")
            os.makedirs(cwd)
            self.processes[port] = _server("--port", str(port), *data, *extra,
                                           cwd=cwd)
        for port in self.sentinels:
            cwd = os.path.join(self.directory, f"sentinel-{port}")
            os.makedirs(cwd)
            conf = os.path.join(cwd, "sentinel.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {self.primary} 2\n"
                        f"sentinel down-after-milliseconds {MASTER} "
                        f"{self.downAfter}\n"
                        f"sentinel failover-timeout {MASTER} 10000\n")
            self.processes[port] = _server(conf, "--sentinel", cwd=cwd)
        self.waitUntil(self.agreed, timeout, "the sentinels to agree")

    def client(self, port) -> redis.Redis:
        """A client of a data node (database C{db}) or of a Sentinel."""
        db = 0 if port in self.sentinels else self.db
        return redis.Redis("127.0.0.1", port, db=db, socket_timeout=5)

    def agreed(self):
        """Every Sentinel knows the replica and the two other Sentinels."""
        for port in self.sentinels:
            s = self.client(port)
            try:
                master = s.sentinel_master(MASTER)
            except redis.RedisError:
                return False
            finally:
                s.close()
            if (master["num-other-sentinels"] < 2 or master["num-slaves"] < 1
                    or master["flags"] != "master"):
                return False
        return True

    def currentPrimary(self) -> int | None:
        """The port the Sentinels name as the primary now."""
        for port in self.sentinels:
            s = self.client(port)
            try:
                return int(s.sentinel_get_master_addr_by_name(MASTER)[1])
            except (redis.RedisError, TypeError):
                continue
            finally:
                s.close()
        return None

    def synced(self, timeout=10.0):
        """Wait until the replica has every write the primary acknowledged."""
        c = self.client(self.currentPrimary())
        try:
            return c.execute_command("WAIT", 1, int(timeout * 1000)) >= 1
        finally:
            c.close()

    def kill(self, port):
        p = self.processes.pop(port)
        p.kill()
        p.wait(30)

    def stop(self):
        for port in list(self.processes):
            self.kill(port)

    @staticmethod
    def waitUntil(condition, timeout, what):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for "
                                     f"{what}")
            time.sleep(0.1)
