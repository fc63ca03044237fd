# -*- test-case-name: tests.test_redis -*-
"""
Where a Redis server is (C{redis://} and C{rediss://} URLs) and the TLS to
reach it with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from snq.secret import maskURL

_PEM_CERTIFICATE = r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----"


@dataclass(frozen=True)
class RedisAddress:
    """C{redis://[USER:PASSWORD@]HOST:PORT/DB}, or C{rediss://} for TLS."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def fromURL(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"{url}: not a redis:// or rediss:// URL")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"{url}: the path must be a database number")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{url}: the port must be a number")
        return cls(host=parts.hostname or "127.0.0.1", port=port,
                   db=int(path or 0),
                   username=unquote(parts.username) if parts.username else None,
                   password=(unquote(parts.password)
                             if parts.password is not None else None),
                   tls=parts.scheme == "rediss")

    def describe(self) -> str:
        user = quote(self.username or "", safe="")
        auth = (f"{user}:{quote(self.password, safe='')}@"
                if self.password is not None else f"{user}@" if user else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        return maskURL(f"{scheme}://{auth}{host}:{self.port}/{self.db}")


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
