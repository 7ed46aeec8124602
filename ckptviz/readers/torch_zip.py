"""Reader for torch's zip container (``torch.save`` since 1.6, and TorchScript archives): reads the
central directory and ``data.pkl`` only; tensor bytes stay in the file until asked for."""

from __future__ import annotations

import struct
import zipfile

from ..errors import CorruptCheckpointError
from .mapped import MappedFile
from .pickle_reader import PICKLE_ERRORS, unpickle
from .raw import RawCheckpoint


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_torch_zip(path: str) -> RawCheckpoint:
    source = MappedFile(path)
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
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
            offsets, limits = source.offsets, {}
            for key in up.storages:
                info = infos.get(f"{root}data/{key}")
                if info is None:
                    raise CorruptCheckpointError(f"{path}: tensor storage {root}data/{key} is missing from the zip")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CorruptCheckpointError(f"{path}: storage {key} is compressed; torch never writes that")
                offsets[key] = _data_offset(f, info)
                limits[key] = offsets[key] + info.file_size
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
