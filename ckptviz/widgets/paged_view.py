"""PagedView: the browser side of every ckptviz table, an anywidget that draws one page of rows the
kernel sends (HTML cells), with a debounced search box, sortable headers, a pager, and clicks (plain,
ctrl, shift; a group's triangle expands it) sent back as messages. It holds no data of its own."""

from __future__ import annotations

import anywidget
import traitlets as t

# the DOM helper every ckptviz anywidget starts with
EL_JS = r"""
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
"""

_ESM = EL_JS + r"""
function render({ model, el: root }) {
  root.classList.add("ckptviz-paged");
  const bar = el("div", "ckptviz-paged-bar");
  const searchBox = el("div", model.get("search_class") || "ckptviz-search");
  const search = el("input", "ckptviz-search-input");
  search.type = "search";
  search.placeholder = "search keys (text or regex)";
  search.value = model.get("search");
  searchBox.appendChild(search);
  const info = el("span", "ckptviz-paged-info");
  const prev = el("button", "ckptviz-prev", "‹ prev");
  const next = el("button", "ckptviz-next", "next ›");
  const size = el("select", "ckptviz-page-size");
  for (const n of [15, 50, 200]) { const o = el("option", "", String(n)); o.value = String(n); size.appendChild(o); }
  bar.append(searchBox, info, prev, next, size);
  const scroller = el("div", "ckptviz-paged-scroll");
  const table = el("table", "ckptviz-paged-table");
  const thead = el("thead"), tbody = el("tbody");
  table.append(thead, tbody);
  scroller.appendChild(table);
  root.append(bar, scroller);

  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { model.set("search", search.value); model.save_changes(); }, 150);
  });
  search.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { clearTimeout(timer);
    model.set("search", search.value); model.save_changes(); } });
  prev.addEventListener("click", () => model.send({ type: "page", page: model.get("page") - 1 }));
  next.addEventListener("click", () => model.send({ type: "page", page: model.get("page") + 1 }));
  size.addEventListener("change", () => model.send({ type: "page_size", size: Number(size.value) }));
  thead.addEventListener("click", (ev) => {
    const th = ev.target.closest("th");
    if (th) model.send({ type: "sort", column: th.dataset.column });
  });
  tbody.addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr");
    if (!tr || tr.dataset.id === undefined) return;
    if (ev.target.closest(".ckptviz-expand")) {
      model.send({ type: "expand", id: Number(tr.dataset.id) });
      return;
    }
    if (ev.shiftKey) { const s = window.getSelection(); if (s) s.removeAllRanges(); }
    model.send({ type: "click", kind: tr.dataset.kind, id: Number(tr.dataset.id),
                 toggle: ev.ctrlKey || ev.metaKey, extend: ev.shiftKey });
  });

  function drawHead() {
    const [column, asc] = model.get("sort");
    const tr = el("tr");
    for (const c of model.get("columns")) {
      const th = el("th", "ckptviz-sortable", c);
      th.dataset.column = c;
      th.title = "sort by " + c;
      if (c === column) {
        th.classList.add(asc ? "ckptviz-asc" : "ckptviz-desc");
        th.textContent = c + (asc ? " ▲" : " ▼");
      }
      tr.appendChild(th);
    }
    thead.replaceChildren(tr);
  }
  function drawRows() {
    const rows = model.get("rows");
    const out = [];
    for (const r of rows) {
      const tr = el("tr", r.kind === "group" ? "ckptviz-group" : "ckptviz-row");
      if (r.member) tr.classList.add("ckptviz-member");
      if (r.sel === 1) tr.classList.add("selected");
      if (r.sel === 2) tr.classList.add("ckptviz-partial");
      if (r.open) tr.classList.add("ckptviz-open-group");
      tr.dataset.id = String(r.id);
      tr.dataset.kind = r.kind;
      for (const c of r.cells) { const td = el("td"); td.innerHTML = c; tr.appendChild(td); }
      out.push(tr);
    }
    if (!rows.length) {
      const tr = el("tr", "ckptviz-empty");
      const td = el("td", "", model.get("empty") || "no rows");
      td.colSpan = Math.max(1, model.get("columns").length);
      tr.appendChild(td);
      out.push(tr);
    }
    tbody.replaceChildren(...out);
    info.textContent = model.get("info");
    prev.disabled = model.get("page") <= 0;
    next.disabled = model.get("page") >= model.get("pages") - 1;
    size.value = String(model.get("page_size"));
  }
  model.on("change:columns", drawHead);
  model.on("change:sort", drawHead);
  model.on("change:rows", drawRows);
  model.on("change:info", drawRows);
  model.on("change:search", () => { if (document.activeElement !== search) search.value = model.get("search"); });
  drawHead();
  drawRows();
}
export default { render };
"""

_CSS = r"""
.ckptviz-paged { font-size: 12px; width: 100%; }
.ckptviz-paged-bar { display: flex; gap: 8px; align-items: center; margin: 4px 0; flex-wrap: wrap; }
.ckptviz-paged-bar input[type=search] { width: 260px; padding: 2px 4px; }
.ckptviz-paged-info { color: #555; margin-left: auto; }
.ckptviz-paged-scroll { overflow-x: auto; max-width: 100%; }
.ckptviz-paged-table { border-collapse: collapse; white-space: nowrap; }
.ckptviz-paged-table th { text-align: left; cursor: pointer; border-bottom: 1px solid #999; padding: 3px 6px;
  user-select: none; }
.ckptviz-paged-table td { padding: 2px 6px; border-bottom: 1px solid #eee; cursor: pointer; }
.ckptviz-paged-table tr.selected td { background: #cfe3fb; }
.ckptviz-paged-table tr.ckptviz-partial td { background: #e8f1fc; }
.ckptviz-paged-table tr.ckptviz-group td { font-weight: 600; background: #f6f8fa; }
.ckptviz-paged-table tr.ckptviz-group.selected td { background: #cfe3fb; }
.ckptviz-paged-table tr.ckptviz-member td:first-child { padding-left: 22px; }
.ckptviz-expand { display: inline-block; width: 14px; cursor: pointer; color: #0969da; }
.ckptviz-group-note { color: #8a4b00; font-weight: normal; }
.ckptviz-group-size { color: #666; font-weight: normal; }
"""


class PagedView(anywidget.AnyWidget):
    """One page of a table; the kernel (:class:`~ckptviz.widgets.table.KeyTable`) fills it."""

    _esm = _ESM
    _css = _CSS
    columns = t.List(t.Unicode()).tag(sync=True)
    rows = t.List().tag(sync=True)
    info = t.Unicode("").tag(sync=True)
    empty = t.Unicode("no rows").tag(sync=True)
    page = t.Int(0).tag(sync=True)
    pages = t.Int(1).tag(sync=True)
    page_size = t.Int(15).tag(sync=True)
    sort = t.List(default_value=["", True]).tag(sync=True)
    search = t.Unicode("").tag(sync=True)
    search_class = t.Unicode("ckptviz-search").tag(sync=True)
