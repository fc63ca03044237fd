# -*- test-case-name: tests.test_webhook -*-
"""
The webhook handler against real twisted.web servers on 127.0.0.1 (allowed
by the sites' config, as loopback never is by default): outcomes, the
target policy after name resolution, redirects, the signature, the
response cap and the memory it saves, TLS for the name.
"""

import json
import os

from twisted.internet import defer, endpoints, reactor, ssl
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from zope.interface import implementer

from snq import config as snqconfig
from snq.dispatch import Dispatcher
from snq.handlers import HandlerRegistry
from snq.handlers.targets import TargetPolicy, TargetRefused
from snq.handlers.webhook import WebhookHandler, _CheckedEndpoints, signature
from snq.item import Item
from snq.queues.memory import MemoryQueue
from snq.routing import TransportFilter

#: The test CA and its certificate for "localhost" (and IP 127.0.0.1),
#: made by scripts/setup-services.
CERTS = "/etc/prosody/certs"
LOOPBACK = {"webhook_allow": ["127.0.0.1"]}


@implementer(IHostnameResolver)
class Resolver:
    """Names → the addresses they resolve to, one list per lookup in turn."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.lookups = []

    def resolveHostName(self, receiver, hostName, portNumber=0,
                        addressTypes=None, transportSemantics="TCP"):
        self.lookups.append(hostName)
        answer = self.answers.get(hostName, [])
        if answer and isinstance(answer[0], list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        receiver.resolutionBegan(None)
        for address in answer:
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()
        return None


@implementer(IPullProducer)
class BigAnswer:
    """Streams C{total} bytes, and counts what it managed to write."""

    def __init__(self, request, total, chunk=65536):
        self.request = request
        self.left = total
        self.sent = 0
        self.chunk = b"x" * chunk
        self.stopped = False

    def resumeProducing(self):
        if self.left <= 0:
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.request.write(self.chunk)
        self.sent += len(self.chunk)
        self.left -= len(self.chunk)

    def stopProducing(self):
        self.stopped = True


class Hook(resource.Resource):
    """
    Answers with the status named in the path; C{/r/N/CODE} redirects to
    C{/r/N-1/CODE} (to C{/200} at 0); C{/big} streams 300 MB; records
    requests.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []
        self.big = None

    def render_POST(self, request):
        self.requests.append((request.path, request.requestHeaders,
                              request.content.read()))
        parts = request.path.decode().strip("/").split("/")
        name = parts[0]
        if name == "slow":
            d = deferLater(reactor, 5, lambda: None)
            d.addCallback(lambda _: (request.write(b"late"), request.finish()))
            d.addErrback(lambda f: f.trap(defer.CancelledError))
            request.notifyFinish().addErrback(lambda _: d.cancel())
            return server.NOT_DONE_YET
        if name == "big":
            request.setResponseCode(500)
            self.big = BigAnswer(request, 300 * 2**20)
            request.registerProducer(self.big, False)
            return server.NOT_DONE_YET
        if name == "r":
            hops, code = int(parts[1]), int(parts[2])
            request.setResponseCode(code)
            request.setHeader("location", f"/r/{hops - 1}/{code}" if hops > 1
                              else "/200")
            return b"moved"
        if name == "to":
            request.setResponseCode(307)
            request.setHeader("location", request.args[b"u"][0])
            return b""
        request.setResponseCode(int(name))
        return b"answer " + name.encode()

    render_GET = render_POST


class WebhookTestCase(TestCase):
    resolver = None

    @defer.inlineCallbacks
    def setUp(self):
        self.hook = Hook()
        site = server.Site(self.hook)
        site.noisy = False
        self.port = yield endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(self.port.stopListening)
        self.number = self.port.getHost().port
        self.base = f"http://127.0.0.1:{self.number}"

    def handlerClass(self):
        resolver, tls = self.resolver, getattr(self, "tlsPolicy", None)

        class Handler(WebhookHandler):
            def __init__(self, context):
                super().__init__(context, resolver=resolver, tlsPolicy=tls)

        return Handler

    @defer.inlineCallbacks
    def deliver(self, payload, site="default", sites=None, timeout=None):
        data = {"sites": LOOPBACK_DEFAULT if sites is None else sites,
                "queue": {"retry_delay": 60}}
        if timeout:
            data["transports"] = {"webhook": {"timeout": timeout}}
        config = snqconfig.parse(data)
        queue = MemoryQueue(reactor)
        registry = HandlerRegistry({"webhook": self.handlerClass()})
        dispatcher = Dispatcher(queue, registry, config, clock=reactor)
        self.addCleanup(dispatcher.stopHandlers)
        yield queue.enqueue([Item(transport="webhook", payload=payload, site=site)])
        [delivery] = (yield queue.claim(1, TransportFilter()))
        yield dispatcher.dispatch(delivery)
        return queue

    def dead(self, queue):
        [dead] = queue.dead.values()
        self.assertEqual(dead.reason, "rejected")
        self.assertEqual(queue.rows, {})
        return dead.error


