"""The main-job demo and the command line, run for real."""

import torch

import ckptviz as cv
from ckptviz import cli, demo


def test_demo_builds_a_checkpoint_and_prints_the_report(tmp_path, capsys):
    demo.main(["--dir", str(tmp_path)])
    out = capsys.readouterr().out
    path = tmp_path / "digits_cnn.pth.tar"
    assert path.exists()
    assert "'shape_mismatch': 2" in out and "LoadResult(loaded=16, skipped=2" in out
    ck = cv.open_checkpoint(path)
    assert ck.sections == ["model_state_dict"] and ck.optimizer_sections == ["optimizer_state_dict"]
    assert ck.metadata["accuracy"] > 0.9  # the demo model really learned the digits
    x, y = demo.digits()
    model = demo.DigitsCNN(10)
    cv.load_partial(model, cv.compare(model, ck))
    assert demo.accuracy(model, x, y) == ck.metadata["accuracy"]


def test_cli_inspect_lists_tensors_and_fails_cleanly(tmp_path, capsys):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 3)}, "epoch": 1}, path)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fc.weight" in out and "(2, 3)" in out and "epoch=1" in out
    assert cli.main(["inspect", str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_glyphs_are_8x8_sixteenths_with_labels_deterministic_per_seed():
    from ckptviz.demo_glyphs import glyphs

    x, y = glyphs("0123456789AB", 600, seed=3, fonts=("DejaVuSans", "cmr10"))
    assert x.shape == (600, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (600,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x * 16, (x * 16).round())  # 4x4 blocks of a 32x32 bitmap counted, like sklearn's digits
    assert set(y.tolist()) == set(range(12))  # every character drawn
    again, y2 = glyphs("0123456789AB", 600, seed=3, fonts=("DejaVuSans", "cmr10"))
    other, _ = glyphs("0123456789AB", 600, seed=4, fonts=("DejaVuSans", "cmr10"))
    assert torch.equal(x, again) and torch.equal(y, y2) and not torch.equal(x, other)
    # a "1" and an "8" differ in ink: the renderings carry the character, not noise
    assert x[y == 8].mean() > x[y == 1].mean()
