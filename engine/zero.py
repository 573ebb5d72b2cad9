"""DeepSpeed configuration for the trainer: the ZeRO stage rule, batch arithmetic, "auto" filling.

Pure functions (no torch, no ranks) so every rule is unit-tested without starting DeepSpeed.

**Batch arithmetic.** ``data.batch_size`` is the per-rank micro batch ``m``; the stage's
``global_batch`` ``G`` is fixed whatever the world size ``W``; the accumulation is ``G / (m * W)``.
A ``G`` that is not a multiple of ``m * W`` is refused with the numbers, instead of silently
changing the effective batch (and with it the learning-rate meaning) when the job moves to other
hardware.

**ZeRO stage and gradient checkpointing rule** (``zero_stage: auto``; the user may force 0..3, in
``zero_stage`` or in the ``zero_optimization.stage`` of their ``ds_config``). The per-rank estimate is
the whole training step of :mod:`engine.memory`: weights, gradients with DeepSpeed's fp32 and bucket
buffers for the stage, fp32 master + Adam moments, activations of the micro batch (checkpointing on
or off) and the online KD teacher. A choice fits when that total is at most
:func:`engine.memory.usable_bytes` of the device (5% kept for fragmentation, 1 GiB for the CUDA
context and NCCL). Each stage up costs communication (ZeRO-3 gathers every weight, frozen or not, in
every forward and backward: the 5x slow-down of a LoRA step measured on an H100) and checkpointing
costs a second forward (~30%), so candidates are tried in this order and the first that fits wins:

* ZeRO-0, 1, 2 without checkpointing (one rank: only 0, as 1 and 2 shard nothing; in bf16/fp16
  ZeRO-1 takes the place of 0, on one rank too, because DeepSpeed's stage-0 bf16/fp16 optimizer is
  not used);
* ZeRO-0, 1, 2 with checkpointing;
* ZeRO-3 without, then with checkpointing (never for QLoRA, refused by :func:`check_stage`);
* nothing fits: ZeRO-3 with CPU offload and checkpointing (``offload: true`` forces this).

``gradient_checkpointing: true/false`` keeps only the candidates with that setting; ``auto`` (the
default) tries both as above, so it is on only when nothing without it fits. A forced stage keeps
its stage and decides checkpointing the same way.

**The user's ds_config.** Its ``zero_optimization.stage`` wins over ``zero_stage: auto``; a different
explicit ``zero_stage`` is refused naming both. ``optimizer`` and ``scheduler`` blocks are refused:
the engine owns a torch AdamW over the trainable parameters and its schedule (``<stage>.lr``,
``schedule``, ``warmup_steps``, ``weight_decay``); dropping them silently would train with other
settings than the file says.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import StcError

STAGES = (0, 1, 2, 3)
DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


class TrainConfigError(StcError, ValueError):
    """A training setup that cannot run as asked; the message names the numbers and the fix."""


def accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient accumulation steps so that ``micro * world * accum == global_batch``."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        lo = max(per_step, global_batch // per_step * per_step)
        raise TrainConfigError(
            f"global batch {global_batch} does not divide by micro batch {micro_batch} x world size "
            f"{world_size} = {per_step}: set the stage's global_batch to a multiple of {per_step} "
            f"(e.g. {lo} or {lo + per_step}) or change data.batch_size / the number of ranks")
    return global_batch // per_step


@dataclass(frozen=True)
class StageChoice:
    stage: int
    offload: bool
    reason: str
    checkpointing: bool = False
    memory: Any = None            # engine.memory.TrainMemory of the choice (None when not estimated)


def estimate_bytes(stage: int, *, n_params: int, n_trainable: int, weight_bytes: float, world_size: int,
                   dtype_bytes: int = 2, activations: Any = None, checkpointing: bool = False, offload: bool = False,
                   teacher_bytes: float = 0.0, buckets: Any = None, layer_params: int = 0) -> Any:
    """:class:`engine.memory.TrainMemory` per rank under ZeRO-``stage``; ``weight_bytes`` per parameter."""
    from . import memory

    return memory.train_memory(stage, n_params=n_params, n_trainable=n_trainable,
                               weight_bytes=n_params * weight_bytes, world_size=world_size, dtype_bytes=dtype_bytes,
                               activations=activations or memory.Activations(0.0, 0.0), checkpointing=checkpointing,
                               offload=offload, teacher_bytes=teacher_bytes, buckets=buckets or memory.Buckets(),
                               layer_params=layer_params)


def _ckpt_options(checkpointing: Any) -> tuple[bool, ...]:
    if checkpointing in ("auto", None):
        return (False, True)
    if isinstance(checkpointing, str):
        return (checkpointing.lower() in ("true", "1", "yes", "on"),)
    return (bool(checkpointing),)


def choose_stage(requested: str, *, mode: str, n_params: int, n_trainable: int, weight_bytes: float,
                 world_size: int, device_bytes: float, offload: bool = False, checkpointing: Any = "auto",
                 activations: Callable[[bool], Any] | None = None, dtype_bytes: int = 2, teacher_bytes: float = 0.0,
                 buckets: Any = None, layer_params: int = 0, dtype: str | None = None) -> StageChoice:
    """The ZeRO stage and checkpointing for this run (module rule). ``requested``: ``"auto"`` or
    ``"0".."3"``; ``weight_bytes`` per parameter as held; ``activations(checkpointing)`` ->
    :class:`engine.memory.Activations` of the micro batch (none: not counted); ``dtype`` (bf16/fp16)
    moves stage 0 to ZeRO-1: DeepSpeed's stage-0 bf16/fp16 optimizer is not used."""
    from . import memory

    ckpts = _ckpt_options(checkpointing)
    mixed = dtype in ("bf16", "fp16")
    if dtype is not None:
        dtype_bytes = 4 if dtype == "fp32" else 2

    def mem(stage: int, ck: bool, off: bool = False) -> Any:
        act = activations(ck) if activations else memory.Activations(0.0, 0.0)
        return estimate_bytes(stage, n_params=n_params, n_trainable=n_trainable, weight_bytes=weight_bytes,
                              world_size=world_size, dtype_bytes=dtype_bytes, activations=act, checkpointing=ck,
                              offload=off, teacher_bytes=teacher_bytes, buckets=buckets, layer_params=layer_params)

    usable = memory.usable_bytes(device_bytes)

    def why(m: Any) -> str:
        return (f"{m.total / 2**30:.1f} GiB per rank with checkpointing {'on' if m.checkpointing else 'off'} "
                f"fits in {usable / 2**30:.1f} GiB usable of {device_bytes / 2**30:.1f} GiB")

    if str(requested) != "auto":
        try:
            stage = int(requested)
        except ValueError:
            stage = -1
        if stage not in STAGES:
            raise TrainConfigError(f"unknown DeepSpeed ZeRO stage {requested!r}; use auto, 0, 1, 2 or 3")
        check_stage(stage, mode)
        forced = "forced by the config"
        if stage == 0 and mixed:
            stage, forced = 1, f"forced 0, ZeRO-1 instead of 0 ({dtype}: DeepSpeed's stage-0 {dtype} optimizer is not used)"
        off = offload and stage == 3
        for ck in ckpts:
            m = mem(stage, ck, off)
            if m.total <= usable:
                return StageChoice(stage, off, f"{forced}; {why(m)}", ck, m)
        m = mem(stage, ckpts[-1], off)
        return StageChoice(stage, off, f"{forced}; needs {m.total / 2**30:.1f} GiB per rank, more than the "
                                       f"{usable / 2**30:.1f} GiB usable", ckpts[-1], m)
    if offload:
        check_stage(3, mode)
        m = mem(3, ckpts[-1], True)
        return StageChoice(3, True, "offload asked: ZeRO-3 with CPU offload", ckpts[-1], m)
    low = (0, 1, 2) if world_size > 1 else (0,)
    if mixed:       # ZeRO-1 instead of 0 (also on one rank, where it shards nothing)
        low = tuple(dict.fromkeys(1 if s == 0 else s for s in low))
    order = [(s, ck) for ck in ckpts for s in low]
    if mode != "qlora":
        order += [(3, ck) for ck in ckpts]
    for stage, ck in order:
        m = mem(stage, ck)
        if m.total <= usable:
            note = ""
            if mixed and stage == 1 and mem(0, ck).total <= usable:
                note = f"ZeRO-1 instead of 0 ({dtype}: DeepSpeed's stage-0 {dtype} optimizer is not used); "
            return StageChoice(stage, False, f"{note}lowest that fits: {why(m)}", ck, m)
    if mode == "qlora":
        raise TrainConfigError(
            "the 4-bit student does not fit on one device even with its adapters' state sharded and gradient "
            "checkpointing, and qlora is not supported under ZeRO-3; use more memory per rank, a smaller "
            "data.batch_size, or mode=lora with zero_stage=3")
    m = mem(3, ckpts[-1], True)
    return StageChoice(3, True, "nothing fits in device memory: ZeRO-3 with CPU offload", ckpts[-1], m)


