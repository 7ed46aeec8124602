"""``open_checkpoint()`` and the lazy :class:`Checkpoint` handle: sniff the container, read its
structure safely, find and rank its sections, and hand out tensors only when asked for."""

from __future__ import annotations

import html
import itertools
import math
import operator
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import walk as walk_limits
from .errors import (
    CheckpointError,
    CheckpointWarning,
    CorruptCheckpointError,
    NoTensorsError,
    SectionError,
    UnsafeCheckpointError,
)
from .fold import group_frame, layer_of
from .readers import RawCheckpoint, read
from .readers._gc import paused_gc
from .readers.mapped import Reads, file_stamp, is_dense, read_elements, read_into, read_shared, read_tensor
from .readers.pickle_reader import OpaqueTensor, Stub
from .readers.records import (
    TENSOR_COLUMNS,
    LazyRecord,
    TensorRef,
    TensorTable,
    dtype_name,
    element_size,
    tensor_info,
)
from .sections import find_sections, is_tensor, metadata, rank

__all__ = ["TENSOR_COLUMNS", "Checkpoint", "as_checkpoint", "dtype_name", "human_size", "open_checkpoint",
           "tensor_info"]

class Checkpoint:
    """A lazily read checkpoint: its format, sections, metadata and tensors.

    Listing tensors reads no tensor data. Values are read when asked for, by default into memory of
    their own (``copy=True``): such a tensor stays valid whatever later happens to the file, and a file
    changed on disk since it was opened raises :class:`CorruptCheckpointError` instead of giving bytes
    of the new file read through the old layout. ``copy=False`` gives views of one private (copy-on-
    write) map per file instead: nothing is read until touched, but a file truncated under the map
    faults (SIGBUS) when a view past its new end is read; use it only on files nothing is writing.
    """

    def __init__(self, path: str | None, format: str, root: Any, raw: RawCheckpoint | None = None,
                 extra_metadata: dict | None = None):
        self.path = path
        self.format = format
        self._raw = raw
        self._root = root
        if raw is not None and raw.sections is not None:
            weights, optimizers, found = dict(raw.sections), dict(raw.optimizers or {}), {}
        else:
            label = os.path.basename(path) if path and raw is not None else None
            found, optimizers = find_sections(root, path)
            weights = {name: TensorTable.from_refs(entries, label) for name, entries in found.items()}
            taken = {name.split(".", 1)[0] for name in (*weights, *optimizers)}
            found = metadata(root, taken)
        self._weights = {name: weights[name] for name in rank(weights)}
        self._optimizers = optimizers
        self.metadata: dict[str, Any] = {**found, **(extra_metadata or {})}
        self.unsafe_globals: list[str] = sorted(raw.unsafe) if raw is not None else []
        self.warnings: list[str] = list(raw.warnings) if raw is not None else []
        self._stats: dict[str, tuple] = {}
        self._opened_stamp: tuple | None = None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], name: str = "<state dict>") -> Checkpoint:
        """Wrap an in-memory state dict (or any nested checkpoint dict) as a Checkpoint."""
        ck = cls(None, "state-dict", mapping)
        ck.path = name
        return ck

    # ---- structure -------------------------------------------------------------------------
    @property
    def sections(self) -> list[str]:
        """Names of the state dicts found inside, best first ("" is the top level itself)."""
        return list(self._weights)

    @property
    def optimizer_sections(self) -> list[str]:
        """Names of the optimizer states found inside (never offered as model weights)."""
        return list(self._optimizers)

    @property
    def files(self) -> list[str]:
        """The files behind this checkpoint (one for a single file; every shard of a folder)."""
        return list(self._raw.files) if self._raw is not None else []

    @property
    def nbytes(self) -> int:
        """Bytes on disk of every file behind the checkpoint."""
        total = 0
        for f in self.files:
            try:
                total += os.path.getsize(f)
            except OSError:
                pass
        return total

    def _section(self, section: str | None) -> TensorTable:
        if section is None:
            if not self._weights:
                raise SectionError(self._no_weights_message())
            return next(iter(self._weights.values()))
        if section in self._weights:
            return self._weights[section]
        if section in self._optimizers:
            raise SectionError(
                f"{self.path}: section {section!r} is optimizer state, not model weights; "
                "restore it with ckptviz.load_optimizer(optimizer, checkpoint)."
            )
        raise SectionError(f"{self.path}: no section {section!r}; the sections are {self.sections}")

    def _no_weights_message(self) -> str:
        if self._optimizers:
            return (
                f"{self.path}: holds only optimizer state ({', '.join(repr(s) for s in self._optimizers)}), "
                "no model weights. Use ckptviz.load_optimizer(optimizer, path) for it, and open the "
                "file with the model's weights for compare/load_partial."
            )
        return f"{self.path}: holds no state dict of model weights."

    def resolve(self, section: str | None = None) -> str:
        """The name of ``section``, or of the best section when None."""
        self._section(section)
        return section if section is not None else self.sections[0]

    # ---- tensors ---------------------------------------------------------------------------
    def tensors(self, section: str | None = None, *, grouped: bool = False) -> pd.DataFrame:
        """One row per tensor: shape, dtype, device (where it was saved), numel, nbytes, and the file
        that holds it. Reads no tensor data. ``grouped=True``: one row per layer pattern instead
        (keys that differ only in numeric indices), with every distinct shape, dtype and file in it."""
        table = self._section(section)
        if not grouped:
            return table.frame()
        frame = table.frame()
        return group_frame(frame, table.folding(), distinct=["shape", "dtype", "device", "file"],
                           sums=["numel", "nbytes"])

    def sizes(self, section: str | None = None, *, by: str = "layer") -> pd.DataFrame:
        """What the bytes are made of: tensors, numel, nbytes and share of the total per ``by`` group,
        largest first. ``by``: "layer" (the key up to its first numeric index, as ``model.layers.3``),
        "pattern" (the folded layer pattern), "dtype", "device" or "file"."""
        table = self._section(section)
        frame = table.frame()
        if by == "layer":
            labels = layer_of(frame.index.to_series())
        elif by == "pattern":
            f = table.folding()
            labels = pd.Series(np.asarray(f.patterns, dtype=object)[f.codes], index=frame.index)
        elif by in ("dtype", "device", "file"):
            labels = frame[by].fillna("")
        else:
            raise ValueError(f"by must be 'layer', 'pattern', 'dtype', 'device' or 'file', not {by!r}")
        out = frame.groupby(labels.to_numpy(), sort=False).agg(tensors=("numel", "size"), numel=("numel", "sum"),
                                                               nbytes=("nbytes", "sum"))
        out.index.name = by
        total = max(int(out["nbytes"].sum()), 1)
        out["share"] = out["nbytes"] / total
        return out.sort_values("nbytes", ascending=False, kind="stable")

    def tensor(self, key: str, section: str | None = None, *, copy: bool = True) -> torch.Tensor:
        """The value of one tensor, on the CPU: read into memory of its own (``copy=True``), or a view of
        the file's shared private map (``copy=False``, see the class docstring)."""
        entries = self._section(section)
        if key not in entries:
            raise SectionError(f"{self.path}: no tensor {key!r} in section {self.resolve(section)!r}")
        return self._value(entries[key], Reads(copy))

    def state_dict(self, section: str | None = None, *, copy: bool = True) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for a section: each read into memory of its own (``copy=True``, safe to hold
        while the file is re-saved), or views of one private map per file (``copy=False``)."""
        return self.values(self._section(section), section, copy=copy)

    def read_into(self, key: str, out: torch.Tensor, section: str | None = None) -> None:
        """Write tensor ``key``'s values into ``out``, a CPU tensor of its shape and dtype (contiguous or
        not): read from the file straight into ``out`` where the bytes allow, else read then copied.
        Raises :class:`CorruptCheckpointError` if the file changed since it was opened."""
        entries = self._section(section)
        if key not in entries:
            raise SectionError(f"{self.path}: no tensor {key!r} in section {self.resolve(section)!r}")
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"read_into needs a torch.Tensor to write into, got {type(out).__name__}")
        v = entries[key]
        shape, dtype = (tuple(v.shape), v.dtype)
        if tuple(out.shape) != shape or out.dtype != dtype or out.device.type != "cpu":
            raise SectionError(
                f"{self.path}: tensor {key!r} is {dtype_name(dtype)} of shape {list(shape)}; read_into got a "
                f"{dtype_name(out.dtype)} tensor of shape {list(out.shape)} on {out.device}. Pass a CPU tensor of "
                "the same shape and dtype (cast or move after reading)."
            )
        _refuse_quantized(v, self.path)
        with torch.no_grad():
            if isinstance(v, TensorRef) and v.storage is not None:
                self._guard(lambda: read_into(v, out), v.storage.source.path)
            elif isinstance(v, LazyRecord) and hasattr(v, "read_into"):
                self._guard(lambda: v.read_into(out, Reads(True)), v.path or self.path)
            else:
                out.copy_(self._value(v, Reads(True)))

    def stats(self, section: str | None = None, *, progress: bool | None = None, executor: Any = None,
              tick: Callable[[float], None] | None = None) -> pd.DataFrame:
        """Statistics of every tensor (``ckptviz.stats.STATS_KEYS``), one streaming pass each, cached.

        Runs shard-parallel on ``executor`` (worker threads by default; any ``concurrent.futures``
        executor or a ``dask.distributed`` Client; see ``ckptviz.parallel``); the numbers do not depend
        on it. A ``tqdm`` bar is shown when ``progress`` is True (or None and the section holds more than
        256 MiB); ``tick(fraction)`` is called as tasks finish.
        """
        from .stats import STATS_KEYS

        name = self.resolve(section)
        stamp = self._stamp()
        cached = self._stats.get(name)
        if cached is None or cached[0] != stamp or stamp is None:
            frames = self._parallel(_stats_task, name, None, (), progress, executor, "statistics", tick)
            frame = pd.concat(frames) if frames else pd.DataFrame(
                columns=list(STATS_KEYS), index=pd.Index([], name="key"), dtype="float64")
            cached = self._stats[name] = (stamp, frame)
        elif tick:
            tick(1.0)
        return cached[1].copy()

    def histograms(self, keys: Iterable[str] | None = None, bins: int = 64, *, section: str | None = None,
                   progress: bool | None = None, executor: Any = None) -> dict[str, Any]:
        """``{key: Histogram}`` of many tensors (default: the whole section), shard-parallel like
        :meth:`stats`, each as :meth:`histogram` computes it."""
        name = self.resolve(section)
        parts = self._parallel(_histogram_task, name, None if keys is None else list(keys), (bins,), progress,
                               executor, "histograms")
        return {k: h for part in parts for k, h in part.items()}

    def _parallel(self, fn: Callable, section: str, keys: list[str] | None, args: tuple, progress: bool | None,
                  executor: Any, desc: str, tick: Callable[[float], None] | None = None) -> list:
        from .parallel import plan, run

        table = self._section(section)
        if keys is not None:
            unknown = [k for k in keys if k not in table]
            if unknown:
                raise SectionError(f"{self.path}: no tensor {unknown[0]!r} in section {section!r}")
        tasks = plan(table, keys)
        nbytes = dict(zip(table.keys_list, table.nbytes().tolist()))
        return run(fn, [(self, section, t, *args) for t in tasks], executor=executor, progress=progress,
                   sizes=[sum(nbytes[k] for k in t) for t in tasks], desc=desc, tick=tick,
                   items=sum(map(len, tasks)))

    def values(self, keys: Iterable[str], section: str | None = None, *, copy: bool = True) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for some keys of a section, read as :meth:`state_dict` reads them."""
        entries = self._section(section)
        reads = Reads(copy)
        records = {k: entries[k] for k in keys}
        out = {k: self._value(v, reads) for k, v in records.items() if not copy or not _stored(v)}
        by_storage: dict[tuple, list[str]] = {}
        for k, v in records.items():
            if k not in out:
                by_storage.setdefault((id(v.storage.source), v.storage.key, v.storage.byte_offset), []).append(k)
        for group in by_storage.values():  # tensors over one storage share one owned buffer, as saved
            refs = [records[k] for k in group]
            _refuse_quantized(refs[0], self.path)
            got = [self._value(refs[0], reads)] if len(refs) == 1 else self._guard(
                lambda refs=refs: read_shared(refs), refs[0].storage.source.path)
            out.update(zip(group, got))
        return {k: out[k] for k in records}

    def __reduce__(self):
        """A file-backed checkpoint pickles as "open this path again" (for executors in other processes)."""
        if self._raw is None or not self.path:
            return object.__reduce__(self)
        return (_reopen, (self.path, bool(self._raw.trust or self.unsafe_globals)))

    def histogram(self, key: str, bins: int = 64, range: tuple[float, float] | None = None, *,
                  section: str | None = None):
        """Histogram of one tensor's finite values (NaN/Inf counted apart), cached per file and key."""
        from .stats import CACHE

        name = self.resolve(section)
        entries = self._section(name)
        if key not in entries:
            raise SectionError(f"{self.path}: no tensor {key!r} in section {name!r}")
        ref = entries[key]
        where = _path_of(ref)
        return CACHE.summarize(where, name, key, partial(self._summary_input, ref, Reads(True)), bins, range=range)[1]

    def _stamp(self) -> tuple | None:
        """Size and modification time of every file behind the checkpoint (None without files)."""
        try:
            return tuple(file_stamp(f) for f in self.files) or None
        except OSError:
            return None

    def _value(self, v: TensorRef | LazyRecord | torch.Tensor, reads: Reads | None = None) -> torch.Tensor:
        """A tensor's value, read as ``reads`` says (default: into memory of its own)."""
        if isinstance(v, torch.Tensor):
            return v
        reads = reads if reads is not None else Reads(True)
        _refuse_quantized(v, self.path)
        if isinstance(v, LazyRecord):
            return self._guard(lambda: v.read(reads), v.path or self.path)
        source = v.storage.source if v.storage is not None else None
        return self._guard(lambda: read_tensor(v, reads.copy), source.path if source is not None else self.path)

    def _summary_input(self, v: Any, reads: Reads) -> Any:
        """What ``ckptviz.stats`` summarises for ``v``: a stored dense tensor as an ``ElementStream``
        (``pread`` into one reused buffer: no whole-tensor copy, no fresh pages per tensor), else its value."""
        if not (isinstance(v, TensorRef) and v.storage is not None and is_dense(v)):
            return self._value(v, reads)
        from .stats import ElementStream

        _refuse_quantized(v, self.path)
        where = v.storage.source.path

        def fill(start: int, out: torch.Tensor) -> None:
            self._guard(lambda: read_elements(v, start, out), where)

        return ElementStream(v.dtype, v.shape, fill)

    @staticmethod
    def _guard(fn: Callable[[], Any], where: str | None) -> Any:
        """``fn()``, with torch's and the OS's errors about bytes turned into CorruptCheckpointError."""
        try:
            return fn()
        except CheckpointError:  # the reader's own error, naming its file
            raise
        except (RuntimeError, OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: could not read the bytes of a tensor ({e}).") from None

    def materialize(self, obj: Any) -> Any:
        """A deep copy of ``obj`` (part of this checkpoint's tree) with real, owned tensors.

        What the pickle shares stays shared in the copy, as ``torch.load`` gives it: each container is
        copied once, and records over one storage are read once into one buffer (views of it). The walk
        counts containers against ``ckptviz.walk.MAX_WALK_NODES`` (:class:`~ckptviz.walk.WalkLimitError`
        past it, or past ``MAX_WALK_DEPTH`` levels)."""
        if isinstance(obj, torch.Tensor):
            return obj.clone()
        if is_tensor(obj):
            return self._value(obj)  # read into memory of its own
        return _Materializer(self).run(obj)

    def optimizer_state(self, section: str | None = None) -> Any:
        """The raw (lazy) optimizer state stored under ``section`` (the first one when None)."""
        if not self._optimizers:
            raise SectionError(
                f"{self.path}: no optimizer state (a mapping with 'state' and 'param_groups') in this file; "
                f"sections with weights: {self.sections}"
            )
        if section is None:
            return next(iter(self._optimizers.values()))
        if section not in self._optimizers:
            raise SectionError(f"{self.path}: no optimizer section {section!r}; found {self.optimizer_sections}")
        return self._optimizers[section]

    # ---- display ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        parts = ", ".join(f"{s or '<top>'}: {len(self._weights[s])} tensors" for s in self.sections)
        return f"Checkpoint({self.path!r}, format={self.format!r}, sections=[{parts}])"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(s or '(top level)')}</td><td>{len(self._weights[s])}</td>"
            f"<td>{human_size(int(self._weights[s].nbytes().sum()))}</td></tr>"
            for s in self.sections
        )
        opt = f"<p>optimizer state: {html.escape(', '.join(self.optimizer_sections))}</p>" if self._optimizers else ""
        meta = ""
        if self.metadata:
            items = "".join(
                f"<li><b>{html.escape(str(k))}</b>: {html.escape(_short(v))}</li>" for k, v in self.metadata.items()
            )
            meta = f"<p>metadata</p><ul>{items}</ul>"
        return (
            f"<div class='ckptviz-checkpoint'><p><b>{html.escape(str(self.path))}</b> "
            f"({html.escape(self.format)}, {human_size(self.nbytes)})</p>"
            f"<table><tr><th>section</th><th>tensors</th><th>size</th></tr>{rows}</table>{opt}{meta}</div>"
        )


