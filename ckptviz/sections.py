"""Finding the state dicts inside a checkpoint's object tree, ranking them, and separating the plain
data (epoch, step, hyper-parameters, versions) and optimizer states from the weights."""

from __future__ import annotations

import itertools
import reprlib
from collections.abc import Mapping
from typing import Any

import torch

from . import walk as walk_limits
from .readers.pickle_reader import OpaqueTensor, Stub, TensorRef
from .readers.records import LAZY, Tensorish
from .walk import Budget

# Names under which training scripts store model weights, best first.
SECTION_NAMES = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema", "model_ema", "params")
MAX_DEPTH = 6

_TENSORS = (*LAZY, torch.Tensor)


def is_tensor(v: Any) -> bool:
    return isinstance(v, _TENSORS)


def is_optimizer_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj


def _is_module_stub(obj: Any) -> bool:
    if not isinstance(obj, Stub):
        return False
    attrs = obj.attributes()
    return "_parameters" in attrs or "_modules" in attrs or obj._ckptviz_global.startswith("__torch__.")


_KEY_REPR = reprlib.Repr()
_KEY_REPR.maxlevel, _KEY_REPR.maxstring, _KEY_REPR.maxother = 3, 80, 80
for _name in ("maxtuple", "maxlist", "maxdict", "maxset", "maxfrozenset"):
    setattr(_KEY_REPR, _name, 4)


def key_text(k: Any) -> str:
    """A key as text, bounded whatever the key is (a tuple key can share itself into 10**30 leaves)."""
    return k if type(k) is str else str(k) if type(k) in (int, float, bool) else _KEY_REPR.repr(k)


def _mapping(v: Any) -> Mapping:
    return v if isinstance(v, Mapping) else {}


def module_state_dict(stub: Stub, prefix: str = "", budget: Budget | None = None) -> dict[str, TensorRef]:
    """The state dict of a pickled ``nn.Module`` (or TorchScript module), read from its recorded state.

    A child recorded under several names appears under each (as torch's ``state_dict`` gives it), but
    the walk counts every module and entry against ``budget``: the size of the whole walk is first
    computed with each distinct module visited once, so a module tree that points at one child many
    times at every level raises :class:`~ckptviz.walk.WalkLimitError` at once, without walking its
    paths; a module that contains itself is not entered again."""
    budget = budget if budget is not None else Budget(None, "the module records' tree")
    contents: dict[int, tuple[list, list]] = {}
    if _walk_size(stub, contents) > budget.left:
        budget.step(budget.left + 1)  # raises, naming the limit
    out: dict[str, TensorRef] = {}
    stack: list[tuple[Stub, str, frozenset[int]]] = [(stub, prefix, frozenset())]
    while stack:
        module, at, above = stack.pop()
        budget.step()
        found, children = contents.get(id(module)) or _contents(module)
        budget.step(len(found) + len(children))
        out.update((at + key_text(name), v) for name, v in found)
        inside = above | {id(module)}
        stack.extend((child, f"{at}{key_text(name)}.", inside) for name, child in reversed(children)
                     if isinstance(child, Stub) and id(child) not in inside)
    return out


def _contents(module: Stub) -> tuple[list, list]:
    """(the (name, tensor record) pairs, the (name, child) pairs) a module record holds."""
    attrs = module.attributes()
    if "_parameters" in attrs or "_modules" in attrs:
        skip = attrs.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset, list, tuple, Mapping)) else ()
        found = [(name, v) for name, v in _mapping(attrs.get("_parameters")).items() if isinstance(v, TensorRef)]
        found += [(name, v) for name, v in _mapping(attrs.get("_buffers")).items()
                  if isinstance(v, TensorRef) and not _skipped(name, skip)]
        children = list(_mapping(attrs.get("_modules")).items())
    else:  # TorchScript: tensors and submodules are plain attributes
        found = [(k, v) for k, v in attrs.items() if isinstance(v, TensorRef)]
        children = [(k, v) for k, v in attrs.items() if isinstance(v, Stub)]
    return found, children


