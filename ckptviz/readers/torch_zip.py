"""Reader for torch's zip container (``torch.save`` since 1.6, and TorchScript archives): reads the
central directory and ``data.pkl``, and finds where each storage's bytes start from its local
header (one read-only map of the file, all headers at once); tensor bytes stay in the file."""

from __future__ import annotations

import mmap
import zipfile

import numpy as np

from ..errors import CorruptCheckpointError
from .mapped import MappedFile
from .pickle_reader import PICKLE_ERRORS, unpickle
from .raw import RawCheckpoint

_HEADER_FIELDS = np.array([0, 1, 2, 3, 26, 27, 28, 29])  # signature; name and extra field lengths


def _data_offsets(mm: mmap.mmap, header_offsets: list[int]) -> list[int]:
    """Where the data of each zip entry starts: past its local header (30 bytes), name and extra field
    (torch pads the local extra field for alignment, so the central directory's does not tell)."""
    if not header_offsets:
        return []
    at = np.array(header_offsets, dtype=np.int64)
    if at.min() < 0 or at.max() + 30 > len(mm):
        raise zipfile.BadZipFile("a local header lies past the end of the file")
    picked = np.frombuffer(mm, dtype=np.uint8)[at[:, None] + _HEADER_FIELDS]  # (n, 8) bytes of every header
    if (picked[:, :4].copy().view("<u4") != 0x04034B50).any():
        raise zipfile.BadZipFile("bad local header signature")
    lengths = picked[:, 4:].copy().view("<u2").astype(np.int64)  # file name length, extra field length
    name_len, extra_len = lengths[:, 0], lengths[:, 1]
    return (at + 30 + name_len + extra_len).tolist()


def read_torch_zip(path: str) -> RawCheckpoint:
    source = MappedFile(path)
    try:
        with (zipfile.ZipFile(path) as zf, open(path, "rb") as f,
              mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm):
            infos = {i.filename: i for i in zf.infolist()}
            pkl = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
            if not pkl:
                raise CorruptCheckpointError(
                    f"{path}: a zip file, but not one written by torch.save (no <archive>/data.pkl inside). "
                    "If it is another framework's archive, export its weights with torch.save or safetensors."
                )
            root = pkl[0][: -len("data.pkl")]
            is_script = f"{root}constants.pkl" in infos or any(n.startswith(f"{root}code/") for n in infos)
            byteorder = zf.read(f"{root}byteorder").decode() if f"{root}byteorder" in infos else "little"
            obj, up = unpickle(zf.read(pkl[0]), trusted_prefixes=("__torch__.",) if is_script else (), source=source)
            keys, entries = list(up.storages), []
            for key in keys:
                info = infos.get(f"{root}data/{key}")
                if info is None:
                    raise CorruptCheckpointError(f"{path}: tensor storage {root}data/{key} is missing from the zip")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CorruptCheckpointError(f"{path}: storage {key} is compressed; torch never writes that")
                entries.append(info)
            starts = _data_offsets(mm, [info.header_offset for info in entries])
            source.offsets.update(zip(keys, starts))
            limits = {key: start + info.file_size for key, start, info in zip(keys, starts, entries)}
    except CorruptCheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, *PICKLE_ERRORS) as e:
        raise CorruptCheckpointError(
            f"{path}: looks like a torch zip checkpoint but it is truncated or corrupted ({e}). "
            "Re-download or re-save the file; a partial copy cannot be read."
        ) from None
    if byteorder != "little":
        raise CorruptCheckpointError(
            f"{path}: big-endian checkpoints are not supported; re-save it on a little-endian machine"
        )
    return RawCheckpoint(
        format="torchscript" if is_script else "torch-zip",
        root=obj,
        unsafe=up.unsafe,
        source=source,
        storages=up.storages,
        limits=limits,
        files=[path],
    )
