# -*- test-case-name: tests.test_xmpp_connection -*-
"""
An XMPP account's settings, apart from the connection: loading the config
must not import wokkel or OpenSSL.
"""

from dataclasses import dataclass, field

TLS_MODES = ("required", "optional", "off")


class SettingsError(ValueError):
    """
    Settings that cannot work; C{problems} lists C{(key, expected)} pairs,
    so the config loader can name the file and section of each.
    """

    def __init__(self, problems):
        super().__init__("; ".join(f"{key}: {text}" for key, text in problems))
        self.problems = problems


@dataclass(frozen=True)
class XmppSettings:
    """
    One XMPP account of snq's, as in the C{[xmpp]} section.

    C{host} "" means the JID's domain. C{tls}: "required" (STARTTLS or no
    connection), "optional" (STARTTLS when offered) or "off"; when used,
    TLS verifies the server's certificate for the JID's domain against
    C{ca_file}, or the system trust store if "". C{auto_subscribe} is for
    the manager above the connection.
    """

    jid: str
    #: Its password (a str, or a L{snq.secret.Secret} from the config).
    password: str = field(repr=False)
    #: Server to connect to; "" = the JID's domain (no SRV lookup: set host
    #: if the domain's server lives elsewhere).  The certificate is checked
    #: against the JID's domain all the same.
    host: str = ""
    #: Client port, 1-65535 (STARTTLS, not direct TLS).
    port: int = 5222
    #: The session's resource; "" lets the server choose.
    resource: str = "snq"
    #: Presence priority, -128 … 127; with a negative one the server sends
    #: this session no messages for the bare JID.
    priority: int = 0
    #: Presence status text.
    status: str = ""
    #: required: STARTTLS or no connection; optional: STARTTLS when the
    #: server offers it; off: never (only on loopback or a trusted network).
    tls: str = "required"
    #: PEM file (one CA or a bundle) to verify the server's certificate
    #: with; "" = the system trust store.
    ca_file: str = ""
    #: Seconds (> 0) for one attempt, from TCP connect to an authenticated
    #: stream; also the longest wait for a clean close on stop.
    connect_timeout: float = 30.0
    #: Seconds (> 0) between keepalive pings (XEP-0199).
    ping_interval: float = 120.0
    #: Seconds (> 0) to wait for the answer to a keepalive ping, or for the
    #: server to confirm a sent stanza, before the stream counts as dead and
    #: is dropped.
    ping_timeout: float = 30.0
    #: Accept every presence subscription request (the bot then shows online
    #: in the requester's roster).
    auto_subscribe: bool = False

    def __post_init__(self):
        problems = []
        if "@" not in self.jid:
            problems.append(("jid", f"expected user@domain, got {self.jid!r}"))
        if not self.password:
            problems.append(("password", "expected the account's password"))
        if self.tls not in TLS_MODES:
            problems.append(("tls", f"expected one of {', '.join(TLS_MODES)},"
                                    f" got {self.tls!r}"))
        if not 0 < self.port < 65536:
            problems.append(("port", f"expected 1-65535, got {self.port!r}"))
        if not -128 <= self.priority <= 127:
            problems.append(
                ("priority", f"expected -128-127, got {self.priority!r}"))
        for key in ("connect_timeout", "ping_interval", "ping_timeout"):
            if not getattr(self, key) > 0:
                problems.append((key, "expected seconds > 0"))
        if problems:
            raise SettingsError(problems)
