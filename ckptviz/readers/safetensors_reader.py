"""Reader for safetensors files: parses the JSON header only, into columns (no object per tensor);
every entry is validated against the file at once, and a tensor's record is built when it is read."""

from __future__ import annotations

import json
import math
import os
import struct
from itertools import chain
from operator import itemgetter

import numpy as np
import torch

from ..errors import CorruptCheckpointError
from .mapped import MappedFile
from .raw import RawCheckpoint
from .records import StorageRef, TensorRef, TensorTable, contiguous_stride, element_size

_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
        "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64", "C128": "complex128",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    }.items()
    if hasattr(torch, attr)
}
MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit


def read_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, the parsed header) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CorruptCheckpointError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise CorruptCheckpointError(f"{path}: the safetensors header claims {length} bytes; the file is corrupted")
        raw = f.read(length)
    if len(raw) != length:
        raise CorruptCheckpointError(f"{path}: the safetensors header is cut off (file truncated)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header is not a JSON object")
    return 8 + length, header


def read_table(path: str, file_label: str | None = None) -> tuple[TensorTable, dict, MappedFile]:
    """(the file's tensors as a table, its ``__metadata__``, its MappedFile), reading the header only."""
    start, header = read_header(path)
    meta = header.pop("__metadata__", None)
    meta = meta if isinstance(meta, dict) else {}
    names = list(header)
    infos = list(header.values())
    try:  # whole columns at C speed; the slow per-entry diagnosis runs only when something is wrong
        dtypes = list(map(_DTYPES.__getitem__, map(itemgetter("dtype"), infos)))
        shapes = list(map(tuple, map(itemgetter("shape"), infos)))
        offsets = list(map(itemgetter("data_offsets"), infos))
        if not set(map(type, chain.from_iterable(shapes))) | set(map(type, chain.from_iterable(offsets))) <= {int}:
            raise TypeError("not integers")
        spans = np.array(offsets, dtype=np.int64).reshape(len(infos), 2)
        numel = np.array(list(map(math.prod, shapes)), dtype=np.int64)
        if shapes and min(map(min, filter(None, shapes)), default=0) < 0:
            raise ValueError("negative size")
    except (KeyError, TypeError, ValueError, OverflowError):
        raise CorruptCheckpointError(f"{path}: {_first_bad(header)}") from None
    sizes = {d: element_size(d) for d in set(dtypes)}
    itemsize = np.array(list(map(sizes.__getitem__, dtypes)), dtype=np.int64)
    begin, end = spans[:, 0], spans[:, 1]
    size = os.path.getsize(path)
    bad = (begin < 0) | (end < begin) | (end - begin != numel * itemsize) | (start + end > size)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CorruptCheckpointError(
            f"{path}: tensor {names[i]!r} (shape {list(shapes[i])}, {infos[i]['dtype']}) has byte range "
            f"{infos[i]['data_offsets']} that does not fit its size or the file ({size} bytes); "
            "the file is truncated or corrupted. Re-download or re-save it."
        )
    source = MappedFile(path, dict(zip(names, (start + begin).tolist())))
    numel_list = numel.tolist()

    def make(i: int) -> TensorRef:
        dtype, shape = dtypes[i], shapes[i]
        ref = StorageRef(names[i], dtype, "cpu", numel_list[i], source=source)
        return TensorRef(ref, 0, shape, contiguous_stride(shape), dtype)

    return TensorTable(names, shapes, dtypes, "cpu", file_label, make, numel=numel), meta, source


def _first_bad(header: dict) -> str:
    for name, info in header.items():
        try:
            ok = (info["dtype"] in _DTYPES and all(type(s) is int and s >= 0 for s in info["shape"])
                  and len(info["data_offsets"]) == 2 and all(type(x) is int for x in info["data_offsets"]))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            if isinstance(info, dict) and isinstance(dtype, str) and dtype not in _DTYPES:
                return f"tensor {name!r} has dtype {dtype!r}, which this torch version cannot represent"
            return f"header entry {name!r} is malformed: {str(info)[:200]}"
    return "the header is malformed"


def read_safetensors(path: str) -> RawCheckpoint:
    table, meta, source = read_table(path, os.path.basename(path))
    return RawCheckpoint(format="safetensors", root=table, unsafe=set(), source=source, extra_metadata=dict(meta),
                         files=[path], sections={"": table} if len(table) else {})
