# -*- test-case-name: tests.test_contrib -*-
"""
C{contrib/snq.service} as systemd reads it: valid (C{systemd-analyze
verify}) and hardened (C{systemd-analyze security --offline=true}), both
offline, on a copy whose C{ExecStart} is this checkout's twistd (verify
wants an executable there).  scripts/setup-services installs
systemd-analyze (Debian's systemd package).
"""

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.daemon import ROOT

#: Exposure systemd-analyze may rate the unit at most, in tenths (2.0 is
#: in its "OK" band; the unit before hardening was 8.5, "EXPOSED").
THRESHOLD = 20
#: Settings the manual promises; systemd-analyze marks each ✗ when missing.
PROMISED = ("UMask=", "NoNewPrivileges=", "ProtectSystem=", "PrivateTmp=",
            "ProtectHome=", "PrivateDevices=", "CapabilityBoundingSet=~CAP_SYS_ADMIN",
            "SystemCallFilter=~@privileged", "RestrictAddressFamilies=~AF_PACKET",
            "RestrictNamespaces=~user")


class ServiceUnitTests(SynchronousTestCase):
    def setUp(self):
        self.analyze = shutil.which("systemd-analyze")
        if self.analyze is None:
            self.fail("systemd-analyze is missing: run scripts/setup-services")
        with open(os.path.join(ROOT, "contrib", "snq.service")) as f:
            text = f.read()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.assertIn("ExecStart=/opt/snq/bin/twistd ", text)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.unit = os.path.join(directory, "snq.service")
        with open(self.unit, "w") as f:
            f.write(text.replace("/opt/snq/bin/twistd", twistd))

    def analyzeUnit(self, *args):
        return subprocess.run([self.analyze, *args, self.unit], text=True,
                              capture_output=True, timeout=60)

    def test_verify(self):
        result = self.analyzeUnit("verify")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "", ""))

    def test_hardened(self):
        result = self.analyzeUnit("security", "--offline=true",
                                  f"--threshold={THRESHOLD}")
        self.assertEqual(result.returncode, 0, result.stdout[-300:])
        lines = result.stdout.splitlines()
        for setting in PROMISED:
            [line] = [line for line in lines
                      if line[2:].split(" ", 1)[0] == setting]
            self.assertTrue(line.startswith("✓"), line)
