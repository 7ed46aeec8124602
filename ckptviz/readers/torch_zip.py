"""Reader for torch's zip container (``torch.save`` since 1.6, and TorchScript archives): reads the
central directory and ``data.pkl``, and finds where each storage's bytes start from its local
header (read with ``pread``, all headers at once, never mapped); tensor bytes stay in the file."""

from __future__ import annotations

import io
import operator
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence
from itertools import repeat
from operator import methodcaller

import numpy as np
import torch

from ..errors import CorruptCheckpointError
from .limits import LimitExceeded, limit_error
from .mapped import FileBytes, MappedFile
from .pickle_reader import PICKLE_ERRORS, check_jit_opcodes, unpickle
from .raw import RawCheckpoint
from .records import dtype_name, element_size

_HEADER_FIELDS = np.array([0, 1, 2, 3, 26, 27, 28, 29])  # signature; name and extra field lengths


class ZipDirectory:
    """The central directory of a zip file, read from a map of it in one pass: entry names and, per
    entry, method, sizes, CRC and local header offset as numpy columns. It reads only what torch's
    archives need (stored or deflated entries, zip64), and raises ``zipfile.BadZipFile`` otherwise."""

    def __init__(self, mm: FileBytes):
        self.mm = mm
        count, cd_size, cd_offset, concat, self.disk = _end_of_directory(mm)
        cd = bytes(mm[cd_offset : cd_offset + cd_size])
        starts = _entry_starts(cd, count)
        raw = np.frombuffer(cd, dtype=np.uint8)
        fixed = raw[starts[:, None] + np.arange(46)]  # (n, 46): every entry's fixed part
        u16 = lambda at: fixed[:, at : at + 2].copy().view("<u2")[:, 0].astype(np.int64)  # noqa: E731
        u32 = lambda at: fixed[:, at : at + 4].copy().view("<u4")[:, 0].astype(np.int64)  # noqa: E731
        flags, name_len, extra_len = u16(8), u16(28), u16(30)
        self.flags, self.name_len = flags, name_len
        # miniz treats an entry with the DOS directory attribute as a directory and "extracts" nothing:
        # torch.load then hands back uninitialised memory as the record
        self.directory = (u32(38) & 0x10) != 0
        self.method, self.crc = u16(10), u32(16)
        self.compressed, self.size, self.header = u32(20), u32(24), u32(42)
        _miniz_entry_checks(fixed, u16, u32, len(mm) - concat, self.disk)
        names = self.raw_names = [cd[a : a + n] for a, n in zip((starts + 46).tolist(), name_len.tolist())]
        try:  # torch hands every name to Python as UTF-8 (whatever the flag says): others fail torch.load
            self.names = [name.decode("utf-8") for name in names]
        except UnicodeDecodeError:
            bad = next(name for name in names if not _is_utf8(name))
            raise zipfile.BadZipFile(f"the entry name {bad[:80]!r} is not UTF-8; torch.load refuses such a "
                                     "zip") from None
        wide = np.flatnonzero((self.compressed == 0xFFFFFFFF) | (self.size == 0xFFFFFFFF)
                              | (self.header == 0xFFFFFFFF))
        for i in wide.tolist():  # zip64: the 32-bit fields are placeholders for the extra field's values
            extra_at = int(starts[i]) + 46 + int(name_len[i])
            self._zip64(i, cd[extra_at : extra_at + int(extra_len[i])])
        self.header = self.header + concat
        self.index = dict(zip(self.names, range(len(self.names))))

    def data_starts(self, rows: Sequence[int] | np.ndarray) -> list[int]:
        """Where the data of entries ``rows`` starts: past each local header (30 bytes), name and extra field
        (torch pads the local extra field for alignment, so the central directory's does not tell). Each
        local header must be the entry's own (same name, as ``zipfile`` checks) and not a directory's."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return []
        at, mm = self.header[rows], self.mm
        if at.min() < 0 or at.max() + 30 > len(mm):
            raise zipfile.BadZipFile("a local header lies past the end of the file")
        if self.directory[rows].any():
            name = self.names[int(rows[np.argmax(self.directory[rows])])]
            raise zipfile.BadZipFile(f"the entry {name} is marked as a directory (torch.load would read "
                                     "uninitialised memory for it)")
        picked = mm.gather(at, 30)[:, _HEADER_FIELDS]  # (n, 8) bytes of every header
        if (picked[:, :4].copy().view("<u4") != 0x04034B50).any():
            raise zipfile.BadZipFile("bad local header signature")
        lengths = picked[:, 4:].copy().view("<u2").astype(np.int64)  # file name length, extra field length
        name_len, extra_len = lengths[:, 0], lengths[:, 1]
        if (name_len != self.name_len[rows]).any() or (at + 30 + name_len > len(mm)).any():
            self._name_mismatch(rows[np.argmax((name_len != self.name_len[rows]) | (at + 30 + name_len > len(mm)))])
        for n in np.unique(name_len).tolist():  # compare the names, one gather per name length
            pick = np.flatnonzero(name_len == n)
            local = mm.gather(at[pick] + 30, n)
            central = np.frombuffer(b"".join(self.raw_names[r] for r in rows[pick].tolist()), np.uint8)
            bad = (local != central.reshape(len(pick), n)).any(axis=1)
            if bad.any():
                self._name_mismatch(rows[pick[np.argmax(bad)]])
        return (at + 30 + name_len + extra_len).tolist()

    def _name_mismatch(self, i: int) -> None:
        raise zipfile.BadZipFile(f"the entry {self.names[int(i)]} points at a local header of another name "
                                 "(the central directory and the local headers disagree)")

    def _zip64(self, i: int, extra: bytes) -> None:
        at = 0
        while at + 4 <= len(extra):
            tag, size = struct.unpack_from("<HH", extra, at)
            if tag == 1:
                values = iter(struct.unpack_from(f"<{size // 8}Q", extra, at + 4))
                for column in (self.size, self.compressed, self.header):
                    if column[i] == 0xFFFFFFFF:
                        column[i] = next(values)
                return
            at += 4 + size
        raise zipfile.BadZipFile("zip64 entry without its zip64 extra field")

    def read(self, name: str) -> bytes:
        """The bytes of entry ``name`` (CRC checked)."""
        i = self.index[name]
        (start,) = self.data_starts([i])
        data = bytes(self.mm[start : start + int(self.compressed[i])])
        if len(data) != self.compressed[i]:
            raise zipfile.BadZipFile(f"{name} is cut off")
        if self.method[i] == zipfile.ZIP_DEFLATED:
            data = inflate(data, name, int(self.size[i]))
        elif self.method[i] != zipfile.ZIP_STORED:
            raise zipfile.BadZipFile(f"{name} is compressed with method {self.method[i]}; torch never writes that")
        if len(data) != self.size[i] or zlib.crc32(data) != self.crc[i]:
            raise zipfile.BadZipFile(f"bad CRC-32 or size for {name}")
        return data


MIN_INFLATE_CAP = 64 << 20  # a deflated entry may inflate to max(this, INFLATE_RATIO x its compressed size)
INFLATE_RATIO = 100


def _inflate_cap(name: str, declared: int, compressed: int, cap: int) -> LimitExceeded:
    return LimitExceeded(
        f"{name} declares {declared:_} inflated bytes from {compressed:_} compressed, beyond the inflate cap of "
        f"{cap:_} bytes = max(MIN_INFLATE_CAP, INFLATE_RATIO x compressed)",
        "ckptviz.readers.torch_zip.INFLATE_RATIO", INFLATE_RATIO)


def inflate(data: bytes, name: str, declared: int) -> bytes:
    """Inflate a raw-deflate zip entry, refusing more than its declared size or the inflate cap
    (``max(MIN_INFLATE_CAP, INFLATE_RATIO * compressed size)``); zlib errors become BadZipFile."""
    cap = max(MIN_INFLATE_CAP, INFLATE_RATIO * len(data))
    limit = min(cap, declared) + 1
    try:
        d = zlib.decompressobj(-15)
        out = d.decompress(data, limit)
    except zlib.error as e:
        raise zipfile.BadZipFile(f"{name} does not inflate ({e})") from None
    if len(out) > declared or d.unconsumed_tail:
        if declared > cap:
            raise _inflate_cap(name, declared, len(data), cap)
        raise zipfile.BadZipFile(f"{name} inflates to more than its declared {declared} bytes")
    return out


def _is_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_ENCRYPTED, _PATCH, _STRONG, _MASKED = 0x1, 0x20, 0x40, 0x2000  # general purpose flag bits miniz refuses


def _miniz_entry_checks(fixed: np.ndarray, u16, u32, archive_size: int, disk: int) -> None:
    """The checks miniz (torch's zip reader) makes on every central directory entry when it opens the
    archive: stored entries whose sizes differ, data past the end, other disks, masked directories."""
    comp, size, at = u32(20), u32(24), u32(42)
    method_and_time = u32(10)  # miniz reads 32 bits at the method offset: method and mod time together
    plain = (comp != 0xFFFFFFFF) & (size != 0xFFFFFFFF)
    if (plain & (((method_and_time == 0) & (size != comp)) | ((size != 0) & (comp == 0)))).any():
        raise zipfile.BadZipFile("an entry's compressed and uncompressed sizes disagree")
    entry_disk = u16(34)
    if ((entry_disk == 0xFFFF) | ((entry_disk != disk) & (entry_disk != 1))).any():
        raise zipfile.BadZipFile("an entry lies on another disk of a multi-disk archive; torch.load refuses those")
    if ((comp != 0xFFFFFFFF) & (at != 0xFFFFFFFF) & (at + 30 + comp > archive_size)).any():
        raise zipfile.BadZipFile("an entry's data runs past the end of the archive")
    if (u16(8) & _MASKED).any():
        raise zipfile.BadZipFile("the archive's central directory is encrypted (masked)")


def _end_of_directory(mm: FileBytes) -> tuple[int, int, int, int, int]:
    """(entries, size and offset of the central directory, bytes prepended to the archive, this disk's
    number), refusing what miniz (torch's zip reader) refuses: multi-disk archives, inconsistent counts."""
    tail_at = max(0, len(mm) - (1 << 16) - 22)
    tail = bytes(mm[tail_at:])
    at = len(tail)
    while True:  # the last record whose comment runs exactly to the end (a comment may hold the signature)
        at = tail.rfind(b"PK\x05\x06", 0, at)
        if at < 0:
            raise zipfile.BadZipFile("no end of central directory record (the file is cut off?)")
        if at + 22 <= len(tail) and at + 22 + struct.unpack_from("<H", tail, at + 20)[0] == len(tail):
            break
    disk, cd_disk, on_disk, count, cd_size, cd_offset = struct.unpack_from("<4xHHHHLL", tail, at)
    eocd = tail_at + at
    if eocd >= 76 and mm[eocd - 20 : eocd - 16] == b"PK\x06\x07":  # zip64: its record precedes the locator
        location = eocd - 20 - 56
        if mm[location : location + 4] != b"PK\x06\x06":
            raise zipfile.BadZipFile("bad zip64 end of central directory record")
        record, disk, cd_disk, on_disk, count, cd_size, cd_offset = struct.unpack_from(
            "<4xQ4xLLQQQQ", mm[location : location + 56])
        pointed, disks = struct.unpack_from("<8xQL", mm[eocd - 20 : eocd])
        if pointed > len(mm) - 56:  # torch's miniz reads the record where the locator points
            raise zipfile.BadZipFile("the zip64 locator points past the end of the file")
        if record < 44:
            raise zipfile.BadZipFile("bad zip64 end of central directory record")
        if disks != 1:
            raise zipfile.BadZipFile("a multi-disk zip64 archive; torch.load refuses those")
    else:
        location = eocd
    if count != on_disk or ((disk | cd_disk) != 0 and (disk != 1 or cd_disk != 1)):
        raise zipfile.BadZipFile("a multi-disk archive (or a damaged end of central directory); torch.load "
                                 "refuses those")
    if cd_size < count * 46:
        raise zipfile.BadZipFile("the central directory is smaller than its entries")
    concat = location - cd_size - cd_offset  # data before the archive (e.g. a self-extracting stub)
    if concat < 0 or cd_offset + concat + cd_size > len(mm):
        raise zipfile.BadZipFile("the central directory lies outside the file")
    return count, cd_size, cd_offset + concat, concat, disk


def _entry_starts(cd: bytes, count: int) -> np.ndarray:
    """Offsets of the ``count`` entries in the central directory ``cd``: every signature found,
    accepted only if they chain exactly (each entry ends where the next starts)."""
    raw = np.frombuffer(cd, dtype=np.uint8)
    if len(raw) >= 46:
        hits = np.flatnonzero((raw[:-3] == 0x50) & (raw[1:-2] == 0x4B) & (raw[2:-1] == 1) & (raw[3:] == 2))
        hits = hits[hits + 46 <= len(raw)]
        lengths = raw[hits[:, None] + np.arange(28, 34)].astype(np.int64)
        ends = hits + 46 + lengths[:, 0] + (lengths[:, 1] << 8) + lengths[:, 2] + (lengths[:, 3] << 8) \
            + lengths[:, 4] + (lengths[:, 5] << 8)
        if len(hits) == count and (count == 0 or (hits[0] == 0 and (ends[:-1] == hits[1:]).all()
                                                   and ends[-1] == len(raw))):
            return hits
    starts, at = [], 0  # a signature inside a name or extra field: walk the entries one by one
    for _ in range(count):
        if at + 46 > len(cd) or cd[at : at + 4] != b"PK\x01\x02":
            raise zipfile.BadZipFile("truncated or corrupted central directory")
        n, m, k = struct.unpack_from("<HHH", cd, at + 28)
        starts.append(at)
        at += 46 + n + m + k
        if at > len(cd):  # as miniz: an entry (its comment included) must end inside the directory
            raise zipfile.BadZipFile("a central directory entry runs past the end of the directory")
    return np.array(starts, dtype=np.int64).reshape(-1)


MIN_FILE_FORMAT_VERSION, MAX_FILE_FORMAT_VERSION = 1, 10  # what torch's reader (inline_container.cc) accepts
_RECORDS_READ = ("data.pkl", "version", ".data/version", "byteorder", ".format_version", ".storage_alignment",
                 ".data/serialization_id")  # what torch.load reads besides the storages


def _archive_root(path: str, zd: ZipDirectory) -> str:
    """The archive's top folder with its slash, as torch finds it: the first entry's; every entry must
    lie under it."""
    if not zd.names:
        raise CorruptCheckpointError(f"{path}: the zip archive holds no files; it is not a torch checkpoint")
    first = zd.names[0]
    if "/" not in first:
        raise CorruptCheckpointError(
            f"{path}: the zip's first entry {first[:80]!r} is not inside a folder; torch.save puts every record "
            "under one top folder and torch.load refuses this file. Re-save it with torch.save.")
    root = first[: first.index("/") + 1]
    stray = next((n for n in zd.names if not n.startswith(root)), None)
    if stray is not None:
        raise CorruptCheckpointError(
            f"{path}: the zip entry {stray[:80]!r} lies outside the archive's top folder {root!r}; torch.save "
            "writes every record under one folder and torch.load refuses this file. Re-save it with torch.save.")
    return root


def _stoull(raw: bytes) -> int | None:
    """The version record as torch parses it (C ``stoull``, then read as a signed 64-bit value); None
    where it does not parse."""
    m = re.match(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)", raw.split(b"\0", 1)[0])
    if m is None or int(m.group(2)) >= 1 << 64:
        return None
    v = int(m.group(2))
    v = -v % (1 << 64) if m.group(1) == b"-" else v
    return v - (1 << 64) if v >= 1 << 63 else v


def _check_records(path: str, zd: ZipDirectory, root: str) -> None:
    """The records torch.load reads besides the storages: readable (stored or deflated, not encrypted),
    a format version torch supports, a storage alignment that is a number."""
    for name in _RECORDS_READ:
        i = zd.index.get(root + name)
        if i is not None and (zd.method[i] not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
                              or zd.flags[i] & (_ENCRYPTED | _PATCH | _STRONG)):
            raise zipfile.BadZipFile(f"{root}{name} is encrypted or compressed with method {zd.method[i]}, "
                                     "which torch's zip reader refuses")
    name = next((root + n for n in (".data/version", "version") if root + n in zd.index), None)
    if name is None:
        raise CorruptCheckpointError(
            f"{path}: the zip has no {root}version record, which torch.save always writes and torch.load "
            "requires. Re-save the file with torch.save.")
    raw = zd.read(name)
    version = _stoull(raw)
    if version is None or not MIN_FILE_FORMAT_VERSION <= version <= MAX_FILE_FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{path}: the archive's format version record {name} holds {raw[:40]!r}; torch reads versions "
            f"{MIN_FILE_FORMAT_VERSION} to {MAX_FILE_FORMAT_VERSION} "
            "(ckptviz.readers.torch_zip.MAX_FILE_FORMAT_VERSION). If a newer torch wrote it, update ckptviz; "
            "otherwise the file is damaged: re-save it.")
    if root + ".format_version" in zd.index:  # torch.load reads it: miniz checks its local header (not its CRC)
        i = zd.index[root + ".format_version"]
        (start,) = zd.data_starts([i])
        if start + int(zd.compressed[i]) > len(zd.mm):
            raise zipfile.BadZipFile(f"{root}.format_version: its local header puts its data past the end of the file")
    if root + ".data/serialization_id" in zd.index:  # torch.load hands it to Python as a UTF-8 string
        raw = zd.read(root + ".data/serialization_id")
        if not _is_utf8(raw):  # the whole record (torch decodes all of it, NULs included)
            raise CorruptCheckpointError(
                f"{path}: the record {root}.data/serialization_id is not UTF-8 text; torch.load refuses the file. "
                "Re-save it with torch.save, or re-download it.")
    if root + ".storage_alignment" in zd.index:
        raw = zd.read(root + ".storage_alignment")
        try:
            int(raw)
        except ValueError:
            raise CorruptCheckpointError(
                f"{path}: the record {root}.storage_alignment holds {raw[:40]!r}, not a number; torch.load "
                "refuses the file. Re-save it with torch.save.") from None


def _check_script_records(zd: ZipDirectory, root: str) -> None:
    """What torch.jit.load reads of a TorchScript archive besides data.pkl, which ckptviz does not use:
    constants.pkl an unpickler-valid TorchScript pickle, every code/ entry intact (CRC), its sources UTF-8."""
    if f"{root}constants.pkl" in zd.index:
        check_jit_opcodes(zd.read(f"{root}constants.pkl"), result="Tuple")
    for name in zd.names:
        if name.startswith(f"{root}code/") and not name.endswith("/"):
            data = zd.read(name)  # inflated (capped) and CRC-checked: a damaged entry is a BadZipFile
            if name.endswith(".py") and not _is_utf8(data):
                raise zipfile.BadZipFile(f"the TorchScript source {name} is not UTF-8")


def _check_devices(path: str, storages) -> None:
    """TorchScript's unpickler parses every storage's location as a device, whatever ``map_location`` says."""
    for location in {ref.location for ref in storages}:
        try:
            torch.device(location)
        except (RuntimeError, ValueError, TypeError):
            raise CorruptCheckpointError(
                f"{path}: a storage's location {location[:40]!r} is not a device torch knows; torch.jit.load "
                "refuses the file. Re-export it with torch.jit.save.") from None


_DTYPE, _NUMEL = operator.attrgetter("dtype"), operator.attrgetter("numel")


def _check_storage_sizes(path: str, zd: ZipDirectory, root: str, storages: dict, keys: list[str],
                         rows: np.ndarray) -> None:
    """Every storage record holds exactly the bytes its pickle declares (numel x element size), as
    torch.load checks."""
    refs = list(map(storages.__getitem__, keys))
    sizes = {d: element_size(d) for d in set(map(_DTYPE, refs))}
    declared = list(map(operator.mul, map(_NUMEL, refs), map(sizes.__getitem__, map(_DTYPE, refs))))
    actual = zd.size[rows].tolist()
    if declared != actual:  # compared at C speed; the loop only finds the first culprit
        for key, want, got in zip(keys, declared, actual):
            if want != got:
                ref = storages[key]
                raise CorruptCheckpointError(
                    f"{path}: storage record {root}data/{key} holds {got:_} bytes, but data.pkl declares "
                    f"{ref.numel:_} elements of {dtype_name(ref.dtype)} ({want:_} bytes); torch.load refuses "
                    "the file. Re-save it with torch.save, or re-download it.")


def read_torch_zip(path: str) -> RawCheckpoint:
    source = MappedFile(path)
    try:
        mm = source.view()  # pread, not a map: a file cut short meanwhile is an error, not a fault
        zd = ZipDirectory(mm)
        root = _archive_root(path, zd)
        if f"{root}data.pkl" not in zd.index:
            raise CorruptCheckpointError(
                f"{path}: a zip file, but not one written by torch.save (no {root}data.pkl inside). "
                "If it is another framework's archive, export its weights with torch.save or safetensors."
            )
        is_script = f"{root}constants.pkl" in zd.index or any(map(methodcaller("startswith", f"{root}code/"),
                                                                    zd.names))
        _check_records(path, zd, root)
        if is_script:
            _check_script_records(zd, root)
        byteorder = zd.read(f"{root}byteorder").decode() if f"{root}byteorder" in zd.index else "little"
        obj, up = unpickle(zd.read(f"{root}data.pkl"), trusted_prefixes=("__torch__.",) if is_script else (),
                           source=source, jit=is_script, storage_ids=(5,))  # ('storage', type, key, location, numel)
        keys = list(up.storages)
        rows = list(map(zd.index.get, map(f"{root}data/".__add__, keys), repeat(-1)))
        if -1 in rows:
            key = keys[rows.index(-1)]
            raise CorruptCheckpointError(f"{path}: tensor storage {root}data/{key} is missing from the zip")
        rows = np.array(rows, dtype=np.int64)
        stored = zd.method[rows] == zipfile.ZIP_STORED
        if not stored.all():
            key = keys[int(np.argmin(stored))]
            raise CorruptCheckpointError(f"{path}: storage {key} is compressed; torch never writes that")
        _check_storage_sizes(path, zd, root, up.storages, keys, rows)
        if is_script:
            _check_devices(path, up.storages.values())
        starts = zd.data_starts(rows)
        source.offsets.update(zip(keys, starts))
        limits = dict(zip(keys, (np.array(starts, dtype=np.int64) + zd.size[rows]).tolist()))
    except CorruptCheckpointError:
        raise
    except LimitExceeded as e:
        raise limit_error(path, e) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, *PICKLE_ERRORS) as e:
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


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    """Where ``info``'s data starts in ``f``: after its local header (whose extra field torch pads)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _inflated(zf: zipfile.ZipFile, name: str) -> bytes:
    """``zf.read(name)`` (its size already checked), its decompressors' errors as ``BadZipFile``."""
    try:
        return zf.read(name)
    except (zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError) as e:
        raise zipfile.BadZipFile(f"{name} does not inflate ({type(e).__name__}: {e})") from None


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
        order = infos.get(f"{root}byteorder")
        if order is not None and (order.file_size > 16 or _inflated(zf, order.filename) != b"little"):
            raise CorruptCheckpointError("big-endian data is not supported; re-save it on a little-endian machine")
        info = infos[pkl[0]]
        if info.compress_type != zipfile.ZIP_STORED:
            cap = max(MIN_INFLATE_CAP, INFLATE_RATIO * info.compress_size)
            if info.file_size > cap:
                raise _inflate_cap(pkl[0], info.file_size, info.compress_size, cap)
        data = _inflated(zf, pkl[0])
        obj, up = unpickle(data, source=source, storage_ids=(5,))
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
