"""
The configuration reference, generated from L{snq.config}'s dataclasses so
that it cannot drift from the code::

    .. snq-config:: queue

documents every key of C{[queue]} as a C{confval} (so that
C{:confval:`queue.lease`} links to it): the key, its TOML type with what the
validation expects (the C{check} text of the field's metadata), its default,
and the field's C{#:} doc comment, as plain text (the comments are written
for the code's readers too) but for epytext's C{C{code}} and C{L{name}}.
The section's own C{#:} comment on L{snq.config.Config} introduces it.

A key without a doc comment, and a section of L{snq.config.Config} that no
C{snq-config} directive documents, are warnings: the build (run with C{-W})
fails on them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import typing

from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from snq.config import Config
from snq.secret import Secret

log = logging.getLogger(__name__)

#: The name a table of tables shows in its keys: [transports.NAME].
PLACEHOLDER = "NAME"

_TYPES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list[str]: "list of strings",
    str | int: "string or integer",
    int | None: "integer",
    str | None: "string",
    str | float: "string or number",
    typing.Any: "any TOML value",
    Secret: "string (a secret: never printed)",
}


def sections() -> dict[str, type]:
    """
    Each table of the config file whose keys are a dataclass → that class:
    C{"daemon"} → C{DaemonConfig}, C{"transports.NAME"} →
    C{TransportConfig}.
    """
    found = {}
    for name, hint in typing.get_type_hints(Config).items():
        if typing.get_origin(hint) is dict:
            name, hint = f"{name}.{PLACEHOLDER}", typing.get_args(hint)[1]
        if dataclasses.is_dataclass(hint):
            found[name] = hint
    return found


@functools.cache
def _attributeDocs(module: str) -> dict:
    return ModuleAnalyzer.for_module(module).find_attr_docs()


def attributeDoc(cls: type, name: str) -> str | None:
    """
    The C{#:} comment of the attribute C{name}, from the class of C{cls}'s
    MRO that declares it (a dataclass may inherit fields), or None.
    """
    owner = next((k for k in cls.__mro__
                  if name in inspect.get_annotations(k)), None)
    if owner is None:
        return None
    lines = _attributeDocs(owner.__module__).get((owner.__qualname__, name), [])
    return "\n".join(lines).strip() or None


def fieldDocs(cls: type) -> dict[str, str | None]:
    """Field name → its doc comment (None where it has none), in order."""
    return {f.name: attributeDoc(cls, f.name) for f in dataclasses.fields(cls)}


def tomlValue(value) -> str:
    """A default as it is written in the TOML file."""
    if isinstance(value, Secret):
        # A default is no secret: it is written here.
        value = value.reveal()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(tomlValue(v) for v in value) + "]"
    return repr(value)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _escape(text: str) -> str:
    """
    Plain text, safe from reStructuredText's inline markup: every mark
    escaped, so that no C{redis://…} or C{USER@HOST} becomes a link, which
    a C{confval}'s type field cannot hold.
    """
    return re.sub(r"([^\w\s])", r"\\\1", text)


_CODE = re.compile(r"([CL])\{([^{}]*)\}")


def _prose(text: str) -> str:
    """
    A doc comment as reStructuredText: plain text, but epytext's C{C{code}}
    and C{L{name}} (the code's own markup) as literals.
    """
    out, end = [], 0
    for m in _CODE.finditer(text):
        before = "\\ " if m.start() and text[m.start() - 1].isalnum() else ""
        after = "\\ " if text[m.end():m.end() + 1].isalnum() else ""
        out += [_escape(text[end:m.start()]),
                f"{before}``{m.group(2).strip()}``{after}"]
        end = m.end()
    return "".join([*out, _escape(text[end:])])


def describe(section: str, cls: type) -> list[str]:
    """reStructuredText lines: one C{confval} per key of C{cls}."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("rest"):
            # Not a key: the table's other keys (a plugin's own settings).
            continue
        kind = _TYPES[hints[f.name]]
        check = f.metadata.get("check")
        if check:
            kind = f"{kind}: {check[1]}"
        default = _default(f)
        lines += [
            f".. confval:: {section}.{f.name}",
            f"   :type: {_escape(kind)}",
            "   :default: " + ("not set" if default is None
                              else f"``{tomlValue(default)}``"),
            "",
        ]
        doc = _prose(attributeDoc(cls, f.name) or "")
        lines += ["   " + line if line else "" for line in doc.splitlines()]
        lines.append("")
    return lines


class ConfigSection(SphinxDirective):
    """C{.. snq-config:: SECTION}: the reference of one table's keys."""

    required_arguments = 1

    def run(self):
        section = self.arguments[0]
        known = sections()
        if section not in known:
            log.warning("snq-config: no section %r in snq.config.Config "
                        "(known: %s)", section, ", ".join(known),
                        location=self.get_location())
            return []
        cls = known[section]
        for name, doc in fieldDocs(cls).items():
            if doc is None:
                log.warning("snq-config: %s.%s has no #: doc comment in %s",
                            section, name, cls.__module__,
                            location=self.get_location())
        documented = self.env.__dict__.setdefault("snq_config_sections", {})
        documented.setdefault(self.env.docname, set()).add(section)
        intro = _prose(attributeDoc(Config, section.split(".")[0]) or "")
        return self.parse_text_to_nodes(
            "\n".join([intro, "", *describe(section, cls)]))


def _purge(app, env, docname):
    env.__dict__.get("snq_config_sections", {}).pop(docname, None)


def _merge(app, env, docnames, other):
    mine = env.__dict__.setdefault("snq_config_sections", {})
    for docname, documented in other.__dict__.get("snq_config_sections",
                                                  {}).items():
        if docname in docnames:
            mine[docname] = documented


def _alwaysRead(app, env, added, changed, removed):
    """Read the reference again on every build: the code may have changed."""
    return list(env.__dict__.get("snq_config_sections", {}))


def _checkEverySection(app, env):
    documented = set().union(
        *env.__dict__.get("snq_config_sections", {}).values())
    for section in sections().keys() - documented:
        log.warning("snq-config: the config section [%s] is documented "
                    "nowhere: add '.. snq-config:: %s'", section, section)


def setup(app):
    app.add_directive("snq-config", ConfigSection)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-get-outdated", _alwaysRead)
    app.connect("env-check-consistency", _checkEverySection)
    return {"parallel_read_safe": True, "parallel_write_safe": True,
            "env_version": 1}
