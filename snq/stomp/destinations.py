# -*- test-case-name: tests.test_stomp_backend -*-
"""
Where snq's items live on a STOMP broker.

snq names destinations as the contract does (C{basename + group}, so
C{/queue/snq/main} by default).  RabbitMQ refuses a C{/} inside a queue or
topic name ("not a valid queue destination") but takes it written C{%2F}:
C{/queue/snq%2Fmain} is the queue C{snq/main}.  So snq keeps the contract's
names and writes them for the broker with L{onTheWire} when talking to
RabbitMQ; ActiveMQ takes the plain names.

A retry waits in a queue of its own per origin and delay, whose messages
expire after that delay and are dead-lettered by RabbitMQ back into the
origin queue (L{Destinations.delayed}).

The queues items are consumed from are RabbitMQ priority queues when
C{[stomp] max_priority} is set: every SUBSCRIBE and every SEND to one
declares it with C{x-max-priority} (RabbitMQ refuses a declaration whose
arguments differ from the queue's, so all must say the same), and each
item's SEND carries its priority, which the message keeps through a delay
queue (L{Destinations.itemHeaders}).

With C{[stomp] queue_type = "quorum"} every queue snq declares (consumed,
delay, dead) is a RabbitMQ quorum queue, replicated over a cluster's nodes:
every SUBSCRIBE and SEND to one says C{x-queue-type: quorum}, for the same
reason (L{Destinations.queueType}).  RabbitMQ refuses C{x-max-priority} on
those, which the config refuses with it.
"""

from __future__ import annotations

import math
from urllib.parse import unquote

from snq.routing import Routing, consumedSpecs

#: Prefixes after which RabbitMQ reads the rest as one name.
_NAMED = ("/queue/", "/topic/", "/amq/queue/")
_EXCHANGE = "/exchange/"
#: RabbitMQ's largest message TTL (ms).
MAX_TTL = 2**32 - 1
#: Retry delays are rounded to one of this many steps per doubling, so
#: that a handful of delay queues serve every backoff.
STEPS_PER_DOUBLING = 4


def onTheWire(destination: str, escape: bool) -> str:
    """
    C{destination} as the broker is sent it: with C{escape}, each C{/}
    inside the name written C{%2F} (for an exchange, inside its routing
    key).  Names already escaped stay as they are.
    """
    if not escape:
        return destination
    for prefix in _NAMED:
        if destination.startswith(prefix):
            return prefix + destination[len(prefix):].replace("/", "%2F")
    if destination.startswith(_EXCHANGE):
        exchange, slash, key = destination[len(_EXCHANGE):].partition("/")
        return _EXCHANGE + exchange + slash + key.replace("/", "%2F")
    return destination


def retryBucket(delay: float, early: bool = False) -> int:
    """
    C{delay} (s) as a TTL in ms, rounded to the nearest of
    L{STEPS_PER_DOUBLING} steps per doubling (at most 9% off), or with
    C{early} to the one below (at most 16% short, never late: an item
    waiting for its C{run_at} that comes early waits again for the rest).
    """
    ms = max(delay * 1000, 1.0)
    exact = STEPS_PER_DOUBLING * math.log2(ms)
    step = math.floor(exact + 1e-9) if early else round(exact)
    return min(round(2 ** (step / STEPS_PER_DOUBLING)), MAX_TTL)


class Destinations:
    """The destinations of one config: queues by group, breakouts, dead letters."""

    def __init__(self, config, routing: Routing | None = None):
        self.config = config
        self.basename = config.queue.basename
        if not self.basename.startswith("/queue/"):
            raise ValueError(
                f"[queue] basename {self.basename!r}: the STOMP backend needs a "
                "/queue/ destination (retries and dead letters are queues)")
        self.breakouts = frozenset(config.queue.breakout)
        self.dead = self.basename + "dead"
        self.control = config.stomp.control_channel
        self.routing = routing or Routing(config)

    @property
    def queueType(self) -> dict:
        """
        The header that declares any of snq's queues as the configured
        type: none for classic ones, so that queues declared before the
        option existed are declared the same.
        """
        kind = self.config.stomp.queue_type
        return {} if kind == "classic" else {"x-queue-type": kind}

    @property
    def arguments(self) -> dict:
        """The headers that declare a queue items are consumed from."""
        top = self.config.stomp.max_priority
        return {**self.queueType, **({"x-max-priority": str(top)} if top else {})}

    def itemHeaders(self, priority: int, delayed: bool) -> dict:
        """
        The headers of an item's SEND: its priority, clamped into the
        broker's 0 to C{max_priority}; and, unless it goes to a delay queue
        (declared with arguments of its own), the queue's arguments.
        """
        top = self.config.stomp.max_priority
        headers = {"priority": str(min(max(priority, 0), top))} if top else {}
        return headers if delayed else {**headers, **self.arguments}

    def consumed(self, groups, site=None) -> list[str]:
        """
        What a worker of C{groups} subscribes to: their queues and breakouts
        (L{consumedSpecs}: with C{site}, only that site's breakouts).
        """
        return [self.basename + spec
                for spec in consumedSpecs(groups, self.breakouts, site)]

    def route(self, transport: str, site: str) -> str:
        """An item's queue: the most specific breakout, else its group's."""
        return self.basename + self.routing.route(transport, site)

    def delayed(self, destination: str, delay: float, rabbitmq: bool,
                early: bool = False) -> tuple[str, dict]:
        """
        Where to send a message for C{destination} that may arrive only in
        C{delay} seconds (rounded as L{retryBucket} does, C{early} or not),
        and the headers that make it wait.

        On RabbitMQ: a durable queue per origin and rounded delay, with that
        delay as its message TTL, dead-lettering through the default
        exchange back into the origin queue, of the configured type.  Its
        arguments follow from its name and the config alone: RabbitMQ
        refuses to declare a queue again with others.
        Elsewhere: the origin itself with ActiveMQ's C{AMQ_SCHEDULED_DELAY}
        (honoured where the broker's scheduler is on; otherwise at once).
        """
        ttl = retryBucket(delay, early)
        if not rabbitmq:
            return destination, {"AMQ_SCHEDULED_DELAY": str(ttl)}
        return f"{destination}.retry-{ttl}ms", {
            **self.queueType,
            "x-message-ttl": str(ttl),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queueName(destination),
        }


def queueName(destination: str) -> str:
    """A C{/queue/} destination's queue: C{/queue/snq/main} → C{snq/main}."""
    return unquote(destination[len("/queue/"):])
