# -*- test-case-name: tests.test_xmpp_manager -*-
"""
A worker's XMPP connections: one L{XmppManager} per site with an account,
in the worker whose role includes the "xmpp" group.  Importing this module
imports neither wokkel nor OpenSSL: only a worker that connects does.
"""

from twisted.internet import defer

from snq.routing import groupsOf
from snq.service import AsyncMultiService


class XmppAccounts(AsyncMultiService):
    """
    Compared by site, in the manner of buildbot's service managers: on a
    reload an account that changed connects again (after its old
    connection is closed: one session per JID); the others stay connected.
    The managers are also the handlers' (C{context.xmppManagers}).

    C{active} False (a worker waiting for the C{xmpp} group's lease,
    L{snq.ledger.holder}) connects none; L{activate} changes it.
    """

    def __init__(self, context, role: str, clock, active: bool = True):
        super().__init__()
        self.context = context
        self.role = role
        self.clock = clock
        self.active = active
        self._following = defer.succeed(None)
        self.follow(context.config)

    def reconfigService(self, config):
        return self.follow(config)

    def activate(self, active: bool) -> defer.Deferred:
        """Connect (True) or disconnect (False) every account; → what changed."""
        self.active = active
        return self.follow(self.context.config)

    def follow(self, config) -> defer.Deferred:
        """
        Connect the accounts C{config} wants here, after what an earlier
        call closes (one session per JID); → what changed, in words.
        """
        result, active = defer.Deferred(), self.active

        def run(_):
            d = defer.maybeDeferred(self._follow, config, active)
            d.addBoth(result.callback)
            return d

        self._following.addCallback(run)
        return result

    def _follow(self, config, active: bool) -> defer.Deferred:
        managers = self.context.xmppManagers
        wanted = (config.xmppAccounts() if active and "xmpp" in groupsOf(
            config, self.role) else {})
        applied, closing = [], []
        for site, manager in sorted(managers.items()):
            if wanted.get(site) != manager.settings:
                del managers[site]
                closing.append(defer.maybeDeferred(manager.disownServiceParent))
                applied.append(f"xmpp {site}: {manager.settings.jid} "
                               "disconnected")
        if not wanted.keys() - managers.keys():
            return defer.gatherResults(closing).addCallback(lambda _: applied)
        from snq.xmpp.manager import XmppManager

        def connect(_):
            for site, account in sorted(wanted.items()):
                if site not in managers:
                    manager = XmppManager(site, account, self.context, self.clock)
                    manager.setServiceParent(self)
                    managers[site] = manager
                    applied.append(f"xmpp {site}: {account.jid} connecting")
            return applied

        return defer.gatherResults(closing).addCallback(connect)
