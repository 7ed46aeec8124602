"""The command line run for real: the installed entry point in a subprocess (exit codes, JSON and CSV parsed
back, help text, no colour when piped, colour on a terminal), on files written by torch, safetensors and
transformers."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import ckptviz as cv
from ckptviz.demo import DigitsCNN
from tests.models import SmallCNN

CKPTVIZ = Path(sys.executable).with_name("ckptviz")  # the console script pip installed


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptviz", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "COLUMNS": "160"})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    src = DigitsCNN(10)
    wrapped = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"epoch": 7, "model_state_dict": wrapped}, d / "run.pt")
    moved = {k: v.clone() for k, v in src.state_dict().items()}
    moved["head.bias"] += 1.0
    moved["classifier.1.weight"][0, 0] = float("nan")
    save_file(moved, d / "moved.safetensors")
    save_file({f"layers.{i}.weight": torch.full((2, 2), float(i)) for i in range(300)}, d / "deep.safetensors")
    return {"run": d / "run.pt", "moved": d / "moved.safetensors", "deep": d / "deep.safetensors", "dir": d}


def test_help_lists_every_verb_with_examples_and_imports_no_torch():
    for cmd in ([sys.executable, "-m", "ckptviz", "--help"], [str(CKPTVIZ), "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for verb in ("inspect", "compare", "diff", "series", "stats", "report", "app"):
            assert verb in r.stdout
        assert "examples:" in r.stdout and "--fail-on missing,shape_mismatch" in r.stdout
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ckptviz", "--help"], capture_output=True,
                       text=True, timeout=60)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert "ckptviz" in imported and not imported & {"torch", "pandas", "numpy", "ipywidgets"}, sorted(imported)
    r = run("compare", "--help")
    assert r.returncode == 0 and "--fail-on" in r.stdout and "example:" in r.stdout
    assert run("--version").stdout.strip() == f"ckptviz {cv.__version__}"
    assert run().returncode == 2  # no verb: help, and the usage exit code


def test_inspect_table_json_csv_and_folding(files):
    r = run("inspect", str(files["run"]))
    assert r.returncode == 0, r.stderr
    assert "module.head.weight" in r.stdout and "(10, 64)" in r.stdout and "epoch=7" in r.stdout
    assert "size by dtype" in r.stdout and "\x1b[" not in r.stdout  # piped: no colour codes
    data = json.loads(run("inspect", str(files["run"]), "--json").stdout)
    assert data["format"] == "torch-zip" and data["section"] == "model_state_dict" and data["metadata"] == {"epoch": 7}
    rows = {row["key"]: row for row in data["rows"]}
    assert rows["module.head.weight"]["shape"] == [10, 64] and rows["module.head.weight"]["nbytes"] == 2560
    assert len(rows) == len(DigitsCNN(10).state_dict())
    frame = pd.read_csv(io.StringIO(run("inspect", str(files["run"]), "--csv").stdout), index_col="key")
    assert frame.loc["module.head.bias", "shape"] == "(10,)" and frame.loc["module.head.bias", "numel"] == 10
    deep = run("inspect", str(files["deep"]))  # 300 tensors: folded by default
    assert "layers.{0-299}.weight" in deep.stdout and "--flat" in deep.stdout
    flat = run("inspect", str(files["deep"]), "--flat", "--limit", "3")  # in the file's (text-sorted) order
    assert all(f"layers.{i}.weight " in flat.stdout for i in (0, 1, 10)) and "layers.100.weight" not in flat.stdout
    assert "297 more rows" in flat.stdout


def test_inspect_stats_match_torch(files):
    r = run("inspect", str(files["moved"]), "--stats", "--json", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    rows = {row["key"]: row for row in json.loads(r.stdout)["rows"]}
    bias = torch.load(files["run"], weights_only=True)["model_state_dict"]["module.head.bias"] + 1.0
    assert rows["head.bias"]["mean"] == pytest.approx(bias.double().mean().item())
    assert rows["classifier.1.weight"]["nan"] == 1 and rows["head.bias"]["nan"] == 0
    shown = run("inspect", str(files["moved"]), "--stats")
    assert "1 tensors hold NaN or Inf: classifier.1.weight" in shown.stdout
    assert "statistics" in shown.stderr  # the progress bar goes to stderr


def test_compare_counts_rows_and_gates_ci(files):
    r = run("compare", str(files["run"]), "--model", "ckptviz.demo:DigitsCNN", "--kwargs", "num_classes=5")
    assert r.returncode == 0, r.stderr
    assert "match: 16" in r.stdout and "shape_mismatch: 2" in r.stdout and "'^module\\\\.' -> ''" in r.stdout
    assert "head.weight" in r.stdout and "features.0.weight" not in r.stdout  # only the rows that do not match
    gate = run("compare", str(files["run"]), "-m", "ckptviz.demo:DigitsCNN", "--kwargs", "num_classes=5",
               "--fail-on", "missing,shape_mismatch", "--json")
    assert gate.returncode == 1 and "2 shape_mismatch" in gate.stderr
    data = json.loads(gate.stdout)
    want = cv.compare(DigitsCNN(5), files["run"]).frame
    assert data["summary"] == cv.compare(DigitsCNN(5), files["run"]).summary and data["failed_on"] == ["shape_mismatch"]
    assert [(row["key"], row["status"]) for row in data["rows"]] == list(zip(want["key"], want["status"]))
    ok = run("compare", str(files["run"]), "-m", "ckptviz.demo:DigitsCNN", "--fail-on", "any")
    assert ok.returncode == 0, ok.stderr + ok.stdout  # 10 classes: everything loads
    plain = run("compare", str(files["run"]), "-m", "ckptviz.demo:DigitsCNN", "--no-auto-align", "--fail-on", "any")
    assert plain.returncode == 1 and "missing" in plain.stderr
    ruled = run("compare", str(files["run"]), "-m", "ckptviz.demo:DigitsCNN", "--no-auto-align", "--rule",
                "^module\\.=", "--fail-on", "any", "--csv")
    assert ruled.returncode == 0, ruled.stderr
    frame = pd.read_csv(io.StringIO(ruled.stdout))
    assert set(frame["status"]) == {"match"} and len(frame) == 18


def test_compare_a_model_from_the_working_directory_and_a_hub_folder(files, tmp_path):
    (tmp_path / "mynets.py").write_text("from tests.models import SmallCNN as Net\n")
    torch.save(SmallCNN(3).state_dict(), tmp_path / "small.pt")
    env_cwd = Path(__file__).resolve().parents[1]
    (tmp_path / "tests").symlink_to(env_cwd / "tests")
    r = run("compare", "small.pt", "--model", "mynets:Net", "--kwargs", "num_classes=3", "--fail-on", "any",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pytest.importorskip("transformers")
    from tests.hf_files import tiny_llama

    tiny_llama(tmp_path / "llama")
    hub = run("compare", str(tmp_path / "llama"), "--model", "config", "--json", "--fail-on", "any")
    assert hub.returncode == 0, hub.stderr
    data = json.loads(hub.stdout)
    assert data["model"].endswith("LlamaForCausalLM") and data["summary"]["match"] > 10


def test_diff_top_and_gates(files):
    r = run("diff", str(files["run"]), str(files["moved"]), "--top", "1", "--json", "-q")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["rules"] == [["^", "module."]] and data["changed"] == 2  # b's keys gain a's prefix
    assert [row["key"] for row in data["rows"]] == ["module.head.bias"]
    assert data["rows"][0]["max_abs_diff"] == pytest.approx(1.0)
    table = run("diff", str(files["run"]), str(files["moved"]))
    assert "most changed first" in table.stdout and "module.head.bias" in table.stdout
    gate = run("diff", str(files["run"]), str(files["moved"]), "--fail-on", "changed,only_b")
    assert gate.returncode == 1 and "2 changed" in gate.stderr
    assert run("diff", str(files["run"]), str(files["run"]), "--fail-on", "changed").returncode == 0


def test_stats_gates_on_nonfinite(files):
    bad = run("stats", str(files["moved"]), "--fail-on", "nonfinite", "-q")
    assert bad.returncode == 1 and "classifier.1.weight" in bad.stderr
    good = run("stats", str(files["run"]), "--fail-on", "nonfinite", "--json", "-q")
    assert good.returncode == 0 and json.loads(good.stdout)["nonfinite"] == []


def test_errors_are_one_clear_line_and_exit_2(files, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    for args, words in [
        (("inspect", str(tmp_path / "nope.pt")), "no such file"),
        (("inspect", str(tmp_path / "junk.pt")), "junk.pt"),
        (("compare", str(files["run"]), "--model", "nope_module:Net"), "nope_module"),
        (("compare", str(files["run"]), "--model", "resnet18", "--fail-on", "bogus"), "'bogus'"),
        (("compare", str(files["run"]), "--model", "resnet18", "--rule", "no-equals"), "REGEX=REPLACEMENT"),
        (("compare", str(files["run"]), "--model", "config"), "no config.json"),
        (("diff", str(files["run"]), str(tmp_path / "nope.pt")), "nope.pt"),
    ]:
        r = run(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_colour_on_a_terminal_only(files):
    """Under a pseudo-terminal rich colours the statuses; piped (above) it writes plain text."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the real command, its stdout a terminal
        os.environ.update(COLUMNS="160", TERM="xterm-256color")
        os.environ.pop("NO_COLOR", None)
        os.execv(sys.executable, [sys.executable, "-m", "ckptviz", "compare", str(files["run"]), "-m",
                                  "ckptviz.demo:DigitsCNN", "--kwargs", "num_classes=5"])
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert "\x1b[" in out and "shape_mismatch" in out


def test_report_writes_one_html_file_for_a_model_or_a_second_checkpoint(files, tmp_path):
    out = tmp_path / "report.html"
    r = run("report", str(files["run"]), "--model", "ckptviz.demo:DigitsCNN", "--kwargs", "num_classes=5", "-o",
            str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stderr and "shape_mismatch 2" in r.stderr and r.stdout == ""
    text = out.read_text()
    assert "<script" not in text and "ckptviz.demo.DigitsCNN" in text and "shape_mismatch<b>2</b>" in text
    d = run("report", str(files["run"]), "--against", str(files["moved"]), "-o", str(tmp_path / "d.html"), "-q")
    assert d.returncode == 0, d.stderr
    assert "module.head.bias" in (tmp_path / "d.html").read_text()
    for args, words in [((), "--model SPEC"), (("--model", "ckptviz.demo:DigitsCNN", "-o", "x.txt"), ".html")]:
        bad = run("report", str(files["run"]), *args, *(() if "-o" in args else ("-o", str(tmp_path / "y.html"))))
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
