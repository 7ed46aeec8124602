"""ckptviz.models: finding model classes in a namespace, torchvision's registry, safe argument parsing,
and building models from every kind of spec, with a ModelError for every way that can go wrong."""

import collections
import os

import pytest
import torch
import torchvision
from torch import nn

import ckptviz as cv
from ckptviz.models import build_model, find_models, parse_kwargs, torchvision_models


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3, hidden: int = 4):
        super().__init__()
        self.body = nn.Linear(2, hidden)
        self.head = nn.Linear(hidden, num_classes)


class Broken(nn.Module):
    def __init__(self, size: int = 2):
        super().__init__()
        raise ValueError(f"size {size} is not supported")


class _Private(nn.Module):
    pass


def make_tiny(width: int = 5) -> nn.Module:
    return TinyNet(hidden=width)


def make_nothing() -> str:
    return "not a model"


def namespace() -> dict:
    tiny = TinyNet()
    return {
        "torch": torch, "nn": nn, "np_like": collections,
        "TinyNet": TinyNet, "Broken": Broken, "_Private": _Private, "Linear": nn.Linear, "Conv2d": nn.Conv2d,
        "resnet": torchvision.models.ResNet,
        "tiny": tiny, "layer": nn.Linear(2, 2), "_hidden": TinyNet(), "Out": {1: tiny},
        "make_tiny": make_tiny, "make_nothing": make_nothing, "n": 3, "text": "TinyNet",
    }


def assert_model_error(err: BaseException, *needles: str) -> str:
    assert isinstance(err, cv.ModelError) and isinstance(err, cv.CheckpointError) and isinstance(err, TypeError)
    msg = str(err)
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---- find_models ---------------------------------------------------------------------------------
def test_find_models_lists_instances_then_classes_sorted_skipping_private_and_torch_classes():
    ns = namespace()
    found = find_models(ns)
    assert list(found) == ["layer", "tiny", "Broken", "resnet", "TinyNet"]
    assert found["tiny"] is ns["tiny"] and found["layer"] is ns["layer"]
    assert found["TinyNet"] is TinyNet and found["resnet"] is torchvision.models.ResNet


def test_find_models_on_an_empty_or_model_free_namespace():
    assert find_models({}) == {}
    assert find_models({"torch": torch, "nn": nn, "x": 1, "Linear": nn.Linear}) == {}


# ---- torchvision_models --------------------------------------------------------------------------
def test_torchvision_models_is_the_whole_registry_sorted():
    names = torchvision_models()
    assert names == sorted(torchvision.models.list_models())
    assert {"resnet18", "vit_b_16", "fasterrcnn_resnet50_fpn", "lraspp_mobilenet_v3_large"} <= set(names)


# ---- parse_kwargs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("", {}),
        ("   \n ", {}),
        ('num_classes=10, dropout=0.1, name="x"', {"num_classes": 10, "dropout": 0.1, "name": "x"}),
        ("layers=(2, 2), sizes=[1, -2], opts={'a': None}, flag=True,", {
            "layers": (2, 2), "sizes": [1, -2], "opts": {"a": None}, "flag": True}),
        ("  num_classes = 7  # the digits", {"num_classes": 7}),
    ],
)
def test_parse_kwargs_reads_literal_keyword_arguments(text, expected):
    assert parse_kwargs(text) == expected


@pytest.mark.parametrize(
    "text, why",
    [
        ("10", "positional"),
        ("num_classes=", "not valid Python"),
        ("num_classes=10 dropout=0.1", "not valid Python"),
        ("a=1, a=2", "given twice"),
        ("**{'a': 1}", "unpacking"),
        ("a=1), print('hi'", "not a list of arguments"),
        ("n=__import__('os').getcwd()", "not a literal"),
        ("act=nn.ReLU", "not a literal"),
        ("sizes=[1, x]", "not a literal"),
    ],
)
def test_parse_kwargs_rejects_anything_but_literal_keywords(text, why):
    with pytest.raises(cv.ModelError) as info:
        parse_kwargs(text)
    assert_model_error(info.value, repr(text), why, 'num_classes=10, dropout=0.1, name="x"')


def test_parse_kwargs_never_runs_the_text(tmp_path):
    target = tmp_path / "made"
    with pytest.raises(cv.ModelError):
        parse_kwargs(f"x=open({str(target)!r}, 'w')")
    assert not target.exists()


