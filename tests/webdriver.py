"""
Driving Debian's headless Chromium through chromedriver (package
chromium-driver) with the W3C WebDriver protocol: plain JSON over HTTP, so
the tests need no Selenium.  Blocking: call it from a thread.
"""

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from tests.daemon import freePort

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
_ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class WebDriverError(AssertionError):
    pass


class Browser:
    """One headless Chromium session; L{close} ends it and its driver."""

    def __init__(self, timeout=60):
        self.profile = tempfile.mkdtemp(prefix="snq-chromium-")
        port = freePort()
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        try:
            self._waitReady(timeout)
            session = self._call("POST", "/session", {"capabilities": {
                "alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": ["--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-background-networking",
                             "--disable-component-update", "--no-first-run",
                             f"--user-data-dir={self.profile}",
                             "--window-size=1280,1600"]}}}})
        except BaseException:
            self._stopDriver()
            raise
        self.session = f"/session/{session['sessionId']}"

    def _waitReady(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    return
            except (OSError, WebDriverError):
                pass
            if time.monotonic() > deadline:
                raise WebDriverError(f"chromedriver not ready in {timeout} s")
            time.sleep(0.2)

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise WebDriverError(f"{method} {path}: {e.code} "
                                 f"{e.read()[:500]!r}") from None

    def open(self, url):
        self._call("POST", self.session + "/url", {"url": url})

    def run(self, script, *args):
        """The value of C{script} (a function body) run in the page."""
        return self._call("POST", self.session + "/execute/sync",
                          {"script": script, "args": list(args)})

    def click(self, selector):
        """Click the element C{selector} finds (found again if redrawn)."""
        for _ in range(20):
            found = self._call("POST", self.session + "/element",
                               {"using": "css selector", "value": selector})
            try:
                element = found.get(_ELEMENT)
                if element is None:
                    raise WebDriverError(f"{selector}: found {found!r}")
                self._call("POST", f"{self.session}/element/{element}/click", {})
                return
            except WebDriverError as e:
                if "stale element" not in str(e):
                    raise
        raise WebDriverError(f"{selector} kept being redrawn")

    def waitFor(self, script, what, timeout=60, *args):
        """Until C{script} gives a true value in the page; → that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.run(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise WebDriverError(f"timed out after {timeout} s waiting "
                                     f"for {what}")
            time.sleep(0.2)

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self._call(
                "GET", self.session + "/screenshot")))

    def _stopDriver(self):
        if self.driver.poll() is None:
            self.driver.kill()
            self.driver.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def close(self):
        try:
            self._call("DELETE", self.session)
        finally:
            self._stopDriver()
