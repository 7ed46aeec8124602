"""DeepSpeed checkpoint folders (and Lightning's DeepSpeed folders) opened with ckptviz.

The folders are real ``torch.save`` files in the exact layout DeepSpeed 0.19.8's ``engine.save_checkpoint`` writes
(``tests/deepspeed_fixtures.py``: file names, keys, flat fp32 partitions with their padding, the bit16 views, the
pickled DeepSpeed globals; checked against real DeepSpeed, see docs/deepspeed-layout.md), written with plain torch
so the suite needs no DeepSpeed. Values are checked against ``consolidate_reference``, an independent rebuild of
what ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` returns. One test at the end runs real DeepSpeed and
is skipped unless ``$CKPTVIZ_DEEPSPEED_PYTHON`` names a Python that has it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import warnings
from pathlib import Path

import psutil
import pytest
import torch
from deepspeed_fixtures import (
    _save,
    consolidate_reference,
    lightning_client_state,
    load_deepspeed_file,
    real_deepspeed_python,
    write_deepspeed_checkpoint,
    write_lightning_deepspeed_checkpoint,
    write_real_deepspeed_checkpoint,
)
from torch import nn

import ckptviz as cv
from ckptviz.snippet import torch_code


class Tiny(nn.Module):
    """Tied embedding/head, a frozen bias, BatchNorm running stats (int64 counter included)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.lin = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)
        self.out = nn.Linear(7, 5)
        self.head = nn.Linear(5, 11, bias=False)
        self.head.weight = self.emb.weight
        self.lin.bias.requires_grad_(False)

    def forward(self, x):
        return self.head(self.out(self.bn(self.lin(self.emb(x).mean(1)))))


class Wider(nn.Module):
    """Odd-sized layers, so that parameter alignment pads; used with two parameter groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 5)
        self.b = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(3)
        self.c = nn.Linear(3, 9)

    def forward(self, x):
        return self.c(self.norm(self.b(self.a(x))))


GROUPS = [["a.weight", "b.bias", "norm.weight"], ["a.bias", "b.weight", "norm.bias", "c.weight", "c.bias"]]
X_TINY = torch.arange(12).reshape(4, 3) % 11
X_WIDE = torch.linspace(-1, 1, 28).reshape(4, 7)


def tiny() -> Tiny:
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.num_batches_tracked.fill_(9)
        m.lin.bias.copy_(torch.arange(7) / 8 - 0.25)  # frozen, kept in bf16 under bf16: make it exact there
    return m.eval()


def wider() -> Wider:
    torch.manual_seed(1)
    return Wider().eval()


def fresh(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(99)
    return cls().eval()


def open_ds(path, **kw) -> cv.Checkpoint:
    """Open without the stage-3 note turning into noise (tests that care check ``ck.warnings``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cv.CheckpointWarning)
        return cv.open_checkpoint(path, **kw)


def assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------- values, every stage
CASES = [(stage, ws, bf16) for stage in (0, 1, 2, 3) for ws in (1, 2) for bf16 in (False, True)]
CASES += [(1, 3, False), (2, 3, True), (3, 3, False), (3, 3, True)]


@pytest.mark.parametrize("stage,ws,bf16", CASES)
def test_sections_equal_model_and_zero_to_fp32(tmp_path, stage, ws, bf16):
    model = tiny()
    write_deepspeed_checkpoint(tmp_path, model, stage, ws, bf16=bf16)
    ck = open_ds(tmp_path)
    assert ck.format == "deepspeed" and ck.path == str(tmp_path)
    assert ck.unsafe_globals == []
    bit16 = torch.bfloat16 if bf16 else torch.float32
    if stage < 3:  # module: the weights as trained, in the training dtype; buffers keep theirs
        want = {k: v.to(bit16) if k in dict(model.named_parameters(remove_duplicate=False)) else v
                for k, v in model.state_dict().items()}
        assert_same_state(ck.state_dict("module"), want)
        assert ck.sections[0] == "module"
    else:
        assert "module" not in ck.sections
        assert any("ZeRO-3 model files hold no weights" in w for w in ck.warnings)
    if stage == 0:
        assert ck.sections == ["module"]
        return
    ref = consolidate_reference(tmp_path)
    got = ck.state_dict("fp32")
    assert_same_state(got, ref)
    frame = ck.tensors("fp32")
    assert list(frame.index) == list(ref)
    assert list(frame["dtype"]) == [str(v.dtype).removeprefix("torch.") for v in ref.values()]
    opt0 = ck.metadata["deepspeed"]["optimizer_files"][0]
    assert frame.loc["emb.weight", "file"] == opt0 and frame.loc["bn.running_mean", "file"].endswith("model_states.pt")
    assert ("lin.bias" in got) == (stage >= 2)  # zero_to_fp32: ZeRO-1 saves frozen parameters in 'module' only
    assert torch.equal(got["head.weight"], got["emb.weight"])  # the tied alias, after the trainable ones
    assert list(got)[-1] == "head.weight"


