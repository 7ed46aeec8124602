"""Finding and building models for the model picker: ``nn.Module`` classes and instances in a notebook's
namespace, torchvision's model registry (always built with ``weights=None``, so nothing is downloaded),
``"package.module:Class"`` imports, and Hugging Face ``config.json`` files (built with transformers'
own classes on the meta device, never running code from the folder and never downloading anything);
constructor arguments are parsed from text as literals only, and every failure is a :class:`ModelError`
that says what to do."""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError

KWARGS_FORM = 'keyword arguments with literal values, e.g. num_classes=10, dropout=0.1, name="x"'
HF_INSTALL = 'pip install "ckptviz[hf]"'
CONFIG_PREFIX = "config:"
ModelSpec = str | type[nn.Module] | nn.Module | Callable[..., nn.Module]


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def find_models(namespace: Mapping[str, Any]) -> dict[str, type[nn.Module] | nn.Module]:
    """The ``nn.Module`` instances, then subclasses, in ``namespace`` (e.g. ``globals()``), each sorted by name.

    Private names and classes that belong to torch itself (``nn.Linear``, ...) are left out;
    instances of torch classes are kept, since the user built them.
    """
    instances, classes = {}, {}
    for name, obj in namespace.items():
        if not isinstance(name, str) or name.startswith("_"):
            continue
        if isinstance(obj, nn.Module):
            instances[name] = obj
        elif _is_module_class(obj) and (obj.__module__ or "").split(".")[0] != "torch":
            classes[name] = obj

    def by_name(items: dict) -> dict:
        return dict(sorted(items.items(), key=lambda kv: (kv[0].lower(), kv[0])))

    return {**by_name(instances), **by_name(classes)}


def torchvision_models() -> list[str]:
    """Every name in torchvision's model registry, sorted; empty if torchvision is not installed."""
    try:
        from torchvision import models
    except ImportError:
        return []
    return sorted(models.list_models())


def timm_models() -> list[str]:
    """Every architecture name timm knows, sorted; empty if timm (an optional extra) is not installed."""
    try:
        import timm
    except ImportError:
        return []
    return sorted(timm.list_models())


def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if kwargs.get("pretrained") or kwargs.get("pretrained_cfg_overlay") or kwargs.get("checkpoint_path"):
        raise ModelError(f"timm model {name!r}: ckptviz builds it with pretrained=False and never downloads or "
                         "reads weights itself; drop that argument and load your checkpoint into the model instead.")
    return _construct(f"timm:{name}", lambda **kw: timm.create_model(name, **kw), {**kwargs, "pretrained": False})


def parse_kwargs(text: str) -> dict[str, Any]:
    """Parse constructor arguments typed as ``num_classes=10, name="x"``; literal values only, nothing is run."""
    if not text or not text.strip():
        return {}

    def bad(why: str) -> ModelError:
        return ModelError(f"could not read the constructor arguments {text!r}: {why}. Write them as {KWARGS_FORM}.")

    try:
        call = ast.parse(f"f({text.strip()}\n)", mode="eval").body
    except SyntaxError as e:
        raise bad(f"not valid Python ({e.msg})") from None
    except (ValueError, MemoryError, RecursionError):
        raise bad("it is too deeply nested or contains a null byte") from None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "f":
        raise bad("it is not a list of arguments")
    if call.args:
        raise bad("positional arguments are not accepted, name each one")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise bad("** unpacking is not accepted")
        if kw.arg in out:
            raise bad(f"{kw.arg!r} is given twice")
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise bad(f"the value of {kw.arg!r} ({ast.unparse(kw.value)}) is not a literal") from None
    return out


def _close(name: str, candidates: list[str]) -> str:
    near = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""


