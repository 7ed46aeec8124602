"""The no-execution pickle reader: turns a torch pickle into plain containers, lazy tensor records
(``TensorRef`` over ``StorageRef``) and inert :class:`Stub` stand-ins for every other class, at C
speed, without importing or calling anything the file names. Design: the scan (``pickle_scan``)
first walks every opcode and refuses what torch.save never writes (INST, OBJ, EXT1/2/4, out-of-band
buffers), memo indices beyond the stream's size and lengths beyond its end; then the C
``pickle.Unpickler`` reads the bytes, its ``find_class`` handing out only inert values (dtypes), per
file wrapper objects (``__slots__ = ()``, nothing to set, not types) that call ckptviz's own
validating record builders, inert markers and per-file Stub classes. So REDUCE, NEWOBJ, BUILD,
APPEND(S), SETITEM(S) and ADDITEMS can only reach those objects, the fresh builtins they return and
the records, which ignore BUILD; no object outside this file's unpickling can be changed. Tuples
hash recursively in C, so the unpickler runs on a stack sized for the deepest nesting the stream can
build, and trees nested deeper than :data:`MAX_NESTING` are refused. Every global the pickle names
beyond torch's ``weights_only`` allowlist is recorded."""

from __future__ import annotations

import _compat_pickle
import math
import operator
import pickle
import struct
import sys
import threading
from collections import Counter, OrderedDict
from dataclasses import fields
from functools import lru_cache
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError
from . import limits as _limits
from ._gc import paused_gc
from .limits import LimitExceeded
from .pickle_scan import TruncatedPickle, nesting_bound, scan
from .records import OpaqueTensor, StorageRef, TensorRef, element_size

MAX_NESTING = 200  # containers nested deeper than this are refused (torch.save never nests beyond ~10)
NESTING_CEILING = 250  # MAX_NESTING is honoured up to this: recursive walks (materialize: 3 frames a level) fit
MAX_GLOBALS = 10_000  # distinct global names one pickle may refer to


