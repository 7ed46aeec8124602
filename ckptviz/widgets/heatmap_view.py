"""HeatmapView: the browser side of a training run's heatmap, an anywidget that draws the cells the
kernel sends (rows x checkpoints, at most ``plots_series.MAX_ROWS`` rows, colours already computed) as
an HTML grid, and sends a click on a cell back as a message. It holds no data of its own."""

from __future__ import annotations

import anywidget
import traitlets as t

from .paged_view import EL_JS

_ESM = EL_JS + r"""
function render({ model, el: root }) {
  root.classList.add("ckptviz-heatmap");
  const legend = el("div", "ckptviz-heatmap-legend");
  const scroller = el("div", "ckptviz-heatmap-scroll");
  const table = el("table", "ckptviz-heatmap-table");
  scroller.appendChild(table);
  root.append(legend, scroller);

  function draw() {
    const rows = model.get("rows"), columns = model.get("columns"), cells = model.get("cells");
    const titles = model.get("titles"), picked = model.get("selected");
    legend.textContent = model.get("legend");
    table.replaceChildren();
    if (!rows.length) {
      const tr = el("tr"), td = el("td", "ckptviz-heatmap-empty", model.get("empty"));
      tr.appendChild(td); table.appendChild(tr);
      return;
    }
    const head = el("tr"), corner = el("th", "ckptviz-heatmap-corner", "");
    head.appendChild(corner);
    columns.forEach((c, j) => {
      const th = el("th", "ckptviz-heatmap-col");
      const span = el("span", "", c);
      th.title = c + " (click: the whole checkpoint against its reference)"; th.dataset.col = String(j);
      th.addEventListener("click", () => model.send({ type: "click", row: -1, col: j }));
      th.appendChild(span);
      head.appendChild(th);
    });
    table.appendChild(head);
    rows.forEach((r, i) => {
      const tr = el("tr");
      const th = el("th", "ckptviz-heatmap-row", r);
      th.title = r;
      tr.appendChild(th);
      columns.forEach((c, j) => {
        const td = el("td", "ckptviz-heatmap-cell");
        const colour = cells[i][j];
        td.dataset.row = String(i); td.dataset.col = String(j);
        if (colour) td.style.background = colour; else td.classList.add("ckptviz-heatmap-blank");
        td.title = titles[i][j];
        if (picked.length === 2 && picked[0] === i && picked[1] === j) td.classList.add("selected");
        td.addEventListener("click", () => model.send({ type: "click", row: i, col: j }));
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
  }
  for (const name of ["rows", "columns", "cells", "titles", "selected", "legend", "empty"])
    model.on("change:" + name, draw);
  draw();
}
export default { render };
"""

_CSS = r"""
.ckptviz-heatmap-legend { color: #555; margin: 2px 0 4px; }
.ckptviz-heatmap-scroll { overflow: auto; max-width: 100%; max-height: 900px; }
.ckptviz-heatmap-table { border-collapse: collapse; font-size: 11px; }
.ckptviz-heatmap-row { text-align: right; font-weight: normal; padding: 0 6px 0 0; white-space: nowrap;
  max-width: 340px; overflow: hidden; text-overflow: ellipsis; }
.ckptviz-heatmap-col { height: 112px; vertical-align: bottom; font-weight: normal; padding: 0; cursor: pointer; }
.ckptviz-heatmap-col span { display: inline-block; writing-mode: vertical-rl; transform: rotate(180deg);
  white-space: nowrap; max-height: 110px; overflow: hidden; text-overflow: ellipsis; }
.ckptviz-heatmap-cell { width: 16px; min-width: 16px; height: 14px; border: 1px solid #fff; cursor: pointer;
  padding: 0; }
.ckptviz-heatmap-cell:hover { outline: 2px solid #0969da; }
.ckptviz-heatmap-cell.selected { outline: 2px solid #0969da; outline-offset: -1px; }
.ckptviz-heatmap-blank { background: repeating-linear-gradient(45deg, #fff, #fff 2px, #f1f1f1 2px, #f1f1f1 4px); }
"""


class HeatmapView(anywidget.AnyWidget):
    """Rows x columns of coloured cells (``cells``: hex colours, ``""`` blank; ``titles``: hover text);
    clicks arrive as ``{"type": "click", "row": i, "col": j}`` messages (``row`` -1: a column's header);
    ``selected`` marks a cell."""

    _esm = _ESM
    _css = _CSS
    rows = t.List(t.Unicode()).tag(sync=True)
    columns = t.List(t.Unicode()).tag(sync=True)
    cells = t.List().tag(sync=True)
    titles = t.List().tag(sync=True)
    selected = t.List(default_value=[]).tag(sync=True)
    legend = t.Unicode("").tag(sync=True)
    empty = t.Unicode("nothing to show yet").tag(sync=True)
