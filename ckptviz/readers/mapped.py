"""Byte access to a checkpoint file that stays right while the file changes under it.

A :class:`MappedFile` opens its file once and records its identity (device, inode, size, modification
time). Reads go through that descriptor with ``pread`` into memory the caller owns, with the identity
checked before and after: a file truncated, rewritten or appended to since it was opened gives a
:class:`CorruptCheckpointError` ("the file changed on disk since it was opened"), never ``SIGBUS`` and
never the new bytes read through the old layout. A file replaced by a rename (``os.replace``) keeps
its old inode alive for the open descriptor, so reads keep giving the old file's values; once the
descriptor was closed (at most ``OPEN_FILES`` stay open, least recently used first) reopening it
refuses the new file the same way.

Zero-copy reads (``copy=False``) are views of ONE private (copy-on-write) map per file, made on first
use from the checked descriptor and shared by every tensor of the file: fast, and writes never reach
the file, but a file truncated under the map faults when a view past its new end is touched. Use them
only on files nothing is writing.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from .records import StorageRef, TensorRef, contiguous_stride, element_size

OPEN_FILES = 64  # descriptors kept open across the process, least recently used closed first
_MAX_IO = 0x7FFFF000  # Linux moves at most this many bytes per read call


def file_stamp(path: str) -> tuple[int, int, int, int]:
    """What identifies the file's current contents: (mtime_ns, size, inode, device)."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class _Handle:
    """The open descriptor of one MappedFile (None while closed) and how many reads use it now."""

    __slots__ = ("fd", "pins", "__weakref__")

    def __init__(self, fd: int | None):
        self.fd, self.pins = fd, 0


_lock = threading.Lock()
_open: OrderedDict[_Handle, None] = OrderedDict()  # the open descriptors, least recently used first


def open_descriptors() -> int:
    """How many checkpoint files ckptviz holds open now (at most ``OPEN_FILES`` while none is in use)."""
    with _lock:
        return len(_open)


def _evict() -> None:
    """Close the least recently used descriptors beyond ``OPEN_FILES`` (never one a read is using)."""
    if len(_open) <= OPEN_FILES:
        return
    for h in list(_open):
        if len(_open) <= OPEN_FILES:
            break
        if h.pins == 0:
            del _open[h]
            fd, h.fd = h.fd, None
            os.close(fd)


