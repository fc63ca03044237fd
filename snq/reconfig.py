# -*- test-case-name: tests.test_reconfig -*-
"""
What a reload changes, and how each change can be applied.

Compared by name, in the manner of buildbot's reconfigService: a site, a
transport, a handler or a config key is added, removed or changed.  Most
changes apply in place; a few (another backend, other handler code) can
only take effect in fresh worker processes, which the pool then starts one
at a time (a rolling restart).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from snq.handlers import handlerPaths
from snq.iomanagers import pluginPaths
from snq.secret import Secret, maskURL

LIVE = "live"
ROLLING = "rolling"

#: Keys (or whole sections) whose change needs new worker processes: the
#: queue they talk to.
_ROLLING_KEYS = {
    "daemon.id", "queue.backend", "queue.basename", "db", "stomp", "redis",
    "ledger", "cluster.xmpp_lease",
}


@dataclass(frozen=True)
class Change:
    key: str
    kind: str  # added | removed | changed
    #: Values as configured: print them only through L{describe}.
    old: Any = field(repr=False)
    new: Any = field(repr=False)
    how: str  # live | rolling

    def describe(self) -> str:
        if self.kind == "added":
            what = f"{self.key} added"
        elif self.kind == "removed":
            what = f"{self.key} removed"
        else:
            what = f"{self.key}: {_show(self.old)} → {_show(self.new)}"
        how = "applied in place" if self.how == LIVE else "rolling restart"
        return f"{what} ({how})"


def _show(value) -> str:
    """
    A value as a diff shows it: a L{Secret} as C{'***'}, URLs masked, long
    values cut short.
    """
    text = repr(_printable(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _printable(value):
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        return maskURL(value)
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_printable(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _printable(getattr(value, f.name))
                for f in dataclasses.fields(value) if f.repr}
    return value


def diff(old, new) -> list[Change]:
    """
    The changes from C{old} to C{new} (both L{snq.config.Config}), their
    handlers' code included where both were L{stamped}.
    """
    changes: list[Change] = []
    sections = [f.name for f in dataclasses.fields(new)
                if dataclasses.is_dataclass(getattr(new, f.name))]
    for section in sections:
        before, after = getattr(old, section), getattr(new, section)
        if before == after:
            continue
        for f in dataclasses.fields(after):
            a, b = getattr(before, f.name), getattr(after, f.name)
            if a != b:
                key = f"{section}.{f.name}"
                how = ROLLING if {key, section} & _ROLLING_KEYS else LIVE
                changes.append(Change(key, "changed", a, b, how))
    for table in ("transports", "handlers", "iomanagers", "schedule"):
        changes += _diffTable(table, getattr(old, table), getattr(new, table))
    # A site's table, key by key: a secret beside a changed key stays out.
    changes += _diffTable("sites", old.sites, new.sites, depth=1)
    for module, fingerprint in sorted(new.code.items()):
        before = old.code.get(module)
        if before is not None and before != fingerprint:
            changes.append(Change(f"code {module}", "changed", before[:12],
                                  fingerprint[:12], ROLLING))
    return changes


def _diffTable(table: str, old: dict, new: dict, depth: int = 0) -> list[Change]:
    """Entries added, removed or changed; C{depth} levels of tables within."""
    changes = []
    for name in sorted(old.keys() | new.keys()):
        key = f"{table}.{name}"
        if name not in old:
            changes.append(Change(key, "added", None, new[name], LIVE))
        elif name not in new:
            changes.append(Change(key, "removed", old[name], None, LIVE))
        elif old[name] != new[name]:
            if depth and isinstance(old[name], dict) and isinstance(new[name], dict):
                changes += _diffTable(key, old[name], new[name], depth - 1)
            else:
                changes.append(Change(key, "changed", old[name], new[name], LIVE))
    return changes


def needsRollingRestart(changes: list[Change]) -> bool:
    return any(c.how == ROLLING for c in changes)


def codeFingerprints(paths: dict[str, str]) -> dict[str, str]:
    """
    C{transport → "module:Class"} → C{module → sha256 of its source file},
    found without importing the module, so the master never runs handler
    code.  A module that cannot be found is left out (loading it will fail
    with its own error).
    """
    fingerprints = {}
    for path in paths.values():
        module = path.partition(":")[0]
        if module in fingerprints:
            continue
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.has_location:
            continue
        try:
            with open(spec.origin, "rb") as f:
                fingerprints[module] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            continue
    return fingerprints


def stamped(config, generation: int, loaded: float):
    """
    C{config} as the master runs it: its generation, when it was loaded,
    and its handlers' and IoManager plugins' code fingerprints, so that the
    next reload's L{diff} sees new code.
    """
    paths = {**handlerPaths(config.handlers),
             **{f"iomanager {name}": path
                for name, path in pluginPaths(config).items()}}
    return dataclasses.replace(config, generation=generation, loaded=loaded,
                               code=codeFingerprints(paths))
