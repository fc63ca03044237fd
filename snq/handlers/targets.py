# -*- test-case-name: tests.test_webhook -*-
"""
Where the C{webhook} handler may post, per site: the target policy.

Anyone who can enqueue chooses an item's payload, so a payload's C{url} is
not trusted: by default it must be the site's own C{webhook_url}, or its
host must be one of C{webhook_allow} (host names, C{*.example.org}, IP
addresses or CIDR ranges).  Whatever the name, the addresses it resolves
to are checked too: loopback, private, link-local, multicast and other
non-public addresses are refused unless C{webhook_allow} lists them (or the
configured C{webhook_url} names the address itself), so that an item cannot
reach the services next to snq.

Loaded by the config (which checks each site's keys), so it imports
nothing of twisted.web.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from snq.secret import maskURL

#: Bytes of an answer read by default: enough for an error message.
DEFAULT_RESPONSE_LIMIT = 2048
#: Most redirects C{webhook_redirects} may allow.
MAX_REDIRECTS = 10
_KEYS = ("webhook_url", "webhook_allow", "webhook_redirects",
         "webhook_response_limit", "webhook_host_concurrency",
         "webhook_circuit_failures", "webhook_circuit_cooldown")
#: Requests a worker runs at once to one remote host, by default.
HOST_CONCURRENCY = 4
#: Failures in a row (timeouts, connection errors, 5xx) that open a host's
#: circuit, and the seconds it stays open before one probe may pass.
CIRCUIT_FAILURES = 5
CIRCUIT_COOLDOWN = 30.0


class TargetRefused(Exception):
    """A URL or an address the site's policy does not allow: final."""


def _network(entry: str):
    """An IP address or CIDR range, or None for a host name."""
    try:
        return ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return None


def _ip(host: str):
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _kind(address) -> str:
    for kind in ("unspecified", "loopback", "link_local", "multicast",
                 "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"


#: The remote-host guard's keys: default, type, bounds.
_GUARD = (("webhook_host_concurrency", HOST_CONCURRENCY, int, 1, 10_000),
          ("webhook_circuit_failures", CIRCUIT_FAILURES, int, 1, 10_000),
          ("webhook_circuit_cooldown", CIRCUIT_COOLDOWN, float, 0.001, 86_400))


def _setting(settings, problems, key, default, kind, low, high):
    """A number of C{settings} within bounds, else its default and a problem."""
    value = settings.get(key, default)
    number = (isinstance(value, (int, float)) if kind is float
              else isinstance(value, int))
    if not number or isinstance(value, bool) or not low <= value <= high:
        what = "an integer" if kind is int else "seconds"
        problems.append((key, f"expected {what} from {low:g} to {high:g}"))
        return default
    return kind(value)


def _isURL(value) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@dataclass(frozen=True)
class TargetPolicy:
    """A site's webhook targets, built from its settings by L{fromSite}."""

    #: The site's own webhook_url: always allowed.
    url: str | None = None
    #: Host names allowed (lower case); C{*.NAME} allows NAME's subdomains.
    names: frozenset = frozenset()
    #: Address ranges allowed, public or not.
    networks: tuple = ()
    #: Redirects followed (each target checked again); 0 = a 3xx is final.
    redirects: int = 0
    #: Bytes of an answer read; the rest is not read.
    responseLimit: int = DEFAULT_RESPONSE_LIMIT
    #: Requests to one host (name and port) a worker runs at once; items
    #: past it wait, uncharged (L{snq.handlers.hosts}).
    hostConcurrency: int = HOST_CONCURRENCY
    #: Failures in a row that open a host's circuit, and for how long.
    circuitFailures: int = CIRCUIT_FAILURES
    circuitCooldown: float = CIRCUIT_COOLDOWN
    _problems: tuple = field(default=(), compare=False, repr=False)

    @classmethod
    def fromSite(cls, settings: dict) -> TargetPolicy:
        """
        The policy of a site's merged settings; L{problems} of the same
        settings say what is wrong with them (the config refuses those).
        """
        problems = []
        url = settings.get("webhook_url")
        if url is not None and not _isURL(url):
            problems.append(("webhook_url", "expected an http:// or https:// URL"))
            url = None
        allow = settings.get("webhook_allow", [])
        names, networks = set(), []
        if not (isinstance(allow, list) and all(isinstance(a, str) and a.strip()
                                                for a in allow)):
            problems.append(("webhook_allow", "expected a list of host names, "
                             "*.domains, IP addresses or CIDR ranges"))
            allow = []
        for entry in allow:
            network = _network(entry.strip())
            if network is not None:
                networks.append(network)
            else:
                names.add(entry.strip().lower().rstrip("."))
        if url is not None:
            own = _ip(urlsplit(url).hostname)
            if own is not None:
                # The operator wrote this address: that is explicit enough.
                networks.append(ipaddress.ip_network(own))
        redirects = settings.get("webhook_redirects", 0)
        if (not isinstance(redirects, int) or isinstance(redirects, bool)
                or not 0 <= redirects <= MAX_REDIRECTS):
            problems.append(("webhook_redirects",
                             f"expected an integer from 0 to {MAX_REDIRECTS}"))
            redirects = 0
        limit = settings.get("webhook_response_limit", DEFAULT_RESPONSE_LIMIT)
        if (not isinstance(limit, int) or isinstance(limit, bool)
                or not 0 <= limit <= 2**20):
            problems.append(("webhook_response_limit",
                             "expected bytes as an integer from 0 to 1048576"))
            limit = DEFAULT_RESPONSE_LIMIT
        guard = [_setting(settings, problems, key, default, kind, low, high)
                 for key, default, kind, low, high in _GUARD]
        return cls(url, frozenset(names), tuple(networks), redirects, limit,
                   *guard, tuple(problems))

    @staticmethod
    def problems(settings: dict) -> list[tuple[str, str]]:
        """C{(key, expected)} for each webhook key of C{settings} that is wrong."""
        if not any(key in settings for key in _KEYS):
            return []
        return list(TargetPolicy.fromSite(settings)._problems)

    def checkURL(self, url: str) -> None:
        """Raise L{TargetRefused} unless the site may post to C{url}."""
        if not _isURL(url):
            raise TargetRefused(f"{maskURL(url)} is not an http(s) URL")
        if url == self.url:
            return
        host = urlsplit(url).hostname.lower().rstrip(".")
        address = _ip(host)
        if address is not None:
            if any(address in n for n in self.networks):
                return
        elif host in self.names or any(
                n.startswith("*.") and host.endswith(n[1:]) for n in self.names):
            return
        raise TargetRefused(
            f"{maskURL(url)} is not an allowed target: the site's webhook_url "
            "is, and hosts listed in its webhook_allow")

    def checkAddress(self, host: str, address: str) -> None:
        """
        Raise L{TargetRefused} unless the site may connect to C{address},
        one that C{host} resolved to.
        """
        ip = _ip(address)
        if ip is None:
            raise TargetRefused(f"{host} resolved to {address!r}, not an address")
        if any(ip in n for n in self.networks):
            return
        if ip.is_global and not ip.is_multicast:
            return
        shown = (f"{address} is" if host.strip("[]") == address
                 else f"{host} resolves to {address}, which is")
        raise TargetRefused(f"{shown} a {_kind(ip)} address: refused unless "
                            "the site's webhook_allow lists it")
