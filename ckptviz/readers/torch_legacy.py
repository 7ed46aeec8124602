"""Reader for torch's legacy pickle container (``_use_new_zipfile_serialization=False``): a run of
pickles followed by raw storages, each behind an 8-byte element count; read through one read-only
map of the file, so data is located, never read."""

from __future__ import annotations

import mmap
import struct

from ..errors import CorruptCheckpointError
from .limits import LimitExceeded, limit_error
from .mapped import MappedFile
from .pickle_reader import PICKLE_ERRORS, unpickle_from
from .raw import RawCheckpoint
from .records import element_size

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def _check_views(roots, views, limits: dict, offsets: dict) -> None:
    """Every storage (and legacy storage view) lies inside the bytes of its root storage."""
    for ref in (*roots, *views):
        end = offsets.get(ref.key, 0) + ref.byte_offset + ref.nbytes
        if ref.key not in limits or end > limits[ref.key]:
            at = ref.byte_offset // max(1, element_size(ref.dtype))
            raise EOFError(f"storage {ref.key} (view at element offset {at}, {ref.numel} elements) lies past the "
                           "end of its root storage; torch.load refuses it")


def read_torch_legacy(path: str) -> RawCheckpoint:
    source = MappedFile(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = 0

            def load(**kwargs):
                nonlocal pos
                obj, found = unpickle_from(mm, pos, **kwargs)
                pos += found.end
                return obj, found

            if load()[0] != MAGIC_NUMBER:
                raise CorruptCheckpointError(f"{path}: not a torch legacy checkpoint (bad magic number)")
            protocol = load()[0]
            if type(protocol) is not int or protocol != PROTOCOL_VERSION:
                raise CorruptCheckpointError(
                    f"{path}: the legacy checkpoint's protocol version is {protocol!r:.40}, not {PROTOCOL_VERSION}; "
                    "torch.load refuses it. The file is damaged: re-save or re-download it.")
            sys_info = load()[0]
            if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
                raise CorruptCheckpointError(f"{path}: big-endian checkpoints are not supported")
            obj, up = load(source=source)
            keys = load()[0]
            if type(keys) is not list:
                raise EOFError("the list of storage keys is missing")
            offsets, limits, size = source.offsets, {}, len(mm)
            sizes = {dtype: element_size(dtype) for dtype in {ref.dtype for ref in up.storages.values()}}
            storage, count_at = up.storages.get, struct.Struct("<q").unpack_from
            for key in keys:  # each storage: its element count, then its bytes
                if pos + 8 > size:
                    raise EOFError(f"storage {key} is cut off")
                ref = storage(key) if type(key) is str else None
                if ref is None:  # torch.load asserts every key names a storage of the pickle
                    raise EOFError(f"the storage key list names {key!r:.40}, which is no storage of the pickle")
                count = count_at(mm, pos)[0]
                nbytes = count * (sizes[ref.dtype] if ref is not None else 1)
                if count < 0:
                    raise EOFError(f"storage {key} has a negative size")
                if ref is not None and count != ref.numel:  # torch.load refuses a wrong byte size too
                    raise EOFError(f"storage {key} holds {count} elements but its record declares {ref.numel}")
                offsets[key] = pos = pos + 8
                limits[key] = pos = pos + nbytes
                if pos > size:
                    raise EOFError(f"storage {key} ({nbytes} bytes) runs past the end of the file")
            _check_views(up.storages.values(), up.views, limits, offsets)
    except CorruptCheckpointError:
        raise
    except LimitExceeded as e:
        raise limit_error(path, e) from None
    except (OSError, *PICKLE_ERRORS) as e:
        raise CorruptCheckpointError(
            f"{path}: looks like a legacy torch checkpoint but it is truncated or corrupted ({e}). "
            "Re-download or re-save the file."
        ) from None
    return RawCheckpoint(
        format="torch-legacy", root=obj, unsafe=up.unsafe, source=source,
        storages=up.storages, limits=limits, files=[path],
    )
