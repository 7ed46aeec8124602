"""Conversions in JupyterLab + Chromium: an old weight_norm checkpoint opened into a parametrized
model (paired by the family rule, said in the rule column), a renamed head that is only suggested
(never loaded until accepted), accepted per row and then all at once, then loaded."""

from __future__ import annotations

import re
from pathlib import Path

from browser_helpers import open_notebook, run_all_cells, run_new_cell, save_screenshot
from playwright.sync_api import expect

LAB_NOTEBOOKS_DIR = Path(__file__).parent / "scale_notebooks"
NB = "scale.ipynb"
TIMEOUT_MS = 60_000
ROWS = ".ckptviz-table table.ckptviz-paged-table tbody tr[data-id]"


def test_accept_suggestions_then_load(jupyter_lab, page, page_log):
    open_notebook(page, jupyter_lab, NB)
    run_all_cells(page, NB)
    run_new_cell(page, (
        "import warnings\n"
        "from torch.nn.utils import parametrizations\n"
        "def net(new):\n"
        "    with warnings.catch_warnings():\n"
        "        warnings.simplefilter('ignore')\n"
        "        wrap = parametrizations.weight_norm if new else torch.nn.utils.weight_norm\n"
        "        m = nn.Sequential()\n"
        "        m.add_module('conv', wrap(nn.Conv1d(2, 4, 3)))\n"
        "        m.add_module('head' if new else 'classifier', nn.Linear(4, 3))\n"
        "    return m\n"
        "torch.manual_seed(0)\n"
        "old = net(new=False)\n"
        "torch.save(old.state_dict(), 'old_wn.pt')\n"
        "model = net(new=True)\n"
        "conv = cv.CheckpointInspector(model=model, path='old_wn.pt')\n"
        "display(conv)"), NB)
    insp = page.locator(".ckptviz-inspector").last
    expect(insp).to_be_visible()
    counts = insp.locator(".ckptviz-counts")
    expect(counts).to_contain_text("match 3", timeout=TIMEOUT_MS)
    expect(counts).to_contain_text("suggested 2")
    rows = insp.locator(ROWS)
    renamed = rows.filter(has_text="parametrizations.weight.original0")
    expect(renamed).to_contain_text("weight_norm, old -> parametrized")
    panel = insp.locator(".ckptviz-suggestions")
    expect(panel).to_contain_text("2 suggested pairing(s)")
    insp.scroll_into_view_if_needed()
    save_screenshot(page, "inspector-suggestions", full_page=False)

    # 1. the suggested rows only; accept one of them
    insp.locator(".ckptviz-status-filter button").filter(has_text=re.compile(r"^suggested$")).click()
    expect(rows).to_have_count(2, timeout=TIMEOUT_MS)
    expect(rows.first).to_contain_text("classifier.weight")
    rows.first.locator("td").first.click()
    expect(rows.first).to_have_class(re.compile(r"\bselected\b"), timeout=TIMEOUT_MS)
    insp.locator(".ckptviz-accept-selected").click()
    expect(counts).to_contain_text("suggested 1", timeout=TIMEOUT_MS)
    expect(insp.locator(".ckptviz-message")).to_contain_text("1 suggested pairing(s) accepted")

    # 2. the rest at once, then load: all five tensors go in
    insp.locator(".ckptviz-accept-all").click()
    expect(counts).to_contain_text("suggested 0", timeout=TIMEOUT_MS)
    expect(panel).to_be_hidden()
    insp.locator(".ckptviz-status-filter button").filter(has_text=re.compile(r"^all$")).click()
    expect(rows.filter(has_text="head.weight")).to_contain_text("accepted: same shape", timeout=TIMEOUT_MS)
    insp.locator(".ckptviz-load-all").click()
    expect(insp.locator(".ckptviz-result")).to_contain_text("5 tensors loaded", timeout=TIMEOUT_MS)
    out = run_new_cell(page, "print('same', bool(torch.equal(model.head.weight, old.classifier.weight)), "
                             "bool(torch.allclose(model(torch.ones(1, 2, 6)), old(torch.ones(1, 2, 6)))))", NB)
    assert "same True True" in out, out
    assert not page_log.errors, page_log.format()


def test_adapt_a_head_with_a_preview_then_load_and_undo(jupyter_lab, page, page_log):
    open_notebook(page, jupyter_lab, NB)
    run_all_cells(page, NB)
    run_new_cell(page, (
        "torch.manual_seed(0)\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self, classes):\n"
        "        super().__init__()\n"
        "        self.body = nn.Linear(6, 8)\n"
        "        self.head = nn.Linear(8, classes)\n"
        "ten = Tiny(10)\n"
        "torch.save(ten.state_dict(), 'ten.pt')\n"
        "five = Tiny(5)\n"
        "before = five.head.weight.detach().clone()\n"
        "ad = cv.CheckpointInspector(model=five, path='ten.pt')\n"
        "display(ad)"), NB)
    insp = page.locator(".ckptviz-inspector").last
    expect(insp).to_be_visible()
    counts = insp.locator(".ckptviz-counts")
    expect(counts).to_contain_text("shape_mismatch 2", timeout=TIMEOUT_MS)
    rows = insp.locator(ROWS)
    panel = insp.locator(".ckptviz-adapt")
    expect(panel).to_be_hidden()
    # select the head's weight: the adaptations that fit, with a preview of what would be written
    rows.filter(has_text="head.weight").locator("td").first.click()
    expect(panel).to_be_visible(timeout=TIMEOUT_MS)
    expect(insp.locator(".ckptviz-adapt-method select option")).to_have_text(["slice", "reinit"])
    expect(insp.locator(".ckptviz-adapt-preview")).to_contain_text("slice rows 10→5 (first 5 copied)")
    expect(insp.locator(".ckptviz-adapt-plot img")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    insp.locator(".ckptviz-adapt-apply").click()
    expect(counts).to_contain_text("adapted 1", timeout=TIMEOUT_MS)
    expect(rows.filter(has_text="head.weight")).to_contain_text("adapted: slice rows 10→5")
    # the bias too, then load: both go in; undo puts the model's own values back
    rows.filter(has_text="head.bias").locator("td").first.click()
    expect(insp.locator(".ckptviz-adapt-preview")).to_contain_text("slice rows 10→5", timeout=TIMEOUT_MS)
    insp.locator(".ckptviz-adapt-apply").click()
    expect(counts).to_contain_text("adapted 2", timeout=TIMEOUT_MS)
    insp.scroll_into_view_if_needed()
    save_screenshot(page, "inspector-adapt", full_page=False)
    insp.locator(".ckptviz-load-all").click()
    expect(insp.locator(".ckptviz-result")).to_contain_text("4 tensors loaded", timeout=TIMEOUT_MS)
    out = run_new_cell(page, "print('sliced', bool(torch.equal(five.head.weight, ten.head.weight[:5])))", NB)
    assert "sliced True" in out, out
    insp.locator(".ckptviz-undo").click()
    expect(insp.locator(".ckptviz-message")).to_contain_text("back to what they were", timeout=TIMEOUT_MS)
    out = run_new_cell(page, "print('restored', bool(torch.equal(five.head.weight, before)))", NB)
    assert "restored True" in out, out
    assert not page_log.errors, page_log.format()
