"""DeepSpeed configuration for the trainer: the ZeRO stage rule, batch arithmetic, "auto" filling.

Pure functions (no torch, no ranks) so every rule is unit-tested without starting DeepSpeed.

**Batch arithmetic.** ``data.batch_size`` is the per-rank micro batch ``m``; the stage's
``global_batch`` ``G`` is fixed whatever the world size ``W``; the accumulation is ``G / (m * W)``.
A ``G`` that is not a multiple of ``m * W`` is refused with the numbers, instead of silently
changing the effective batch (and with it the learning-rate meaning) when the job moves to other
hardware.

**ZeRO stage rule** (``zero_stage: auto``; the user may force 0..3). Bytes per rank, with ``P`` all
parameters, ``P_t`` the trainable ones, ``b`` bytes per stored weight (2 for bf16, 4 for fp32,
~0.56 for nf4 incl. scales), ZeRO-``s`` sharding over ``W`` ranks:

* weights: ``P * b`` (stage < 3) or ``P * b / W`` (stage 3: the frozen base is sharded too);
* gradients: ``P_t * b`` (stage < 2) or ``P_t * b / W``;
* optimizer: fp32 master + Adam moments, ``12 * P_t`` (stage 0) or ``12 * P_t / W`` (stage >= 1).

The rule picks the *lowest* stage whose estimate fits in ``fit_fraction`` (default 0.6, the rest is
left for activations) of the device memory, because each stage up costs communication: ZeRO-3
gathers every weight, frozen or not, in every forward and backward (the 5x slow-down of a LoRA step
measured on an H100), and ZeRO-2 still copies gradients into flat buffers. So:

* LoRA / QLoRA: the adapters' state is tiny, so stage 0 when the base fits replicated (it always does
  for the 7B student on an 80 GB GPU), stage 3 only when the frozen base itself does not fit;
  QLoRA never gets 3 (refused, see :func:`check_stage`).
* full: stage 0 on one rank when everything fits; otherwise 1, then 2, then 3 — on a multi-rank job
  stage 1 usually suffices because the optimizer state is the big part (12 of 16 bytes per weight).
* Nothing fits: stage 3 with CPU offload (``offload: true`` forces offload at stage 3).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import StcError

STAGES = (0, 1, 2, 3)
FIT_FRACTION = 0.6
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


def estimate_bytes(stage: int, *, n_params: int, n_trainable: int, weight_bytes: float, world_size: int) -> float:
    """Per-rank bytes of weights + gradients + optimizer state under ZeRO-``stage`` (module docstring)."""
    w = max(1, world_size)
    weights = n_params * weight_bytes / (w if stage >= 3 else 1)
    grads = n_trainable * max(weight_bytes, 2.0) / (w if stage >= 2 else 1)
    optim = 12.0 * n_trainable / (w if stage >= 1 else 1)
    return weights + grads + optim


def choose_stage(requested: str, *, mode: str, n_params: int, n_trainable: int, weight_bytes: float,
                 world_size: int, device_bytes: float, offload: bool = False,
                 fit_fraction: float = FIT_FRACTION) -> StageChoice:
    """The ZeRO stage for this run (``requested`` is ``"auto"`` or ``"0".."3"``); see the module rule."""
    if str(requested) != "auto":
        try:
            stage = int(requested)
        except ValueError:
            stage = -1
        if stage not in STAGES:
            raise TrainConfigError(f"unknown DeepSpeed ZeRO stage {requested!r}; use auto, 0, 1, 2 or 3")
        check_stage(stage, mode)
        return StageChoice(stage, offload and stage == 3, "forced by the config")
    if offload:
        check_stage(3, mode)
        return StageChoice(3, True, "offload asked: ZeRO-3 with CPU offload")
    budget = device_bytes * fit_fraction
    candidates = (0, 1, 2, 3) if world_size > 1 else (0, 3)  # one rank: 1 and 2 shard nothing
    for stage in candidates:
        if mode == "qlora" and stage == 3:
            break
        need = estimate_bytes(stage, n_params=n_params, n_trainable=n_trainable, weight_bytes=weight_bytes,
                              world_size=world_size)
        if need <= budget:
            why = (f"weights+grads+optimizer {need / 2**30:.2f} GiB per rank fit in {fit_fraction:.0%} of "
                   f"{device_bytes / 2**30:.1f} GiB")
            return StageChoice(stage, False, f"lowest stage that fits: {why}")
    if mode == "qlora":
        raise TrainConfigError(
            "the 4-bit student does not fit on one device even with its adapters' state sharded, and qlora is not "
            "supported under ZeRO-3; use more memory per rank or mode=lora with zero_stage=3")
    return StageChoice(3, True, "nothing fits in device memory: ZeRO-3 with CPU offload")


def check_stage(stage: int, mode: str) -> None:
    if mode == "qlora" and stage == 3:
        raise TrainConfigError(
            "qlora under ZeRO-3 is refused: ZeRO-3 would partition the bitsandbytes 4-bit weights and their "
            "quant state, which bitsandbytes cannot gather back correctly (a known trouble spot); use "
            "zero_stage=auto/0/1/2 for qlora, or mode=lora with zero_stage=3 to shard a bf16 base")


def load_template(stage: int, offload: bool, path: str = "") -> dict:
    """The ``ds_configs`` file for the stage (or the user's ``ds_config``), with its "auto" values."""
    if path:
        p = Path(path)
    else:
        name = "zero3_offload.json" if stage == 3 and offload else "zero3.json" if stage == 3 else "zero2.json"
        p = DS_CONFIG_DIR / name
    if not p.exists():
        raise TrainConfigError(f"DeepSpeed config {p} does not exist")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


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
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
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