class _Materializer:
    """One :meth:`Checkpoint.materialize`: collect the records (each container once), read them grouped
    by storage, then copy the tree with a memo by id."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.budget = walk_limits.Budget(ck.path, "materializing the value's object tree")
        self.values: dict[int, Any] = {}  # id(record or tensor) -> its owned tensor
        self.memo: dict[int, Any] = {}
        self.keep: list[Any] = []  # every container seen, so that no id is reused while the memo holds it

    def run(self, obj: Any) -> Any:
        self._read(self._records(obj))
        return self._copy(obj, 0)

    @staticmethod
    def _items(obj: Any) -> Iterable[Any]:
        if isinstance(obj, Stub):
            return obj.attributes().values()
        if isinstance(obj, Mapping):
            return obj.values()
        if isinstance(obj, (list, tuple)):
            return obj
        return ()

    def _records(self, root: Any) -> list[Any]:
        found, seen, stack = [], set(), [root]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            self.keep.append(obj)
            if isinstance(obj, torch.Tensor) or is_tensor(obj):
                found.append(obj)
            elif isinstance(obj, (Mapping, list, tuple)):
                self.budget.step()
                stack.extend(self._items(obj))
        return found

    def _read(self, records: list[Any]) -> None:
        ck, groups = self.ck, {}
        for v in records:
            if _stored(v):
                groups.setdefault((id(v.storage.source), v.storage.key, v.storage.byte_offset), []).append(v)
            elif isinstance(v, torch.Tensor):
                self.values[id(v)] = v.clone()
            else:
                self.values[id(v)] = ck._value(v)
        for refs in groups.values():  # records over one storage share one owned buffer, as torch.load gives them
            got = [ck._value(refs[0])] if len(refs) == 1 else ck._guard(
                lambda refs=refs: read_shared(refs), refs[0].storage.source.path)
            _refuse_quantized(refs[0], ck.path)
            self.values.update(zip(map(id, refs), got))

    def _done(self, obj: Any) -> Any:
        """``obj``'s copy if it needs no walk (a leaf, a record read, a container copied), else ``_TODO``."""
        got = self.values.get(id(obj), _TODO)
        if got is not _TODO or not isinstance(obj, (Mapping, list, tuple)):
            return obj if got is _TODO else got
        return self.memo.get(id(obj), _TODO)

    def _copy(self, root: Any, depth: int = 0) -> Any:
        """The copy of ``root``, built with a stack of its own (never Python recursion: a tree as deep
        as ``MAX_WALK_DEPTH`` needs no frames of the caller's stack)."""
        got = self._done(root)
        if got is not _TODO:
            return got
        stack = [self._enter(root, depth)]
        while True:
            frame = stack[-1]
            for key, child in frame.items:
                got = self._done(child)
                if got is _TODO:
                    frame.key = key
                    stack.append(self._enter(child, len(stack) + depth))
                    break
                frame.put(key, got)
            else:
                stack.pop()
                value = frame.finish(self.memo)
                if not stack:
                    return value
                stack[-1].put(stack[-1].key, value)

    def _enter(self, obj: Any, depth: int) -> _Frame:
        if depth > walk_limits.MAX_WALK_DEPTH:
            raise walk_limits.limit_error(self.ck.path, "the value nests containers deeper than", "MAX_WALK_DEPTH")
        frame = _Frame(obj)
        if isinstance(obj, Mapping):
            frame.out = self.memo[id(obj)] = {}  # before the children: a cycle gets the copy, as deepcopy does
            frame.items = iter(obj.attributes().items() if isinstance(obj, Stub) else obj.items())
        else:
            frame.out = [] if isinstance(obj, list) else None
            if frame.out is not None:
                self.memo[id(obj)] = frame.out
            frame.items = enumerate(obj)
        return frame


