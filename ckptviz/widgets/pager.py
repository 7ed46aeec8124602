"""The kernel side of every ckptviz table: a :class:`TableSource` (one result frame and how it looks)
and a :class:`Pager` that filters, searches, sorts, folds and pages it, and keeps the selection.

The browser only ever receives :meth:`Pager.view`: one page of HTML cells. Everything here is column
work on the whole frame (boolean masks, cached argsorts, factorized columns), so a 500,000-row frame
pages, searches and sorts in the kernel without building a row object per key. No ipywidgets here."""

from __future__ import annotations

import html
import re
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..fold import FOLD_THRESHOLD, Folding, fold_keys

GROUP, ROW = 1, 0


class TableSource:
    """One frame as a table: which ``COLUMNS`` it shows (``display`` makes their HTML cells for some
    rows), which ``FILTERS`` it offers (``passes``), which columns the search reads (``SEARCH``),
    which columns a folded group row counts value by value (``COUNTED``), and the counts line."""

    COLUMNS: list[str] = []
    FILTERS: tuple[str, ...] = ("all",)
    SEARCH: list[str] = ["key"]
    COUNTED: tuple[str, ...] = ()
    EMPTY = ""  # the counts line when there is nothing to show

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self._folding: Folding | None = None
        self._hay: pd.Series | None = None
        self._codes: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.frame)

    def passes(self, choice: str) -> np.ndarray | None:
        """Rows that pass the filter ``choice`` (None: all)."""
        return None

    def display(self, rows: pd.DataFrame) -> pd.DataFrame:
        """``rows`` of the frame as HTML cells, one column per ``COLUMNS``."""
        raise NotImplementedError

    def counts_html(self) -> str:
        return ""

    def group_keys(self) -> list[str]:
        """The key each row folds by."""
        return self.frame[self.SEARCH[0]].fillna("").tolist()

    def group_cells(self, members: np.ndarray) -> dict[str, str]:
        """Cells of a group row that are not counts or distinct values of a frame column."""
        return {}

    def sort_values(self, column: str) -> np.ndarray | None:
        """What ``column`` sorts by (None: not sortable)."""
        return self.frame[column].to_numpy() if column in self.frame.columns else None

    # ---- cached column work ----------------------------------------------------------------
    @property
    def folding(self) -> Folding:
        if self._folding is None:
            self._folding = fold_keys(self.group_keys())
        return self._folding

    def haystack(self) -> pd.Series:
        """The searched text of every row (its ``SEARCH`` columns joined), lower-cased."""
        if self._hay is None:
            hay = self.frame[self.SEARCH[0]].fillna("").astype(str)
            for c in self.SEARCH[1:]:
                hay = hay + "\n" + self.frame[c].fillna("").astype(str)
            self._hay = hay.str.lower().reset_index(drop=True)
        return self._hay

    def codes(self, column: str) -> np.ndarray:
        """``column`` factorized (missing values get code -1)."""
        if column not in self._codes:
            self._codes[column] = pd.factorize(self.frame[column].to_numpy())[0]
        return self._codes[column]


def search_mask(hay: pd.Series, text: str) -> np.ndarray | None:
    """Rows whose text contains ``text`` (a regex, or plain text when it is not a valid one;
    case-insensitive); None for blank text."""
    text = text.strip()
    if not text:
        return None
    if re.escape(text) == text:  # no regex syntax: a plain substring search, much faster
        return hay.str.contains(text.lower(), regex=False).to_numpy(dtype=bool)
    try:
        pattern = re.compile(text, re.IGNORECASE)
    except re.error:
        return hay.str.contains(text.lower(), regex=False).to_numpy(dtype=bool)
    with warnings.catch_warnings():  # pandas warns about match groups in the user's regex: harmless here
        warnings.simplefilter("ignore", UserWarning)
        return hay.str.contains(pattern, regex=True).to_numpy(dtype=bool)


def _argsort(values: np.ndarray, ascending: bool) -> np.ndarray:
    """A stable order of ``values`` (numbers numerically, anything else by its text; missing last)."""
    s = pd.Series(values)
    missing = s.isna().to_numpy()
    if s.map(type).eq(tuple).any():  # shapes: by element count, then by their text
        codes, uniques = pd.factorize(s.map(lambda v: v if isinstance(v, tuple) else ()).to_numpy())
        numel = [float(np.prod(u)) for u in uniques]
        rank = np.empty(len(uniques), dtype=np.int64)
        rank[np.lexsort(([repr(u) for u in uniques], numel))] = np.arange(len(uniques))
        v = rank[codes]  # equal shapes get equal ranks, so ties keep frame order both ways
    elif not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        v = s.map(lambda v: "" if v is None or v != v else (v if isinstance(v, str) else repr(v))).to_numpy()
    else:
        v = s.to_numpy()
    if ascending:
        order = np.argsort(v, kind="stable")
    else:  # descending, equal values still in frame order
        order = (len(v) - 1 - np.argsort(v[::-1], kind="stable"))[::-1]
    return np.concatenate([order[~missing[order]], order[missing[order]]])


