"""The CheckpointSeries user journey in a real browser: JupyterLab in Chromium runs the training-run notebook
(12 epochs of the digits CNN saved one checkpoint per epoch, with a frozen layer, a learning rate that blows up
at epoch 10 and a NaN at epoch 11), then the test reads the widget: a heatmap of 18 layers x 12 checkpoints,
the flags table and the norms figure; clicks the head's cell at epoch=10 and sees that pair's detailed diff open
below with the head selected and its histograms drawn; clicks the first column and is told there is nothing
before it; clicks a column header to open that checkpoint; recolours by norm; filters the flags to NaN/Inf and
opens the checkpoint where it appeared.

Screenshots go to ``test-artifacts/`` (``series.png`` is the whole widget with a pair open)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from browser_helpers import open_notebook, run_all_cells, run_new_cell, save_screenshot
from playwright.sync_api import Locator, Page, expect
from test_inspector import screenshot_whole

LAB_NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NB = "06_training_run.ipynb"
RUN_ALL_TIMEOUT_S = 420.0  # the notebook trains 12 epochs first: seconds on a laptop, more on 2 cores
ACTION_TIMEOUT_MS = 60_000  # a click reaches the kernel, which compares two checkpoints and sends the view back
KEYS, CHECKPOINTS = 18, 12
HEAD = "model.head.weight"
PNG_SRC = re.compile(r"^data:image/png;base64,")
FLAG_ROWS = ".ckptviz-series-flags-table table.ckptviz-paged-table tbody tr[data-id]"


def kernel_print(page: Page, expr: str, label: str) -> str:
    """Print ``label <expr>`` from a new cell of the notebook and return the value's text."""
    out = run_new_cell(page, f"print({label!r}, {expr})", NB)
    match = re.search(rf"^{re.escape(label)} (.*)$", out, re.MULTILINE)
    assert match, f"no {label!r} line in the cell output: {out!r}"
    return match.group(1).strip()


def cell(widget: Locator, row: int, col: int) -> Locator:
    return widget.locator(f".ckptviz-heatmap-cell[data-row='{row}'][data-col='{col}']")


