"""Reader for DeepSpeed checkpoint folders (``engine.save_checkpoint``; Lightning's DeepSpeedStrategy writes the
same under ``<name>.ckpt/checkpoint/``), laid out as docs/deepspeed-layout.md describes. Opening finds the tag
folder and unpickles only the rank-0 model-states file; it offers ``module`` (stage 0-2: the weights as the engine
held them, zero-copy views of that file) and ``fp32`` (wherever ZeRO optimizer partitions exist: the state dict that
``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` returns, listed from the model file's names and shapes).
The optimizer files (and, for ZeRO-3 frozen parameters, the other ranks' model files) are parsed on the first read
that needs them, once per checkpoint and thread-safely, and validated as zero_to_fp32 validates them. DeepSpeed's
own pickled classes become inert records; nothing a file names is imported or called."""

from __future__ import annotations

import bisect
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from .layout import HUB_FILES, INDEX_SUFFIXES
from .mapped import file_stamp, materialize
from .raw import RawCheckpoint
from .records import LazyRecord, TensorRef, TensorTable, dtype_name

# The classes DeepSpeed pickles into its optimizer files; read as inert records, they do not make a file unsafe.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 runs
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
# Top-level keys of a model-states file that DeepSpeed itself writes (the rest is client state, e.g. Lightning's).
DEEPSPEED_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "csr_tensor_module_names", "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
    "checkpoint_parallel_dimensions", "ds_config", "ds_version",
})
MODEL = re.compile(r"^(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_00_model_states\.pt$")
OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_00_optim_states\.pt$")
MAX_LATEST_BYTES = 4096
NCCL_ALIGN = 2  # stage_1_and_2.py pads each flat group to a multiple of 2 * world size
SHOWN = 5


def read_deepspeed(path: str) -> RawCheckpoint:
    """The structure of the DeepSpeed checkpoint at ``path`` (its save folder or its tag folder).

    Table columns: ``file`` is the file holding a tensor, relative to ``path``; for the consolidated parameters of
    ``fp32``, rank 0's optimizer file (the other ranks' files hold the rest of the slices). ``device`` is the saved
    location; for consolidated parameters, that of the parameter in the model file (the optimizer's partitions
    are not read at open; with ZeRO-Offload they lived on the CPU).
    """
    location = os.path.abspath(path)
    tag_dir, tag, warnings = _tag_dir(location)
    model_names, optim_names, other = _tag_files(tag_dir)
    stage3 = "zero_pp_rank_0_mp_rank_00_model_states.pt" in model_names
    first = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage3 else "mp_rank_00_model_states.pt"
    if first not in model_names:
        found = ", ".join(sorted(model_names)[:SHOWN]) or "none"
        raise CheckpointNotFoundError(
            f"{tag_dir}: a DeepSpeed tag folder without its rank-0 model-states file (mp_rank_00_model_states.pt or "
            f"zero_pp_rank_0_mp_rank_00_model_states.pt; model-states files found: {found}). That file holds the "
            "parameter names, shapes and (below ZeRO-3) the weights; copy it from where the checkpoint was saved."
        )
    raw0 = _read_model_file(os.path.join(tag_dir, first))
    root = raw0.root
    ws = _int(root.get("dp_world_size"), 1)
    label = _labeller(location)
    info = _Info(location, tag_dir, tag, root, stage3, ws, label)
    files = [os.path.join(tag_dir, n) for n in model_names + optim_names]
    warnings += _file_warnings(info, model_names, optim_names, other)
    sections, optimizers, notes = _sections(info, raw0, model_names, optim_names)
    meta = _metadata(info, model_names, optim_names, notes)
    if stage3:
        warnings.append(
            f"ZeRO-3 model files hold no weights (empty placeholders with the names and shapes); section 'fp32' is "
            f"consolidated from the {ws} optimizer partition(s) as DeepSpeed's zero_to_fp32.py does "
            f"({dtype_name(info.master_dtype())} master weights), read from those files when a value is asked for."
        )
    info.raw = RawCheckpoint(
        format="deepspeed", root=root, unsafe=raw0.unsafe - DEEPSPEED_GLOBALS, source=raw0.source,
        storages=raw0.storages, limits=raw0.limits, files=files, sections=sections, optimizers=optimizers,
        extra_metadata=meta, location=location, warnings=warnings,
    )
    return info.raw