class Stub(dict):
    """Inert stand-in for an instance of a class the file names; it only records its state."""

    _ckptviz_global = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items_list = args, None, []
        return obj

    def __init__(self, *args, **kwargs):  # never calls the real constructor
        pass

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items_list.append(item)

    def extend(self, items):
        self.items_list.extend(items)

    def __repr__(self) -> str:
        return f"<{self._ckptviz_global}>"

    __hash__ = object.__hash__

    def attributes(self) -> dict:
        """The recorded state as a dict (what ``__dict__`` would have held)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            merged = dict(state[0]) if isinstance(state[0], dict) else {}
            merged.update(state[1])
            return merged
        return dict(state) if isinstance(state, dict) else {}


# What a damaged or hostile pickle can raise while we read it (allowlisted builders run on the
# file's arguments, so this includes what they raise: int overflow, unknown layouts, torch errors).
PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError,
                 struct.error, RecursionError, MemoryError, OverflowError, RuntimeError, CheckpointError)


# ---------------------------------------------------------------------------------------------
# what find_class hands out
# ---------------------------------------------------------------------------------------------


class _Handed:
    """Base of the objects find_class hands out for allowlisted callables and classes: no state at all
    (``__slots__ = ()``, and setattr refused, ``__class__`` included, so BUILD cannot change them), not
    a type (so NEWOBJ refuses them), and each a fresh class per unpickler."""

    __slots__ = ()
    _name = "?"

    def __setattr__(self, name: str, value: Any) -> None:  # BUILD's slot state, even __class__
        raise AttributeError(f"{self._name} (ckptviz stand-in) has no attribute {name!r} to set")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{self._name} (ckptviz stand-in) has no attribute {name!r} to delete")

    def __repr__(self) -> str:
        return f"<ckptviz stand-in for {self._name}>"


def _callable(name: str, fn) -> _Handed:
    call = staticmethod(fn)  # calling the stand-in calls fn with the pickle's arguments, nothing else
    return type(name.rsplit(".", 1)[-1], (_Handed,), {"__slots__": (), "_name": name, "__call__": call})()


def _marker(name: str) -> _Handed:
    """An allowlisted class ckptviz never calls (``torch.Tensor``, legacy tensor types): only a name."""
    return type(name.rsplit(".", 1)[-1], (_Handed,), {"__slots__": (), "_name": name})()


def _ints(what: str, values: Any, minimum: int | None = None) -> tuple[int, ...]:
    """``values`` as a tuple of ints (bools excluded), each at least ``minimum``; else a pickle error."""
    if type(values) in (tuple, list):
        for v in values:
            if type(v) is not int or (minimum is not None and v < minimum):
                break
        else:
            return values if type(values) is tuple else tuple(values)
    raise pickle.UnpicklingError(f"tensor record has an invalid {what}: {_short(values)}")


def _short(v: Any) -> str:
    try:
        text = repr(v)
    except (RecursionError, ValueError):
        text = f"<{type(v).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


_new_object = object.__new__  # records built field by field: the objects their dataclass __init__ makes
assert [f.name for f in fields(TensorRef)] == ["storage", "offset", "shape", "stride", "dtype", "requires_grad",
                                               "is_param"]
assert [f.name for f in fields(StorageRef)] == ["key", "dtype", "location", "numel", "byte_offset", "source"]


def _grad(requires_grad: Any, dtype: torch.dtype) -> bool:
    """A record's ``requires_grad`` as torch checks it when it rebuilds the tensor: a bool, and True only
    for floating point and complex dtypes."""
    if type(requires_grad) is not bool:
        raise pickle.UnpicklingError(f"tensor record has requires_grad={_short(requires_grad)}, not a bool; "
                                     "torch.load refuses it")
    if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
        raise pickle.UnpicklingError(f"tensor record of dtype {dtype} requires grad, which only floating point "
                                     "and complex tensors can; torch.load refuses it")
    return requires_grad


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, *, dtype=None):
    if type(storage) is not StorageRef:
        if isinstance(storage, Stub):  # e.g. pickle.dump's torch.storage._load_from_bytes: not unpacked
            return OpaqueTensor("torch._utils._rebuild_tensor_v2", (storage, offset, size, stride))
        raise pickle.UnpicklingError(
            f"tensor record without a torch storage (got {type(storage).__name__}); "
            "not a torch.save file, or a damaged one"
        )
    if type(offset) is not int or offset < 0:
        raise pickle.UnpicklingError(f"tensor record has an invalid storage offset: {_short(offset)}")
    if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride):
        size, stride = _ints("size", size, 0), _ints("stride", stride, 0)
        if len(size) != len(stride):
            raise pickle.UnpicklingError(f"tensor record has size {size} but stride {stride}")
    for v in size + stride:
        if type(v) is not int or v < 0:
            _ints("size", size, 0), _ints("stride", stride, 0)
    if math.prod(size) > min(_limits.MAX_NUMEL, _limits.NUMEL_CEILING):
        _limits.check_numel(size, math.prod(size), "a tensor record")
    ref = _new_object(TensorRef)
    ref.storage, ref.offset, ref.shape, ref.stride, ref.dtype = storage, offset, size, stride, storage.dtype
    if dtype is not None:
        if type(dtype) is not torch.dtype:
            raise pickle.UnpicklingError(f"tensor record has an invalid dtype: {_short(dtype)}")
        ref.dtype = dtype
    if 0 not in size:  # what torch's set_ checks: the view's last element lies inside the storage
        last = offset + sum(map(operator.mul, size, stride)) - sum(stride)  # offset + sum((n - 1) * s)
        if (last >= storage.numel if ref.dtype is storage.dtype
                else (last + 1) * element_size(ref.dtype) > storage.numel * element_size(storage.dtype)):
            raise pickle.UnpicklingError(
                f"a tensor record (size {_short(size)}, stride {_short(stride)}, offset {offset}) claims more bytes "
                f"than its storage holds (storage {storage.key!r}: {storage.numel:_} elements); torch.load refuses it")
    if metadata and type(metadata) not in (dict, OrderedDict):  # torch: set_tensor_metadata asserts a dict
        raise pickle.UnpicklingError(f"tensor record with metadata that is no dict: {_short(metadata)}; torch.load "
                                     "refuses it")
    ref.requires_grad = False if requires_grad is False else _grad(requires_grad, ref.dtype)
    ref.is_param = False
    return ref


def _rebuild_v2_record(*args):
    """``torch._utils._rebuild_tensor_v2`` as torch.load calls it: six or seven fields, no defaults."""
    if not 6 <= len(args) <= 7:
        raise pickle.UnpicklingError(f"a tensor record (_rebuild_tensor_v2) has {len(args)} fields where torch reads "
                                     "6 or 7; torch.load refuses it")
    return _rebuild_v2(*args)


def _rebuild_v2_jit(*args):
    """``_rebuild_tensor_v2`` as TorchScript's unpickler reads it: six fields, then a metadata dict if any."""
    # (its unpickler makes OrderedDict() None: only a plain dict passes as metadata)
    if len(args) < 6 or (len(args) > 6 and type(args[6]) is not dict):
        raise pickle.UnpicklingError(f"a TorchScript tensor record has {len(args)} fields"
                                     f"{'' if len(args) < 6 else ' and metadata that is no dict'}; torch.jit.load "
                                     "refuses it")
    return _rebuild_v2(*args[:7])


