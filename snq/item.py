# -*- test-case-name: tests.test_item -*-
"""
The envelope: the one JSON object every producer, in any language, puts on
a queue.  Decoding is strict so that a bad frame is refused with a reason
once, instead of failing a handler again and again.

Version 1 has optional keys a producer writes only when it uses them
(C{run_at}, C{key}): a daemon older than a key refuses a frame that has it
(an unknown key is a C{baditem} dead letter, which C{snqctl dead retry}
brings back after the upgrade) and handles every other frame as before, so
producers and workers can be upgraded in any order.  C{v} changes only
when the meaning of a key changes.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

VERSION = 1

# One encoder for every frame: json.dumps with options builds a new one per
# call (16 µs an encode against 9 µs, measured for the producer).
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

DEFAULT_SITE = "default"
#: Deepest nesting of arrays and objects: far below where Python's JSON
#: modules give up (about 1,000 levels, less the caller's stack), so an item
#: that decodes always encodes again, for a retry or a dead letter.
MAX_DEPTH = 100
#: Longest id, transport or site, in characters (the SQL tables' columns).
MAX_NAME = 64

#: A JSON escape of a UTF-16 surrogate, the only way a frame can carry one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
#: Characters no id or name may hold: a NUL cuts a STOMP header, a newline
#: a log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class BadItem(ValueError):
    """A frame that is not a valid envelope; its message is the reason."""


@dataclass(frozen=True)
class Item:
    """
    One unit of work.  Handlers read it; only backends make new copies
    (with C{attempts} raised) when they retry it.
    """

    transport: str
    payload: Any
    site: str = DEFAULT_SITE
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    attempts: int = 0
    created: float = field(default_factory=time.time)
    priority: int = 0
    #: UNIX seconds before which it must not run; None = as soon as possible.
    run_at: float | None = None
    #: The producer's key for it (unique items, issue 15); None = none.
    key: str | None = None

    def toJSON(self) -> bytes:
        envelope = {
            "v": VERSION,
            "id": self.id,
            "site": self.site,
            "transport": self.transport,
            # Before the payload: a Redis claim reads the names and the
            # priority off the frame's start (snq/redis/lua/lines.lua).
            "priority": self.priority,
            "payload": self.payload,
            "attempts": self.attempts,
            "created": self.created,
        }
        # Only when used: a frame without them is one every daemon takes.
        if self.run_at is not None:
            envelope["run_at"] = self.run_at
        if self.key is not None:
            envelope["key"] = self.key
        return _encode(envelope).encode("utf-8")

    def dueAt(self, now: float, delay: float = 0.0) -> float:
        """When it may run: its C{run_at}, else C{delay} seconds from C{now}."""
        return now + delay if self.run_at is None else self.run_at

    def retried(self) -> Item:
        return replace(self, attempts=self.attempts + 1)

    @classmethod
    def fromJSON(cls, frame: bytes | str) -> Item:
        try:
            if isinstance(frame, bytes):
                frame = frame.decode("utf-8")
            obj = json.loads(frame)
        except UnicodeDecodeError as e:
            raise BadItem(f"frame is not UTF-8: {e}")
        except ValueError as e:
            raise BadItem(f"frame is not JSON: {e}")
        except RecursionError:
            raise BadItem("frame is nested deeper than JSON can be decoded "
                          f"(limit {MAX_DEPTH} levels)")
        if not isinstance(obj, dict):
            raise BadItem(f"frame is a JSON {type(obj).__name__}, not an object")
        # Cheap tests first: few frames have that many brackets or escapes.
        if (frame.count("[") + frame.count("{") > MAX_DEPTH
                and _deeperThan(obj, MAX_DEPTH)):
            raise BadItem(f"frame is nested more than {MAX_DEPTH} levels deep")
        if _SURROGATE_ESCAPE.search(frame) and not _encodable(obj):
            raise BadItem("frame holds a lone UTF-16 surrogate (a \\udXXX "
                          "escape without its pair), which UTF-8 cannot carry")
        return cls.fromDict(obj)

    @classmethod
    def fromDict(cls, obj: dict) -> Item:
        unknown = set(obj) - _FIELDS
        if unknown:
            raise BadItem(f"unknown envelope keys: {', '.join(sorted(unknown))}")
        v = obj.get("v", VERSION)
        if not _isInt(v) or v != VERSION:
            raise BadItem(f"envelope version {v!r} is not supported (expected 1)")
        if "payload" not in obj:
            raise BadItem("envelope has no 'payload'")
        transport = _name(obj, "transport", None)
        site = _name(obj, "site", DEFAULT_SITE)
        itemId = obj.get("id")
        if itemId is None:
            itemId = uuid.uuid4().hex
        elif not isinstance(itemId, str) or not itemId:
            raise BadItem("'id' must be a non-empty string (or left out)")
        for name, value in (("id", itemId), ("transport", transport),
                            ("site", site)):
            if len(value) > MAX_NAME or _CONTROL.search(value):
                raise BadItem(f"'{name}' must be at most {MAX_NAME} characters, "
                              "none of them a control character")
        attempts = obj.get("attempts", 0)
        if not _isInt(attempts) or attempts < 0:
            raise BadItem("'attempts' must be a non-negative integer")
        priority = obj.get("priority", 0)
        if not _isInt(priority):
            raise BadItem("'priority' must be an integer")
        created = obj.get("created", time.time())
        if not _isTime(created):
            raise BadItem("'created' must be UNIX seconds as a number")
        runAt = obj.get("run_at")
        if runAt is not None and not _isTime(runAt):
            raise BadItem("'run_at' must be UNIX seconds as a number, or null")
        key = obj.get("key")
        if key is not None and (not isinstance(key, str) or not key
                                or len(key) > MAX_KEY):
            raise BadItem(f"'key' must be a non-empty string of at most "
                          f"{MAX_KEY} characters, or null")
        return cls(
            transport=transport,
            payload=obj["payload"],
            site=site,
            id=itemId,
            attempts=attempts,
            created=float(created),
            priority=priority,
            run_at=None if runAt is None else float(runAt),
            key=key,
        )


_FIELDS = {"v", "id", "site", "transport", "payload", "attempts", "created",
           "priority", "run_at", "key"}
#: Longest C{key}: room for a hash or a URL, not for a payload.
MAX_KEY = 255


def _isTime(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _deeperThan(obj: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than C{limit} levels in C{obj}."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children
                     if isinstance(c, (dict, list)))
    return False


def _encodable(obj: Any) -> bool:
    """Whether C{obj} has no lone surrogate, so that L{Item.toJSON} works."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _isInt(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name(obj: dict, key: str, default: str | None) -> str:
    value = obj.get(key, default)
    if value is None:
        raise BadItem(f"envelope has no '{key}'")
    checkName(key, value)
    return value


def plainPart(value: str) -> str:
    """
    The longest part of an id or key that every JSON encoder writes as is
    (no escapes, whatever its options): what a frame holding it holds, to
    find it without decoding every frame.
    """
    return max(re.findall(r"[\w.:-]+", value, re.ASCII), key=len, default="")


def checkName(key: str, value: Any) -> None:
    """A transport or site name as the envelope takes it, else L{BadItem}."""
    if (not isinstance(value, str) or not value or "/" in value
            or value != value.strip()):
        raise BadItem(f"'{key}' must be a non-empty name without '/' or spaces")
