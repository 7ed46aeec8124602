"""Reader for torch's zip container (``torch.save`` since 1.6, and TorchScript archives): reads the
central directory and ``data.pkl`` only; tensor bytes stay in the file until asked for."""

from __future__ import annotations

import io
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


class _Window(io.RawIOBase):
    """Read-only view of bytes ``[start, start + length)`` of an open file, as a file of its own."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self._pos, self._length)[whence]
        self._pos = max(0, min(base + pos, self._length))
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


_SMALL_WINDOW = 2**20


def read_zip_window(f, start: int, length: int, source: MappedFile | None = None):
    """Read a torch.save zip stored at bytes ``[start, start + length)`` of the open file ``f`` (an item
    of a distributed checkpoint's ``.distcp``): returns (the object, the unpickler, each storage's
    absolute (offset, end) in the file). Raises zipfile, pickle and CorruptCheckpointError errors."""
    if length <= _SMALL_WINDOW:  # one read instead of a seek and read per zip record
        f.seek(start)
        window = io.BytesIO(f.read(length))
    else:
        window = _Window(f, start, length)
    with zipfile.ZipFile(window) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkl = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pkl:
            raise CorruptCheckpointError("not a torch.save zip (no <archive>/data.pkl inside)")
        root = pkl[0][: -len("data.pkl")]
        if f"{root}byteorder" in infos and zf.read(f"{root}byteorder") != b"little":
            raise CorruptCheckpointError("big-endian data is not supported; re-save it on a little-endian machine")
        obj, up = unpickle(zf.read(pkl[0]), source=source)
        spans = {}
        for key in up.storages:
            info = infos.get(f"{root}data/{key}")
            if info is None or info.compress_type != zipfile.ZIP_STORED:
                raise CorruptCheckpointError(f"tensor storage {root}data/{key} is missing or compressed")
            begin = start + _data_offset(window, info)
            if begin + info.file_size > start + length:
                raise CorruptCheckpointError(f"tensor storage {root}data/{key} runs past the end of its item")
            spans[key] = (begin, begin + info.file_size)
    return obj, up, spans
