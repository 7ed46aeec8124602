"""``paused_gc()``: pause the cyclic garbage collector while a reader builds many long-lived objects."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many long-lived objects: a header or pickle of
    500,000 entries makes millions of small objects without cycles, and each collection their
    allocation triggers would re-walk the whole growing heap (about 2x the time); reference counting
    still frees the rest at once. On the way out the objects made meanwhile join the oldest generation
    (``freeze`` then ``unfreeze``, skipped if anything was frozen before) instead of being walked by the
    next young collection."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            if gc.get_count()[0] > 10_000 and gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()
