"""Checkpoints that do not depend on the world size or the ZeRO stage, written atomically.

Why not ``engine.save_checkpoint``: DeepSpeed's native checkpoints hold each rank's *partition* of
the optimizer state, so they load only on the same world size (or after an offline "universal"
conversion). Here every rank takes part in gathering each trainable parameter's full fp32 master
value and its full Adam moments through DeepSpeed's tensor-fragment API
(``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``, collective under ZeRO-3), and
rank 0 writes them by parameter *name*. Loading does the reverse with the ``safe_set_full_*``
calls after ``deepspeed.initialize``, so a checkpoint written by 2 ranks under ZeRO-3 loads on 1
rank under ZeRO-0 and vice versa. Frozen weights are not stored: they are re-read from the model
directory whose fingerprint the checkpoint records (the 4-bit base of QLoRA is re-quantized
deterministically from it).

Layout of ``<out>/checkpoints/step-<step>/`` (the name is for people; the step is read from
``state.json``):

* ``weights-<i>.safetensors``: fp32 master values of the trainable parameters ``{name: tensor}``,
  split into files of at most ``PART_BYTES``;
* ``optim-<i>.safetensors``: ``{"exp_avg/<name>": ..., "exp_avg_sq/<name>": ...}``;
* ``rng.pt``: per-rank RNG states (python, numpy, torch, cuda), loaded with ``weights_only=True``;
* ``state.json``: step, optimizer step count, scheduler state, stream state, run identity, counters;
* ``meta.json`` (kind ``checkpoint``): fingerprints, resolved config, provenance of every rank.

Atomicity: everything is written into ``.step-<step>.tmp-<pid>`` and renamed into place as the last
action; readers only consider names without the temporary mark and with a ``meta.json``, so a
half-written checkpoint is never picked up. The newest ``keep_last`` are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .. import dist
from ..errors import StcError
from ..io import TMP_MARK, atomic_write_json

PART_BYTES = 2 * 2**30
MOMENTS = ("exp_avg", "exp_avg_sq")
_NAME = re.compile(r"^step-\d+$")


class CheckpointError(StcError):
    pass


# ------------------------------------------------------------------------------------ full tensors

def _ds_utils():
    from deepspeed import utils as dsu

    return dsu


def _is_ds_managed(p: torch.nn.Parameter) -> bool:
    # hasattr, not "is not None": a rank whose partition holds no slice of p has _hp_mapping = None
    # but must still join the collective gather
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def full_param(p: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 master value of a trainable parameter (collective under ZeRO-3)."""
    if _is_ds_managed(p):
        v = _ds_utils().safe_get_full_fp32_param(p)
        if v is not None:
            return v.detach().float().cpu()
    return p.detach().float().cpu().clone()


