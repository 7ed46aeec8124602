"""What every reader returns: the unpickled tree with lazy tensors, and where their bytes live."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .mapped import MappedFile
from .pickle_reader import StorageRef


@dataclass
class RawCheckpoint:
    format: str
    root: Any
    unsafe: set[str]
    source: MappedFile
    storages: dict[str, StorageRef] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)  # storage key -> end of its bytes
    extra_metadata: dict[str, Any] = field(default_factory=dict)

    def damaged_storages(self) -> list[str]:
        """Storages whose declared bytes do not fit in the file."""
        bad = []
        for key, ref in self.storages.items():
            why = self.source.check(ref, self.limits.get(key))
            if why:
                bad.append(why)
        return bad
