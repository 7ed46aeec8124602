"""Byte access to a checkpoint file through private (copy-on-write) memory maps: reading a tensor
touches only its own pages, and nothing can ever be written back to the file. Each read call gets a
map of its own, so a tensor changed in memory never leaks into a later read. A file that changed
on disk since it was opened (size, modification time, inode: an atomic replace counts) is refused
before it is mapped or read, so bytes are never read through a stale layout. ``copy=True`` reads go
through ``pread`` into owned memory instead of a map: a file shrunk under such a read gives a clear
error, never a fault, and the tensor handed out no longer depends on the file."""

from __future__ import annotations

import os

import torch

from ..errors import CorruptCheckpointError
from .records import StorageRef, TensorRef, element_size


def file_stamp(path: str) -> tuple[int, int, int, int]:
    """What identifies the file's current contents: (mtime_ns, size, inode, device)."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class MappedFile:
    """Hands out storages over byte ranges of a file; the map is opened on first use."""

    def __init__(self, path: str, offsets: dict[str, int] | None = None):
        self.path = path
        self.stamp = file_stamp(path)
        self.size = self.stamp[1]
        self.offsets = offsets if offsets is not None else {}  # storage key -> absolute byte offset of its data

    def verify(self) -> None:
        """Raise if the file changed (size or modification time) since it was opened."""
        try:
            now = file_stamp(self.path)
        except OSError as e:
            raise CorruptCheckpointError(f"{self.path}: the file can no longer be read ({e}); open it again.") from None
        if now != self.stamp:
            raise CorruptCheckpointError(
                f"{self.path}: the file changed on disk since it was opened "
                f"({_what_changed(self.stamp, now)}); open the checkpoint again to read the new contents."
            )

    def map(self) -> torch.UntypedStorage | None:
        """A new private map of the whole file (costs address space only, no reads); None if empty."""
        self.verify()
        if not self.size:
            return None
        try:
            return torch.UntypedStorage.from_file(self.path, shared=False, nbytes=self.size)
        except RuntimeError as e:
            raise CorruptCheckpointError(f"{self.path}: could not map the file ({e}).") from None

    def read(self, start: int, nbytes: int) -> torch.UntypedStorage:
        """``nbytes`` bytes from ``start`` copied into owned memory with ``pread`` (no map, so a file cut
        short meanwhile is a clear error, not a fault); the file's identity is checked before and after."""
        self.verify()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
        try:
            with open(self.path, "rb", buffering=0) as f:
                got = 0
                while got < nbytes:
                    n = os.preadv(f.fileno(), [view[got:]], start + got)
                    if n <= 0:
                        break
                    got += n
        except OSError as e:
            raise CorruptCheckpointError(f"{self.path}: the file can no longer be read ({e}); open it again.") from None
        self.verify()
        if got != nbytes:
            raise CorruptCheckpointError(f"{self.path}: bytes {start}..{start + nbytes} are cut off (file truncated); "
                                         "open it again, or fetch it again if it is a partial copy.")
        return buf.untyped_storage()

    def storage(self, ref: StorageRef, whole: torch.UntypedStorage | None = None,
                copy: bool = False) -> torch.UntypedStorage:
        """The bytes of ``ref``: a view of ``whole`` (a map from :meth:`map`), or a copy if misaligned."""
        start = self.offsets[ref.key] + ref.byte_offset
        nbytes = ref.nbytes
        if copy or start % element_size(ref.dtype):  # owned copy asked for, or misaligned for its dtype
            return self.read(start, nbytes)
        whole = whole if whole is not None else self.map()
        return whole[start : start + nbytes] if whole is not None else torch.UntypedStorage(0)

    def check(self, ref: StorageRef, limit: int | None = None) -> str | None:
        """Why ``ref``'s bytes lie outside the file (or its zip entry), or None if they fit."""
        if ref.key not in self.offsets:
            return f"storage {ref.key!r} is missing"
        end = self.offsets[ref.key] + ref.byte_offset + ref.nbytes
        bound = min(self.size, limit) if limit is not None else self.size
        if end > bound:
            return f"storage {ref.key!r} needs bytes up to {end} but only {bound} exist"
        return None


class FileBytes:
    """Random access to an open file's bytes by ``pread`` (``len`` and slices, giving ``bytes``), for
    parsing headers and directories where a map would fault if the file shrank meanwhile: a short read
    raises ``OSError`` instead. ``size`` is the size seen at open."""

    SPAN = 64 << 20  # gather scattered small reads through one read of the span they cover, up to this

    def __init__(self, f, size: int | None = None):
        self.fd = f.fileno()
        self.size = os.fstat(self.fd).st_size if size is None else size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, s: slice) -> bytes:
        start, stop, _ = s.indices(self.size)
        want = max(0, stop - start)
        data = os.pread(self.fd, want, start) if want else b""
        while len(data) < want:
            more = os.pread(self.fd, want - len(data), start + len(data))
            if not more:
                raise OSError(f"the file was cut short while being read (bytes {start}..{stop})")
            data += more
        return data

    def gather(self, at, width: int):
        """``(len(at), width)`` uint8 array of the bytes at each offset of ``at`` (int64 array)."""
        import numpy as np

        lo, hi = int(at.min()), int(at.max()) + width
        if hi - lo <= max(self.SPAN, 4 * width * len(at)):
            span = np.frombuffer(self[lo:hi], dtype=np.uint8)
            return span[(at - lo)[:, None] + np.arange(width)]
        return np.frombuffer(b"".join(self[a : a + width] for a in at.tolist()), dtype=np.uint8).reshape(-1, width)


def _what_changed(then: tuple, now: tuple) -> str:
    if now[2:] != then[2:]:
        return "it was replaced by another file"
    if now[1] != then[1]:
        return f"size {then[1]} -> {now[1]} bytes"
    return "it was modified"


def materialize(ref: TensorRef, whole: torch.UntypedStorage | None = None, copy: bool = False) -> torch.Tensor:
    """Build a CPU tensor viewing ``ref``'s bytes (no copy where the bytes are aligned); ``whole`` is
    a map of the file that holds them, made by the caller to share across tensors of one file. With
    ``copy``, the bytes are read into owned memory instead (no map)."""
    if ref.storage is None:
        return torch.empty_strided(ref.shape, ref.stride, dtype=ref.dtype, device="meta")
    storage = ref.storage.source.storage(ref.storage, whole, copy)
    return torch.empty((0,), dtype=ref.dtype).set_(storage, ref.offset, ref.shape, ref.stride)