@pytest.mark.parametrize("stage,ws", [(0, 1), (0, 2), (1, 2), (2, 1), (2, 2), (3, 1), (3, 3)])
def test_compare_and_load_partial_reproduce_the_model(tmp_path, stage, ws):
    model = tiny()
    write_deepspeed_checkpoint(tmp_path, model, stage, ws)
    ck = open_ds(tmp_path)
    sections = ck.sections if stage in (1, 2) else [None]
    for section in sections:
        rep = cv.compare(model, ck, section=section)
        want = len(model.state_dict()) - (1 if section == "fp32" and stage == 1 else 0)  # ZeRO-1 'fp32': no lin.bias
        assert rep.summary.get("match") == want, (section, rep.summary)
        other = fresh(Tiny)
        res = cv.load_partial(other, rep)
        if section == "fp32" and stage == 1:
            other.lin.bias.data.copy_(model.lin.bias)
        assert len(res.loaded) == want
        assert torch.equal(outputs(other, X_TINY), outputs(model, X_TINY))


def test_bf16_fp32_section_holds_the_master_weights(tmp_path):
    model = tiny()
    write_deepspeed_checkpoint(tmp_path, model, 2, 2, bf16=True)
    ck = open_ds(tmp_path)
    module = cv.compare(model, ck).summary  # bf16 parameters beside the fp32 model: loadable, with a cast
    assert module.get("dtype_mismatch") == 8 and module.get("match") == 3  # buffers stay fp32
    rep = cv.compare(model, ck, section="fp32")
    assert rep.summary.get("match") == 10 and rep.summary.get("dtype_mismatch") == 1  # frozen lin.bias stays bf16
    other = fresh(Tiny)
    cv.load_partial(other, rep)
    assert torch.equal(outputs(other, X_TINY), outputs(model, X_TINY))


