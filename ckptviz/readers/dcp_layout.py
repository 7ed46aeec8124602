"""How a distributed checkpoint's flat keys map back onto the state dict that was saved: from each
item's path (``planner_data``) it decides which tensors form a section (by the path's first
component), which items form an optimizer state (what precedes ``param_groups, <index>``, or the
flattened ``state.<fqn>.<name>`` / ``param_groups.<fqn>.<name>`` keys) and which are plain values;
and it rebuilds nested trees and optimizer states from (path, value) pairs. It reads no file."""

from __future__ import annotations

import itertools
from typing import Any

MAX_PATH_LENGTH = 64  # planner paths longer than this are damaged (state dicts nest < 10 levels): the fqn is used


def paths_of(fqns: list[str], planner: Any) -> list[tuple]:
    """Each item's path into the state dict that was saved (``planner_data``); ``(fqn,)`` without one, or
    for a path longer than ``MAX_PATH_LENGTH`` (the trees rebuilt from paths nest as deep as they are long)."""
    get = planner.get if isinstance(planner, dict) else {}.get
    paths = [p if type(p) is tuple and 0 < len(p) <= MAX_PATH_LENGTH
             else tuple(p) if type(p) is list and 0 < len(p) <= MAX_PATH_LENGTH else (f,)
             for f, p in zip(fqns, map(get, fqns))]
    if set(map(type, itertools.chain.from_iterable(paths))) <= {str, int}:
        return paths
    return [p if set(map(type, p)) <= {str, int} else (f,) for f, p in zip(fqns, paths)]  # a damaged planner_data


def _optimizer_roots(paths: list[tuple]) -> set[tuple]:
    """Paths of the optimizer states saved: what precedes ``"param_groups", <int>`` in some path."""
    roots = set()
    for p in paths:
        if "param_groups" in p:
            i = p.index("param_groups")
            if i + 1 < len(p) and type(p[i + 1]) is int:
                roots.add(p[:i])
    return roots


_FLAT_GROUPS = "param_groups by parameter"  # where a flattened optimizer's hyper-parameters are gathered


def _flat_optimizer_roots(paths: list[tuple], is_tensor: list[bool]) -> set[tuple]:
    """Paths of optimizer states saved flattened (``get_optimizer_state_dict(...,
    flatten_optimizer_state_dict=True)``, as torchtitan does): keys ``state.<fqn>.<name>``, and
    ``param_groups.<fqn>.<hyper-parameter>`` for plain values."""
    return {p[:-1] for p, t in zip(paths, is_tensor) if not t and type(p[-1]) is str
            and p[-1].startswith("param_groups.") and p[-1].count(".") > 1}


def _unflatten(paths: list[tuple], roots: set[tuple]) -> list[tuple]:
    """Flattened optimizer keys as nested paths: ``("state", fqn, name)``, ``(_FLAT_GROUPS, fqn, name)``."""

    def nested(p: tuple) -> tuple:
        if p[:-1] not in roots or type(p[-1]) is not str:
            return p
        head, _, rest = p[-1].partition(".")
        if head not in ("state", "param_groups") or "." not in rest:
            return p
        fqn, name = rest.rsplit(".", 1)
        return (*p[:-1], "state" if head == "state" else _FLAT_GROUPS, fqn, name)

    return list(map(nested, paths))


class Layout:
    """Where each item goes: a section's column, an optimizer state's tree, or the plain metadata."""

    def __init__(self, fqns: list[str], is_tensor: list[bool], planner: Any):
        paths = paths_of(fqns, planner)
        flat = _flat_optimizer_roots(paths, is_tensor)
        paths = _unflatten(paths, flat) if flat else paths
        self.roots = _optimizer_roots(paths) | flat
        owners = self._owners(paths)
        tensor_paths = [p for p, t in zip(paths, is_tensor) if t]
        tensor_owners = [o for o, t in zip(owners, is_tensor) if t]
        self.byte_items = [(f, p, o) for f, p, o, t in zip(fqns, paths, owners, is_tensor) if not t]
        self.optimizer_tensors = [(o, p[len(o):], row) for row, (p, o) in enumerate(zip(tensor_paths, tensor_owners))
                                  if o is not None]
        rows = [row for row, o in enumerate(tensor_owners) if o is None] if self.roots else range(len(tensor_paths))
        names = [str(tensor_paths[r][0]) if len(tensor_paths[r]) > 1 else "" for r in rows]
        keys = [_key(tensor_paths[r]) for r in rows]
        self.sections: dict[str, tuple[list[str], list[int]]] = {}
        if len(set(names)) == 1:  # the usual case: one section
            self.sections[names[0]] = (keys, list(rows))
            return
        for name, key, row in zip(names, keys, rows):
            section = self.sections.setdefault(name, ([], []))
            section[0].append(key)
            section[1].append(row)

    def _owners(self, paths: list[tuple]) -> list[tuple | None]:
        """The optimizer root each path lies under, or None."""
        depths = sorted({len(r) for r in self.roots})
        if not depths:
            return [None] * len(paths)

        def owner(p: tuple) -> tuple | None:
            for n in depths:
                if len(p) > n and p[:n] in self.roots:
                    return p[:n]
            return None

        return list(map(owner, paths))


def _key(path: tuple) -> str:
    """A tensor's key in its section: the path below the section's name, dotted."""
    if len(path) == 1:
        return str(path[0])
    return path[1] if len(path) == 2 and type(path[1]) is str else ".".join(map(str, path[1:]))


def name_of(root: tuple) -> str:
    return ".".join(map(str, root))


def insert(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        child = tree.get(key)
        tree = child if type(child) is dict else tree.setdefault(key, {})
    tree[path[-1]] = value


def listify(tree: Any) -> Any:
    """Nested dicts with the keys 0..n-1 (lists, as DCP flattens them) back into lists."""
    if type(tree) is not dict:  # values read from byte items (Stubs are dicts too) stay as they are
        return tree
    out = {k: listify(v) for k, v in tree.items()}
    if out and all(type(k) is int for k in out) and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return out


def optimizer_state(tree: dict) -> dict:
    """An optimizer state dict rebuilt from its items: ``state`` keyed as ``param_groups`` name params
    (DCP stores the integer ids as strings)."""
    out = listify(tree)
    if _FLAT_GROUPS in out:
        out["param_groups"] = _groups_of(out.pop(_FLAT_GROUPS))
    groups = out.get("param_groups")
    if isinstance(groups, dict):  # indices with gaps: keep their order
        groups = [groups[k] for k in sorted(groups, key=str)]
    groups = groups if isinstance(groups, list) else []
    params = [p for g in groups if isinstance(g, dict) for p in g.get("params", ())]
    state = out.get("state") if isinstance(out.get("state"), dict) else {}
    if params and all(type(p) is int for p in params):
        state = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in state.items()}
    return {**out, "state": state, "param_groups": groups}


def _groups_of(by_param: dict) -> list[dict]:
    """Parameter groups from each parameter's hyper-parameters: parameters with equal ones share a group,
    in the order they were saved."""
    groups: list[dict] = []
    for fqn, hyper in by_param.items():
        hyper = hyper if type(hyper) is dict else {}
        same = next((g for g in groups if g.keys() - {"params"} == hyper.keys() and _equal(g, hyper)), None)
        if same is None:
            groups.append({**hyper, "params": [fqn]})
        else:
            same["params"].append(fqn)
    return groups


def _equal(group: dict, hyper: dict) -> bool:
    try:
        return all(bool(group[k] == v) for k, v in hyper.items())
    except (TypeError, ValueError, RuntimeError):
        return False
