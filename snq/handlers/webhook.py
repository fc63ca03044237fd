# -*- test-case-name: tests.test_webhook,tests.test_webhook_hosts -*-
"""
C{webhook}: POST an item's payload as JSON.

The URL is the payload's own C{url} (with the JSON to send in C{body}), or
else the site's C{webhook_url} (the whole payload is sent).  2xx is done;
5xx, 408, 429, a timeout (30 s unless the transport sets one) or a
connection error are retried; any other answer is final and dead-letters
the item, a redirect (3xx) too unless the site's C{webhook_redirects}
allows following it.  With the site's C{webhook_secret} set, each request
carries C{X-Snq-Signature: sha256=HEX}, the HMAC-SHA256 of the exact body,
so the receiver can tell it came from us.

Whoever may enqueue chooses the payload, so the handler posts only where
the site allows (L{snq.handlers.targets.TargetPolicy}): the name of a URL
is resolved once, every address it resolves to is checked, and the
connection goes to a checked address (with the URL's name in C{Host} and
TLS), so a name that changes its answer between the check and the
connection (DNS rebinding) gains nothing.  A redirect's target is checked
the same way before it is followed, so the signature never reaches a
target the site does not allow.  Only the first C{webhook_response_limit}
bytes of an answer are read (for the error message); the connection is
then closed, the rest unread.

One remote host cannot hold every slot: a worker runs at most the site's
C{webhook_host_concurrency} requests to it at once, and stops trying a host
that keeps failing for a while (L{snq.handlers.hosts}); the items turned
away wait without being charged an attempt.
"""

import hashlib
import hmac
import io
import json
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer
from twisted.internet.address import IPv6Address
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from snq.handlers import QueueHandler, Reject, Retry
from snq.handlers.hosts import RemoteHosts
from snq.handlers.targets import TargetPolicy, TargetRefused
from snq.secret import maskURL, reveal
from snq.service import defaultReactor

_RETRY_STATUSES = {408, 429}
#: Seconds to connect before the attempt counts as failed (and is retried).
CONNECT_TIMEOUT = 10.0


class WebhookError(Retry):
    """The remote answered, but not yet usefully: try again later."""


def hostOf(url: str) -> str:
    """The remote host a URL names, as the per-host limits count it."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    default = 443 if parts.scheme == "https" else 80
    return f"{(parts.hostname or '').rstrip('.')}:{port or default}"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body,
                                hashlib.sha256).hexdigest()


@implementer(IResolutionReceiver)
class _Addresses:
    """The addresses a name resolves to, once it has."""

    def __init__(self):
        self.addresses = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        self.addresses.append(address)

    def resolutionComplete(self):
        self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """
    Connects to C{host:port} only at an address the policy allows: the name
    is resolved once, every address checked, and a checked one connected
    to.  For https, TLS (SNI and the certificate) is for the name.
    """

    def __init__(self, reactor, resolver, policy, tls, host: str, port: int):
        self.reactor = reactor
        self.resolver = resolver
        self.policy = policy
        self.tls = tls
        self.host = host
        self.port = port

    @defer.inlineCallbacks
    def connect(self, factory):
        # Here, not at the top: Twisted's endpoints and web client import
        # TLS, which a worker posting no webhook does without (snq.lean).
        from twisted.internet.endpoints import (
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
            wrapClientTLS,
        )

        receiver = _Addresses()
        self.resolver.resolveHostName(receiver, self.host, self.port)
        addresses = yield receiver.done
        if not addresses:
            # Perhaps only for now (the resolver is down): retried.
            raise DNSLookupError(self.host)
        for address in addresses:
            self.policy.checkAddress(self.host, address.host)
        # The first that answers, as HostnameEndpoint would (in turn here).
        for n, address in enumerate(addresses):
            kind = (TCP6ClientEndpoint if isinstance(address, IPv6Address)
                    else TCP4ClientEndpoint)
            endpoint = kind(self.reactor, address.host, self.port,
                            timeout=CONNECT_TIMEOUT)
            if self.tls is not None:
                endpoint = wrapClientTLS(self.tls, endpoint)
            try:
                return (yield endpoint.connect(factory))
            except Exception:
                if n == len(addresses) - 1:
                    raise


@implementer(IAgentEndpointFactory)
class _CheckedEndpoints:
    """The endpoints of one site's L{Agent}: each checks its addresses."""

    def __init__(self, reactor, resolver, policy, tlsPolicy=None):
        self.reactor = reactor
        self.resolver = resolver
        self.policy = policy
        from twisted.web.client import BrowserLikePolicyForHTTPS

        self.tlsPolicy = tlsPolicy or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii")
        tls = (self.tlsPolicy.creatorForNetloc(uri.host, uri.port)
               if uri.scheme == b"https" else None)
        return _CheckedEndpoint(self.reactor, self.resolver, self.policy, tls,
                                host, uri.port)


