"""``torch_code()``: the plain-PyTorch code (``torch.load``, pick the section, ``re.sub`` renames, keep
the keys that fit, ``load_state_dict(strict=False)``, with ``assign=True`` after an assign load) that
loads exactly what a :class:`LoadResult` loaded, or what ``load_partial`` would load from a
:class:`Report`, so a notebook can teach the fix."""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .checkpoint import Checkpoint
from .compare import Report
from .errors import LoadError
from .load import LoadResult
from .sections import _is_module_stub

INLINE_LIMIT = 100  # a set literal longer than this is written one key per line
COPY_LINES = [
    "# strict=False: model keys absent from sd keep their values. No key left in sd has a mismatched\n",
    "# shape, so every one is copied (cast to the model's dtype and device) and nothing fails half-way\n",
    "missing, unexpected = model.load_state_dict(sd, strict=False)\n",
]


def _q(s: str) -> str:
    """``s`` as a double-quoted Python string literal."""
    out = json.dumps(s, ensure_ascii=False)
    return out if ast.literal_eval(out) == s else repr(s)


def _regex(s: str) -> str:
    """``s`` as a raw string literal where that is valid and reads better, else as :func:`_q`."""
    if "\\" in s and not re.search(r'["\x00-\x1f]|\\$', s) and ast.literal_eval(f'r"{s}"') == s:
        return f'r"{s}"'
    return _q(s)


def _selection(obj: LoadResult | Report, keys: Iterable[str] | None) -> tuple[Report, set[str]]:
    """The report and the model keys that were (or ``load_partial`` would be) loaded."""
    if isinstance(obj, LoadResult):
        if keys is not None:
            raise TypeError("keys= applies to a Report; a LoadResult already records which keys were loaded")
        return obj.report, set(obj.loaded)
    if not isinstance(obj, Report):
        raise TypeError(f"expected a ckptviz LoadResult or Report, got {type(obj).__name__}")
    rows = {r.key: r for r in obj.frame.itertuples(index=False) if isinstance(r.key, str)}
    chosen = obj.loadable if keys is None else list(dict.fromkeys([keys] if isinstance(keys, str) else keys))
    unknown = [k for k in chosen if k not in rows]
    if unknown:
        raise LoadError(f"keys not in the model: {unknown[:10]}; pass model keys (the report's 'key' column)")
    return obj, {k for k in chosen if _reason(rows[k]) is None}


def _reason(row: Any) -> str | None:
    """Why ``load_partial`` would skip this row, or None if it loads."""
    if row.status == "missing":
        return "not in the checkpoint"
    if row.status == "suggested":
        return "only suggested: report.accept() it first"
    if row.status == "adapted" and str(row.rule).startswith("adapted: reinit"):
        return "reinit: kept as initialized"
    if row.status == "shape_mismatch":
        return f"shape {tuple(row.ckpt_shape)} in the checkpoint, {tuple(row.model_shape)} in the model"
    if row.model_device == "meta":
        return "on the meta device: load with assign=True"
    if str(row.ckpt_dtype).startswith("complex") and not str(row.model_dtype).startswith("complex"):
        return f"complex {row.ckpt_dtype} into real {row.model_dtype}"
    return None


def _items(node: Any) -> list[tuple[Any, Any]]:
    if isinstance(node, Mapping):
        return list(node.items())
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    return []


def _locate(node: Any, section: str) -> tuple[list[Any], Any] | None:
    """The real keys (str or int) leading from ``node`` to the dotted ``section``, and what is there."""
    if section == "":
        return [], node
    for key, child in _items(node):
        name = str(key)
        if section == name or section.startswith(name + "."):
            found = _locate(child, section[len(name) + 1:])
            if found is not None:
                return [key, *found[0]], found[1]
    return None


FLATTEN = '''
def flatten(tree, prefix=""):
    """Nested dicts of tensors -> one dict with dotted keys."""
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out

'''