def test_bf16_optimizer(tmp_path):
    """DeepSpeed's BF16_Optimizer saves padded partitions and no zero_stage; zero_to_fp32 refuses such folders,
    ckptviz consolidates them as ZeRO-1 after cutting the padding (as consolidate_reference does)."""
    model = wider()
    write_deepspeed_checkpoint(tmp_path, model, 1, 3, bf16_optimizer=True)
    osd = load_deepspeed_file(tmp_path / "global_step2" / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt")
    assert "zero_stage" not in osd["optimizer_state_dict"] and osd["optimizer_state_dict"]["group_paddings"][0] > 0
    ck = open_ds(tmp_path)
    assert_same_state(ck.state_dict("fp32"), consolidate_reference(tmp_path))
    other = fresh(Wider)
    cv.load_partial(other, cv.compare(model, ck, section="fp32"))
    assert torch.equal(outputs(other, X_WIDE), outputs(model, X_WIDE))


@pytest.mark.parametrize("stage,ws,bf16", [(2, 2, False), (1, 3, True), (2, 1, True)])
def test_two_param_groups_with_parameter_alignment(tmp_path, stage, ws, bf16):
    model = wider()
    write_deepspeed_checkpoint(tmp_path, model, stage, ws, bf16=bf16, param_groups=GROUPS, parameter_alignment=True)
    name = f"{'bf16_' if bf16 else ''}zero_pp_rank_0_mp_rank_00_optim_states.pt"
    pads = load_deepspeed_file(tmp_path / "global_step2" / name)["optimizer_state_dict"]["param_alignment_paddings"]
    assert len(pads) == 2 and any(any(g) for g in pads)  # the layout really pads between parameters
    ck = open_ds(tmp_path)
    ref = consolidate_reference(tmp_path)
    assert_same_state(ck.state_dict("fp32"), ref)
    assert list(ref)[-5:] == GROUPS[1]  # group order, as zero_to_fp32
    other = fresh(Wider)
    cv.load_partial(other, cv.compare(model, ck, section="fp32"))
    assert torch.equal(outputs(other, X_WIDE), outputs(model, X_WIDE))


@pytest.mark.parametrize("ws", [2, 3])
def test_stage3_several_sub_groups(tmp_path, ws):
    model = wider()
    write_deepspeed_checkpoint(tmp_path, model, 3, ws, param_groups=GROUPS, sub_group_size=12)
    flats = load_deepspeed_file(tmp_path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert len(flats["optimizer_state_dict"]["fp32_flat_groups"]) >= 3
    ck = open_ds(tmp_path)
    assert ck.sections == ["fp32"]
    assert_same_state(ck.state_dict("fp32"), consolidate_reference(tmp_path))
    got, want = ck.state_dict("fp32"), model.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("stage", [2, 3])
def test_floating_buffers_become_fp32(tmp_path, stage):
    """zero_to_fp32 returns floating buffers as fp32 (``.float()``), other dtypes as saved."""
    model = wider()
    model.register_buffer("scale", torch.linspace(-2, 2, 6, dtype=torch.float16))
    model.register_buffer("index", torch.arange(4))
    write_deepspeed_checkpoint(tmp_path, model, stage, 2)
    ck = open_ds(tmp_path)
    got = ck.state_dict("fp32")
    assert_same_state(got, consolidate_reference(tmp_path))
    assert got["scale"].dtype == torch.float32 and torch.equal(got["scale"], model.scale.float())
    assert got["index"].dtype == torch.int64


def test_exclude_frozen_parameters(tmp_path):
    model = tiny()
    write_deepspeed_checkpoint(tmp_path, model, 3, 2, exclude_frozen_parameters=True)
    ck = open_ds(tmp_path)
    assert "lin.bias" not in ck.tensors("fp32").index
    assert_same_state(ck.state_dict("fp32"), consolidate_reference(tmp_path))


def test_consolidated_tensors_view_the_optimizer_file_at_world_size_1(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 2, 1)
    ck = open_ds(tmp_path)
    sd = ck.state_dict("fp32", copy=False)
    a, b = sd["emb.weight"], sd["out.weight"]  # both in the one flat group of rank 0's file
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert b.data_ptr() - a.data_ptr() == (11 * 5 + 7 * 5) * 4 + (7 + 7) * 4  # emb, lin.weight, bn.weight/bias
    module = ck.state_dict("module")  # copies, but tensors over one storage share one buffer, as saved
    assert module["emb.weight"].untyped_storage().data_ptr() == module["out.weight"].untyped_storage().data_ptr()


def test_reads_run_on_worker_threads(tmp_path):
    model = tiny()
    write_deepspeed_checkpoint(tmp_path, model, 3, 2)
    ck = open_ds(tmp_path)
    stats = ck.stats("fp32")  # shard-parallel on worker threads; the partitions are parsed once
    assert list(stats.index) == list(consolidate_reference(tmp_path))
    assert stats.loc["emb.weight", "mean"] == pytest.approx(model.emb.weight.double().mean().item())


# ---------------------------------------------------------------- stage 0: the torch optimizer
@pytest.mark.parametrize("bf16", [False, True])
def test_stage0_optimizer_restores_into_adamw(tmp_path, bf16):
    model = tiny()
    write_deepspeed_checkpoint(tmp_path, model, 0, 1, bf16=bf16)
    ck = open_ds(tmp_path)
    section = "optimizer.optimizer_state_dict" if bf16 else "optimizer"
    assert ck.optimizer_sections == [section]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    counts = cv.load_optimizer(opt, ck, section=section)
    saved = load_deepspeed_file(tmp_path / "global_step2" / "mp_rank_00_model_states.pt")["optimizer"]
    saved = saved["optimizer_state_dict"] if bf16 else saved
    assert counts["params_with_state"] == len(saved["state"]) > 0
    for i, state in saved["state"].items():
        for name, v in state.items():
            assert torch.equal(opt.state_dict()["state"][i][name], v)


# ---------------------------------------------------------------- laziness
def _mapped(path: Path) -> bool:
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


@pytest.mark.parametrize("stage", [2, 3])
def test_open_reads_no_optimizer_file(tmp_path, stage):
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])  # 263k parameters: ~1.6 MB per rank's file
    write_deepspeed_checkpoint(tmp_path / "warm", model, stage, 2)
    open_ds(tmp_path / "warm")  # imports done once, outside the measurement
    folder = write_deepspeed_checkpoint(tmp_path / "ds", model, stage, 2)
    optim = sorted((folder / "global_step2").glob("*_optim_states.pt"))
    assert len(optim) == 2 and min(p.stat().st_size for p in optim) > 1_500_000
    proc = psutil.Process()
    before = proc.io_counters().read_chars
    ck = open_ds(folder)
    read = proc.io_counters().read_chars - before
    frame = ck.tensors("fp32")
    assert len(frame) == 8 and frame["numel"].sum() == sum(p.numel() for p in model.parameters())
    assert read < 200_000, read  # the model file's zip directory and pickle, nothing of the partitions
    assert not any(_mapped(p) for p in optim)
    value = ck.tensor("0.weight", "fp32")  # read with pread: nothing mapped
    assert torch.equal(value, model[0].weight)
    assert not any(_mapped(p) for p in optim)
    view = ck.tensor("0.weight", "fp32", copy=False)
    assert torch.equal(view, model[0].weight)
    assert _mapped(optim[0])  # ZeRO-2: a view of rank 0's partition; ZeRO-3: a copy of both ranks', from their maps
    assert (view.untyped_storage().nbytes() > view.numel() * 4) == (stage == 2)