_TODO = object()  # a container not copied yet


class _Frame:
    """One container being copied by :meth:`_Materializer._copy`: its children left, and its copy."""

    __slots__ = ("obj", "out", "items", "key", "built")

    def __init__(self, obj: Any):
        self.obj, self.built = obj, []

    def put(self, key: Any, value: Any) -> None:
        if type(self.out) is dict:
            self.out[key] = value
        elif self.out is not None:
            self.out.append(value)
        else:
            self.built.append(value)

    def finish(self, memo: dict) -> Any:
        if self.out is not None:
            return self.out
        obj = self.obj  # a tuple: built from its children's copies
        if id(obj) in memo:  # a cycle through a list inside this tuple already built it
            return memo[id(obj)]
        out = memo[id(obj)] = tuple(self.built) if type(obj) is tuple else _retuple(obj, self.built)
        return out


def _retuple(obj: tuple, items: list) -> tuple:
    """A tuple subclass (a namedtuple, ``torch.Size``) rebuilt from ``items``; a plain tuple if it cannot be."""
    try:
        return type(obj)(items)
    except TypeError:
        try:
            return type(obj)(*items)
        except TypeError:
            return tuple(items)


def _stats_task(ck: Checkpoint, section: str, keys: list[str]) -> pd.DataFrame:
    """``stats_frame`` of ``keys``, each tensor streamed through one reused buffer (``pread``: a file
    changed under it raises instead of faulting), or read whole and let go before the next."""
    from .stats import CACHE, STATS_KEYS

    entries, reads = ck._section(section), Reads(True)
    # each tensor's default 64-bin histogram comes from the same read and is cached (ckptviz.stats.CACHE),
    # so the ck.histogram(key) a view asks for next reads nothing
    files: dict = {}  # path -> its cache key part, stat-ed once per task

    def file_key(path):
        if path not in files:
            files[path] = CACHE.file_key(path)
        return files[path]

    rows = [CACHE.summarize(where, section, k, partial(ck._summary_input, entries[k], reads),
                            file_key=file_key(where))[0]
            for k in keys for where in (_path_of(entries[k]),)]
    return pd.DataFrame(rows, columns=list(STATS_KEYS), index=pd.Index(list(keys), name="key"), dtype="float64")


