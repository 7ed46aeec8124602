"""Container readers, one module each; :func:`read`, which finds the layout of a path (a file or a
folder, see ``layout``) and picks a reader, and :func:`read_file`, which picks one by sniffing a
file's bytes."""

from __future__ import annotations

import os
import struct

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnknownFormatError
from ._gc import paused_gc
from .raw import RawCheckpoint

__all__ = ["RawCheckpoint", "read", "read_file", "sniff"]


def sniff(path: str) -> str:
    """Name the container in ``path`` from its first bytes: torch-zip, torch-legacy, safetensors, pickle."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if head[:1] == b"\x80" and (head[2:4] == b"\x8a\x0a" or (head[2:3] == b"\x95" and head[11:13] == b"\x8a\x0a")):
        return "torch-legacy"  # the magic number, pickled with protocol 2 or 3 (or 4 and 5, in a frame)
    if len(head) >= 9 and head[8:9] in (b"{", b"["):  # a JSON header (an array one is then rejected as corrupt)
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000:
            return "safetensors"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file. Check the path (relative paths start at {os.getcwd()}).")
    if os.path.isdir(path):
        raise CheckpointNotFoundError(
            f"{path}: is a directory, not a checkpoint file. Pick a file inside it "
            "(.pt, .pth, .bin, .ckpt, .safetensors)."
        )
    if os.path.getsize(path) == 0:
        raise CorruptCheckpointError(f"{path}: the file is empty (0 bytes); the save or the copy did not finish.")


def read(path: str) -> RawCheckpoint:
    """Read the structure of the checkpoint at ``path`` (a file or a folder) without reading tensor data."""
    with paused_gc():
        return _read(path)


def _read(path: str) -> RawCheckpoint:
    from .layout import detect

    layout = detect(path)
    if layout.kind == "hub":
        from .hub import read_hub

        return read_hub(layout)
    if layout.kind == "dcp":
        from .dcp import read_dcp

        return read_dcp(layout.path)
    if layout.kind == "deepspeed":
        from .deepspeed import read_deepspeed

        return read_deepspeed(layout.path)
    from .hub import folder_metadata

    raw = read_file(layout.path)
    raw.extra_metadata = {**folder_metadata(os.path.dirname(os.path.abspath(layout.path))), **raw.extra_metadata}
    if layout.path != path:  # a folder holding one weights file
        raw.location = path
        raw.warnings += layout.notes
    return raw


def read_file(path: str) -> RawCheckpoint:
    """Read the structure of the checkpoint file at ``path`` without reading tensor data."""
    _check_path(path)
    kind = sniff(path)
    if kind == "torch-zip":
        from .torch_zip import read_torch_zip

        return read_torch_zip(path)
    if kind == "torch-legacy":
        from .torch_legacy import read_torch_legacy

        return read_torch_legacy(path)
    if kind == "safetensors":
        from .safetensors_reader import read_safetensors

        return read_safetensors(path)
    if kind == "pickle":
        return _read_plain_pickle(path)
    with open(path, "rb") as f:
        head = f.read(8)
    raise UnknownFormatError(
        f"{path}: not a checkpoint ckptviz can read (first bytes {head!r}). Expected a torch.save file "
        "(zip or legacy pickle), a TorchScript archive or a safetensors file. If the file was cut off "
        "or downloaded as an HTML error page, fetch it again."
    )


def _read_plain_pickle(path: str) -> RawCheckpoint:
    from .limits import LimitExceeded, limit_error
    from .mapped import MappedFile
    from .pickle_file import PickleFile
    from .pickle_reader import PICKLE_ERRORS

    source = MappedFile(path, {})
    try:  # pread through the checked descriptor, never a map: a file changed meanwhile is an error
        obj, up = PickleFile(source).load(0, source=source)
    except CorruptCheckpointError as e:
        if str(e).startswith(f"{path}:"):  # the file's own read error (e.g. it changed on disk): says it all
            raise
        raise CorruptCheckpointError(f"{path}: a pickle, but it is truncated or corrupted ({e}).") from None
    except LimitExceeded as e:
        raise limit_error(path, e) from None
    except (OSError, *PICKLE_ERRORS) as e:
        raise CorruptCheckpointError(f"{path}: a pickle, but it is truncated or corrupted ({e}).") from None
    return RawCheckpoint(format="pickle", root=obj, unsafe=up.unsafe, source=source, storages=up.storages,
                         files=[path])
