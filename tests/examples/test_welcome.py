"""The manual's trial example: L{snq.testing} in a TestCase."""

from twisted.trial.unittest import SynchronousTestCase

from snq.testing import FakeClock, RecordingQueue, runHandler
from tests.examples.welcome import Throttled, Welcome

SITE = {"sites": {"default": {"mail_hook": "https://mail.example/send"}}}


class WelcomeTests(SynchronousTestCase):
    def test_welcomeMailInAMinute(self):
        queue = RecordingQueue()
        outcome = runHandler(Welcome, {"user": "alice"}, config=SITE,
                             queue=queue)
        self.assertEqual(outcome.kind, "done")
        [mail] = queue.enqueued
        self.assertEqual(mail.transport, "webhook")
        self.assertEqual(mail.payload["body"], {"welcome": "alice"})
        self.assertEqual(mail.run_at, queue.clock.seconds() + 60)

    def test_noUserIsRejected(self):
        outcome = runHandler(Welcome, {}, config=SITE)
        self.assertEqual((outcome.kind, outcome.error),
                         ("rejected", "no user in the payload"))

    def test_mailSwitchedOffIsRetried(self):
        config = {"sites": {"default": {"mail_enabled": False}},
                  "queue": {"retry_delay": 10}}
        outcome = runHandler(Welcome, {"user": "bob"}, config=config)
        self.assertEqual(outcome.kind, "retry")
        self.assertEqual(outcome.error, "Retry: mail is switched off for this site")
        self.assertTrue(5 <= outcome.delay <= 10)

    def test_brokenConfigIsAnError(self):
        """No mail_hook: a KeyError, which the worker would log and retry."""
        outcome = runHandler(Welcome, {"user": "carol"})
        self.assertEqual(outcome.kind, "error")
        self.assertTrue(outcome.failure.check(KeyError))

    def test_lastAttemptGoesToTheDeadLetters(self):
        outcome = runHandler(Welcome, {"user": "dave"}, attempts=10,
                             config={"sites": {"default": {"mail_enabled": False}}})
        self.assertEqual((outcome.kind, outcome.reason), ("dead", "retries"))

    def test_throttledOnTheFakeClock(self):
        clock = FakeClock()
        outcome = runHandler(Throttled, {}, clock=clock)
        self.assertEqual(outcome.kind, "done")
        self.assertEqual(clock.seconds(), FakeClock().seconds() + 5)

    def test_throttledPastItsTimeout(self):
        config = {"transports": {"throttled": {"timeout": 2}}}
        outcome = runHandler(Throttled, {}, config=config)
        self.assertEqual((outcome.kind, outcome.error),
                         ("retry", "timed out after 2 s"))
