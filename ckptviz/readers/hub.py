"""Reader for hub folders: weights sharded over several safetensors or torch ``.bin`` files (as
transformers' ``save_pretrained`` and huggingface_hub's ``save_torch_state_dict`` write them), with or
without their ``*.index.json``. Each shard is read by its own file reader (headers only) into one
table over all shards; the index is checked against the shards, and the folder's JSON configs become
metadata."""

from __future__ import annotations

import json
import operator
import os

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, NoTensorsError
from .layout import SHARD, Layout
from .limits import LimitExceeded, limit_error
from .raw import RawCheckpoint
from .records import TensorTable
from .safetensors_reader import MAX_JSON_DEPTH, _max_depth

MAX_INDEX_BYTES = 256 << 20  # a shard index's size (500,000 tensors: ~40 MB)
MAX_INDEX_ENTRIES = 5_000_000  # tensors a shard index may name (10x the largest models of 2026)
MAX_CONFIG_BYTES = 16 << 20
CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")
SHOWN = 5


def read_hub(layout: Layout) -> RawCheckpoint:
    folder = layout.path
    weight_map, index_meta = _read_index(layout.index) if layout.index else (None, {})
    weight_map = _normalized(layout.index, weight_map) if weight_map is not None else None
    names = _shard_names(layout, weight_map)
    tables, unsafe, warnings = [], set(), list(layout.notes)
    for name in names:
        table, shard_unsafe = _read_shard(os.path.join(folder, name), name)
        tables.append(table)
        unsafe |= shard_unsafe
    table = TensorTable.concat(tables)
    if weight_map is not None:
        table = _check_against_index(layout.index, table, weight_map, warnings)
        warnings += _unindexed_shards(folder, layout.index, names)
    else:
        table = _drop_duplicates(table, warnings)
    if not len(table):
        raise NoTensorsError(f"{folder}: the shards hold no tensors.")
    safetensors = names[0].endswith(".safetensors")
    meta = folder_metadata(folder)
    meta["shards"] = len(names)
    if index_meta:
        meta["index"] = index_meta
    files = ([layout.index] if layout.index else []) + [os.path.join(folder, n) for n in names]
    return RawCheckpoint(
        format="hf-safetensors-sharded" if safetensors else "hf-bin-sharded", root=None, unsafe=unsafe, source=None,
        files=files, sections={"": table}, optimizers={}, extra_metadata=meta, location=folder, warnings=warnings,
    )


def folder_metadata(folder: str) -> dict:
    """The hub JSON configs in ``folder`` (``config.json``, ``generation_config.json``, ...), parsed."""
    meta = {}
    for name in CONFIG_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        key = name.removesuffix(".json")
        try:
            if os.path.getsize(path) > MAX_CONFIG_BYTES:
                raise ValueError(f"larger than {MAX_CONFIG_BYTES >> 20} MB")
            with open(path, "rb") as f:
                meta[key] = _json(f.read())
        except (OSError, ValueError, RecursionError) as e:
            meta[key] = f"<unreadable: {e}>"
    return meta


def _json(raw: bytes):
    """``raw`` parsed as JSON, refused (ValueError) when it nests deeper than MAX_JSON_DEPTH: deeper
    trees would make every later walk of the metadata recurse that deep (index and configs nest < 10)."""
    depth = _max_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"it nests {depth} levels deep, beyond the limit "
                         f"ckptviz.readers.safetensors_reader.MAX_JSON_DEPTH = {MAX_JSON_DEPTH}")
    return json.loads(raw)


