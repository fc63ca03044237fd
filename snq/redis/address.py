# -*- test-case-name: tests.test_redis -*-
"""
Where a Redis server is (C{redis://} and C{rediss://} URLs, or the
C{redis+sentinel://} URL of the Sentinels that know it) and the TLS to
reach it with.  Importable without Twisted: producers read it too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote, urlsplit

from snq.secret import maskURL

_PEM_CERTIFICATE = r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----"

#: What a Sentinel's port is when the URL gives none.
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class RedisAddress:
    """
    C{redis://[USER:PASSWORD@]HOST:PORT/DB}, or C{rediss://} for TLS; or
    C{redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]}:
    the Sentinels to ask where the primary named C{MASTER} is (the password
    is the primary's).  A sentinel address has C{sentinels} and C{master};
    L{primaryAt} makes the plain address of the primary they name.
    """

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None

    @classmethod
    def fromURL(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme == "redis+sentinel":
            return cls._fromSentinelURL(url, parts)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(
                f"{url}: not a redis://, rediss:// or redis+sentinel:// URL")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"{url}: the path must be a database number")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{url}: the port must be a number")
        return cls(host=parts.hostname or "127.0.0.1", port=port,
                   db=int(path or 0), **_credentials(parts),
                   tls=parts.scheme == "rediss")

    @classmethod
    def _fromSentinelURL(cls, url, parts) -> RedisAddress:
        hosts = parts.netloc.rpartition("@")[2]
        sentinels = []
        for where in hosts.split(","):
            one = urlsplit(f"//{where}")
            try:
                port = one.port or SENTINEL_PORT
            except ValueError:
                port = None
            if not one.hostname or port is None:
                raise ValueError(f"{url}: {where!r} is not HOST:PORT")
            sentinels.append((one.hostname, port))
        path = parts.path.strip("/").split("/")
        if not path[0]:
            raise ValueError(f"{url}: the path must name the master "
                             "(/MASTER or /MASTER/DB)")
        if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(f"{url}: the path must be /MASTER or /MASTER/DB")
        return cls(host=sentinels[0][0], port=sentinels[0][1],
                   db=int(path[1]) if len(path) == 2 else 0,
                   **_credentials(parts), sentinels=tuple(sentinels),
                   master=unquote(path[0]))

    def primaryAt(self, host: str, port: int) -> RedisAddress:
        """The plain address of the primary the Sentinels named."""
        return replace(self, host=host, port=port, sentinels=(), master=None)

    def describe(self) -> str:
        user = quote(self.username or "", safe="")
        auth = (f"{user}:{quote(self.password, safe='')}@"
                if self.password is not None else f"{user}@" if user else "")
        if self.master is not None:
            hosts = ",".join(_hostPort(h, p) for h, p in self.sentinels)
            return maskURL(f"redis+sentinel://{auth}{hosts}/"
                           f"{quote(self.master, safe='')}/{self.db}")
        scheme = "rediss" if self.tls else "redis"
        return maskURL(f"{scheme}://{auth}{_hostPort(self.host, self.port)}"
                       f"/{self.db}")


def _credentials(parts) -> dict:
    return dict(username=unquote(parts.username) if parts.username else None,
                password=(unquote(parts.password)
                          if parts.password is not None else None))


def _hostPort(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def masterQuery(address: RedisAddress) -> tuple[str, ...]:
    """What to ask a Sentinel for C{[host, port]} of the primary."""
    return ("SENTINEL", "get-master-addr-by-name", address.master)


def primaryFromReply(address: RedisAddress, reply) -> RedisAddress | None:
    """
    The primary a Sentinel's answer to L{masterQuery} names, or None when
    that Sentinel does not know the master.
    """
    if not reply:
        return None
    host, port = (v.decode() if isinstance(v, bytes) else str(v) for v in reply)
    return address.primaryAt(host, int(port))


def tlsOptions(address: RedisAddress, config):
    """Client TLS for C{rediss://}: the system's CAs unless C{ca_file}."""
    from twisted.internet import ssl

    trustRoot = None
    if config.ca_file:
        with open(config.ca_file) as f:
            pems = re.findall(_PEM_CERTIFICATE, f.read(), re.DOTALL)
        if not pems:
            raise ValueError(f"{config.ca_file}: no PEM certificate in it")
        trustRoot = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(pem) for pem in pems])
    clientCertificate = None
    if config.cert_file:
        with open(config.cert_file) as f:
            pem = f.read()
        if config.key_file:
            with open(config.key_file) as f:
                pem += "\n" + f.read()
        clientCertificate = ssl.PrivateCertificate.loadPEM(pem)
    return ssl.optionsForClientTLS(address.host, trustRoot=trustRoot,
                                   clientCertificate=clientCertificate)

