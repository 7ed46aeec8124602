"""Reader for torch's legacy pickle container (``_use_new_zipfile_serialization=False``): a run of
pickles followed by raw storages, each behind an 8-byte element count; data is located, not read."""

from __future__ import annotations

import struct

from ..errors import CorruptCheckpointError
from .mapped import MappedFile
from .pickle_reader import PICKLE_ERRORS, SafeUnpickler
from .raw import RawCheckpoint
from .records import element_size

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


def read_torch_legacy(path: str) -> RawCheckpoint:
    source = MappedFile(path)
    try:
        with open(path, "rb") as f:
            header = SafeUnpickler(f)
            if header.load() != MAGIC_NUMBER:
                raise CorruptCheckpointError(f"{path}: not a torch legacy checkpoint (bad magic number)")
            header.load()  # protocol version
            sys_info = header.load()
            if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
                raise CorruptCheckpointError(f"{path}: big-endian checkpoints are not supported")
            up = SafeUnpickler(f, source=source)
            obj = up.load()
            keys = [str(k) for k in SafeUnpickler(f).load()]
            offsets, limits = source.offsets, {}
            for key in keys:
                count = f.read(8)
                if len(count) != 8:
                    raise EOFError(f"storage {key} is cut off")
                ref = up.storages.get(key)
                elsize = element_size(ref.dtype) if ref is not None else 1
                offsets[key] = f.tell()
                nbytes = struct.unpack("<q", count)[0] * elsize
                limits[key] = offsets[key] + nbytes
                f.seek(nbytes, 1)
    except CorruptCheckpointError:
        raise
    except (OSError, *PICKLE_ERRORS) as e:
        raise CorruptCheckpointError(
            f"{path}: looks like a legacy torch checkpoint but it is truncated or corrupted ({e}). "
            "Re-download or re-save the file."
        ) from None
    return RawCheckpoint(
        format="torch-legacy", root=obj, unsafe=up.unsafe, source=source,
        storages=up.storages, limits=limits, files=[path],
    )
