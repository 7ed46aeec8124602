"""Pickles at the start of a checkpoint file (a legacy torch.save file's run of pickles, a plain pickle),
read through the file's checked descriptor: the bytes come by ``pread`` into a buffer that grows as the
pickles need it, never from a map, so a file cut short or rewritten while it is parsed gives a
:class:`CorruptCheckpointError`, never ``SIGBUS`` and never bytes of two versions of the file."""

from __future__ import annotations

from typing import Any

import numpy as np

from .mapped import MappedFile
from .pickle_reader import Unpickled, unpickle_from
from .pickle_scan import TruncatedPickle

SPAN, GAP = 256 << 10, 8 << 10  # count fields: one read of their span if it is under max(SPAN, GAP x count)
FIRST_READ = 64 << 10  # bytes read at each pickle first; a pickle running past them reads 16 times more


class PickleFile:
    """The first bytes of ``source`` read so far (``head``), and pickles unpickled from them."""

    def __init__(self, source: MappedFile):
        self.source = source
        self.head = b""

    def _cover(self, end: int) -> None:
        """Read the file up to ``end`` (at most its size) into ``head``."""
        end = min(end, self.source.size)
        if end > len(self.head):
            self.head += self.source.pread(len(self.head), end - len(self.head))

    def load(self, pos: int, **kwargs: Any) -> tuple[Any, Unpickled]:
        """Unpickle the pickle starting at byte ``pos``; ``found.end`` is its length."""
        self._cover(pos + FIRST_READ)
        while True:
            try:
                return unpickle_from(self.head, pos, first_window=len(self.head) - pos, **kwargs)
            except TruncatedPickle:
                if len(self.head) >= self.source.size:
                    raise
                self._cover(pos + 16 * max(FIRST_READ, len(self.head) - pos))

    def words(self, offsets: list[int]) -> list[int]:
        """The little-endian int64 at each offset (each inside the file): from ``head`` where it lies
        there, the rest from one read of the span they cover when they lie close together (a ``pread``
        costs about what copying ``GAP`` bytes does), else one ``pread`` each, the file checked before
        and after."""
        cut = len(self.head) - 8
        inside = [at for at in offsets if at > cut]
        if inside:
            lo, hi = min(inside), max(inside) + 8
            if hi - lo <= max(SPAN, GAP * len(inside)):
                span = np.frombuffer(self.source.pread(lo, hi - lo), dtype=np.uint8)
                rows = span[(np.array(inside, dtype=np.int64) - lo)[:, None] + np.arange(8)]
            else:
                rows = np.empty((len(inside), 8), dtype=np.uint8)
                self.source.read_many(inside, rows)
            far = iter(np.ascontiguousarray(rows).view("<i8")[:, 0].tolist())
        head = self.head
        return [int.from_bytes(head[at : at + 8], "little", signed=True) if at <= cut else next(far)
                for at in offsets]
