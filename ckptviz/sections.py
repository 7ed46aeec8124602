"""Finding the state dicts inside a checkpoint's object tree, ranking them, and separating the plain
data (epoch, step, hyper-parameters, versions) and optimizer states from the weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .readers.pickle_reader import OpaqueTensor, Stub, TensorRef
from .readers.records import LAZY, Tensorish

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


def module_state_dict(stub: Stub, prefix: str = "") -> dict[str, TensorRef]:
    """The state dict of a pickled ``nn.Module`` (or TorchScript module), read from its recorded state."""
    attrs = stub.attributes()
    out: dict[str, TensorRef] = {}
    if "_parameters" in attrs or "_modules" in attrs:
        skip = attrs.get("_non_persistent_buffers_set") or set()
        for name, v in (attrs.get("_parameters") or {}).items():
            if isinstance(v, TensorRef):
                out[prefix + name] = v
        for name, v in (attrs.get("_buffers") or {}).items():
            if isinstance(v, TensorRef) and name not in skip:
                out[prefix + name] = v
        children = attrs.get("_modules") or {}
    else:  # TorchScript: tensors and submodules are plain attributes
        out.update({prefix + k: v for k, v in attrs.items() if isinstance(v, TensorRef)})
        children = {k: v for k, v in attrs.items() if isinstance(v, Stub)}
    for name, child in children.items():
        if isinstance(child, Stub):
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def _children(obj: Any) -> list[tuple[str, Any]]:
    if isinstance(obj, Stub):
        items = list(obj.items()) or list(obj.attributes().items())
        return [(str(k), v) for k, v in items] + [(str(i), v) for i, v in enumerate(obj.items_list)]
    if isinstance(obj, Mapping):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(obj)]
    return []


def _flatten(obj: Mapping, prefix: str = "", depth: int = 0) -> dict[str, Any] | None:
    """Flatten a nested mapping of tensors into dotted keys; None if it holds anything else."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if is_tensor(v):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, Mapping) and depth < MAX_DEPTH:
            sub = _flatten(v, f"{prefix}{k}.", depth + 1)
            if sub is None:
                return None
            out.update(sub)
        else:
            return None
    return out


def _join(path: str, key: str) -> str:
    return key if path == "" else f"{path}.{key}"


def find_sections(root: Any) -> tuple[dict[str, dict[str, Tensorish]], dict[str, Any]]:
    """Return ({section: {key: tensor}}, {section: optimizer_state}) found under ``root``."""
    weights: dict[str, dict[str, Tensorish]] = {}
    optimizers: dict[str, Any] = {}

    def walk(obj: Any, path: str, depth: int) -> None:
        if depth > MAX_DEPTH or is_tensor(obj):
            return
        if _is_module_stub(obj):
            sd = module_state_dict(obj)
            if sd:
                weights[path] = sd
            return
        if is_optimizer_state(obj):
            optimizers[path] = obj
            return
        children = _children(obj)
        if isinstance(obj, Mapping) and children:
            tensors = {k: v for k, v in children if is_tensor(v)}
            if tensors and 2 * len(tensors) >= len(children):
                weights[path] = tensors
            elif not tensors and path.rsplit(".", 1)[-1] in SECTION_NAMES:
                flat = _flatten(obj)
                if flat:
                    weights[path] = flat
                    return
        for key, child in children:
            if not is_tensor(child):
                walk(child, _join(path, key), depth + 1)

    walk(root, "", 0)
    return weights, optimizers


def rank(sections: dict[str, dict]) -> list[str]:
    """Section names, best first: the top level, then well-known names, then by size."""

    def score(name: str) -> tuple:
        last = name.rsplit(".", 1)[-1]
        named = SECTION_NAMES.index(last) if last in SECTION_NAMES else len(SECTION_NAMES)
        return (name != "", named, name.count("."), -len(sections[name]), name)

    return sorted(sections, key=score)


def plain(obj: Any, depth: int = 0) -> Any:
    """A readable, plain-data copy of ``obj``: stand-ins become dicts, tensors become short strings."""
    if depth > MAX_DEPTH:
        return "..."
    if isinstance(obj, torch.Tensor) and obj.numel() == 1 and obj.device.type != "meta":
        return obj.item()
    if isinstance(obj, _TENSORS):
        return f"tensor({str(obj.dtype).removeprefix('torch.')}, shape={list(obj.shape)})"
    if isinstance(obj, OpaqueTensor):
        return f"<{obj.builder}>"
    if isinstance(obj, Stub):
        out = {"__class__": obj._ckptviz_global}
        out.update({str(k): plain(v, depth + 1) for k, v in _children(obj)})
        return out
    if isinstance(obj, Mapping):
        return {k if isinstance(k, (str, int, float)) else str(k): plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [plain(v, depth + 1) for v in list(obj)[:1000]]
        return items if not isinstance(obj, tuple) else tuple(items)
    return obj


def metadata(root: Any, taken: set[str]) -> dict[str, Any]:
    """The plain data at the top level of ``root`` that is not a section or optimizer state."""
    if _is_module_stub(root) or not isinstance(root, Mapping):
        return {}
    return {str(k): plain(v) for k, v in _children(root) if k not in taken and not is_tensor(v)}
