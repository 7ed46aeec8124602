"""The no-execution pickle reader: unpickles a torch pickle into plain containers, lazy tensor
references and inert stand-ins for any other class, without importing or calling anything from the
file. It records every global the pickle names beyond torch's ``weights_only`` allowlist."""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import struct
from collections import OrderedDict
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError
from .records import OpaqueTensor, StorageRef, TensorRef, element_size


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
            merged = dict(state[0] or {})
            merged.update(state[1])
            return merged
        return dict(state) if isinstance(state, dict) else {}


# What a damaged or hostile pickle can raise while we read it.
# Allowlisted callables run on the file's arguments, so this includes what they raise (torch's
# RuntimeError, int overflow, unknown codecs).
PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError,
                 struct.error, RecursionError, MemoryError, OverflowError, RuntimeError, CheckpointError)


def _allowed_names() -> dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals

    names = dict(_get_allowed_globals())
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        qual = name or f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        names[qual] = obj
    return names


def _dtype_of(storage_type: Any) -> torch.dtype:
    if isinstance(storage_type, torch.dtype):
        return storage_type
    dtype = getattr(storage_type, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if storage_type is torch.UntypedStorage:
        return torch.uint8
    raise CheckpointError(f"unknown storage type {storage_type!r}")


def _ints(what: str, values: Any, minimum: int | None = None) -> tuple[int, ...]:
    """``values`` as a tuple of ints (bools excluded), each at least ``minimum``; else a pickle error."""
    ok = type(values) in (tuple, list)
    if ok:
        for v in values:
            if type(v) is not int or (minimum is not None and v < minimum):
                ok = False
                break
    if not ok:
        raise pickle.UnpicklingError(f"tensor record has an invalid {what}: {values!r}")
    return tuple(values)


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if isinstance(storage, Stub):  # e.g. pickle.dump's torch.storage._load_from_bytes: not unpacked
        return OpaqueTensor("torch._utils._rebuild_tensor_v2", (storage, offset, size, stride))
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError(
            f"tensor record without a torch storage (got {type(storage).__name__}); "
            "not a torch.save file, or a damaged one"
        )
    (offset,) = _ints("storage offset", (offset,), minimum=0)
    size, stride = _ints("size", size, minimum=0), _ints("stride", stride, minimum=0)
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor record has size {size} but stride {stride}")
    return TensorRef(storage, offset, size, stride, storage.dtype, bool(requires_grad))


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    ref = _rebuild_v2(storage, offset, size, stride, requires_grad)
    if isinstance(ref, TensorRef):
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"tensor record has an invalid dtype: {dtype!r}")
        ref.dtype = dtype
    return ref


def _rebuild_v1(storage, offset, size, stride):
    return _rebuild_v2(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if isinstance(data, TensorRef):
        data.is_param, data.requires_grad = True, bool(requires_grad)
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


def _rebuild_meta(dtype, size, stride, requires_grad):
    return TensorRef(None, 0, tuple(size), tuple(stride), dtype, bool(requires_grad))


def _parameter(data=None, requires_grad=True):
    return _rebuild_parameter(data, requires_grad, None)


def _size(*args):
    return tuple(args[0]) if len(args) == 1 else tuple(args)


def _device(*args):
    return ":".join(str(a) for a in args if a is not None)


_INTERCEPTED = {
    "torch._utils._rebuild_tensor_v2": _rebuild_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_v3,
    "torch._utils._rebuild_tensor": _rebuild_v1,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
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


class SafeUnpickler(pickle._Unpickler):
    """Unpickles without importing: allowlisted globals resolve, all others become :class:`Stub`."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, *, trusted_prefixes: tuple[str, ...] = (), source: Any = None):
        super().__init__(file)
        self.source = source  # the MappedFile that storages' bytes come from
        self.unsafe: set[str] = set()
        self.storages: dict[str, StorageRef] = {}
        self._allowed = _allowed_names()
        self._trusted_prefixes = trusted_prefixes
        self._stubs: dict[str, type] = {}
        self._callables: set[int] = set()

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 names, as pickle.Unpickler(fix_imports=True) maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in _INTERCEPTED:
            obj = _INTERCEPTED[full]
        elif full in _OPAQUE_BUILDERS:
            obj = _opaque_builder(full)
        elif full in self._allowed:
            obj = self._allowed[full]
        else:
            if not full.startswith(self._trusted_prefixes):
                self.unsafe.add(full)
            obj = self._stub(full)
        self._callables.add(id(obj))
        return obj

    def _stub(self, full: str) -> type:
        if full not in self._stubs:
            self._stubs[full] = type(full.rsplit(".", 1)[-1], (Stub,), {"_ckptviz_global": full})
        return self._stubs[full]

    def persistent_load(self, pid: Any) -> StorageRef:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            return pid[1]  # legacy whole-module saves: ('module', cls, source_file, source); cls is a Stub
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, location, numel = pid[1], str(pid[2]), str(pid[3]), int(pid[4])
        dtype = _dtype_of(storage_type)
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = StorageRef(key, dtype, location, numel, source=self.source)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy: (view_key, offset, view_size)
            _, view_offset, view_size = view
            return StorageRef(key, dtype, location, int(view_size), int(view_offset) * element_size(dtype),
                              source=self.source)
        return root

    # Only objects that find_class handed out may be called or instantiated.
    def _check_callable(self, func: Any) -> None:
        if id(func) not in self._callables:
            raise pickle.UnpicklingError(f"refusing to call {type(func).__name__} object from the pickle")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_callable(func)
        self.stack[-1] = func(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_callable(cls)
        self.append(cls.__new__(cls, *args) if isinstance(cls, type) else cls(*args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_callable(cls)
        self.append(cls.__new__(cls, *args, **kwargs) if isinstance(cls, type) else cls(*args))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Stub):
            inst.__setstate__(state)
        elif isinstance(inst, OrderedDict) and isinstance(state, dict):
            inst.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})
        elif isinstance(inst, TensorRef):
            pass  # tensor state (e.g. tensor subclass attributes) is not needed
        else:
            raise pickle.UnpicklingError(f"refusing to set state on a {type(inst).__name__}")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    def load_inst_or_obj(self):
        raise pickle.UnpicklingError("the pickle instantiates classes with protocol-0 INST/OBJ, "
                                     "which torch.save never writes")

    dispatch[pickle.INST[0]] = load_inst_or_obj
    dispatch[pickle.OBJ[0]] = load_inst_or_obj


def _opaque_builder(full: str):
    def build(*args):
        return OpaqueTensor(full, args)

    return build


def unpickle(data: bytes | BinaryIO, *, trusted_prefixes: tuple[str, ...] = (),
             source: Any = None) -> tuple[Any, SafeUnpickler]:
    """Unpickle one object from ``data``; return it with the unpickler (for ``unsafe``, ``storages``).
    Storages it finds read their bytes from ``source`` (a MappedFile)."""
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    up = SafeUnpickler(file, trusted_prefixes=trusted_prefixes, source=source)
    return up.load(), up