class _Capped(Protocol):
    """
    Keeps the first C{limit} bytes of a body; past them, closes the
    connection so that the rest is never read.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.kept = bytearray()
        self.cut = False
        self.done = defer.Deferred()

    def dataReceived(self, data):
        room = self.limit - len(self.kept)
        self.kept += data[:room]
        if len(data) > room and not self.cut:
            self.cut = True
            self.transport.stopProducing()

    def connectionLost(self, reason):
        self.done.callback(bytes(self.kept))


def _readCapped(response, limit: int):
    capped = _Capped(limit)
    response.deliverBody(capped)
    return capped.done.addCallback(lambda kept: (kept, capped.cut))


class _Site:
    """A site's policy, and the agent that posts under it."""

    def __init__(self, policy, reactor, resolver, tlsPolicy):
        from twisted.web.client import Agent, HTTPConnectionPool

        self.policy = policy
        # Connections are kept per site: one checked under another site's
        # policy is never reused for this one.
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent.usingEndpointFactory(
            reactor, _CheckedEndpoints(reactor, resolver, policy, tlsPolicy),
            pool=self.pool)


class WebhookHandler(QueueHandler):
    transport = "webhook"
    #: A remote that has not answered in 30 s is retried later.
    timeout = 30.0
    log = Logger()

    def __init__(self, context, reactor=None, resolver=None, tlsPolicy=None):
        """
        C{resolver} (an C{IHostnameResolver}) resolves names, the reactor's
        by default; C{tlsPolicy} (an C{IPolicyForHTTPS}) says which
        certificates to trust, the system's by default.
        """
        super().__init__(context)
        self.reactor = defaultReactor(reactor)
        self.resolver = resolver or self.reactor.nameResolver
        self.tlsPolicy = tlsPolicy
        self._sites: dict[str, _Site] = {}
        self.hosts = RemoteHosts(context.clock, context.stats)

    def _site(self, site: str, settings: dict) -> _Site:
        """The site's agent, made again when a reload changed its policy."""
        policy = TargetPolicy.fromSite(settings)
        known = self._sites.get(site)
        if known is None or known.policy != policy:
            if known is not None:
                known.pool.closeCachedConnections()
            known = self._sites[site] = _Site(policy, self.reactor, self.resolver,
                                              self.tlsPolicy)
        return known

    def stop(self):
        sites, self._sites = self._sites, {}
        return defer.gatherResults(
            [s.pool.closeCachedConnections() for s in sites.values()])

    async def handle(self, item):
        settings = self.context.siteConfig(item.site)
        url, document = self._target(item, settings)
        site = self._site(item.site, settings)
        body = json.dumps(document, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
        headers = Headers({
            "Content-Type": ["application/json"],
            "User-Agent": ["snq-webhook"],
            "X-Snq-Item": [item.id],
            "X-Snq-Attempt": [str(item.attempts + 1)],
        })
        secret = reveal(settings.get("webhook_secret"))
        if secret:
            headers.setRawHeaders("X-Snq-Signature", [signature(secret, body)])
        host = hostOf(url)
        probe = self.hosts.enter(host, site.policy, item)
        answered = False
        try:
            result = await self._post(site, url, headers, body)
            answered = True
            return result
        except Reject:
            answered = True  # It said no, or was never asked.
            raise
        finally:
            self.hosts.leave(host, site.policy, item, probe, answered)

    async def _post(self, site, url, headers, body):
        """POST, following the redirects the site allows; True when done."""
        from twisted.web.client import FileBodyProducer

        for hop in range(site.policy.redirects + 1):
            shown = maskURL(url)
            try:
                site.policy.checkURL(url)
                response = await site.agent.request(
                    b"POST", url.encode("utf-8"), headers,
                    FileBodyProducer(io.BytesIO(body)))
            except TargetRefused as e:
                raise Reject(str(e))
            kept, cut = await _readCapped(response, site.policy.responseLimit)
            code = response.code
            text = kept.decode("utf-8", "replace") + (" …" if cut else "")
            if 200 <= code < 300:
                return True
            if code >= 500 or code in _RETRY_STATUSES:
                raise WebhookError(f"{shown} answered HTTP {code}: {text}")
            if not 300 <= code < 400:
                raise Reject(f"{shown} answered HTTP {code}: {text}")
            location = response.headers.getRawHeaders(b"location", [b""])[0]
            if not location:
                raise Reject(f"{shown} answered HTTP {code} without a Location")
            target = urljoin(url, location.decode("utf-8", "replace"))
            if hop == site.policy.redirects:
                raise Reject(
                    f"{shown} answered HTTP {code}, a redirect to "
                    f"{maskURL(target)}: not followed (the site's "
                    f"webhook_redirects is {site.policy.redirects})")
            url = target

    def _target(self, item, settings):
        payload = item.payload
        if isinstance(payload, dict) and "url" in payload:
            url = payload["url"]
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise Reject("webhook payload 'url' must be an http(s) URL")
            return url, payload.get("body")
        url = settings.get("webhook_url")
        if not url:
            raise Reject(f"no webhook URL: the payload has no 'url' and site "
                         f"{item.site!r} sets no webhook_url")
        return url, payload