# ---- build_model: every kind of spec -------------------------------------------------------------
def test_an_instance_is_returned_as_is_and_refuses_arguments():
    model = TinyNet()
    assert build_model(model) is model
    assert build_model(model, "") is model
    with pytest.raises(cv.ModelError) as info:
        build_model(model, "num_classes=4")
    assert_model_error(info.value, "already built", "num_classes")


def test_a_class_is_built_with_text_or_mapping_arguments():
    model = build_model(TinyNet, "num_classes=7, hidden=6")
    assert isinstance(model, TinyNet) and model.head.weight.shape == (7, 6)
    assert build_model(TinyNet, {"num_classes": 2}).head.out_features == 2
    assert build_model(TinyNet).head.out_features == 3


def test_names_resolve_in_the_namespace_first():
    ns = namespace()
    model = build_model("TinyNet", "num_classes=9", namespace=ns)
    assert isinstance(model, TinyNet) and model.head.out_features == 9
    assert build_model(" tiny ", namespace=ns) is ns["tiny"]
    assert build_model("make_tiny", "width=8", namespace=ns).body.out_features == 8
    assert isinstance(build_model("Linear", "in_features=2, out_features=3", namespace=ns), nn.Linear)
    ns["resnet18"] = TinyNet  # a notebook name shadows the torchvision registry
    assert isinstance(build_model("resnet18", namespace=ns), TinyNet)


def test_torchvision_names_build_random_weights_and_download_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.manual_seed(0)
    a = build_model("resnet18", "num_classes=7")
    b = build_model("torchvision:resnet18", {"num_classes": 7})
    assert isinstance(a, torchvision.models.ResNet) and a.fc.out_features == 7
    assert not torch.equal(a.conv1.weight, b.conv1.weight)  # two fresh random inits, no pretrained values
    expected = torchvision.models.get_model("resnet18", weights=None, num_classes=7).state_dict()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in expected.items()}
    # lraspp's default weights_backbone is ImageNet; building it offline works only if None is passed
    seg = build_model("lraspp_mobilenet_v3_large", "num_classes=3")
    assert type(seg).__name__ == "LRASPP" and seg.classifier.low_classifier.out_channels == 3
    assert not os.path.exists(tmp_path / "torch-home")


def test_package_module_class_imports_the_named_object():
    linear = build_model("torch.nn:Linear", "in_features=4, out_features=2")
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (2, 4)
    model = build_model("torchvision.models:resnet18", "num_classes=5")  # a builder function
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 5
    assert isinstance(build_model("torch.nn:modules.activation.ReLU"), nn.ReLU)
    assert isinstance(build_model(f"{__name__}:TinyNet"), TinyNet)


# ---- build_model: every failure is a ModelError --------------------------------------------------
def test_unknown_names_suggest_close_matches():
    ns = namespace()
    with pytest.raises(cv.ModelError) as info:
        build_model("resnet181", namespace=ns)
    assert_model_error(info.value, "'resnet181'", "'resnet18'", "package.module:Class")
    with pytest.raises(cv.ModelError) as info:
        build_model("TinyNe", namespace=ns)
    assert_model_error(info.value, "'TinyNet'")
    with pytest.raises(cv.ModelError) as info:
        build_model("torchvision:resnet181")
    assert_model_error(info.value, "'resnet181'", "'resnet18'")
    with pytest.raises(cv.ModelError) as info:
        build_model("zzzzzzzz")
    assert "Did you mean" not in assert_model_error(info.value, "'zzzzzzzz'")


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("no_such_package_ckptviz:Net", ["'no_such_package_ckptviz'", "ModuleNotFoundError", "sys.path"]),
        ("torch.nn:Linearr", ["'torch.nn' has no attribute 'Linearr'", "'Linear'"]),
        ("torch.nn:modules.nope.X", ["'torch.nn.modules' has no attribute 'nope'"]),
        ("torch.nn:", ["package.module:Class"]),
        (":Linear", ["package.module:Class"]),
        ("collections:OrderedDict", ["'collections:OrderedDict'", "not a torch.nn.Module"]),
    ],
)
def test_import_failures(spec, needles):
    with pytest.raises(cv.ModelError) as info:
        build_model(spec)
    assert_model_error(info.value, *needles)


def test_constructor_failures_name_the_spec_and_the_arguments():
    with pytest.raises(cv.ModelError) as info:
        build_model("resnet18", "num_class=10")
    assert_model_error(info.value, "'torchvision:resnet18'", "num_class=10", "TypeError", "num_class")
    with pytest.raises(cv.ModelError) as info:
        build_model(TinyNet, "classes=2")
    assert_model_error(info.value, "'TinyNet'", "classes=2", "(num_classes: int = 3, hidden: int = 4)")
    with pytest.raises(cv.ModelError) as info:
        build_model("Broken", "size=5", namespace=namespace())
    assert_model_error(info.value, "'Broken'", "ValueError", "size 5 is not supported")


