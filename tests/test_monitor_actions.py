# -*- test-case-name: tests.test_monitor_actions -*-
"""
The dashboard's actions over plain HTTP, on a real SQLite queue and
cluster store: refused without the token, without the CSRF header, from
another Origin, or when no token is configured; carried out otherwise
(pause, resume, dead letters retried and purged).
"""

import json
import os

import treq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from snq import config as snqconfig
from snq.cluster import makeStore
from snq.item import Item
from snq.monitor.actions import Actions
from snq.monitor.metrics import registry
from snq.monitor.tracker import Tracker
from snq.monitor.web import HttpService, makeSite
from snq.queues import makeQueue
from snq.routing import TransportFilter
from tests.test_monitor import FakePool


class ActionTests(TestCase):
    timeout = 60

    async def setUp(self):
        path = os.path.abspath(self.mktemp())
        self.config = snqconfig.parse({"db": {"url": f"sqlite:///{path}"}})
        self.queue = makeQueue(self.config, reactor)
        await self.queue.open()
        self.addCleanup(self.queue.close)
        self.store = makeStore(self.config, self.queue, reactor)
        self.tracker = Tracker(FakePool(), Clock())

    async def serve(self, token="s3cret"):
        actions = Actions(self.config, token, {"127.0.0.1", "localhost"},
                          reactor)
        site = makeSite(self.tracker, registry(self.tracker, "db"), token,
                        actions=actions, cluster=lambda: {"daemons": []})
        service = HttpService("127.0.0.1:0", site, reactor)
        await service.startService()
        self.addCleanup(service.stopService)
        self.base = f"http://127.0.0.1:{service.port.getHost().port}/"
        return actions

    async def post(self, query, token="s3cret", csrf=None, origin=None):
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if csrf:
            headers["X-Snq-Csrf"] = csrf
        if origin:
            headers["Origin"] = origin
        response = await treq.post(self.base + "action?" + query,
                                   headers=headers, persistent=False)
        return response.code, json.loads(await response.content())

    async def csrf(self):
        response = await treq.get(self.base + "status.json", persistent=False,
                                  headers={"Authorization": "Bearer s3cret"})
        status = json.loads(await response.content())
        self.assertEqual(status["cluster"], {"daemons": []})
        return status["csrf"]

    async def test_refused(self):
        await self.serve()
        csrf = await self.csrf()
        self.assertEqual(len(csrf), 32)
        query = "do=pause&kind=transport&name=webhook"
        code, answer = await self.post(query, token=None, csrf=csrf)
        self.assertEqual((code, answer["ok"]), (401, False))
        code, _ = await self.post(query, token="wrong", csrf=csrf)
        self.assertEqual(code, 401)
        code, answer = await self.post(query)
        self.assertEqual(code, 403)
        self.assertIn("X-Snq-Csrf", answer["message"])
        code, _ = await self.post(query, csrf="0" * 32)
        self.assertEqual(code, 403)
        code, answer = await self.post(query, csrf=csrf,
                                       origin="http://evil.example")
        self.assertEqual(code, 403)
        self.assertIn("is not the monitor's", answer["message"])
        self.assertEqual(await self.store.settings(), {})
        # A GET does not act, nor does an unknown action.
        response = await treq.get(self.base + "action?" + query,
                                  persistent=False)
        self.assertEqual(response.code, 405)
        code, _ = await self.post("do=explode", csrf=csrf)
        self.assertEqual(code, 400)

    async def test_noTokenNoActions(self):
        actions = await self.serve(token="")
        response = await treq.get(self.base + "status.json", persistent=False)
        self.assertIsNone(json.loads(await response.content())["csrf"])
        code, answer = await self.post("do=pause&kind=site&name=ex",
                                       token=None, csrf=actions.csrf)
        self.assertEqual(code, 403)
        self.assertIn("need [monitor] token", answer["message"])

    async def test_pauseAndResume(self):
        await self.serve()
        csrf = await self.csrf()
        origin = "http://127.0.0.1:8750"
        code, answer = await self.post("do=pause&kind=transport&name=webhook",
                                       csrf=csrf, origin=origin)
        self.assertEqual((code, answer["message"]),
                         (200, "transport webhook paused"))
        code, _ = await self.post("do=pause&kind=site&name=ex", csrf=csrf)
        self.assertEqual(code, 200)
        self.assertEqual(sorted(await self.store.settings()),
                         ["pause:site:ex", "pause:transport:webhook"])
        code, answer = await self.post("do=resume&kind=transport&name=webhook",
                                       csrf=csrf)
        self.assertEqual((code, answer["message"]),
                         (200, "transport webhook resumed"))
        self.assertEqual(list(await self.store.settings()), ["pause:site:ex"])

    async def test_deadLetters(self):
        await self.serve()
        csrf = await self.csrf()
        await self.queue.enqueue([Item(transport="nowhere", payload={})
                                  for _ in range(3)])
        for delivery in await self.queue.claim(3, TransportFilter()):
            await self.queue.deadLetter(delivery, "badhandler", "none", 1)
        ids = [d.id for d in await self.queue.deadList()]
        code, answer = await self.post(f"do=retry&id={ids[0]}", csrf=csrf)
        self.assertEqual((code, answer["message"]),
                         (200, "requeued 1 dead letters"))
        self.assertEqual((await self.queue.depth()).ready, 1)
        code, answer = await self.post("do=purge&id=all", csrf=csrf)
        self.assertEqual((code, answer["message"]),
                         (200, "purged 2 dead letters"))
        code, _ = await self.post("do=purge&id=x", csrf=csrf)
        self.assertEqual(code, 400)