class Pager:
    """Filter, search, sort, fold and page a :class:`TableSource`; the selection (frame positions)
    lives here, across pages, filters and searches."""

    def __init__(self, page_size: int = 15):
        self.source: TableSource | None = None
        self.page_size = page_size
        self.choice = "all"
        self.search = ""
        self.sort: tuple[str | None, bool] = (None, True)
        self.folded: bool | None = None  # None: fold when the frame has more than FOLD_THRESHOLD rows
        self.expanded: set[int] = set()
        self.selected: set[int] = set()
        self.focus: int | None = None  # position of the row clicked last
        self.anchor: int | None = None  # where a shift-click range starts
        self.page = 0
        self._mask_cache: tuple | None = None
        self._orders: dict[tuple[str, bool], np.ndarray] = {}
        self._items_cache: tuple | None = None

    # ---- state -------------------------------------------------------------------------
    def set_source(self, source: TableSource | None, *, keep: bool = False) -> None:
        """Show ``source``; ``keep`` keeps the selection, expansions and page (same rows, new values)."""
        self.source = source
        self._mask_cache, self._items_cache, self._orders = None, None, {}
        if not keep:
            self.selected, self.expanded, self.focus, self.anchor, self.page = set(), set(), None, None, 0

    @property
    def is_folded(self) -> bool:
        if self.folded is not None:
            return self.folded
        return self.source is not None and len(self.source) > FOLD_THRESHOLD

    def mask(self) -> np.ndarray | None:
        """Rows that pass the filter and the search (None: all rows)."""
        src = self.source
        key = (id(src), self.choice, self.search)
        if self._mask_cache is None or self._mask_cache[0] != key:
            m = src.passes(self.choice) if src is not None else None
            s = search_mask(src.haystack(), self.search) if src is not None and self.search.strip() else None
            if s is not None:
                m = s if m is None else (m & s)
            self._mask_cache = (key, m)
        return self._mask_cache[1]

    def order(self) -> np.ndarray:
        """Positions of the passing rows, in display order."""
        n = len(self.source) if self.source is not None else 0
        column, ascending = self.sort
        values = self.source.sort_values(column) if (column and self.source is not None) else None
        if values is None:
            rows = np.arange(n)
        else:
            key = (column, ascending)
            if key not in self._orders:
                self._orders[key] = _argsort(values, ascending)
            rows = self._orders[key]
        m = self.mask()
        return rows if m is None else rows[m[rows]]

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(kinds, ids) of every displayed line: ROW and a frame position, or GROUP and a group id."""
        key = (id(self.source), self.choice, self.search, self.sort, self.is_folded, frozenset(self.expanded))
        if self._items_cache is not None and self._items_cache[0] == key:
            return self._items_cache[1]
        rows = self.order() if self.source is not None else np.zeros(0, dtype=np.int64)
        if not self.is_folded or not len(rows):
            out = (np.zeros(len(rows), dtype=np.int8), rows)
        else:
            f = self.source.folding
            groups = pd.unique(f.codes[rows])
            passing = np.bincount(f.codes[rows], minlength=len(f))
            single = passing[groups] == 1  # a group with one passing row shows that row
            kinds = np.where(single, ROW, GROUP).astype(np.int8)
            first = np.full(len(f), -1, dtype=np.int64)
            present, at = np.unique(f.codes[rows], return_index=True)
            first[present] = rows[at]  # first passing row of each group, in display order
            ids = np.where(single, first[groups], groups)
            if self.expanded:
                kinds_parts, id_parts, start = [], [], 0
                for at in np.flatnonzero(~single & np.isin(groups, list(self.expanded))).tolist():
                    members = rows[f.codes[rows] == groups[at]]
                    kinds_parts += [kinds[start:at + 1], np.zeros(len(members), dtype=np.int8)]
                    id_parts += [ids[start:at + 1], members]
                    start = at + 1
                kinds = np.concatenate(kinds_parts + [kinds[start:]])
                ids = np.concatenate(id_parts + [ids[start:]])
            out = (kinds, ids)
        self._items_cache = (key, out)
        return out

    @property
    def pages(self) -> int:
        return max(1, -(-len(self.items()[0]) // self.page_size))

    def members(self, group: int) -> np.ndarray:
        """The passing rows of ``group``, in display order."""
        rows = self.order()
        return rows[self.source.folding.codes[rows] == group]

    # ---- user actions ------------------------------------------------------------------
    def click(self, kind: int, ident: int, *, toggle: bool = False, extend: bool = False) -> None:
        """A click on a line: select it alone, ``toggle`` it (ctrl), or ``extend`` from the anchor
        (shift). A group line selects its passing rows as a whole."""
        rows = self.members(ident) if kind == GROUP else np.array([ident])
        if extend and self.anchor is not None:
            kinds, ids = self.items()
            lines = np.flatnonzero(kinds == ROW)
            positions = ids[lines]
            where = {int(p): i for i, p in enumerate(positions.tolist())}
            if self.anchor in where and int(rows[0]) in where:
                a, b = sorted((where[self.anchor], where[int(rows[0])]))
                self.selected |= set(positions[a:b + 1].tolist())
                self.focus = int(rows[0]) if kind == ROW else self.focus
                return
        chosen = set(rows.tolist())
        if toggle:
            self.selected = self.selected - chosen if chosen <= self.selected else self.selected | chosen
        else:
            self.selected = chosen
        if kind == ROW:
            self.focus = self.anchor = int(ident)

    def toggle_group(self, group: int) -> None:
        self.expanded ^= {group}

    def select_positions(self, positions: Iterable[int]) -> None:
        self.selected = set(int(p) for p in positions)
        self.focus = max(self.selected) if self.selected else None

    # ---- what the browser gets ---------------------------------------------------------
    def view(self) -> dict:
        """One page: ``columns``, ``rows`` (each: id, kind, cells, sel 0/1/2, open), ``info``,
        ``page``, ``pages``."""
        src = self.source
        columns = list(src.COLUMNS) if src is not None else []
        kinds, ids = self.items()
        total = len(kinds)
        self.page = min(self.page, max(0, -(-total // self.page_size) - 1))
        lo, hi = self.page * self.page_size, min(total, (self.page + 1) * self.page_size)
        rows: list[dict] = []
        if src is not None and hi > lo:
            pk, pi = kinds[lo:hi], ids[lo:hi]
            plain = pi[pk == ROW]
            cells = src.display(src.frame.iloc[plain]) if len(plain) else None
            at = 0
            for k, i in zip(pk.tolist(), pi.tolist()):
                if k == ROW:
                    rows.append({"id": i, "kind": "row", "cells": [str(c) for c in cells.iloc[at].tolist()],
                                 "sel": 1 if i in self.selected else 0, "open": False,
                                 "member": bool(self.is_folded and src.folding.sizes[src.folding.codes[i]] > 1)})
                    at += 1
                else:
                    rows.append(self._group_row(i))
        n = len(src) if src is not None else 0
        shown = f"{lo + 1:,}–{hi:,} of {total:,}" if total else "0 of 0"
        what = "lines" if self.is_folded else "rows"
        filtered = "" if (self.mask() is None or src is None) else f" (filtered from {n:,} rows)"
        folded = f"; {len(src.folding):,} layer patterns" if (src is not None and self.is_folded) else ""
        # plain JSON types only: this goes to the browser
        return {"columns": columns, "rows": rows, "info": f"{shown} {what}{filtered}{folded}",
                "page": self.page, "pages": self.pages, "sort": [self.sort[0] or "", self.sort[1]]}

    def _group_row(self, group: int) -> dict:
        src = self.source
        f = src.folding
        members = self.members(group)
        extra = src.group_cells(members)
        reps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for c in src.COLUMNS:
            if c in extra or c not in src.frame.columns or c == src.SEARCH[0]:
                continue
            codes = src.codes(c)[members]
            u, first, counts = np.unique(codes, return_index=True, return_counts=True)
            keep = u >= 0
            reps[c] = (members[first[keep]], counts[keep])
        wanted = np.unique(np.concatenate([r for r, _ in reps.values()])) if reps else np.zeros(0, dtype=np.int64)
        shown = src.display(src.frame.iloc[wanted]) if len(wanted) else None
        where = {int(p): i for i, p in enumerate(wanted.tolist())}
        cells = []
        is_open = group in self.expanded
        for c in src.COLUMNS:
            if c == src.SEARCH[0]:
                note = f.notes[group] and f" <span class='ckptviz-group-note'>{html.escape(f.notes[group])}</span>"
                cells.append(f"<span class='ckptviz-expand' title='show the rows'>{'▾' if is_open else '▸'}</span> "
                             f"<span class='ckptviz-pattern'>{html.escape(f.patterns[group])}</span> "
                             f"<span class='ckptviz-group-size'>({len(members):,} keys)</span>{note}")
            elif c in extra:
                cells.append(extra[c])
            elif c in reps:
                positions, counts = reps[c]
                texts = [str(shown.iloc[where[int(p)]][c]) for p in positions[:4]]
                if c in src.COUNTED:
                    text = " ".join(f"{t} {n:,}" for t, n in zip(texts, counts.tolist()))
                else:
                    text = " | ".join(t for t in texts if t)
                cells.append(text + (f" <i>+{len(positions) - 4} more</i>" if len(positions) > 4 else ""))
            else:
                cells.append("")
        picked = int(np.isin(members, list(self.selected)).sum()) if self.selected else 0
        sel = 0 if picked == 0 else (1 if picked == len(members) else 2)
        return {"id": group, "kind": "group", "cells": cells, "sel": sel, "open": is_open, "member": False}
