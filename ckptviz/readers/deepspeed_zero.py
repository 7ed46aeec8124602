"""The ZeRO side of a DeepSpeed checkpoint: what the rank-0 model file says about the run (``RunInfo``), the
rank files behind a tag (model states and optimizer partitions), parsed on the first read that needs them, once
per checkpoint and thread-safely, and validated as ``zero_to_fp32.py`` validates them; and where each parameter's
fp32 master lies in the ranks' flat groups (a zero-copy view inside one partition, pieces copied otherwise).
DeepSpeed's own pickled classes become inert records; nothing a file names is imported or called."""

from __future__ import annotations

import bisect
import math
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from .mapped import copying, file_stamp, read_elements, read_tensor
from .raw import RawCheckpoint
from .records import LazyRecord, TensorRef, dtype_name

# The classes DeepSpeed pickles into its optimizer files; read as inert records, they do not make a file unsafe.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 runs
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
NCCL_ALIGN = 2  # stage_1_and_2.py pads each flat group to a multiple of 2 * world size
SHOWN = 5


def int_or(v: Any, default: int) -> int:
    return v if type(v) is int else default


class RunInfo:
    """What the rank-0 model file says about the checkpoint, and where its files are."""

    def __init__(self, location: str, tag_dir: str, tag: str, root: Mapping, stage3: bool, ws: int,
                 label: Callable[[str], str]):
        self.location, self.tag_dir, self.tag, self.root = location, tag_dir, tag, root
        self.stage3, self.ws = stage3, ws
        self.save_dir = os.path.dirname(tag_dir)
        self.label = label
        self.zero = stage3 or root.get("param_shapes") is not None
        cfg = root.get("ds_config")
        self.config = cfg if isinstance(cfg, Mapping) else {}
        self.raw: RawCheckpoint | None = None  # set once built: its ``trust`` says whether the user passed trust=True

    def trust(self) -> bool:
        return bool(self.raw is not None and self.raw.trust)

    def model_names(self) -> list[str]:
        return [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self.ws)]

    def optim_names(self, found: list[str]) -> list[str]:
        bf16 = any(n.startswith("bf16_") for n in found) if found else _enabled(self.config.get("bf16"))
        return [f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(self.ws)]

    def stage(self) -> int | None:
        if self.stage3:
            return 3
        if not self.zero:
            return 0
        stage = (self.config.get("zero_optimization") or {}).get("stage")
        return stage if stage in (1, 2) else None

    def master_dtype(self) -> torch.dtype:
        """The dtype of the optimizer's master weights: fp32 unless ds_config asks for bf16/fp16 masters."""
        for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            cfg = self.config.get(key)
            if isinstance(cfg, Mapping) and cfg.get(f"{key}_master_weights_and_grads"):
                return dtype
        return torch.float32


def _enabled(cfg: Any) -> bool:
    return isinstance(cfg, Mapping) and bool(cfg.get("enabled"))


def read_model_file(path: str) -> RawCheckpoint:
    from . import read_file

    raw = read_file(path)
    damaged = raw.damaged_storages()
    if damaged:
        raise CorruptCheckpointError(f"{path}: the file is truncated or corrupted: {damaged[0]}. Copy it again.")
    root = raw.root
    if not isinstance(root, Mapping) or not isinstance(root.get("module"), Mapping) or "buffer_names" not in root:
        raise CorruptCheckpointError(
            f"{path}: not a DeepSpeed model-states file (expected a dict with 'module' and 'buffer_names')."
        )
    return raw


def _check_unsafe(path: str, unsafe: set[str], trust: bool) -> None:
    extra = unsafe - DEEPSPEED_GLOBALS
    if extra and not trust:
        raise UnsafeCheckpointError(path, extra)


class ZeroRecord(LazyRecord):
    """A tensor whose value ``fn(reads)`` computes from one or more files (``reads``: a ``mapped.Reads``)."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device: str, path: str, fn: Callable[[dict], torch.Tensor]):
        self.shape, self.dtype, self.device, self.path, self._fn = tuple(shape), dtype, device, path, fn

    def read(self, maps: dict[int, Any]) -> torch.Tensor:
        return self._fn(maps)


def view_of(ref: TensorRef, maps: dict[Any, Any]) -> torch.Tensor:
    """``ref``'s tensor, read as ``maps`` (a ``mapped.Reads``) says: into memory of its own, or a view of
    its file's shared map."""
    return read_tensor(ref, copying(maps))


def _flat(ref: TensorRef, maps: dict[Any, Any]) -> torch.Tensor:
    """A flat partition's tensor as a view of its file's map, made once per read call."""
    key = ("deepspeed-flat", id(ref))
    t = maps.get(key)
    if t is None:
        t = maps[key] = read_tensor(ref, copy=False)
    return t