# ---------------------------------------------------------------- finding the tag and its files
def _natural(name: str) -> list:
    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", name)]


def _listdir(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder), key=_natural)
    except OSError as e:
        raise CheckpointNotFoundError(f"{folder}: cannot list the folder ({e}).") from None


def _is_tag_dir(names: list[str]) -> bool:
    return any(n.endswith(("_model_states.pt", "_optim_states.pt")) for n in names)


def _tag_dir(folder: str) -> tuple[str, str, list[str]]:
    """(the tag folder, its tag, warnings) for ``folder``: itself when it holds the files, else the tag its
    ``latest`` names, else its newest ``global_stepN``."""
    if _is_tag_dir(_listdir(folder)):
        return folder, os.path.basename(folder), []
    latest = os.path.join(folder, "latest")
    if os.path.isfile(latest):
        tag = _read_latest(latest)
        where = os.path.join(folder, tag)
        if os.path.isdir(where) and _is_tag_dir(_listdir(where)):
            return where, tag, []
        what = "holds no DeepSpeed files" if os.path.isdir(where) else "does not exist"
        shown = ", ".join(_tags(folder)[-SHOWN:]) or "none"
        raise CheckpointNotFoundError(
            f"{latest}: names the tag {tag!r}, but the folder {where} {what} (tag folders here: {shown}). The save "
            "did not finish or the folder was moved or deleted; open one of the tag folders by its path instead."
        )
    steps = sorted((t for t in _tags(folder) if re.fullmatch(r"global_step\d+", t)), key=lambda t: int(t[11:]))
    if not steps:
        raise CheckpointNotFoundError(f"{folder}: no DeepSpeed 'latest' file and no global_stepN tag folder in it.")
    notes = [f"no 'latest' file: opened the newest tag {steps[-1]} (also here: {', '.join(steps[:-1])})"]
    return os.path.join(folder, steps[-1]), steps[-1], notes if len(steps) > 1 else []


def _tags(folder: str) -> list[str]:
    """The sub-folders of ``folder`` that hold DeepSpeed files."""
    return [n for n in _listdir(folder)
            if os.path.isdir(os.path.join(folder, n)) and _is_tag_dir(_listdir(os.path.join(folder, n)))]


def _read_latest(latest: str) -> str:
    if os.path.getsize(latest) > MAX_LATEST_BYTES:
        raise CorruptCheckpointError(f"{latest}: larger than {MAX_LATEST_BYTES} bytes; DeepSpeed writes only a tag "
                                     "name there.")
    with open(latest, encoding="utf-8", errors="replace") as f:
        tag = f.read().strip()
    if not tag or "/" in tag or "\\" in tag or "\0" in tag or tag in (".", ".."):
        raise CorruptCheckpointError(f"{latest}: names the tag {tag!r}, which is not a folder name beside it; "
                                     "refusing to follow it. Open the tag folder by its path.")
    return tag


def _tag_files(tag_dir: str) -> tuple[list[str], list[str], list[str]]:
    """(rank-ordered model-states names, rank-ordered optimizer-states names, other .pt files) of the tag."""
    model, optim, other = [], [], []
    for n in _listdir(tag_dir):
        if MODEL.match(n):
            model.append(n)
        elif OPTIM.match(n):
            optim.append(n)
        elif n.endswith(("_model_states.pt", "_optim_states.pt")):
            other.append(n)
    return model, optim, other


def _file_warnings(info: _Info, model: list[str], optim: list[str], other: list[str]) -> list[str]:
    out = []
    if other:
        out.append(f"{len(other)} file(s) of other tensor-parallel or expert ranks were not read (not covered): "
                   f"{', '.join(other[:SHOWN])}{' ...' if len(other) > SHOWN else ''}")
    if info.zero and (optim or info.stage3):
        missing = [n for n in info.optim_names(optim) if n not in optim]
        if info.stage3:
            missing += [n for n in info.model_names() if n not in model]
        if missing:
            out.append(f"{len(missing)} file(s) of the {info.ws} ranks are missing: {', '.join(missing[:SHOWN])}; "
                       "section 'fp32' cannot be read without them")
    if info.location != info.tag_dir:
        beside = [n for n in _listdir(info.location) if n in HUB_FILES or n.endswith(INDEX_SUFFIXES)]
        if beside:
            out.append(f"the folder also holds {beside[0]} (weights saved beside the DeepSpeed state, e.g. by a "
                       "trainer); open it by its path to read those instead")
    return out


