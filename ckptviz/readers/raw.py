"""What every reader returns: the unpickled tree with lazy tensors (or sections already found, for
layouts that carry their own structure), where their bytes live, and plain facts about the files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .mapped import MappedFile
from .records import StorageRef, TensorTable


@dataclass
class RawCheckpoint:
    format: str
    root: Any
    unsafe: set[str]
    source: MappedFile | None
    storages: dict[str, StorageRef] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)  # storage key -> end of its bytes
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # every file behind the checkpoint
    sections: dict[str, TensorTable] | None = None  # found by the reader; None: find them in ``root``
    optimizers: dict[str, Any] | None = None
    location: str | None = None  # the folder that is the checkpoint, when it is one
    warnings: list[str] = field(default_factory=list)  # things a user should know that did not stop the read
    trust: bool = False  # set by open_checkpoint; readers that unpickle more files on first read honour it

    def damaged_storages(self) -> list[str]:
        """Storages whose declared bytes do not fit in the file."""
        bad = []
        for key, ref in self.storages.items():
            why = self.source.check(ref, self.limits.get(key))
            if why:
                bad.append(why)
        return bad