def test_series_user_journey(jupyter_lab, page, page_log):
    started = time.monotonic()
    open_notebook(page, jupyter_lab, NB)
    run_all_cells(page, NB, timeout=RUN_ALL_TIMEOUT_S)
    assert (jupyter_lab.root / "run" / "epoch=12.ckpt").is_file(), "the notebook did not save its run"
    print(f"\n[series journey] notebook opened and run in {time.monotonic() - started:.1f} s", flush=True)
    head_row = int(kernel_print(page, f"series_widget.heatmap.rows.index({HEAD!r})", "head_row"))
    n_flags = int(kernel_print(page, "len(series_widget.report.flags)", "n_flags"))
    n_nonfinite = int(kernel_print(page, "series_widget.report.summary['nonfinite']", "n_nonfinite"))

    # 1. the notebook passed the folder: the widget read the run at once
    widget = page.locator(".ckptviz-series").first
    expect(widget).to_be_visible()
    widget.scroll_into_view_if_needed()
    message = widget.locator(".ckptviz-series-message")
    expect(message).to_contain_text(f"{CHECKPOINTS} checkpoints × {KEYS} keys")
    heat = widget.locator(".ckptviz-series-heatmap")
    expect(heat.locator(".ckptviz-heatmap-row")).to_have_count(KEYS)
    expect(heat.locator(".ckptviz-heatmap-col")).to_have_count(CHECKPOINTS)
    expect(heat.locator(".ckptviz-heatmap-cell")).to_have_count(KEYS * CHECKPOINTS)
    expect(heat.locator(".ckptviz-heatmap-row").nth(head_row)).to_have_text(HEAD)
    expect(heat.locator(".ckptviz-heatmap-col").last).to_have_attribute("title", re.compile(r"^epoch=12\.ckpt "))
    expect(cell(heat, head_row, 0)).to_have_class(re.compile(r"ckptviz-heatmap-blank"))  # nothing before epoch=1
    expect(cell(heat, head_row, 9)).to_have_attribute("title", re.compile(r"epoch=10\.ckpt: relative change"))
    frozen = heat.locator(".ckptviz-heatmap-row").filter(has_text=re.compile(r"^model\.features\.0\.weight$"))
    expect(frozen).to_have_count(1)
    expect(widget.locator(".ckptviz-heatmap-legend")).to_contain_text("log scale")
    expect(widget.locator(".ckptviz-series-counts")).to_contain_text("frozen 2")
    flag_rows = widget.locator(FLAG_ROWS)
    expect(flag_rows).to_have_count(min(15, n_flags), timeout=ACTION_TIMEOUT_MS)
    norms = widget.locator(".ckptviz-series-norms img")
    expect(norms).to_have_attribute("src", PNG_SRC, timeout=ACTION_TIMEOUT_MS)
    assert norms.evaluate("(img) => img.decode().then(() => img.naturalWidth)") > 300
    header = widget.locator(".ckptviz-series-pair-header")
    expect(header).to_contain_text("click a cell")

    # 2. click the head's cell at epoch=10: that checkpoint against epoch=9 opens below, the head selected
    cell(heat, head_row, 9).click()
    expect(header).to_contain_text("epoch=10.ckpt against epoch=9.ckpt", timeout=ACTION_TIMEOUT_MS)
    expect(cell(heat, head_row, 9)).to_have_class(re.compile(r"\bselected\b"))
    pair = widget.locator(".ckptviz-diff-widget")
    expect(pair).to_be_visible()
    expect(pair.locator(".ckptviz-diff-counts")).to_contain_text(f"both {KEYS}", timeout=ACTION_TIMEOUT_MS)
    selected = pair.locator(".ckptviz-diff-table tbody tr.selected")
    expect(selected).to_have_count(1, timeout=ACTION_TIMEOUT_MS)
    expect(selected.locator("td").first).to_have_text(HEAD)
    expect(pair.locator(".ckptviz-diff-row")).to_contain_text(HEAD)
    expect(pair.locator(".ckptviz-diff-histogram img")).to_have_attribute("src", PNG_SRC, timeout=ACTION_TIMEOUT_MS)
    paths = kernel_print(page, "series_widget.pair.a.path, series_widget.pair.b.path", "paths")
    assert "epoch=9.ckpt" in paths and "epoch=10.ckpt" in paths, paths
    shot = screenshot_whole(page, widget, "series")
    assert shot.stat().st_size > 20_000
    save_screenshot(page, "series-pair", full_page=False)

    # 3. the first column has no reference: said so, and the pair closes
    cell(heat, head_row, 0).click()
    expect(header).to_contain_text("first checkpoint of the run", timeout=ACTION_TIMEOUT_MS)
    expect(pair).to_be_hidden()

    # 4. a column's header opens that checkpoint against its reference, no key selected
    heat.locator(".ckptviz-heatmap-col").nth(4).click()
    expect(header).to_contain_text("epoch=5.ckpt against epoch=4.ckpt", timeout=ACTION_TIMEOUT_MS)
    expect(pair).to_be_visible()

    # 5. colour by norm instead: recoloured in place, no reading again
    widget.locator(".ckptviz-series-metric select").select_option(label="L2 norm")
    expect(widget.locator(".ckptviz-heatmap-legend")).to_contain_text("L2 norm", timeout=ACTION_TIMEOUT_MS)
    expect(cell(heat, head_row, 0)).not_to_have_class(re.compile(r"ckptviz-heatmap-blank"))  # a norm at epoch=1

    # 6. the NaN flags: filter, select the first, the checkpoint where NaN appeared opens
    widget.locator(".ckptviz-series-filter button").filter(has_text=re.compile(r"^\s*nonfinite\s*$")).click()
    expect(flag_rows).to_have_count(min(15, n_nonfinite), timeout=ACTION_TIMEOUT_MS)
    first = flag_rows.first.locator("td")
    expect(first.nth(2)).to_have_text("epoch=11.ckpt")
    flagged_key = first.nth(0).inner_text().strip()
    first.nth(0).click()
    expect(header).to_contain_text("epoch=11.ckpt against epoch=10.ckpt", timeout=ACTION_TIMEOUT_MS)
    expect(pair).to_be_visible()
    expect(pair.locator(".ckptviz-diff-table tbody tr.selected td").first).to_have_text(flagged_key,
                                                                                    timeout=ACTION_TIMEOUT_MS)

    assert not page_log.errors, page_log.format()
    print(f"\n[series journey] done in {time.monotonic() - started:.1f} s", flush=True)
