"""Reader for safetensors files: parses the JSON header only; tensors map straight onto the file."""

from __future__ import annotations

import json
import struct

import torch

from ..errors import CorruptCheckpointError
from .mapped import MappedFile
from .pickle_reader import StorageRef, TensorRef
from .raw import RawCheckpoint

_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
        "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64", "C128": "complex128",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, attr)
}


def read_header(path: str) -> tuple[int, dict]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CorruptCheckpointError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        raw = f.read(length)
    if len(raw) != length:
        raise CorruptCheckpointError(f"{path}: the safetensors header is cut off (file truncated)")
    try:
        return 8 + length, json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None


def read_safetensors(path: str) -> RawCheckpoint:
    start, header = read_header(path)
    meta = header.pop("__metadata__", None) or {}
    tree, storages, offsets = {}, {}, {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: header entry {name!r} is malformed: {info!r}") from None
        ref = StorageRef(name, dtype, "cpu", (end - begin) // max(dtype.itemsize, 1))
        storages[name], offsets[name] = ref, start + begin
        stride, acc = [], 1
        for s in reversed(shape):
            stride.insert(0, acc)
            acc *= s
        tree[name] = TensorRef(ref, 0, shape, tuple(stride), dtype)
    return RawCheckpoint(
        format="safetensors", root=tree, unsafe=set(), source=MappedFile(path, offsets),
        storages=storages, extra_metadata=dict(meta),
    )