# ---------------------------------------------------------------- errors
def test_missing_optimizer_file_of_one_rank(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 2, 2)
    gone = tmp_path / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    gone.unlink()
    with pytest.warns(cv.CheckpointWarning, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        ck = cv.open_checkpoint(tmp_path)
    assert torch.equal(ck.tensor("emb.weight"), tiny().emb.weight)  # 'module' does not need it
    with pytest.raises(cv.CheckpointNotFoundError, match=str(gone)):
        ck.tensor("emb.weight", "fp32")


def test_missing_rank_model_file_at_stage3(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 3, 2)
    gone = tmp_path / "global_step2" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    gone.unlink()
    ck = open_ds(tmp_path)
    assert any("zero_pp_rank_1_mp_rank_00_model_states.pt" in w and "missing" in w for w in ck.warnings)
    assert torch.equal(ck.tensor("emb.weight", "fp32"), tiny().emb.weight)  # trainable: optimizer files only
    with pytest.raises(cv.CheckpointNotFoundError, match=str(gone)):
        ck.tensor("lin.bias", "fp32")  # frozen: a fragment in every rank's model file


def test_truncated_optimizer_file_fails_at_read_naming_it(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 3, 2)
    cut = tmp_path / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    ck = open_ds(tmp_path)  # open does not read it
    for _ in range(2):  # a failed parse is not cached as a success
        with pytest.raises(cv.CorruptCheckpointError, match=str(cut)):
            ck.tensor("emb.weight", "fp32")


def test_optimizer_file_changed_since_open(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 2, 1)
    ck = open_ds(tmp_path)
    optim = tmp_path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes() + b"\0")
    with pytest.raises(cv.CorruptCheckpointError, match="changed on disk"):
        ck.tensor("emb.weight", "fp32")


