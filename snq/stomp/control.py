# -*- test-case-name: tests.test_stomp_backend -*-
"""
StatusNet's control channel: a topic every worker subscribes to, carrying
C{shutdown}, C{restart} or C{update:<site>} as the message body.

Anyone who may publish on the broker may publish there (RabbitMQ's
default login is guest/guest), so a worker listens to it only with
C{[stomp] control_secret} set, and then obeys only signed messages: an
HMAC-SHA256, keyed with the secret, over the body, a timestamp and a
nonce, in the headers below.  A message signed too long ago (or ahead) is
refused, and a nonce seen within that window is refused again: a recorded
message cannot be replayed.  Nonces also drop the copies a worker gets
when it subscribes on several servers of one cluster.  Unsigned control,
StatusNet's, is only for an operator who says so
(C{control_allow_unsigned = true}).

Whatever a message carries, checking it costs the same: the nonces
remembered are bounded in number and forgotten oldest first, in O(1).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import os
import re

from twisted.logger import Logger

TIMESTAMP_HEADER = "snq-timestamp"
NONCE_HEADER = "snq-nonce"
SIGNATURE_HEADER = "snq-signature"
COMMANDS = ("shutdown", "restart", "update")
#: Nonces remembered at most; beyond, the oldest are forgotten first.
MAX_NONCES = 10_000
_SIGNATURE = re.compile(r"^[0-9a-fA-F]{64}$")
_NONCE = re.compile(r"^[\x21-\x7e]{1,128}$")


class Duplicate(ValueError):
    """A control message seen already: a copy from another server, or a replay."""


def signature(secret: str, command: str, timestamp: str, nonce: str) -> str:
    text = f"snq-control\n{timestamp}\n{nonce}\n{command}"
    return hmac.new(secret.encode("utf-8"), text.encode("utf-8"),
                    hashlib.sha256).hexdigest()


def isOpen(stomp) -> bool:
    """Whether workers listen to the control channel of C{stomp} (C{[stomp]})."""
    return bool(stomp.control_secret) or stomp.control_allow_unsigned


def startWarning(stomp) -> str | None:
    """What the master warns about the control channel as it starts, if anything."""
    if stomp.control_secret:
        return None
    if stomp.control_allow_unsigned:
        return (f"the control channel {stomp.control_channel} obeys UNSIGNED "
                "messages (control_allow_unsigned = true): anyone who may "
                "publish on the broker can stop or restart every worker; set "
                "[stomp] control_secret instead")
    return (f"the control channel {stomp.control_channel} is closed: workers "
            "do not listen to it without [stomp] control_secret (set one, and "
            "sign with snqctl control; or control_allow_unsigned = true to "
            "obey anyone who may publish on the broker)")


def controlHeaders(command: str, now: float, secret: str = "") -> dict:
    """The headers to publish C{command} with (signed if there is a secret)."""
    timestamp, nonce = f"{now:.3f}", os.urandom(12).hex()
    headers = {TIMESTAMP_HEADER: timestamp, NONCE_HEADER: nonce}
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, command, timestamp, nonce)
    return headers


def parseCommand(body: str) -> tuple[str, str | None]:
    """C{"update:example"} → C{("update", "example")}; ValueError if unknown."""
    name, _, argument = body.strip().partition(":")
    if name not in COMMANDS or (name == "update") != bool(argument):
        raise ValueError(f"unknown control command {body.strip()[:80]!r}")
    return name, argument or None


class ControlVerifier:
    """Decides whether a control message is to be obeyed."""

    log = Logger()

    def __init__(self, secret: str, window: float, clock,
                 maxNonces: int = MAX_NONCES):
        self.secret = secret
        self.window = window
        self.clock = clock
        self.maxNonces = maxNonces
        #: nonce → when it was seen, oldest first.
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def check(self, body: bytes, headers: dict) -> tuple[str, str | None]:
        """
        The command and its argument, or ValueError saying why the message
        is refused.
        """
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("the body is not UTF-8")
        command = parseCommand(text)
        now = self.clock.seconds()
        self._forget(now)
        nonce = headers.get(NONCE_HEADER)
        if nonce is not None and not _NONCE.match(nonce):
            raise ValueError("its nonce is malformed")
        if self.secret:
            self._verify(text.strip(), headers, nonce, now)
        if nonce is not None:
            if nonce in self._seen:
                raise Duplicate(f"nonce {nonce!r} was seen already")
            self._seen[nonce] = now
            if len(self._seen) > self.maxNonces:
                self._seen.popitem(last=False)
        return command

    def _verify(self, text, headers, nonce, now):
        timestamp, given = headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)
        if given is None or timestamp is None or nonce is None:
            raise ValueError("it is not signed, and control_secret is set")
        if not _SIGNATURE.match(given):
            raise ValueError("its signature is malformed")
        try:
            signed = float(timestamp)
        except ValueError:
            signed = math.nan
        if not math.isfinite(signed):
            raise ValueError(f"its timestamp {timestamp[:32]!r} is not a "
                             "finite number")
        expected = signature(self.secret, text, timestamp, nonce)
        if not hmac.compare_digest(expected, given.lower()):
            raise ValueError("its signature is wrong")
        age = now - signed
        if abs(age) > self.window:
            raise ValueError(f"it was signed {age:.0f} s ago, outside the "
                             f"{self.window:g} s window")

    def _forget(self, now):
        """Drop the nonces too old to matter: oldest first, O(1) a message."""
        seen = self._seen
        while seen:
            when = next(iter(seen.values()))
            if now - when <= 2 * self.window:
                break
            seen.popitem(last=False)