def _read(ck: Checkpoint, section: str, path: str | None) -> tuple[list[str], str, list[str]]:
    """(import lines, code that binds ``sd`` to the section, the keys ``sd`` will hold)."""
    imports, lines = ["import torch"], []
    keys = list(ck._section(section))
    folder_readers = {"dcp": _read_dcp, "deepspeed": _read_deepspeed}
    if ck.format in folder_readers:
        sharded = folder_readers[ck.format](ck, section, path)
    else:
        sharded = _read_sharded(ck, path)
    if sharded is not None:
        return [*imports, *sharded[0]], sharded[1], keys
    if ck.format == "safetensors":
        imports.append("from safetensors.torch import load_file")
        return imports, f"sd = load_file({_q(path or ck.path)})\n", keys
    if ck.format == "torchscript":
        lines.append(f'ckpt = torch.jit.load({_q(path or ck.path)}, map_location="cpu")  # a TorchScript archive')
    elif path is None and ck.format == "state-dict":
        lines.append("ckpt = state_dict  # the mapping that was given to ckptviz.compare()")
    elif ck.format == "pickle":
        imports.append("import pickle")
        lines.append("# a plain pickle, which torch.load cannot read; unpickling runs code: only for files you trust")
        lines.append(f"with open({_q(path or ck.path)}, 'rb') as f:\n    ckpt = pickle.load(f)")
    elif ck.unsafe_globals:
        named = ", ".join(ck.unsafe_globals[:3]) + (", ..." if len(ck.unsafe_globals) > 3 else "")
        lines.append(f"# the file pickles {named}:")
        lines.append("# weights_only=False imports and runs them, so do this only if you trust the file's origin")
        lines.append(f'ckpt = torch.load({_q(path or ck.path)}, map_location="cpu", weights_only=False)')
    else:
        lines.append(f'ckpt = torch.load({_q(path or ck.path)}, map_location="cpu", weights_only=True)')
    found = _locate(ck._root, section)
    steps, node = found if found is not None else (section.split(".") if section else [], None)
    expr = "ckpt" + "".join(f"[{_q(k) if isinstance(k, str) else repr(k)}]" for k in steps)
    where = f"section {section!r}" if section else "the file is the state dict itself"
    if _is_module_stub(node):
        expr += ".state_dict()"
        where = "the saved module's weights"
    elif isinstance(node, Mapping) and not set(keys) <= {str(k) for k in node}:
        lines.insert(0, FLATTEN)
        expr = f"flatten({expr})"
    elif isinstance(node, Mapping):
        keys = [str(k) for k in node]  # torch.load also returns the entries that are not tensors
    lines.append(f"sd = {expr}  # {where}")
    return imports, "\n".join(lines) + "\n", keys


def _read_dcp(ck: Checkpoint, section: str, path: str | None) -> tuple[list[str], str]:
    """(imports, code binding ``sd``) for a torch.distributed.checkpoint folder, read whole into one process
    the way torch's own ``dcp_to_torch_save`` reads it."""
    imports = ["from torch.distributed.checkpoint import FileSystemReader",
               "from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner",
               "from torch.distributed.checkpoint.state_dict_loader import _load_state_dict"]
    pick = f"ckpt[{_q(section)}]" if section else "ckpt"
    where = f"section {section!r}" if section else "the folder holds the state dict itself"
    code = ("# torch reads .metadata with pickle.load (it can run code): only for folders you trust\n"
            "ckpt = {}\n"
            f"_load_state_dict(ckpt, storage_reader=FileSystemReader({_q(path or ck.path)}),\n"
            "                 planner=_EmptyStateDictLoadPlanner(), no_dist=True)\n"
            f"sd = {pick}  # {where}\n")
    return imports, code


def _read_sharded(ck: Checkpoint, path: str | None) -> tuple[list[str], str] | None:
    """(imports, code binding ``sd``) for checkpoints spread over several files, else None."""
    if ck.format not in ("hf-safetensors-sharded", "hf-bin-sharded"):
        return None
    folder = path or ck.path
    index = next((f for f in ck.files if f.endswith(".index.json")), None)
    if ck.format == "hf-safetensors-sharded":
        imports, read = ["import json", "import os", "from safetensors.torch import load_file"], "load_file(p)"
    else:
        imports = ["import json", "import os"]
        read = 'torch.load(p, map_location="cpu", weights_only=True, mmap=True)'
    if index is not None:
        shards = (f"shards = sorted(set(json.load(open(os.path.join(folder, {_q(os.path.basename(index))})))"
                  '["weight_map"].values()))\n')
    else:
        imports.remove("import json")
        shards = f"shards = {[os.path.relpath(f, ck.path) for f in ck.files]!r}\n"
    code = (f"folder = {_q(folder)}\n{shards}sd = {{}}\nfor shard in shards:  # one file after another\n"
            f"    p = os.path.join(folder, shard)\n    sd.update({read})\n")
    return imports, code


