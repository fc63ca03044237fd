# -*- test-case-name: tests.test_stomp_backend -*-
"""
StatusNet's control channel: a topic every worker subscribes to, carrying
C{shutdown}, C{restart} or C{update:<site>} as the message body.

Anyone who may publish on the broker may publish there, so with
C{[stomp] control_secret} set a message must be signed: an HMAC-SHA256,
keyed with the secret, over the body, a timestamp and a nonce, in the
headers below.  A message signed too long ago (or ahead) is refused, and a
nonce seen within that window is refused again: a recorded message cannot
be replayed.  Nonces also drop the copies a worker gets when it subscribes
on several servers of one cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from twisted.logger import Logger

TIMESTAMP_HEADER = "snq-timestamp"
NONCE_HEADER = "snq-nonce"
SIGNATURE_HEADER = "snq-signature"
COMMANDS = ("shutdown", "restart", "update")


class Duplicate(ValueError):
    """A control message seen already: a copy from another server, or a replay."""


def signature(secret: str, command: str, timestamp: str, nonce: str) -> str:
    text = f"snq-control\n{timestamp}\n{nonce}\n{command}"
    return hmac.new(secret.encode("utf-8"), text.encode("utf-8"),
                    hashlib.sha256).hexdigest()


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

    def __init__(self, secret: str, window: float, clock):
        self.secret = secret
        self.window = window
        self.clock = clock
        #: nonce → when it was seen.
        self._seen: dict[str, float] = {}

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
        if self.secret:
            self._verify(text.strip(), headers, nonce, now)
        if nonce is not None:
            if nonce in self._seen:
                raise Duplicate(f"nonce {nonce[:32]!r} was seen already")
            self._seen[nonce] = now
        return command

    def _verify(self, text, headers, nonce, now):
        timestamp, given = headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)
        if given is None or timestamp is None or nonce is None:
            raise ValueError("it is not signed, and control_secret is set")
        expected = signature(self.secret, text, timestamp, nonce)
        if not hmac.compare_digest(expected, given.lower()):
            raise ValueError("its signature is wrong")
        try:
            age = now - float(timestamp)
        except ValueError:
            raise ValueError(f"its timestamp {timestamp[:32]!r} is not a number")
        if abs(age) > self.window:
            raise ValueError(f"it was signed {age:.0f} s ago, outside the "
                             f"{self.window:g} s window")

    def _forget(self, now):
        old = [n for n, seen in self._seen.items() if now - seen > 2 * self.window]
        for nonce in old:
            del self._seen[nonce]
