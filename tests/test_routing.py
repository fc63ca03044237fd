# -*- test-case-name: tests.test_routing -*-
"""
Which items a worker takes (L{TransportFilter}), which broker queues or
Redis lists it consumes (L{consumedSpecs}), and where a new item goes
(L{Routing}).
"""

import os
import sys
import textwrap
import uuid

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.handlers import QueueHandler
from snq.handlers.source import Unreadable, sourceGroup
from snq.routing import (
    Routing,
    RoutingError,
    SourceRouting,
    TransportFilter,
    consumedSpecs,
    describeFilter,
)


class TransportFilterTests(SynchronousTestCase):
    groupOf = {"webhook": "main", "xmppout": "xmpp", "mail": "slow"}

    def test_mainTakesWhatNoOtherActiveGroupClaims(self):
        f = TransportFilter.forGroups(["main"], self.groupOf)
        self.assertTrue(f.accepts("webhook"))
        self.assertTrue(f.accepts("unknown"), "main catches unknown transports")
        self.assertFalse(f.accepts("xmppout"))
        self.assertFalse(f.accepts("mail"))

    def test_otherGroupsTakeOnlyTheirOwn(self):
        f = TransportFilter.forGroups(["xmpp"], self.groupOf, site="big")
        self.assertTrue(f.accepts("xmppout"))
        self.assertFalse(f.accepts("webhook"))
        self.assertFalse(f.accepts("unknown"))
        self.assertEqual((f.site, f.groups), ("big", ("xmpp",)))

    def test_describe(self):
        self.assertEqual(describeFilter(TransportFilter()), "all transports")
        self.assertEqual(
            describeFilter(TransportFilter.forGroups(["main"], self.groupOf)),
            "all transports but mail, xmppout")
        self.assertEqual(
            describeFilter(TransportFilter.forGroups(["xmpp"], self.groupOf, "a")),
            "xmppout of site a")


class ConsumedTests(SynchronousTestCase):
    def test_groupsBreakoutsSites(self):
        breakouts = {"main/a", "main/a/big", "main/b/small", "xmpp/x/big"}
        self.assertEqual(consumedSpecs(["main"], breakouts),
                         ["main", "main/a", "main/a/big", "main/b/small"])
        self.assertEqual(consumedSpecs(["main", "xmpp"], breakouts, "big"),
                         ["main/a/big", "xmpp/x/big"])
        self.assertEqual(consumedSpecs(["main"], breakouts, "none"), [])


class RoutingTests(SynchronousTestCase):
    def test_mostSpecificBreakoutWins(self):
        routing = Routing(snqconfig.parse({
            "queue": {"breakout": ["main/webhook", "main/webhook/big"]},
            "transports": {"mail": {"group": "slow"}}}))
        self.assertEqual(routing.route("webhook", "big"), "main/webhook/big")
        self.assertEqual(routing.route("webhook", "small"), "main/webhook")
        self.assertEqual(routing.route("log", "big"), "main")
        self.assertEqual(routing.route("mail", "big"), "slow",
                         "[transports.X] group")
        self.assertEqual(routing.route("xmppout", "big"), "xmpp",
                         "the handler's own group")

    def test_brokenHandlersRouteByConfigAlone(self):
        routing = Routing(snqconfig.parse({
            "handlers": {"x": "no.such.module:Handler"},
            "transports": {"x": {"group": "other"}}}))
        self.assertEqual(routing.route("x", "default"), "other")
        self.assertEqual(routing.route("webhook", "default"), "main")