_JIT_BUILDERS = {"torch._utils._rebuild_tensor_v2": _rebuild_v2_jit}


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if dtype is None:  # v3 always names the dtype
        raise pickle.UnpicklingError("tensor record has an invalid dtype: None")
    return _rebuild_v2(storage, offset, size, stride, requires_grad, None, metadata, dtype=dtype)


def _rebuild_v1(storage, offset, size, stride):
    return _rebuild_v2(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks):
    if type(data) is TensorRef:
        data.is_param, data.requires_grad = True, _grad(requires_grad, data.dtype)
    return data


def _rebuild_parameter_with_state(data, requires_grad, hooks, state):
    return _rebuild_parameter(data, requires_grad, hooks)


def _rebuild_from_type(func, new_type, args, state):
    if type(args) is not tuple:
        raise pickle.UnpicklingError(f"tensor subclass record with invalid arguments: {_short(args)}")
    return func(*args)  # func is from this stream: only what find_class handed out is callable


def _rebuild_meta(dtype, size, stride, requires_grad):
    if type(dtype) is not torch.dtype:
        raise pickle.UnpicklingError(f"tensor record has an invalid dtype: {_short(dtype)}")
    size, stride = _ints("size", size, minimum=0), _ints("stride", stride, minimum=0)
    _limits.check_numel(size, math.prod(size), "a meta tensor record")
    return TensorRef(None, 0, size, stride, dtype, _grad(requires_grad, dtype))


def _parameter(data=None, requires_grad=True):
    return _rebuild_parameter(data, requires_grad, None)


def _size(*args):
    return _ints("torch.Size", args[0] if len(args) == 1 and type(args[0]) in (tuple, list) else args)


def _device(*args):
    if not args or len(args) > 2 or not all(type(a) in (str, int) or a is None for a in args):
        raise pickle.UnpicklingError(f"invalid torch.device arguments: {_short(args)}")
    return ":".join(str(a) for a in args if a is not None)


_TEXT_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "ascii", "utf-8", "utf8"})


def _refuse(name: str, args: tuple):
    raise pickle.UnpicklingError(f"refusing {name}{_short(args)}: not what a pickler writes")


def _text(args: tuple) -> bool:
    return type(args[0]) is str and (len(args) == 1 or (len(args) == 2 and args[1] in _TEXT_CODECS))


# The real callables of the allowlist, called only with the argument shapes picklers write.
def _ordered_dict(*args):
    if not args:
        return OrderedDict()
    if len(args) == 1 and type(args[0]) in (list, dict, OrderedDict):
        return OrderedDict(args[0])
    return _refuse("collections.OrderedDict", args)


def _counter(*args):
    if not args or (len(args) == 1 and type(args[0]) in (dict, Counter)):
        return Counter(*args)
    return _refuse("collections.Counter", args)


def _set(*args):
    if not args or (len(args) == 1 and type(args[0]) in (list, tuple, set, frozenset)):
        return set(*args)
    return _refuse("builtins.set", args)


def _bytearray(*args):
    if not args or (len(args) == 1 and type(args[0]) in (bytes, bytearray)) or (len(args) == 2 and _text(args)):
        return bytearray(*args)
    return _refuse("builtins.bytearray", args)


def _complex(*args):
    if len(args) <= 2 and all(type(a) in (int, float, complex, str) for a in args):
        return complex(*args)
    return _refuse("builtins.complex", args)


def _encode(*args):
    if 1 <= len(args) <= 2 and _text(args):
        return str.encode(*args)
    return _refuse("_codecs.encode", args)


def _jit_list(name: str, kinds: tuple[type, ...] | None):
    """TorchScript's legacy list builders (``torch.jit._pickle.build_intlist`` ...): data, the list itself."""

    def build(*args):
        if len(args) != 1 or type(args[0]) is not list:
            return _refuse(name, args)
        if kinds is not None and not all(type(v) in kinds for v in args[0]):
            return _refuse(name, args)
        return args[0]

    return build


def _jit_restore_type_tag(*args):
    if len(args) != 2 or type(args[1]) is not str:
        return _refuse("torch.jit._pickle.restore_type_tag", args)
    return args[0]


