"""Reader for safetensors files: parses the JSON header only, into columns (no object per tensor);
every entry is validated against the file at once, and a tensor's record is built when it is read."""

from __future__ import annotations

import json
import math
import os
import re
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
_KNOWN = {*_DTYPES, "F4", "F6_E2M3", "F6_E3M2", "F8_E4M3", "F8_E5M2", "F8_E8M0", "U16", "U32", "U64", "C64"}
MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit
MAX_JSON_DEPTH = 128  # nesting of the JSON header; serde_json's own limit (a valid header nests 3 deep)
_OFFSETS = b'"data_offsets"'


def read_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, the parsed header) of a safetensors file. The header must be
    UTF-8 JSON, an object, nested at most ``MAX_JSON_DEPTH`` deep, without duplicate keys, and fit
    inside the file, as the safetensors library requires."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CorruptCheckpointError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise CorruptCheckpointError(f"{path}: the safetensors header claims {length} bytes (more than the "
                                         f"library's limit of {MAX_HEADER}); the file is corrupted")
        raw = f.read(length)
    if len(raw) != length:
        raise CorruptCheckpointError(f"{path}: the safetensors header claims {length} bytes but the file ends "
                                     f"after {8 + len(raw)} (file truncated)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path}: the safetensors header is not valid UTF-8 ({e})") from None
    depth = _max_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise CorruptCheckpointError(f"{path}: the safetensors header nests {depth} levels deep (a header nests 3; "
                                     f"the limit is {MAX_JSON_DEPTH}); the file is corrupted or hostile")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header is not a JSON object")
    # Cheap count first; the exact check runs only when in doubt. (A duplicate whose earlier entry has
    # no data_offsets escapes the count; the library then keeps the later entry, and so does this.)
    if raw.count(_OFFSETS) != len(header) - ("__metadata__" in header):
        dup = _duplicate_key(text)
        if dup is not None:
            raise CorruptCheckpointError(f"{path}: the safetensors header names {dup!r} twice; which entry is meant "
                                         "is ambiguous. Re-save the file.")
    return 8 + length, header


def _max_depth(raw: bytes) -> int:
    """Deepest nesting of JSON arrays and objects in ``raw`` (brackets inside strings not counted)."""
    if b"\\" in raw:  # escapes: drop every string first (quotes inside strings are escaped)
        raw = re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', raw, flags=re.S)
    marks = np.frombuffer(raw.translate(None, _NOT_MARKS), np.uint8)  # quotes and brackets only, at C speed
    inside = np.bitwise_xor.accumulate(_QUOTE[marks])  # 1 from an opening quote up to its closing one
    return int(np.cumsum(_STEP[marks] * (inside == 0), dtype=np.int32).max(initial=0))


_NOT_MARKS = bytes(c for c in range(256) if c not in b'"{[}]')
_STEP = np.zeros(256, np.int8)
_STEP[list(b"{[")], _STEP[list(b"}]")] = 1, -1
_QUOTE = (np.arange(256) == ord('"')).astype(np.uint8)


def _duplicate_key(text: str) -> str | None:
    """The first top-level key that appears twice in the JSON object ``text``, or None."""
    found: list[str | None] = [None]

    def pairs(items: list) -> dict:
        keys = [k for k, _ in items]
        if found[0] is None and len(set(keys)) != len(keys):
            seen: set[str] = set()
            found[0] = next(k for k in keys if k in seen or seen.add(k))
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return found[0]


def read_table(path: str, file_label: str | None = None) -> tuple[TensorTable, dict, MappedFile]:
    """(the file's tensors as a table, its ``__metadata__``, its MappedFile), reading the header only.

    As strict as the safetensors library: known dtypes, non-negative integer shapes and offsets, each
    byte range exactly ``numel * itemsize`` long, the ranges tiling the data section from its first
    byte to the end of the file with no hole or overlap, and ``__metadata__`` a map of str to str."""
    start, header = read_header(path)
    meta = _metadata(path, header.pop("__metadata__", None))
    names = list(header)
    infos = list(header.values())
    try:  # whole columns at C speed; the slow per-entry diagnosis runs only when something is wrong
        dtypes = list(map(_DTYPES.__getitem__, map(itemgetter("dtype"), infos)))
        raw_shapes = list(map(itemgetter("shape"), infos))
        offsets = list(map(itemgetter("data_offsets"), infos))
        if (set(map(type, raw_shapes)) | set(map(type, offsets))) - {list}:  # JSON arrays only ({} or "" are not)
            raise TypeError("not arrays")
        shapes = list(map(tuple, raw_shapes))
        if not set(map(type, chain.from_iterable(shapes))) | set(map(type, chain.from_iterable(offsets))) <= {int}:
            raise TypeError("not integers")
        if set(map(len, offsets)) - {2}:
            raise ValueError("not two offsets")
        spans = np.array(offsets, dtype=np.int64).reshape(len(infos), 2)
        numel = np.array(list(map(math.prod, shapes)), dtype=np.int64)
        if any(map(_wraps, filter(_has_zero, shapes))):  # e.g. [2**62, 2**62, 0]: numel 0, yet overflows
            raise OverflowError("shape product")
        if shapes and min(map(min, filter(None, shapes)), default=0) < 0:
            raise ValueError("negative size")
    except (KeyError, TypeError, ValueError, OverflowError):
        raise CorruptCheckpointError(f"{path}: {_first_bad(header)}") from None
    sizes = {d: element_size(d) for d in set(dtypes)}
    itemsize = np.array(list(map(sizes.__getitem__, dtypes)), dtype=np.int64)
    begin, end = spans[:, 0], spans[:, 1]
    size = os.path.getsize(path)
    length = end - begin
    # numel <= length first, so that numel * itemsize cannot wrap around in int64
    bad = (begin < 0) | (end < begin) | (numel > length) | (numel * itemsize != length)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = ("a negative offset" if begin[i] < 0 or end[i] < 0 else "an end before its start" if end[i] < begin[i]
                else f"{int(length[i])} bytes where shape {list(shapes[i])} of {infos[i]['dtype']} needs "
                     f"{math.prod(shapes[i]) * int(itemsize[i])}")
        raise CorruptCheckpointError(
            f"{path}: tensor {names[i]!r} (shape {list(shapes[i])}, {infos[i]['dtype']}) has byte range "
            f"{infos[i]['data_offsets']}: {what}; the file is corrupted (a dtype relabelled, or a damaged header). "
            "Re-download or re-save it."
        )
    _check_tiling(path, names, begin, end, size - start)
    source = MappedFile(path, dict(zip(names, (start + begin).tolist())))
    numel_list = numel.tolist()

    def make(i: int) -> TensorRef:
        dtype, shape = dtypes[i], shapes[i]
        ref = StorageRef(names[i], dtype, "cpu", numel_list[i], source=source)
        return TensorRef(ref, 0, shape, contiguous_stride(shape), dtype)

    return TensorTable(names, shapes, dtypes, "cpu", file_label, make, numel=numel), meta, source


