"""
A PostgreSQL primary and its streaming standby of the test's own: two
clusters in a temporary directory, on loopback ports, run with the Debian
binaries (C{/usr/lib/postgresql/*/bin}), as the C{postgres} user when the
test runs as root; for failover tests and benchmarks.  C{stop} removes everything.
"""

import getpass
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import psycopg

from tests.daemon import freePort

SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockets}'
fsync = off
full_page_writes = off
max_connections = 100
wal_level = replica
hot_standby = on
"""


def binary(name):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise AssertionError(f"no {name} in /usr/lib/postgresql/*/bin: "
                             "install postgresql")
    return found[-1]


class PostgresPair:
    """
    C{primary} and C{standby}: the ports of the two servers (the roles they
    start with); C{url}: a multi-host URL that picks the one accepting
    writes.
    """

    def __init__(self):
        # initdb refuses root: as root, the servers run as postgres.
        self.asRoot = os.geteuid() == 0
        self.user = "postgres" if self.asRoot else getpass.getuser()
        self.directory = tempfile.mkdtemp(prefix="snqtest-pg-")
        account = pwd.getpwnam(self.user)
        os.chown(self.directory, account.pw_uid, account.pw_gid)
        self.primary, self.standby = freePort(), freePort()
        self.running = set()
        self.url = (f"postgresql://{self.user}@127.0.0.1:{self.primary},"
                    f"127.0.0.1:{self.standby}/postgres"
                    "?target_session_attrs=read-write&connect_timeout=3")

    def data(self, port):
        return os.path.join(self.directory, str(port))

    def run(self, *args):
        runAs = ["runuser", "-u", self.user, "--"] if self.asRoot else []
        result = subprocess.run(
            [*runAs, *args], capture_output=True,
            text=True, timeout=120, cwd=self.directory)
        if result.returncode:
            raise AssertionError(f"{' '.join(args)} failed: {result.stdout}"
                                 f"{result.stderr}")
        return result.stdout

    def configure(self, port):
        with open(os.path.join(self.data(port), "postgresql.conf"), "a") as f:
            f.write(SETTINGS.format(port=port, sockets=self.directory))

    def pgctl(self, port, *args):
        return self.run(binary("pg_ctl"), "-D", self.data(port), "-l",
                        os.path.join(self.directory, f"{port}.log"), *args)

    def start(self):
        self.run(binary("initdb"), "-D", self.data(self.primary), "-U", self.user,
                 "--auth=trust", "--no-sync")
        self.configure(self.primary)
        self.pgctl(self.primary, "start", "-w")
        self.running.add(self.primary)
        self.run(binary("pg_basebackup"), "-h", "127.0.0.1", "-p",
                 str(self.primary), "-U", self.user, "-D", self.data(self.standby),
                 "-R", "-X", "stream", "--no-sync")
        self.configure(self.standby)
        self.pgctl(self.standby, "start", "-w")
        self.running.add(self.standby)

    def connect(self, port):
        return psycopg.connect(host="127.0.0.1", port=port, user=self.user,
                               dbname="postgres", autocommit=True,
                               connect_timeout=5)

    def replayed(self) -> bool:
        """Has the standby replayed everything the primary has written?"""
        with self.connect(self.primary) as conn:
            [(lag,)] = conn.execute(
                "SELECT coalesce(bool_and(replay_lsn >= pg_current_wal_lsn()),"
                " false) FROM pg_stat_replication").fetchall()
        return lag

    def waitReplayed(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not self.replayed():
            if time.monotonic() > deadline:
                raise AssertionError("the standby did not catch up in "
                                     f"{timeout} s")
            time.sleep(0.1)

    def stopPrimary(self):
        """The primary goes away at once, as a crashed server would."""
        self.pgctl(self.primary, "stop", "-m", "immediate", "-w")
        self.running.discard(self.primary)

    def promote(self):
        self.pgctl(self.standby, "promote", "-w")

    def stop(self):
        for port in list(self.running):
            self.pgctl(port, "stop", "-m", "immediate", "-w")
            self.running.discard(port)
        shutil.rmtree(self.directory, ignore_errors=True)
