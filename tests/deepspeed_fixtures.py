"""Tiny DeepSpeed (and Lightning) checkpoint folders for the tests, written on this machine.

Two ways to write one:

* ``write_deepspeed_checkpoint`` builds the folder with ``torch.save`` only, no DeepSpeed needed: the layout of
  DeepSpeed 0.19.8's ``engine.save_checkpoint`` (file names, keys and their order, dtypes, flat groups, their
  partitioning and padding, the shared storages of the bit16 views, the ``ds_id`` attribute on the ZeRO-3 groups)
  that ``deepspeed/utils/zero_to_fp32.py`` reads. DeepSpeed's own classes (``LossScaler``, ``ZeroStageEnum``,
  ``fragment_address``) are pickled under their DeepSpeed names by stand-ins defined here, so the pickles name the
  same globals as real files. See docs/deepspeed-layout.md for the layout and how it was checked.
* ``write_real_deepspeed_checkpoint`` runs real DeepSpeed (``deepspeed.initialize`` + ``save_checkpoint`` on the
  CPU accelerator, gloo, one process per rank) with a Python that has DeepSpeed installed; the suite's own
  environment does not, so tests that use it skip without one (``real_deepspeed_python``).

``consolidate_reference`` rebuilds the full fp32 state dict from such a folder the way ``zero_to_fp32.py`` does,
written independently of it, loading each file with ``torch.load(weights_only=True)`` and the stand-ins
allowlisted under DeepSpeed's names (``load_deepspeed_file``), so it too runs without DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import types
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

DS_VERSION = "0.19.8"  # the DeepSpeed whose layout the pure-torch writer copies
LIGHTNING_VERSION = "2.6.6"
NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: flat groups are padded to a multiple of 2 * world_size


# ---------------------------------------------------------------- DeepSpeed's pickled classes, without DeepSpeed
class LossScaler:
    """Stands for ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` (static scale; fp32 and bf16 runs)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.cur_scale = scale
        self.dynamic = False

    def __eq__(self, other: object) -> bool:
        return type(other).__name__ == "LossScaler" and vars(other) == vars(self)

    def __repr__(self) -> str:
        return f"LossScaler(cur_scale={self.cur_scale}, dynamic={self.dynamic})"


class ZeroStageEnum(int, enum.Enum):
    """Stands for ``deepspeed.runtime.zero.config.ZeroStageEnum``."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclasses.dataclass
class fragment_address:  # noqa: N801 - DeepSpeed's name
    """Stands for ``deepspeed.utils.tensor_fragment.fragment_address``: where a parameter's slice lies in the flat
    fp32 partition of one rank (``start`` is relative to that partition)."""

    numel: int
    start: int


DEEPSPEED_GLOBALS: dict[type, str] = {
    LossScaler: "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    ZeroStageEnum: "deepspeed.runtime.zero.config.ZeroStageEnum",
    fragment_address: "deepspeed.utils.tensor_fragment.fragment_address",
}


class _DeepSpeedNamesPickler(pickle._Pickler):  # the pure-Python pickler lets save_global be replaced
    def save_global(self, obj, name=None):
        target = DEEPSPEED_GLOBALS.get(obj) if isinstance(obj, type) else None
        if target is None:
            return super().save_global(obj, name)
        module, _, qualname = target.rpartition(".")
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
        self.memoize(obj)


_PICKLE_MODULE = types.ModuleType("ckptviz_tests_deepspeed_pickle")  # torch.save reads .__name__ and .Pickler
_PICKLE_MODULE.Pickler = _DeepSpeedNamesPickler


def _save(obj, path: Path) -> None:
    """``torch.save`` (zip format, protocol 2, as DeepSpeed's TorchCheckpointEngine), DeepSpeed names included."""
    torch.save(obj, path, pickle_module=_PICKLE_MODULE)


def load_deepspeed_file(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)`` of a DeepSpeed .pt file with DeepSpeed's three classes allowlisted
    under their names (mapped to the stand-ins here when DeepSpeed is not importable)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler as RealLossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum as RealZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address as RealFragmentAddress

        allowed = [RealLossScaler, RealZeroStageEnum, RealFragmentAddress]
    except ImportError:
        allowed = [(cls, name) for cls, name in DEEPSPEED_GLOBALS.items()]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- what DeepSpeed reads off the module
def _unique_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())  # deduplicated: a tied parameter appears under its first name


def _is_optimized(p: torch.Tensor) -> bool:
    return p.requires_grad and p.numel() > 0  # deepspeed.runtime.utils.is_optimized_parameter


def _buffer_names(model: nn.Module) -> list[str]:
    """engine._get_buffer_names: persistent buffers, each module's own first, then its children."""
    names: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                names.append(prefix + name)
        for name, child in module.named_children():
            if child is not None:
                walk(child, prefix + name + ".")

    walk(model, "")
    return names


def _shared_params(model: nn.Module) -> dict[str, str]:
    """engine._get_shared_params: {name not stored: name holding the data}, found by parameter identity."""
    first: dict[int, str] = {}
    shared: dict[str, str] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, param in module.named_parameters(recurse=False):
            if param is None:
                continue
            key = prefix + name
            if id(param) in first:
                shared[key] = first[id(param)]
            else:
                first[id(param)] = key
        for name, child in module.named_children():
            if child is not None:
                walk(child, prefix + name + ".")

    walk(model, "")
    return shared


def _param_groups(model: nn.Module, groups: list[list[str]] | None) -> list[list[tuple[str, nn.Parameter]]]:
    named = dict(_unique_named_parameters(model))
    if groups is None:
        return [[(n, p) for n, p in named.items() if _is_optimized(p)]]
    return [[(n, named[n]) for n in g if _is_optimized(named[n])] for g in groups]


def _adamw_state(flat_groups: list[list[torch.Tensor]], steps: int, lr: float = 1e-3) -> dict:
    """A real ``torch.optim.AdamW`` state dict over copies of ``flat_groups`` (one optimizer group per list), after
    ``steps`` steps on fixed gradients; the copies are thrown away, only the state (exp_avg, exp_avg_sq, step) is
    kept, as DeepSpeed keeps its base optimizer's."""
    params = [[nn.Parameter(t.detach().clone().float()) for t in g] for g in flat_groups]
    opt = torch.optim.AdamW([{"params": g} for g in params], lr=lr)
    for _ in range(steps):
        for g in params:
            for p in g:
                p.grad = torch.linspace(-1, 1, p.numel()).view_as(p) * 1e-2
        opt.step()
    return opt.state_dict()


def _common_state(model: nn.Module, module_sd: dict, *, stage: int, world_size: int, optimizer, param_shapes,
                  frozen_shapes, shared, frozen_fragments, steps: int, micro_batch: int, ds_config: dict) -> dict:
    """engine._common_checkpoint_state, keys in DeepSpeed's order."""
    return dict(
        module=module_sd,
        buffer_names=_buffer_names(model),
        optimizer=optimizer,
        param_shapes=param_shapes,
        frozen_param_shapes=frozen_shapes,
        shared_params=shared,
        frozen_param_fragments=frozen_fragments,
        lr_scheduler=None,
        data_sampler=None,
        random_ltd=None,
        skipped_steps=0,
        global_steps=steps,
        global_samples=steps * micro_batch * world_size,
        dp_world_size=world_size,
        mp_world_size=1,
        checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": 1},
        ds_config=ds_config,
        ds_version=DS_VERSION,
    )


def _recovery_scripts(folder: Path) -> None:
    """DeepSpeed copies its zero_to_fp32.py and zero_to_torch.py into the save folder; the copies come from an
    installed DeepSpeed when there is one, else small files saying what they stand for."""
    try:
        import deepspeed

        utils = Path(deepspeed.__file__).parent / "utils"
    except ImportError:
        utils = None
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        if utils is not None and (utils / script).is_file():
            shutil.copyfile(utils / script, folder / script)
        else:
            (folder / script).write_text(
                "#!/usr/bin/env python\n"
                f"# Stands for DeepSpeed {DS_VERSION}'s deepspeed/utils/{script}, which DeepSpeed copies here;\n"
                "# written by ckptviz's tests/deepspeed_fixtures.py. Never run by ckptviz.\n"
            )
        os.chmod(folder / script, 0o755)


def default_ds_config(stage: int, bf16: bool = False, micro_batch: int = 1, sub_group_size: int | None = None,
                      parameter_alignment: bool = False, bf16_optimizer: bool = False) -> dict:
    """The ``ds_config`` both writers use; DeepSpeed saves the dict it was given under ``ds_config``."""
    zero: dict = {"stage": stage}
    if sub_group_size is not None:
        zero["sub_group_size"] = sub_group_size
    if parameter_alignment:
        zero["parameter_alignment"] = True
    cfg: dict = {"train_micro_batch_size_per_gpu": micro_batch, "zero_allow_untested_optimizer": True,
                 "zero_optimization": zero}
    if bf16 or bf16_optimizer:
        cfg["bf16"] = {"enabled": True}
    if bf16_optimizer:  # bf16 + fp32 gradient accumulation + ZeRO-1 selects DeepSpeed's BF16_Optimizer
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


# ---------------------------------------------------------------- the pure-torch writer
def write_deepspeed_checkpoint(
    folder: str | os.PathLike,
    model: nn.Module,
    stage: int,
    world_size: int = 1,
    *,
    tag: str | None = None,
    bf16: bool = False,
    param_groups: list[list[str]] | None = None,
    parameter_alignment: bool = False,
    sub_group_size: int | None = None,
    steps: int = 2,
    micro_batch: int = 1,
    client_state: dict | None = None,
    save_latest: bool = True,
    exclude_frozen_parameters: bool = False,
    bf16_optimizer: bool = False,
) -> Path:
    """Write the folder ``engine.save_checkpoint(folder, tag)`` of DeepSpeed 0.19.8 writes for ``model`` trained
    under ZeRO ``stage`` (0-3) on ``world_size`` data-parallel ranks. Built with ``torch.save`` only, to the layout
    that ``zero_to_fp32.py`` reads (checked against real DeepSpeed files, see docs/deepspeed-layout.md).

    ``model`` holds the weights: its fp32 values become the fp32 master weights; with ``bf16`` its parameters are
    saved as bfloat16 in ``module`` (buffers keep their dtype, as DeepSpeed leaves them) and the optimizer files get
    the ``bf16_`` prefix. Frozen parameters (``requires_grad=False``) go to ``frozen_param_*`` from stage 2 on.
    ``param_groups`` lists parameter names per optimizer group (default: one group, all trainable parameters).
    ``parameter_alignment`` pads each parameter of a ZeRO-1/2 group to 16 bytes (``param_alignment_paddings``);
    ``sub_group_size`` splits ZeRO-3 groups into several flat groups. ``client_state`` is merged into every model
    file, as DeepSpeed does (Lightning's checkpoint dict goes there). ``bf16_optimizer`` (stage 1, implies
    ``bf16``) writes what DeepSpeed's ``BF16_Optimizer`` saves (bf16 + ``data_types.grad_accum_dtype: fp32``): no
    ``zero_stage``/``loss_scaler``/``param_alignment_paddings``, partitions saved with their padding; zero_to_fp32
    refuses such folders ("... is not a zero checkpoint"). Returns ``folder``.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0-3, not {stage}")
    if bf16_optimizer and (stage != 1 or parameter_alignment):
        raise ValueError("bf16_optimizer is DeepSpeed's ZeRO-1 BF16_Optimizer: stage 1, no parameter_alignment")
    bf16 = bf16 or bf16_optimizer
    folder = Path(folder)
    tag = f"global_step{steps}" if tag is None else str(tag)
    ckpt_dir = folder / tag
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ws = world_size
    ds_config = default_ds_config(stage, bf16, micro_batch, sub_group_size, parameter_alignment, bf16_optimizer)
    bit16 = torch.bfloat16 if bf16 else torch.float32
    groups = _param_groups(model, param_groups)
    named = _unique_named_parameters(model)
    ds_ids = {id(p): i for i, (_, p) in enumerate(named)}
    frozen = [(n, p) for n, p in named if not _is_optimized(p)]
    save_frozen = stage >= 2 and not exclude_frozen_parameters
    client_state = dict(client_state or {})
    opt_prefix = "bf16_" if bf16 else ""

    def module_state(params: dict[int, torch.Tensor]) -> OrderedDict:
        """model.state_dict() with each parameter replaced by ``params[id(param)]`` (bit16 copy, view or empty)."""
        sd = OrderedDict()
        by_name = {}
        for prefix_module_name, module in model.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False):
                by_name[f"{prefix_module_name}.{pname}" if prefix_module_name else pname] = p
        for key, value in model.state_dict().items():
            if exclude_frozen_parameters and key in by_name and not by_name[key].requires_grad:
                continue
            p = by_name.get(key)
            sd[key] = params[id(p)] if p is not None else value.detach().clone()
        return sd

    def common(module_sd, optimizer, param_shapes, frozen_shapes, shared, fragments) -> dict:
        state = _common_state(model, module_sd, stage=stage, world_size=ws, optimizer=optimizer,
                              param_shapes=param_shapes, frozen_shapes=frozen_shapes, shared=shared,
                              frozen_fragments=fragments, steps=steps, micro_batch=micro_batch, ds_config=ds_config)
        state.update(client_state)
        return state

    if stage == 0:
        bit16_params = {id(p): p.detach().to(bit16).clone() for _, p in named}
        trainable = [[p for _, p in g] for g in groups]
        # FP16_UnfusedOptimizer (a torch optimizer under bf16 without ZeRO) takes one zero-gradient step at init
        base = _adamw_state(trainable, steps + 1 if bf16 else steps)
        if bf16:  # FP16_UnfusedOptimizer.state_dict()
            optimizer = {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": steps, "optimizer_state_dict": base,
                         "fp32_groups": [[p.detach().float().clone().requires_grad_(True) for p in g]
                                         for g in trainable]}
        else:
            optimizer = base
        state = common(module_state(bit16_params), optimizer, None, None, None, None)
        _save(state, ckpt_dir / "mp_rank_00_model_states.pt")

    elif stage in (1, 2):
        bit16_params = {}
        param_shapes, rank_states = [], [dict() for _ in range(ws)]
        fp32_partitions = [[] for _ in range(ws)]  # [rank][group] padded partition (requires_grad leaf)
        lean, group_paddings, alignment_paddings, slice_maps = ([[] for _ in range(ws)] for _ in range(4))
        for g in groups:
            element_size = torch.empty((), dtype=bit16).element_size()
            param_alignment = 16 // math.gcd(16, element_size) if parameter_alignment else 1
            paddings, offsets, offset = [], [], 0
            for i, (_, p) in enumerate(g):
                offsets.append(offset)
                offset += p.numel()
                pad = 0 if i == len(g) - 1 else (-offset) % param_alignment
                paddings.append(pad)
                offset += pad
            padded_numel = offset
            alignment = NCCL_START_ALIGNMENT_FACTOR * ws
            flat_numel = math.ceil(padded_numel / alignment) * alignment
            flat = torch.zeros(flat_numel, dtype=bit16)  # bit16_groups_flat: the module's params are views into it
            for (_, p), o in zip(g, offsets):
                flat[o:o + p.numel()] = p.detach().reshape(-1).to(bit16)
                bit16_params[id(p)] = flat[o:o + p.numel()].view(p.shape)
            fp32_flat = torch.zeros(flat_numel, dtype=torch.float32)
            for (_, p), o in zip(g, offsets):
                fp32_flat[o:o + p.numel()] = p.detach().reshape(-1).float()
            size = flat_numel // ws  # get_data_parallel_partitions: flat_numel is a multiple of ws here
            param_shapes.append(OrderedDict((n, p.shape) for n, p in g))
            for r in range(ws):
                left = r * size
                if padded_numel <= left:
                    padding = size
                elif padded_numel < left + size:
                    padding = left + size - padded_numel
                else:
                    padding = 0
                part = fp32_flat[left:left + size].clone().requires_grad_(True)
                fp32_partitions[r].append(part)
                lean[r].append(part[:size - padding])  # a view: the saved storage keeps the padding
                group_paddings[r].append(padding)
                alignment_paddings[r].append(list(paddings))
                mapping = OrderedDict()
                for (n, p), o in zip(g, offsets):
                    lo, hi = max(o, left), min(o + p.numel(), left + size)
                    if lo < hi:
                        mapping[n] = fragment_address(numel=hi - lo, start=lo - left)
                slice_maps[r].append(mapping)
        for _, p in frozen:
            bit16_params[id(p)] = p.detach().to(bit16).clone()
        for r in range(ws):
            if bf16_optimizer:  # BF16_Optimizer.state_dict()
                rank_states[r] = OrderedDict(
                    clip_grad=1.0,
                    base_optimizer_state=_adamw_state([[t] for t in fp32_partitions[r]], steps),
                    single_partition_of_fp32_groups=fp32_partitions[r],  # with the padding: see group_paddings
                    group_paddings=group_paddings[r],
                    partition_count=[ws] * len(groups),
                    ds_version=DS_VERSION,
                    param_slice_mappings=slice_maps[r],
                )
                continue
            rank_states[r] = OrderedDict(
                loss_scaler=LossScaler(1.0),
                dynamic_loss_scale=False,
                overflow=False,
                clip_grad=1.0,
                base_optimizer_state=_adamw_state([[t] for t in fp32_partitions[r]], steps),
                single_partition_of_fp32_groups=lean[r],
                zero_stage=ZeroStageEnum.gradients if stage == 2 else ZeroStageEnum.optimizer_states,
                group_paddings=group_paddings[r],
                param_alignment_paddings=alignment_paddings[r],
                partition_count=[ws] * len(groups),
                ds_version=DS_VERSION,
                param_slice_mappings=slice_maps[r],
            )
        frozen_shapes = OrderedDict((n, p.shape) for n, p in frozen) if save_frozen else None
        fragments = OrderedDict((n, bit16_params[id(p)]) for n, p in frozen) if save_frozen else None
        state = common(module_state(bit16_params), None, param_shapes, frozen_shapes, _shared_params(model), fragments)
        _save(state, ckpt_dir / "mp_rank_00_model_states.pt")
        for r in range(ws):
            _save(dict(optimizer_state_dict=dict(rank_states[r]), ds_config=ds_config, ds_version=DS_VERSION),
                  ckpt_dir / f"{opt_prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")

    else:  # stage 3
        def partition(t: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
            """param.ds_tensor of rank r: ceil(numel / ws) elements, the last rank's tail zero-padded."""
            size = math.ceil(t.numel() / ws)
            flat = torch.zeros(size * ws, dtype=dtype)
            flat[:t.numel()] = t.detach().reshape(-1).to(dtype)
            return flat[r * size:(r + 1) * size].clone()

        sub_groups: list[list[tuple[str, nn.Parameter]]] = []
        sub_group_of_group: list[int] = []
        limit = int(1e9) if sub_group_size is None else sub_group_size
        for gi, g in enumerate(groups):
            total = sum(math.ceil(p.numel() / ws) for _, p in g)
            if limit >= total:
                chunks = [g]
            else:
                chunks, cur, acc = [], [], 0
                for item in g:
                    cur.append(item)
                    acc += math.ceil(item[1].numel() / ws)
                    if acc >= limit or item is g[-1]:
                        chunks.append(cur)
                        cur, acc = [], 0
            sub_groups += chunks
            sub_group_of_group += [gi] * len(chunks)
        param_shapes = [OrderedDict((n, p.shape) for n, p in sg) for sg in sub_groups]
        empty = {id(p): torch.empty(0, dtype=bit16) for _, p in named}
        frozen_shapes = OrderedDict((n, p.shape) for n, p in frozen) if save_frozen else None
        shared = _shared_params(model)
        for r in range(ws):
            flats = []
            for sg in sub_groups:
                t = torch.cat([partition(p, r, torch.float32) for _, p in sg]).requires_grad_(True)
                t.ds_id = f"{ds_ids[id(sg[0][1])]}_{ds_ids[id(sg[-1][1])]}"
                flats.append(t)
            per_group = [[f for f, gi in zip(flats, sub_group_of_group) if gi == k] for k in range(len(groups))]
            optim = OrderedDict(
                zero_stage=ZeroStageEnum.weights,
                loss_scaler=LossScaler(1.0),
                dynamic_loss_scale=False,
                overflow=False,
                partition_count=ws,
                optimizer_state_dict=_adamw_state(per_group, steps),
                fp32_flat_groups=flats,
            )
            fragments = OrderedDict((n, partition(p, r, bit16)) for n, p in frozen) if save_frozen else None
            state = common(module_state(empty), None, param_shapes, frozen_shapes, shared if r == 0 else {}, fragments)
            _save(state, ckpt_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            _save(dict(optimizer_state_dict=dict(optim), ds_config=ds_config, ds_version=DS_VERSION),
                  ckpt_dir / f"{opt_prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")

    if stage >= 1:
        _recovery_scripts(folder)
    if save_latest:
        (folder / "latest").write_text(tag)
    return folder


# ---------------------------------------------------------------- Lightning
def lightning_client_state(epoch: int = 0, global_step: int = 2, hyper_parameters: dict | None = None) -> dict:
    """What Lightning 2.6.6's ``DeepSpeedStrategy.save_checkpoint`` hands DeepSpeed as ``client_state``: the
    trainer's checkpoint dict without ``state_dict`` and ``optimizer_states`` (keys as ``dump_checkpoint``)."""
    state = {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": global_step}}},
        "callbacks": {},
        "lr_schedulers": [],
    }
    if hyper_parameters is not None:
        state["hparams_name"] = "kwargs"
        state["hyper_parameters"] = dict(hyper_parameters)
    return state


def write_lightning_deepspeed_checkpoint(path: str | os.PathLike, model: nn.Module, stage: int, world_size: int = 1,
                                         *, real_python: str | None = None, **kwargs) -> Path:
    """A Lightning ``Trainer.save_checkpoint("….ckpt")`` under ``DeepSpeedStrategy``: a *folder* named ``path``
    holding ``latest`` ("checkpoint"), ``checkpoint/<DeepSpeed files>``, ``zero_to_fp32.py``; Lightning's own state
    is merged into each model-states file. Pure-torch (``write_deepspeed_checkpoint``) unless ``real_python`` names
    a Python with DeepSpeed, which then writes it (``write_real_deepspeed_checkpoint``)."""
    client = kwargs.pop("client_state", None) or lightning_client_state()
    if real_python is not None:
        return write_real_deepspeed_checkpoint(path, model, stage, world_size, tag="checkpoint", client_state=client,
                                               python=real_python, **kwargs)
    return write_deepspeed_checkpoint(path, model, stage, world_size, tag="checkpoint", client_state=client, **kwargs)


def write_lightning_fsdp_sharded_checkpoint(path: str | os.PathLike, model: nn.Module, *, optimizer: bool = True,
                                            meta: dict | None = None) -> Path:
    """A Lightning ``FSDPStrategy(state_dict_type="sharded")`` checkpoint folder, written by the real
    ``torch.distributed.checkpoint.save`` in this one process (no process group): ``.metadata``, ``__0_0.distcp``,
    and ``meta.pt`` (``torch.save`` of the rest of Lightning's checkpoint dict). The DCP keys are
    ``model.<name>`` and ``optimizer_0.state.<name>.<exp_avg|exp_avg_sq|step>`` / ``optimizer_0.param_groups.…``;
    a real multi-rank run has one ``__<rank>_0.distcp`` per rank and one chunk per rank in each tensor's entry of
    ``.metadata`` (see docs/deepspeed-layout.md); here each tensor is one chunk."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state: dict = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if optimizer:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sd = _adamw_state([[p for _, p in trainable]], 1)
        names = [n for n, _ in trainable]
        state["optimizer_0"] = {
            "state": {names[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
        }
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled ... assuming the intent ..."
        dcp.save(state, checkpoint_id=path, no_dist=True)
    torch.save(meta if meta is not None else lightning_client_state(), path / "meta.pt")
    return path


# ---------------------------------------------------------------- real DeepSpeed, when a Python has it
_REAL_SCRIPT = r"""
import json, os, sys
import torch, deepspeed
spec = json.loads(sys.argv[1])
model = torch.load(spec["model"], weights_only=False)
named = dict(model.named_parameters())
groups = spec["param_groups"] or [[n for n, p in named.items() if p.requires_grad]]
opt = torch.optim.AdamW([{"params": [named[n] for n in g if named[n].requires_grad]} for g in groups], lr=1e-3)
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=spec["config"])
client = torch.load(spec["client_state"], weights_only=False) if spec["client_state"] else {}
engine.save_checkpoint(spec["folder"], tag=spec["tag"], client_state=client,
                       exclude_frozen_parameters=spec["exclude_frozen"])
print("saved rank", os.environ["RANK"])
"""


def real_deepspeed_python(candidates: Iterable[str] = ()) -> str | None:
    """A Python that can import deepspeed: ``$CKPTVIZ_DEEPSPEED_PYTHON``, then ``candidates``, then this one."""
    for py in [os.environ.get("CKPTVIZ_DEEPSPEED_PYTHON", ""), *candidates, sys.executable]:
        if py and (shutil.which(py) or Path(py).is_file()):
            probe = subprocess.run([py, "-c", "import deepspeed"], capture_output=True,
                                   env={**os.environ, "DS_ACCELERATOR": "cpu"})
            if probe.returncode == 0:
                return py
    return None


def write_real_deepspeed_checkpoint(folder: str | os.PathLike, model: nn.Module, stage: int, world_size: int = 1, *,
                                    python: str, tag: str | None = None, bf16: bool = False,
                                    param_groups: list[list[str]] | None = None, sub_group_size: int | None = None,
                                    parameter_alignment: bool = False, client_state: dict | None = None,
                                    exclude_frozen_parameters: bool = False, bf16_optimizer: bool = False,
                                    port: int = 29517, timeout: float = 600) -> Path:
    """Real DeepSpeed writes the folder: ``world_size`` processes of ``python`` (one with DeepSpeed installed) run
    ``deepspeed.initialize(model, torch.optim.AdamW(lr=1e-3))`` on the CPU accelerator (gloo, 127.0.0.1) and
    ``engine.save_checkpoint(folder, tag)`` right away, before any step, so the saved weights are ``model``'s. The
    model travels by ``torch.save(model)``: its class must be importable from its module's folder. ``tag`` defaults
    to DeepSpeed's ``global_step0``."""
    folder = Path(folder)
    config = default_ds_config(stage, bf16, 1, sub_group_size, parameter_alignment, bf16_optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "model.pt"
        torch.save(model, model_file)
        client_file = ""
        if client_state:
            client_file = str(Path(tmp) / "client.pt")
            torch.save(client_state, client_file)
        spec = json.dumps({"model": str(model_file), "config": config, "folder": str(folder), "tag": tag,
                           "param_groups": param_groups, "client_state": client_file,
                           "exclude_frozen": exclude_frozen_parameters})
        module_dir = str(Path(sys.modules[type(model).__module__].__file__).resolve().parent)
        procs = []
        for r in range(world_size):
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "RANK": str(r), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(r), "LOCAL_SIZE": str(world_size),
                   "PYTHONPATH": os.pathsep.join([module_dir, os.environ.get("PYTHONPATH", "")])}
            procs.append(subprocess.Popen([python, "-c", _REAL_SCRIPT, spec], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
        for p, out in zip(procs, outputs):
            if p.returncode != 0:
                raise RuntimeError(f"DeepSpeed save failed (rc {p.returncode}):\n{out[-4000:]}")
    return folder


# ---------------------------------------------------------------- the reference consolidation
def _natural_key(name: str) -> list:
    import re

    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", name)]


def checkpoint_files(ckpt_dir: Path, suffix: str) -> list[Path]:
    return sorted(ckpt_dir.glob(f"*{suffix}"), key=lambda p: _natural_key(p.name))


def consolidate_reference(folder: str | os.PathLike, tag: str | None = None, *,
                          exclude_frozen_parameters: bool = False) -> OrderedDict[str, torch.Tensor]:
    """The state dict ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(folder, tag)`` returns, rebuilt here
    independently (no DeepSpeed): buffers (floating ones as fp32), frozen parameters (stage 2/3, in their saved
    dtype), trainable parameters from the fp32 flat groups of all ranks, then tied names pointing at the same
    tensor. A stage-0 folder has no optimizer files and zero_to_fp32 refuses it; here it gives ``module`` with
    floating tensors as fp32. Like zero_to_fp32, stage 1 gives no frozen parameters (they are only in ``module``).
    BF16_Optimizer folders (no ``zero_stage``), which zero_to_fp32 refuses, are consolidated as ZeRO-1 after
    cutting each rank's ``group_paddings`` off its partition."""
    folder = Path(folder)
    if tag is None:
        tag = (folder / "latest").read_text().strip()
    ckpt_dir = folder / tag
    optim_files = checkpoint_files(ckpt_dir, "_optim_states.pt")
    model_files = checkpoint_files(ckpt_dir, "_model_states.pt")
    models = [load_deepspeed_file(f) for f in model_files]
    if not optim_files:
        converted: dict[int, torch.Tensor] = {}  # tied names keep pointing at one tensor
        out0: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, v in models[0]["module"].items():
            if id(v) not in converted:
                converted[id(v)] = v.float() if v.is_floating_point() else v
            out0[k] = converted[id(v)]
        return out0
    optims = [load_deepspeed_file(f)["optimizer_state_dict"] for f in optim_files]
    bf16_optimizer = "zero_stage" not in optims[0]  # BF16_Optimizer (ZeRO-1): zero_to_fp32 refuses these
    if bf16_optimizer and "single_partition_of_fp32_groups" not in optims[0]:
        raise ValueError(f"{optim_files[0]} is not a zero checkpoint")
    stage = 1 if bf16_optimizer else int(optims[0]["zero_stage"])
    ws = optims[0]["partition_count"]
    ws = max(ws) if isinstance(ws, list) else ws
    if ws != len(optims):
        raise ValueError(f"partition_count {ws} but {len(optims)} optimizer files in {ckpt_dir}")
    rank0 = models[0]
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in rank0["module"].items():
        if k in rank0["buffer_names"]:
            out[k] = v.float() if v.is_floating_point() else v
    frozen_shapes = rank0.get("frozen_param_shapes") or {}
    if not exclude_frozen_parameters:
        for name, shape in frozen_shapes.items():
            if stage <= 2:
                out[name] = rank0["frozen_param_fragments"][name]
            else:
                pieces = [m["frozen_param_fragments"][name] for m in models]
                out[name] = torch.cat(pieces)[: math.prod(shape)].view(shape)
    if stage <= 2:
        paddings = optims[0].get("param_alignment_paddings")
        for g, shapes in enumerate(rank0["param_shapes"]):
            parts = [o["single_partition_of_fp32_groups"][g] for o in optims]
            if bf16_optimizer:  # saved with the alignment padding, which group_paddings gives per rank
                parts = [t[: t.numel() - o["group_paddings"][g]] for t, o in zip(parts, optims)]
            full = torch.cat(parts)
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                n = math.prod(shape)
                out[name] = full[offset:offset + n].view(shape)
                offset += n + (paddings[g][i] if paddings is not None else 0)
            align = NCCL_START_ALIGNMENT_FACTOR * ws
            if math.ceil(offset / align) != math.ceil(full.numel() / align):
                raise ValueError(f"group {g}: used {offset} of {full.numel()} elements")
    else:
        flats = [torch.cat(list(o["fp32_flat_groups"])) for o in optims]
        offset = 0
        for shapes in rank0["param_shapes"]:
            for name, shape in shapes.items():
                n = math.prod(shape)
                size = math.ceil(n / ws)
                out[name] = torch.cat([f[offset:offset + size] for f in flats])[:n].view(shape)
                offset += size
        if offset != flats[0].numel():
            raise ValueError(f"used {offset} of {flats[0].numel()} elements per rank")
    out = OrderedDict((k, v.detach().clone()) for k, v in out.items())  # own storage, off the loaded files
    for alias, owner in rank0["shared_params"].items():
        if owner in out:
            out[alias] = out[owner]  # the same tensor object, as zero_to_fp32 gives
    return out
