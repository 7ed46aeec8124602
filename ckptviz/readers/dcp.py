"""Reader for torch.distributed.checkpoint (DCP) folders (``.metadata`` + ``*.distcp``, as written by
``torch.distributed.checkpoint.save``, FSDP2, torchtitan and Lightning). It owns: recognising such a
folder; reading ``.metadata`` with the no-execution unpickler, where DCP's own data classes become
inert records and any other global is reported unsafe; checking every item's byte range against the
``.distcp`` files at open; building the sections (columns, no object per tensor), optimizer states and
plain metadata that ``dcp_layout`` places; reading the small non-tensor items; and assembling a tensor
from its chunks only when it is read (a chunk covering the whole tensor comes back as a view of a
private map). It never writes into the folder."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import zipfile
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, UnknownFormatError
from ..sections import plain
from ._gc import paused_gc
from .dcp_layout import Layout, insert, listify, name_of, optimizer_state
from .limits import LimitExceeded, limit_error
from .mapped import MappedFile, copying, read_into, read_tensor
from .pickle_reader import PICKLE_ERRORS, Stub, unpickle
from .raw import RawCheckpoint
from .records import LazyRecord, StorageRef, TensorRef, TensorTable, contiguous_stride, element_size
from .safetensors_reader import _DTYPES, MAX_HEADER
from .torch_zip import read_torch_zip, read_zip_window

METADATA = ".metadata"
SUFFIX = ".distcp"
LIGHTNING_META = "meta.pt"  # Lightning's FSDP strategy torch.saves its non-tensor state beside the DCP files
BYTES_BUDGET = 4 * 2**20  # bytes of non-tensor items read at open, in all
MAX_METADATA_BYTES = 1 << 30  # .metadata size (100,000 tensors on one rank: ~24 MB; it is unpickled whole)
MAX_CHUNKS = 1 << 16  # chunks one tensor may declare (one per writing rank that held a piece of it)
MAX_OVERLAP_CHECK = 1024  # chunks of one tensor checked pairwise for overlaps; above, gaps read as zeros
_MD = "torch.distributed.checkpoint.metadata."
_METADATA, _TENSOR, _BYTES, _CHUNK, _INDEX = (
    _MD + n for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                      "MetadataIndex"))
_STORAGE_INFO = "torch.distributed.checkpoint.filesystem._StorageInfo"
_PATHS = frozenset(f"pathlib.{m}{c}" for m in ("", "_local.") for c in
                   ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"))
# The classes a DCP .metadata names; read as inert records (Stubs), never built.
DCP_GLOBALS = frozenset({_METADATA, _TENSOR, _BYTES, _CHUNK, _INDEX, _STORAGE_INFO, _MD + "TensorProperties",
                         _MD + "StorageMeta", _MD + "_MEM_FORMAT_ENCODING", *_PATHS})
_BAD_FIELDS = (TypeError, KeyError, AttributeError, IndexError, ValueError, OverflowError)


# ---- finding the folder ------------------------------------------------------------------------
def dcp_folder_of(path: str | os.PathLike) -> str | None:
    """The DCP folder that ``path`` names (the folder itself, its ``.metadata``, or one of its ``.distcp``
    files), or None. A folder of ``.distcp`` files without ``.metadata`` counts (reading it says why it
    cannot be read)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path if os.path.isfile(os.path.join(path, METADATA)) or _has_distcp(path) else None
    folder, name = os.path.split(path)
    folder = folder or "."
    if name.endswith(SUFFIX) or (name == METADATA and os.path.isfile(path)):
        return folder
    return None


def is_dcp_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (or is a file of) a distributed checkpoint folder."""
    return dcp_folder_of(path) is not None


def _has_distcp(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return any(e.name.endswith(SUFFIX) for e in entries)


# ---- reading .metadata -------------------------------------------------------------------------
def _kind(obj: Any) -> str | None:
    return getattr(type(obj), "_ckptviz_global", None) if isinstance(obj, Stub) else None


def _kinds(items: list) -> set[str | None]:
    """The class names of ``items``' records (None for anything not a record), over their types."""
    return {t._ckptviz_global if issubclass(t, Stub) else None for t in set(map(type, items))}


