"""Which layout a path is: a single file, a hub folder (sharded safetensors or ``.bin`` with or
without an index, one weights file, an adapter), a ``torch.distributed.checkpoint`` folder, or a
DeepSpeed folder. Recognised by content and by the names the writers use, from the folder, its
index file, or any file inside it; nothing is read beyond names, sizes and a few bytes."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import CheckpointNotFoundError, UnknownFormatError

SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>safetensors|bin)$")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
# Single weight files the hub writers use, best first.
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "consolidated.safetensors",
             "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin", "model.pt", "model.pth")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tar")
DEEPSPEED_MODEL = re.compile(r"^(?:.*_)?mp_rank_\d+_model_states\.pt$|^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
DEEPSPEED_OPTIM = re.compile(r"^.*_optim_states\.pt$")


@dataclass
class Layout:
    """What to read: ``kind`` is "file", "hub", "dcp" or "deepspeed"; ``path`` the file or folder."""

    kind: str
    path: str
    index: str | None = None  # hub: the index file, if any
    shards: list[str] = field(default_factory=list)  # hub: the weight files, in order
    notes: list[str] = field(default_factory=list)  # why this layout was chosen over others


def detect(path: str) -> Layout:
    """The layout at ``path`` (a folder, an index file, or a file inside a sharded folder)."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or folder. Check the path (relative paths start at "
                                      f"{os.getcwd()}).")
    if os.path.isdir(path):
        return _folder(path)
    folder, name = os.path.split(os.path.abspath(path))
    if name == ".metadata" or name.endswith(".distcp"):  # without .metadata, the DCP reader says what is missing
        return Layout("dcp", folder)
    if name.endswith(INDEX_SUFFIXES):
        return _hub_index(folder, path)
    if DEEPSPEED_MODEL.match(name) or DEEPSPEED_OPTIM.match(name):
        return Layout("deepspeed", folder)
    m = SHARD.match(name)
    if m:
        index = os.path.join(folder, f"{m['stem']}.{m['ext']}.index.json")  # model-00001-of-00002.safetensors
        if os.path.isfile(index):
            return _hub_index(folder, index, note=f"{name} is one shard of {os.path.basename(index)}; opened them all")
    return Layout("file", path)


def _hub_index(folder: str, index: str, note: str | None = None) -> Layout:
    return Layout("hub", folder, index=index, notes=[note] if note else [])


def _listing(folder: str) -> list[os.DirEntry]:
    try:
        return sorted((e for e in os.scandir(folder) if not e.name.startswith(".") or e.name == ".metadata"),
                      key=lambda e: e.name)
    except OSError as e:
        raise CheckpointNotFoundError(f"{folder}: cannot list the folder ({e}).") from None


def _is_file(e: os.DirEntry) -> bool:
    try:
        return e.is_file()
    except OSError:
        return False


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()
    except OSError:
        return False


def _folder(folder: str) -> Layout:
    entries = _listing(folder)
    files = {e.name: e for e in entries if _is_file(e)}
    dirs = {e.name: e for e in entries if _is_dir(e)}
    if ".metadata" in files or any(n.endswith(".distcp") for n in files):
        return Layout("dcp", folder)
    ds = deepspeed_dir(folder, files, dirs)
    if ds is not None or any(DEEPSPEED_OPTIM.match(n) for n in files):  # a tag folder lacking its model states, too
        return Layout("deepspeed", folder)
    indexes = sorted((n for n in files if n.endswith(INDEX_SUFFIXES)),
                     key=lambda n: (not n.endswith(".safetensors.index.json"), n))
    if indexes:
        notes = [f"also found {', '.join(indexes[1:])}; used {indexes[0]}"] if len(indexes) > 1 else []
        return Layout("hub", folder, index=os.path.join(folder, indexes[0]), notes=notes)
    shards = _shard_groups(files)
    if shards:
        (ext, stem), names = min(shards.items(), key=lambda kv: (kv[0][0] != "safetensors", kv[0][1]))
        return Layout("hub", folder, shards=[os.path.join(folder, n) for n in names])
    for name in HUB_FILES:
        if name in files:
            others = [n for n in HUB_FILES if n in files and n != name]
            notes = [f"also found {', '.join(others)}; used {name}"] if others else []
            return Layout("file", os.path.join(folder, name), notes=notes)
    weights = [n for n in files if n.lower().endswith(WEIGHT_SUFFIXES) and files[n].stat().st_size > 0]
    if len(weights) == 1:
        return Layout("file", os.path.join(folder, weights[0]))
    if "latest" in files and not weights:  # DeepSpeed's, naming a tag that is not there: the reader says so
        return Layout("deepspeed", folder)
    raise _no_checkpoint(folder, weights, dirs)