def _pieces(segments: list[tuple[TensorRef, int, int]], shape: tuple, maps: dict) -> torch.Tensor:
    """The elements of ``segments`` (flat tensor, start, length) back to back, as ``shape``. Copying reads
    (the default) read each segment's bytes straight into the result, and nothing else of the partition;
    zero-copy reads give a view of the file when one segment holds them all."""
    if not segments:
        return torch.empty(shape, dtype=torch.float32)
    if copying(maps):
        out = torch.empty(sum(n for _, _, n in segments), dtype=segments[0][0].dtype)
        at = 0
        for ref, start, n in segments:
            read_elements(ref, start, out[at : at + n])
            at += n
        return out.view(shape)
    views = [_flat(ref, maps).narrow(0, start, n) for ref, start, n in segments]
    flat = views[0] if len(views) == 1 else torch.cat(views)
    return flat.view(shape)


def _split(cum: list[int], refs: list[TensorRef], start: int, length: int) -> list[tuple[TensorRef, int, int]]:
    """The segments of ``length`` elements from ``start`` in the concatenation of ``refs`` (``cum``: their
    cumulative lengths, from 0)."""
    out = []
    k = bisect.bisect_right(cum, start) - 1
    while length > 0 and k < len(refs):
        local = start - cum[k]
        take = min(length, cum[k + 1] - start)
        if take > 0:
            out.append((refs[k], local, take))
            start, length = start + take, length - take
        k += 1
    return out


# ---------------------------------------------------------------- the optimizer partitions
class _Once:
    """A value computed on first use, once (thread-safe); a failure is raised again on the next use."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn, self._value, self._lock = fn, None, threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._value is None:
                self._value = self._fn()
            return self._value


def _stamps(folder: str, names: list[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for n in names:
        try:
            out[n] = file_stamp(os.path.join(folder, n))
        except OSError:
            pass
    return out


def _require(info: RunInfo, path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(
            f"{path}: missing. It is {what} of the {info.ws} data-parallel ranks, needed to rebuild section 'fp32'; "
            "the save did not finish on every rank or the file was not copied. Copy it from where the checkpoint "
            "was saved" + (" ('module' holds the weights without it)." if not info.stage3 else ".")
        )


def _open_rank_file(info: RunInfo, name: str, stamp: tuple | None, what: str) -> RawCheckpoint:
    """Read the structure of one rank's file, refusing it if it is missing, changed since open, or damaged."""
    from . import read_file

    path = os.path.join(info.tag_dir, name)
    _require(info, path, what)
    if stamp is not None and file_stamp(path) != stamp:
        raise CorruptCheckpointError(f"{path}: the file changed on disk since the checkpoint was opened; open it "
                                     "again.")
    raw = read_file(path)
    damaged = raw.damaged_storages()
    if damaged:
        raise CorruptCheckpointError(f"{path}: the file is truncated or corrupted: {damaged[0]}. Copy it again.")
    _check_unsafe(path, raw.unsafe, info.trust())
    return raw