def load_metadata(path: str) -> tuple[dict, set[str]]:
    """(the fields of the ``Metadata`` record in ``path``, the globals it names beyond DCP's classes and
    torch's allowlist). Nothing the file names is imported or called."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(MAX_METADATA_BYTES + 1) if size <= MAX_METADATA_BYTES else b""
    if size > MAX_METADATA_BYTES or len(data) > MAX_METADATA_BYTES:
        raise limit_error(path, LimitExceeded(f"the metadata is {max(size, len(data)):_} bytes",
                                              "ckptviz.readers.dcp.MAX_METADATA_BYTES", MAX_METADATA_BYTES))
    try:
        with paused_gc():
            obj, up = unpickle(data)
    except LimitExceeded as e:
        raise limit_error(path, e) from None
    except PICKLE_ERRORS as e:
        raise CorruptCheckpointError(
            f"{path}: the distributed checkpoint's metadata is truncated or corrupted ({type(e).__name__}: {e}). "
            "DCP writes .metadata last, so the save may not have finished; save again or copy the folder again."
        ) from None
    if up.storages:  # DCP keeps tensors in the .distcp files; a storage here has no bytes to read
        raise CorruptCheckpointError(
            f"{path}: the distributed checkpoint's metadata holds tensor storages, which "
            "torch.distributed.checkpoint never writes there. The file is corrupted; save or copy the folder again.")
    unsafe = set(up.unsafe) - DCP_GLOBALS
    fields = obj.state if _kind(obj) == _METADATA else None
    if not isinstance(fields, dict):
        found = _kind(obj) or type(obj).__name__
        named = f"; it also names {sorted(unsafe)}, none of which was imported or run" if unsafe else ""
        raise CorruptCheckpointError(
            f"{path}: not the metadata of a distributed checkpoint (expected a {_METADATA} record, found "
            f"{found}){named}. The file is corrupted or was not written by torch.distributed.checkpoint."
        )
    return fields, unsafe


# ---- the opened folder -------------------------------------------------------------------------
class DcpTensor(LazyRecord):
    """One tensor of a DCP folder, known from ``.metadata``; its chunks are read when asked for."""

    def __init__(self, folder: DcpFolder, row: int):
        self.folder, self.row = folder, row
        self.shape, self.dtype = folder.shapes[row], folder.dtypes[row]
        self.path = folder.first_path(row)

    def read(self, maps: dict[int, Any]) -> torch.Tensor:
        return self.folder.read(self.row, maps)

    def read_into(self, out: torch.Tensor, maps: dict[int, Any]) -> None:
        """Assemble the tensor's chunks straight into ``out`` (a CPU tensor of its shape and dtype)."""
        self.folder.read(self.row, maps, out)

    def __repr__(self) -> str:
        return f"DcpTensor({self.folder.tensor_fqns[self.row]!r}, shape={self.shape}, dtype={self.dtype})"


