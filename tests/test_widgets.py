"""The inspector driven from Python, as a notebook user's clicks would drive it: set values, click
buttons through their handlers, and check the effects on the real live model."""

import pytest
import torch
from models import SmallCNN, randomized, snapshot

import ckptviz as cv
from ckptviz.widgets.files import list_folder
from ckptviz.widgets.panels import device_summary, tensor_comparison


@pytest.fixture
def folder(tmp_path):
    src = randomized(SmallCNN(num_classes=10), seed=1)
    torch.save({"epoch": 3, "model_state_dict": {"module." + k: v for k, v in src.state_dict().items()}},
               tmp_path / "run.pth.tar")
    torch.save(src, tmp_path / "whole_model.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.noext")
    (tmp_path / "sub").mkdir()
    return tmp_path, src


def pick(insp, name):
    label = next(o for o in insp.files.listing.options if o.startswith(name))
    insp.files.listing.value = label


def test_file_list_filters_by_name_and_content(folder):
    tmp, _ = folder
    labels = [label for label, _, _ in list_folder(tmp)]
    assert labels[0] == "sub/"
    assert any(lbl.startswith("run.pth.tar") and "[torch-zip]" in lbl for lbl in labels)
    assert any(lbl.startswith("weights.noext") for lbl in labels)  # sniffed by content, not by name
    assert not any(lbl.startswith("notes.txt") for lbl in labels)


def test_pick_file_then_model_load_and_undo(folder):
    tmp, src = folder
    model = randomized(SmallCNN(num_classes=5), seed=2)
    before = snapshot(model)
    insp = cv.CheckpointInspector(model=model, start_dir=tmp)
    assert insp.load_all_button.disabled
    pick(insp, "run.pth.tar")
    assert insp.error is None
    assert insp.report.summary["match"] == len(before) - 2 and insp.report.summary["shape_mismatch"] == 2
    assert insp.section.value == "model_state_dict" and "epoch" in insp.meta.value
    assert "match</span> " in insp.table.counts.value
    assert len(insp.table.shown()) == len(before)
    insp.table.filter.value = "shape_mismatch"
    assert sorted(insp.table.shown()["key"]) == ["head.bias", "head.weight"]
    insp.table.filter.value = "all"
    insp.table.view.search = "features\\.0"
    assert set(insp.table.shown()["key"]) == {"features.0.weight", "features.0.bias"}
    insp.table.view.search = ""

    assert not insp.load_all_button.disabled
    insp.load_all_button.click()
    assert insp.model is model and len(insp.last_result.loaded) == len(before) - 2
    assert torch.equal(model.features[0].weight, src.features[0].weight)
    assert torch.equal(model.head.weight, before["head.weight"])
    assert "2 skipped" in insp.result_panel.summary.value
    assert "strict=False" in insp.result_panel.code.value and "module" in insp.result_panel.code.value
    assert set(insp.table.shown().loc[insp.table.shown()["loaded"] == "✓", "key"]) == set(insp.last_result.loaded)

    insp.undo_button.click()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert insp.undo_button.disabled and "Undone" in insp.result_panel.summary.value


def test_load_selected_rows_only(folder):
    tmp, src = folder
    model = SmallCNN(num_classes=5)
    before = snapshot(model)
    insp = cv.CheckpointInspector(model=model, path=tmp / "run.pth.tar")
    labels = insp.report.frame.index[insp.report.frame["key"].isin(["features.0.weight", "head.weight"])]
    insp.table.select(list(labels))
    insp.load_selected_button.click()
    assert insp.last_result.loaded == ["features.0.weight"]
    assert "shape" in insp.last_result.skipped["head.weight"]
    assert torch.equal(model.features[0].weight, src.features[0].weight)
    assert torch.equal(model.features[3].weight, before["features.3.weight"])


def test_untrusted_file_needs_the_trust_box(folder):
    tmp, _ = folder
    model = SmallCNN(num_classes=10)
    insp = cv.CheckpointInspector(model=model, start_dir=tmp)
    pick(insp, "whole_model.pt")
    assert insp.report is None and insp.checkpoint is None
    assert "SmallCNN" in insp.message.value and "ckptviz-untrusted" in insp.message.value
    assert insp.trust.layout.display == "" and insp.trust.value is False
    insp.trust.value = True
    assert insp.report is not None and insp.report.summary["match"] == len(model.state_dict())
    pick(insp, "run.pth.tar")  # a new file starts untrusted again
    assert insp.trust.value is False


