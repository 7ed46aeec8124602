"""``open_checkpoint()`` and the lazy :class:`Checkpoint` handle: sniff the container, read its
structure safely, find and rank its sections, and hand out tensors only when asked for."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import CorruptCheckpointError, NoTensorsError, SectionError, UnsafeCheckpointError
from .readers import RawCheckpoint, read
from .readers.mapped import materialize
from .readers.pickle_reader import OpaqueTensor, Stub, TensorRef, _element_size
from .sections import find_sections, is_tensor, metadata, rank

TENSOR_COLUMNS = ["shape", "dtype", "device", "numel", "nbytes"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_info(v: TensorRef | torch.Tensor) -> tuple[tuple[int, ...], str, str, int, int]:
    """(shape, dtype, device, numel, nbytes) of a lazy or real tensor, without reading values."""
    if isinstance(v, TensorRef):
        return v.shape, dtype_name(v.dtype), v.device, v.numel, v.nbytes
    return tuple(v.shape), dtype_name(v.dtype), str(v.device), v.numel(), v.numel() * v.element_size()


class Checkpoint:
    """A lazily read checkpoint: its format, sections, metadata and tensors.

    Listing tensors reads no tensor data; ``state_dict()`` returns tensors backed by a private
    memory map of the file, so only what is touched is read, and nothing is ever written back.
    """

    def __init__(self, path: str | None, format: str, root: Any, raw: RawCheckpoint | None = None,
                 extra_metadata: dict | None = None):
        self.path = path
        self.format = format
        self._raw = raw
        self._root = root
        weights, optimizers = find_sections(root)
        self._weights = {name: weights[name] for name in rank(weights)}
        self._optimizers = optimizers
        taken = {name.split(".", 1)[0] for name in (*weights, *optimizers)}
        self.metadata: dict[str, Any] = {**metadata(root, taken), **(extra_metadata or {})}
        self.unsafe_globals: list[str] = sorted(raw.unsafe) if raw is not None else []
        self._stats: dict[str, tuple] = {}

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
    def nbytes(self) -> int:
        return os.path.getsize(self.path) if self.path and os.path.isfile(self.path) else 0

    def _section(self, section: str | None) -> dict[str, TensorRef | torch.Tensor]:
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
    def tensors(self, section: str | None = None) -> pd.DataFrame:
        """One row per tensor: shape, dtype, device (where it was saved), numel, nbytes. Reads no data."""
        entries = self._section(section)
        rows = [tensor_info(v) for v in entries.values()]
        cols = list(zip(*rows)) if rows else [()] * len(TENSOR_COLUMNS)
        data = {c: np.array(v, dtype=np.int64) if c in ("numel", "nbytes") else list(v)
                for c, v in zip(TENSOR_COLUMNS, cols)}
        return pd.DataFrame(data, index=pd.Index(list(entries), name="key"))

    def tensor(self, key: str, section: str | None = None) -> torch.Tensor:
        """The value of one tensor, on the CPU (memory-mapped where the container allows)."""
        entries = self._section(section)
        if key not in entries:
            raise SectionError(f"{self.path}: no tensor {key!r} in section {self.resolve(section)!r}")
        return self._value(entries[key])

    def state_dict(self, section: str | None = None) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for a section; tensors are views of a private map of the file."""
        entries = self._section(section)
        whole = self._map() if any(isinstance(v, TensorRef) for v in entries.values()) else None
        return {k: self._value(v, whole) for k, v in entries.items()}

    def stats(self, section: str | None = None, *, progress: bool | None = None) -> pd.DataFrame:
        """Statistics of every tensor (``ckptviz.stats.STATS_KEYS``), one streaming pass each, cached."""
        from .stats import stats_frame

        name = self.resolve(section)
        stamp = _file_stamp(self.path)
        cached = self._stats.get(name)
        if cached is None or cached[0] != stamp or stamp is None:
            cached = self._stats[name] = (stamp, stats_frame(self.state_dict(name), progress=progress))
        return cached[1].copy()

    def histogram(self, key: str, bins: int = 64, range: tuple[float, float] | None = None, *,
                  section: str | None = None):
        """Histogram of one tensor's finite values (NaN/Inf counted apart), cached per file and key."""
        from .stats import CACHE

        name = self.resolve(section)
        self._section(name)
        return CACHE.summarize(self.path, name, key, lambda: self.tensor(key, name), bins, range=range)[1]

    def _map(self) -> torch.UntypedStorage | None:
        try:
            return self._raw.source.map() if self._raw is not None and self._raw.source.size else None
        except RuntimeError as e:
            raise CorruptCheckpointError(f"{self.path}: could not map the file ({e}).") from None

    def _value(self, v: TensorRef | torch.Tensor, whole: torch.UntypedStorage | None = None) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return v
        try:
            return materialize(v, self._raw.source, whole if whole is not None else self._map())
        except (RuntimeError, OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{self.path}: could not read a tensor's bytes ({e}).") from None

    def materialize(self, obj: Any) -> Any:
        """A deep copy of ``obj`` (part of this checkpoint's tree) with real, owned tensors."""
        if is_tensor(obj):
            return self._value(obj).clone()
        if isinstance(obj, Stub):
            return {k: self.materialize(v) for k, v in obj.attributes().items()}
        if isinstance(obj, Mapping):
            return {k: self.materialize(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.materialize(v) for v in obj)
        return obj

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
            f"<td>{human_size(sum(tensor_info(v)[4] for v in self._weights[s].values()))}</td></tr>"
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


def _file_stamp(path: str | None) -> tuple | None:
    try:
        st = os.stat(path) if path else None
    except (OSError, ValueError):
        return None
    return (st.st_mtime_ns, st.st_size) if st else None


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


def _check_extents(path: str, ck: Checkpoint) -> None:
    """Every tensor must fit inside its storage, so that reading it can never fault."""
    for section, entries in ck._weights.items():
        for key, v in entries.items():
            if not isinstance(v, TensorRef) or v.storage is None or v.numel == 0:
                continue
            last = v.offset + sum((s - 1) * st for s, st in zip(v.shape, v.stride))
            if min(v.stride, default=0) < 0 or (last + 1) * _element_size(v.dtype) > v.storage.nbytes:
                raise CorruptCheckpointError(
                    f"{path}: tensor {key!r} (section {section!r}) claims more bytes than its storage holds; "
                    "the file is corrupted."
                )


def open_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Checkpoint:
    """Open a checkpoint lazily and safely.

    Nothing from the file is imported or called. A file whose pickle names globals beyond torch's
    ``weights_only`` allowlist raises :class:`UnsafeCheckpointError` listing all of them, unless
    ``trust=True``; even then ckptviz only reads tensors and plain data, it builds no foreign object.
    """
    path = os.fspath(path)
    raw = read(path)
    if raw.unsafe and not trust:
        raise UnsafeCheckpointError(path, raw.unsafe)
    damaged = raw.damaged_storages()
    if damaged:
        shown = "; ".join(damaged[:3]) + (f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else "")
        raise CorruptCheckpointError(f"{path}: the file is truncated or corrupted: {shown}. Re-download or re-save it.")
    ck = Checkpoint(path, raw.format, raw.root, raw, raw.extra_metadata)
    if not ck.sections and not ck.optimizer_sections:
        opaque = isinstance(raw.root, OpaqueTensor)
        found = type(raw.root).__name__ if not isinstance(raw.root, Stub) else raw.root._ckptviz_global
        raise NoTensorsError(
            f"{path}: the file holds no tensors a model could load (found a {found}"
            f"{' of a tensor kind ckptviz does not unpack' if opaque else ''}). "
            "Save the model's weights with torch.save(model.state_dict(), path)."
        )
    _check_extents(path, ck)
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
