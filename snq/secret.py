# -*- test-case-name: tests.test_secret -*-
"""
Secrets in the config, and URLs as they may be printed.

A L{Secret} holds a password, a token, a key or a URL that may carry one.
Its C{repr} and C{str} never show the value (C{'***'}, or the URL masked by
L{maskURL}), so a config diff, an error, a log line or C{/status.json}
cannot print it by accident; the code that needs the value asks for it,
explicitly, with L{Secret.reveal}.

L{maskURL} is the one way a URL is printed anywhere in snq: the password
of its userinfo and the values of password-like query (and fragment)
parameters become C{***}.
"""

from __future__ import annotations

import hmac
import re
from urllib.parse import unquote

#: Names that say their value is a secret: config keys of a site's table,
#: URL query parameters.
SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|credential|signature|^auth(orization)?$|^sig$"
    r"|(^|[_-])(api|access|private)?[_-]?key$", re.IGNORECASE)
MASK = "***"


class Secret:
    """
    A value that is never printed: C{repr} and C{str} show C{'***'} (or,
    for a URL, the URL masked), an empty value shows as empty, and only
    L{reveal} gives the value.  Secrets compare by value (a reload sees a
    changed password), in constant time.
    """

    __slots__ = ("_shown", "_value")

    def __init__(self, value, shown: str | None = None):
        self._value = value
        self._shown = shown if shown is not None else (MASK if value else "")

    @classmethod
    def url(cls, value: str) -> Secret:
        """A URL that may hold a password: shown masked by L{maskURL}."""
        return cls(value, maskURL(value))

    def reveal(self):
        """The value itself, for the code that uses it (and only that)."""
        return self._value

    def __repr__(self) -> str:
        return repr(self._shown)

    def __str__(self) -> str:
        return self._shown

    def __format__(self, spec: str) -> str:
        return format(self._shown, spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(repr(self._value).encode(),
                                   repr(other._value).encode())

    def __hash__(self) -> int:
        return hash((Secret, repr(self._value)))


def reveal(value):
    """C{value} itself, whether or not it is a L{Secret}."""
    return value.reveal() if isinstance(value, Secret) else value


def isSecretName(name: str) -> bool:
    """Whether a key or parameter of this name holds a secret."""
    return bool(SECRET_NAME.search(name))


def maskURL(url: str) -> str:
    """
    C{url} as it may be printed: C{scheme://user:***@host/path?token=***}.

    The userinfo ends at the last C{@}, so a password with an unencoded
    C{#}, C{?}, C{/} or C{@} is masked whole; a query or fragment parameter
    whose name says it is a secret (L{SECRET_NAME}: password, sslpassword,
    token, key, …) has its value masked.  When in doubt, more is masked.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _maskParameters(url)
    auth = ""
    userinfo, at, after = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if at and not re.search(r"[/?#]", user):
        auth = f"{user}:{MASK}@" if colon else f"{user}@"
        rest = after
    return f"{scheme}://{auth}{_maskParameters(rest)}"


def _maskParameters(text: str) -> str:
    """Mask secret-named C{name=value} pairs after the first C{?} or C{#}."""
    start = min((i for i in (text.find("?"), text.find("#")) if i >= 0),
                default=-1)
    if start < 0:
        return text
    head, tail = text[:start + 1], text[start + 1:]

    def pair(match):
        name, eq, value = match.group(2), match.group(3), match.group(4)
        if eq and value and isSecretName(unquote(name)):
            value = MASK
        return f"{match.group(1)}{name}{eq}{value}"

    return head + re.sub(r"(^|[&;?#])([^&;?#=]*)(=?)([^&;?#]*)", pair, tail)
