"""compare() builds its frame from whole columns: it must equal, cell for cell and type for type, the
frame a plain row-by-row loop builds; and model_tensors() must equal the model's own state dict."""

import pandas as pd
import pytest
import torch
import torchvision
from models import LSTMTagger, SmallCNN
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.utils import parametrizations

import ckptviz as cv
from ckptviz.align import align
from ckptviz.checkpoint import dtype_name, tensor_info
from ckptviz.compare import COLUMNS, model_tensors


def reference_frame(model: nn.Module, ck: cv.Checkpoint, section: str, rules=None) -> pd.DataFrame:
    """The report frame, one row at a time, straight from the model's state dict and the section."""
    live = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    entries = ck._section(section)
    al = align(list(live), list(entries), rules=rules,
               same_shape=lambda c, m: tuple(live[m].shape) == tensor_info(entries[c])[0])
    by_model = {m: c for c, m in al.pairs.items()}
    rows = []
    for key, t in live.items():
        m = (tuple(t.shape), dtype_name(t.dtype), str(t.device))
        c = by_model.get(key)
        if c is None:
            rows.append((key, None, "missing", m[0], None, m[1], None, m[2], None, None))
            continue
        s = tensor_info(entries[c])
        status = "shape_mismatch" if m[0] != s[0] else "match" if m[1] == s[1] else "dtype_mismatch"
        rule = "; ".join(str(r) for r in al.rule_of.get(c, [])) or None
        rows.append((key, c, status, m[0], s[0], m[1], s[1], m[2], s[2], rule))
    for c, v in entries.items():
        if c not in al.pairs:
            s = tensor_info(v)
            rows.append((None, c, "unexpected", None, s[0], None, s[1], None, s[2], None))
    return pd.DataFrame(rows, columns=COLUMNS, dtype=object)


def assert_same_frame(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert got.index.equals(want.index) and type(got.index) is type(want.index)
    assert list(got.dtypes) == list(want.dtypes) == [object] * len(COLUMNS)
    for col in COLUMNS:
        g, w = got[col].tolist(), want[col].tolist()
        assert g == w, col
        assert [type(x) for x in g] == [type(x) for x in w], col


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: two state-dict keys, one tensor
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


def _cases():
    """(model, checkpoint mapping, rules) covering renames, statuses, devices and tied weights."""
    cnn = SmallCNN(num_classes=10).state_dict()
    transfer = dict(cnn)
    transfer["features.0.weight"] = transfer["features.0.weight"].half()
    del transfer["features.1.num_batches_tracked"]
    transfer["aux.weight"] = torch.zeros(3)
    yield "statuses", SmallCNN(num_classes=5), transfer, None

    resnet = torchvision.models.resnet18(weights=None, num_classes=10)
    dp = {"module." + k: v for k, v in resnet.state_dict().items() if not k.startswith("layer4")}
    dp["module.fc.weight"] = torch.zeros(3, 512)
    dp["module.extra.bias"] = torch.zeros(2)
    yield "prefix", torchvision.models.resnet18(weights=None, num_classes=10), dp, None

    wrapped = nn.Sequential(checkpoint_wrapper(nn.Linear(4, 8)), nn.ReLU(), checkpoint_wrapper(nn.Linear(8, 2)))
    raw = {k: v.detach() for k, v in wrapped.named_parameters()}
    raw["2._checkpoint_wrapped_module.bias"] = torch.zeros(3, dtype=torch.bfloat16)
    yield "wrapper", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), raw, None

    tied = Tied()
    sd = {"model." + k: v for k, v in tied.state_dict().items()}
    sd["model.head.weight"] = torch.zeros(10, 5)
    yield "tied", Tied(), sd, None

    lstm = {k.replace("lstm.", "rnn."): v for k, v in LSTMTagger().state_dict().items()}
    yield "user rules", LSTMTagger(), {"net." + k: v for k, v in lstm.items()}, [(r"\.rnn\.", ".lstm.")]

    with torch.device("meta"):
        meta = SmallCNN()
    yield "meta model", meta, {"_orig_mod." + k: v for k, v in SmallCNN().state_dict().items()}, None

    yield "nothing shared", LSTMTagger(), SmallCNN().state_dict(), None


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_column_frame_equals_row_by_row_frame(case, tmp_path):
    _, model, sd, rules = case
    for source in (sd, tmp_path / "ck.pt"):
        if not isinstance(source, dict):
            torch.save(sd, source)
        ck = cv.open_checkpoint(source) if not isinstance(source, dict) else cv.Checkpoint.from_mapping(sd)
        rep = cv.compare(model, ck, rules=rules)
        assert_same_frame(rep.frame, reference_frame(model, ck, rep.section, rules))