def _no_checkpoint(folder: str, weights: list[str], dirs: dict) -> UnknownFormatError | CheckpointNotFoundError:
    if weights:
        shown = ", ".join(weights[:8]) + (f" and {len(weights) - 8} more" if len(weights) > 8 else "")
        return UnknownFormatError(
            f"{folder}: is a directory that holds {len(weights)} separate checkpoint files ({shown}) and no index "
            "tying them together. Open one of them by its path."
        )
    if "model_index.json" in os.listdir(folder):
        parts = ", ".join(f"{d}/" for d in sorted(dirs)[:10])
        return UnknownFormatError(f"{folder}: a diffusers pipeline folder; open one component folder ({parts}).")
    sub = [d for d in sorted(dirs)][:10]
    hint = f" Its sub-folders: {', '.join(s + '/' for s in sub)}." if sub else ""
    return CheckpointNotFoundError(
        f"{folder}: is a directory with no checkpoint in it (no .safetensors/.bin/.pt file, index, DCP .metadata "
        f"or DeepSpeed 'latest').{hint} Pick a checkpoint file or folder inside it."
    )


def _shard_groups(files: dict) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for name in files:
        m = SHARD.match(name)
        if m:
            groups.setdefault((m["ext"], m["stem"]), []).append(name)
    return {k: sorted(v, key=lambda n: int(SHARD.match(n)["i"])) for k, v in groups.items()}


def deepspeed_dir(folder: str, files: dict | None = None, dirs: dict | None = None) -> str | None:
    """The folder holding a DeepSpeed checkpoint's ``*model_states.pt`` files for ``folder``: the folder
    itself, the tag named by its ``latest`` file (``global_step100``, Lightning's ``checkpoint``), or
    its newest ``global_stepN``; None if ``folder`` is not a DeepSpeed checkpoint."""
    if files is None or dirs is None:
        entries = _listing(folder)
        files = {e.name: e for e in entries if _is_file(e)}
        dirs = {e.name: e for e in entries if _is_dir(e)}
    if any(DEEPSPEED_MODEL.match(n) for n in files):
        return folder
    tag = None
    if "latest" in files and files["latest"].stat().st_size < 4096:
        with open(os.path.join(folder, "latest"), encoding="utf-8", errors="replace") as f:
            tag = f.read().strip()
    steps = sorted((d for d in dirs if re.fullmatch(r"global_step\d+", d)), key=lambda d: int(d[11:]))
    for cand in ([tag] if tag else []) + steps[::-1]:
        if cand in dirs and any(DEEPSPEED_MODEL.match(n) for n in os.listdir(os.path.join(folder, cand))):
            return os.path.join(folder, cand)
    return None


@dataclass
class FolderSummary:
    """What a folder checkpoint is, from names and sizes only (for file pickers): no index is parsed."""

    format: str
    files: int
    nbytes: int

    def __str__(self) -> str:
        from ..checkpoint import human_size

        what = f"{self.files} files" if self.format == "dcp" else f"{self.files} shards" if self.files > 1 else "1 file"
        return f"{self.format}: {what}, {human_size(self.nbytes)}"


def summarize_folder(folder: str) -> FolderSummary | None:
    """A :class:`FolderSummary` if ``folder`` is one checkpoint, else None. Never raises."""
    try:
        layout = _folder(folder)
        if layout.kind == "file":
            from . import sniff

            return FolderSummary(sniff(layout.path), 1, os.path.getsize(layout.path))
        where = (deepspeed_dir(folder) or folder) if layout.kind == "deepspeed" else folder
        names = os.listdir(where)
        if layout.kind == "hub":
            ext = ".bin" if (layout.index or layout.shards[0]).endswith((".bin", ".bin.index.json")) else ".safetensors"
            weights = [n for n in names if n.endswith(ext)]
            fmt = f"hf-{ext[1:]}-sharded"
        elif layout.kind == "dcp":
            weights, fmt = [n for n in names if n.endswith(".distcp") or n == ".metadata"], "dcp"
        else:
            weights, fmt = [n for n in names if n.endswith(".pt")], "deepspeed"
        return FolderSummary(fmt, len(weights), sum(os.path.getsize(os.path.join(where, n)) for n in weights))
    except (OSError, ValueError, CheckpointNotFoundError, UnknownFormatError):
        return None