class DcpFolder:
    """An opened DCP folder: every item's byte range (validated), the tensors as columns, and the
    caches of parsed chunks."""

    def __init__(self, folder: str, fields: dict):
        self.folder = folder
        self.meta_path = os.path.join(folder, METADATA)
        self._storage(fields.get("storage_data"))
        self._entries(fields.get("state_dict_metadata"))
        self._chunks: dict[int, TensorRef] = {}  # storage row -> the chunk's record, once parsed
        self._headers: dict[tuple[int, int], tuple[int, dict]] = {}  # (file, start) -> safetensors header

    def _corrupt(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.meta_path}: {what}. The metadata is corrupted (or was not written by torch's "
            "FileSystemWriter); save the checkpoint again, or copy the folder again."
        )

    # ---- storage_data: where each item's bytes are --------------------------------------------
    def _storage(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise self._corrupt(f"storage_data is {type(data).__name__}, not the mapping FileSystemWriter writes")
        keys, infos = list(data), list(data.values())
        for kind, items, want in (("key", keys, _INDEX), ("entry", infos, _STORAGE_INFO)):
            bad = _kinds(items) - {want}
            if bad:
                raise self._corrupt(f"a storage_data {kind} is a {sorted(map(str, bad))[0]}, not a {want}")
        try:
            ks, vs = [k.state for k in keys], [v.state for v in infos]
            self.item_fqns = [k["fqn"] for k in ks]
            self.item_offsets = [k.get("offset") for k in ks]  # tuples (torch.Size), None for byte items
            rel = [v["relative_path"] for v in vs]
            start, length = [v["offset"] for v in vs], [v["length"] for v in vs]
            if (set(map(type, start)) | set(map(type, length))) - {int}:
                raise TypeError("byte offsets and lengths must be integers")
            self.start = np.array(start, dtype=np.int64).reshape(len(vs))
            self.length = np.array(length, dtype=np.int64).reshape(len(vs))
            self.transforms = [v.get("transform_descriptors") for v in vs]
            self.index = dict(zip(zip(self.item_fqns, self.item_offsets), range(len(ks))))
        except _BAD_FIELDS as e:
            raise self._corrupt(f"a storage_data record is malformed ({type(e).__name__}: {e})") from None
        if set(map(type, rel)) - {str}:
            raise self._corrupt("a storage entry's relative_path is not a file name")
        names = sorted(set(rel))
        self.relpaths = [self._checked_name(n) for n in names]
        self.files = [MappedFile(os.path.join(self.folder, n)) for n in self.relpaths]
        position = {n: i for i, n in enumerate(names)}
        self.file_of = np.fromiter((position[r] for r in rel), dtype=np.int64, count=len(rel))
        self._check_extents()

    def _checked_name(self, name: Any) -> str:
        norm = os.path.normpath(name) if isinstance(name, str) and name and "\x00" not in name else None
        if norm is None or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
            raise self._corrupt(
                f"a storage entry names the file {name!r}, which is not inside the checkpoint folder; "
                "ckptviz refuses to read outside it"
            )
        path = os.path.join(self.folder, norm)
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(
                f"{path}: missing. {self.meta_path} lists it as holding part of the checkpoint; copy every "
                f"{SUFFIX} file of the checkpoint folder (one per writing rank) next to {METADATA}."
            )
        return norm

    def _check_extents(self) -> None:
        negative = (self.start < 0) | (self.length < 0)
        if negative.any():
            i = int(np.flatnonzero(negative)[0])
            raise self._corrupt(f"item {self.item_fqns[i]!r} has a negative byte offset or length")
        sizes = np.array([f.size for f in self.files], dtype=np.int64)
        end = self.start + self.length
        bad = end > sizes[self.file_of]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            f = self.files[self.file_of[i]]
            raise CorruptCheckpointError(
                f"{f.path}: holds {f.size} bytes, but {METADATA} places item {self.item_fqns[i]!r} at bytes "
                f"{int(self.start[i])}..{int(end[i])}; the file is truncated (the save did not finish or the "
                f"copy was cut off). Copy {os.path.basename(f.path)} again."
            )

    # ---- state_dict_metadata: what the items are ------------------------------------------------
    def _entries(self, entries: Any) -> None:
        if not isinstance(entries, dict) or not all(type(k) is str for k in entries):
            raise self._corrupt("state_dict_metadata is not a mapping of names to storage records")
        fqns, values = list(entries), list(entries.values())
        types = list(map(type, values))
        bad = {t for t in set(types) if getattr(t, "_ckptviz_global", None) not in (_TENSOR, _BYTES)
               or not issubclass(t, Stub)}
        if bad:
            i = next(i for i, t in enumerate(types) if t in bad)
            raise self._corrupt(f"item {fqns[i]!r} is a {getattr(types[i], '_ckptviz_global', types[i].__name__)}, "
                                "not a tensor or bytes storage record")
        tensor_type = next((t for t in set(types) if t._ckptviz_global == _TENSOR), None)
        self.fqns, self.is_tensor = fqns, [t is tensor_type for t in types]
        rows = [i for i, t in enumerate(self.is_tensor) if t]
        self.tensor_fqns = [fqns[i] for i in rows]
        try:
            states = [values[i].state for i in rows]
            self.shapes = [tuple(s["size"]) for s in states]
            props = [s["properties"] for s in states]
            self.chunk_lists = [s["chunks"] for s in states]
            if _kinds(props) - {_MD + "TensorProperties"}:
                raise TypeError("tensor properties of another class")
            self.dtypes = [p[0] if type(p) is tuple else p["dtype"] for p in (p.state for p in props)]
        except _BAD_FIELDS:
            raise self._corrupt(f"tensor record {self._first_bad(rows, values)!r} is malformed") from None
        dims = itertools.chain.from_iterable(self.shapes)
        ok = (set(map(type, dims)) <= {int} and min(itertools.chain.from_iterable(self.shapes), default=0) >= 0
              and set(map(type, self.dtypes)) <= {torch.dtype}
              and set(map(type, self.chunk_lists)) <= {list})
        if not ok:
            raise self._corrupt(f"tensor record {self._first_bad(rows, values)!r} is malformed")
        first = {f: r for f, o, r in zip(self.item_fqns, self.item_offsets, self.file_of.tolist())
                 if type(o) is tuple and not any(o)}
        anywhere = dict(zip(self.item_fqns, self.file_of.tolist()))
        self.first_file = [first.get(f, anywhere.get(f)) for f in self.tensor_fqns]

    def _first_bad(self, rows: list[int], values: list) -> str:
        for i in rows:
            s = values[i].state
            try:
                ok = (all(type(d) is int and d >= 0 for d in tuple(s["size"]))
                      and isinstance(_dtype(s["properties"]), torch.dtype) and type(s["chunks"]) is list)
            except _BAD_FIELDS:
                ok = False
            if not ok:
                return self.fqns[i]
        return "?"

    def first_path(self, row: int) -> str | None:
        i = self.first_file[row]
        return self.files[i].path if i is not None else None

    def file_labels(self) -> list[str | None]:
        names = self.relpaths
        return [names[i] if i is not None else None for i in self.first_file]

    # ---- reading tensors ----------------------------------------------------------------------
    def read(self, row: int, maps: dict[int, Any], out: torch.Tensor | None = None) -> torch.Tensor:
        """The value of tensor ``row``, read as ``maps`` (a ``mapped.Reads``) says: each chunk read
        straight into its place in the result (``out`` when given), or, for zero-copy reads, a view of
        a chunk that covers the whole tensor."""
        fqn, shape, dtype = self.tensor_fqns[row], self.shapes[row], self.dtypes[row]
        chunks = self._chunk_boxes(row)
        if math.prod(shape) == 0:
            return out if out is not None else torch.empty(shape, dtype=dtype)
        whole = len(chunks) == 1 and chunks[0][0] == (0,) * len(shape) and chunks[0][1] == shape
        if whole and out is None:
            return read_tensor(self._chunk(fqn, *chunks[0], dtype), copying(maps))
        if out is None:
            exact = len(chunks) <= MAX_OVERLAP_CHECK
            out = torch.empty(shape, dtype=dtype) if exact else torch.zeros(shape, dtype=dtype)
        for offsets, sizes in chunks:
            if math.prod(sizes):
                ref = self._chunk(fqn, offsets, sizes, dtype)
                place = out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
                if copying(maps):
                    read_into(ref, place)  # straight from the file where the place is contiguous
                else:
                    place.copy_(read_tensor(ref, copy=False))
        return out

    def _chunk_boxes(self, row: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """The (offsets, sizes) of each chunk, checked to tile the tensor exactly."""
        fqn, shape = self.tensor_fqns[row], self.shapes[row]
        if len(self.chunk_lists[row]) > MAX_CHUNKS:
            raise limit_error(self.meta_path, LimitExceeded(
                f"tensor {fqn!r} declares {len(self.chunk_lists[row]):_} chunks", "ckptviz.readers.dcp.MAX_CHUNKS",
                MAX_CHUNKS))
        try:
            states = [c.state for c in self.chunk_lists[row] if _kind(c) == _CHUNK]
            boxes = [(_offsets(s["offsets"]), _offsets(s["sizes"])) for s in states]
            if len(boxes) != len(self.chunk_lists[row]) or not boxes:
                raise ValueError("not a list of chunk records")
            lo = np.array([b[0] for b in boxes], dtype=np.int64).reshape(len(boxes), len(shape))
            size = np.array([b[1] for b in boxes], dtype=np.int64).reshape(len(boxes), len(shape))
        except _BAD_FIELDS as e:
            raise self._corrupt(f"the chunk list of tensor {fqn!r} is malformed ({e})") from None
        hi = lo + size
        inside = bool(((lo >= 0) & (size >= 0) & (hi <= np.array(shape, dtype=np.int64))).all())
        if not inside or int(size.prod(axis=1).sum()) != math.prod(shape) or _overlap(lo, hi):
            raise self._corrupt(f"the chunks of tensor {fqn!r} (shape {list(shape)}) do not tile it exactly")
        return boxes

    def _chunk(self, fqn: str, offsets: tuple, sizes: tuple, dtype: torch.dtype) -> TensorRef:
        item = self.index.get((fqn, offsets))
        if item is None:
            raise self._corrupt(f"no storage entry for the chunk of {fqn!r} at offsets {list(offsets)}")
        ref = self._chunks.get(item)
        if ref is None:
            ref = self._chunks[item] = self._parse_chunk(item, fqn)
        where = self.files[self.file_of[item]]
        if tuple(ref.shape) != sizes or ref.dtype != dtype:
            raise CorruptCheckpointError(
                f"{where.path}: the chunk of {fqn!r} at offsets {list(offsets)} holds {ref.dtype} of shape "
                f"{list(ref.shape)}, but {METADATA} declares {dtype} of shape {list(sizes)}; the file is corrupted "
                "or belongs to another save."
            )
        return ref

    def _parse_chunk(self, item: int, fqn: str) -> TensorRef:
        source, start, length = self._window(item)
        try:
            with open(source.path, "rb") as f:
                f.seek(start)
                head = f.read(4)
                if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                    ref = self._zip_chunk(f, item, start, length, source)
                else:
                    ref = self._safetensors_chunk(f, item, fqn, start, source)
        except LimitExceeded as e:
            raise limit_error(source.path, e) from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, CorruptCheckpointError, *PICKLE_ERRORS) as e:
            raise CorruptCheckpointError(
                f"{source.path}: the chunk of {fqn!r} at bytes {start}..{start + length} cannot be read "
                f"({type(e).__name__}: {e}); the file is corrupted or truncated. Copy it again."
            ) from None
        return ref

    def _zip_chunk(self, f, item: int, start: int, length: int, source: MappedFile) -> TensorRef:
        obj, up, spans = read_zip_window(f, start, length, source)
        if up.unsafe:
            raise CorruptCheckpointError(f"the item's pickle names {sorted(up.unsafe)}; a tensor item names none")
        if not isinstance(obj, TensorRef) or obj.storage is None:
            raise CorruptCheckpointError(f"the item is a {type(obj).__name__}, not one saved tensor")
        key = f"{start}/{obj.storage.key}"
        source.offsets[key] = spans[obj.storage.key][0]
        storage = replace(obj.storage, key=key)
        if storage.nbytes > spans[obj.storage.key][1] - spans[obj.storage.key][0] or not _fits(obj, storage):
            raise CorruptCheckpointError("the tensor claims more bytes than its storage holds")
        return replace(obj, storage=storage)

    def _safetensors_chunk(self, f, item: int, fqn: str, start: int, source: MappedFile) -> TensorRef:
        """A chunk written with ``SerializationFormat.SAFETENSORS``: the item's offset is where the file's
        safetensors blob begins, and the chunk is the blob's entry named ``fqn``."""
        data_start, header = self._header(f, int(self.file_of[item]), start, source.path)
        entry = header.get(fqn)
        try:
            dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (*_BAD_FIELDS, StopIteration):
            raise CorruptCheckpointError(f"no valid safetensors entry {fqn!r} at byte {start}") from None
        numel = math.prod(shape)
        if begin < 0 or end - begin != numel * element_size(dtype) or data_start + end > source.size:
            raise CorruptCheckpointError(f"safetensors entry {fqn!r} does not fit its size or the file")
        key = f"{start}/{fqn}"
        source.offsets[key] = data_start + begin
        storage = StorageRef(key, dtype, "cpu", numel, source=source)
        return TensorRef(storage, 0, shape, contiguous_stride(shape), dtype)

    def _header(self, f, file: int, start: int, path: str) -> tuple[int, dict]:
        cached = self._headers.get((file, start))
        if cached is None:
            f.seek(start)
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            raw = f.read(n) if 0 < n <= MAX_HEADER else b""
            if len(raw) != n or raw[:1] != b"{":
                raise CorruptCheckpointError(f"neither a torch.save zip nor a safetensors blob at byte {start}")
            try:
                header = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise CorruptCheckpointError(f"the safetensors header at byte {start} is not JSON ({e})") from None
            cached = self._headers[(file, start)] = (start + 8 + n, header if isinstance(header, dict) else {})
        return cached

    def _window(self, item: int) -> tuple[MappedFile, int, int]:
        """(the file holding ``item``, its start, its length), once the item and the file check out."""
        source = self.files[self.file_of[item]]
        self._refuse_transforms(item, source.path)
        source.verify()
        return source, int(self.start[item]), int(self.length[item])

    def _refuse_transforms(self, item: int, path: str) -> None:
        descriptors = self.transforms[item]
        if descriptors:
            raise UnknownFormatError(
                f"{path}: item {self.item_fqns[item]!r} was written through the stream transforms "
                f"{descriptors!r} (e.g. compression); ckptviz reads untransformed DCP items only. Read it with "
                "torch.distributed.checkpoint.load, or re-save without the extension."
            )

    # ---- byte items: plain objects torch.save'd into the folder ---------------------------------
    def read_bytes(self, fqn: str) -> tuple[Any, set[str]]:
        """(the object of byte item ``fqn``, the globals it names beyond torch's allowlist)."""
        item = self.index.get((fqn, None))
        if item is None:
            raise self._corrupt(f"no storage entry for the item {fqn!r}")
        source, start, length = self._window(item)
        window = MappedFile(source.path, identity=source.identity)  # the item's storages, if it holds tensors
        try:
            with open(source.path, "rb") as f:
                obj, up, spans = read_zip_window(f, start, length, window)
            for key, ref in up.storages.items():
                lo, hi = spans[key]
                if ref.nbytes > hi - lo:
                    raise CorruptCheckpointError(f"tensor storage {key} claims more bytes than its record holds")
                window.offsets[key] = lo
        except LimitExceeded as e:
            raise limit_error(source.path, e) from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, CorruptCheckpointError, *PICKLE_ERRORS) as e:
            raise CorruptCheckpointError(
                f"{source.path}: the item {fqn!r} at bytes {start}..{start + length} cannot be read "
                f"({type(e).__name__}: {e}); the file is corrupted or truncated. Copy it again."
            ) from None
        return obj, set(up.unsafe)

    def bytes_length(self, fqn: str) -> int:
        item = self.index.get((fqn, None))
        return int(self.length[item]) if item is not None else 0


