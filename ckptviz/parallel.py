"""Shard-parallel work over checkpoints: a section's keys cut into tasks by file (and by bytes inside a
big file), run on a pluggable executor and merged back in key order. Worker threads by default; any
``concurrent.futures.Executor`` otherwise, including a ``dask.distributed`` Client (or its
``get_executor()``) for folders on shared storage that outgrow one machine. Tasks carry checkpoints,
which pickle as "open this path again" (see ``Checkpoint.__reduce__``), so a remote worker reads the
files itself. Every task computes with one intra-op thread, so results never depend on the executor,
bit for bit."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

import torch

from .readers.records import TensorTable

TASK_BYTES = 64 * 2**20  # bytes of tensor data per task, at most (a bigger tensor alone); small: threads balance
TASK_KEYS = 2048  # keys per task, at most
MAX_THREADS = 4
INLINE_BYTES = 2**20  # by default, work averaging fewer bytes per item runs in the calling thread


def plan(table: TensorTable, keys: Sequence[str] | None = None) -> list[list[str]]:
    """``keys`` (default: all of ``table``) in table order, cut into tasks: one file's keys per task,
    each task at most ``TASK_BYTES`` of data (a bigger tensor alone) and ``TASK_KEYS`` keys."""
    index = table.index
    rows = sorted(index[k] for k in keys) if keys is not None else range(len(table))
    nbytes = table.nbytes()
    tasks: list[list[str]] = []
    current, held, file = [], 0, None
    for i in rows:
        size, f = int(nbytes[i]), table.file[i]
        if current and (f != file or held + size > TASK_BYTES or len(current) >= TASK_KEYS):
            tasks.append(current)
            current, held = [], 0
        current.append(table.keys_list[i])
        held, file = held + size, f
    if current:
        tasks.append(current)
    return tasks


class _Inline(Executor):
    """Runs each task at once in the calling thread: for many small items, where worker threads only
    contend for the GIL (5,000 tiny tensors: 2x slower on two threads than on one)."""

    def submit(self, fn, /, *args, **kwargs):
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 (handed to the caller through the future)
            fut.set_exception(e)
        return fut


def resolve(executor: Any, inline: bool = False) -> tuple[Executor, bool]:
    """(the executor to submit to, whether ckptviz made it and must shut it down); ``inline``: the
    default is the calling thread rather than worker threads."""
    if executor is None and inline:
        return _Inline(), True
    if executor is None:
        return ThreadPoolExecutor(max(1, min(MAX_THREADS, os.cpu_count() or 1)), thread_name_prefix="ckptviz"), True
    if hasattr(executor, "get_executor") and not isinstance(executor, Executor):  # a dask.distributed Client
        return executor.get_executor(), False
    if isinstance(executor, Executor):
        return executor, False
    raise TypeError(f"executor must be a concurrent.futures.Executor or a dask.distributed Client, "
                    f"got {type(executor).__name__}")


def one_thread(fn: Callable, *args: Any) -> Any:
    """Run ``fn(*args)`` with one torch intra-op thread (the same arithmetic on every executor)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # in a worker process of its own; in-process pools are set by ``run``
    return fn(*args)


@contextmanager
def _in_process_threads(pool: Executor) -> Iterator[None]:
    """Thread pools share this process's torch thread count: hold it at one while they run."""
    if not isinstance(pool, (ThreadPoolExecutor, _Inline)):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(fn: Callable, tasks: Sequence[tuple], *, executor: Any = None, sizes: Sequence[int] | None = None,
        progress: bool | None = None, desc: str = "", tick: Callable[[float], None] | None = None,
        progress_bytes: int = 256 * 2**20, items: int | None = None) -> list:
    """``[fn(*task) for task in tasks]``, computed on ``executor``; results in task order.

    With the default executor, work of ``items`` items (tensors) averaging under ``INLINE_BYTES`` each
    runs in the calling thread (threads would only contend for the GIL); the numbers are the same.

    ``sizes`` (bytes per task) drive a ``tqdm.auto`` bar (shown when ``progress`` is True, or when it is
    None and they exceed ``progress_bytes``) and ``tick(fraction done)``, both as tasks finish.
    """
    sizes = list(sizes) if sizes is not None else [1] * len(tasks)
    total = max(sum(sizes), 1)
    bar = None
    if progress or (progress is None and total > progress_bytes):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
    pool, owned = resolve(executor, inline=bool(items) and sum(sizes) < INLINE_BYTES * items)
    results: list = [None] * len(tasks)
    done = 0
    try:
        with _in_process_threads(pool):
            futures = {pool.submit(one_thread, fn, *task): i for i, task in enumerate(tasks)}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    results[i] = fut.result()
                    done += sizes[i]
                    if bar is not None:
                        bar.update(sizes[i])
                    if tick:
                        tick(done / total)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        if owned:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return results
