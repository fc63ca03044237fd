# -*- test-case-name: tests.test_lean -*-
"""
A process imports what its config uses, and no more.

Twisted's reactor (C{posixbase}, C{tcp}) and C{twisted.protocols.amp}
import pyOpenSSL, cryptography and service_identity whenever they are
installed, for C{connectSSL}/C{listenSSL}, C{ITLSTransport.startTLS} and
AMP's C{StartTLS}: about 13 MB of resident memory and 80 modules per
process, which snq's master and workers use only for XMPP (whose TLS is a
C{startTLS} on the stream).  Every other TLS in snq (Redis, STOMP,
webhooks) wraps an endpoint (C{wrapClientTLS}), which imports TLS when it
is first used and works the same either way.

L{withoutTLS} imports such modules as if TLS were not installed; L{needsStartTLS}
says when a process must not (its config runs XMPP).
"""

import contextlib
import sys

#: What C{posixbase}, C{tcp} and C{amp} try to import, and do without.
TLS_MODULES = ("OpenSSL", "twisted.internet.ssl", "twisted.internet._newtls",
               "twisted.protocols.tls")


@contextlib.contextmanager
def withoutTLS():
    """
    Import Twisted modules as if pyOpenSSL were not installed: those that
    only offer TLS when they find it do without.  Afterwards TLS imports
    normally again, for the endpoints that wrap a connection in it.
    """
    blocked = [name for name in TLS_MODULES if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # an ImportError for "import name"
    try:
        yield
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def needsStartTLS(config, role: str = "all") -> bool:
    """
    Whether a process of C{role} under C{config} starts TLS on a connection
    it already has (XMPP), which only a reactor imported with TLS can.
    """
    return "xmpp" in config.queue.groups and role in ("all", "xmpp")


def installReactor(startTLS: bool = False):
    """
    The global reactor, installed now if it is not yet: without TLS unless
    C{startTLS}.  → the reactor.
    """
    if "twisted.internet.reactor" not in sys.modules and not startTLS:
        with withoutTLS():
            from twisted.internet import reactor
    from twisted.internet import reactor

    return reactor
