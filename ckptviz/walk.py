"""Bounded walks over the object trees readers produce. A pickle's memo lets a 2 KB file share one
list at every level of a 30-level tree (10**30 paths, a "billion laughs"), so every consumer that
walks what a reader parsed (section discovery, metadata display, ``materialize``, optimizer state)
visits a shared object once, counts the nodes it visits against a work budget, and raises
:class:`WalkLimitError` (naming the limit and how to raise it) instead of hanging. The limits are
module attributes: raise them (``ckptviz.walk.MAX_WALK_NODES = ...``) for a file you trust."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import CheckpointError

MAX_WALK_NODES = 1_000_000  # containers one walk may visit (section discovery, materialize, optimizer checks)
MAX_EXPANDED_NODES = 10_000_000  # nodes a value may expand to when written out as a tree (shared parts repeated)
MAX_DISPLAY_NODES = 100_000  # nodes of plain data shown as metadata; the rest is cut with a marker
MAX_WALK_DEPTH = 400  # containers nested deeper than this are refused (pickled trees stop at 200)


class WalkLimitError(CheckpointError):
    """A walk over a checkpoint's object tree went past one of this module's limits."""


def limit_error(where: str | None, what: str, limit_name: str) -> WalkLimitError:
    """The error for a walk that went past ``ckptviz.walk.<limit_name>``."""
    value = globals()[limit_name]
    return WalkLimitError(
        f"{where or '<checkpoint>'}: {what} exceeds ckptviz.walk.{limit_name} = {value:,} (shared references "
        "in the pickle can make a small file describe an astronomically large tree). If you trust the file, "
        f"raise the limit (ckptviz.walk.{limit_name} = ...) and try again."
    )


class Budget:
    """Counts nodes visited by one walk; ``step()`` raises past ``MAX_WALK_NODES`` (read when created)."""

    __slots__ = ("left", "where", "what")

    def __init__(self, where: str | None, what: str, limit: int | None = None):
        self.left = MAX_WALK_NODES if limit is None else limit
        self.where, self.what = where, what

    def step(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise limit_error(self.where, self.what, "MAX_WALK_NODES")


def _items(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return obj.values()
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    return ()


def expanded_size(root: Any, where: str | None = None, what: str = "the value", *,
                  limit: int | None = None) -> int:
    """How many nodes ``root`` holds when written out as a tree (each shared part counted at every place
    it appears, as ``repr``, ``copy.deepcopy`` of a tree, or torch's recursive casts see it), computed with
    each distinct container visited once. Raises :class:`WalkLimitError` past ``limit`` (default
    ``MAX_EXPANDED_NODES``) or ``MAX_WALK_NODES`` distinct containers; a cycle counts once."""
    limit = MAX_EXPANDED_NODES if limit is None else limit
    budget = Budget(where, what)
    sizes: dict[int, int] = {}
    active: set[int] = set()
    keep: list[Any] = []  # holds every visited container, so that ids are not reused during the walk
    stack: list[tuple[Any, Any, list[int]]] = []

    def enter(obj: Any) -> None:
        budget.step()
        if len(stack) >= MAX_WALK_DEPTH:
            raise limit_error(where, f"{what} nests containers deeper than", "MAX_WALK_DEPTH")
        active.add(id(obj))
        keep.append(obj)
        stack.append((obj, iter(_items(obj)), [1]))

    if not isinstance(root, (Mapping, list, tuple, set, frozenset)):
        return 1
    enter(root)
    while stack:
        obj, it, total = stack[-1]
        for child in it:
            if not isinstance(child, (Mapping, list, tuple, set, frozenset)):
                total[0] += 1
            elif id(child) in sizes:
                total[0] += sizes[id(child)]
            elif id(child) in active:
                total[0] += 1
            else:
                enter(child)
                break
            if total[0] > limit:
                raise limit_error(where, f"{what}, written out as a tree,", "MAX_EXPANDED_NODES")
        else:
            stack.pop()
            active.discard(id(obj))
            sizes[id(obj)] = total[0]
            if stack:
                stack[-1][2][0] += total[0]
                if stack[-1][2][0] > limit:
                    raise limit_error(where, f"{what}, written out as a tree,", "MAX_EXPANDED_NODES")
    return sizes[id(root)]
