"""What ckptviz remembers about the live models it loads into: a fingerprint of each tensor it did
not overwrite, taken at the first load, so a later report can flag tensors that still hold exactly
their initial values (a sign they were never loaded)."""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Iterable

import torch
from torch import nn

_INITIAL: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()


def fingerprint(t: torch.Tensor) -> int | None:
    """A CRC of the tensor's bytes (None for meta tensors, which hold no values)."""
    if t.device.type == "meta":
        return None
    data = t.detach().reshape(-1).contiguous().cpu()
    if data.numel() == 0:
        return 0
    return zlib.crc32(data.view(torch.uint8).numpy().data) ^ hash((tuple(t.shape), str(t.dtype)))


def remember_initial(model: nn.Module, tensors: dict[str, torch.Tensor], keys: Iterable[str]) -> None:
    """Record the fingerprints of ``keys`` (once per model and key) before a load leaves them as they are."""
    seen = _INITIAL.setdefault(model, {})
    for k in keys:
        if k not in seen:
            seen[k] = fingerprint(tensors[k])


def still_initial(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, bool]:
    """For each key: whether it still holds exactly the value recorded before ckptviz's first load
    into ``model`` (False for keys never recorded: loaded ones, or models ckptviz never loaded)."""
    seen = _INITIAL.get(model, {})
    return {k: k in seen and seen[k] is not None and fingerprint(t) == seen[k] for k, t in tensors.items()}