def _offsets(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    out = tuple(value)
    if not all(type(v) is int for v in out):
        raise ValueError(f"offsets {value!r} are not integers")
    return out


def _dtype(properties: Any) -> torch.dtype:
    state = properties.state if _kind(properties) == _MD + "TensorProperties" else None
    return state[0] if isinstance(state, tuple) else state["dtype"]


def _overlap(lo: np.ndarray, hi: np.ndarray) -> bool:
    """Whether any two of the boxes [lo, hi) share an element (checked for up to MAX_OVERLAP_CHECK)."""
    k = len(lo)
    if k < 2 or k > MAX_OVERLAP_CHECK:
        return False
    inter = np.clip(np.minimum(hi[:, None], hi[None]) - np.maximum(lo[:, None], lo[None]), 0, None).prod(axis=2)
    np.fill_diagonal(inter, 0)
    return bool(inter.any())


def _fits(ref: TensorRef, storage: StorageRef) -> bool:
    if ref.numel == 0:
        return True
    if min(ref.stride, default=0) < 0 or len(ref.stride) != len(ref.shape):
        return False
    last = ref.offset + sum((s - 1) * st for s, st in zip(ref.shape, ref.stride))
    return (last + 1) * element_size(ref.dtype) <= storage.nbytes


def _read_byte_items(dcp: DcpFolder, items: list[tuple[str, tuple, tuple | None]]):
    """(values by fqn, skipped fqns, unsafe globals): optimizer items first, within BYTES_BUDGET."""
    values, skipped, unsafe, spent = {}, [], set(), 0
    for fqn, _, _root in sorted(items, key=lambda it: it[2] is None):
        item = dcp.index.get((fqn, None))
        n = int(dcp.length[item]) if item is not None else 0
        if item is not None and (spent + n > BYTES_BUDGET or dcp.transforms[item]):
            skipped.append(fqn)
            continue
        spent += n
        values[fqn], names = dcp.read_bytes(fqn)
        unsafe |= names
    return values, skipped, unsafe


def _plain(obj: Any, depth: int = 0) -> Any:
    """Plain data from a metadata record: paths as strings, DCP records as dicts."""
    if _kind(obj) in _PATHS:
        return os.path.join(*obj.args) if obj.args and all(isinstance(a, str) for a in obj.args) else str(obj.args)
    if isinstance(obj, Stub) and depth < 4:
        return {str(k): _plain(v, depth + 1) for k, v in obj.attributes().items()}
    if isinstance(obj, dict) and depth < 4:
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    return plain(obj)


def read_dcp(path: str | os.PathLike) -> RawCheckpoint:
    """Read a DCP folder (or its ``.metadata`` / a ``.distcp`` in it): ``.metadata`` only, plus the small
    non-tensor items; tensors are listed from the metadata and read when asked for."""
    folder = dcp_folder_of(path) or os.fspath(path)
    if not os.path.isdir(folder):
        raise CheckpointNotFoundError(f"{folder}: no such folder (relative paths start at {os.getcwd()}).")
    meta_path = os.path.join(folder, METADATA)
    if not os.path.isfile(meta_path):
        raise CorruptCheckpointError(
            f"{folder}: a distributed checkpoint folder without {METADATA}. DCP writes it last, after every "
            f"{SUFFIX} file, so the save did not finish or the copy is incomplete; save or copy it again."
        )
    fields, unsafe = load_metadata(meta_path)
    with paused_gc():
        dcp = DcpFolder(folder, fields)
        layout = Layout(dcp.fqns, dcp.is_tensor, fields.get("planner_data"))
        sections = _sections(dcp, layout)
    values, skipped, byte_unsafe = _read_byte_items(dcp, layout.byte_items)
    optimizers, tree = _trees(dcp, layout, values)
    extra, extra_unsafe, extra_path = _lightning_meta(folder)
    meta = {**extra, **{str(k): plain(v) for k, v in listify(tree).items()}}
    meta["dcp" if "dcp" not in meta else "_dcp"] = _facts(dcp, fields, layout, skipped)
    return RawCheckpoint(
        format="dcp", root={**sections, **optimizers, **tree}, unsafe=unsafe | byte_unsafe | extra_unsafe,
        source=None, extra_metadata=meta, sections=sections, optimizers=optimizers,
        files=[meta_path, *(f.path for f in dcp.files), *([extra_path] if extra_path else [])],
    )


def _lightning_meta(folder: str) -> tuple[dict, set[str], str | None]:
    """The plain data of Lightning's ``meta.pt`` beside the DCP files (epoch, global_step, hparams, loops),
    read with the safe unpickler: (data, unsafe globals, its path or None)."""
    path = os.path.join(folder, LIGHTNING_META)
    if not os.path.isfile(path):
        return {}, set(), None
    try:
        raw = read_torch_zip(path)
    except CheckpointError as e:  # the weights stay readable without it
        return {LIGHTNING_META: f"unreadable: {e}"}, set(), path
    root = raw.root
    data = {str(k): plain(v) for k, v in root.items()} if isinstance(root, dict) else {LIGHTNING_META: plain(root)}
    return data, set(raw.unsafe), path


def _sections(dcp: DcpFolder, layout: Layout) -> dict[str, TensorTable]:
    labels = dcp.file_labels()
    out = {}
    for name, (keys, rows) in layout.sections.items():
        out[name] = TensorTable(keys, [dcp.shapes[i] for i in rows], [dcp.dtypes[i] for i in rows], "cpu",
                                [labels[i] for i in rows], lambda j, rows=rows: DcpTensor(dcp, rows[j]))
    return out


def _trees(dcp: DcpFolder, layout: Layout, values: dict) -> tuple[dict[str, dict], dict]:
    """(optimizer states by name, the tree of plain values outside them)."""
    opt_trees: dict[tuple, dict] = {root: {} for root in layout.roots}
    for root, below, row in layout.optimizer_tensors:
        insert(opt_trees[root], below, DcpTensor(dcp, row))
    tree: dict = {}
    for fqn, p, root in layout.byte_items:
        if fqn in values:
            insert(opt_trees[root] if root is not None else tree, p[len(root):] if root else p, values[fqn])
    return {name_of(root): optimizer_state(t) for root, t in opt_trees.items()}, tree


def _facts(dcp: DcpFolder, fields: dict, layout: Layout, skipped: list[str]) -> dict:
    referenced = {os.path.basename(f.path) for f in dcp.files}
    with os.scandir(dcp.folder) as entries:
        stray = sorted(e.name for e in entries if e.name.endswith(SUFFIX) and e.name not in referenced)
    facts = {
        "version": _plain(fields.get("version")), "files": len(dcp.files), "tensors": len(dcp.tensor_fqns),
        "chunks": sum(map(len, dcp.chunk_lists)), "byte_items": len(layout.byte_items),
        "storage_meta": _plain(fields.get("storage_meta")) if fields.get("storage_meta") is not None else None,
        "planner_data": isinstance(fields.get("planner_data"), dict) and bool(fields.get("planner_data")),
    }
    if skipped:
        facts["skipped_byte_items"] = {
            "count": len(skipped), "bytes": sum(dcp.bytes_length(f) for f in skipped), "keys": skipped[:20],
            "why": f"over the {BYTES_BUDGET // 2**20} MB read at open, or stored through a stream transform",
        }
    if stray:
        facts["unreferenced_files"] = stray[:20]
    return facts
