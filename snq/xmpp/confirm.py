# -*- test-case-name: tests.test_xmpp_confirm -*-
"""
XMPP address confirmation through the queue, where StatusNet's
XmppConfirmManager polled its database.

The web application enqueues an C{xmppconfirm} item C{{"jid", "code",
"url", "site"}}; the site's XMPP account asks the JID for a presence
subscription if it has none, and sends the confirmation message (the
site's template), once per (JID, code) however often the item is retried
or enqueued.  A reply from that JID containing the code (or the configured
keyword alone) becomes one C{xmppconfirmed} item C{{"jid", "code",
"site"}}, and a thank-you; a reply with a code that has expired gets a
message saying so, and no item.  Any other message is an C{xmppin} item as
ever.

The handler runs in the XMPP worker (group "xmpp") with the
C{xmppconfirm} IoManager, which watches the replies; what was sent and the
codes waiting for a reply are kept in the ledger, so a restarted worker
knows them.  Importing this module imports no wokkel.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

from snq.config import DURATION, ConfigError, buildSettings, check, parseDuration
from snq.handlers import QueueHandler, Reject, Retry
from snq.iomanager import IoManager
from snq.xmpp.xmppout import NotConnected

#: Seconds a handler holds a (JID, code) while it sends; a worker killed
#: meanwhile lets the item's next try send after this.
SENDING = 120.0
TEMPLATE_FIELDS = ("jid", "code", "url", "site")


def _template(value) -> bool:
    try:
        value.format(**{k: "" for k in TEMPLATE_FIELDS})
    except (KeyError, IndexError, ValueError):
        return False
    return True


_templated = check(_template, "text whose {fields} are among "
                    + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS))


@dataclass(frozen=True)
class ConfirmSettings:
    """
    C{[iomanagers.xmppconfirm]}; a site's C{[sites.NICK.xmppconfirm]}
    table may set any of them for that site.
    """

    #: How long a code may be confirmed after it was sent.
    expiry: str | float = field(default="24h", metadata=DURATION)
    #: How long an expired code is still answered with C{expired}.
    keep: str | float = field(default="7d", metadata=DURATION)
    #: A reply of this word alone confirms the newest code sent to that JID.
    keyword: str = ""
    template: str = field(default=(
        "Someone (hopefully you) has asked to add {jid} to an account on "
        "{site}. To confirm, reply with this code: {code} (or open {url}). "
        "If it was not you, ignore this message."), metadata=_templated)
    confirmed: str = field(default="Thank you: {jid} is confirmed on {site}.",
                           metadata=_templated)
    expired: str = field(default=(
        "That code has expired: ask {site} for a new confirmation message."),
        metadata=_templated)


def siteSettings(config, settings: ConfirmSettings, site: str) -> ConfirmSettings:
    """C{settings} with C{[sites.SITE.xmppconfirm]} over them."""
    table = config.siteConfig(site).get("xmppconfirm") or {}
    return dataclasses.replace(settings, **table) if table else settings


def _jid(text) -> JID:
    """
    The address to confirm: user@domain, or with a resource to send the
    message to that session alone (replies count from any of its sessions).
    """
    try:
        if not isinstance(text, str):
            raise InvalidFormat
        jid = JID(text)
    except InvalidFormat:
        raise Reject(f"xmppconfirm 'jid' must be a JID, got {text!r}")
    if jid.user is None:
        raise Reject(f"xmppconfirm 'jid' must be user@domain, got {text!r}")
    return jid


class XmppConfirmHandler(QueueHandler):
    """C{xmppconfirm} items; the work is the L{ConfirmManager}'s."""

    transport = "xmppconfirm"
    group = "xmpp"

    def handle(self, item):
        payload = item.payload
        if not isinstance(payload, dict):
            raise Reject("xmppconfirm payload must be a JSON object")
        unknown = sorted(set(payload) - set(TEMPLATE_FIELDS))
        if unknown:
            raise Reject(f"xmppconfirm payload has unknown keys "
                         f"{', '.join(unknown)} (known: jid, code, url, site)")
        code = payload.get("code")
        if not isinstance(code, str) or not re.fullmatch(r"\w[\w-]*", code):
            raise Reject("xmppconfirm 'code' must be a word of letters and "
                         "digits")
        site = payload.get("site", item.site)
        if site != item.site:
            raise Reject(f"xmppconfirm 'site' {site!r} is not the item's site "
                         f"{item.site!r}")
        url = payload.get("url", "")
        if not isinstance(url, str):
            raise Reject("xmppconfirm 'url' must be a string")
        manager = self.context.iomanagers.get("xmppconfirm")
        if manager is None:
            raise Reject("the xmppconfirm IoManager does not run in this "
                         "worker: add [iomanagers.xmppconfirm] to the config")
        return manager.confirm(item.id, _jid(payload.get("jid")), code, url,
                               site)