def _forget(h: _Handle) -> None:
    """Finalizer of a MappedFile: close its descriptor."""
    with _lock:
        _open.pop(h, None)
        if h.fd is not None and h.pins == 0:
            fd, h.fd = h.fd, None
            os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class MappedFile:
    """One checkpoint file, held open: checked reads of its bytes, and its one shared private map."""

    def __init__(self, path: str, offsets: dict[str, int] | None = None, *, identity: tuple | None = None):
        self.path = path
        self.offsets = offsets if offsets is not None else {}  # storage key -> absolute byte offset of its data
        self._map: torch.UntypedStorage | None = None
        self._map_lock = threading.Lock()
        if identity is None:  # a fresh open: this descriptor's file is the one the caller parses
            fd = _open_fd(path)
            identity = _identity(os.fstat(fd))
            self._h = _Handle(fd)
            with _lock:
                _open[self._h] = None
                _evict()
        else:  # a copy sent to another process: reopened, and checked, on first read
            self._h = _Handle(None)
        self.identity = identity
        self.size = identity[2]
        self.stamp = (identity[3], identity[2])  # (mtime_ns, size), as ``file_stamp`` gives
        weakref.finalize(self, _forget, self._h)

    def __reduce__(self):  # pickles as "this file, as it was when opened"; copies share the handle
        return (_unpickled, (self.path, self.offsets, self.identity))

    def __copy__(self) -> MappedFile:
        return self

    def __deepcopy__(self, memo: dict) -> MappedFile:
        return self

    # ---- the descriptor ----------------------------------------------------------------------
    def _acquire(self) -> int:
        h = self._h
        with _lock:
            if h.fd is not None:
                _open.move_to_end(h)
                h.pins += 1
                return h.fd
        fd = _open_fd(self.path, changed=self._changed)
        st = os.fstat(fd)
        if _identity(st) != self.identity:
            os.close(fd)
            raise self._changed(st.st_size)
        with _lock:
            if h.fd is None:
                h.fd = fd
                _open[h] = None
            else:  # another thread reopened it meanwhile
                os.close(fd)
            h.pins += 1
            fd = h.fd
            _evict()
        return fd

    def _release(self) -> None:
        with _lock:
            self._h.pins -= 1
            _evict()

    def _changed(self, size: int | None = None, replaced: bool = False) -> CorruptCheckpointError:
        if replaced:
            now = "it was replaced by another file"
        else:
            now = f"size {self.size} -> {size} bytes" if size is not None and size != self.size else "it was modified"
        return CorruptCheckpointError(
            f"{self.path}: the file changed on disk since it was opened ({now}); open the checkpoint again "
            "to read the new contents (a layout read before the change cannot read the new bytes)."
        )

    def _check(self, fd: int, path_too: bool = False) -> None:
        """Raise if the open file changed; ``path_too``: also if the path now names another file (an
        atomic replace), so reads never quietly give the old file's values from a kept descriptor."""
        st = os.fstat(fd)
        if st.st_size != self.size or st.st_mtime_ns != self.identity[3]:
            raise self._changed(st.st_size)
        if path_too:
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{self.path}: the file is gone since it was opened (deleted or "
                                             "renamed); open the checkpoint again.") from None
            if (now.st_dev, now.st_ino) != self.identity[:2]:
                raise self._changed(replaced=True)

    def verify(self) -> None:
        """Raise if the file changed (size or modification time) since it was opened."""
        fd = self._acquire()
        try:
            self._check(fd, path_too=True)
        except OSError as e:
            raise CorruptCheckpointError(f"{self.path}: the file can no longer be read ({e}); open it again.") from None
        finally:
            self._release()

    # ---- checked reads -------------------------------------------------------------------------
    def readinto(self, offset: int, out: Any) -> None:
        """Fill ``out`` (a contiguous CPU tensor, or any writable buffer) with the file's bytes from
        ``offset``, checking the file before and after: a change or a short read raises."""
        view = _bytes_of(out)
        n = len(view)
        if offset < 0 or offset + n > self.size:
            raise CorruptCheckpointError(f"{self.path}: bytes {offset}..{offset + n} lie outside the file "
                                         f"({self.size} bytes); the file is corrupted.")
        if not n:
            return
        fd = self._acquire()
        try:
            self._check(fd, path_too=True)
            parts = _parts(n)
            if len(parts) == 1:
                self._read_span(fd, view, offset, 0, n)
            else:  # big reads in parallel: the kernel's copy out of the page cache is one thread per call
                list(_pool().map(lambda p: self._read_span(fd, view, offset, *p), parts))
            self._check(fd)
        except OSError as e:
            raise CorruptCheckpointError(f"{self.path}: reading bytes {offset}..{offset + n} failed ({e}).") from None
        finally:
            self._release()

    def _read_span(self, fd: int, view: memoryview, offset: int, lo: int, hi: int) -> None:
        """Bytes ``[lo, hi)`` of ``view`` from the file at ``offset + lo``."""
        done = lo
        while done < hi:
            got = os.preadv(fd, [view[done : min(hi, done + _MAX_IO)]], offset + done)
            if got <= 0:
                self._check(fd)  # a shrunken file says so; otherwise the read itself was cut
                raise CorruptCheckpointError(f"{self.path}: the read of bytes {offset}..{offset + len(view)} stopped "
                                             f"at {offset + done} (the file was cut short?); open it again.")
            done += got

    def read_many(self, offsets: list[int], out: np.ndarray) -> None:
        """Row ``i`` of ``out`` (uint8, ``(len(offsets), width)``) from the file at ``offsets[i]``: one
        ``pread`` per row, the file checked once before and once after them all."""
        width = out.shape[1]
        if any(at < 0 or at + width > self.size for at in offsets):
            raise CorruptCheckpointError(f"{self.path}: a record lies outside the file ({self.size} bytes); "
                                         "the file is corrupted.")
        fd = self._acquire()
        try:
            self._check(fd, path_too=True)
            for i, at in enumerate(offsets):
                self._read_span(fd, memoryview(out[i]), at, 0, width)
            self._check(fd)
        except OSError as e:
            raise CorruptCheckpointError(f"{self.path}: reading the file failed ({e}).") from None
        finally:
            self._release()

    def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (fewer at the end of the file, as a slice of it would give)."""
        n = max(0, min(n, self.size - offset))
        if offset < 0 or not n:
            return b""
        buf = bytearray(n)
        self.readinto(offset, buf)
        return bytes(buf)

    def view(self) -> FileBytes:
        """The file as a read-only sliceable object reading through the checked descriptor."""
        return FileBytes(self)

    # ---- the shared map (zero-copy reads) ------------------------------------------------------
    def map(self) -> torch.UntypedStorage | None:
        """The file's one private map (costs address space only, no reads), made on first use from the
        checked descriptor and shared by every zero-copy tensor of the file; None if the file is empty."""
        with self._map_lock:
            fd = self._acquire()
            try:
                self._check(fd, path_too=True)
                if self._map is None and self.size:
                    try:  # /proc/self/fd/N maps the very inode that was checked, whatever the path names now
                        self._map = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=False,
                                                                   nbytes=self.size)
                    except RuntimeError as e:
                        raise CorruptCheckpointError(f"{self.path}: could not map the file ({e}).") from None
            finally:
                self._release()
            return self._map

    def storage(self, ref: StorageRef, whole: torch.UntypedStorage | None = None) -> torch.UntypedStorage:
        """The bytes of ``ref``: a view of ``whole`` (the map from :meth:`map`), or a copy if misaligned."""
        start = self.offsets[ref.key] + ref.byte_offset
        nbytes = ref.nbytes
        if start % element_size(ref.dtype):  # misaligned for its dtype: copy instead of mapping
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self.readinto(start, buf)
            return buf.untyped_storage()
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


PARALLEL_READ = 8 << 20  # reads larger than this are split across READ_THREADS threads


def _parts(n: int) -> list[tuple[int, int]]:
    """Byte ranges of a read of ``n`` bytes, one per thread (one range for small reads)."""
    k = min(_threads(), n // PARALLEL_READ)
    if k <= 1:
        return [(0, n)]
    step = -(-n // k)
    step += -step % 4096  # page-aligned boundaries
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _threads() -> int:
    return max(1, min(8, torch.get_num_threads()))


_pool_box: list[Any] = []


def _pool():
    """The thread pool big reads share (made on first use, and again in a forked child, whose copy
    of the parent's pool has no threads)."""
    with _lock:
        if not _pool_box or _pool_box[0][0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            _pool_box[:] = [(os.getpid(), ThreadPoolExecutor(_threads(), thread_name_prefix="ckptviz-read"))]
        return _pool_box[0][1]


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a lock some parent thread held at the fork would never be released here
    _pool_box.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class FileBytes:
    """A file as ``len()`` and ``[a:b]`` slices (bytes), read through a MappedFile's checked descriptor:
    what parsers use instead of a map of the file, so a file cut short while it is parsed gives short
    reads (then an error), never a fault."""

    def __init__(self, source: MappedFile):
        self.source = source

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, item: slice) -> bytes:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("FileBytes takes slices with step 1 only")
        start, stop, _ = item.indices(self.source.size)
        return self.source.pread(start, stop - start)

    SPAN = 64 << 20  # scattered small reads go through one read of the span they cover, up to this

    def gather(self, offsets: np.ndarray, width: int) -> np.ndarray:
        """(n, width) uint8: ``width`` bytes from each offset (each inside the file)."""
        out = np.empty((len(offsets), width), dtype=np.uint8)
        if not len(offsets):
            return out
        lo, hi = int(offsets.min()), int(offsets.max()) + width
        if hi - lo <= max(self.SPAN, 4 * width * len(offsets)):
            span = np.empty(hi - lo, dtype=np.uint8)
            self.source.readinto(lo, span)
            return span[(offsets - lo)[:, None] + np.arange(width)]
        self.source.read_many(offsets.tolist(), out)
        return out


def _unpickled(path: str, offsets: dict[str, int], identity: tuple) -> MappedFile:
    return MappedFile(path, offsets, identity=identity)


def _open_fd(path: str, changed: Any = None) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if changed is not None:
            raise CorruptCheckpointError(f"{path}: the file is gone since it was opened (deleted or renamed); "
                                         "open the checkpoint again.") from None
        raise CheckpointNotFoundError(f"{path}: no such file.") from None
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot be opened ({e}).") from None


def _bytes_of(out: Any) -> memoryview:
    """A writable byte view of ``out`` (a contiguous CPU tensor, or a writable buffer)."""
    if isinstance(out, torch.Tensor):
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("reads go into contiguous CPU tensors")
        nbytes = out.numel() * out.element_size()
        if not nbytes:
            return memoryview(bytearray(0))
        return memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
    view = memoryview(out)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# ---- tensors from records ------------------------------------------------------------------------
def _extent(ref: TensorRef) -> tuple[int, int]:
    """(first element, elements from the first to the last) that ``ref`` touches in its storage."""
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    return ref.offset, last - ref.offset + 1


def _start(ref: TensorRef, element: int) -> int:
    st = ref.storage
    return st.source.offsets[st.key] + st.byte_offset + element * element_size(ref.dtype)


def is_dense(ref: TensorRef) -> bool:
    """Whether ``ref``'s elements lie back to back in row-major order (one read fills a contiguous tensor)."""
    return tuple(ref.stride) == contiguous_stride(ref.shape) or ref.numel <= 1


def read_tensor(ref: TensorRef, copy: bool = True) -> torch.Tensor:
    """``ref``'s value on the CPU: read into memory of its own (``copy=True``: ``pread``, the file
    checked before and after), or a view of the file's one shared private map (``copy=False``)."""
    if ref.storage is None:
        return torch.empty_strided(ref.shape, ref.stride, dtype=ref.dtype, device="meta")
    if not copy:
        return materialize(ref)
    if ref.numel == 0:
        return torch.empty_strided(ref.shape, ref.stride, dtype=ref.dtype)
    first, span = _extent(ref)
    buf = torch.empty(span, dtype=ref.dtype)
    ref.storage.source.readinto(_start(ref, first), buf)
    if span == ref.numel and is_dense(ref):
        return buf.view(ref.shape)
    return buf.as_strided(ref.shape, ref.stride)


def read_shared(refs: list[TensorRef]) -> list[torch.Tensor]:
    """The values of several records over ONE storage (tied weights, views of one flat buffer), read in
    one pass over the bytes they span into one owned buffer, so that they share memory as the saved
    tensors did (as ``torch.load`` gives them)."""
    source = refs[0].storage.source
    spans = []
    for r in refs:
        item = element_size(r.dtype)
        first, count = _extent(r) if r.numel else (r.offset, 0)
        spans.append((_start(r, first), _start(r, first) + count * item, item))
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    if any((a - lo) % item for a, _, item in spans) or hi <= lo:
        return [read_tensor(r) for r in refs]
    buf = torch.empty(hi - lo, dtype=torch.uint8)
    source.readinto(lo, buf)
    whole = buf.untyped_storage()
    return [torch.empty((0,), dtype=r.dtype).set_(whole, (a - lo) // item, r.shape, r.stride)
            for r, (a, _, item) in zip(refs, spans)]


def read_into(ref: TensorRef, out: torch.Tensor) -> None:
    """Write ``ref``'s values into ``out`` (same shape): straight from the file when both are dense and
    of one dtype, else read then copied."""
    if (ref.storage is not None and out.dtype == ref.dtype and out.device.type == "cpu" and out.is_contiguous()
            and is_dense(ref) and tuple(out.shape) == tuple(ref.shape)):
        ref.storage.source.readinto(_start(ref, ref.offset), out)
        return
    out.copy_(read_tensor(ref))


def read_elements(ref: TensorRef, start: int, out: torch.Tensor) -> None:
    """Write ``out.numel()`` elements of ``ref`` (flattened), from element ``start``, into ``out``."""
    n = out.numel()
    if ref.storage is not None and is_dense(ref) and out.dtype == ref.dtype and out.is_contiguous():
        if start < 0 or start + n > ref.numel:
            raise CorruptCheckpointError(f"{ref.storage.source.path}: elements {start}..{start + n} lie outside "
                                         f"a tensor of {ref.numel}.")
        ref.storage.source.readinto(_start(ref, ref.offset + start), out)
        return
    out.copy_(read_tensor(ref).reshape(-1)[start : start + n].view(out.shape))


class Reads(dict):
    """How one call reads tensors (``copy``: owned memory, or views of each file's shared map); as a
    dict it holds what the call's reads share (readers key it as they like)."""

    def __init__(self, copy: bool = True):
        super().__init__()
        self.copy = copy

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        return read_tensor(ref, self.copy)


def copying(reads: Any) -> bool:
    """Whether ``reads`` (a :class:`Reads`, or a plain dict from older callers) asks for owned memory."""
    return getattr(reads, "copy", True)


def materialize(ref: TensorRef, whole: torch.UntypedStorage | None = None) -> torch.Tensor:
    """Build a CPU tensor viewing ``ref``'s bytes in its file's shared map (no copy where the bytes are
    aligned; ``whole`` defaults to that map)."""
    if ref.storage is None:
        return torch.empty_strided(ref.shape, ref.stride, dtype=ref.dtype, device="meta")
    storage = ref.storage.source.storage(ref.storage, whole)
    return torch.empty((0,), dtype=ref.dtype).set_(storage, ref.offset, ref.shape, ref.stride)
