"""What readers produce: records of tensors known by their metadata only (``TensorRef`` over a
``StorageRef`` that says which file holds the bytes and where), and ``TensorTable``, one section's
tensors as columns, whose records are built only when a tensor is asked for. Nothing here reads
tensor data."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..fold import Folding, fold_keys

TENSOR_COLUMNS = ["shape", "dtype", "device", "numel", "nbytes", "file"]


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (complex dtypes included)."""
    return _ELEMENT_SIZES.get(dtype) or _element_size_slow(dtype)


def _element_size_slow(dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size() if dtype.is_complex else dtype.itemsize
    _ELEMENT_SIZES[dtype] = size
    return size


_ELEMENT_SIZES: dict[torch.dtype, int] = {}
_element_size = element_size  # the name older modules import


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype) or _DTYPE_NAMES.setdefault(dtype, str(dtype).removeprefix("torch."))


_DTYPE_NAMES: dict[torch.dtype, str] = {}


@dataclass(frozen=True)
class StorageRef:
    """One storage record of a file: where its bytes are, in which file, and where it was saved."""

    key: str
    dtype: torch.dtype
    location: str
    numel: int
    byte_offset: int = 0  # legacy files may view into a larger root storage
    source: Any = field(default=None, compare=False, repr=False)  # the MappedFile holding the bytes

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)

    def __setstate__(self, state: Any) -> None:  # a pickle's BUILD on a record changes nothing
        pass

    def __reduce__(self):  # copies and pickles go through the constructor, not __setstate__
        return (StorageRef, (self.key, self.dtype, self.location, self.numel, self.byte_offset, self.source))