class ConfirmManager(IoManager):
    """The C{xmppconfirm} IoManager, in the XMPP worker."""

    log = Logger()
    Settings = ConfirmSettings
    usesLedger = True

    def __init__(self, context):
        super().__init__(context.clock)
        self.context = context

    @classmethod
    def check(cls, config, settings):
        problems = []
        for site, table in sorted(config.sites.items()):
            own = table.get("xmppconfirm")
            if own is None:
                continue
            where = f"sites.{site}.xmppconfirm"
            if not isinstance(own, dict):
                problems.append(f"{where}: expected a table")
                continue
            try:
                buildSettings(ConfirmSettings, own, where)
            except ConfigError as e:
                problems += e.problems
        return problems

    def startService(self):
        super().startService()
        self.context.handlers.xmppInbound.append(self.inbound)

    def stopService(self):
        super().stopService()
        self.context.handlers.xmppInbound.remove(self.inbound)

    def _settings(self, site) -> ConfirmSettings:
        return siteSettings(self.context.config, self.context.settings, site)

    def _codesKey(self, site, jid) -> str:
        return f"xmppconfirm:codes:{site}:{jid.userhost()}"

    @defer.inlineCallbacks
    def confirm(self, itemId, jid, code, url, site):
        """Send C{code} to C{jid} once; fires when sent (or sent before)."""
        settings = self._settings(site)
        ledger = yield self.context.ledger()
        sent = f"xmppconfirm:sent:{site}:{jid.userhost()}:{code}"
        if not (yield ledger.lease(sent, itemId, SENDING)):
            if (yield ledger.get(sent)) == "sent":
                self.context.count("duplicate", site=site)
                return None
            raise Retry(f"the code for {jid.userhost()} is being sent by "
                        "another item")
        try:
            manager = self.context.xmpp(site)
            if manager is None:
                raise NotConnected(f"site {site!r} has no XMPP connection here")
            expires = self.clock.seconds() + parseDuration(settings.expiry)
            kept = parseDuration(settings.expiry) + parseDuration(settings.keep)
            yield self._remember(ledger, site, jid, code,
                                 {"expires": expires, "url": url}, kept)
            yield manager.ensureSubscribed(jid)
            yield manager.send(_message(jid.full(), settings.template.format(
                jid=jid.userhost(), code=code, url=url, site=site)))
        except Exception:
            yield ledger.release(sent, itemId)
            raise
        yield ledger.put(sent, "sent", kept)
        self.context.count("sent", site=site)
        self.log.info("confirmation code sent to {jid} for site {site}",
                      jid=jid.userhost(), site=site)
        return None

    @defer.inlineCallbacks
    def _remember(self, ledger, site, jid, code, info, ttl):
        """One worker holds a site's account, so no one else writes this."""
        key = self._codesKey(site, jid)
        codes = json.loads((yield ledger.get(key)) or "{}")
        codes[code] = {**codes.get(code, {}), **info}
        now = self.clock.seconds()
        keep = parseDuration(self._settings(site).keep)
        codes = {c: i for c, i in codes.items() if i["expires"] + keep > now}
        yield ledger.put(key, json.dumps(codes), ttl)

    @defer.inlineCallbacks
    def inbound(self, site, payload):
        """
        A message to C{site}'s account: True if it was a reply to a
        confirmation (then dealt with here), False for any other message.
        """
        sender = JID(payload["from"])
        ledger = yield self.context.ledger()
        key = self._codesKey(site, sender)
        codes = json.loads((yield ledger.get(key)) or "{}")
        if not codes:
            return False
        settings = self._settings(site)
        body = payload["body"]
        code = _codeIn(body, codes, settings.keyword)
        if code is None:
            return False
        bare = sender.userhost()
        fields = dict(jid=bare, code=code, url=codes[code].get("url", ""),
                      site=site)
        if self.clock.seconds() > codes[code]["expires"]:
            self.context.count("expired", site=site)
            self.log.info("expired confirmation code from {jid} for site {site}",
                          jid=bare, site=site)
            yield self._answer(site, sender, settings.expired.format(**fields))
            return True
        item = self.context.item("xmppconfirmed", {"jid": bare, "code": code,
                                                   "site": site}, site)
        kept = parseDuration(settings.expiry) + parseDuration(settings.keep)
        new = yield self.context.enqueueOnce(
            [(f"xmppconfirm:confirmed:{site}:{bare}:{code}", item)], kept)
        if new:
            self.context.count("confirmed", site=site)
            self.log.info("{jid} confirmed for site {site}", jid=bare, site=site)
            yield self._answer(site, sender, settings.confirmed.format(**fields))
        else:
            self.context.count("repeated", site=site)
        return True

    def _answer(self, site, to, body):
        return self.context.enqueue("xmppout", {"to": to.full(), "body": body},
                                    site)


def _codeIn(body: str, codes: dict, keyword: str) -> str | None:
    """
    The code a reply confirms: one it contains, else, for the keyword
    alone, the newest.
    """
    for code in codes:
        if re.search(rf"(?<![\w-]){re.escape(code)}(?![\w-])", body):
            return code
    if keyword and body.strip().lower() == keyword.lower():
        return max(codes, key=lambda c: codes[c]["expires"])
    return None


def _message(to: str, body: str):
    message = domish.Element((None, "message"))
    message["to"], message["type"] = to, "chat"
    message.addElement("body", content=body)
    return message