def _walk_size(root: Stub, contents: dict[int, tuple[list, list]]) -> int:
    """How many budget steps :func:`module_state_dict` takes on ``root`` (each path counted), computed
    with each distinct module visited once (its contents kept in ``contents``); a child that leads back
    to a module being counted counts 0 there, so this never exceeds the real walk."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Stub, int]] = [(root, 0)]
    while stack:
        module, state = stack.pop()
        key = id(module)
        if state == 0:
            if key in sizes or key in active:
                continue
            active.add(key)
            contents[key] = found, children = _contents(module)
            stack.append((module, 1))
            stack.extend((c, 0) for _, c in children if isinstance(c, Stub))
        else:
            found, children = contents[key]
            sizes[key] = 1 + len(found) + len(children) + sum(
                sizes.get(id(c), 0) for _, c in children if isinstance(c, Stub))
            active.discard(key)
    return sizes[id(root)]


def _skipped(name: Any, skip: Any) -> bool:
    try:
        return name in skip
    except TypeError:  # an unhashable name asked of a set
        return False


def _children(obj: Any) -> list[tuple[str, Any]]:
    if isinstance(obj, Stub):
        items = list(obj.items()) or list(obj.attributes().items())
        items_list = obj.items_list if isinstance(obj.items_list, list) else []
        return [(key_text(k), v) for k, v in items] + [(str(i), v) for i, v in enumerate(items_list)]
    if isinstance(obj, Mapping):
        return [(key_text(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(obj)]
    return []


def _flatten(obj: Mapping, prefix: str = "", depth: int = 0, budget: Budget | None = None) -> dict[str, Any] | None:
    """Flatten a nested mapping of tensors into dotted keys; None if it holds anything else."""
    budget = budget if budget is not None else Budget(None, "the nested state dict")
    budget.step(len(obj))
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if is_tensor(v):
            out[f"{prefix}{key_text(k)}"] = v
        elif isinstance(v, Mapping) and depth < MAX_DEPTH:
            sub = _flatten(v, f"{prefix}{key_text(k)}.", depth + 1, budget)
            if sub is None:
                return None
            out.update(sub)
        else:
            return None
    return out


def _join(path: str, key: str) -> str:
    return key if path == "" else f"{path}.{key}"


def find_sections(root: Any, where: str | None = None) -> tuple[dict[str, dict[str, Tensorish]], dict[str, Any]]:
    """Return ({section: {key: tensor}}, {section: optimizer_state}) found under ``root``.

    A subtree that held nothing is not walked again where the pickle shares it (a "billion laughs"
    of plain lists costs one visit per distinct list); every visit counts against
    ``ckptviz.walk.MAX_WALK_NODES`` (``where`` names the file in the error)."""
    weights: dict[str, dict[str, Tensorish]] = {}
    optimizers: dict[str, Any] = {}
    budget = Budget(where, "finding the state dicts in the file's object tree")
    barren: set[tuple[int, int, bool]] = set()  # (id, depth, named like a section) of subtrees that held nothing

    def walk(obj: Any, path: str, depth: int) -> bool:
        if depth > MAX_DEPTH or is_tensor(obj):
            return False
        named = path.rsplit(".", 1)[-1] in SECTION_NAMES
        memo = (id(obj), depth, named)
        if memo in barren:
            return False
        budget.step()
        if _is_module_stub(obj):
            sd = module_state_dict(obj, budget=budget)
            if sd:
                weights[path] = sd
            return bool(sd)
        if is_optimizer_state(obj):
            optimizers[path] = obj
            return True
        children = _children(obj)
        budget.step(len(children))
        found = False
        if isinstance(obj, Mapping) and children:
            tensors = {k: v for k, v in children if is_tensor(v)}
            if tensors and 2 * len(tensors) >= len(children):
                weights[path] = tensors
                found = True
            elif not tensors and named:
                flat = _flatten(obj, budget=budget)
                if flat:
                    weights[path] = flat
                    return True
        for key, child in children:
            if not is_tensor(child) and isinstance(child, (Mapping, list, tuple)):
                found = walk(child, _join(path, key), depth + 1) or found
        if not found:
            barren.add(memo)
        return found

    walk(root, "", 0)
    return weights, optimizers


def rank(sections: dict[str, dict]) -> list[str]:
    """Section names, best first: the top level, then well-known names, then by size."""

    def score(name: str) -> tuple:
        last = name.rsplit(".", 1)[-1]
        named = SECTION_NAMES.index(last) if last in SECTION_NAMES else len(SECTION_NAMES)
        return (name != "", named, name.count("."), -len(sections[name]), name)

    return sorted(sections, key=score)


_CUT = "... (cut: more than ckptviz.walk.MAX_DISPLAY_NODES values to show)"


def plain(obj: Any, depth: int = 0, budget: list[int] | None = None, memo: dict | None = None) -> Any:
    """A readable, plain-data copy of ``obj``: stand-ins become dicts, tensors become short strings.

    Containers deeper than ``MAX_DEPTH`` show as "...", sequences their first 1000 items. A container
    the pickle shares is converted once and shared in the copy; the copy, written out as a tree, holds
    at most ``ckptviz.walk.MAX_DISPLAY_NODES`` values (the rest is cut with a marker), so printing it
    stays bounded too."""
    budget = budget if budget is not None else [walk_limits.MAX_DISPLAY_NODES]
    memo = memo if memo is not None else {}
    return _plain(obj, depth, budget, memo)


def _plain(obj: Any, depth: int, budget: list[int], memo: dict) -> Any:
    if budget[0] <= 0:
        return _CUT
    if depth > MAX_DEPTH:
        budget[0] -= 1
        return "..."
    if not isinstance(obj, (Mapping, list, tuple, set, frozenset)):
        budget[0] -= 1
        return _leaf(obj)
    key = (id(obj), depth)
    hit = memo.get(key)
    if hit is not None:
        value, size, _ = hit
        if size > budget[0]:
            budget[0] = 0
            return _CUT
        budget[0] -= size
        return value
    before = budget[0]
    budget[0] -= 1
    if isinstance(obj, Stub):
        value: Any = {"__class__": obj._ckptviz_global}
        value.update({k: _plain(v, depth + 1, budget, memo) for k, v in _children(obj)})
    elif isinstance(obj, Mapping):
        value = {}
        for k, v in obj.items():
            if budget[0] <= 0:
                value["..."] = _CUT
                break
            value[k if isinstance(k, (str, int, float)) else key_text(k)] = _plain(v, depth + 1, budget, memo)
    else:
        items = []
        for v in itertools.islice(obj, 1000):
            if budget[0] <= 0:
                items.append(_CUT)
                break
            items.append(_plain(v, depth + 1, budget, memo))
        value = items if not isinstance(obj, tuple) else tuple(items)
    memo[key] = (value, before - budget[0], obj)  # obj kept alive so its id is not reused
    return value


def _leaf(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1 and obj.device.type != "meta":
        return obj.item()
    if isinstance(obj, _TENSORS):
        return f"tensor({str(obj.dtype).removeprefix('torch.')}, shape={list(obj.shape)})"
    if isinstance(obj, OpaqueTensor):
        return f"<{obj.builder}>"
    return obj


def metadata(root: Any, taken: set[str]) -> dict[str, Any]:
    """The plain data at the top level of ``root`` that is not a section or optimizer state."""
    if _is_module_stub(root) or not isinstance(root, Mapping):
        return {}
    budget, memo = [walk_limits.MAX_DISPLAY_NODES], {}
    return {k: plain(v, 0, budget, memo) for k, v in _children(root) if k not in taken and not is_tensor(v)}
