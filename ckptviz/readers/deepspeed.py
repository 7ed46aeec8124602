"""Reader for DeepSpeed checkpoint folders (``engine.save_checkpoint``; Lightning's DeepSpeedStrategy writes the
same under ``<name>.ckpt/checkpoint/``), laid out as docs/deepspeed-layout.md describes. Opening finds the tag
folder and unpickles only the rank-0 model-states file; it offers ``module`` (stage 0-2: the weights as the engine
held them, zero-copy views of that file) and ``fp32`` (wherever ZeRO optimizer partitions exist: the state dict that
``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` returns, listed from the model file's names and shapes).
The optimizer files (and, for ZeRO-3 frozen parameters, the other ranks' model files) are parsed on the first read
that needs them (``deepspeed_zero``). DeepSpeed's own pickled classes become inert records; nothing a file names
is imported or called."""

from __future__ import annotations

import bisect
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from .deepspeed_zero import (
    DEEPSPEED_GLOBALS,
    ModelRanks,
    Partitions,
    RunInfo,
    ZeroRecord,
    int_or,
    read_model_file,
    view_of,
)
from .layout import HUB_FILES, INDEX_SUFFIXES
from .limits import LimitExceeded, check_numel, limit_error
from .raw import RawCheckpoint
from .records import TensorRef, TensorTable, dtype_name

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
    raw0 = read_model_file(os.path.join(tag_dir, first))
    root = raw0.root
    ws = int_or(root.get("dp_world_size"), 1)
    label = _labeller(location)
    info = RunInfo(location, tag_dir, tag, root, stage3, ws, label)
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


def _file_warnings(info: RunInfo, model: list[str], optim: list[str], other: list[str]) -> list[str]:
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


# ---------------------------------------------------------------- model-states files
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
    try:
        for name, shape in obj.items():
            check_numel(shape, math.prod(shape), f"{what}[{name!r}]")
    except LimitExceeded as e:
        raise limit_error(path, e) from None
    return list(obj.items())


# ---------------------------------------------------------------- sections
def _sections(info: RunInfo, raw0: RawCheckpoint, model_names: list[str], optim_names: list[str]):
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


def _fp32_table(info: RunInfo, raw0: RawCheckpoint, module: dict[str, TensorRef], optim_names: list[str],
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
    parts = Partitions(info, optim_names, [len(g) for g in groups], [s for _, s in trainable])
    ranks = ModelRanks(info, model_names) if info.stage3 else None
    opt_path = os.path.join(info.tag_dir, info.optim_names(optim_names)[0])
    master = info.master_dtype()

    def buffer(j: int) -> Any:
        ref = module[buffers[j]]
        if not ref.dtype.is_floating_point or ref.dtype == torch.float32:
            return ref
        return ZeroRecord(ref.shape, torch.float32, ref.device, model_path, lambda maps: view_of(ref, maps).float())

    def frozen_value(j: int) -> Any:
        name, shape = frozen[j]
        if ranks is None:
            return fragments[name]
        ref = fragments[name]
        return ZeroRecord(shape, ref.dtype, ref.device, model_path, lambda maps: ranks.frozen(name, shape, maps))

    def param(j: int) -> Any:
        name, shape = trainable[j]
        device = module[name].device if name in module else "cpu"
        return ZeroRecord(shape, master, device, opt_path, lambda maps: parts.param(j, shape, maps))

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


# ---------------------------------------------------------------- metadata
def _metadata(info: RunInfo, model_names: list[str], optim_names: list[str], notes: dict[str, str]) -> dict:
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


def _training_dtype(info: RunInfo) -> str | None:
    """The dtype the parameters were trained in (that of ``module``'s parameters)."""
    module = info.root["module"]
    names = [n for g in info.root.get("param_shapes") or [] if isinstance(g, Mapping) for n in g]
    for name in names or module:
        v = module.get(name)
        if isinstance(v, TensorRef) and v.dtype.is_floating_point:
            return dtype_name(v.dtype)
    return None