LOOPBACK_DEFAULT = {"default": LOOPBACK}


class WebhookTests(WebhookTestCase):
    @defer.inlineCallbacks
    def test_2xxDone(self):
        queue = yield self.deliver({"url": self.base + "/204", "body": {"a": 1}})
        self.assertEqual((queue.rows, queue.dead), ({}, {}))
        [(_, headers, body)] = self.hook.requests
        self.assertEqual(json.loads(body), {"a": 1})
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(headers.getRawHeaders("x-snq-attempt"), ["1"])

    @defer.inlineCallbacks
    def test_siteUrlAndSignature(self):
        """The site's own webhook_url (an address it names) needs no allow."""
        sites = {"ex": {"webhook_url": self.base + "/200", "webhook_secret": "k"}}
        queue = yield self.deliver({"event": "follow"}, site="ex", sites=sites)
        self.assertEqual(queue.rows, {})
        [(_, headers, body)] = self.hook.requests
        self.assertEqual(json.loads(body), {"event": "follow"})
        self.assertEqual(headers.getRawHeaders("x-snq-signature"),
                         [signature("k", body)])
        self.assertTrue(signature("k", body).startswith("sha256="))

    @defer.inlineCallbacks
    def test_5xxRetried(self):
        queue = yield self.deliver({"url": self.base + "/503", "body": 1})
        [row] = queue.rows.values()
        self.assertEqual(row["attempts"], 1)
        self.assertIn("HTTP 503: answer 503", row["error"])
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_429Retried(self):
        queue = yield self.deliver({"url": self.base + "/429", "body": 1})
        self.assertEqual(len(queue.rows), 1)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_4xxRejected(self):
        queue = yield self.deliver({"url": self.base + "/404", "body": 1})
        self.assertIn("answered HTTP 404: answer 404", self.dead(queue))

    @defer.inlineCallbacks
    def test_timeoutRetried(self):
        queue = yield self.deliver({"url": self.base + "/slow", "body": 1},
                                   timeout=0.3)
        [row] = queue.rows.values()
        self.assertEqual(row["error"], "timed out after 0.3 s")

    @defer.inlineCallbacks
    def test_connectionRefusedRetried(self):
        # A port that was just closed: nothing listens there.
        port = yield endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(server.Site(self.hook))
        number = port.getHost().port
        yield port.stopListening()
        queue = yield self.deliver({"url": f"http://127.0.0.1:{number}/", "body": 1})
        [row] = queue.rows.values()
        self.assertIn("ConnectionRefused", row["error"])
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_noUrlRejected(self):
        queue = yield self.deliver({"event": 1})
        self.assertIn("sets no webhook_url", self.dead(queue))

    @defer.inlineCallbacks
    def test_urlTokensMaskedInErrors(self):
        """A URL's token is not in the dead letter, the log or /status.json."""
        sites = {"ex": {"webhook_url": self.base + "/404?token=HOOK-TOKEN&x=1"}}
        queue = yield self.deliver({"e": 1}, site="ex", sites=sites)
        error = self.dead(queue)
        self.assertIn("/404?token=***&x=1 answered HTTP 404", error)
        self.assertNotIn("HOOK-TOKEN", error)


