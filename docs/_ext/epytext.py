"""
snq's docstrings are written in epytext, as Twisted's are (C{code},
L{link}, C{@param}); autodoc reads reStructuredText.  This turns the one
into the other as autodoc reads each docstring, so the docstrings stay as
the code's readers know them.
"""

import re

_MARKUP = {
    "C": ("``", "``"),
    "I": ("*", "*"),
    "B": ("**", "**"),
    "L": (":py:obj:`", "`"),
}
_FIELD = re.compile(
    r"^(\s*)@(param|type|ivar|cvar|var|raise|return|rtype)\b([^:]*):")
_FIELD_NAMES = {"raise": "raises", "return": "returns"}


def convertLine(line: str) -> str:
    """One docstring line, epytext → reStructuredText."""
    line = _FIELD.sub(
        lambda m: (f"{m.group(1)}:{_FIELD_NAMES.get(m.group(2), m.group(2))}"
                   f"{m.group(3)}:"),
        line)
    return convertMarkup(line)


def convertMarkup(text: str) -> str:
    """C{x}, I{x}, B{x}, L{x} → their reStructuredText, braces balanced."""
    out = []
    i = 0
    while i < len(text):
        letter = text[i]
        if letter in _MARKUP and text[i + 1:i + 2] == "{":
            end = _closingBrace(text, i + 1)
            if end is not None:
                inner = convertMarkup(text[i + 2:end]) if letter != "C" \
                    else text[i + 2:end]
                out.append(_inline(letter, inner, text, i, end))
                i = end + 1
                continue
        out.append(letter)
        i += 1
    return "".join(out)


def _closingBrace(text: str, start: int) -> int | None:
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def _inline(letter: str, inner: str, text: str, start: int, end: int) -> str:
    opener, closer = _MARKUP[letter]
    before = "\\ " if start and text[start - 1].isalnum() else ""
    after = "\\ " if end + 1 < len(text) and text[end + 1].isalnum() else ""
    return f"{before}{opener}{inner.strip()}{closer}{after}"


def _processDocstring(app, what, name, obj, options, lines):
    lines[:] = [convertLine(line) for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _processDocstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
