"""``ckptviz app`` end to end: the real command serves the inspector with Voilà on 127.0.0.1; Chromium opens the
page, sees the checkpoint given on the command line, picks a model class by name, loads, sees the result, then
opens the diff tab and compares two checkpoints, then the training-run tab: reads a run folder and opens one pair."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from browser_helpers import save_screenshot
from lab_server import free_port
from playwright.sync_api import expect

from ckptviz.demo import make_demo_checkpoint

START_TIMEOUT_S = 120.0
TIMEOUT_MS = 90_000  # the first page render starts a kernel and runs the app's cell (imports torch): slow on 2 cores
DIFF_ROWS = ".ckptviz-diff-table table.ckptviz-paged-table tbody tr[data-id]"
ROWS = ".ckptviz-table table.ckptviz-paged-table tbody tr[data-id]"


@pytest.fixture
def app(tmp_path: Path):
    make_demo_checkpoint(tmp_path / "digits_cnn.pth.tar", epochs=1)
    sd = torch.load(tmp_path / "digits_cnn.pth.tar", weights_only=True)["model_state_dict"]
    sd["module.head.bias"] = sd["module.head.bias"] + 1.0
    torch.save(sd, tmp_path / "moved.pt")
    (tmp_path / "run").mkdir()
    for epoch in range(1, 4):  # a run of three epochs: the head moves a little each time
        sd["module.head.bias"] = sd["module.head.bias"] + 0.5
        torch.save({"epoch": epoch, "state_dict": sd}, tmp_path / "run" / f"epoch={epoch}.ckpt")
    port = free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime")}
    proc = subprocess.Popen([sys.executable, "-m", "ckptviz", "app", "digits_cnn.pth.tar", "--port", str(port),
                             "--no-browser"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(url + "api/kernelspecs", timeout=5)  # not "/": each GET starts a kernel
            break
        except urllib.error.HTTPError:  # any answer: the server is up
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                proc.kill()
                pytest.fail(f"ckptviz app did not start on {url}: {out[-3000:]}")
            time.sleep(0.5)
    yield url, tmp_path
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_app_opens_the_file_picks_a_model_loads_and_diffs(app, page, page_log):
    url, folder = app
    page.goto(url)
    insp = page.locator(".ckptviz-app .ckptviz-inspector").first
    expect(insp).to_be_visible(timeout=TIMEOUT_MS)
    rows = insp.locator(ROWS)
    expect(rows.first).to_be_visible(timeout=TIMEOUT_MS)  # the file named on the command line, checkpoint only
    expect(insp.locator(".ckptviz-counts")).to_contain_text("checkpoint only", timeout=TIMEOUT_MS)
    expect(page.locator("body")).not_to_contain_text("import ckptviz")  # the page shows widgets, never code

    insp.locator(".ckptviz-model-spec input").fill("ckptviz.demo:DigitsCNN")
    insp.locator(".ckptviz-model-kwargs input").fill("num_classes=5")
    insp.locator(".ckptviz-build-model").click()
    expect(insp.locator(".ckptviz-counts")).to_contain_text("match 16", timeout=TIMEOUT_MS)
    insp.locator(".ckptviz-load-all").click()
    expect(insp.locator(".ckptviz-result")).to_contain_text("16 tensors loaded, 2 skipped", timeout=TIMEOUT_MS)
    save_screenshot(page, "app-inspector", full_page=False)

    page.locator(".ckptviz-app .lm-TabBar-tab", has_text="Compare two checkpoints").click()
    diff = page.locator(".ckptviz-app .ckptviz-diff").first
    expect(diff).to_be_visible()
    for side, name in (("a", "digits_cnn.pth.tar"), ("b", "moved.pt")):
        box = diff.locator(f".ckptviz-diff-side-{side} .ckptviz-path input")
        box.fill(str(folder / name))
        box.press("Enter")
    diff.locator(".ckptviz-diff-compare").click()
    expect(diff.locator(".ckptviz-diff-message")).to_contain_text("keys compared", timeout=TIMEOUT_MS)
    expect(diff.locator(DIFF_ROWS).first).to_contain_text("head.bias", timeout=TIMEOUT_MS)  # most changed first
    save_screenshot(page, "app-diff", full_page=False)

    page.locator(".ckptviz-app .lm-TabBar-tab", has_text="A training run").click()
    series = page.locator(".ckptviz-app .ckptviz-series").first
    expect(series).to_be_visible()
    series.locator(".ckptviz-series-path input").fill("run")
    series.locator(".ckptviz-series-read").click()
    expect(series.locator(".ckptviz-series-message")).to_contain_text("3 checkpoints × 18 keys", timeout=TIMEOUT_MS)
    row = series.locator(".ckptviz-heatmap-row").filter(has_text="module.head.bias")
    expect(row).to_have_count(1)
    index = int(row.evaluate("(th) => th.parentElement.rowIndex")) - 1  # below the header row
    series.locator(f".ckptviz-heatmap-cell[data-row='{index}'][data-col='2']").click()
    expect(series.locator(".ckptviz-series-pair-header")).to_contain_text("epoch=3.ckpt against epoch=2.ckpt",
                                                                          timeout=TIMEOUT_MS)
    selected = series.locator(".ckptviz-diff-table tbody tr.selected td")
    expect(selected.first).to_have_text("module.head.bias", timeout=TIMEOUT_MS)
    save_screenshot(page, "app-series", full_page=False)
    assert not page_log.page_errors, page_log.page_errors
