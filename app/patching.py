"""Owns JSONPatch construction: JSON Pointer escaping and an edit API rules use instead of pointers.

Rules never write pointer strings. They call :meth:`ObjectEditor.set`,
:meth:`ObjectEditor.append` and :meth:`ObjectEditor.remove` with a path of keys and list
indexes; the editor emits one minimal operation per change (an ``add`` of one key, never of a
whole map that already exists, which would silently drop the user's other keys; an ``add`` at
the end of a list, ``.../-``, never a replace of the list) and keeps a copy-on-write view of the
edited object, so a later rule in the same pass sees earlier edits while the request object
stays untouched. No deep copy and no whole-object diff: the cost is proportional to the edit,
not the object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Path = Sequence[str | int]

_MISSING = object()


class ObjectShapeError(ValueError):
    """The object has a field of the wrong JSON type where an edit or rule must go (HTTP 400)."""


def escape(token: str | int) -> str:
    """RFC 6901: '~' becomes '~0' and '/' becomes '~1' (so kubernetes.azure.com~1agentpool)."""
    text = token if isinstance(token, str) else str(token)
    if "~" in text or "/" in text:  # rare: most keys are plain, and then nothing is copied
        return text.replace("~", "~0").replace("/", "~1")
    return text


def pointer(path: Path) -> str:
    parts = [token if isinstance(token, str) else str(token) for token in path]
    joined = "/".join(parts)
    if "~" in joined or joined.count("/") >= len(parts):  # some token holds a '~' or a '/'
        joined = "/".join([escape(part) for part in parts])
    return "/" + joined if parts else ""


def lookup(obj: Any, path: Path, default: Any = None) -> Any:
    """The value at ``path``, or ``default`` when any step is missing, null or of another type."""
    node = obj
    for token in path:
        if isinstance(token, int):
            if not isinstance(node, list) or not 0 <= token < len(node):
                return default
            node = node[token]
        else:
            if not isinstance(node, dict):
                return default
            node = node.get(token, _MISSING)
            if node is _MISSING:
                return default
        if node is None:
            return default
    return node


def describe(path: Path) -> str:
    """'spec.nodeSelector["kubernetes.azure.com/agentpool"]' style, for messages."""
    out = ""
    for token in path:
        if isinstance(token, int):
            out += f"[{token}]"
        elif token.replace("-", "").replace("_", "").isalnum():
            out += f".{token}" if out else token
        else:
            out += f'["{token}"]'
    return out


def expect_map(obj: Any, path: Path) -> dict:
    """The map at ``path`` ({} when absent or null); ObjectShapeError when it is something else."""
    value = lookup(obj, path, _MISSING)
    if value is _MISSING:
        return {}
    if not isinstance(value, dict):
        raise ObjectShapeError(f"{describe(path)} must be an object, not {type(value).__name__}")
    return value


def expect_list(obj: Any, path: Path) -> list:
    value = lookup(obj, path, _MISSING)
    if value is _MISSING:
        return []
    if not isinstance(value, list):
        raise ObjectShapeError(f"{describe(path)} must be a list, not {type(value).__name__}")
    return value


class ObjectEditor:
    """Edits a JSON object copy-on-write and records the JSONPatch operations that do the same."""

    def __init__(self, obj: dict):
        self.original = obj
        self.current = obj  # the edited view; containers are copied before their first change
        self.ops: list[dict] = []
        self._copied: dict[int, Any] = {}  # id -> container, held so ids are never reused

    def fork(self) -> ObjectEditor:
        """An editor over this one's current view; its edits join this one only when
        :meth:`adopt` is called (a rule that raises halfway leaves no partial edits)."""
        return ObjectEditor(self.current)

    def adopt(self, fork: ObjectEditor) -> None:
        """Take over the edits of ``fork`` (made by :meth:`fork`, nothing edited here since)."""
        if fork.ops:
            self.current = fork.current
            self.ops.extend(fork.ops)
            self._copied.update(fork._copied)

    def _writable_parent(self, path: Path) -> Any:
        """Copy every container from the root down to path[:-1]; return that parent."""
        if id(self.current) not in self._copied:
            self.current = dict(self.current)
            self._copied[id(self.current)] = self.current
        node = self.current
        for token in path[:-1]:
            child = node[token]
            if id(child) not in self._copied:
                child = dict(child) if isinstance(child, dict) else list(child)
                self._copied[id(child)] = child
                node[token] = child
            node = child
        return node

    def set(self, path: Path, value: Any) -> bool:
        """Make ``path`` hold ``value``, creating missing maps; False when it already does."""
        if not path:
            raise ValueError("cannot set the whole object")
        node = self.current
        for depth, token in enumerate(path[:-1]):
            child = _child(node, token, path[: depth + 1])
            if child is None:
                # Add the missing map with the rest of the path inside it, in one operation.
                nested: Any = value
                for inner in reversed(path[depth + 1:]):
                    nested = {inner: nested}
                return self._apply("add", path[: depth + 1], nested)
            node = child
        last = path[-1]
        if isinstance(node, dict):
            if last in node and node[last] == value and type(node[last]) is type(value):
                return False
            return self._apply("add" if node.get(last) is None else "replace", path, value)
        if isinstance(node, list) and isinstance(last, int) and 0 <= last < len(node):
            if node[last] == value and type(node[last]) is type(value):
                return False
            return self._apply("replace", path, value)
        raise ObjectShapeError(f"{describe(path[:-1])} cannot hold {describe(path)}")

    def append(self, path: Path, value: Any) -> None:
        """Add ``value`` at the end of the list at ``path`` (``add .../-``: the items already
        there stay as they are), creating the list, and missing maps above it, when absent or
        null."""
        current = lookup(self.current, path, _MISSING)
        if current is _MISSING:
            self.set(path, [value])
            return
        if not isinstance(current, list):
            raise ObjectShapeError(f"{describe(path)} must be a list, not "
                                   f"{type(current).__name__}")
        self._writable_parent((*path, len(current))).append(value)
        self.ops.append({"op": "add", "path": pointer((*path, "-")), "value": value})

    def remove(self, path: Path) -> bool:
        """Remove ``path``; False when it is not there."""
        absent = lookup(self.current, path, _MISSING) is _MISSING
        if absent and not _present_null(self.current, path):
            return False
        return self._apply("remove", path, None)

    def _apply(self, op: str, path: Path, value: Any) -> bool:
        parent = self._writable_parent(path)
        last = path[-1]
        if op == "remove":
            del parent[last]
            self.ops.append({"op": "remove", "path": pointer(path)})
        else:
            parent[last] = value
            self.ops.append({"op": op, "path": pointer(path), "value": value})
        return True


def _child(node: Any, token: str | int, path: Path) -> Any:
    """The container at node[token]; None when absent or null; ObjectShapeError when a scalar."""
    if isinstance(token, int):
        if not isinstance(node, list) or not 0 <= token < len(node):
            raise ObjectShapeError(f"{describe(path)} does not exist")
        child = node[token]
    else:
        if not isinstance(node, dict):
            raise ObjectShapeError(f"{describe(path[:-1])} must be an object")
        child = node.get(token)
    if child is not None and not isinstance(child, (dict, list)):
        raise ObjectShapeError(f"{describe(path)} must be an object, not {type(child).__name__}")
    return child


def _present_null(obj: Any, path: Path) -> bool:
    parent = lookup(obj, path[:-1], _MISSING)
    return isinstance(parent, dict) and path[-1] in parent and parent[path[-1]] is None