def test_optimizer_files_of_another_world_size(tmp_path):
    write_deepspeed_checkpoint(tmp_path / "a", tiny(), 2, 2)
    write_deepspeed_checkpoint(tmp_path / "b", tiny(), 2, 3)
    extra = tmp_path / "b" / "global_step2" / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    (tmp_path / "a" / "global_step2" / extra.name).write_bytes(extra.read_bytes())
    ck = open_ds(tmp_path / "a")
    with pytest.raises(cv.CorruptCheckpointError, match="expected 2 \\*_optim_states.pt files .* found 3"):
        ck.tensor("emb.weight", "fp32")


def test_partition_from_another_model(tmp_path):
    write_deepspeed_checkpoint(tmp_path / "a", tiny(), 2, 2)
    write_deepspeed_checkpoint(tmp_path / "b", wider(), 2, 2)
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (tmp_path / "a" / "global_step2" / name).write_bytes((tmp_path / "b" / "global_step2" / name).read_bytes())
    ck = open_ds(tmp_path / "a")
    with pytest.raises(cv.CorruptCheckpointError, match="parameter group 0 needs"):
        ck.tensor("emb.weight", "fp32")


def test_a_parameter_shape_past_the_numel_limit_is_a_limit_error(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 2, 1)
    states = tmp_path / "global_step2" / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)
    name = next(iter(state["param_shapes"][0]))
    state["param_shapes"][0][name] = torch.Size([2**40, 2**40])
    torch.save(state, states)
    with pytest.raises(cv.CheckpointLimitError, match=rf"{states}.*param_shapes.*MAX_NUMEL"):
        cv.open_checkpoint(tmp_path)


def test_latest_naming_a_missing_tag(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 2, 1, steps=4)
    (tmp_path / "latest").write_text("global_step9")
    with pytest.raises(cv.CheckpointNotFoundError, match="'global_step9'.*tag folders here: global_step4"):
        cv.open_checkpoint(tmp_path)
    (tmp_path / "global_step4").rename(tmp_path / "moved")
    with pytest.raises(cv.CheckpointNotFoundError, match="'global_step9'"):
        cv.open_checkpoint(tmp_path)


def test_tag_folder_without_model_states(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 2, 2)
    (tmp_path / "global_step2" / "mp_rank_00_model_states.pt").unlink()
    for path in (tmp_path / "global_step2", tmp_path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        with pytest.raises(cv.CheckpointNotFoundError, match="without its rank-0 model-states file"):
            cv.open_checkpoint(path)
    with pytest.raises(cv.CheckpointNotFoundError, match="global_step2"):
        cv.open_checkpoint(tmp_path)  # 'latest' names a folder that no longer holds a checkpoint


def test_no_latest_opens_the_newest_step(tmp_path):
    write_deepspeed_checkpoint(tmp_path, wider(), 2, 1, steps=3, save_latest=False)
    write_deepspeed_checkpoint(tmp_path, tiny(), 2, 1, steps=12, save_latest=False)
    with pytest.warns(cv.CheckpointWarning, match="opened the newest tag global_step12"):
        ck = cv.open_checkpoint(tmp_path)
    assert ck.metadata["deepspeed"]["tag"] == "global_step12" and "emb.weight" in ck.tensors().index


def test_trainer_folder_with_weights_beside(tmp_path):
    """A trainer's checkpoint-N/ folder: the DeepSpeed state plus the weights it exported, each readable."""
    from safetensors.torch import save_file

    model = tiny()
    write_deepspeed_checkpoint(tmp_path, model, 2, 1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"},
              tmp_path / "model.safetensors")
    with pytest.warns(cv.CheckpointWarning, match="also holds model.safetensors"):
        assert cv.open_checkpoint(tmp_path).format == "deepspeed"
    assert cv.open_checkpoint(tmp_path / "model.safetensors").format == "safetensors"


def test_folder_summary(tmp_path):
    from ckptviz.readers.layout import summarize_folder

    write_deepspeed_checkpoint(tmp_path, tiny(), 2, 2)
    summary = summarize_folder(str(tmp_path))
    assert (summary.format, summary.files) == ("deepspeed", 3)
    (tmp_path / "global_step2" / "mp_rank_00_model_states.pt").unlink()
    summary = summarize_folder(str(tmp_path / "global_step2"))  # its own files, not the working directory's
    assert (summary.format, summary.files) == ("deepspeed", 2)


# ---------------------------------------------------------------- safety
def _names_in_pickle(path: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))


