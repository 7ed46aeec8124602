"""Reader limits: what a file may *declare* before ckptviz refuses to build or allocate it. Each is
a module constant, read at the time of use, so a trusted file beyond one can be opened after raising
it (``ckptviz.readers.limits.MAX_NUMEL = 2**50``). A limit hit inside a reader raises
:class:`LimitExceeded`, which the container readers turn into a :class:`CheckpointLimitError`
naming the file."""

from __future__ import annotations

import pickle

from ..errors import CheckpointLimitError

MAX_NUMEL = 2**48  # elements one tensor may declare (256 Ti elements; the largest real tensors are ~2**36)
NUMEL_CEILING = 2**58  # MAX_NUMEL is honoured up to this: byte counts of 16-byte elements stay within int64


class LimitExceeded(pickle.UnpicklingError):
    """A reader limit was hit; ``constant`` is the dotted name of the module constant."""

    def __init__(self, what: str, constant: str, value: int, note: str = ""):
        self.constant, self.value = constant, value
        module, _, name = constant.rpartition(".")
        note = f", {note}" if note else ""
        super().__init__(
            f"{what}: beyond the limit {constant} = {value:_}. If you trust the file, raise it "
            f"(`import {module}; {module}.{name} = ...`{note}) and open the file again")


def limit_error(path: str, e: LimitExceeded) -> CheckpointLimitError:
    """The CheckpointLimitError for a limit hit while reading ``path``."""
    return CheckpointLimitError(f"{path}: the file declares more than ckptviz reads by default: {e}.")


def check_numel(shape: tuple[int, ...], numel: int, what: str = "a tensor") -> None:
    """Refuse a shape declaring more than :data:`MAX_NUMEL` elements (before anything is sized by it)."""
    if numel > min(MAX_NUMEL, NUMEL_CEILING):
        raise LimitExceeded(f"{what} of shape {_shape(shape)} declares {_big(numel)} elements",
                            "ckptviz.readers.limits.MAX_NUMEL", MAX_NUMEL, "at most NUMEL_CEILING = 2**58")


def _shape(shape) -> str:
    text = str(tuple(shape))
    return text if len(text) <= 80 else text[:77] + "..."


def _big(n: int) -> str:
    return f"{n:_}" if n < 10**30 else f"about 2**{n.bit_length() - 1}"


__all__ = ["MAX_NUMEL", "NUMEL_CEILING", "LimitExceeded", "check_numel", "limit_error"]
