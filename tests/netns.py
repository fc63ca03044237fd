"""
Hosts in network namespaces, for tests and benchmarks of several daemons
sharing a broker: one namespace per "host", each joined by a veth pair to
a bridge in the root namespace, on a private /24 of the run's own
(10.77.X.0/24).  The brokers, which listen on loopback, are reached at the
bridge's address (10.77.X.1) through socat forwarders.  A host's link can
be cut (its veth down) and its processes frozen and killed, as a machine
that drops off the network.

Everything made is removed by L{Network.close} (a test adds it as a
cleanup), and L{sweep} removes what a killed run left (namespaces named
C{snqtest-PID-*}, links named C{snqtPID*}, whose PID is gone).  Needs
root; L{unavailable} says why when the kernel refuses namespaces.
"""

import contextlib
import os
import re
import signal
import subprocess
import time

from tests.daemon import freePort

#: Names of everything made here start with these.
NAMESPACE_PREFIX = "snqtest-"
LINK_PREFIX = "snqt"


def ip(*args, check=True, namespace=None):
    command = ["ip", *args] if namespace is None else [
        "ip", "netns", "exec", namespace, "ip", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise OSError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    probe = f"{NAMESPACE_PREFIX}probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    except OSError as e:
        return f"the kernel refuses network namespaces here ({e})"
    ip("netns", "delete", probe, check=False)
    return None


def namespacePids(namespace: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                         text=True, timeout=30).stdout
    return [int(p) for p in out.split()]


def killNamespace(namespace: str, sig=signal.SIGKILL):
    """Signal every process in C{namespace} (what this harness started)."""
    for pid in namespacePids(namespace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stale(name: str, prefix: str) -> bool:
    """Made here by a process that is gone (its pid follows the prefix)?"""
    match = re.match(re.escape(prefix) + r"(\d+)", name)
    if not match:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def sweep():
    """
    Remove the namespaces and links a killed run left behind: those whose
    maker is gone, never those of a run still going.
    """
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if _stale(name, NAMESPACE_PREFIX):
            killNamespace(name)
            ip("netns", "delete", name, check=False)
    for line in ip("-o", "link", "show", check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if _stale(name, LINK_PREFIX):
            ip("link", "delete", name, check=False)


def _freeSubnet() -> int:
    """An X of 10.77.X.0/24 that no interface of this machine uses."""
    used = ip("-o", "-4", "addr", "show", check=False)
    start = os.getpid() % 250
    for n in range(250):
        x = (start + n) % 250 + 1
        if f" 10.77.{x}." not in used:
            return x
    raise OSError("no free 10.77.X.0/24 subnet")


class Host:
    """One namespace: C{address} on the subnet, C{run} a command in it."""

    def __init__(self, network, index):
        self.network = network
        self.index = index
        self.namespace = f"{NAMESPACE_PREFIX}{network.tag}-h{index}"
        self.link = f"{LINK_PREFIX}{network.tag}h{index}"
        self.address = f"{network.subnet}.{10 + index}"
        self.cut = False

    def make(self):
        ip("netns", "add", self.namespace)
        ip("link", "add", self.link, "type", "veth", "peer", "name", "eth0",
           "netns", self.namespace)
        ip("link", "set", self.link, "master", self.network.bridge, "up")
        ip("addr", "add", f"{self.address}/24", "dev", "eth0",
           namespace=self.namespace)
        ip("link", "set", "eth0", "up", namespace=self.namespace)
        ip("link", "set", "lo", "up", namespace=self.namespace)

    def command(self, *args) -> list[str]:
        """C{args} to run in this host's namespace (C{ip netns exec} execs)."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def pids(self) -> list[int]:
        return namespacePids(self.namespace)

    def freeze(self):
        killNamespace(self.namespace, signal.SIGSTOP)

    def thaw(self):
        killNamespace(self.namespace, signal.SIGCONT)

    def cutOff(self):
        """The link goes down and every process freezes (SIGSTOP)."""
        ip("link", "set", self.link, "down")
        self.cut = True
        self.freeze()

    def kill(self):
        killNamespace(self.namespace, signal.SIGKILL)

    def remove(self):
        self.kill()
        ip("link", "delete", self.link, check=False)
        ip("netns", "delete", self.namespace, check=False)


class Network:
    """
    C{hosts} namespaces on 10.77.X.0/24 with the bridge at C{gateway};
    L{forward} makes a loopback service reachable there.
    """

    def __init__(self, hosts=3):
        self.tag = str(os.getpid())
        self.bridge = f"{LINK_PREFIX}{self.tag}br"
        self.subnet = f"10.77.{_freeSubnet()}"
        self.gateway = f"{self.subnet}.1"
        self.hosts = [Host(self, i) for i in range(1, hosts + 1)]
        self.forwarders: list[subprocess.Popen] = []

    def make(self):
        sweep()
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            host.make()
        return self

    def forward(self, port: int) -> int:
        """
        A socat on C{gateway} passing connections to 127.0.0.1:C{port};
        → the port it listens on.
        """
        listen = freePort()
        self.forwarders.append(subprocess.Popen(
            ["socat", f"TCP-LISTEN:{listen},bind={self.gateway},fork,reuseaddr,"
             "backlog=512", f"TCP:127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        deadline = time.monotonic() + 10
        while f"{self.gateway}:{listen} " not in subprocess.run(
                ["ss", "-Hltn"], capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                raise OSError(f"socat did not listen on {self.gateway}:{listen}")
            time.sleep(0.05)
        return listen

    def close(self):
        for host in self.hosts:
            host.remove()
        for forwarder in self.forwarders:
            # Its forked children (one per connection) are in its group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(forwarder.pid, signal.SIGKILL)
            forwarder.wait(30)
        self.forwarders = []
        ip("link", "delete", self.bridge, check=False)