def _import(spec: str) -> Any:
    module_name, _, attr = (s.strip() for s in spec.partition(":"))
    if not module_name or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ModelError(f"cannot read the model {spec!r}: write an import as 'package.module:Class'.")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # the module's own code may raise anything
        raise ModelError(
            f"cannot import {module_name!r} for the model {spec!r} ({type(e).__name__}: {e}). "
            "Check the module name and that it is installed or on sys.path."
        ) from e
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr.split(".")[:i]])
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelError(f"{owner!r} has no attribute {part!r} (model {spec!r}).{_close(part, names)}")
        obj = getattr(obj, part)
    return obj


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from torchvision import models

    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) is not None:
            raise ModelError(
                f"torchvision model {name!r}: ckptviz builds it with {key}=None and never downloads weights; "
                "drop that argument and load your checkpoint into the model instead."
            )
    kwargs = {**kwargs, "weights": None}
    if "weights_backbone" in inspect.signature(models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None
    return _construct(f"torchvision:{name}", models.get_model_builder(name), kwargs)


def _construct(spec: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = factory(**kwargs)
    except Exception as e:  # the constructor is the user's code: any failure is reported the same way
        try:
            sig = f" Its signature is {getattr(factory, '__name__', 'the constructor')}{inspect.signature(factory)}."
        except (TypeError, ValueError):
            sig = ""
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"
        raise ModelError(f"building the model {spec!r} with {given} failed ({type(e).__name__}: {e}).{sig}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _from_object(spec: str, obj: Any, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ModelError(
                f"{spec!r} is an already built model, so the arguments {sorted(kwargs)} cannot apply; "
                "pick its class to build a new one, or leave the arguments empty."
            )
        return obj
    if _is_module_class(obj) or (callable(obj) and not isinstance(obj, type)):
        return _construct(spec, obj, kwargs)
    raise ModelError(
        f"{spec!r} is a {type(obj).__name__}, not a torch.nn.Module subclass or instance; "
        "pick a model class (or a function that returns a model)."
    )


def build_model(
    spec: ModelSpec,
    kwargs: str | Mapping[str, Any] | None = None,
    *,
    namespace: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build (or return) the model that ``spec`` names.

    ``spec`` is an ``nn.Module`` instance (returned as is), an ``nn.Module`` subclass or a function
    returning one, a name in ``namespace``, a torchvision registry name (``"resnet18"`` or
    ``"torchvision:resnet18"``, built with ``weights=None``), a timm architecture (``"timm:vit_small_patch16_224"``,
    built with ``pretrained=False``; timm is an optional extra), ``"package.module:Class"``, or a Hugging
    Face config as ``"config:/path/to/model_folder"`` or a path ending in ``.json`` (built by
    :func:`model_from_config`, on meta unless ``device=`` says otherwise).
    ``kwargs`` are constructor arguments, as a mapping or as text for :func:`parse_kwargs`.
    """
    kw = parse_kwargs(kwargs) if isinstance(kwargs, str) else dict(kwargs or {})
    if not isinstance(spec, str):
        return _from_object(getattr(spec, "__name__", type(spec).__name__), spec, kw)
    name = spec.strip()
    if name.startswith(CONFIG_PREFIX) or name.endswith(".json"):
        return _from_config_spec(name.removeprefix(CONFIG_PREFIX).strip(), kw)
    namespace = namespace or {}
    registry = torchvision_models()
    if name.startswith("torchvision:"):
        tv = name.removeprefix("torchvision:").strip()
        if tv not in registry:
            why = "torchvision is not installed" if not registry else "not in torchvision's registry"
            raise ModelError(f"no torchvision model {tv!r} ({why}).{_close(tv, registry)}")
        return _torchvision(tv, kw)
    if name.startswith("timm:"):
        arch = name.removeprefix("timm:").strip()
        names = timm_models()
        if arch not in names:
            why = "timm is not installed: pip install timm" if not names else "not a timm architecture"
            raise ModelError(f"no timm model {arch!r} ({why}).{_close(arch, names)}")
        return _timm(arch, kw)
    if ":" in name:
        return _from_object(name, _import(name), kw)
    if name in namespace:
        return _from_object(name, namespace[name], kw)
    if name in registry:
        return _torchvision(name, kw)
    known = list(find_models(namespace)) + registry
    raise ModelError(
        f"no model named {name!r} in the notebook's namespace or torchvision's registry.{_close(name, known)} "
        "Define or import the class in the notebook, or type 'package.module:Class' to import it."
    )


# ---- Hugging Face config.json ----------------------------------------------------------------------
def _from_config_spec(path: str, kwargs: dict[str, Any]) -> nn.Module:
    extra = sorted(set(kwargs) - {"device", "dtype"})
    if extra:
        raise ModelError(f"a model built from a config takes only device= and dtype= (got {extra}); "
                         "the config.json itself sets the architecture.")
    if not path:
        raise ModelError(f"write a config spec as '{CONFIG_PREFIX}/path/to/model_folder' (or its config.json).")
    return model_from_config(os.path.expanduser(path), **kwargs)


def find_config(path: str | os.PathLike) -> Path | None:
    """The ``config.json`` that belongs to a checkpoint: inside it (a folder) or beside it (a file)."""
    p = Path(path)
    found = p / "config.json" if p.is_dir() else p.parent / "config.json"
    return found if found.is_file() else None


def has_transformers() -> bool:
    """Whether transformers can be imported (without importing it)."""
    if "transformers" in sys.modules:
        return sys.modules["transformers"] is not None
    return importlib.util.find_spec("transformers") is not None


def read_config(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(the config file, its JSON) for a folder holding ``config.json`` or the file itself."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        where = f"{p} has no config.json" if p.is_dir() else f"{p} does not exist"
        raise ModelError(f"cannot build a model from a config: {where}. Give the folder of a Hugging Face "
                         "model (with its config.json) or the path of the config.json itself.")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{file}: not a readable JSON config ({type(e).__name__}: {e}).") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{file}: a config.json holds a JSON object, this one holds a {type(raw).__name__}.")
    return file, raw


def config_architecture(path: str | os.PathLike) -> str | None:
    """``architectures[0]`` of a config.json (plain JSON, transformers not needed), or None."""
    try:
        archs = read_config(path)[1].get("architectures")
    except ModelError:
        return None
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError(f"building a model from a config.json needs transformers, which is not installed: "
                         f"{HF_INSTALL}") from None
    return transformers


def _hf_config(file: Path, raw: dict[str, Any]):
    transformers = _transformers()
    remote = raw.get("auto_map")
    try:
        return transformers.AutoConfig.from_pretrained(str(file), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError... for configs it cannot read
        if remote:
            why = (f"its model type {raw.get('model_type')!r} is not part of transformers {transformers.__version__}"
                   f" and the config asks for code from the model's folder (auto_map: {sorted(remote)}), which "
                   "ckptviz never runs")
        else:
            why = f"transformers {transformers.__version__} cannot read it ({type(e).__name__}: {str(e)[:300]})"
        raise ModelError(f"{file}: {why}. If the model type is newer than your transformers, upgrade it (pip "
                         "install -U transformers); else build the model in the notebook and pass it in.") from None


def _config_class(file: Path, raw: dict[str, Any], config):
    """The transformers class named by ``architectures[0]``, or AutoModel (with a warning) when there is none."""
    transformers = _transformers()
    archs = getattr(config, "architectures", None) or []
    if not archs:
        warnings.warn(f"{file} names no architecture, so ckptviz builds the base model "
                      f"(AutoModel for model type {config.model_type!r}) without any task head; its keys may lack "
                      "a prefix or head the checkpoint has.", UserWarning, stacklevel=3)
        return None
    name = archs[0]
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        remote = raw.get("auto_map") or {}
        if any(str(v).rpartition(".")[2] == name for v in remote.values()):
            raise ModelError(f"{file}: the architecture {name!r} is code from the model's folder (auto_map), "
                             f"not a transformers class; ckptviz never runs such code. Build the model in the "
                             "notebook (if you trust that code) and pass it in.")
        known = [n for n in dir(transformers) if n[:3] == name[:3]]
        raise ModelError(f"{file}: transformers {transformers.__version__} has no model class {name!r}."
                         f"{_close(name, known)} Upgrade transformers if the model is newer than it.")
    if raw.get("auto_map"):
        warnings.warn(f"{file} also names code from the model's folder (auto_map); ckptviz uses transformers' own "
                      f"{name} and runs none of it, so key names may differ from that code's.", UserWarning,
                      stacklevel=3)
    return cls


def _dtype(value: str | torch.dtype | None, config) -> torch.dtype | None:
    value = value if value is not None else getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelError(f"dtype {value!r} is not a torch dtype; use e.g. 'bfloat16', 'float16' or 'float32'.")
    return dtype


def model_from_config(path: str | os.PathLike, *, device: str | torch.device = "meta",
                      dtype: str | torch.dtype | None = None) -> nn.Module:
    """Build the Hugging Face model that a ``config.json`` describes, with no weights and no download.

    ``path`` is a model folder or its config file. The class is ``architectures[0]`` from transformers
    itself (code named by ``auto_map`` is never run; without ``architectures``, ``AutoModel`` builds the
    base model, with a warning). The model is built under ``torch.device(device)``, by default on the
    meta device, which costs no memory whatever the model's size; ``dtype`` defaults to the config's
    (the dtype its weights were saved in). On meta, non-persistent buffers that no checkpoint holds
    (rotary ``inv_freq``, ...) are computed on the CPU, as transformers' ``from_pretrained`` does.
    Needs transformers (``pip install "ckptviz[hf]"``).
    """
    file, raw = read_config(path)
    config = _hf_config(file, raw)
    cls = _config_class(file, raw, config)
    dtype = _dtype(dtype, config)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"device={device!r} is not a torch device ({e}); use 'meta' (no memory) or 'cpu'.") from None
    transformers = _transformers()
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {key: dtype} if dtype is not None else {}
    name = cls.__name__ if cls is not None else "AutoModel"
    try:
        with torch.device(dev):
            if cls is None:
                model = transformers.AutoModel.from_config(config, trust_remote_code=False, **kwargs)
            else:
                model = cls._from_config(config, **kwargs)
    except Exception as e:  # the model's constructor is transformers' code: report any failure the same way
        raise ModelError(f"{file}: building {name} on {dev} failed ({type(e).__name__}: {e}).") from e
    if dev.type == "meta":
        _materialize_buffers(model, file)
    return model


def _sentinel(buf: torch.Tensor) -> torch.Tensor | None:
    """A CPU tensor like ``buf`` filled with a value no initialisation writes (None for bool buffers)."""
    if buf.dtype.is_floating_point or buf.dtype.is_complex:
        return torch.full_like(buf, float("nan"), device="cpu")
    if buf.dtype == torch.bool:
        return None
    return torch.full_like(buf, torch.iinfo(buf.dtype).min, device="cpu")


def _is_sentinel(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return False
    return bool(t.isnan().all()) if t.dtype.is_floating_point or t.dtype.is_complex else (
        bool((t == torch.iinfo(t.dtype).min).all()))


def _materialize_buffers(model: nn.Module, file: Path) -> None:
    """Give the meta model's non-persistent buffers their values on the CPU through transformers' own
    ``initialize_weights`` (as ``from_pretrained`` does); any it does not set go back to meta, with a warning."""
    slots = [(m, n) for m in model.modules() for n in m._non_persistent_buffers_set
             if isinstance(m._buffers.get(n), torch.Tensor) and m._buffers[n].is_meta]
    if not slots:
        return
    originals = {(id(m), n): m._buffers[n] for m, n in slots}
    for m, n in slots:
        placeholder = _sentinel(m._buffers[n])
        if placeholder is not None:
            m._buffers[n] = placeholder
    init = getattr(model, "initialize_weights", None)
    if callable(init):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                init()  # parameters are on meta, so this computes buffers and costs nothing else
            except Exception:  # noqa: BLE001 - an init that cannot run leaves the buffers on meta (below)
                pass
    names = {id(m): prefix for prefix, m in model.named_modules(remove_duplicate=False)}
    left = []
    for m, n in slots:
        if m._buffers[n].is_meta or _is_sentinel(m._buffers[n]):
            m._buffers[n] = originals[(id(m), n)]
            left.append(f"{names[id(m)]}.{n}".lstrip("."))
    if left:
        warnings.warn(f"{file}: {len(left)} non-persistent buffer(s) stay on the meta device ({left[:5]}); no "
                      "checkpoint holds them, so the model cannot run until they are set.", UserWarning,
                      stacklevel=3)