def test_bad_files_show_errors_not_tracebacks(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    insp = cv.CheckpointInspector(model=SmallCNN())
    insp.files.path.value = str(tmp_path / "broken.pt")
    insp.files.open_button.click()
    assert insp.checkpoint is None and "broken.pt" in insp.error
    assert "ckptviz-error" in insp.message.value and "Traceback" not in insp.message.value
    insp.load_all_button.click()  # disabled in the browser; from code it explains itself
    assert insp.last_result is None


def test_model_picker_builds_from_namespace_and_torchvision(folder):
    tmp, _ = folder
    ns = {"SmallCNN": SmallCNN}
    insp = cv.CheckpointInspector(path=tmp / "run.pth.tar", namespace=ns)
    assert insp.report is None and "pick a model" in insp.message.value
    assert "SmallCNN" in insp.model_picker.spec.options and "torchvision:resnet18" in insp.model_picker.spec.options
    insp.model_picker.spec.value = "SmallCNN"
    insp.model_picker.kwargs.value = "num_classes=10"
    insp.model_picker.build_button.click()
    assert isinstance(insp.model, SmallCNN) and insp.report.summary["match"] == len(insp.model.state_dict())
    insp.model_picker.spec.value = "torchvision:resnet18"
    insp.model_picker.kwargs.value = "num_classes=oops("
    insp.model_picker.build_button.click()
    assert "ckptviz-error" in insp.model_picker.status.value and isinstance(insp.model, SmallCNN)


def test_section_switch_and_train_mode(tmp_path):
    a, b = randomized(SmallCNN(), seed=3), randomized(SmallCNN(), seed=4)
    torch.save({"model": a.state_dict(), "ema": b.state_dict()}, tmp_path / "two.pt")
    model = SmallCNN()
    insp = cv.CheckpointInspector(model=model, path=tmp_path / "two.pt")
    assert insp.section.value == "model"
    insp.section.value = "ema"
    assert insp.report.section == "ema"
    insp.load_all_button.click()
    assert torch.equal(model.head.weight, b.head.weight)
    assert model.training and insp.devices.mode.value == "train"
    insp.devices.mode.value = "eval"
    assert not model.training


def test_tensor_panel_data_and_device_summary(tmp_path):
    src = randomized(SmallCNN(), seed=5)
    torch.save(src.state_dict(), tmp_path / "m.pt")
    model = SmallCNN()
    rep = cv.compare(model, tmp_path / "m.pt")
    table, hists = tensor_comparison(rep.checkpoint.tensor("head.weight"), model.head.weight.detach())
    assert list(table.columns) == ["checkpoint", "model"]
    assert table.loc["numel", "checkpoint"] == src.head.weight.numel()
    assert abs(table.loc["mean", "checkpoint"] - src.head.weight.double().mean().item()) < 1e-6
    assert set(hists) == {"checkpoint", "model"}
    assert hists["checkpoint"].counts.sum() == src.head.weight.numel()
    assert (hists["checkpoint"].edges == hists["model"].edges).all()  # one range, comparable bins
    summary = device_summary(rep, model)
    assert f"{len(model.state_dict())} tensors saved on <b>cpu</b> stay on <b>cpu</b>" in summary
    with torch.device("meta"):
        empty = SmallCNN()
    summary = device_summary(cv.compare(empty, tmp_path / "m.pt"), empty)
    assert f"{len(model.state_dict())} tensors saved on <b>cpu</b> will be materialized on <b>cpu</b>" in summary


def test_static_export_falls_back_to_the_styled_table(tmp_path):
    torch.save(SmallCNN().state_dict(), tmp_path / "m.pt")
    insp = cv.CheckpointInspector(model=SmallCNN(), path=tmp_path / "m.pt")
    bundle = insp._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "ckptviz-report" in bundle["text/html"] and "features.0.weight" in bundle["text/html"]


def test_checkpoint_folders_are_one_entry_and_open_as_one(tmp_path):
    """A folder of shards shows as one checkpoint (layout, shard count, size) and opens whole."""
    from safetensors.torch import save_file

    src = randomized(SmallCNN(num_classes=10), seed=1)
    sd = src.state_dict()
    shards = tmp_path / "sharded"
    shards.mkdir()
    keys = list(sd)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: sd[k].contiguous() for k in part}, shards / f"model-0000{i + 1}-of-00002.safetensors")
    (tmp_path / "plain").mkdir()
    labels = {label: kind for label, _, kind in list_folder(tmp_path)}
    (label,) = [lbl for lbl in labels if lbl.startswith("sharded/")]
    assert labels[label] == "checkpoint" and "hf-safetensors-sharded: 2 shards" in label
    assert labels["plain/"] == "dir"
    inner = [lbl for lbl, _, kind in list_folder(shards) if kind == "checkpoint"]
    assert inner and inner[0].startswith("./")

    model = randomized(SmallCNN(num_classes=10), seed=2)
    insp = cv.CheckpointInspector(model=model, start_dir=tmp_path)
    pick(insp, "sharded/")
    assert insp.error is None and insp.checkpoint.path == str(shards)
    assert "in 2 files" in insp.meta.value
    assert insp.report.summary["match"] == len(sd)
    insp.load_all_button.click()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_model_picker_offers_the_config_json_and_load_materializes_the_meta_model(tmp_path):
    pytest.importorskip("transformers")
    from hf_files import logits, tiny_llama

    src = tiny_llama(tmp_path)
    insp = cv.CheckpointInspector(path=tmp_path / "model.safetensors", namespace={})
    label = "config.json: LlamaForCausalLM (on meta)"
    assert insp.model_picker.spec.options[0] == label and insp.model_picker.spec.value == label
    insp.model_picker.build_button.click()
    model = insp.model
    assert type(model).__name__ == "LlamaForCausalLM" and model.lm_head.weight.is_meta
    status = insp.model_picker.status.value
    assert "on meta" in status and "no memory is used" in status and "materializes" in status
    assert insp.report.summary["match"] == len(src.state_dict()) and set(insp.report.frame["model_device"]) == {"meta"}
    objects = dict(model.state_dict(keep_vars=True))

    insp.load_all_button.click()  # the inspector loads a meta model with assign=True
    res = insp.last_result
    assert insp.error is None and res.assign and res.still_meta == [] and len(res.loaded) == len(objects)
    assert "materialized from the checkpoint on cpu" in insp.message.value
    for k, t in model.state_dict(keep_vars=True).items():
        assert t is objects[k] and t.device.type == "cpu" and torch.equal(t, src.state_dict()[k]), k
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    assert torch.equal(logits(model, ids), logits(src, ids))
    assert "assign=True" in insp.result_panel.code.value
    assert set(insp.report.frame["model_device"]) == {"cpu"} and "meta" not in insp.model_picker.status.value

    insp.undo_button.click()
    assert all(t is objects[k] and t.is_meta for k, t in model.state_dict(keep_vars=True).items())
    assert set(insp.report.frame["model_device"]) == {"meta"} and "no memory is used" in insp.model_picker.status.value