_JIT_CALLS = {
    "torch.jit._pickle.build_intlist": _jit_list("torch.jit._pickle.build_intlist", (int, bool)),
    "torch.jit._pickle.build_doublelist": _jit_list("torch.jit._pickle.build_doublelist", (float, int)),
    "torch.jit._pickle.build_boollist": _jit_list("torch.jit._pickle.build_boollist", (bool, int)),
    "torch.jit._pickle.build_tensorlist": _jit_list("torch.jit._pickle.build_tensorlist", None),
    "torch.jit._pickle.restore_type_tag": _jit_restore_type_tag,
}

_PLAIN_CALLS = {"collections.OrderedDict": _ordered_dict, "collections.Counter": _counter, "builtins.set": _set,
                "builtins.bytearray": _bytearray, "builtins.complex": _complex, "_codecs.encode": _encode}

_INTERCEPTED = {
    "torch._utils._rebuild_tensor_v2": _rebuild_v2_record,
    "torch._utils._rebuild_tensor_v3": _rebuild_v3,
    "torch._utils._rebuild_tensor": _rebuild_v1,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
    "torch.nn.parameter.Parameter": _parameter,
    "torch.Size": _size,
    "torch.device": _device,
}
_OPAQUE_BUILDERS = (
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor",
)


def _opaque_builder(full: str):
    """A record of a tensor kind ckptviz lists but does not read, with the arguments torch's builder takes
    (checked against its signature, never called: torch.load refuses other argument counts too)."""
    import inspect

    real = getattr(torch._utils, full.rpartition(".")[2], None)
    try:
        signature = inspect.signature(real) if real is not None else None
    except (TypeError, ValueError):
        signature = None

    def build(*args):
        if signature is not None:
            try:
                signature.bind(*args)
            except TypeError as e:
                raise pickle.UnpicklingError(f"{full} record with {len(args)} arguments: {e}") from None
        return OpaqueTensor(full, args)

    return build