def _labeller(location: str) -> Callable[[str], str]:
    return lambda path: os.path.relpath(path, location)


def _int(v: Any, default: int) -> int:
    return v if type(v) is int else default


class _Info:
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


# ---------------------------------------------------------------- model-states files
def _read_model_file(path: str) -> RawCheckpoint:
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


def _refs(path: str, obj: Any, what: str) -> Mapping[str, TensorRef]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, TensorRef) for v in obj.values()):
        raise CorruptCheckpointError(f"{path}: '{what}' is not a dict of tensors.")
    return obj


def _shapes(path: str, obj: Any, what: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) pairs of one ``param_shapes`` group or of ``frozen_param_shapes``."""
    ok = isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(s, tuple) and all(type(d) is int and d >= 0 for d in s)
        for k, s in obj.items())
    if not ok:
        raise CorruptCheckpointError(f"{path}: '{what}' is not a dict of parameter name -> shape.")
    return list(obj.items())


# ---------------------------------------------------------------- sections
def _sections(info: _Info, raw0: RawCheckpoint, model_names: list[str], optim_names: list[str]):
    """({name: TensorTable}, {name: optimizer state}, {section: what it is}) of the checkpoint."""
    root, model_path = info.root, raw0.source.path
    module = {k: v for k, v in root["module"].items() if isinstance(v, TensorRef)}
    sections, optimizers, notes = {}, {}, {}
    if not info.stage3:
        from ..checkpoint import check_extents

        sections["module"] = TensorTable.from_refs(module, info.label(model_path))
        check_extents(model_path, sections)
        notes["module"] = (f"the weights as the engine held them (training dtype), straight from "
                           f"{info.label(model_path)}")
    else:
        notes["module"] = "not offered: ZeRO-3 model files hold empty (0,) placeholders, not the weights"
    if not info.zero:
        from ..sections import find_sections

        optimizers = find_sections({"optimizer": root.get("optimizer")})[1]
        if optimizers:
            notes["optimizer"] = (f"{', '.join(optimizers)}: the torch optimizer's state_dict (ZeRO disabled); "
                                  "ckptviz.load_optimizer restores it")
        return sections, optimizers, notes
    if not optim_names and not info.stage3:
        notes["fp32"] = "not offered: the tag folder holds no optimizer files ('module' holds the weights)"
    else:
        sections["fp32"] = _fp32_table(info, raw0, module, optim_names, model_names)
        notes["fp32"] = (f"the {dtype_name(info.master_dtype())} master weights consolidated from the {info.ws} "
                         "optimizer partition(s) as zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint does "
                         "(same keys, order and dtypes); the optimizer files are read on first use")
        if info.stage() == 1 and root.get("frozen_param_shapes") is None:
            notes["fp32"] += "; at ZeRO-1 frozen parameters are saved only in 'module', so 'fp32' lacks them"
    notes["optimizer"] = ("ZeRO optimizer partitions (moments over flat fp32 partitions) are not offered as "
                          "optimizer sections: a torch optimizer cannot load them")
    return sections, optimizers, notes


def _fp32_table(info: _Info, raw0: RawCheckpoint, module: dict[str, TensorRef], optim_names: list[str],
                model_names: list[str]) -> TensorTable:
    """The zero_to_fp32 state dict as a table: buffers, frozen parameters, trainable ones, tied aliases."""
    root, model_path = info.root, raw0.source.path
    buffer_names = root.get("buffer_names")
    if not isinstance(buffer_names, list):
        raise CorruptCheckpointError(f"{model_path}: 'buffer_names' is not a list of names.")
    wanted = set(buffer_names)
    buffers = [k for k in module if k in wanted]
    frozen = _shapes(model_path, root.get("frozen_param_shapes") or {}, "frozen_param_shapes")
    fragments = _refs(model_path, root.get("frozen_param_fragments") or {}, "frozen_param_fragments")
    lacking = [n for n, _ in frozen if n not in fragments]
    if lacking:
        raise CorruptCheckpointError(f"{model_path}: frozen parameter {lacking[0]!r} has no frozen_param_fragments "
                                     "entry.")
    groups = root.get("param_shapes")
    if not isinstance(groups, list):
        raise CorruptCheckpointError(f"{model_path}: 'param_shapes' is not a list of groups.")
    groups = [_shapes(model_path, g, f"param_shapes[{i}]") for i, g in enumerate(groups)]
    if info.stage3:  # zero_to_fp32 merges the sub-groups into one dict
        groups = [list({k: s for g in groups for k, s in g}.items())]
    trainable = [item for g in groups for item in g]
    parts = _Partitions(info, optim_names, [len(g) for g in groups], [s for _, s in trainable])
    ranks = _ModelRanks(info, model_names) if info.stage3 else None
    opt_path = os.path.join(info.tag_dir, info.optim_names(optim_names)[0])
    master = info.master_dtype()

    def buffer(j: int) -> Any:
        ref = module[buffers[j]]
        if not ref.dtype.is_floating_point or ref.dtype == torch.float32:
            return ref
        return _Lazy(ref.shape, torch.float32, ref.device, model_path, lambda maps: _view(ref, maps).float())

    def frozen_value(j: int) -> Any:
        name, shape = frozen[j]
        if ranks is None:
            return fragments[name]
        ref = fragments[name]
        return _Lazy(shape, ref.dtype, ref.device, model_path, lambda maps: ranks.frozen(name, shape, maps))

    def param(j: int) -> Any:
        name, shape = trainable[j]
        device = module[name].device if name in module else "cpu"
        return _Lazy(shape, master, device, opt_path, lambda maps: parts.param(j, shape, maps))

    def frozen_shape(name: str, shape: tuple) -> tuple:
        return shape if ranks is not None else fragments[name].shape

    keys = buffers + [n for n, _ in frozen] + [n for n, _ in trainable]
    shape = ([module[k].shape for k in buffers] + [frozen_shape(n, s) for n, s in frozen]
             + [s for _, s in trainable])
    dtype = ([torch.float32 if module[k].dtype.is_floating_point else module[k].dtype for k in buffers]
             + [fragments[n].dtype for n, _ in frozen] + [master] * len(trainable))
    device = ([module[k].device for k in buffers] + [fragments[n].device for n, _ in frozen]
              + [module[n].device if n in module else "cpu" for n, _ in trainable])
    makers = [(len(buffers), buffer), (len(frozen), frozen_value), (len(trainable), param)]
    shared = root.get("shared_params") or {}
    if not isinstance(shared, Mapping):
        raise CorruptCheckpointError(f"{model_path}: 'shared_params' is not a dict of alias -> parameter name.")
    return _table(keys, shape, dtype, device, makers, shared, info.label(model_path), info.label(opt_path),
                  len(buffers) + len(frozen))


def _table(keys: list[str], shape: list, dtype: list, device: list, makers: list, shared: Mapping,
           model_label: str, opt_label: str, n_model: int) -> TensorTable:
    """One table over rows from several makers (in order), with zero_to_fp32's dict semantics: a key seen
    again keeps its first position and takes the later value; tied aliases point at their owner's row."""
    src = list(range(len(keys)))
    index = dict(zip(keys, src))
    if len(index) != len(keys):  # a name twice: the later value wins, at the first position
        last = dict(zip(keys, src))
        keys = list(last)
        src = [last[k] for k in keys]
        index = dict(zip(keys, range(len(keys))))
    for alias, owner in shared.items():
        if owner in index:
            if alias in index:
                src[index[alias]] = src[index[owner]]
            else:
                index[alias] = len(keys)
                keys.append(alias)
                src.append(src[index[owner]])
    starts = np.cumsum([0] + [n for n, _ in makers]).tolist()
    file = [model_label if s < n_model else opt_label for s in src]

    def make(i: int) -> Any:
        s = src[i]
        k = bisect.bisect_right(starts, s) - 1
        return makers[k][1](s - starts[k])

    def pick(col: list) -> list:
        return [col[s] for s in src]

    return TensorTable(keys, pick(shape), pick(dtype), pick(device), file, make)