def test_model_picker_finds_the_config_inside_a_folder_and_forgets_it_for_another_file(tmp_path):
    pytest.importorskip("transformers")
    from hf_files import tiny_llama

    from ckptviz.widgets.model_picker import ModelPicker

    src = tiny_llama(tmp_path / "hf", tie=True)
    torch.save(SmallCNN().state_dict(), tmp_path / "plain.pt")
    picker = ModelPicker(namespace={"SmallCNN": SmallCNN})
    picker.set_checkpoint_path(tmp_path / "hf")  # a model folder
    assert picker.spec.options[:2] == ("config.json: LlamaForCausalLM (on meta)", "SmallCNN")
    model = picker.build()
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_meta
    picker.set_checkpoint_path(tmp_path / "plain.pt")
    assert not any(o.startswith("config.json") for o in picker.spec.options)

    insp = cv.CheckpointInspector(path=tmp_path / "hf", namespace={})  # the folder opened whole
    assert insp.error is None and insp.model_picker.spec.value == "config.json: LlamaForCausalLM (on meta)"
    insp.model_picker.build_button.click()
    insp.load_all_button.click()
    assert insp.last_result.assign and insp.last_result.still_meta == []
    assert insp.model.lm_head.weight is insp.model.model.embed_tokens.weight
    assert torch.equal(insp.model.lm_head.weight, src.lm_head.weight)


class _PosEmbedNet(torch.nn.Module):
    def __init__(self, tokens: int):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, tokens, 8))


def test_adapt_panel_takes_resample_options_for_a_grid_it_cannot_infer(tmp_path):
    # 1 class token + a 14x14 grid saved; the model has a 14x20 grid (a 224x320 image): no square grid fits
    # the model's 281 tokens, so the grid must be given, in the panel as in rep.adapt(grid=...)
    saved = torch.randn(1, 1 + 14 * 14, 8, generator=torch.Generator().manual_seed(0))
    torch.save({"pos_embed": saved}, tmp_path / "vit.pt")
    model = _PosEmbedNet(1 + 14 * 20)
    insp = cv.CheckpointInspector(model=model, path=tmp_path / "vit.pt")
    insp.table.select([insp.report.frame.index[0]])
    panel = insp.adapt_panel
    panel.method.value = "resample"
    assert panel.options_box.layout.display == ""
    assert "no square grid fits" in panel.preview.value  # auto fails, and says what to pass
    panel.prefix_tokens.value, panel.grid.value = "1", "14x20"
    assert "resample 14×14→14×20 grid, bicubic (1 prefix token kept)" in panel.preview.value
    assert panel.plot.value.startswith("<img")  # the histogram of what will be written
    panel.grid.value = "14 by 20"
    assert "must be two numbers like 16x20" in panel.preview.value
    panel.apply_button.click()
    assert insp.report.summary["adapted"] == 0  # unreadable options adapt nothing
    panel.grid.value = "14×20"
    panel.apply_button.click()
    assert insp.report.summary["adapted"] == 1
    insp.load_all_button.click()
    want = cv.compare(model, tmp_path / "vit.pt").adapt("pos_embed", "resample", prefix_tokens=1, grid=(14, 20))
    fresh = _PosEmbedNet(1 + 14 * 20)
    cv.load_partial(fresh, want)
    assert torch.equal(model.pos_embed, fresh.pos_embed) and torch.equal(model.pos_embed[:, :1], saved[:, :1])
    panel.method.value = "reinit"
    assert panel.options_box.layout.display == "none"
