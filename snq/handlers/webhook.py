# -*- test-case-name: tests.test_webhook -*-
"""
C{webhook}: POST an item's payload as JSON.

The URL is the payload's own C{url} (with the JSON to send in C{body}), or
else the site's C{webhook_url} (the whole payload is sent).  2xx is done;
5xx, 408, 429, a timeout (30 s unless the transport sets one) or a
connection error are retried; any other answer
is final and dead-letters the item.  With the site's C{webhook_secret} set,
each request carries C{X-Snq-Signature: sha256=HEX}, the HMAC-SHA256 of the
exact body, so the receiver can tell it came from us.
"""

import hashlib
import hmac
import json

from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from snq.handlers import QueueHandler, Reject, Retry

_RETRY_STATUSES = {408, 429}


class WebhookError(Retry):
    """The remote answered, but not yet usefully: try again later."""


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body,
                                hashlib.sha256).hexdigest()


class WebhookHandler(QueueHandler):
    transport = "webhook"
    #: A remote that has not answered in 30 s is retried later.
    timeout = 30.0
    log = Logger()

    def __init__(self, context):
        super().__init__(context)
        self._client = None

    def _http(self):
        if self._client is None:
            import treq.client
            from twisted.internet import reactor

            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._client = treq.client.HTTPClient(Agent(reactor, pool=self._pool))
        return self._client

    def stop(self):
        if self._client is not None:
            self._client = None
            return self._pool.closeCachedConnections()

    async def handle(self, item):
        url, document = self._target(item)
        body = json.dumps(document, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "snq-webhook",
            "X-Snq-Item": item.id,
            "X-Snq-Attempt": str(item.attempts + 1),
        }
        secret = self.context.siteConfig(item.site).get("webhook_secret")
        if secret:
            headers["X-Snq-Signature"] = signature(secret, body)
        response = await self._http().post(url, data=body, headers=headers)
        text = (await response.content())[:200].decode("utf-8", "replace")
        code = response.code
        if 200 <= code < 300:
            return True
        if code >= 500 or code in _RETRY_STATUSES:
            raise WebhookError(f"{url} answered HTTP {code}: {text}")
        raise Reject(f"{url} answered HTTP {code}: {text}")

    def _target(self, item):
        payload = item.payload
        if isinstance(payload, dict) and "url" in payload:
            url = payload["url"]
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise Reject("webhook payload 'url' must be an http(s) URL")
            return url.encode("utf-8"), payload.get("body")
        url = self.context.siteConfig(item.site).get("webhook_url")
        if not url:
            raise Reject(f"no webhook URL: the payload has no 'url' and site "
                         f"{item.site!r} sets no webhook_url")
        return url.encode("utf-8"), payload
