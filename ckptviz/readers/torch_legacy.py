"""Reader for torch's legacy pickle container (``_use_new_zipfile_serialization=False``): a run of
pickles followed by raw storages, each behind an 8-byte element count; the pickles and count fields
are read with ``pread`` through the file's checked descriptor (never mapped), so data is located,
never read, and a file changed while it is parsed is an error, never a fault."""

from __future__ import annotations

from ..errors import CorruptCheckpointError
from .limits import LimitExceeded, limit_error
from .mapped import MappedFile
from .pickle_file import PickleFile
from .pickle_reader import PICKLE_ERRORS
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


def _count_fields(keys: list[str], storages: dict, sizes: dict, pos: int, size: int) -> list[int]:
    """Where each storage's count field lies if every count is what its record declares, for the
    leading storages whose records exist and whose fields lie inside the file (read in one batch,
    then checked one by one against their records)."""
    out = []
    for key in keys:
        ref = storages.get(key)
        if ref is None or pos + 8 > size:
            break
        out.append(pos)
        pos += 8 + ref.numel * sizes[ref.dtype]
    return out


def read_torch_legacy(path: str) -> RawCheckpoint:
    source = MappedFile(path)
    try:
        pickles, pos = PickleFile(source), 0  # pread through the checked descriptor: never a map of the file

        def load(**kwargs):
            nonlocal pos
            obj, found = pickles.load(pos, **kwargs)
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
        obj, up = load(source=source, storage_ids=(6,))  # ('storage', type, key, location, numel, view)
        keys = load()[0]
        if type(keys) is not list:
            raise EOFError("the list of storage keys is missing")
        offsets, limits, size = source.offsets, {}, source.size
        for key in keys:  # torch.load asserts every key names a storage of the pickle
            if type(key) is not str or key not in up.storages:
                raise EOFError(f"the storage key list names {key!r:.40}, which is no storage of the pickle")
        sizes = {dtype: element_size(dtype) for dtype in {ref.dtype for ref in up.storages.values()}}
        storage = up.storages.get
        counts = pickles.words(_count_fields(keys, up.storages, sizes, pos, size))
        for i, key in enumerate(keys):  # each storage: its element count, then its bytes
            if pos + 8 > size:
                raise EOFError(f"storage {key} is cut off")
            ref = storage(key)
            count = counts[i] if i < len(counts) else pickles.words([pos])[0]
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