def _layouts() -> dict[str, Any]:
    return {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def _get_layout(*args):
    if len(args) != 1 or type(args[0]) is not str:
        raise pickle.UnpicklingError(f"invalid layout arguments: {_short(args)}")
    return _LAYOUTS[args[0]]


_LAYOUTS = _layouts()
_INERT_TYPES = (torch.dtype, torch.qscheme, torch.layout)


@lru_cache(maxsize=1)
def _handout_table() -> dict[str, tuple[str, Any]]:
    """What each name of torch's allowlist resolves to: ("value", an immutable torch singleton),
    ("call", a function to wrap) or ("marker", None) for classes ckptviz never instantiates."""
    from torch._weights_only_unpickler import _get_allowed_globals

    table: dict[str, tuple[str, Any]] = {}
    for name, obj in _get_allowed_globals().items():
        if name in _INTERCEPTED:
            table[name] = ("call", _INTERCEPTED[name])
        elif name in _OPAQUE_BUILDERS or name.startswith("torch._utils._rebuild_"):  # other tensor kinds
            table[name] = ("call", _opaque_builder(name))
        elif name in _PLAIN_CALLS:
            table[name] = ("call", _PLAIN_CALLS[name])
        elif name == "torch.serialization._get_layout":
            table[name] = ("call", _get_layout)
        elif isinstance(obj, _INERT_TYPES):
            table[name] = ("value", obj)
        elif isinstance(obj, torch.serialization.StorageType):  # legacy storage classes: their dtype
            table[name] = ("value", obj.dtype)
        elif obj is torch.storage.UntypedStorage:
            table[name] = ("value", torch.uint8)
        else:  # torch.Tensor, tensor type classes, TypedStorage: named in pickles, never called
            table[name] = ("marker", None)
    for name, fn in (*_INTERCEPTED.items(), *_JIT_CALLS.items()):  # ckptviz's own builders, allowlisted or not
        table.setdefault(name, ("call", fn))
    return table


def _user_safe_names() -> set[str]:
    names = set()
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        names.add(name or f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return names


# ---------------------------------------------------------------------------------------------
# the unpickler
# ---------------------------------------------------------------------------------------------


def _storage_ref(key: str, dtype: torch.dtype, location: str, numel: int, byte_offset: int, source: Any) -> StorageRef:
    """``StorageRef(...)`` without the frozen dataclass's six ``object.__setattr__`` calls (same fields)."""
    ref = _new_object(StorageRef)
    state = ref.__dict__
    state["key"], state["dtype"], state["location"] = key, dtype, location
    state["numel"], state["byte_offset"], state["source"] = numel, byte_offset, source
    return ref


def _not_a_dict(self, key, value):
    raise pickle.UnpicklingError(f"the pickle sets an item on a {self._ckptviz_global} object, which is not a dict; "
                                 "torch.jit.load refuses it")


class Unpickled:
    """What one unpickling found besides the object: ``unsafe`` (global names beyond the
    allowlist), ``storages`` (key -> StorageRef) and ``end`` (bytes the pickle took)."""

    def __init__(self, trusted_prefixes: tuple[str, ...] = (), source: Any = None,
                 storage_ids: tuple[int, ...] = (5, 6), jit: bool = False):
        self.source = source  # the MappedFile that storages' bytes come from
        self.jit = jit  # a TorchScript archive's pickle: tensor records as TorchScript reads them
        self.storage_ids = storage_ids  # lengths a storage's persistent id may have (zip: 5, legacy: 6)
        self.unsafe: set[str] = set()
        self.storages: dict[str, StorageRef] = {}
        self.views: list[StorageRef] = []  # legacy storage views, checked against their roots by the reader
        self.end = 0
        self._trusted_prefixes = trusted_prefixes
        self._table = _handout_table()
        self._user_safe = _user_safe_names()
        self._handed: dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        obj = self._handed.get(full)
        if obj is None:
            obj = self._handed[full] = self._resolve(module, name, full)
        return obj

    def _resolve(self, module: str, name: str, full: str) -> Any:
        if full not in self._table:  # Python 2 names, mapped as torch's weights_only unpickler maps them
            module, name = _compat_pickle.NAME_MAPPING.get(
                (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
            full = f"{module}.{name}"
            if full in self._handed:
                return self._handed[full]
        if len(self._handed) >= MAX_GLOBALS:
            raise LimitExceeded("the pickle refers to too many distinct globals",
                                "ckptviz.readers.pickle_reader.MAX_GLOBALS", MAX_GLOBALS)
        kind, what = self._table.get(full, ("stub", None))
        if kind == "value":
            obj = what
        elif kind == "call":
            obj = _callable(full, _JIT_BUILDERS.get(full, what) if self.jit else what)
        elif kind == "marker":
            obj = _marker(full)
        else:
            if not full.startswith(self._trusted_prefixes) and full not in self._user_safe:
                self.unsafe.add(full)
            attrs = {"_ckptviz_global": full}
            if self._trusted_prefixes and full.startswith(self._trusted_prefixes):  # a TorchScript class:
                attrs["__setitem__"] = _not_a_dict  # its objects take BUILD, never SETITEM (torch.jit.load asserts)
            obj = type(full.rsplit(".", 1)[-1], (Stub,), attrs)
        self._handed[full] = obj
        return obj

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', dtype, key, location, numel): every zip storage; legacy ones add a view (None: whole)
        if type(pid) is tuple and len(pid) in self.storage_ids and (len(pid) == 5 or pid[5] is None):
            tag, dtype, key, location, numel = pid[:5]
            root = self.storages.get(key)
            if root is not None and root.dtype is dtype and tag == "storage":
                return root
            if (tag == "storage" and type(dtype) is torch.dtype and type(key) is str and type(location) is str
                    and type(numel) is int and numel >= 0 and root is None):
                root = self.storages[key] = _storage_ref(key, dtype, location, numel, 0, self.source)
                return root
        return self._persistent_load(pid)

    def _persistent_load(self, pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 4 and pid[0] == "module":
            return pid[1]  # legacy whole-module saves: ('module', cls, source_file, source); cls is a Stub
        if not (type(pid) is tuple and len(pid) in self.storage_ids and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {_short(pid)} (this format's storage records "
                                         f"have {' or '.join(map(str, self.storage_ids))} fields)")
        storage_type, key, location, numel = pid[1:5]
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"invalid storage record {_short(pid)}")
        if type(storage_type) is not torch.dtype:
            raise pickle.UnpicklingError(f"unknown storage type {_short(storage_type)}")
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = StorageRef(key, storage_type, location, numel, 0, self.source)
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3:  # legacy: (view_key, offset, view_size)
            raise pickle.UnpicklingError(f"invalid storage view {_short(view)}")
        view_offset, view_size = _ints("storage view", view[1:], minimum=0)
        dtype = root.dtype
        view_ref = StorageRef(key, dtype, location, view_size, view_offset * element_size(dtype), self.source)
        self.views.append(view_ref)
        return view_ref


class _Input:
    """The bytes of one pickle as a file for the C unpickler: ``peek`` hands over everything at once,
    so the unpickler reads from one buffer and calls back only to say how much it consumed."""

    __slots__ = ("data", "view", "pos")

    def __init__(self, data: bytes):
        self.data, self.view, self.pos = data, memoryview(data), 0

    def peek(self, n: int = 0) -> memoryview:
        return self.view[self.pos :]

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else min(len(self.data), self.pos + n)
        out, self.pos = self.data[self.pos : end], end
        return out

    def readinto(self, buf) -> int:
        chunk = self.read(len(buf))
        buf[: len(chunk)] = chunk
        return len(chunk)

    def readline(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        return self.read(-1 if end < 0 else end + 1 - self.pos)


class _CUnpickler(pickle.Unpickler):
    """The C unpickler calling ckptviz's find_class and persistent_load (state kept in :class:`Unpickled`)."""

    def __init__(self, file: _Input, found: Unpickled):
        self.find_class = found.find_class  # looked up on each GLOBAL: the instance attribute wins
        self.persistent_load = found.persistent_load  # bound once, by the base __init__
        super().__init__(file, fix_imports=False)


_LEAVES = frozenset({str, int, float, bool, bytes, complex, type(None), TensorRef, StorageRef, torch.dtype,
                     torch.layout, torch.qscheme, bytearray})


_SEQUENCES = frozenset({list, tuple, set, frozenset})


def _too_deep(limit: int) -> LimitExceeded:
    return LimitExceeded(f"the pickle nests containers more than {limit} deep",
                         "ckptviz.readers.pickle_reader.MAX_NESTING", limit,
                         f"at most NESTING_CEILING = {NESTING_CEILING}")


def check_nesting(root: Any, limit: int | None = None) -> None:
    """Refuse trees whose containers nest deeper than ``limit`` (default :data:`MAX_NESTING`, read at
    call time; shared nodes counted once). Recursive, at most ``limit`` Python frames deep (no C stack
    per frame since Python 3.11); the recursion limit is raised by that much while it runs."""
    if limit is None:
        limit = min(MAX_NESTING, NESTING_CEILING)
    if type(root) in _LEAVES:
        return
    done: dict[int, int] = {}  # id -> height of a finished node; 0 while the node is on the current path
    leaves, sequences, skip = _LEAVES, _SEQUENCES, (type, _Handed)

    def walk(obj: Any, depth: int) -> int:
        oid = id(obj)
        done[oid] = 0
        height = 1
        kind = type(obj)
        if kind in sequences:
            kids = obj
        elif isinstance(obj, Stub):
            kids = (obj.args, obj.state, obj.items_list, *obj.keys(), *obj.values()) if obj else (
                obj.args, obj.state, obj.items_list)
        elif isinstance(obj, dict):  # dict, OrderedDict, Counter
            kids = (*obj.keys(), *obj.values())
        elif kind is OpaqueTensor:
            kids = obj.args
        else:
            kids = ()
        for child in kids:
            kind = type(child)
            if kind in leaves:
                continue
            if kind in sequences and leaves.issuperset(map(type, child)):  # a torch.Size, a list of names
                if height < 2:
                    height = 2
                continue
            if isinstance(child, skip):
                continue
            h = done.get(id(child))
            if h is None:
                if depth >= limit:
                    raise _too_deep(limit)
                h = walk(child, depth + 1)
            elif h == 0:
                continue  # a cycle (a list holding itself): no deeper than its first visit
            elif depth + h > limit:
                raise _too_deep(limit)
            if h >= height:
                height = h + 1
        done[oid] = height
        return height

    with _NESTING_LOCK:  # the recursion limit is process-wide: one walk raises and restores it at a time
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(old + limit + 50)
        try:
            walk(root, 1)
        finally:
            sys.setrecursionlimit(old)


_NESTING_LOCK = threading.Lock()


_INLINE_NESTING = 2_000  # below this, hashing the deepest possible tuple fits any thread's stack
_STACK_PER_LEVEL = 256  # bytes of C stack per level of tuple hashing (measured ~60 on x86-64)
_STACK_MARGIN = 16 << 20
_STACK_LOCK = threading.Lock()


def _on_stack(fn, nesting: int):
    """``fn()``, on a thread whose stack fits hashing a tuple nested ``nesting`` deep."""
    if nesting <= _INLINE_NESTING:
        return fn()
    out: dict[str, Any] = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            out["error"] = e

    with _STACK_LOCK:
        try:
            old = threading.stack_size(nesting * _STACK_PER_LEVEL + _STACK_MARGIN)
            try:
                worker = threading.Thread(target=run, name="ckptviz-unpickle", daemon=True)
                worker.start()
            finally:
                threading.stack_size(old)
        except (RuntimeError, ValueError, MemoryError) as e:  # the platform's limits on thread stacks
            raise MemoryError(f"cannot reserve a stack for a pickle nested up to {nesting} deep ({e})") from None
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def load_checked(data: bytes, found: Unpickled) -> Any:
    """Unpickle ``data`` (a whole pickle, already :func:`scan`-ned) with the C unpickler, the garbage
    collector paused (see :func:`paused_gc`)."""
    file = _Input(data)

    def load():
        obj = _CUnpickler(file, found).load()
        if file.pos != len(data):
            raise pickle.UnpicklingError(f"the unpickler stopped at byte {file.pos}, the scan at {len(data)}")
        check_nesting(obj)
        return obj

    with paused_gc():
        return _on_stack(load, nesting_bound(data))


# The opcodes TorchScript's unpickler (torch/csrc/jit/serialization/unpickler.cpp) reads; torch.jit.load
# refuses any other, a LONG1 of other than 8 bytes, and a pickle that does not start with PROTO.
_JIT_OPCODES = frozenset({"PROTO", "EMPTY_LIST", "EMPTY_TUPLE", "BINPUT", "LONG_BINPUT", "MARK", "NEWTRUE",
                          "NEWFALSE", "NONE", "BININT1", "BININT2", "BININT", "LONG1", "BINUNICODE", "BINFLOAT",
                          "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_DICT", "APPENDS", "LIST", "DICT",
                          "SETITEMS", "BINGET", "LONG_BINGET", "STOP", "GLOBAL", "NEWOBJ", "BUILD", "REDUCE",
                          "BINPERSID", "SETITEM"})


_KINDS = {  # opcode -> the IValue kind it makes (None: not known from the opcode alone)
    "NONE": "None", "EMPTY_TUPLE": "Tuple", "TUPLE": "Tuple", "TUPLE1": "Tuple", "TUPLE2": "Tuple", "TUPLE3": "Tuple",
    "EMPTY_LIST": "GenericList", "LIST": "GenericList", "EMPTY_DICT": "GenericDict", "DICT": "GenericDict",
    "GLOBAL": "Global", "BININT": "Int", "BININT1": "Int", "BININT2": "Int", "LONG1": "Int", "BINFLOAT": "Double",
    "BINUNICODE": "String", "NEWTRUE": "Bool", "NEWFALSE": "Bool"}
_UNHASHABLE = frozenset({"None", "Tuple", "GenericList", "GenericDict", "Global"})  # as TorchScript dict keys
_JIT_TARGETS = {"SETITEM": "GenericDict", "SETITEMS": "GenericDict", "APPEND": "GenericList", "APPENDS": "GenericList"}


def check_jit_opcodes(data: bytes, result: str | None = None) -> None:
    """Refuse a TorchScript pickle that torch.jit.load's unpickler refuses: opcodes outside its set,
    LONG1 not 8 bytes long, strings that are not UTF-8, no PROTO first, dict keys it cannot hash
    (tuples, lists, dicts: followed through the memo), a result other than ``result`` (e.g. "Tuple" for
    constants.pkl) where that is known from the opcodes. Raises UnpicklingError."""
    import pickletools

    first, stack, marks, memo = True, [], [], {}  # stack: what each item is, when it is a container
    mark, rest = pickletools.markobject, pickletools.stackslice
    for op, arg, pos in pickletools.genops(data):
        name = op.name
        if first != (name == "PROTO"):
            raise pickle.UnpicklingError(f"a TorchScript pickle has PROTO first and only there (found {name} at "
                                         f"byte {pos}); torch.jit.load refuses it")
        first = False
        if name not in _JIT_OPCODES:
            raise pickle.UnpicklingError(f"opcode {name} at byte {pos} is not one TorchScript's unpickler reads")
        before = op.stack_before
        if mark in before:  # pops down to the last MARK, then what lies below it
            if not marks:
                raise pickle.UnpicklingError(f"{name} at byte {pos} without a MARK")
            above = stack[marks[-1]:]
            del stack[marks.pop():]
            if name == "SETITEMS":
                _check_jit_keys(above[0::2], pos)
            before = [b for b in before if b is not mark and b is not rest]
        if len(stack) < len(before):
            raise pickle.UnpicklingError(f"{name} at byte {pos} pops more than the stack holds")
        top = stack[-1] if stack else None
        if name == "SETITEM":
            _check_jit_keys(stack[-2:-1], pos)
        if name in _JIT_TARGETS:  # what SETITEM(S) / APPEND(S) change must be a dict / list
            target = stack[-3 if name == "SETITEM" else -2 if name == "APPEND" else -1]
            if target is not None and target != _JIT_TARGETS[name]:
                raise pickle.UnpicklingError(f"{name} at byte {pos} changes a value of type {target}, not a "
                                             f"{_JIT_TARGETS[name]}; torch.jit.load refuses the file")
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else None
        if before:
            del stack[-len(before):]
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        else:
            stack.extend([_KINDS.get(name)] * len(op.stack_after))
        if name == "LONG1" and data[pos + 1] != 8:
            raise pickle.UnpicklingError(f"LONG1 at byte {pos} is {data[pos + 1]} bytes long; TorchScript "
                                         "reads only 8-byte LONG1")
        if name == "BINUNICODE":
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                raise pickle.UnpicklingError(f"the string at byte {pos} is not valid UTF-8") from None
        if name == "STOP":
            if result is not None and top not in (None, result):  # a known other kind
                raise pickle.UnpicklingError(f"the TorchScript pickle holds a value of type {top} where TorchScript "
                                             f"reads a {result}; torch.jit.load refuses the file")
            if stack or marks:  # TorchScript's unpickler wants exactly the result on the stack
                raise pickle.UnpicklingError("the TorchScript pickle leaves more than its result on the stack")
            break


def _check_jit_keys(kinds: list, pos: int) -> None:
    bad = next((k for k in kinds if k in _UNHASHABLE), None)
    if bad is not None:
        raise pickle.UnpicklingError(f"a dict key set at byte {pos} is of type {bad}, which TorchScript cannot hash; "
                                     "torch.jit.load refuses the file")


def unpickle(data: bytes | bytearray | memoryview | BinaryIO, *, trusted_prefixes: tuple[str, ...] = (),
             source: Any = None, jit: bool = False, storage_ids: tuple[int, ...] = (5, 6)) -> tuple[Any, Unpickled]:
    """Unpickle one object from ``data`` (bytes-like, or a binary file read from its position, which
    is left just past the pickle); return it with what was found (``unsafe``, ``storages``, ``end``).
    Storages it finds read their bytes from ``source`` (a MappedFile). ``jit``: a TorchScript archive's
    pickle, also held to what TorchScript's unpickler reads (:func:`check_jit_opcodes`)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data) if type(data) is not bytes else data
        if jit:
            check_jit_opcodes(data)
        return unpickle_from(data, 0, trusted_prefixes=trusted_prefixes, source=source, first_window=len(data),
                             storage_ids=storage_ids, jit=jit)
    start = data.tell()
    buf = data.read()
    obj, found = unpickle_from(buf, 0, trusted_prefixes=trusted_prefixes, source=source, first_window=len(buf),
                               storage_ids=storage_ids)
    data.seek(start + found.end)
    return obj, found


def unpickle_from(buf, start: int, *, trusted_prefixes: tuple[str, ...] = (), source: Any = None,
                  first_window: int = 1 << 20, storage_ids: tuple[int, ...] = (5, 6),
                  jit: bool = False) -> tuple[Any, Unpickled]:
    """Unpickle the pickle at ``buf[start:]`` (bytes, or a map of a file whose pickles are followed
    by other data), scanning a growing window so that memo indices stay bounded by the pickle's own
    size; ``found.end`` is the pickle's length."""
    stop, resume = min(len(buf), start + first_window), None
    while True:
        try:
            end = scan(buf, start, stop, resume=resume)
            break
        except TruncatedPickle as cut:  # go on from the cut-off opcode with a window 16 times larger
            if stop >= len(buf):
                raise
            stop, resume = min(len(buf), start + (stop - start) * 16), cut.at
    data = buf if start == 0 and end == len(buf) and type(buf) is bytes else bytes(buf[start:end])
    found = Unpickled(trusted_prefixes, source, storage_ids, jit)
    found.end = end - start
    return load_checked(data, found), found


__all__ = ["MAX_NESTING", "PICKLE_ERRORS", "OpaqueTensor", "StorageRef", "Stub", "TensorRef", "TruncatedPickle",
           "Unpickled", "check_nesting", "scan", "unpickle", "unpickle_from"]
