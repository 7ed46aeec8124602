"""Finding and building models for the model picker: ``nn.Module`` classes and instances in a notebook's
namespace, torchvision's model registry (always built with ``weights=None``, so nothing is downloaded),
and ``"package.module:Class"`` imports; constructor arguments are parsed from text as literals only, and
every failure is a :class:`ModelError` that says what to do."""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .errors import ModelError

KWARGS_FORM = 'keyword arguments with literal values, e.g. num_classes=10, dropout=0.1, name="x"'
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
    ``"torchvision:resnet18"``, built with ``weights=None``), or ``"package.module:Class"``.
    ``kwargs`` are constructor arguments, as a mapping or as text for :func:`parse_kwargs`.
    """
    kw = parse_kwargs(kwargs) if isinstance(kwargs, str) else dict(kwargs or {})
    if not isinstance(spec, str):
        return _from_object(getattr(spec, "__name__", type(spec).__name__), spec, kw)
    name = spec.strip()
    namespace = namespace or {}
    registry = torchvision_models()
    if name.startswith("torchvision:"):
        tv = name.removeprefix("torchvision:").strip()
        if tv not in registry:
            why = "torchvision is not installed" if not registry else "not in torchvision's registry"
            raise ModelError(f"no torchvision model {tv!r} ({why}).{_close(tv, registry)}")
        return _torchvision(tv, kw)
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