class _Sized:
    """``numel`` and ``nbytes`` from a record's ``shape`` and ``dtype``."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


@dataclass
class TensorRef(_Sized):
    """A tensor known by its metadata only; its values are read when asked for."""

    storage: StorageRef | None
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = False
    is_param: bool = False

    def __setstate__(self, state: Any) -> None:  # a pickle's BUILD on a record changes nothing
        pass

    def __reduce__(self):
        return (TensorRef, (self.storage, self.offset, self.shape, self.stride, self.dtype, self.requires_grad,
                            self.is_param))

    @property
    def device(self) -> str:
        return self.storage.location if self.storage is not None else "meta"


@dataclass
class OpaqueTensor:
    """A tensor kind ckptviz does not unpack (quantized, sparse, nested, tensor subclasses)."""

    builder: str
    args: tuple = field(repr=False, default=())

    def __setstate__(self, state: Any) -> None:  # a pickle's BUILD on a record changes nothing
        pass

    def __reduce__(self):
        return (OpaqueTensor, (self.builder, self.args))


class LazyRecord(_Sized):
    """Base of records whose value takes more than one view of one file (e.g. a distributed
    checkpoint's tensor assembled from chunks). Subclasses set ``shape``, ``dtype``, ``device``
    (the saved location) and ``path`` (the file holding its first byte, for caching and errors), and
    implement ``read(maps)``, where ``maps`` is the caller's dict to share file maps across reads
    (key ``id(mapped_file)``, value ``mapped_file.map()``)."""

    device: str = "cpu"
    path: str | None = None

    def read(self, maps: dict[int, Any]) -> torch.Tensor:
        raise NotImplementedError


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


Tensorish = TensorRef | LazyRecord | torch.Tensor
_SHAPE, _DTYPE, _STORAGE = (operator.attrgetter(name) for name in ("shape", "dtype", "storage"))
LAZY = (TensorRef, LazyRecord)


def tensor_info(v: Tensorish) -> tuple[tuple[int, ...], str, str, int, int]:
    """(shape, dtype, device, numel, nbytes) of a lazy or real tensor, without reading values."""
    if isinstance(v, LAZY):
        return v.shape, dtype_name(v.dtype), v.device, v.numel, v.nbytes
    return tuple(v.shape), dtype_name(v.dtype), str(v.device), v.numel(), v.numel() * v.element_size()


class TensorTable(Mapping):
    """One section's tensors as columns (key, shape, dtype, device, file); a Mapping of key to record.

    ``make(i)`` builds the record of row ``i`` (a :class:`TensorRef`, or a real tensor) on demand,
    so a 500,000-tensor folder costs columns, not objects, until tensors are read.
    """

    def __init__(self, keys: list[str], shape: list[tuple[int, ...]], dtype: list[torch.dtype],
                 device: list[str] | str, file: list[str | None] | str | None,
                 make: Callable[[int], Tensorish] | Sequence[Tensorish], numel: np.ndarray | None = None):
        n = len(keys)
        self._numel = numel
        self.keys_list = keys
        self.shape = shape
        self.dtype = dtype
        self.device = device if isinstance(device, list) else [device] * n
        self.file = file if isinstance(file, list) else [file] * n
        self._make = make if callable(make) else make.__getitem__
        self._index: dict[str, int] | None = None
        self._frame: pd.DataFrame | None = None
        if not (len(shape) == len(dtype) == len(self.device) == len(self.file) == n):
            raise ValueError("TensorTable columns differ in length")

    @classmethod
    def from_refs(cls, entries: Mapping[str, Tensorish], file: str | None = None) -> TensorTable:
        """A table over existing records (a pickle's tensors, an in-memory state dict); the records
        stay in ``records_list``, parallel to ``keys_list``."""
        if isinstance(entries, TensorTable):
            return entries
        keys, values = list(entries), list(entries.values())
        if all(type(v) is TensorRef for v in values):  # a pickle's records: columns at C speed
            shape, dtype = list(map(_SHAPE, values)), list(map(_DTYPE, values))
            device = [s.location if s is not None else "meta" for s in map(_STORAGE, values)]
        else:
            shape, dtype, device = [], [], []
            for v in values:
                if isinstance(v, LAZY):
                    shape.append(v.shape)
                    device.append(v.device)
                else:
                    shape.append(tuple(v.shape))
                    device.append(str(v.device))
                dtype.append(v.dtype)
        table = cls(keys, shape, dtype, device, file, values)
        table.records_list = values
        return table

    @classmethod
    def concat(cls, tables: Sequence[TensorTable]) -> TensorTable:
        """One table over several (the shards of a folder), rows in order."""
        if len(tables) == 1:
            return tables[0]
        starts = np.cumsum([0] + [len(t) for t in tables])

        def make(i: int) -> Tensorish:
            j = int(np.searchsorted(starts, i, side="right")) - 1
            return tables[j].record(i - int(starts[j]))

        def cat(col: str) -> list:
            return [x for t in tables for x in getattr(t, col)]

        numel = np.concatenate([t.numel() for t in tables]) if tables else None
        return cls(cat("keys_list"), cat("shape"), cat("dtype"), cat("device"), cat("file"), make, numel=numel)

    def subset(self, keep: Sequence[bool]) -> TensorTable:
        """The rows where ``keep`` is true, in order."""
        rows = [i for i, k in enumerate(keep) if k]

        def pick(col: list) -> list:
            return [col[i] for i in rows]

        return TensorTable(pick(self.keys_list), pick(self.shape), pick(self.dtype), pick(self.device),
                           pick(self.file), lambda i: self._make(rows[i]), numel=self.numel()[rows])

    # ---- Mapping ---------------------------------------------------------------------------
    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = dict(zip(self.keys_list, range(len(self.keys_list))))
        return self._index

    def record(self, i: int) -> Tensorish:
        return self._make(i)

    def __getitem__(self, key: str) -> Tensorish:
        return self._make(self.index[key])

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_list)

    def __len__(self) -> int:
        return len(self.keys_list)

    # ---- columns ---------------------------------------------------------------------------
    def numel(self) -> np.ndarray:
        if self._numel is None:
            self._numel = np.array(list(map(math.prod, self.shape)), dtype=np.int64)
        return self._numel

    def nbytes(self) -> np.ndarray:
        sizes = {d: element_size(d) for d in set(self.dtype)}
        return self.numel() * np.array(list(map(sizes.__getitem__, self.dtype)), dtype=np.int64)

    def folding(self) -> Folding:
        """How the keys fold into layer patterns (built once)."""
        if getattr(self, "_folding", None) is None:
            self._folding = fold_keys(self.keys_list)
        return self._folding

    def frame(self) -> pd.DataFrame:
        """One row per tensor: shape, dtype, device, numel, nbytes, file (built once, then copied)."""
        if self._frame is None:
            names = {d: dtype_name(d) for d in set(self.dtype)}
            self._frame = pd.DataFrame(
                {"shape": self.shape, "dtype": list(map(names.__getitem__, self.dtype)), "device": self.device,
                 "numel": self.numel(), "nbytes": self.nbytes(), "file": self.file},
                index=pd.Index(self.keys_list, name="key", dtype=object),
            )
        return self._frame.copy()