def test_deepspeed_globals_are_inert_and_not_unsafe(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 3, 2)
    optim = tmp_path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    pkl = _names_in_pickle(optim)
    for name in (b"deepspeed.runtime.zero.config\nZeroStageEnum", b"deepspeed.runtime.fp16.loss_scaler\nLossScaler",
                 b"torch._tensor\n_rebuild_from_type_v2"):  # the flat groups carry a ds_id attribute
        assert name in pkl
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(optim, weights_only=True)
    ck = open_ds(tmp_path)
    assert ck.unsafe_globals == []
    assert torch.equal(ck.tensor("emb.weight", "fp32"), tiny().emb.weight)


def test_foreign_global_in_an_optimizer_file_needs_trust(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 2, 1)
    optim = tmp_path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = load_deepspeed_file(optim)
    state["optimizer_state_dict"]["extra"] = argparse.Namespace(lr=0.1)
    _save(state, optim)
    ck = open_ds(tmp_path)  # the model file is clean: open does not look at the optimizer files
    with pytest.raises(cv.UnsafeCheckpointError, match="argparse.Namespace") as err:
        ck.tensor("emb.weight", "fp32")
    assert str(optim) in str(err.value)
    trusted = open_ds(tmp_path, trust=True)
    assert torch.equal(trusted.tensor("emb.weight", "fp32"), tiny().emb.weight)


def test_lightning_hyper_parameters_object_needs_trust(tmp_path):
    client = lightning_client_state(hyper_parameters={"args": argparse.Namespace(lr=0.1)})
    folder = write_lightning_deepspeed_checkpoint(tmp_path / "epoch=0-step=2.ckpt", tiny(), 2, 1, client_state=client)
    with pytest.raises(cv.UnsafeCheckpointError, match="argparse.Namespace"):
        cv.open_checkpoint(folder)
    ck = open_ds(folder, trust=True)
    assert ck.metadata["hyper_parameters"]["args"]["__class__"] == "argparse.Namespace"
    assert "weights_only=False" in torch_code(cv.compare(tiny(), ck))


def test_opening_and_reading_write_nothing(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 3, 2)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")}
    ck = open_ds(tmp_path)
    sd = ck.state_dict("fp32")
    sd["emb.weight"].add_(1)  # a private map: nothing goes back to the file
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")} == before
    assert torch.equal(open_ds(tmp_path).tensor("emb.weight", "fp32"), tiny().emb.weight)


