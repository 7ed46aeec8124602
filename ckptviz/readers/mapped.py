"""Byte access to a checkpoint file through private (copy-on-write) memory maps: reading a tensor
touches only its own pages, and nothing can ever be written back to the file. Each read call gets a
map of its own, so a tensor changed in memory never leaks into a later read. A file that changed
on disk since it was opened is refused before it is mapped (a map past a shrunken file's end would
fault)."""

from __future__ import annotations

import os

import torch

from ..errors import CorruptCheckpointError
from .records import StorageRef, TensorRef, element_size


def file_stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size)


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
                f"{self.path}: the file changed on disk since it was opened (size {self.size} -> {now[1]} bytes); "
                "open the checkpoint again to read the new contents."
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

    def storage(self, ref: StorageRef, whole: torch.UntypedStorage | None = None) -> torch.UntypedStorage:
        """The bytes of ``ref``: a view of ``whole`` (a map from :meth:`map`), or a copy if misaligned."""
        start = self.offsets[ref.key] + ref.byte_offset
        nbytes = ref.nbytes
        if start % element_size(ref.dtype):  # misaligned for its dtype: copy instead of mapping
            self.verify()
            with open(self.path, "rb") as f:
                f.seek(start)
                buf = bytearray(f.read(nbytes))
            if len(buf) != nbytes:
                raise CorruptCheckpointError(f"{self.path}: storage {ref.key!r} is cut off (file truncated)")
            return torch.frombuffer(buf, dtype=torch.uint8).untyped_storage() if buf else torch.UntypedStorage(0)
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


def materialize(ref: TensorRef, whole: torch.UntypedStorage | None = None) -> torch.Tensor:
    """Build a CPU tensor viewing ``ref``'s bytes (no copy where the bytes are aligned); ``whole`` is
    a map of the file that holds them, made by the caller to share across tensors of one file."""
    if ref.storage is None:
        return torch.empty_strided(ref.shape, ref.stride, dtype=ref.dtype, device="meta")
    storage = ref.storage.source.storage(ref.storage, whole)
    return torch.empty((0,), dtype=ref.dtype).set_(storage, ref.offset, ref.shape, ref.stride)