def _read_deepspeed(ck: Checkpoint, section: str, path: str | None) -> tuple[list[str], str]:
    """(imports, code binding ``sd``) for a DeepSpeed folder: ``module`` from rank 0's model-states file (plain
    tensors, weights_only-safe), ``fp32`` through DeepSpeed's own zero_to_fp32."""
    info = ck.metadata["deepspeed"]
    root = path or ck.path
    model = os.path.join(root, info["model_files"][0])
    if section == "module":
        if ck.unsafe_globals:
            return [], (f"# the file pickles {', '.join(ck.unsafe_globals[:3])}: weights_only=False imports and runs "
                        "them, so do this only if you trust the file's origin\n"
                        f'sd = torch.load({_q(model)}, map_location="cpu", weights_only=False)["module"]\n')
        return [], f'sd = torch.load({_q(model)}, map_location="cpu", weights_only=True)["module"]\n'
    folder, tag = os.path.split(os.path.dirname(os.path.normpath(model)))
    return ["from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint"], (
        "# needs DeepSpeed installed; it unpickles every file of the tag with torch.load(weights_only=False),\n"
        "# which imports and runs what the files name: only for checkpoints you trust\n"
        f"sd = get_fp32_state_dict_from_zero_checkpoint({_q(folder)}, tag={_q(tag)})\n"
    )


def _renamed(keys: list[str], rules: list[tuple[str, str]]) -> dict[str, str] | None:
    """What the ``re.sub`` comprehensions turn ``keys`` into (new name -> original), None on a collision."""
    names = {k: k for k in keys}
    for pattern, repl in rules:
        names = {re.sub(pattern, repl, k): orig for k, orig in names.items()}
    return names if len(names) == len(keys) else None


def _set_literal(name: str, keys: list[str], notes: Mapping[str, str] | None = None) -> str:
    if not keys:
        return f"{name} = set()\n"
    inline = f"{name} = {{{', '.join(_q(k) for k in keys)}}}\n"
    if not notes and len(inline) <= INLINE_LIMIT:
        return inline
    body = "".join(f"    {_q(k)},{f'  # {notes[k]}' if notes and notes.get(k) else ''}\n" for k in keys)
    return f"{name} = {{\n{body}}}\n"


