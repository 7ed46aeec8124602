"""What every reader returns: the unpickled tree with lazy tensors (or sections already found, for
layouts that carry their own structure), where their bytes live, and plain facts about the files."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from .mapped import MappedFile
from .records import StorageRef, TensorTable, element_size


@dataclass
class RawCheckpoint:
    format: str
    root: Any
    unsafe: set[str]
    source: MappedFile | None
    storages: dict[str, StorageRef] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)  # storage key -> end of its bytes
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # every file behind the checkpoint
    sections: dict[str, TensorTable] | None = None  # found by the reader; None: find them in ``root``
    optimizers: dict[str, Any] | None = None
    location: str | None = None  # the folder that is the checkpoint, when it is one
    warnings: list[str] = field(default_factory=list)  # things a user should know that did not stop the read
    trust: bool = False  # set by open_checkpoint; readers that unpickle more files on first read honour it

    def damaged_storages(self) -> list[str]:
        """Storages whose declared bytes do not fit in the file (the reasons ``source.check`` gives)."""
        if not self.storages:
            return []
        keys, refs = list(self.storages), list(self.storages.values())
        offsets, limits, size = self.source.offsets, self.limits, self.source.size
        sizes = {dtype: element_size(dtype) for dtype in set(map(_DTYPE, refs))}
        n = len(refs)
        try:
            if list(offsets) == keys and all(map(str.__eq__, map(_KEY, refs), keys)):  # a reader's own order
                start = np.fromiter(offsets.values(), np.int64, n)
            else:
                start = np.fromiter(map(offsets.get, map(_KEY, refs), repeat(-1)), np.int64, n)
            if list(limits) == keys:
                bound = np.fromiter(limits.values(), np.int64, n)
            else:
                bound = np.fromiter(map(limits.get, keys, repeat(size)), np.int64, n)
            bound = np.minimum(bound, size)
            nbytes = np.fromiter(map(_NUMEL, refs), np.int64, n) * np.fromiter(
                map(sizes.__getitem__, map(_DTYPE, refs)), np.int64, n)
            end = start + np.fromiter(map(_BYTE_OFFSET, refs), np.int64, n) + nbytes
            bad = np.flatnonzero((start < 0) | (end > bound) | (nbytes < 0)).tolist()
        except OverflowError:  # sizes beyond int64: exact arithmetic
            bad = range(n)
        found = [self.source.check(refs[i], limits.get(keys[i])) for i in bad]
        return [why for why in found if why]


_KEY, _DTYPE, _NUMEL, _BYTE_OFFSET = (operator.attrgetter(a) for a in ("key", "dtype", "numel", "byte_offset"))
