"""How the command line prints: rich tables sized to the terminal (colour only on a TTY), JSON, or CSV."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from . import UsageError

STATUS_STYLES = {
    "match": "green", "both": "green", "shape_mismatch": "bold red", "shape_differs": "bold red",
    "dtype_mismatch": "magenta", "dtype_differs": "magenta", "adapted": "cyan", "suggested": "bright_magenta",
    "missing": "yellow", "only_a": "yellow", "unexpected": "blue", "only_b": "blue",
}
TTY_ROWS = 40
PIPE_ROWS = 1000
PIPE_WIDTH = 200
KEY_WIDTH = 40  # the key column keeps up to this many characters before other columns are squeezed


class Output:
    """One verb's printing: ``format`` is "table", "json" or "csv"; tables show ``limit`` rows."""

    def __init__(self, args: Any, stream=None):
        from rich.console import Console

        self.format = args.format
        self.stream = stream or sys.stdout
        self.console = Console(file=self.stream, soft_wrap=False, highlight=False)
        tty = self.console.is_terminal
        if not tty and "COLUMNS" not in os.environ:  # piped into a file or a pager: no need to squeeze
            self.console.width = PIPE_WIDTH
        self.err = Console(file=sys.stderr, highlight=False)
        self.limit = None if args.all else args.limit if args.limit is not None else TTY_ROWS if tty else PIPE_ROWS

    def line(self, text: str = "", style: str | None = None) -> None:
        if self.format == "table":
            self.console.print(text, style=style, markup=False)

    def note(self, text: str) -> None:
        """A message for people (stderr), whatever the format."""
        self.err.print(text, markup=False, style="yellow")

    def table(self, frame: pd.DataFrame, title: str | None = None, *, index: bool = True,
              styles: Mapping[str, Callable[[Any], str | None]] | None = None, whole: bool = False) -> None:
        """``frame`` as a terminal table of at most ``limit`` rows (then how many were left out), or all of a
        short summary table (``whole``)."""
        from rich.table import Table
        from rich.text import Text

        if self.format != "table":
            return
        shown = frame if self.limit is None or whole else frame.iloc[: self.limit]
        t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, header_style="bold")
        cols = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
        for i, c in enumerate(cols):
            numeric = i >= index and pd.api.types.is_numeric_dtype(frame[frame.columns[i - index]])
            t.add_column(c, justify="right" if numeric else "left", overflow="fold" if i == 0 else "ellipsis",
                         no_wrap=i > 0, min_width=min(KEY_WIDTH, _longest(shown, index)) if i == 0 else None)
        styles = styles or {}
        for key, row in zip(shown.index, shown.itertuples(index=False)):
            cells = [key] if index else []
            cells += list(row)
            out = []
            for c, v in zip(cols, cells):
                style = styles[c](v) if c in styles else None
                out.append(Text(cell(v), style=style or ""))
            t.add_row(*out)
        self.console.print(t)
        if len(shown) < len(frame):
            self.console.print(f"... {len(frame) - len(shown):,} more rows (--all to show them, --json or --csv for "
                               "everything)", style="dim", markup=False)

    def json(self, obj: Any) -> None:
        json.dump(plain(obj), self.stream, allow_nan=False, separators=(",", ":"))
        self.stream.write("\n")

    def csv(self, frame: pd.DataFrame, *, index: bool = True) -> None:
        frame.map(_csv_cell).to_csv(self.stream, index=index)


def _longest(frame: pd.DataFrame, index: bool) -> int:
    first = frame.index if index else frame.iloc[:, 0]
    return max((len(str(v)) for v in first), default=1)


def cell(v: Any) -> str:
    """A table cell: shapes as (2, 3), floats in 4 significant digits, None/NaN as blank."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(map(str, v)) + ("," if len(v) == 1 else "") + ")"
    return str(v)


def status_style(v: Any) -> str | None:
    return STATUS_STYLES.get(str(v))


def records(frame: pd.DataFrame, *, index: bool = True) -> list[dict[str, Any]]:
    """JSON-ready rows: the index as a column, tuples as lists, NaN as null, numpy scalars as Python."""
    f = frame.reset_index() if index else frame
    cols = [str(c) for c in f.columns]
    return [{c: plain(v) for c, v in zip(cols, row)} for row in f.itertuples(index=False)]


def plain(v: Any) -> Any:
    """A JSON-safe value."""
    if v is None or v is pd.NA or isinstance(v, (bool, str)):
        return None if v is pd.NA else v
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): plain(x) for k, x in v.items()}
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy and torch scalars
        v = v.item()
    if isinstance(v, float):
        return None if not math.isfinite(v) else v
    if isinstance(v, int):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return str(v)


def _csv_cell(v: Any) -> Any:
    return cell(v) if isinstance(v, tuple) else v


def fail_statuses(text: str, known: tuple[str, ...], *, any_means: tuple[str, ...] = ()) -> set[str]:
    """Parse ``--fail-on a,b``; 'any' stands for ``any_means``. Unknown names raise UsageError."""
    out: set[str] = set()
    for word in filter(None, (w.strip() for w in text.split(","))):
        if word == "any" and any_means:
            out.update(any_means)
        elif word in known:
            out.add(word)
        else:
            raise UsageError(f"--fail-on {word!r} is not one of {', '.join(known)}"
                             + (", any" if any_means else ""))
    return out