class TargetPolicyTests(WebhookTestCase):
    """Where an item may make snq post, after name resolution."""

    @defer.inlineCallbacks
    def test_loopbackRefusedByDefault(self):
        """
        An item's URL on loopback, with nothing allowed: refused before any
        connection, and the site's signature goes nowhere.
        """
        sites = {"ex": {"webhook_url": "https://hooks.example.org/in",
                        "webhook_secret": "SITE-KEY"}}
        for url in (self.base + "/200", f"http://localhost:{self.number}/200",
                    f"http://[::ffff:127.0.0.1]:{self.number}/200"):
            queue = yield self.deliver({"url": url, "body": {"a": 1}},
                                       site="ex", sites=sites)
            self.assertIn("is not an allowed target", self.dead(queue))
        self.assertEqual(self.hook.requests, [])

    @defer.inlineCallbacks
    def test_allowedNameResolvingToLoopbackRefused(self):
        """The name is allowed, the address it resolves to is not."""
        self.resolver = Resolver({"hook.test": ["127.0.0.1"]})
        sites = {"ex": {"webhook_allow": ["hook.test"], "webhook_secret": "K"}}
        queue = yield self.deliver({"url": f"http://hook.test:{self.number}/200",
                                    "body": 1}, site="ex", sites=sites)
        self.assertIn("hook.test resolves to 127.0.0.1, which is a loopback "
                      "address", self.dead(queue))
        self.assertEqual(self.hook.requests, [])

    @defer.inlineCallbacks
    def test_privateKindsRefused(self):
        self.resolver = Resolver({
            "ten.test": ["10.1.2.3"], "meta.test": ["169.254.169.254"],
            "multi.test": ["224.0.0.1"], "zero.test": ["0.0.0.0"],
            "mixed.test": ["93.184.216.34", "192.168.1.1"]})
        sites = {"ex": {"webhook_allow": ["*.test"]}}
        for name, kind in (("ten", "private"), ("meta", "link-local"),
                           ("multi", "multicast"), ("zero", "unspecified"),
                           ("mixed", "private")):
            queue = yield self.deliver({"url": f"http://{name}.test/", "body": 1},
                                       site="ex", sites=sites)
            self.assertIn(f"which is a {kind} address", self.dead(queue))

    @defer.inlineCallbacks
    def test_allowedNameAndRangeConnectToTheCheckedAddress(self):
        """
        With the name and the range allowed, the request goes to the address
        the name resolved to, with the name in Host.
        """
        self.resolver = Resolver({"hook.test": ["127.0.0.1"]})
        sites = {"ex": {"webhook_allow": ["hook.test", "127.0.0.0/8"],
                        "webhook_secret": "K"}}
        queue = yield self.deliver({"url": f"http://hook.test:{self.number}/200",
                                    "body": {"b": 2}}, site="ex", sites=sites)
        self.assertEqual((queue.rows, queue.dead), ({}, {}))
        [(_, headers, body)] = self.hook.requests
        self.assertEqual(headers.getRawHeaders("host"), [f"hook.test:{self.number}"])
        self.assertEqual(headers.getRawHeaders("x-snq-signature"),
                         [signature("K", body)])
        self.assertEqual(self.resolver.lookups, ["hook.test"])

    @defer.inlineCallbacks
    def test_nameThatDoesNotResolveRetried(self):
        """A resolver that answers nothing may be down for now: retried."""
        self.resolver = Resolver({})
        sites = {"ex": {"webhook_allow": ["gone.test"]}}
        queue = yield self.deliver({"url": "http://gone.test/", "body": 1},
                                   site="ex", sites=sites)
        [row] = queue.rows.values()
        self.assertIn("DNSLookupError", row["error"])
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_otherHostOfTheSiteRefused(self):
        """The site's webhook_url allows that URL, not its neighbours."""
        sites = {"ex": {"webhook_url": "https://hooks.example.org/in"}}
        queue = yield self.deliver({"url": "https://evil.example.net/in",
                                    "body": 1}, site="ex", sites=sites)
        self.assertIn("https://evil.example.net/in is not an allowed target",
                      self.dead(queue))


class RebindingTests(SynchronousTestCase):
    """The address connected to is the one checked: the name is resolved once."""

    def connect(self, answers, allow=("*.test",)):
        memory = MemoryReactorClock()
        resolver = Resolver(answers)
        policy = TargetPolicy.fromSite({"webhook_allow": list(allow)})
        endpoint = _CheckedEndpoints(memory, resolver, policy).endpointForURI(
            URI.fromBytes(b"http://rebind.test:8080/hook"))
        d = endpoint.connect(Factory.forProtocol(Protocol))
        return memory, resolver, d

    def test_connectsToTheAddressChecked(self):
        # Public at the first lookup, loopback at any later one.
        memory, resolver, d = self.connect(
            {"rebind.test": [["93.184.216.34"], ["127.0.0.1"]]})
        [(host, port, *_)] = memory.tcpClients
        self.assertEqual((host, port), ("93.184.216.34", 8080))
        self.assertEqual(resolver.lookups, ["rebind.test"])
        self.assertNoResult(d)

    def test_loopbackAtTheLookupNeverConnected(self):
        memory, _, d = self.connect(
            {"rebind.test": [["127.0.0.1"], ["93.184.216.34"]]})
        self.failureResultOf(d, TargetRefused)
        self.assertEqual(memory.tcpClients, [])


