"""The manual's pytest example: L{snq.testing}'s fixtures."""

from snq.testing import runHandler
from tests.examples.welcome import Throttled, Welcome

pytest_plugins = ["snq.testing.fixtures"]

SITE = {"sites": {"default": {"mail_hook": "https://mail.example/send"}}}


def test_welcome_mail_in_a_minute(snq_queue, snq_clock):
    outcome = runHandler(Welcome, {"user": "alice"}, config=SITE,
                         queue=snq_queue)
    assert outcome.kind == "done"
    [mail] = snq_queue.enqueued
    assert mail.payload["body"] == {"welcome": "alice"}
    assert mail.run_at == snq_clock.seconds() + 60


def test_no_user_is_rejected():
    outcome = runHandler(Welcome, {}, config=SITE)
    assert (outcome.kind, outcome.error) == ("rejected", "no user in the payload")


def test_throttled(snq_clock):
    start = snq_clock.seconds()
    assert runHandler(Throttled, {}, clock=snq_clock).kind == "done"
    assert snq_clock.seconds() == start + 5