def test_frame_reference_sees_every_status_and_rule():
    """The cases above are not vacuous: together they hold every status, renamed rows and tied keys."""
    frames = [cv.compare(model, sd, rules=rules).frame for _, model, sd, rules in _cases()]
    statuses = set().union(*(f["status"] for f in frames))
    assert statuses == {"match", "shape_mismatch", "dtype_mismatch", "missing", "unexpected"}
    rules = set().union(*(f["rule"].dropna() for f in frames))
    assert {r"^module\. -> ''", r"(^|\.)_checkpoint_wrapped_module\. -> '\\1'"} <= rules
    assert any("; " in r for r in rules)  # a key renamed by two rules
    tied = frames[3].set_index("key")
    assert tied.loc["head.weight", "status"] == "shape_mismatch" and tied.loc["embed.weight", "status"] == "match"
    assert set(frames[5]["model_device"]) == {"meta"}


class ExtraState(nn.Linear):
    def get_extra_state(self):
        return {"calls": 3}

    def set_extra_state(self, state):
        pass


class Overridden(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        destination = {} if destination is None else destination
        destination[prefix + "renamed"] = self.inner.weight
        return destination


def _models():
    yield "resnet18", torchvision.models.resnet18(weights=None)
    yield "lstm", LSTMTagger()
    yield "tied, buffers, non-persistent", Tied()
    seq = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    seq[0].bias = None  # a parameter set to None is left out
    yield "None parameter", seq
    yield "shared module", nn.Sequential(seq[1], nn.ReLU(), seq[1])
    yield "parametrized", parametrizations.weight_norm(nn.Linear(3, 3))
    yield "data parallel", nn.DataParallel(SmallCNN())
    yield "compiled", torch.compile(SmallCNN())
    yield "extra state", nn.Sequential(nn.Linear(2, 2), ExtraState(2, 2))
    def drop_bias(module, sd, prefix, meta):
        del sd[prefix + "bias"]

    hooked = SmallCNN()
    hooked.head.register_state_dict_post_hook(drop_bias)
    yield "state-dict hook", hooked
    pre = SmallCNN()
    pre.features.register_state_dict_pre_hook(lambda module, prefix, keep_vars: None)
    yield "pre-hook", pre
    yield "overridden state_dict", nn.Sequential(Overridden(), nn.Linear(2, 2))
    inst = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    inst[1].state_dict = lambda *a, destination=None, prefix="", keep_vars=False: destination
    yield "instance override", inst
    with torch.device("meta"):
        yield "meta", SmallCNN()


@pytest.mark.parametrize("model", list(_models()), ids=lambda m: m[0])
def test_model_tensors_is_the_state_dict(model):
    _, model = model
    want = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    got = model_tensors(model)
    assert type(got) is dict
    assert list(got) == list(want)
    assert all(got[k] is want[k] for k in want)


def test_model_tensors_follows_hooks_and_overrides():
    """The fast walk must step aside wherever the state dict is customised (else these keys would differ)."""
    models = dict(_models())
    assert "head.bias" not in model_tensors(models["state-dict hook"])
    assert list(model_tensors(models["overridden state_dict"])) == ["0.renamed", "1.weight", "1.bias"]
    assert list(model_tensors(models["instance override"])) == ["0.weight", "0.bias"]
    assert "1._extra_state" not in model_tensors(models["extra state"])
    assert list(model_tensors(models["shared module"])) == ["0.weight", "0.bias", "2.weight", "2.bias"]
