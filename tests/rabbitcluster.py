"""
A RabbitMQ cluster of its own for failover tests: three nodes of the
installed RabbitMQ (C{snqtestN-XXXX@localhost}) on loopback ports of their
own (AMQP, STOMP, Erlang distribution), each with its config, data, logs
and plugins in one temporary directory and sharing an Erlang cookie there,
run as the user the system broker runs as.  Nodes 2 and 3 join node 1
(C{rabbitmqctl stop_app; join_cluster; start_app}).  C{stop} stops and
kills every node and removes the directory; the system broker
(C{rabbit@localhost}, 5672/61613) is left alone.

Three nodes because a quorum queue needs a majority of its replicas up to
go on after one node stops.
"""

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from tests.daemon import freePort

RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"
#: The user the system broker runs as (Debian's package makes it).
USER = "rabbitmq"


class Node:
    """One node: its name, ports, files and (once started) process."""

    def __init__(self, directory, name):
        self.name = name
        self.amqp, self.stomp, self.dist = freePort(), freePort(), freePort()
        self.directory = os.path.join(directory, name.partition("@")[0])
        self.process = None

    @property
    def url(self) -> str:
        """Its STOMP listener, as [stomp] servers takes it."""
        return f"tcp://127.0.0.1:{self.stomp}"

    def environment(self, home) -> dict:
        d = self.directory
        return {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp),
            "RABBITMQ_DIST_PORT": str(self.dist),
            # Not /etc/rabbitmq's files: those set the system broker's ports.
            "RABBITMQ_CONFIG_FILE": os.path.join(d, "conf.d", "10-snq.conf"),
            "RABBITMQ_CONFIG_FILES": os.path.join(d, "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(d, "advanced.config"),
            "RABBITMQ_MNESIA_BASE": os.path.join(d, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(d, "log"),
            "RABBITMQ_PID_FILE": os.path.join(d, "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(home, "enabled_plugins"),
        }

    def writeConfig(self):
        os.makedirs(os.path.join(self.directory, "conf.d"))
        with open(os.path.join(self.directory, "conf.d", "10-snq.conf"), "w") as f:
            f.write(f"listeners.tcp.default = 127.0.0.1:{self.amqp}\n"
                    f"stomp.listeners.tcp.default = 127.0.0.1:{self.stomp}\n")


class RabbitCluster:
    """
    C{nodes}: the L{Node}s, node 1 first; C{urls}: their STOMP listeners.
    C{bootSeconds}: how long C{start} took (boot and joins).
    """

    def __init__(self, size=3):
        self.token = secrets.token_hex(2)
        self.directory = tempfile.mkdtemp(prefix="snq-rabbitcluster-")
        self.nodes = [Node(self.directory, f"snqtest{n}-{self.token}@localhost")
                      for n in range(1, size + 1)]
        self.urls = [node.url for node in self.nodes]
        self.bootSeconds = None

    def _asUser(self, command: list) -> list:
        """C{command} run as L{USER}, with this cluster's HOME (the cookie)."""
        env = ["env", f"HOME={self.directory}",
               f"RABBITMQ_CONF_ENV_FILE={self.directory}/rabbitmq-env.conf"]
        if os.geteuid() == 0:
            return ["runuser", "-u", USER, "--", *env, *command]
        return [*env, *command]

    def start(self, timeout=120.0):
        """Boot every node at once, then join nodes 2 and 3 to node 1."""
        began = time.monotonic()
        try:
            user = pwd.getpwnam(USER)
        except KeyError:
            raise AssertionError(f"no user {USER!r}: is rabbitmq-server installed?")
        with open(os.path.join(self.directory, ".erlang.cookie"), "w") as f:
            f.write(secrets.token_hex(16).upper())
        os.chmod(os.path.join(self.directory, ".erlang.cookie"), 0o400)
        with open(os.path.join(self.directory, "enabled_plugins"), "w") as f:
            f.write("[rabbitmq_stomp].\n")
        with open(os.path.join(self.directory, "rabbitmq-env.conf"), "w") as f:
            # epmd is the system broker's (one per host); only on loopback.
            f.write("ERL_EPMD_ADDRESS=127.0.0.1\n"
                    'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n')
        for node in self.nodes:
            node.writeConfig()
        for root, _, files in os.walk(self.directory):
            for name in [root, *(os.path.join(root, f) for f in files)]:
                os.chown(name, user.pw_uid, user.pw_gid)
        os.chmod(self.directory, 0o755)
        for node in self.nodes:
            log = open(os.path.join(node.directory, "console.log"), "wb")  # noqa: SIM115
            with log:
                node.process = subprocess.Popen(
                    self._asUser([*self._env(node),
                                  f"{RABBITMQ_BIN}/rabbitmq-server"]),
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=node.directory, start_new_session=True)
        deadline = time.monotonic() + timeout
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: self._awaitStartup(n, deadline), self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        running = self.ctl(first, "eval", "length(rabbit_nodes:all_running()).")
        if running.strip() != str(len(self.nodes)):
            raise AssertionError(f"{running.strip()} of {len(self.nodes)} nodes "
                                 f"running in the cluster:\n{self.logs()}")
        self.bootSeconds = time.monotonic() - began

    def _awaitStartup(self, node, deadline):
        """
        C{await_startup} gives up on a node not registered with epmd yet:
        first wait for its distribution port.
        """
        while True:
            if node.process.poll() is not None:
                raise AssertionError(f"{node.name} exited at boot:\n{self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", node.dist), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{node.name}: no distribution port "
                                         f"after boot timeout:\n{self.logs()}")
                time.sleep(0.2)
        left = max(deadline - time.monotonic(), 1)
        self.ctl(node, "await_startup", "--timeout", str(int(left)),
                 timeout=left + 30)

    @staticmethod
    def _env(node) -> list:
        return [f"{k}={v}" for k, v in node.environment(
            os.path.dirname(node.directory)).items()]

    def ctl(self, node, *args, timeout=90.0) -> str:
        """C{rabbitmqctl -n NODE ARGS}: its output, or AssertionError."""
        result = subprocess.run(
            self._asUser([f"{RABBITMQ_BIN}/rabbitmqctl", "-n", node.name, *args]),
            capture_output=True, text=True, timeout=timeout,
            cwd=self.directory)
        if result.returncode:
            raise AssertionError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} failed: "
                f"{result.stderr or result.stdout}\n{self.logs()}")
        return result.stdout

    def queues(self, node, *fields) -> list[list[str]]:
        """C{list_queues} on C{node}: a row of C{fields} per queue."""
        out = self.ctl(node, "list_queues", "-q", "--no-table-headers", *fields)
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def stopNode(self, node, timeout=60.0):
        """Stop C{node} (its Erlang VM too) and wait until its process is gone."""
        self.ctl(node, "stop", timeout=timeout)
        node.process.wait(timeout)

    def logs(self) -> str:
        """The last lines of each node's console output, for a failure."""
        out = []
        for node in self.nodes:
            path = os.path.join(node.directory, "console.log")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    tail = f.read()[-2000:].decode("utf-8", "replace")
                out.append(f"--- {node.name}:\n{tail}")
        return "\n".join(out)

    def stop(self, timeout=30.0):
        """
        Stop every node still running (SIGTERM: the VM stops cleanly; killed
        if it will not), then remove everything.
        """
        try:
            running = [n for n in self.nodes
                       if n.process is not None and n.process.poll() is None]
            for node in running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for node in running:
                try:
                    node.process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.process.pid, signal.SIGKILL)
                    node.process.wait(30)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