class Partitions:
    """The flat fp32 partitions of every rank's optimizer file, parsed and validated on first use."""

    def __init__(self, info: RunInfo, names: list[str], group_sizes: list[int], shapes: list[tuple]):
        self.info = info
        self.names = info.optim_names(names)
        self.found = names
        self.stamps = _stamps(info.tag_dir, names)  # open checks the files exist, reading them waits
        self.group_sizes = group_sizes
        self.numel = np.array([math.prod(s) for s in shapes], dtype=np.int64)
        self.group_of = np.repeat(np.arange(len(group_sizes)), group_sizes)
        self.first_of = np.cumsum([0] + group_sizes)
        self._parsed = _Once(self._parse)

    def param(self, j: int, shape: tuple, maps: dict) -> torch.Tensor:
        return _pieces(self._parsed.get()(j), shape, maps)

    def _parse(self) -> Callable[[int], list]:
        info = self.info
        for r, name in enumerate(self.names):  # a missing rank first: the count check would not name it
            _require(info, os.path.join(info.tag_dir, name), f"the optimizer partition of rank {r}")
        states = [self._state(0)]
        ws = self._world_size(states[0])
        states += [self._state(r) for r in range(1, ws)]
        bf16_optimizer = "zero_stage" not in states[0][1]
        stages = {1} if bf16_optimizer else {_stage(s) for s in states}
        if len(stages) > 1 or (3 in stages) != info.stage3:
            raise CorruptCheckpointError(
                f"{info.tag_dir}: optimizer files of ZeRO stage(s) {sorted(stages)} beside the model-states files "
                f"of stage {'3' if info.stage3 else '1/2'}; the files come from different runs."
            )
        key = "fp32_flat_groups" if info.stage3 else "single_partition_of_fp32_groups"
        flats = [self._flats(path, osd, key) for path, osd in states]
        return self._stage3(states, flats) if info.stage3 else self._stage12(states, flats, bf16_optimizer)

    def _state(self, r: int) -> tuple[str, Mapping]:
        name = self.names[r]
        raw = _open_rank_file(self.info, name, self.stamps.get(name), f"the optimizer partition of rank {r}")
        osd = raw.root.get("optimizer_state_dict") if isinstance(raw.root, Mapping) else None
        path = raw.source.path
        if not isinstance(osd, Mapping):
            raise CorruptCheckpointError(f"{path}: not a DeepSpeed optimizer-states file (no 'optimizer_state_dict').")
        if "zero_stage" not in osd and "single_partition_of_fp32_groups" not in osd:
            raise CorruptCheckpointError(f"{path}: not a ZeRO checkpoint (its optimizer state has no 'zero_stage' "
                                         "and no fp32 partitions).")
        return path, osd

    def _world_size(self, state: tuple[str, Mapping]) -> int:
        path, osd = state
        count = osd.get("partition_count")
        counts = count if isinstance(count, list) else [count]
        if not counts or not all(type(c) is int and c > 0 for c in counts):
            raise CorruptCheckpointError(f"{path}: 'partition_count' is {count!r}, not a positive int or list.")
        ws = max(counts)
        if ws != len(self.found):
            raise CorruptCheckpointError(
                f"{self.info.tag_dir}: expected {ws} *_optim_states.pt files (the partition_count of "
                f"{os.path.basename(path)}) but found {len(self.found)}: {', '.join(self.found[:SHOWN])}. An old "
                "checkpoint was partly overwritten, or one or more ranks did not save."
            )
        if ws != self.info.ws:
            raise CorruptCheckpointError(f"{path}: partition_count {ws}, but the model-states file says "
                                         f"dp_world_size {self.info.ws}; the files come from different runs.")
        return ws

    def _flats(self, path: str, osd: Mapping, key: str) -> list[TensorRef]:
        flats = osd.get(key)
        dtype = self.info.master_dtype()
        if not isinstance(flats, list) or not all(isinstance(t, TensorRef) for t in flats):
            raise CorruptCheckpointError(f"{path}: '{key}' is not a list of tensors.")
        for g, t in enumerate(flats):
            if len(t.shape) != 1 or (t.numel > 1 and t.stride != (1,)) or t.offset + t.numel > t.storage.numel:
                raise CorruptCheckpointError(f"{path}: {key}[{g}] is not a flat tensor inside its storage.")
            if t.dtype != dtype:
                raise CorruptCheckpointError(f"{path}: {key}[{g}] holds {dtype_name(t.dtype)} where the ds_config "
                                             f"implies {dtype_name(dtype)} master weights.")
        return flats

    def _stage12(self, states: list, flats: list[list[TensorRef]], bf16_optimizer: bool) -> Callable[[int], list]:
        """ZeRO-1/2 (and BF16_Optimizer): each group is the ranks' lean partitions back to back."""
        path0, osd0 = states[0]
        n_groups = len(self.group_sizes)
        lengths = np.zeros((len(states), n_groups), dtype=np.int64)
        for r, ((path, osd), f) in enumerate(zip(states, flats)):
            if len(f) != n_groups:
                raise CorruptCheckpointError(f"{path}: {len(f)} fp32 partition group(s), but the model-states file "
                                             f"lists {n_groups} parameter group(s).")
            cut = _paddings(path, osd, n_groups) if bf16_optimizer else [0] * n_groups
            lengths[r] = [t.numel - c for t, c in zip(f, cut)]
        pads = osd0.get("param_alignment_paddings")
        offsets, starts = [], []
        for g in range(n_groups):
            n = self.numel[self.first_of[g]:self.first_of[g + 1]]
            pad = _alignment(path0, pads, g, len(n))
            ends = np.cumsum(n + pad)
            used, avail = int(ends[-1]) if len(n) else 0, int(lengths[:, g].sum())
            align = NCCL_ALIGN * len(states)
            last_end = int(ends[-1] - pad[-1]) if len(n) else 0
            if math.ceil(used / align) != math.ceil(avail / align) or last_end > avail:
                raise CorruptCheckpointError(f"{path0}: parameter group {g} needs {used} elements but the "
                                             f"{len(states)} partition(s) hold {avail}; the files do not belong "
                                             "together or one is damaged.")
            offsets.append((ends - n - pad).tolist())
            starts.append(np.concatenate([[0], np.cumsum(lengths[:, g])]).tolist())
        refs = [[f[g] for f in flats] for g in range(n_groups)]
        group_of, first_of, numel = self.group_of.tolist(), self.first_of.tolist(), self.numel.tolist()

        def segments(j: int) -> list:
            g = group_of[j]
            return _split(starts[g], refs[g], offsets[g][j - first_of[g]], numel[j])

        return segments

    def _stage3(self, states: list, flats: list[list[TensorRef]]) -> Callable[[int], list]:
        """ZeRO-3: every parameter is split over all ranks on its own; rank r holds its r-th slice."""
        ws = len(states)
        cums = [np.concatenate([[0], np.cumsum([t.numel for t in f])]) for f in flats]
        part = -(-self.numel // ws)
        off = np.concatenate([[0], np.cumsum(part)[:-1]]) if len(part) else part
        used = int(part.sum())
        for (path, _), cum in zip(states, cums):
            if int(cum[-1]) != used:
                raise CorruptCheckpointError(f"{path}: its fp32 partitions hold {int(cum[-1])} elements, but the "
                                             f"parameters need {used} per rank; the files do not belong together.")

        cums = [c.tolist() for c in cums]
        numel, part, off = self.numel.tolist(), part.tolist(), off.tolist()

        def segments(j: int) -> list:
            n, s, o = numel[j], part[j], off[j]
            out = []
            for r in range(ws):
                take = min(s, n - r * s)
                if take <= 0:
                    break
                out += _split(cums[r], flats[r], o, take)
            return out

        return segments


def _stage(state: tuple[str, Mapping]) -> int:
    path, osd = state
    v = osd.get("zero_stage")
    v = v.args[0] if hasattr(v, "args") and len(v.args) == 1 else v  # ZeroStageEnum(N), an inert record
    if type(v) is not int or v not in (1, 2, 3):
        raise CorruptCheckpointError(f"{path}: unknown ZeRO stage {v!r}.")
    return v


def _paddings(path: str, osd: Mapping, n_groups: int) -> list[int]:
    pads = osd.get("group_paddings")
    if not isinstance(pads, list) or len(pads) != n_groups or not all(type(p) is int and p >= 0 for p in pads):
        raise CorruptCheckpointError(f"{path}: 'group_paddings' is {pads!r}, not one int per group.")
    return pads


def _alignment(path: str, pads: Any, g: int, n: int) -> np.ndarray:
    if pads is None:
        return np.zeros(n, dtype=np.int64)
    row = pads[g] if isinstance(pads, list) and g < len(pads) else None
    if not isinstance(row, list) or len(row) != n or not all(type(p) is int and p >= 0 for p in row):
        raise CorruptCheckpointError(f"{path}: param_alignment_paddings[{g}] is not {n} non-negative ints (one per "
                                     "parameter of the group).")
    return np.array(row, dtype=np.int64)


class ModelRanks:
    """The other ranks' ZeRO-3 model-states files (their frozen-parameter fragments), parsed on first use."""

    def __init__(self, info: RunInfo, found: list[str]):
        self.info, self.names = info, info.model_names()
        self.stamps = _stamps(info.tag_dir, found)
        self._roots = _Once(self._parse)

    def _parse(self) -> list[Mapping]:
        roots = [self.info.root]
        for r in range(1, self.info.ws):
            raw = _open_rank_file(self.info, self.names[r], self.stamps.get(self.names[r]),
                                  f"the model-states file of rank {r}")
            path = raw.source.path
            if not isinstance(raw.root, Mapping) or "buffer_names" not in raw.root:
                raise CorruptCheckpointError(f"{path}: not a DeepSpeed model-states file.")
            roots.append(raw.root)
        return roots

    def frozen(self, name: str, shape: tuple, maps: dict) -> torch.Tensor:
        n = math.prod(shape)
        pieces = []
        for r, root in enumerate(self._roots.get()):
            frag = (root.get("frozen_param_fragments") or {}).get(name)
            if not isinstance(frag, TensorRef) or len(frag.shape) != 1:
                raise CorruptCheckpointError(f"{os.path.join(self.info.tag_dir, self.names[r])}: no flat fragment "
                                             f"of the frozen parameter {name!r}.")
            pieces.append((frag, 0, frag.numel))
        if sum(p[2] for p in pieces) < n:
            raise CorruptCheckpointError(f"{self.info.tag_dir}: the fragments of frozen parameter {name!r} hold fewer "
                                         f"than its {n} elements.")
        out, left = [], n
        for frag, _, k in pieces:
            if left > 0:
                out.append((frag, 0, min(k, left)))
                left -= k
        return _pieces(out, shape, maps)