def _metadata(path: str, meta: object) -> dict[str, str]:
    """``__metadata__``: absent, null, or an object of strings, as the safetensors library requires."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors '__metadata__' is a {type(meta).__name__}, not an "
                                     "object of strings; the header is corrupted")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise CorruptCheckpointError(f"{path}: the safetensors '__metadata__' entry {k!r} is a "
                                         f"{type(v).__name__}, not a string; the header is corrupted")
    return meta


def _check_tiling(path: str, names: list[str], begin: np.ndarray, end: np.ndarray, data: int) -> None:
    """The byte ranges, sorted, must cover ``[0, data)`` exactly: no hole, no overlap, nothing after."""
    order = np.lexsort((end, begin))
    b, e = begin[order], end[order]
    reach = int(e[-1]) if len(e) else 0
    gap = np.flatnonzero(b != np.concatenate([[0], e[:-1]]))
    if len(gap):
        j = int(gap[0])
        name = names[int(order[j])]
        prev = (f"the previous tensor ({names[int(order[j - 1])]!r}) ends at {int(e[j - 1])}" if j
                else "data begins at 0")
        kind = "overlaps another tensor" if j and b[j] < e[j - 1] else "leaves a hole before it"
        raise CorruptCheckpointError(
            f"{path}: tensor {name!r} starts at byte {int(b[j])} of the data section but {prev}: it {kind}. The "
            "safetensors format requires the tensors to tile the data section exactly; the file is corrupted."
        )
    if reach != data:
        what = (f"the file ends {reach - data} bytes before the tensors do (file truncated)" if reach > data
                else f"{data - reach} bytes after the last tensor belong to none (the file is padded or corrupted)")
        raise CorruptCheckpointError(f"{path}: the tensors cover {reach} bytes of the {data}-byte data section: "
                                     f"{what}. Re-download or re-save it.")


def _first_bad(header: dict) -> str:
    for name, info in header.items():
        try:
            ok = (info["dtype"] in _DTYPES and type(info["shape"]) is list and type(info["data_offsets"]) is list
                  and all(type(s) is int and 0 <= s < 2**63 for s in info["shape"])
                  and len(info["data_offsets"]) == 2
                  and all(type(x) is int and 0 <= x < 2**63 for x in info["data_offsets"])
                  and math.prod(info["shape"]) < 2**63 and not _wraps(info["shape"]))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            if isinstance(info, dict) and isinstance(dtype, str) and dtype not in _DTYPES:
                if dtype in _KNOWN:
                    return f"tensor {name!r} has dtype {dtype!r}, which this torch version cannot represent"
                return f"tensor {name!r} has dtype {dtype!r}, which is not a safetensors dtype; the header is corrupted"
            try:
                huge = any(type(x) is int and x >= 2**63 for x in chain(info["shape"], info["data_offsets"]))
                ints = all(type(s) is int and s >= 0 for s in info["shape"])  # no str * int repetition
                huge = huge or (ints and (math.prod(info["shape"]) >= 2**63 or _wraps(info["shape"])))
            except (KeyError, TypeError):
                huge = False
            if huge:
                return (f"header entry {name!r} declares a shape or byte offset beyond 2**63 "
                        f"({_short(info)}); the file is corrupted")
            return f"header entry {name!r} is malformed (needs dtype, a shape of non-negative integers and two " \
                   f"non-negative integer data_offsets): {_short(info)}"
    return "the header is malformed"


def _has_zero(shape: tuple) -> bool:
    return 0 in shape


def _wraps(shape) -> bool:
    """Whether a running product of ``shape`` leaves 64 bits, which the safetensors library rejects
    ("overflow computing buffer size") even when a later 0 makes the product 0."""
    p = 1
    for s in shape:
        p *= s
        if p >= 2**64:
            return True
    return False


def _short(info: object) -> str:
    try:
        text = repr(info)
    except (RecursionError, ValueError):
        text = "<unprintable>"
    return text if len(text) <= 200 else text[:197] + "..."


def read_safetensors(path: str) -> RawCheckpoint:
    table, meta, source = read_table(path, os.path.basename(path))
    return RawCheckpoint(format="safetensors", root=table, unsafe=set(), source=source, extra_metadata=dict(meta),
                         files=[path], sections={"": table} if len(table) else {})