class SourceGroupTests(SynchronousTestCase):
    """Handlers' groups read from their source, without importing them."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.package = f"handlers_{uuid.uuid4().hex[:8]}"
        os.makedirs(os.path.join(self.root, self.package, "sub"))
        sys.path.insert(0, self.root)
        self.addCleanup(sys.path.remove, self.root)
        self.write("__init__.py", "import twisted_free_test_marker  # never run\n")
        self.write("sub/__init__.py", "")

    def write(self, name, text):
        with open(os.path.join(self.root, self.package, name), "w") as f:
            f.write(textwrap.dedent(text))

    def group(self, path):
        return sourceGroup(f"{self.package}.{path}")

    def test_literalInherited(self):
        self.write("base.py", """
            from snq.handlers import QueueHandler

            class Chatty(QueueHandler):
                group: str = "chat"
        """)
        self.write("sub/mod.py", """
            import snq.handlers
            from .. import base as b
            from ..base import Chatty as Talk

            class Own(snq.handlers.QueueHandler):
                group = "own"

            class Plain(snq.handlers.QueueHandler):
                pass

            class Mixin:
                pass

            class ViaAlias(Mixin, Talk):
                pass

            class ViaModule(b.Chatty):
                pass

            class Local(Own):
                transport = "x"

            class Renamed(Own):
                group = "first"
                group = "last"
        """)
        self.assertEqual(self.group("sub.mod:Own"), "own")
        self.assertEqual(self.group("sub.mod:Plain"), "main")
        self.assertEqual(self.group("sub.mod:ViaAlias"), "chat")
        self.assertEqual(self.group("sub.mod:ViaModule"), "chat")
        self.assertEqual(self.group("sub.mod:Local"), "own")
        self.assertEqual(self.group("sub.mod:Renamed"), "last")
        self.assertNotIn(self.package, sys.modules, "nothing was imported")

    def test_unreadable(self):
        self.write("dyn.py", """
            import os
            from snq.handlers import QueueHandler

            class Computed(QueueHandler):
                group = os.environ.get("GROUP", "main")

            def make():
                return QueueHandler

            class Made(make()):
                pass

            class Property(QueueHandler):
                @property
                def group(self):
                    return "x"
        """)
        for path, why in [("dyn:Computed", "not a string literal"),
                          ("dyn:Made", "not a plain name"),
                          ("dyn:Property", "not a string literal"),
                          ("dyn:Missing", "not a class written"),
                          ("nosuch:Handler", "not installed here")]:
            e = self.assertRaises(Unreadable, self.group, path)
            self.assertIn(why, str(e))

    def test_builtins(self):
        self.assertEqual(sourceGroup("snq.xmpp.xmppout:XmppOutHandler"), "xmpp")
        self.assertEqual(sourceGroup("snq.handlers.webhook:WebhookHandler"), "main")


class SourceRoutingTests(SynchronousTestCase):
    def test_sameAsTheDaemon(self):
        config = snqconfig.parse({
            "queue": {"breakout": ["main/webhook", "xmpp/xmppout/big"]},
            "transports": {"mail": {"group": "slow"}}})
        daemon, producer = Routing(config), SourceRouting(config)
        for transport in ("webhook", "xmppout", "mail", "log", "unknown"):
            for site in ("big", "small"):
                self.assertEqual(producer.route(transport, site),
                                 daemon.route(transport, site))

    def test_unreadableGroupIsAnError(self):
        config = snqconfig.parse({
            "handlers": {"x": "no.such.module:Handler",
                         "y": "no.such.module:Other"},
            "transports": {"y": {"group": "other"}}})
        routing = SourceRouting(config)
        e = self.assertRaises(RoutingError, routing.route, "x", "default")
        self.assertIn("set [transports.x] group", str(e))
        self.assertEqual(routing.route("y", "default"), "other",
                         "the config's group needs no source")

    def test_daemonWarnsWhereProducersWouldDiffer(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        config = snqconfig.parse({"handlers": {
            "odd": "tests.test_routing:ComputedGroup"}})
        self.assertEqual(Routing(config).route("odd", "default"), "computed")
        [warning] = [e for e in events if e.get("name") == "odd"]
        self.assertIn("[transports.odd] group", formatEvent(warning))


class ComputedGroup(QueueHandler):
    group = "comp" + "uted"
