"""The handler of the manual's chapter on testing handlers."""

from twisted.internet.task import deferLater

from snq.handlers import QueueHandler, Reject, Retry


class Welcome(QueueHandler):
    """Welcomes a new user: a mail, sent a minute later by the webhook."""

    transport = "welcome"

    def handle(self, item):
        user = item.payload.get("user")
        if not user:
            raise Reject("no user in the payload")
        settings = self.context.siteConfig(item.site)
        if not settings.get("mail_enabled", True):
            raise Retry("mail is switched off for this site")
        return self.context.enqueue(
            "webhook", {"url": settings["mail_hook"], "body": {"welcome": user}},
            site=item.site, delay=60)


class Throttled(QueueHandler):
    """Waits its turn (5 s between items) on the daemon's clock."""

    transport = "throttled"

    def handle(self, item):
        return deferLater(self.context.clock, 5, lambda: None)
