"""Byte access to a checkpoint file through private (copy-on-write) memory maps: reading a tensor
touches only its own pages, and nothing can ever be written back to the file. Each read call gets a
map of its own, so a tensor changed in memory never leaks into a later read."""

from __future__ import annotations

import os

import torch

from .pickle_reader import StorageRef, TensorRef, _element_size


class MappedFile:
    """Hands out storages over byte ranges of a file; the map is opened on first use."""

    def __init__(self, path: str, offsets: dict[str, int] | None = None):
        self.path = path
        self.size = os.path.getsize(path)
        self.offsets = offsets or {}  # storage key -> absolute byte offset of its data

    def map(self) -> torch.UntypedStorage:
        """A new private map of the whole file (costs address space only, no reads)."""
        return torch.UntypedStorage.from_file(self.path, shared=False, nbytes=self.size)

    def storage(self, ref: StorageRef, whole: torch.UntypedStorage | None = None) -> torch.UntypedStorage:
        """The bytes of ``ref``: a view of ``whole`` (a map from :meth:`map`), or a copy if misaligned."""
        start = self.offsets[ref.key] + ref.byte_offset
        nbytes = ref.nbytes
        if start % _element_size(ref.dtype):  # misaligned for its dtype: copy instead of mapping
            with open(self.path, "rb") as f:
                f.seek(start)
                buf = bytearray(f.read(nbytes))
            return torch.frombuffer(buf, dtype=torch.uint8).untyped_storage() if buf else torch.UntypedStorage(0)
        return (whole if whole is not None else self.map())[start : start + nbytes]

    def check(self, ref: StorageRef, limit: int | None = None) -> str | None:
        """Why ``ref``'s bytes lie outside the file (or its zip entry), or None if they fit."""
        if ref.key not in self.offsets:
            return f"storage {ref.key!r} is missing"
        end = self.offsets[ref.key] + ref.byte_offset + ref.nbytes
        bound = min(self.size, limit) if limit is not None else self.size
        if end > bound:
            return f"storage {ref.key!r} needs bytes up to {end} but only {bound} exist"
        return None


def materialize(ref: TensorRef, source: MappedFile, whole: torch.UntypedStorage | None = None) -> torch.Tensor:
    """Build a CPU tensor viewing ``ref``'s bytes (no copy where the bytes are aligned)."""
    if ref.storage is None:
        return torch.empty_strided(ref.shape, ref.stride, dtype=ref.dtype, device="meta")
    storage = source.storage(ref.storage, whole)
    return torch.empty((0,), dtype=ref.dtype).set_(storage, ref.offset, ref.shape, ref.stride)