# ---------------------------------------------------------------- metadata, Lightning, code
def test_metadata(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 3, 2, bf16=True, steps=5)
    ck = open_ds(tmp_path)
    ds = ck.metadata["deepspeed"]
    assert {k: ds[k] for k in ("version", "zero_stage", "dp_world_size", "mp_world_size", "global_steps", "tag",
                               "dtype")} == {"version": "0.19.8", "zero_stage": 3, "dp_world_size": 2,
                                             "mp_world_size": 1, "global_steps": 5, "tag": "global_step5",
                                             "dtype": "bfloat16"}
    assert ds["model_files"] == [f"global_step5/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
    assert ds["optimizer_files"] == [f"global_step5/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert ds["ds_config"]["zero_optimization"] == {"stage": 3}
    assert sorted(os.path.basename(f) for f in ck.files) == sorted(os.path.basename(f) for f in ds["model_files"]
                                                                   + ds["optimizer_files"])
    assert "zero_to_fp32" in ds["sections"]["fp32"]


@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_folder_opens_from_the_folder_its_tag_and_a_file(tmp_path, stage):
    model = tiny()
    folder = write_lightning_deepspeed_checkpoint(tmp_path / "epoch=0-step=10.ckpt", model, stage, 2,
                                                  client_state=lightning_client_state(0, 10, {"lr": 0.01}))
    first = "mp_rank_00_model_states.pt" if stage == 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    ref = consolidate_reference(folder)
    for path in (folder, folder / "checkpoint", folder / "checkpoint" / first,
                 folder / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        ck = open_ds(path)
        assert ck.path == str(path if path.is_dir() else path.parent)
        assert ck.metadata["deepspeed"]["tag"] == "checkpoint"
        assert {k: ck.metadata[k] for k in ("epoch", "global_step", "hyper_parameters")} == {
            "epoch": 0, "global_step": 10, "hyper_parameters": {"lr": 0.01}}
        assert ck.metadata["pytorch-lightning_version"] == "2.6.6"
        assert_same_state(ck.state_dict("fp32"), ref)


def _run(code: str, model: nn.Module) -> None:
    ast.parse(code)
    exec(compile(code, "<torch_code>", "exec"), {"model": model})


@pytest.mark.parametrize("stage", [0, 2])
def test_torch_code_for_module_runs(tmp_path, stage):
    model = tiny()
    write_deepspeed_checkpoint(tmp_path, model, stage, 2)
    other = fresh(Tiny)
    code = torch_code(cv.load_partial(fresh(Tiny), cv.compare(model, open_ds(tmp_path))))
    model_file = tmp_path / "global_step2" / "mp_rank_00_model_states.pt"
    assert f'torch.load("{model_file}", map_location="cpu", weights_only=True)["module"]' in code
    _run(code, other)
    assert torch.equal(outputs(other, X_TINY), outputs(model, X_TINY))


def test_torch_code_for_fp32_uses_zero_to_fp32(tmp_path):
    write_deepspeed_checkpoint(tmp_path, tiny(), 3, 2, tag="best")
    ck = open_ds(tmp_path / "best")
    code = torch_code(cv.compare(tiny(), ck))
    assert "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint" in code
    assert f'sd = get_fp32_state_dict_from_zero_checkpoint("{tmp_path}", tag="best")' in code
    assert "weights_only=False" in code
    ast.parse(code)


# ---------------------------------------------------------------- real DeepSpeed (skipped without it)
REAL_PYTHON = real_deepspeed_python() if os.environ.get("CKPTVIZ_DEEPSPEED_PYTHON") else None


@pytest.mark.skipif(REAL_PYTHON is None, reason="real DeepSpeed: set CKPTVIZ_DEEPSPEED_PYTHON to a Python with it")
def test_real_deepspeed_stage3_folder(tmp_path):
    """Real DeepSpeed (one CPU process, ZeRO-3, saved right after initialize) writes the folder; ckptviz's 'fp32'
    equals the model and the reference, and the zero_to_fp32 snippet ckptviz writes runs under DeepSpeed."""
    model = tiny()
    folder = write_real_deepspeed_checkpoint(tmp_path / "real", model, 3, 1, python=REAL_PYTHON)
    ck = open_ds(folder)
    assert ck.unsafe_globals == []
    got = ck.state_dict("fp32")
    assert_same_state(got, consolidate_reference(folder))
    want = model.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    code = torch_code(cv.load_partial(fresh(Tiny), cv.compare(model, ck)))
    fresh_file, out_file = tmp_path / "fresh.pt", tmp_path / "out.pt"
    torch.save(fresh(Tiny).state_dict(), fresh_file)
    script = (f"import torch, sys\nsys.path.insert(0, {json.dumps(str(Path(__file__).parent))})\n"
              "from test_deepspeed import Tiny\nmodel = Tiny()\n"
              f"model.load_state_dict(torch.load({json.dumps(str(fresh_file))}))\n"
              f"exec(compile({code!r}, 'snippet', 'exec'))\n"
              f"torch.save(model.state_dict(), {json.dumps(str(out_file))})\n")
    subprocess.run([REAL_PYTHON, "-c", script], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "DS_ACCELERATOR": "cpu"})
    loaded = fresh(Tiny)
    loaded.load_state_dict(torch.load(out_file))
    assert torch.equal(outputs(loaded, X_TINY), outputs(model, X_TINY))
