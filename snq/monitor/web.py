# -*- test-case-name: tests.test_monitor -*-
"""
The master's HTTP side (C{[monitor] http}, C{127.0.0.1:8750} by default):

* C{/}: the dashboard, one HTML page and one script from the package;
* C{/metrics}: Prometheus' text format;
* C{/status.json}: what the dashboard shows; C{?since=T} leaves out the
  samples up to time C{T}, which the page has already;
* C{/action}: what the dashboard does (L{snq.monitor.actions}), a POST
  without a body, behind the token and a CSRF check.

With C{[monitor] token}, C{/metrics} and C{/status.json} answer only to
C{Authorization: Bearer TOKEN}.  The dashboard's own files hold no data and
need none: the page reads the token from its address (C{/#token=TOKEN}; a
fragment never reaches a server or its logs) and sends it itself.

Nothing here takes a request body (an action's arguments are in its
query), so one is refused as soon as the
headers announce it, before a byte of it is read (twisted.web would
otherwise spool it to a temporary file first); and a request whose
C{Host} is not one of the monitor's names (C{[monitor] hosts}) is
refused, so that a web page in a browser on this machine cannot reach the
monitor through a name of its own (DNS rebinding).
"""

import hmac
import json
from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from snq.config import LOOPBACK_NAMES, parseHostPort
from snq.monitor.actions import ActionError
from snq.service import defaultReactor

#: The page loads nothing but its own two files, and runs no inline script.
_POLICY = (b"default-src 'self'; style-src 'self' 'unsafe-inline'; "
           b"img-src 'self' data:; frame-ancestors 'none'")


class _File(resource.Resource):
    isLeaf = True

    def __init__(self, name: str, contentType: bytes):
        super().__init__()
        self.body = (resources.files(__package__) / "static" / name).read_bytes()
        self.contentType = contentType

    def render_GET(self, request):
        request.setHeader(b"content-type", self.contentType)
        request.setHeader(b"content-security-policy", _POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        return self.body


class _Data(resource.Resource):
    """Numbers, made fresh at each request; behind the token if there is one."""

    isLeaf = True

    def __init__(self, token: str, contentType: bytes, produce):
        super().__init__()
        self.expected = f"Bearer {token}".encode() if token else None
        self.contentType = contentType
        self.produce = produce

    def render_GET(self, request):
        request.setHeader(b"cache-control", b"no-store")
        given = request.getHeader(b"authorization") or b""
        if self.expected is not None and not hmac.compare_digest(given,
                                                                 self.expected):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="snq"')
            return b"this needs Authorization: Bearer TOKEN ([monitor] token)\n"
        request.setHeader(b"content-type", self.contentType)
        return self.produce(request)


class _Action(resource.Resource):
    """C{POST /action?do=…}: L{snq.monitor.actions.Actions.run}, if allowed."""

    isLeaf = True
    log = Logger()

    def __init__(self, actions):
        super().__init__()
        self.actions = actions

    def render_POST(self, request):
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", b"application/json")
        try:
            self.actions.authorize(request.getHeader)
            d = self.actions.run(request.args)
        except ActionError as e:
            return self._answer(request, e.code, str(e))

        def failed(failure):
            if failure.check(ActionError):
                return self._answer(request, failure.value.code,
                                    str(failure.value))
            self.log.failure("dashboard action failed", failure)
            return self._answer(request, 500, failure.getErrorMessage())

        d.addCallbacks(lambda message: self._answer(request, 200, message),
                       failed)
        d.addCallback(lambda body: (request.write(body), request.finish()))
        return server.NOT_DONE_YET

    def _answer(self, request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        return json.dumps({"ok": code == 200, "message": message}).encode()


class _NoBodyChannel(http.HTTPChannel):
    """An HTTP connection that refuses a request body before reading it."""

    def allHeadersReceived(self):
        if self.length == 0:
            return super().allHeadersReceived()
        message = b"the snq monitor takes no request body\n"
        self.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n"
            b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
            % (len(message), message))
        # Reading stops here: what the client still sends is never read.
        self.loseConnection()


class _Misdirected(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(421)
        request.setHeader(b"content-type", b"text/plain")
        return b"unknown Host: see [monitor] hosts\n"


def _hostName(header: bytes) -> str:
    """C{example.org:8750} or C{[::1]:8750} → the name alone, lower case."""
    text = header.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    name, _, port = text.rpartition(":")
    return name if name and port.isdigit() else text


class _QuietSite(server.Site):
    """
    No access log: the dashboard asks every second.  Answers only to its
    C{hosts}, and takes no request body.
    """

    noisy = False
    protocol = _NoBodyChannel

    def __init__(self, root, hosts):
        super().__init__(root)
        self.hosts = hosts

    def getResourceFor(self, request):
        if _hostName(request.getHeader(b"host") or b"") not in self.hosts:
            return _Misdirected()
        return super().getResourceFor(request)

    def log(self, request):
        pass


def makeSite(tracker, registry, token: str = "", hosts=LOOPBACK_NAMES,
             actions=None, cluster=None) -> server.Site:
    """
    C{actions} (L{snq.monitor.actions.Actions}) answers C{/action};
    C{cluster()}, the cluster's view (L{snq.cluster.registry}), goes into
    C{/status.json}.
    """
    def status(request):
        try:
            since = float(request.args[b"since"][0])
        except (KeyError, ValueError):
            since = None
        status = tracker.status(since)
        status["cluster"] = cluster() if cluster is not None else None
        # Only a page that may read this (the token) learns it.
        status["csrf"] = actions.csrf if actions is not None and token else None
        return json.dumps(status).encode()

    root = resource.Resource()
    root.putChild(b"", _File("index.html", b"text/html; charset=utf-8"))
    root.putChild(b"dashboard.js",
                  _File("dashboard.js", b"text/javascript; charset=utf-8"))
    root.putChild(b"metrics", _Data(token, CONTENT_TYPE_LATEST.encode(),
                                    lambda request: generate_latest(registry)))
    root.putChild(b"status.json", _Data(token, b"application/json", status))
    if actions is not None:
        root.putChild(b"action", _Action(actions))
    return _QuietSite(root, hosts)


class HttpService(Service):
    """
    Listens on C{HOST:PORT}.  When it cannot (the port is taken), the daemon
    runs on without it, and says so: a busy port must not stop the queues.
    """

    log = Logger()

    def __init__(self, address: str, site, reactor=None):
        reactor = defaultReactor(reactor)
        self.address = address
        self.site = site
        self.reactor = reactor
        #: The listening port, once listening.
        self.port = None

    def startService(self):
        super().startService()
        host, port = parseHostPort(self.address)
        # What TCP4/6ServerEndpoint do, without endpoints' import of TLS.
        d = defer.execute(self.reactor.listenTCP, port, self.site, interface=host)
        d.addCallbacks(self._listening, self._cannotListen)
        return d

    def _listening(self, port):
        self.port = port
        host = port.getHost()
        shown = f"[{host.host}]" if ":" in host.host else host.host
        self.log.info("monitor: dashboard, /metrics and /status.json on "
                      "http://{host}:{port}/", host=shown, port=host.port)

    def _cannotListen(self, failure):
        self.log.error("monitor: cannot listen on {address} ({why}); snq runs "
                       "without its dashboard and /metrics", address=self.address,
                       why=failure.getErrorMessage())

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)