def _basic_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def full_moment(engine: Any, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
    if _is_ds_managed(p):
        v = _ds_utils().safe_get_full_optimizer_state(p, key)
        return None if v is None else v.detach().float().cpu()
    st = _basic_optimizer(engine).state.get(p)
    return None if not st or key not in st else st[key].detach().float().cpu().clone()


def optimizer_step_count(engine: Any) -> int:
    for st in _basic_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"].item() if torch.is_tensor(st["step"]) else st["step"])
    return 0


def ensure_optimizer_state(engine: Any) -> None:
    """Create AdamW's lazily made state (zeros) so the full moments can be written into it."""
    opt = _basic_optimizer(engine)
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    # ZeRO-1/2 link each parameter's fragment to the optimizer state only after the first step;
    # link now, so the safe_set_full_optimizer_state calls find the fresh state.
    # A partition that never received a gradient (AdamW skips it) has no state either: same fix.
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def set_optimizer_step_count(engine: Any, step: int) -> None:
    for st in _basic_optimizer(engine).state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def set_full_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write a full fp32 value into the master copy and the model's (possibly partitioned) weight."""
    if _is_ds_managed(p):
        _ds_utils().safe_set_full_fp32_param(p, value)
        if hasattr(p, "ds_id"):
            return  # ZeRO-3 sets the partitioned low-precision copy as well
    with torch.no_grad():
        p.data.copy_(value.to(p.dtype))


def set_full_moment(engine: Any, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    if _is_ds_managed(p):
        _ds_utils().safe_set_full_optimizer_state(p, value, key)
        return
    _basic_optimizer(engine).state[p][key].copy_(value.to(_basic_optimizer(engine).state[p][key].dtype))


# ------------------------------------------------------------------------------------ RNG

def rng_state() -> dict:
    np_state = np.random.get_state()
    out = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(st: Mapping[str, Any]) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ------------------------------------------------------------------------------------ save / load

def _write_parts(directory: Path, prefix: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    from safetensors.torch import save_file

    names: list[str] = []
    part: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal part, size
        if part:
            name = f"{prefix}-{len(names):05d}.safetensors"
            save_file(part, str(directory / name))
            names.append(name)
        part, size = {}, 0

    for k, t in tensors:
        part[k] = t.contiguous()
        size += t.numel() * t.element_size()
        if size >= PART_BYTES:
            flush()
    flush()
    return names


def save(root: Path, *, engine: Any, named_trainable: list[tuple[str, torch.nn.Parameter]], step: int,
         state: Mapping[str, Any], meta: Mapping[str, Any], keep_last: int) -> Path | None:
    """Write checkpoint ``step`` under ``root`` (all ranks call; rank 0 writes). Returns its path on rank 0."""
    main = dist.is_main()
    tmp = root / f".step-{step:08d}{TMP_MARK}{os.getpid()}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def weights():
        for n, p in named_trainable:
            v = full_param(p)  # every rank joins the gather, only rank 0 keeps it
            if main:
                yield n, v

    ensure_optimizer_state(engine)

    def moments():
        for n, p in named_trainable:
            for key in MOMENTS:
                v = full_moment(engine, p, key)
                if main and v is not None:
                    yield f"{key}/{n}", v

    if main:
        w_files = _write_parts(tmp, "weights", weights())
        o_files = _write_parts(tmp, "optim", moments())
    else:
        for _ in weights():
            pass
        for _ in moments():
            pass
    rngs = dist.all_gather_object(rng_state())
    provs = dist.all_gather_object(dist.provenance())
    final = root / f"step-{step:08d}"
    if main:
        torch.save(rngs, tmp / "rng.pt")
        atomic_write_json(tmp / "state.json", dict(state, step=step, files={"weights": w_files, "optim": o_files},
                                                    world_size=dist.world_size()))
        atomic_write_json(tmp / "meta.json", dict(meta, provenance=provs))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(root, keep_last)
    dist.barrier()
    return final if main else None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under ``root`` as (step, path), oldest first (step read from state.json)."""
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        if not d.is_dir() or not _NAME.match(d.name) or not (d / "meta.json").exists():
            continue
        try:
            with open(d / "state.json", encoding="utf-8") as f:
                out.append((int(json.load(f)["step"]), d))
        except (OSError, ValueError, KeyError):
            continue
    out.sort(key=lambda x: x[0])
    return out


def prune(root: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(root)
    for _, d in ckpts[:max(0, len(ckpts) - keep_last)]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.iterdir():  # temporaries of killed runs
        if TMP_MARK in d.name and d.is_dir() and not d.name.endswith(f"{TMP_MARK}{os.getpid()}"):
            shutil.rmtree(d, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    with open(ckpt / "state.json", encoding="utf-8") as f:
        return json.load(f)


def load(ckpt: Path, *, engine: Any, named_trainable: list[tuple[str, torch.nn.Parameter]]) -> dict:
    """Load weights, optimizer moments, step count and this rank's RNG; returns ``state.json``."""
    from safetensors import safe_open

    state = read_state(ckpt)
    tensors: dict[str, torch.Tensor] = {}
    for kind in ("weights", "optim"):
        for name in state["files"][kind]:
            with safe_open(str(ckpt / name), framework="pt") as f:
                for k in f.keys():
                    tensors[(kind, k)] = f.get_tensor(k)
    mine = {n for n, _ in named_trainable}
    saved = {k for (kind, k) in tensors if kind == "weights"}
    if mine != saved:
        missing, extra = sorted(mine - saved)[:5], sorted(saved - mine)[:5]
        raise CheckpointError(f"{ckpt}: trainable parameters differ from the model's (missing {missing}, "
                              f"unexpected {extra}); it was written for another mode or model")
    ensure_optimizer_state(engine)
    for n, p in named_trainable:
        set_full_param(p, tensors[("weights", n)])
        for key in MOMENTS:
            v = tensors.get(("optim", f"{key}/{n}"))
            if v is not None:
                set_full_moment(engine, p, key, v)
    set_optimizer_step_count(engine, int(state.get("optimizer_steps", state["step"])))
    rngs = torch.load(ckpt / "rng.pt", weights_only=True)
    r = dist.rank()
    # Another world size: rank r continues rank r's streams when it existed; dropout etc. then
    # differ from an unchanged run only on ranks that did not exist before.
    set_rng_state(rngs[r] if r < len(rngs) else rngs[0])
    return state