class RedirectTests(WebhookTestCase):
    @defer.inlineCallbacks
    def test_redirectNotFollowedByDefault(self):
        """Every 3xx is final: a dead letter saying where it pointed."""
        for code in (301, 302, 303, 307, 308):
            queue = yield self.deliver({"url": f"{self.base}/r/1/{code}",
                                        "body": 1})
            self.assertIn(f"answered HTTP {code}, a redirect to {self.base}/200: "
                          "not followed (the site's webhook_redirects is 0)",
                          self.dead(queue))
        self.assertEqual(len(self.hook.requests), 5, "one request each")

    @defer.inlineCallbacks
    def test_redirectChainFollowedWhenAllowed(self):
        """Up to webhook_redirects hops, each a POST with the same body."""
        sites = {"default": {**LOOPBACK, "webhook_redirects": 3,
                             "webhook_secret": "K"}}
        queue = yield self.deliver({"url": f"{self.base}/r/3/307", "body": [1]},
                                   sites=sites)
        self.assertEqual((queue.rows, queue.dead), ({}, {}))
        self.assertEqual([path for path, _, _ in self.hook.requests],
                         [b"/r/3/307", b"/r/2/307", b"/r/1/307", b"/200"])
        for _, headers, body in self.hook.requests:
            self.assertEqual(body, b"[1]")
            self.assertEqual(headers.getRawHeaders("x-snq-signature"),
                             [signature("K", body)])

    @defer.inlineCallbacks
    def test_chainLongerThanAllowed(self):
        sites = {"default": {**LOOPBACK, "webhook_redirects": 2}}
        queue = yield self.deliver({"url": f"{self.base}/r/3/302", "body": 1},
                                   sites=sites)
        self.assertIn("not followed (the site's webhook_redirects is 2)",
                      self.dead(queue))
        self.assertEqual(len(self.hook.requests), 3)

    @defer.inlineCallbacks
    def test_redirectToARefusedTargetNotFollowed(self):
        """A redirect's target is checked before anything is sent there."""
        self.resolver = Resolver({"inside.test": ["10.0.0.7"],
                                  "127.0.0.1": ["127.0.0.1"]})
        sites = {"default": {"webhook_allow": ["127.0.0.1", "inside.test"],
                             "webhook_redirects": 3, "webhook_secret": "K"}}
        for target, why in (
                ("http://169.254.169.254/latest/meta-data/",
                 "is not an allowed target"),
                ("http://inside.test/x",
                 "inside.test resolves to 10.0.0.7, which is a private address")):
            queue = yield self.deliver({"url": f"{self.base}/to?u={target}",
                                        "body": 1}, sites=sites)
            self.assertIn(why, self.dead(queue))
        self.assertEqual(len(self.hook.requests), 2)


def residentBytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ResponseCapTests(WebhookTestCase):
    @defer.inlineCallbacks
    def test_largeReplyNotRead(self):
        """
        A 300 MB answer: the first few KiB are kept for the error, the
        connection is closed, the rest never read; memory stays flat.
        """
        baseline = peak = residentBytes()

        def sample():
            nonlocal peak
            peak = max(peak, residentBytes())

        sampler = LoopingCall(sample)
        sampler.start(0.005)
        try:
            queue = yield self.deliver({"url": self.base + "/big", "body": 1})
        finally:
            sampler.stop()
        sample()
        [row] = queue.rows.values()
        self.assertIn("answered HTTP 500: " + "x" * 2048 + " …", row["error"])
        self.assertLess(len(row["error"]), 2200)
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(self.hook.big.stopped, "the connection was closed")
        self.assertLess(self.hook.big.sent, 32 * 2**20,
                        "the rest was not read")
        self.assertLess(peak - baseline, 48 * 2**20,
                        f"RSS grew by {(peak - baseline) / 2**20:.0f} MB")
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_limitConfigurable(self):
        sites = {"default": {**LOOPBACK, "webhook_response_limit": 5}}
        queue = yield self.deliver({"url": self.base + "/404", "body": 1},
                                   sites=sites)
        self.assertTrue(self.dead(queue).endswith("answered HTTP 404: answe …"))