def torch_code(
    result_or_report: LoadResult | Report, *, keys: Iterable[str] | None = None, path: str | None = None
) -> str:
    """Plain-PyTorch code that loads exactly what ``load_partial`` loaded (or would load).

    Give a :class:`LoadResult`, or a :class:`Report` with optional ``keys`` (default: its loadable
    rows). ``path`` replaces the checkpoint's own path in the code. Run the code with ``model``
    bound to the model; it leaves ``missing`` and ``unexpected`` as ``load_state_dict`` reports them.
    For an assign load it casts as ckptviz did, calls ``load_state_dict(..., assign=True)`` and re-ties
    tied weights (torch's assign puts a new Parameter under each key).
    """
    report, loaded = _selection(result_or_report, keys)
    rows = [r for r in report.frame.itertuples(index=False) if isinstance(r.key, str)]
    pairs = {r.ckpt_key: r.key for r in rows if r.key in loaded}
    imports, code, raw_keys = _read(report.checkpoint, report.section, path)
    body = []
    names = _renamed(raw_keys, report.rules)
    if names is not None and all(names.get(m) == c for c, m in pairs.items()):
        if report.rules:
            imports.insert(0, "import re")
            body.append("# rename checkpoint keys to the model's names (the rules ckptviz inferred or was given)\n")
            for pattern, repl in report.rules:
                body.append(f"sd = {{re.sub({_regex(pattern)}, {_regex(repl)}, k): v for k, v in sd.items()}}\n")
        model_keys = {r.key: r for r in rows}
        skip = [n for n in names if n in model_keys and n not in loaded]
        keep = [r.key for r in rows if r.key in loaded]
        if skip and len(keep) <= len(skip):
            body.append(f"# keep only the {len(keep)} key(s) that load\n")
            body.append(_set_literal("keep", keep))
            body.append("sd = {k: v for k, v in sd.items() if k in keep}\n")
        elif skip:
            body.append("# leave out what does not fit, or was not selected\n")
            body.append(_set_literal("skip", skip, {k: _reason(model_keys[k]) or "not selected" for k in skip}))
            body.append("sd = {k: v for k, v in sd.items() if k not in skip}\n")
    else:  # the rules alone would not reproduce the pairing: spell it out
        body.append("# checkpoint key -> model key, as ckptviz paired them (only the keys that load)\n")
        items = "".join(f"    {_q(c)}: {_q(m)},\n" for c, m in pairs.items())
        body.append(f"names = {{\n{items}}}\n" if items else "names = {}\n")
        body.append("sd = {names[k]: v for k, v in sd.items() if k in names}\n")
    adapting = _adapt_lines(report, loaded)
    if adapting:
        imports += [i for i in ("import math", "import torch.nn.functional as F") if i not in imports]
        if any(a.method in ("stack", "concat", "split") for k, a in report.adaptations.items() if k in loaded):
            body.insert(0, "raw = dict(sd)  # the checkpoint's own names: some tensors are combined or split below\n")
    body.extend(adapting)
    if isinstance(result_or_report, LoadResult) and result_or_report.assign:
        body.extend(_assign_lines(result_or_report, [r for r in rows if r.key in loaded]))
    else:
        body.extend(COPY_LINES)
    head = "\n".join(imports).rstrip("\n") + "\n\n"
    return head + code + "".join(body)


def _adapt_lines(report: Report, loaded: set[str]) -> list[str]:
    """The adaptations of the loaded rows (``report.adapt``), as plain PyTorch on ``sd``."""
    from .adapt import code

    adapted = [(k, a) for k, a in report.adaptations.items() if k in loaded and a.loads]
    if not adapted:
        return []
    lines = ["# adapt the tensors whose shapes differ, as ckptviz's report.adapt() planned them\n",
             "dst = model.state_dict()\n"]
    return lines + [code(a, k) for k, a in adapted]


def _attr(key: str) -> str:
    """Python for the model attribute that holds the tensor under state-dict ``key``."""
    owner, _, name = key.rpartition(".")
    module = f"model.get_submodule({_q(owner)})" if owner else "model"
    return f"{module}.{name}" if name.isidentifier() else f"getattr({module}, {_q(name)})"


def _assign_lines(result: LoadResult, rows: list[Any]) -> list[str]:
    """The end of an assign load: cast like ckptviz did, ``load_state_dict(assign=True)``, re-tie."""
    lines = []
    moves = any(r.model_dtype != r.ckpt_dtype or r.model_device not in ("cpu", "meta") for r in rows)
    if moves or (result.device != "cpu" and any(r.model_device == "meta" for r in rows)):
        lines += [
            "# assign=True keeps sd's tensors as they are: cast them to the model's dtypes and devices first,\n",
            f"# as ckptviz did (tensors on the meta device go to {_q(result.device)})\n",
            "dst = model.state_dict()\n",
            f"sd = {{k: v.to(dtype=dst[k].dtype, device={_q(result.device)} if dst[k].is_meta else dst[k].device)\n",
            "      if k in dst else v for k, v in sd.items()}\n",
        ]
    lines += [
        "# assign=True: the model takes sd's tensors themselves instead of copying into its own (meta tensors\n",
        "# get real ones); model keys absent from sd keep what they have (meta ones stay on meta)\n",
        "missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)\n",
    ]
    loaded = result.loaded
    ties = []
    for names in result.tied:
        given = [k for k in loaded if k in names]
        ties += [f"{_attr(k)} = {_attr(given[-1])}\n" for k in names if given and k != given[-1]]
    if ties:
        lines.append("# it also puts a new Parameter under each key, which unties shared weights: tie them again\n")
        lines += ties
    return lines