def _read_index(index: str) -> tuple[dict[str, str], dict]:
    try:
        with open(index, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INDEX_BYTES:
                raise LimitExceeded(f"the index is {size:_} bytes", "ckptviz.readers.hub.MAX_INDEX_BYTES",
                                    MAX_INDEX_BYTES)
            raw = f.read(MAX_INDEX_BYTES + 1)
        if len(raw) > MAX_INDEX_BYTES:  # grew since fstat
            raise LimitExceeded("the index grew while read", "ckptviz.readers.hub.MAX_INDEX_BYTES", MAX_INDEX_BYTES)
        entries = raw.count(b":")  # an upper bound on the members of all its objects, counted at C speed
        if entries > MAX_INDEX_ENTRIES:
            raise LimitExceeded(f"the index names up to {entries:_} entries", "ckptviz.readers.hub.MAX_INDEX_ENTRIES",
                                MAX_INDEX_ENTRIES)
        data = _json(raw)
    except LimitExceeded as e:
        raise limit_error(index, e) from None
    except (OSError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{index}: the index is not readable JSON ({e}). Re-download it.") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(
            f"{index}: not a shard index (expected a JSON object with a 'weight_map' of tensor name -> shard file)."
        )
    meta = data.get("metadata")
    return weight_map, meta if isinstance(meta, dict) else {}


def _safe_name(index: str, name: str) -> str:
    """``name`` if it is a plain relative path inside the index's folder; refuse anything else."""
    parts = name.replace("\\", "/").split("/")
    if not name or "\0" in name or os.path.isabs(name) or name.startswith("/") or ".." in parts or ":" in parts[0]:
        raise CorruptCheckpointError(
            f"{index}: the index names the shard {name!r}, which points outside the checkpoint's folder; "
            "refusing to read it. Fix the index (shard names are plain file names beside it)."
        )
    return name


def _normalized(index: str, weight_map: dict[str, str]) -> dict[str, str]:
    """``weight_map`` with each shard name in its normal form (``./a//b`` -> ``a/b``, checked by
    ``_safe_name``), so that one file named under many spellings is one shard, read once."""
    spelled = {n: os.path.normpath(_safe_name(index, n)) for n in set(weight_map.values())}
    if all(map(operator.eq, spelled, spelled.values())):
        return weight_map
    return {k: spelled[v] for k, v in weight_map.items()}


def _shard_names(layout: Layout, weight_map: dict[str, str] | None) -> list[str]:
    folder = layout.path
    if weight_map is None:
        names = [os.path.basename(p) for p in layout.shards]
        _check_complete(folder, names)
        return names
    names = sorted({_safe_name(layout.index, n) for n in set(weight_map.values())})
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise CheckpointNotFoundError(
            f"{folder}: {len(missing)} of the {len(names)} shards that {os.path.basename(layout.index)} names are "
            f"missing: {', '.join(missing[:SHOWN])}{' ...' if len(missing) > SHOWN else ''}. The download or copy "
            "did not finish; fetch the missing shard files."
        )
    if not names:
        raise NoTensorsError(f"{layout.index}: the index names no shards.")
    return names


def _check_complete(folder: str, names: list[str]) -> None:
    m = SHARD.match(names[0])
    total = int(m["n"])
    have = {int(SHARD.match(n)["i"]) for n in names}
    lacking = [i for i in range(1, total + 1) if i not in have]
    if lacking:
        width = len(m["i"])
        shown = ", ".join(f"{m['stem']}-{i:0{width}d}-of-{m['n']}.{m['ext']}" for i in lacking[:SHOWN])
        raise CheckpointNotFoundError(
            f"{folder}: the shards say there are {total}, but {len(lacking)} are missing: {shown}"
            f"{' ...' if len(lacking) > SHOWN else ''}. Fetch the missing shard files."
        )


def _read_shard(path: str, label: str) -> tuple[TensorTable, set[str]]:
    from . import read_file, sniff
    from .safetensors_reader import read_table

    if sniff(path) == "safetensors":
        return read_table(path, label)[0], set()
    raw = read_file(path)
    damaged = raw.damaged_storages()
    if damaged:
        raise CorruptCheckpointError(f"{path}: the shard is truncated or corrupted: {damaged[0]}. Re-download it.")
    from ..sections import find_sections

    weights, _ = find_sections(raw.root)
    if "" not in weights:
        raise CorruptCheckpointError(f"{path}: the shard is not a flat state dict of tensors; found sections "
                                     f"{sorted(weights)}.")
    from ..checkpoint import check_extents

    table = TensorTable.from_refs(weights[""], label)
    check_extents(path, {"": table})
    return table, raw.unsafe


def _check_against_index(index: str, table: TensorTable, weight_map: dict[str, str], warnings: list[str]):
    where = list(map(weight_map.get, table.keys_list))  # the shard labels are the index's own names
    if len(table) == len(weight_map) and all(map(operator.eq, where, table.file)):
        return table  # the usual case, checked at C speed
    keep = [w is None or w == f for w, f in zip(where, table.file)]
    found = sum(w is not None and k for w, k in zip(where, keep))
    if found < len(weight_map):
        have = {k for k, w, ok in zip(table.keys_list, where, keep) if w is not None and ok}
        lacking = [(k, v) for k, v in weight_map.items() if k not in have]
        shown = "; ".join(f"{k!r} (in {v})" for k, v in lacking[:SHOWN])
        raise CorruptCheckpointError(
            f"{index}: {len(lacking)} tensor(s) the index promises are not in their shard: {shown}"
            f"{' ...' if len(lacking) > SHOWN else ''}. The shard files do not belong to this index; "
            "re-download them together."
        )
    extra = [k for k, w in zip(table.keys_list, where) if w is None]
    if extra:
        warnings.append(f"{len(extra)} tensor(s) in the shards are not in {os.path.basename(index)}: "
                        f"{', '.join(extra[:SHOWN])}{' ...' if len(extra) > SHOWN else ''}")
    if all(keep):
        return table
    dropped = [k for k, ok in zip(table.keys_list, keep) if not ok]
    warnings.append(f"{len(dropped)} tensor(s) appear in a shard other than the one the index names; the index's "
                    f"copy was used: {', '.join(dropped[:SHOWN])}")
    return table.subset(keep)


def _drop_duplicates(table: TensorTable, warnings: list[str]) -> TensorTable:
    if len(table.index) == len(table):
        return table
    seen: set[str] = set()
    keep = [not (k in seen or seen.add(k)) for k in table.keys_list]
    dropped = [k for k, ok in zip(table.keys_list, keep) if not ok]
    warnings.append(f"{len(dropped)} tensor(s) appear in more than one shard; the first was used: "
                    f"{', '.join(dropped[:SHOWN])}")
    return table.subset(keep)


def _unindexed_shards(folder: str, index: str, names: list[str]) -> list[str]:
    ext = ".safetensors" if index.endswith(".safetensors.index.json") else ".bin"
    stem = os.path.basename(index)[: -len(f"{ext}.index.json")]
    listed = set(names)
    extra = sorted(n for n in os.listdir(folder)
                   if n not in listed and n.endswith(ext) and (SHARD.match(n) or n == stem + ext))
    if not extra:
        return []
    return [f"{len(extra)} file(s) beside {os.path.basename(index)} are not in it and were not read: "
            f"{', '.join(extra[:SHOWN])}{' ...' if len(extra) > SHOWN else ''}"]