def check_stage(stage: int, mode: str) -> None:
    if mode == "qlora" and stage == 3:
        raise TrainConfigError(
            "qlora under ZeRO-3 is refused: ZeRO-3 would partition the bitsandbytes 4-bit weights and their "
            "quant state, which bitsandbytes cannot gather back correctly (a known trouble spot); use "
            "zero_stage=auto/0/1/2 for qlora, or mode=lora with zero_stage=3 to shard a bf16 base")


def load_template(stage: int, offload: bool, path: str = "", section: str = "") -> dict:
    """The ``ds_configs`` file for the stage (or the user's ``ds_config``), with its "auto" values.
    A user's file with ``optimizer``/``scheduler`` blocks is refused (module docstring)."""
    if path:
        p = Path(path)
    else:
        name = "zero3_offload.json" if stage == 3 and offload else "zero3.json" if stage == 3 else "zero2.json"
        p = DS_CONFIG_DIR / name
    if not p.exists():
        raise TrainConfigError(f"DeepSpeed config {p} does not exist")
    with open(p, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    if path:
        _refuse_user_optimizer(data, str(p), section)
    return data


def _refuse_user_optimizer(ds: Mapping[str, Any], path: str, section: str) -> None:
    blocks = [k for k in ("optimizer", "scheduler") if k in ds]
    if not blocks:
        return
    sec = section or "<stage>"
    key = f"{sec}.ds_config" if section else "ds_config"
    raise TrainConfigError(
        f"{path} ({key}) has {' and '.join(repr(b) for b in blocks)} block{'s' * (len(blocks) > 1)}: the engine owns "
        f"the optimizer (a torch AdamW over the trainable parameters) and the learning-rate schedule, and would "
        f"not use them; remove {'them' if len(blocks) > 1 else 'it'} from the file and set {sec}.lr, "
        f"{sec}.weight_decay, {sec}.schedule and {sec}.warmup_steps instead")


def requested_stage(zero_stage: str, ds_config: str = "", section: str = "") -> str:
    """The stage asked for: ``zero_stage``, or the ``zero_optimization.stage`` of the user's ds_config when
    ``zero_stage`` is auto; both set and different is refused naming both."""
    if not ds_config:
        return str(zero_stage)
    z = (load_template(0, False, ds_config, section).get("zero_optimization") or {})
    raw = z.get("stage", "auto")
    if raw == "auto":
        return str(zero_stage)
    if str(raw) not in tuple(map(str, STAGES)):
        raise TrainConfigError(f"{ds_config}: zero_optimization.stage {raw!r} is not 0, 1, 2 or 3")
    sec = f"{section}." if section else ""
    if str(zero_stage) != "auto" and str(zero_stage) != str(raw):
        raise TrainConfigError(
            f"{sec}zero_stage={zero_stage} conflicts with zero_optimization.stage={raw} in {ds_config} "
            f"({sec}ds_config): keep one of them (or make them equal)")
    return str(raw)


def fill_config(template: Mapping[str, Any], *, stage: int, micro_batch: int, accum: int, world_size: int,
                dtype: str, grad_clip: float, offload: bool, param_persistence_threshold: int | None = None,
                hidden_size: int = 0, on_cpu: bool = False) -> dict:
    """Replace every ``"auto"`` by the value the stage config implies; the stage is set explicitly.

    A value the template (or the user's ds_config) sets to something other than "auto" is kept,
    except ``zero_optimization.stage``: the chosen stage wins, because the rule above (or the user's
    ``zero_stage``) is the one place that decides it.
    """
    ds = copy.deepcopy(dict(template))

    def put(d: dict, key: str, value: Any) -> None:
        if d.get(key, "auto") == "auto":
            d[key] = value

    put(ds, "train_micro_batch_size_per_gpu", micro_batch)
    put(ds, "gradient_accumulation_steps", accum)
    put(ds, "train_batch_size", micro_batch * accum * world_size)
    put(ds, "gradient_clipping", float(grad_clip))
    bf16 = dict(ds.get("bf16") or {})
    put(bf16, "enabled", dtype == "bf16")
    ds["bf16"] = bf16
    fp16 = dict(ds.get("fp16") or {})
    put(fp16, "enabled", dtype == "fp16")
    ds["fp16"] = fp16
    z = dict(ds.get("zero_optimization") or {})
    z["stage"] = stage
    if stage < 3:
        for k in [k for k in z if k.startswith("stage3_") or k == "offload_param"]:
            z.pop(k)
    else:
        if param_persistence_threshold is not None:
            z["stage3_param_persistence_threshold"] = int(param_persistence_threshold)
        put(z, "stage3_param_persistence_threshold", 10 * hidden_size if hidden_size else 100_000)
        put(z, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size) if hidden_size else 50_000_000)
    if stage < 1 or not offload:
        z.pop("offload_optimizer", None)
    if not offload:
        z.pop("offload_param", None)
    if on_cpu:
        for k in ("offload_optimizer", "offload_param"):
            if isinstance(z.get(k), dict):
                z[k] = dict(z[k], pin_memory=False)  # pinned host memory needs a GPU
    ds["zero_optimization"] = z
    # The engine owns the optimizer (a torch AdamW over trainable params) and the schedule.
    _refuse_user_optimizer(ds, "the DeepSpeed config", "")
    ds.setdefault("zero_allow_untested_optimizer", True)
    if offload:
        # The optimizer is always a torch AdamW (on the host when offloaded: that *is* a CPU optimizer);
        # DeepSpeed otherwise refuses a client optimizer under offload and wants its cpu_adam op, a JIT
        # build of 80-110 s per cold start. A user's ds_config may still set this key.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise TrainConfigError(f"DeepSpeed config keys still 'auto' that the engine does not fill: {left}")
    return ds


def _walk(d: Mapping[str, Any], prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _walk(v, key + ".")
        else:
            yield key, v


def device_memory_bytes() -> float:
    """Memory of one device: the GPU's, or on CPU the machine's RAM shared by the local ranks."""
    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    except Exception:
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 * 2**30
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return float(total) / max(1, local)


def buckets_of(ds_config: str = "", section: str = "") -> Any:
    """DeepSpeed buffer sizes for the memory rule: the engine's ds_configs, or the user's file's values."""
    from . import memory

    b = memory.Buckets()
    if not ds_config:
        return b
    z = load_template(0, False, ds_config, section).get("zero_optimization") or {}

    def num(key: str, default: int) -> int:
        v = z.get(key, "auto")
        return default if v == "auto" else int(float(v))

    return memory.Buckets(reduce=num("reduce_bucket_size", 500_000_000), reduce_stage3=num("reduce_bucket_size", 500_000_000),
                          overlap_comm=bool(z.get("overlap_comm", True)),
                          prefetch=num("stage3_prefetch_bucket_size", b.prefetch),
                          max_live=num("stage3_max_live_parameters", b.max_live))
