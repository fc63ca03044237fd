"""
The real RabbitMQ on 127.0.0.1 (STOMP on 61613) for integration tests:
queue names of a test's own, removed afterwards, a plain STOMP producer
(stompest's sync client, standing for "any STOMP client"), and
C{rabbitmqctl}.
"""

import socket
import subprocess
import uuid

from stompest.config import StompConfig
from stompest.sync import Stomp

STOMP_URL = "tcp://127.0.0.1:61613"
NO_RABBITMQ = ("RabbitMQ with the STOMP plugin must listen on 127.0.0.1:61613 "
               "for this test (run scripts/setup-services as root)")


def requireRabbitMQ():
    """Fail (never skip) when the broker is not there."""
    try:
        socket.create_connection(("127.0.0.1", 61613), timeout=2).close()
    except OSError as e:
        raise AssertionError(f"{NO_RABBITMQ}: {e}")


def uniqueName() -> str:
    """A queue-name prefix of this test's own: C{snqtest-1a2b3c4d}."""
    return f"snqtest-{uuid.uuid4().hex[:8]}"


def rabbitmqctl(*args, timeout=60) -> str:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: "
                             f"{result.stderr or result.stdout}")
    return result.stdout


def deleteQueues(prefix: str):
    """Delete every queue whose name starts with C{prefix} (one call)."""
    n = len(prefix.encode())
    rabbitmqctl("eval", f"""
        [rabbit_amqqueue:delete(Q, false, false, <<"snq-tests">>)
         || Q <- rabbit_amqqueue:list(<<"/">>),
            binary:longest_common_prefix(
                [element(4, amqqueue:get_name(Q)), <<"{prefix}">>]) =:= {n}].""")


def queueDepths(prefix: str) -> dict:
    """Queue name → (ready, unacknowledged) for names starting with C{prefix}."""
    out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "name",
                      "messages_ready", "messages_unacknowledged")
    depths = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(prefix):
            depths[parts[0]] = (int(parts[1]), int(parts[2]))
    return depths


def producer() -> Stomp:
    """A connected stompest sync client, as a PHP or Java producer would be."""
    client = Stomp(StompConfig(STOMP_URL, login="guest", passcode="guest",
                               version="1.2"))
    client.connect(host="/", connectTimeout=5, connectedTimeout=5)
    return client


def produce(destination: str, bodies, headers=None):
    """SEND each body (persistent), waiting for the last one's receipt."""
    client = producer()
    try:
        bodies = list(bodies)
        for n, body in enumerate(bodies, 1):
            receipt = "done" if n == len(bodies) else None
            client.send(destination, body,
                        {"persistent": "true", **(headers or {})}, receipt=receipt)
        frame = client.receiveFrame()
        if frame.command != "RECEIPT":
            raise AssertionError(f"{destination}: {frame.command} "
                                 f"{frame.headers} {frame.body!r}")
        return frame
    finally:
        client.disconnect()
        client.close()
