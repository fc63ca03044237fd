# -*- test-case-name: tests.test_dashboard_actions -*-
"""
The dashboard's cluster view and actions in headless Chromium, driven
through chromedriver: a real daemon on SQLite; its row in the cluster
table; a transport and a site paused and resumed by clicking (items wait,
then run); dead letters purged and retried by clicking; and without the
token, buttons that cannot be used.
"""

import os
import re
import socket
import time

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.daemon import Daemon, snqctl, waitFor
from tests.recorder import recorded
from tests.webdriver import CHROMEDRIVER, CHROMIUM, Browser

CONFIG = """
[daemon]
id = "a"
workers = 1
threshold = 0.1

[db]
url = "sqlite:///{dir}/snq.sqlite"

[monitor]
http = "127.0.0.1:0"
token = "t0ken"
depth_interval = 0.5

[cluster]
heartbeat = 0.5
stale = 3

[handlers]
record = "tests.recorder:Record"

[sites.default]
record_file = "{dir}/handled.txt"
"""

#: The text of the row (its cells joined by "|") whose first cell is arguments[1].
ROW = """
const table = document.getElementById(arguments[0]);
for (const tr of table.tBodies[0].rows) {
  const cells = [...tr.cells].map((c) => c.textContent);
  if (cells[0] === arguments[1]) return cells.join("|");
}
return null;"""

#: Whether the dead letter table has {n} rows (each with its buttons).
DEAD = ("return document.getElementById('dead').tBodies[0]"
        ".querySelectorAll('button[data-action=purge]').length === {n}")

#: The id of the first dead letter shown.
FIRST_DEAD = ("return document.getElementById('dead').tBodies[0].rows[0]"
              ".cells[0].textContent")


class DashboardActionTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        for path in (CHROMIUM, CHROMEDRIVER):
            if not os.access(path, os.X_OK):
                self.fail(f"{path} is missing: run scripts/setup-services")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "snq.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(dir=self.dir))
        self.record = os.path.join(self.dir, "handled.txt")
        daemon = Daemon(self, self.dir, "-c", self.config)
        found = []

        def listening():
            found[:] = re.findall(r"http://127\.0\.0\.1:(\d+)/", daemon.output())
            return bool(found) and "is ready" in daemon.output()

        yield waitFor(listening, what="the daemon's worker and monitor")
        self.url = f"http://127.0.0.1:{found[0]}/"

    def snqctl(self, *args, stdin=None):
        return snqctl("-c", self.config, *args, cwd=self.dir, stdin=stdin)

    def handled(self):
        return len(recorded(self.record))

    def wait(self, condition, what, timeout=60):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def drive(self):
        """The whole visit, in a thread: the browser's calls block."""
        name = f"a@{socket.gethostname()}"
        self.snqctl("enqueue", "record", "-", stdin="{}\n" * 5)
        self.snqctl("enqueue", "nowhere", "-", stdin="{}\n" * 3)
        self.wait(lambda: self.handled() == 5, "5 items handled")
        browser = Browser()
        try:
            browser.open(self.url + "#token=t0ken")
            row = browser.waitFor(ROW, "the daemon in the cluster table", 60,
                                  "cluster", name)
            self.assertRegex(row, r"^a@[^|]+\|\d+\|live\|")
            browser.waitFor(DEAD.format(n=3), "3 dead letters")
            record = browser.waitFor(ROW, "the record transport", 60,
                                     "transports", "record")
            self.assertEqual(record.split("|")[1], "running")

            # Pause a transport by clicking: new items wait, then run.
            self.act(browser, 'button[data-action=pause][data-kind=transport]'
                     '[data-name=record]', "transport record paused")
            self.waitRow(browser, "transports", "record", "paused")
            self.assertIn("paused: transport record",
                          self.snqctl("status", "--cluster").stdout)
            self.snqctl("enqueue", "record", "-", stdin="{}\n" * 5)
            time.sleep(2)
            self.assertEqual(self.handled(), 5, "nothing ran while paused")
            browser.click('button[data-action=resume][data-kind=transport]'
                          '[data-name=record]')
            self.wait(lambda: self.handled() == 10, "the 5 waiting items run")
            self.waitRow(browser, "transports", "record", "running")

            # And a site.
            self.waitRow(browser, "sites", "default", "running")
            browser.click('button[data-action=pause][data-kind=site]'
                          '[data-name=default]')
            self.waitRow(browser, "sites", "default", "paused")
            self.snqctl("enqueue", "record", "-", stdin="{}\n" * 2)
            time.sleep(2)
            self.assertEqual(self.handled(), 10)
            browser.click('button[data-action=resume][data-kind=site]'
                          '[data-name=default]')
            self.wait(lambda: self.handled() == 12, "the site's items run")

            # Dead letters: one purged, one retried (it dies again: no
            # handler), by clicking.
            self.act(browser, "#dead button[data-action=purge]",
                     "purged 1 dead letters")
            browser.waitFor(DEAD.format(n=2), "2 dead letters left")
            first = browser.run(FIRST_DEAD)
            self.act(browser, f"#dead button[data-action=retry][data-id='{first}']",
                     "requeued 1 dead letters")
            browser.waitFor(f"return {FIRST_DEAD.removeprefix('return ')} "
                            f"!== '{first}'", "the retried one gone")
            screenshot = os.path.join(self.dir, "dashboard.png")
            browser.screenshot(screenshot)
            self.assertGreater(os.path.getsize(screenshot), 10_000)

            # Without the token the page shows nothing, and acts on nothing.
            browser.open(self.url)
            browser.waitFor("return document.getElementById('connection')"
                            ".textContent.includes('401')", "a 401 shown")
            self.assertEqual(browser.run(
                "return document.querySelectorAll('button[data-action]')"
                ".length"), 0)
        finally:
            browser.close()

    def act(self, browser, selector, expected):
        """Click an action's button; its answer, shown on the page, is C{expected}."""
        result = "return document.getElementById('action-result')"
        browser.run(result + ".textContent = '';")
        browser.click(selector)
        answer = browser.waitFor(result + ".textContent",
                                 f"the answer to {selector}")
        self.assertEqual(answer, expected)

    def waitRow(self, browser, table, first, state):
        """Until row C{first} of C{table} shows C{state} in its second cell."""
        browser.waitFor(ROW.replace("return cells.join(\"|\");",
                                    "return cells[1] === arguments[2];"),
                        f"{first} {state}", 30, table, first, state)

    @defer.inlineCallbacks
    def test_clusterViewAndActions(self):
        yield threads.deferToThread(self.drive)