class _Lazy(LazyRecord):
    """A tensor whose value ``fn(maps)`` computes from one or more files."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device: str, path: str, fn: Callable[[dict], torch.Tensor]):
        self.shape, self.dtype, self.device, self.path, self._fn = tuple(shape), dtype, device, path, fn

    def read(self, maps: dict[int, Any]) -> torch.Tensor:
        return self._fn(maps)


def _view(ref: TensorRef, maps: dict[Any, Any]) -> torch.Tensor:
    """``ref``'s tensor over the caller's shared map of its file (no copy)."""
    src = ref.storage.source
    if id(src) not in maps:
        maps[id(src)] = src.map()
    return materialize(ref, maps[id(src)])


def _flat(ref: TensorRef, maps: dict[Any, Any]) -> torch.Tensor:
    """A flat partition's tensor, made once per read call (``maps`` lives as long as the call)."""
    key = ("deepspeed-flat", id(ref))
    t = maps.get(key)
    if t is None:
        t = maps[key] = _view(ref, maps)
    return t


def _pieces(segments: list[tuple[TensorRef, int, int]], shape: tuple, maps: dict) -> torch.Tensor:
    """The elements of ``segments`` (flat tensor, start, length) back to back, as ``shape``: a view of the
    file when one segment holds them all, else a copy."""
    views = [_flat(ref, maps).narrow(0, start, n) for ref, start, n in segments]
    if not views:
        return torch.empty(shape, dtype=torch.float32)
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


