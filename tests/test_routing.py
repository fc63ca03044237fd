# -*- test-case-name: tests.test_routing -*-
"""
Which items a worker takes (L{TransportFilter}), which broker queues or
Redis lists it consumes (L{consumedSpecs}), and where a new item goes
(L{Routing}).
"""

from twisted.trial.unittest import SynchronousTestCase

from snq import config as snqconfig
from snq.routing import Routing, TransportFilter, consumedSpecs, describeFilter


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