def _histogram_task(ck: Checkpoint, section: str, keys: list[str], bins: int) -> dict:
    from .stats import histogram

    entries, reads = ck._section(section), Reads(True)
    return {k: histogram(ck._summary_input(entries[k], reads), bins) for k in keys}


_REOPENED: dict[tuple[str, bool], Checkpoint] = {}


def _reopen(path: str, trust: bool) -> Checkpoint:
    """The checkpoint at ``path``, opened once per process while its files are unchanged."""
    ck = _REOPENED.get((path, trust))
    if ck is None or ck._stamp() != ck._opened_stamp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)  # they were shown where it was first opened
            ck = open_checkpoint(path, trust=trust)
        if len(_REOPENED) > 16:
            _REOPENED.clear()
        _REOPENED[(path, trust)] = ck
    return ck


_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


def _refuse_quantized(v: Any, path: str | None) -> None:
    """A plain tensor record of a quantized dtype has no scale or zero point: torch builds a tensor whose
    every use fails an internal assert. torch.save writes quantized tensors another way (``_rebuild_qtensor``)."""
    if isinstance(v, TensorRef) and v.dtype in _QUANTIZED:
        raise CorruptCheckpointError(
            f"{path}: a tensor record has the quantized dtype {dtype_name(v.dtype)} but no quantizer (scale, zero "
            "point): torch.save writes quantized tensors with _rebuild_qtensor, so the record is damaged or "
            "hand-made, and the tensor torch would build from it fails on every use. Re-save the tensor "
            "(dequantize it, or save it with torch.save as a quantized tensor)."
        )