def _require(info: _Info, path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(
            f"{path}: missing. It is {what} of the {info.ws} data-parallel ranks, needed to rebuild section 'fp32'; "
            "the save did not finish on every rank or the file was not copied. Copy it from where the checkpoint "
            "was saved" + (" ('module' holds the weights without it)." if not info.stage3 else ".")
        )


def _open_rank_file(info: _Info, name: str, stamp: tuple | None, what: str) -> RawCheckpoint:
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


class _Partitions:
    """The flat fp32 partitions of every rank's optimizer file, parsed and validated on first use."""

    def __init__(self, info: _Info, names: list[str], group_sizes: list[int], shapes: list[tuple]):
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


class _ModelRanks:
    """The other ranks' ZeRO-3 model-states files (their frozen-parameter fragments), parsed on first use."""

    def __init__(self, info: _Info, found: list[str]):
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


# ---------------------------------------------------------------- metadata
def _metadata(info: _Info, model_names: list[str], optim_names: list[str], notes: dict[str, str]) -> dict:
    from ..sections import metadata, plain
    from .hub import folder_metadata

    root = info.root
    ds = {
        "version": root.get("ds_version"),
        "zero_stage": info.stage(),
        "dp_world_size": info.ws,
        "mp_world_size": root.get("mp_world_size"),
        "global_steps": root.get("global_steps"),
        "global_samples": root.get("global_samples"),
        "skipped_steps": root.get("skipped_steps"),
        "tag": info.tag,
        "model_files": [info.label(os.path.join(info.tag_dir, n)) for n in model_names],
        "optimizer_files": [info.label(os.path.join(info.tag_dir, n)) for n in optim_names],
        "dtype": _training_dtype(info),
        "ds_config": plain(root.get("ds_config")),
        "sections": notes,
    }
    if root.get("lr_scheduler") is not None:
        ds["lr_scheduler"] = plain(root["lr_scheduler"])
    return {"deepspeed": ds, **metadata(root, set(DEEPSPEED_KEYS)), **folder_metadata(info.location)}


def _training_dtype(info: _Info) -> str | None:
    """The dtype the parameters were trained in (that of ``module``'s parameters)."""
    module = info.root["module"]
    names = [n for g in info.root.get("param_shapes") or [] if isinstance(g, Mapping) for n in g]
    for name in names or module:
        v = module.get(name)
        if isinstance(v, TensorRef) and v.dtype.is_floating_point:
            return dtype_name(v.dtype)
    return None
