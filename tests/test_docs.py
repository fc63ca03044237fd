"""
The manual keeps its promises: the configuration reference has a text for
every key (it is generated from the config dataclasses' C{#:} comments),
and the examples of C{README.rst} and C{docs/} work: every TOML config
loads, every C{snqctl} and C{twistd … snq} command line parses with the real
option parsers, and the README's tour runs against a real daemon.  (The
Python examples run as doctests in C{sphinx-build -b doctest}.)
"""

import dataclasses
import glob
import grp
import importlib.util
import os
import pwd
import re
import shlex
import textwrap

from twisted.internet import defer
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase, TestCase

from snq import config, tap
from snq.scripts import snqctl
from tests import daemon as helpers

ROOT = helpers.ROOT
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.rst")


def _extension(name):
    """A module of C{docs/_ext}, which is not a package on C{sys.path}."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(DOCS, "_ext", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


snqconfig = _extension("snqconfig")


@dataclasses.dataclass
class Block:
    path: str
    line: int
    language: str
    text: str

    def where(self):
        return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


_DIRECTIVE = re.compile(r"^(\s*)\.\. code-block:: *(\S+)\s*$")


def codeBlocks(path):
    """Every C{.. code-block::} of a reStructuredText file, in order."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks = []
    for number, line in enumerate(lines):
        m = _DIRECTIVE.match(line)
        if not m:
            continue
        indent, body, start = len(m.group(1)), [], number + 1
        for following in lines[number + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        text = textwrap.dedent("\n".join(body))
        # The directive's own options (":caption: …") come first.
        text = re.sub(r"\A(\s*:[\w-]+:.*\n)*", "", text).strip("\n")
        blocks.append(Block(path, start + 1, m.group(2), text + "\n"))
    return blocks


def manualFiles():
    return [README, *sorted(glob.glob(os.path.join(DOCS, "*.rst")))]


def allBlocks(*languages):
    return [b for path in manualFiles() for b in codeBlocks(path)
            if b.language in languages]


def commandLines(block):
    """
    The command lines of a shell block: in a C{console} block those after
    a C{$} prompt (what follows is output), in a C{sh} block every line;
    a trailing backslash continues a line.
    """
    commands, current = [], None
    for line in block.text.splitlines():
        if current is not None:
            current += " " + line.strip()
        elif block.language == "console":
            if not line.startswith("$ "):
                continue
            current = line[2:]
        else:
            current = line
        if current.endswith("\\"):
            current = current[:-1]
            continue
        commands.append(current)
        current = None
    return commands


def invocations(command, program):
    """
    The arguments of each run of C{program} in one shell line (several
    with pipes or C{&&}), or none.
    """
    words = shlex.split(command, comments=True)
    found, args = [], None
    for word in [*words, "&&"]:
        if word in ("|", "&&", ";", "||"):
            if args is not None:
                found.append(args)
            args = None
        elif args is not None:
            args.append(word)
        elif os.path.basename(word) == program:
            args = []
    return found


class ConfigReferenceTests(SynchronousTestCase):
    """The reference is generated from the code: the code must say it all."""

    def test_everyKeyHasADocComment(self):
        missing = [f"[{section}] {name}"
                   for section, cls in snqconfig.sections().items()
                   for name, doc in snqconfig.fieldDocs(cls).items() if not doc]
        self.assertEqual(missing, [], "keys without a #: comment")

    def test_everySectionHasADocComment(self):
        missing = [name for name, doc in snqconfig.fieldDocs(config.Config).items()
                   if not doc]
        self.assertEqual(missing, [], "sections without a #: comment")

    def test_everySectionIsInTheReference(self):
        with open(os.path.join(DOCS, "configuration.rst")) as f:
            documented = set(re.findall(r"^\.\. snq-config:: (\S+)$", f.read(), re.M))
        self.assertEqual(documented, set(snqconfig.sections()))

    def test_inheritedFieldsFound(self):
        """[xmpp]'s keys are declared by the XMPP settings it extends."""
        docs = snqconfig.fieldDocs(config.XmppConfig)
        self.assertIn("STARTTLS", docs["tls"])
        self.assertIn("user@domain", docs["jid"])

    def test_defaultsAsToml(self):
        self.assertEqual(
            [snqconfig.tomlValue(v) for v in ("a", 1, 1.0, True, ["main"])],
            ['"a"', "1", "1.0", "true", '["main"]'])


class ExampleTests(SynchronousTestCase):
    """The examples a reader copies must work as written."""

    def test_blocksFound(self):
        """The extraction itself: the manual has examples of each kind."""
        self.assertGreater(len(allBlocks("toml")), 10)
        self.assertGreater(len(allBlocks("sh", "console")), 10)

    def test_tomlExamplesLoad(self):
        problems = []
        for block in allBlocks("toml"):
            try:
                config.parseText(block.text.encode("utf-8"), block.where())
            except config.ConfigError as e:
                problems += e.problems
        self.assertEqual(problems, [])

    def test_snqctlCommandsParse(self):
        problems, parsed = [], 0
        for block in allBlocks("sh", "console"):
            for command in commandLines(block):
                for args in invocations(command, "snqctl"):
                    try:
                        snqctl.parser().parse_args(args)
                        parsed += 1
                    except SystemExit:
                        problems.append(f"{block.where()}: {command}")
        self.assertEqual(problems, [])
        self.assertGreater(parsed, 10)

    def test_twistdCommandsParse(self):
        """
        twistd's options and snq's, as twistd parses them.  The users and
        files the examples name do not exist here, so only the grammar is
        checked.
        """
        self.patch(pwd, "getpwnam", lambda name: pwd.getpwuid(os.getuid()))
        self.patch(grp, "getgrnam", lambda name: grp.getgrgid(os.getgid()))
        self.patch(tap.Options, "postOptions", lambda options: None)
        problems, parsed = [], 0
        for block in allBlocks("sh", "console"):
            for command in commandLines(block):
                for args in invocations(command, "twistd"):
                    try:
                        ServerOptions().parseOptions(args)
                        parsed += 1
                    except (usage.UsageError, SystemExit) as e:
                        problems.append(f"{block.where()}: {command}: {e}")
        self.assertEqual(problems, [])
        self.assertGreater(parsed, 5)


class ReadmeTourTests(TestCase):
    """The README's tour, run as a reader would run it."""

    timeout = 120

    @defer.inlineCallbacks
    def test_tour(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        readme = codeBlocks(README)
        [toml] = [b for b in readme if b.language == "toml"]
        [handler] = [b for b in readme if b.language == "python"]
        [session] = [b for b in readme if b.language == "console"]
        [module] = {path.partition(":")[0] for path in
                    config.parseText(toml.text.encode()).handlers.values()}
        with open(os.path.join(directory, f"{module}.py"), "w") as f:
            f.write(handler.text)
        with open(os.path.join(directory, "snq.toml"), "w") as f:
            # Not the shared monitoring port: other tests run daemons too.
            f.write(toml.text + '\n[monitor]\nhttp = ""\n')
        with open(README) as f:
            [start] = [line for line in f if "twistd -n snq -c" in line]
        self.assertIn("PYTHONPATH=.", start)
        daemon = helpers.Daemon(
            self, directory, "-c", "snq.toml",
            env={"PYTHONPATH": os.pathsep.join([directory, ROOT])})
        yield helpers.waitFor(lambda: "consuming groups main" in daemon.output(),
                      what="the daemon to start")

        outputs = []
        for command in commandLines(session):
            [args] = invocations(command, "snqctl")
            if args[-2:] == ["dead", "list"]:
                yield helpers.waitFor(
                    lambda: "dead letter (rejected)" in daemon.output(),
                    timeout=10, what="the second item dead-lettered")
            outputs.append(helpers.snqctl(*args, cwd=directory).stdout)
        _, _, dead, status = outputs
        self.assertIn("hello, Ada", daemon.output())
        self.assertRegex(dead, r"greet +default +rejected +no name")
        self.assertRegex(status, r"generic\.0 +\d+ +running")