def test_non_models_are_refused():
    ns = namespace()
    for name, needle in [("n", "is a int"), ("Out", "is a dict"), ("make_nothing", "returned a str")]:
        with pytest.raises(cv.ModelError) as info:
            build_model(name, namespace=ns)
        assert_model_error(info.value, repr(name), needle)
    with pytest.raises(cv.ModelError) as info:
        build_model(collections.OrderedDict)
    assert_model_error(info.value, "not a torch.nn.Module")


def test_pretrained_weights_are_refused_before_anything_is_built():
    for kwargs in ('weights="DEFAULT"', "weights_backbone='IMAGENET1K_V1'"):
        with pytest.raises(cv.ModelError) as info:
            build_model("lraspp_mobilenet_v3_large", kwargs)
        assert_model_error(info.value, "never downloads")
    assert build_model("resnet18", "weights=None").fc.out_features == 1000


def test_bad_argument_text_is_a_model_error_from_build_model():
    with pytest.raises(cv.ModelError) as info:
        build_model(TinyNet, "num_classes=len('x')")
    assert_model_error(info.value, "num_classes=len('x')", "not a literal")


# ---- Hugging Face config.json (transformers is an optional extra) --------------------------------
def _write_config(folder, **entries):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(entries))
    return folder


def test_find_config_inside_a_folder_or_beside_a_file(tmp_path):
    from ckptviz.models import find_config

    assert find_config(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_config(tmp_path / "model.safetensors") is None
    _write_config(tmp_path, model_type="llama")
    assert find_config(tmp_path) == tmp_path / "config.json"
    assert find_config(tmp_path / "model.safetensors") == tmp_path / "config.json"
    assert find_config(tmp_path / "model.safetensors.index.json") == tmp_path / "config.json"


def test_model_from_config_builds_the_named_class_on_meta(tmp_path):
    pytest.importorskip("transformers")
    from hf_files import tiny_llama

    from ckptviz.models import config_architecture, model_from_config

    src = tiny_llama(tmp_path)
    assert config_architecture(tmp_path) == "LlamaForCausalLM"
    model = model_from_config(tmp_path)
    assert type(model) is type(src)
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    assert model.state_dict().keys() == src.state_dict().keys()
    assert all(model.state_dict()[k].shape == v.shape for k, v in src.state_dict().items())
    # non-persistent buffers, which no checkpoint holds, are computed as transformers does
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    assert torch.equal(model.model.rotary_emb.inv_freq, src.model.rotary_emb.inv_freq)
    same = build_model(f"config:{tmp_path}")
    assert type(same) is type(src) and same.lm_head.weight.is_meta
    assert type(build_model(str(tmp_path / "config.json"))) is type(src)
    on_cpu = build_model(f"config:{tmp_path}", 'device="cpu", dtype="bfloat16"')
    assert on_cpu.lm_head.weight.device.type == "cpu" and on_cpu.lm_head.weight.dtype == torch.bfloat16


def test_model_from_config_takes_the_configs_dtype(tmp_path):
    pytest.importorskip("transformers")
    from hf_files import tiny_llama

    from ckptviz.models import model_from_config

    tiny_llama(tmp_path, dtype=torch.bfloat16)
    model = model_from_config(tmp_path)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.is_meta
    assert model_from_config(tmp_path, dtype="float16").lm_head.weight.dtype == torch.float16
    with pytest.raises(cv.ModelError, match="not a torch dtype"):
        model_from_config(tmp_path, dtype="float77")
    with pytest.raises(cv.ModelError, match="not a torch device"):
        model_from_config(tmp_path, device="gpu7")


def test_config_without_architectures_builds_the_base_model_and_says_so(tmp_path):
    pytest.importorskip("transformers")
    from hf_files import TINY_LLAMA

    from ckptviz.models import model_from_config

    _write_config(tmp_path, model_type="llama", **TINY_LLAMA)
    with pytest.warns(UserWarning, match="names no architecture.*AutoModel.*'llama'"):
        model = model_from_config(tmp_path)
    assert type(model).__name__ == "LlamaModel" and model.embed_tokens.weight.is_meta


def test_remote_code_is_never_run(tmp_path):
    pytest.importorskip("transformers")
    from hf_files import TINY_LLAMA

    from ckptviz.models import model_from_config

    code = tmp_path / "custom" / "modeling_mystery.py"
    _write_config(tmp_path / "custom", model_type="mystery", architectures=["MysteryForCausalLM"],
                  auto_map={"AutoConfig": "modeling_mystery.MysteryConfig",
                            "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    marker = tmp_path / "ran"
    code.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(cv.ModelError, match="mystery.*auto_map.*never runs") as err:
        model_from_config(tmp_path / "custom")
    assert_model_error(err.value, "upgrade")
    assert not marker.exists()
    # a known architecture that also names remote code: transformers' own class, with a warning
    _write_config(tmp_path / "both", model_type="llama", architectures=["LlamaForCausalLM"], **TINY_LLAMA,
                  auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    with pytest.warns(UserWarning, match="auto_map.*transformers' own LlamaForCausalLM"):
        assert type(model_from_config(tmp_path / "both")).__name__ == "LlamaForCausalLM"
    # an architecture transformers has never heard of, that only remote code defines
    _write_config(tmp_path / "remote_arch", model_type="llama", architectures=["MysteryForCausalLM"], **TINY_LLAMA,
                  auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    with pytest.raises(cv.ModelError, match="'MysteryForCausalLM' is code from the model's folder"):
        model_from_config(tmp_path / "remote_arch")
    assert not marker.exists()


def test_config_errors_are_model_errors(tmp_path):
    pytest.importorskip("transformers")
    from hf_files import TINY_LLAMA

    from ckptviz.models import model_from_config

    with pytest.raises(cv.ModelError, match="has no config.json"):
        model_from_config(tmp_path)
    with pytest.raises(cv.ModelError, match="does not exist"):
        build_model(f"config:{tmp_path / 'nowhere' / 'config.json'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(cv.ModelError, match="not a readable JSON config"):
        model_from_config(tmp_path / "bad")
    _write_config(tmp_path / "unknown", model_type="mystery2", architectures=["Mystery2"])
    with pytest.raises(cv.ModelError, match="cannot read it.*mystery2"):
        model_from_config(tmp_path / "unknown")
    _write_config(tmp_path / "typo", model_type="llama", architectures=["LlamaForCasualLM"], **TINY_LLAMA)
    with pytest.raises(cv.ModelError, match="no model class 'LlamaForCasualLM'.*Did you mean 'LlamaForCausalLM'"):
        model_from_config(tmp_path / "typo")
    with pytest.raises(cv.ModelError, match="only device= and dtype="):
        build_model(f"config:{tmp_path / 'typo'}", "num_layers=2")


def test_ckptviz_works_without_transformers(tmp_path):
    """In a fresh interpreter where transformers cannot be imported: the core and the widgets import, and a
    config spec says how to install the extra."""
    import subprocess
    import sys

    _write_config(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"])
    torch.save(TinyNet().state_dict(), tmp_path / "model.pt")
    script = f"""
import sys
sys.modules["transformers"] = None  # import transformers now raises ImportError
import ckptviz as cv
from ckptviz.models import has_transformers
from ckptviz.widgets.model_picker import ModelPicker
assert not has_transformers()
try:
    cv.build_model("config:{tmp_path}")
except cv.ModelError as e:
    print("ERROR:", e)
picker = ModelPicker()
picker.set_checkpoint_path("{tmp_path / 'model.pt'}")
print("OPTIONS:", [o for o in picker.spec.options if "config" in o])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=os.getcwd(),
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'needs transformers, which is not installed: pip install "ckptviz[hf]"' in out.stdout
    assert "OPTIONS: []" in out.stdout


def test_timm_models_build_without_weights_and_take_their_arguments():
    timm = pytest.importorskip("timm")  # an optional extra; the test suite installs it
    from ckptviz.models import timm_models

    assert "vit_tiny_patch16_224" in timm_models() and len(timm_models()) == len(timm.list_models())
    model = cv.build_model("timm:vit_tiny_patch16_224", "num_classes=3, img_size=64, in_chans=1")
    assert model.head.weight.shape == (3, 192) and model.patch_embed.proj.weight.shape == (192, 1, 16, 16)
    assert model.pos_embed.shape == (1, 17, 192)
    with pytest.raises(cv.ModelError, match="pretrained=False and never downloads"):
        cv.build_model("timm:resnet18", "pretrained=True")
    with pytest.raises(cv.ModelError, match="no timm model 'resnet_18'.*resnet18"):
        cv.build_model("timm:resnet_18")
