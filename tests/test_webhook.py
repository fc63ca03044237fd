# -*- test-case-name: tests.test_webhook -*-
"""The webhook handler against a real twisted.web server on 127.0.0.1."""

import json

from twisted.internet import defer, endpoints, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from snq import config as snqconfig
from snq.dispatch import Dispatcher
from snq.handlers import HandlerRegistry
from snq.handlers.webhook import WebhookHandler, signature
from snq.item import Item
from snq.queues.memory import MemoryQueue
from snq.routing import TransportFilter


class Hook(resource.Resource):
    """Answers with the status named in the path; records requests."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render_POST(self, request):
        self.requests.append((request.path, request.requestHeaders,
                              request.content.read()))
        name = request.path.decode().strip("/")
        if name == "slow":
            d = deferLater(reactor, 5, lambda: None)
            d.addCallback(lambda _: (request.write(b"late"), request.finish()))
            d.addErrback(lambda f: f.trap(defer.CancelledError))
            request.notifyFinish().addErrback(lambda _: d.cancel())
            return server.NOT_DONE_YET
        request.setResponseCode(int(name))
        return b"answer " + name.encode()


class WebhookTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.hook = Hook()
        site = server.Site(self.hook)
        site.noisy = False
        port = yield endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    @defer.inlineCallbacks
    def deliver(self, payload, site="default", sites=None, timeout=None):
        data = {"sites": sites or {}, "queue": {"retry_delay": 60}}
        if timeout:
            data["transports"] = {"webhook": {"timeout": timeout}}
        config = snqconfig.parse(data)
        queue = MemoryQueue(reactor)
        dispatcher = Dispatcher(queue, HandlerRegistry({"webhook": WebhookHandler}),
                                config, clock=reactor)
        self.addCleanup(dispatcher.stopHandlers)
        yield queue.enqueue([Item(transport="webhook", payload=payload, site=site)])
        [delivery] = (yield queue.claim(1, TransportFilter()))
        yield dispatcher.dispatch(delivery)
        return queue

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
        [dead] = queue.dead.values()
        self.assertEqual(dead.reason, "rejected")
        self.assertIn("answered HTTP 404: answer 404", dead.error)
        self.assertEqual(queue.rows, {})

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
        [dead] = queue.dead.values()
        self.assertIn("sets no webhook_url", dead.error)
