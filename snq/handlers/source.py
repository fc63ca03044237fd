# -*- test-case-name: tests.test_routing -*-
"""
A handler's group read from its source, without importing it: a web
application routes its items (L{snq.client}) without importing the
handlers, their dependencies or Twisted.

The group is found where Python finds the class attribute: a literal
C{group = "name"} in the class body, else in its bases (left to right,
depth first), followed through the module's own classes and its C{import}
lines.  Whatever would need running code to know (a computed value, a base
that is not a plain name) makes the group unreadable, never guessed.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
from dataclasses import dataclass

#: Bases followed at most, against cycles and pathological hierarchies.
MAX_DEPTH = 20


class Unreadable(Exception):
    """The group cannot be known without importing; the message says why."""


def sourceGroup(path: str) -> str:
    """
    The group of the handler class at C{"package.module:Class"} (C{"main"}
    when nothing in its hierarchy sets one), or L{Unreadable}.
    """
    moduleName, _, className = path.partition(":")
    if not className or "." in className:
        raise Unreadable(f"{path}: not a top-level class of a module")
    group = _classGroup(moduleName, className, 0)
    return "main" if group is None else group


@dataclass(frozen=True)
class _Module:
    name: str
    tree: ast.Module
    isPackage: bool

    @property
    def package(self) -> str:
        return self.name if self.isPackage else self.name.rpartition(".")[0]


@functools.lru_cache(maxsize=256)
def _module(name: str) -> _Module:
    """Find and parse a module without importing it (nor its packages)."""
    parts = name.split(".")
    search, spec = None, None
    for n in range(1, len(parts) + 1):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:n]),
                                                        search)
        if spec is None:
            raise Unreadable(f"module {name} is not installed here")
        search = spec.submodule_search_locations
    origin = spec.origin
    if not origin or not origin.endswith(".py"):
        raise Unreadable(f"module {name} has no Python source here")
    with open(origin, "rb") as f:
        try:
            tree = ast.parse(f.read(), origin)
        except SyntaxError as e:
            raise Unreadable(f"{origin}: {e}")
    return _Module(name, tree, search is not None)


def _classGroup(moduleName: str, className: str, depth: int) -> str | None:
    """The group set by the class or its bases; None if none sets one."""
    if depth > MAX_DEPTH:
        raise Unreadable(f"{moduleName}:{className}: bases nested too deep")
    module = _module(moduleName)
    cls = _lastBinding(module.tree.body, className)
    if isinstance(cls, ast.ImportFrom):
        return _classGroup(*_imported(module, cls, className), depth + 1)
    if not isinstance(cls, ast.ClassDef):
        raise Unreadable(f"{moduleName}:{className} is not a class written "
                         "in that module")
    value = _lastBinding(cls.body, "group")
    if value is not None:
        if (isinstance(value, ast.Constant) and isinstance(value.value, str)
                and value.value):
            return value.value
        raise Unreadable(f"{moduleName}:{className}.group is not a string "
                         "literal")
    for base in cls.bases:
        where = _resolve(module, base)
        group = None if where is None else _classGroup(*where, depth + 1)
        if group is not None:
            return group
    return None


def _lastBinding(body, name):
    """
    What a name is bound to at the end of a module or class body: a
    ClassDef (or function), an ImportFrom, or the assigned value's node.
    """
    found = None
    for stmt in body:
        bound = _bound(stmt, name)
        if bound is not None:
            found = bound
    return found


def _bound(stmt, name):
    if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return stmt if stmt.name == name else None
    if isinstance(stmt, ast.ImportFrom):
        names = {a.asname or a.name for a in stmt.names}
        return stmt if name in names else None
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        targets = [stmt.target]
    else:
        return None
    named = any(isinstance(t, ast.Name) and t.id == name for t in targets)
    return stmt.value if named else None


def _imported(module: _Module, stmt: ast.ImportFrom, name: str):
    """C{from M import X as name} → (M, X), M made absolute."""
    original = next(a.name for a in stmt.names if (a.asname or a.name) == name)
    return _absolute(module, stmt.module, stmt.level), original


def _absolute(module: _Module, target: str | None, level: int) -> str:
    if not level:
        return target
    package = module.package.split(".") if module.package else []
    if level - 1 >= len(package):
        raise Unreadable(f"{module.name}: relative import beyond the top")
    base = package[:len(package) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _resolve(module: _Module, base: ast.expr) -> tuple[str, str] | None:
    """A base class expression → (module, class) to look in; None: C{object}."""
    if isinstance(base, ast.Name):
        if base.id == "object":
            return None
        bound = _lastBinding(module.tree.body, base.id)
        if isinstance(bound, ast.ClassDef):
            return module.name, base.id
        if isinstance(bound, ast.ImportFrom):
            return _imported(module, bound, base.id)
        raise Unreadable(f"{module.name}: base {base.id} is not a class "
                         "defined or imported there")
    if isinstance(base, ast.Attribute):
        dotted = _dotted(base.value)
        if dotted is not None:
            return _importedModule(module, dotted), base.attr
    raise Unreadable(f"{module.name}: a base class is not a plain name")


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _importedModule(module: _Module, dotted: str) -> str:
    """The module that C{dotted} (as written in C{module}) names."""
    for stmt in module.tree.body:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.asname == dotted:
                    return alias.name
                if alias.asname is None and (
                        alias.name == dotted
                        or alias.name.startswith(dotted + ".")):
                    return dotted
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if (alias.asname or alias.name) == dotted:
                    parent = _absolute(module, stmt.module, stmt.level)
                    return f"{parent}.{alias.name}"
    raise Unreadable(f"{module.name}: {dotted} is not an imported module")