class TLSTests(WebhookTestCase):
    """HTTPS to a checked address, with the URL's name for SNI and the
    certificate check (the test certificate is for "localhost" and
    127.0.0.1)."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        with open(f"{CERTS}/snq-test-localhost.crt") as f:
            pem = f.read()
        with open(f"{CERTS}/snq-test-localhost.key") as f:
            pem += f.read()
        with open(f"{CERTS}/snq-test-ca.crt") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        site = server.Site(self.hook)
        site.noisy = False
        port = yield endpoints.SSL4ServerEndpoint(
            reactor, 0, ssl.PrivateCertificate.loadPEM(pem).options(),
            interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.tlsPort = port.getHost().port
        self.tlsPolicy = BrowserLikePolicyForHTTPS(trustRoot=ca)

    @defer.inlineCallbacks
    def test_nameVerified(self):
        self.resolver = Resolver({"localhost": ["127.0.0.1"],
                                  "hook.test": ["127.0.0.1"]})
        sites = {"default": {"webhook_allow": ["localhost", "hook.test",
                                               "127.0.0.1"]}}
        queue = yield self.deliver(
            {"url": f"https://localhost:{self.tlsPort}/200", "body": 1},
            sites=sites)
        self.assertEqual((queue.rows, queue.dead), ({}, {}))
        [(_, headers, _)] = self.hook.requests
        self.assertEqual(headers.getRawHeaders("host"),
                         [f"localhost:{self.tlsPort}"])
        # Same address, another name: the certificate is checked for the
        # name, not for the address connected to.
        queue = yield self.deliver(
            {"url": f"https://hook.test:{self.tlsPort}/200", "body": 1},
            sites=sites)
        [row] = queue.rows.values()
        self.assertIn("hook.test", row["error"])
        self.assertEqual(len(self.hook.requests), 1)
        self.flushLoggedErrors()


class SiteConfigTests(SynchronousTestCase):
    def test_webhookKeysChecked(self):
        e = self.assertRaises(snqconfig.ConfigError, snqconfig.parse, {"sites": {
            "a": {"webhook_allow": "everything", "webhook_redirects": 99,
                  "webhook_response_limit": -1, "webhook_url": "ftp://x/"}}})
        self.assertEqual(sorted(e.problems), [
            "<config>: sites.a.webhook_allow: expected a list of host names, "
            "*.domains, IP addresses or CIDR ranges",
            "<config>: sites.a.webhook_redirects: expected an integer from 0 "
            "to 10",
            "<config>: sites.a.webhook_response_limit: expected bytes as an "
            "integer from 0 to 1048576",
            "<config>: sites.a.webhook_url: expected an http:// or https:// URL",
        ])


class PolicyTests(SynchronousTestCase):
    def policy(self, **settings):
        return TargetPolicy.fromSite(settings)

    def assertAllowed(self, policy, *urls):
        for url in urls:
            policy.checkURL(url)

    def assertRefused(self, policy, *urls):
        for url in urls:
            self.assertRaises(TargetRefused, policy.checkURL, url)

    def test_nothingAllowedByDefault(self):
        self.assertRefused(self.policy(), "https://example.org/",
                           "http://127.0.0.1/", "ftp://example.org/")

    def test_siteUrlExactly(self):
        policy = self.policy(webhook_url="https://hooks.example.org/in?k=1")
        self.assertAllowed(policy, "https://hooks.example.org/in?k=1")
        self.assertRefused(policy, "https://hooks.example.org/other",
                           "http://hooks.example.org/in?k=1")

    def test_namesWildcardsAndRanges(self):
        policy = self.policy(webhook_allow=[
            "api.example.org", "*.hooks.example.net", "10.0.0.0/8", "::1",
            "192.0.2.7"])
        self.assertAllowed(policy, "https://API.example.org./x",
                           "http://a.hooks.example.net/", "http://a.b.hooks.example.net/",
                           "http://10.9.8.7:8080/", "http://[::1]/", "http://192.0.2.7/")
        self.assertRefused(policy, "https://example.org/", "http://hooks.example.net/",
                           "http://evilhooks.example.net/", "http://11.0.0.1/",
                           "http://192.0.2.8/")

    def test_addresses(self):
        policy = self.policy(webhook_allow=["10.0.0.0/8"],
                             webhook_url="http://192.168.4.4/hook")
        policy.checkAddress("a", "93.184.216.34")
        policy.checkAddress("a", "2606:4700::1")
        policy.checkAddress("a", "10.1.1.1")
        policy.checkAddress("a", "192.168.4.4")
        for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "192.168.4.5",
                        "172.16.0.1", "169.254.169.254", "fe80::1", "fc00::1",
                        "224.0.0.251", "ff02::1", "0.0.0.0", "100.64.0.1",
                        "255.255.255.255"):
            self.assertRaises(TargetRefused, policy.checkAddress, "a", address)
