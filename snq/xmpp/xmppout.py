# -*- test-case-name: tests.test_xmpp_manager -*-
"""
C{xmppout}: send an item's message, or raw stanza, through its site's XMPP
account.

Loaded by every worker (the handler registry loads all handlers), so this
module imports no wokkel and no TLS: only the worker that runs the "xmpp"
group holds connections and actually sends.
"""

from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

from snq.handlers import QueueHandler, Reject, Retry

MESSAGE_KEYS = ("to", "body", "type", "subject", "thread")
MESSAGE_TYPES = ("chat", "normal", "headline", "groupchat")
STANZA_NAMES = ("message", "presence", "iq")
NS_CLIENT = "jabber:client"


class NotConnected(Retry):
    """
    No stream is up for the item's account here; the item is retried later.
    """


class XmppOutHandler(QueueHandler):
    """
    Payload C{{"to", "body"[, "type", "subject", "thread"]}} (type "chat"
    unless given), or C{{"stanza": "<message …/>"}} sent as it is.

    Done once the server has the stanza; a bad payload or a site without an
    account is rejected at once; no connection means a retry.  A message's
    C{id} is the item's, so a bounce in the log names the item.
    """

    transport = "xmppout"
    group = "xmpp"

    def handle(self, item):
        element = stanzaFor(item.payload, item.id)
        account = self.context.config.xmppSite(item.site)
        if account is None:
            raise Reject(f"site {item.site!r} has no XMPP account: set [xmpp] "
                         f"jid, or [sites.{item.site}.xmpp] jid")
        manager = self.context.xmpp(item.site)
        if manager is None:
            raise NotConnected(
                f"this worker holds no XMPP connection for {account!r}: only "
                f"a worker whose groups include \"xmpp\" may run xmppout")
        return manager.send(element)


def stanzaFor(payload, stanzaId: str) -> domish.Element:
    """The stanza an C{xmppout} payload asks for, or L{Reject} saying why not."""
    if not isinstance(payload, dict):
        raise Reject("xmppout payload must be a JSON object")
    if "stanza" in payload:
        if len(payload) > 1:
            raise Reject("xmppout 'stanza' comes alone, without other keys")
        return _rawStanza(payload["stanza"], stanzaId)
    unknown = sorted(set(payload) - set(MESSAGE_KEYS))
    if unknown:
        raise Reject(f"xmppout payload has unknown keys {', '.join(unknown)} "
                     f"(known: {', '.join(MESSAGE_KEYS)}, or 'stanza' alone)")
    to = payload.get("to")
    try:
        if not isinstance(to, str):
            raise InvalidFormat
        recipient = JID(to)
    except InvalidFormat:
        raise Reject(f"xmppout 'to' must be a JID, got {to!r}")
    body = payload.get("body")
    if not isinstance(body, str) or not body:
        raise Reject("xmppout 'body' must be a non-empty string")
    kind = payload.get("type", "chat")
    if kind not in MESSAGE_TYPES:
        raise Reject(f"xmppout 'type' must be one of {', '.join(MESSAGE_TYPES)},"
                     f" got {kind!r}")
    message = domish.Element((None, "message"))
    message["to"] = recipient.full()
    message["type"] = kind
    message["id"] = stanzaId
    for key in ("subject", "body", "thread"):
        value = payload.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise Reject(f"xmppout {key!r} must be a string")
        message.addElement(key, content=value)
    return message


def _rawStanza(text, stanzaId: str) -> domish.Element:
    if not isinstance(text, str):
        raise Reject("xmppout 'stanza' must be a string of XML")
    roots, ended = [], []
    stream = domish.elementStream()
    stream.DocumentStartEvent = roots.append
    stream.ElementEvent = lambda child: roots[0].addChild(child)
    stream.DocumentEndEvent = lambda: ended.append(True)
    try:
        stream.parse(text.encode("utf-8"))
    except domish.ParserError as e:
        raise Reject(f"xmppout 'stanza' is not XML: {e}")
    if not ended:
        raise Reject("xmppout 'stanza' is not a complete XML element")
    [element] = roots
    if element.name not in STANZA_NAMES or element.uri not in ("", NS_CLIENT):
        namespace = repr(element.uri) if element.uri else "no namespace"
        raise Reject(f"xmppout 'stanza' must be a jabber:client message, "
                     f"presence or iq, got <{element.name}> in {namespace}")
    if not element.getAttribute("id"):
        element["id"] = stanzaId
    return element