def _stored(v: Any) -> bool:
    """Whether ``v`` is a record of bytes in a file (not a real tensor, a chunked record or a meta one)."""
    return type(v) is TensorRef and v.storage is not None and v.storage.source is not None


def _path_of(ref: Any) -> str | None:
    """The file holding a record's bytes (None for in-memory tensors and meta records)."""
    if isinstance(ref, TensorRef):
        return ref.storage.source.path if ref.storage is not None and ref.storage.source is not None else None
    return ref.path if isinstance(ref, LazyRecord) else None


def _short(v: Any, limit: int = 200) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human_size(n: float) -> str:
    """Bytes as a short human-readable size: 512 B, 466.7 KB, 1.3 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_extents(path: str, sections: Mapping[str, TensorTable]) -> None:
    """Every tensor must fit inside its storage, so that reading it can never fault (numpy over the
    records' columns)."""
    for section, entries in sections.items():
        records = getattr(entries, "records_list", None) or list(map(entries.record, range(len(entries))))
        rows = [i for i, v in enumerate(records) if isinstance(v, TensorRef) and v.storage is not None]
        if not rows:
            continue
        offset, shape, stride, dtype, storage = zip(*map(_EXTENT_FIELDS, map(records.__getitem__, rows)))
        bad = _first_overrun(offset, shape, stride, dtype, storage)
        if bad is not None:
            raise CorruptCheckpointError(
                f"{path}: tensor {entries.keys_list[rows[bad]]!r} (section {section!r}) claims more bytes than its "
                "storage holds; the file is corrupted."
            )


_EXTENT_FIELDS = operator.attrgetter("offset", "shape", "stride", "dtype", "storage")


def _first_overrun(offset, shape, stride, dtype, storage) -> int | None:
    """Index of the first tensor that does not fit its storage (elements ``offset + sum((s-1)*st)``
    must lie inside it, strides non-negative), or None. int64 columns where every value is small
    enough that no sum or product below can overflow; exact Python arithmetic otherwise."""
    ndim = np.fromiter(map(len, shape), np.int64, len(shape))
    try:
        flat_shape = np.fromiter(itertools.chain.from_iterable(shape), np.int64, int(ndim.sum()))
        flat_stride = np.fromiter(itertools.chain.from_iterable(stride), np.int64, len(flat_shape))
        start = np.fromiter(offset, np.int64, len(offset))
        numel = np.fromiter(map(_NUMEL, storage), np.int64, len(storage))
    except OverflowError:
        return _first_overrun_exact(offset, shape, stride, dtype, storage)
    small = max(flat_shape.max(initial=0), flat_stride.max(initial=0)) < 2**28 and ndim.max(initial=0) <= 32
    if not small or max(start.max(), numel.max()) >= 2**40:  # then sums < 2**62, products < 2**45
        return _first_overrun_exact(offset, shape, stride, dtype, storage)
    sizes = {d: element_size(d) for d in {*dtype, *map(_DTYPE, storage)}}
    ends = np.cumsum(ndim)

    def per_tensor(values: np.ndarray) -> np.ndarray:  # the sum of each tensor's run of ``values``
        total = np.concatenate([[0], np.cumsum(values)])
        return total[ends] - total[ends - ndim]

    last = start + per_tensor((flat_shape - 1) * flat_stride)
    empty = per_tensor(flat_shape == 0) > 0
    negative = per_tensor(flat_stride < 0) > 0
    itemsize = np.fromiter(map(sizes.__getitem__, dtype), np.int64, len(dtype))
    capacity = numel * np.fromiter(map(sizes.__getitem__, map(_DTYPE, storage)), np.int64, len(storage))
    bad = ~empty & (negative | (last + 1 > capacity // itemsize))  # (last + 1) * itemsize > capacity
    return int(np.argmax(bad)) if bad.any() else None


_NUMEL = operator.attrgetter("numel")
_DTYPE = operator.attrgetter("dtype")


def _first_overrun_exact(offset, shape, stride, dtype, storage) -> int | None:
    for i, (o, sh, st, d, s) in enumerate(zip(offset, shape, stride, dtype, storage)):
        if math.prod(sh) == 0:
            continue
        last = o + sum((n - 1) * k for n, k in zip(sh, st))
        if min(st, default=0) < 0 or (last + 1) * element_size(d) > s.nbytes:
            return i
    return None


@paused_gc()
def open_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Checkpoint:
    """Open a checkpoint lazily and safely.

    Nothing from the file is imported or called. A file whose pickle names globals beyond torch's
    ``weights_only`` allowlist raises :class:`UnsafeCheckpointError` listing all of them, unless
    ``trust=True``; even then ckptviz only reads tensors and plain data, it builds no foreign object.
    """
    path = os.fspath(path)
    raw = read(path)
    raw.trust = trust
    if raw.unsafe and not trust:
        raise UnsafeCheckpointError(path, raw.unsafe)
    damaged = raw.damaged_storages()
    if damaged:
        shown = "; ".join(damaged[:3]) + (f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else "")
        raise CorruptCheckpointError(f"{path}: the file is truncated or corrupted: {shown}. Re-download or re-save it.")
    ck = Checkpoint(raw.location or path, raw.format, raw.root, raw, raw.extra_metadata)
    ck._opened_stamp = ck._stamp()
    if not ck.sections and not ck.optimizer_sections:
        opaque = isinstance(raw.root, OpaqueTensor)
        found = type(raw.root).__name__ if not isinstance(raw.root, Stub) else raw.root._ckptviz_global
        raise NoTensorsError(
            f"{path}: the file holds no tensors a model could load (found a {found}"
            f"{' of a tensor kind ckptviz does not unpack' if opaque else ''}). "
            "Save the model's weights with torch.save(model.state_dict(), path)."
        )
    if raw.sections is None:  # readers that build their own sections validate their records
        check_extents(path, ck._weights)
    for message in raw.warnings:
        warnings.warn(f"{ck.path}: {message}", CheckpointWarning, stacklevel=2)
    return ck


def as_checkpoint(source: Any, *, trust: bool = False) -> Checkpoint:
    """A Checkpoint from a path, a Checkpoint, or a mapping of tensors."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, os.PathLike)):
        return open_checkpoint(source, trust=trust)
    if isinstance(source, Mapping):
        ck = Checkpoint.from_mapping(source)
        if not ck.sections and not ck.optimizer_sections:
            raise NoTensorsError("the mapping given holds no tensors")
        return ck
    raise TypeError(f"expected a path, a Checkpoint or a mapping of tensors, got {type(source).__name__}")
