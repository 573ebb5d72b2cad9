"""Whole-plan checks that need model shapes: batch arithmetic per step, parameters and memory.

Everything here comes from ``config.json`` of ``model.path`` built on the meta device (no weights are
read or allocated, so a config-only directory is enough): the teacher as it is, each student as the
teacher with its removed decoder layers taken out, with LoRA adapters where the step trains them. Per
step, for the ranks it runs on (``stc pipeline --nproc N``; ``stc submit pipeline``: nodes x tasks):

* **training** (finetune, distill): the accumulation ``global_batch / (micro x ranks)`` must be whole
  (:func:`engine.zero.accumulation`), and the ZeRO stage and gradient checkpointing the trainer would
  choose (:func:`train_choice`, the same call the trainer makes) with the per-rank estimate of
  :mod:`engine.memory` broken down (weights / gradients + DeepSpeed buffers / optimizer / activations
  / online teacher) and the bytes each rank sends per optimizer step, with their time at
  ``run.interconnect_gbps`` for 1, 2, 4 and 8 nodes of the step's ranks per node; a QLoRA student
  that fits nowhere is refused here, not after the queue;
* **inference** (importance, cache build, evaluate): the weights one rank holds (sharded over the
  ranks for ``cache.zero3``) plus the KV cache and working set of one batch;
* **single task** (prune, export, report): the host memory the step needs, which ``stc submit`` asks
  SLURM for (``--mem``): the model in its dtype, plus a second copy where the step writes a new one.

Device memory: ``run.device_memory_gb`` when set (plan for the cluster's GPUs from a login node),
else the visible GPU, else the host's RAM shared by the ranks. Sequences are planned at their longest:
``data.max_audio_s`` of audio with the default prompt and label length of :func:`engine.memory.training_seq`.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

from . import memory, zero
from .models import storage
from .errors import StcError

GIB = 2**30
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
HOST_OVERHEAD_GIB = 2.0          # interpreter, torch, tokenizer, buffers of a single-task step


@dataclass(frozen=True)
class Shape:
    """Counts of one model as a step builds it."""
    params: int                  # logical parameters
    trainable: int               # with the step's training mode (0 for inference)
    weight_bytes: float          # bytes of the weights as held (dtype; nf4 linears packed + scales)
    decoder_layers: int
    dims: Any = None             # engine.memory.Dims of the model as built


@dataclass(frozen=True)
class Estimate:
    ranks: int
    shape: Shape
    device_bytes: float
    per_rank_bytes: float
    host_bytes: float
    zero_stage: int | None = None
    zero_reason: str = ""
    accumulation: int | None = None
    problem: str = ""
    train: Any = None             # engine.memory.TrainMemory
    infer: Any = None             # engine.memory.InferMemory
    comm: tuple = ()              # ((nodes, ranks, bytes per rank, seconds), ...)
    gbps: float = 0.0
    offload: bool = False
    size: Any = None              # engine.models.storage.Breakdown of an export step's output
    note: str = ""

    def text(self) -> str:
        """Several short lines (the plan prints each wrapped at 80 columns)."""
        s = self.shape
        head = f"{_b(s.params)} params"
        g = lambda n: f"{n / GIB:.1f}"      # noqa: E731
        if self.zero_stage is not None and self.train is not None:
            m = self.train
            lines = [head + f", {_b(s.trainable)} trainable; ZeRO-{self.zero_stage}"
                     + (" + offload" if self.offload else "") + f": {g(m.total)} GiB/rank of "
                     f"{self.device_bytes / GIB:.0f} GiB; accumulation {self.accumulation}",
                     f"weights {g(m.weights)} + grads/buffers {g(m.grads)} + optimizer {g(m.optimizer)} + "
                     f"activations {g(m.activations)}" + (f" + teacher {g(m.teacher)}" if m.teacher else "")
                     + f" GiB; checkpointing {'on' if m.checkpointing else 'off'}"]
            if self.comm:
                parts = [f"{n} node{'s' * (n > 1)} {b / GIB:.2f} GiB {_secs(t)}" for n, _, b, t in self.comm]
                lines.append(f"comm/rank/step (ring; {self.gbps:g} Gb/s/node, NVLink within one): " + ", ".join(parts))
            return "\n".join(lines) + f"\nhost ~{math.ceil(self.host_bytes / GIB)} GiB"
        if self.infer is not None:
            m = self.infer
            return (head + f"; {g(m.total)} GiB/rank of {self.device_bytes / GIB:.0f} GiB: weights {g(m.weights)} + "
                    f"KV cache {g(m.kv_cache)} + activations {g(m.working)}; host ~{math.ceil(self.host_bytes / GIB)} GiB")
        if self.size is not None:
            return head + f"; host ~{math.ceil(self.host_bytes / GIB)} GiB; writes {self.size.short()}" \
                + (f" ({self.note})" if self.note else "")
        return head + f"; host ~{math.ceil(self.host_bytes / GIB)} GiB"


def _secs(t: float) -> str:
    return f"{t * 1e3:.0f} ms" if t < 10 else f"{t:.0f} s"


def _b(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def device_bytes(recipe: Any, ranks: int) -> float:
    if recipe.run.device_memory_gb > 0:
        return recipe.run.device_memory_gb * GIB
    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory)
    except Exception:
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 * GIB
    return float(total) / max(1, ranks)


@functools.lru_cache(maxsize=32)
def shape(model_path: str, removed: int, mode: str, dtype: str, quant: str, lora_key: tuple,
          trust_remote_code: bool = False) -> Shape:
    """The model at ``model_path`` with ``removed`` decoder layers taken out, as built for ``mode``
    (full / lora / qlora / inference), on the meta device."""
    import torch
    from transformers import AutoConfig

    from .config import LoraConfig
    from .models.counts import meta_model, param_counts
    from .models.load import apply_lora, detect_kind

    config = AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = int(text.num_hidden_layers)
    if removed:
        keep = n - removed
        text.num_hidden_layers = keep
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:keep]
        if isinstance(getattr(text, "max_window_layers", None), int):
            text.max_window_layers = min(text.max_window_layers, keep)
    model = meta_model(config, detect_kind(model_path), trust_remote_code)
    nf4 = quant == "nf4" or mode == "qlora"
    counts = param_counts(model, as_nf4=nf4)
    # meta parameters are fp32: weights not stored in 4 bit count at the step's dtype instead
    if nf4:
        quantized = 2 * (counts["total"] - counts["stored"])      # a 4-bit weight is stored as half
        other = counts["total"] - quantized
        weight_bytes = counts["stored_bytes"] - other * 4 + other * _DTYPE_BYTES[dtype]
    else:
        weight_bytes = counts["total"] * _DTYPE_BYTES[dtype]
    trainable = 0
    if mode == "full":
        trainable = counts["total"]
    elif mode in ("lora", "qlora"):
        lora = LoraConfig(**dict(lora_key))
        with torch.device("meta"):
            model = apply_lora(model, lora, upcast=False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Shape(counts["total"], trainable, float(weight_bytes), n - removed, memory.dims_of(config))


def _lora_key(lora: Any) -> tuple:
    from .config import to_dict

    return tuple(sorted(to_dict(lora).items()))


def batch_problem(section: str, global_batch: int, micro: int, ranks: int) -> str:
    """Why ``global_batch`` cannot run on ``ranks`` ranks of ``micro`` samples, and every fix that works."""
    per = micro * ranks
    fixes = [f"set {section}.global_batch to a multiple of {per} (e.g. {per * max(1, round(global_batch / per))})"]
    micros = [b for b in range(1, global_batch + 1) if global_batch % (b * ranks) == 0]
    if micros:
        fixes.append(f"set data.batch_size to {' or '.join(map(str, micros[-3:]))}")
    fits = [w for w in range(1, ranks) if global_batch % (micro * w) == 0]
    if fits:
        fixes.append(f"run on {fits[-1]} rank(s) (--nproc / --gpus-per-node)")
    return (f"{section}.global_batch={global_batch} does not divide by data.batch_size={micro} x {ranks} ranks = "
            f"{per}: " + "; or ".join(fixes))


def train_choice(r: Any, section: str, model_path: str, removed: int, ranks: int, dev: float) -> tuple:
    """``(StageChoice, Shape)`` of a training step: the ZeRO stage and checkpointing the trainer picks
    (:func:`engine.zero.choose_stage` over the full :mod:`engine.memory` estimate). The trainer calls
    this too, so a plan and its run agree."""
    c = getattr(r, section)
    mc = r.model
    mode = c.mode
    quant = "nf4" if mode == "qlora" else "none"
    sh = shape(model_path, removed, mode, mc.dtype, quant, _lora_key(c.lora), mc.trust_remote_code)
    d = _DTYPE_BYTES[mc.dtype]
    dims = sh.dims
    seq = memory.training_seq(r.data.max_audio_s, dims)
    adapters = mode in ("lora", "qlora")
    kd = section == "distill" and c.kd_weight > 0
    audio_trainable = (not adapters) or c.lora.include_audio_tower

    def acts(ck: bool) -> Any:
        return memory.activation_bytes(dims, seq, batch=r.data.batch_size, dtype_bytes=d, adapters=adapters,
                                       lora_r=c.lora.r, checkpointing=ck, kd=kd, audio_trainable=audio_trainable)

    teacher = 0.0
    if section == "distill" and c.teacher_mode == "online" and kd:
        # the teacher as built (a pipeline's fine-tuned teacher does not exist yet: it has model.path's shape)
        tpath = r.cache.teacher if r.cache.teacher and os.path.exists(os.path.join(r.cache.teacher, "config.json")) \
            else r.model.path
        tsh = shape(tpath, 0, "inference", mc.dtype, "none", (), mc.trust_remote_code)
        teacher = memory.teacher_bytes(tsh.weight_bytes, tsh.dims, seq, batch=r.data.batch_size, dtype_bytes=d)
    requested = zero.requested_stage(c.zero_stage, c.ds_config, section)
    choice = zero.choose_stage(requested, mode=mode, n_params=sh.params, n_trainable=sh.trainable,
                               weight_bytes=sh.weight_bytes / max(sh.params, 1), world_size=ranks, device_bytes=dev,
                               offload=c.offload, checkpointing=c.gradient_checkpointing, activations=acts,
                               dtype_bytes=d, teacher_bytes=teacher, buckets=zero.buckets_of(c.ds_config, section),
                               layer_params=dims.layer_params, dtype=mc.dtype)
    return choice, sh


def ranks_per_node(r: Any, ranks: int) -> int:
    n = max(1, r.slurm.nodes)
    return ranks // n if n > 1 and ranks % n == 0 else ranks


def comm_table(r: Any, section: str, stage: int, sh: Shape, ranks: int) -> tuple:
    """``((nodes, ranks, bytes per rank, seconds), ...)`` for 1, 2, 4, 8 nodes of the step's ranks per node,
    with the accumulation the global batch gives there (at least 1)."""
    c = getattr(r, section)
    rpn = ranks_per_node(r, ranks)
    d = _DTYPE_BYTES[r.model.dtype]
    gbps = r.run.interconnect_gbps
    rows = []
    for nodes in (1, 2, 4, 8):
        n = nodes * rpn
        accum = max(1, c.global_batch // (r.data.batch_size * n))
        b = memory.comm_bytes(stage, n_params=sh.params, n_trainable=sh.trainable, dtype_bytes=d, ranks=n,
                              accumulation=accum, weight_bytes=sh.weight_bytes)
        rows.append((nodes, n, b, memory.comm_seconds(b, nodes, gbps)))
    return tuple(rows)


def estimate(plan: Any, step: Any) -> Estimate:
    """The figures for one step of ``plan`` (:class:`engine.pipeline.Plan`)."""
    r = plan.recipe_of(step)
    ranks = plan.ranks(step)
    mpath = plan.recipe.model.path
    mc = r.model
    dev = device_bytes(r, ranks)
    if step.stage in ("finetune", "distill"):
        c = getattr(r, step.stage)
        mode = c.mode
        quant = "nf4" if mode == "qlora" else "none"
        sh = shape(mpath, step.removed, mode, mc.dtype, quant, _lora_key(c.lora), mc.trust_remote_code)
        try:
            accum = zero.accumulation(c.global_batch, r.data.batch_size, ranks)
        except zero.TrainConfigError:
            return Estimate(ranks, sh, dev, 0.0, 0.0,
                            problem=batch_problem(step.stage, c.global_batch, r.data.batch_size, ranks))
        try:
            choice, sh = train_choice(r, step.stage, mpath, step.removed, ranks, dev)
        except zero.TrainConfigError as e:
            return Estimate(ranks, sh, dev, 0.0, 0.0, problem=str(e))
        m = choice.memory
        problem = ""
        if m.total > memory.usable_bytes(dev) and not choice.offload:
            problem = (f"{step.stage}: {m.total / GIB:.1f} GiB per rank under ZeRO-{choice.stage} does not fit in "
                       f"{memory.usable_bytes(dev) / GIB:.1f} GiB usable of a device ({choice.reason}); use "
                       f"{step.stage}.zero_stage=auto, {step.stage}.gradient_checkpointing=auto or a smaller "
                       f"data.batch_size")
        host = (sh.params * _DTYPE_BYTES[mc.dtype] if choice.stage < 3 else sh.weight_bytes / ranks) \
            + HOST_OVERHEAD_GIB * GIB
        gbps = r.run.interconnect_gbps
        return Estimate(ranks, sh, dev, m.total, host, choice.stage, choice.reason, accum, problem=problem, train=m,
                        comm=comm_table(r, step.stage, choice.stage, sh, ranks), gbps=gbps, offload=choice.offload)
    if step.stage in ("importance", "cache build", "evaluate"):
        quant = mc.quant
        dtype = mc.dtype
        if step.stage == "cache build":
            quant = mc.quant if r.cache.quant == "auto" else r.cache.quant
            dtype = mc.dtype if r.cache.dtype == "auto" else r.cache.dtype
        if step.stage == "evaluate" and step.system and step.system.get("quant"):
            quant = step.system["quant"]
        sh = shape(mpath, step.removed, "inference", dtype, quant, (), mc.trust_remote_code)
        per = sh.weight_bytes / (ranks if step.stage == "cache build" and r.cache.zero3 else 1)
        batch, new, rows = {"importance": (r.importance.decode_batch_size, r.importance.max_new_tokens, 1),
                            "cache build": (r.cache.batch_size, r.cache.max_new_tokens,
                                            memory.training_seq(r.data.max_audio_s, sh.dims).label_tokens),
                            "evaluate": (r.evaluate.batch_size * r.evaluate.num_beams, r.evaluate.max_new_tokens, 1)
                            }[step.stage]
        inf = memory.inference_memory(per, sh.dims, batch=batch, dtype_bytes=_DTYPE_BYTES[dtype],
                                      audio_tokens_=memory.audio_tokens(r.data.max_audio_s, sh.dims), new_tokens=new,
                                      scored_rows=rows)
        problem = ""
        if per > dev:
            problem = (f"the model's weights alone need {per / GIB:.1f} GiB per rank, more than the "
                       f"{dev / GIB:.0f} GiB of a device; use model.quant=nf4"
                       + (" or cache.zero3=true (shards the teacher over the ranks)" if step.stage == "cache build" else ""))
        return Estimate(ranks, sh, dev, inf.total, per + HOST_OVERHEAD_GIB * GIB, problem=problem, infer=inf)
    if step.stage in ("prune", "export"):
        # prune loads in the dtype it saves (prune.dtype; auto: the source's, taken as model.dtype here)
        dtype = r.prune.dtype if step.stage == "prune" and r.prune.dtype != "auto" else mc.dtype
        sh = shape(mpath, 0 if step.stage == "prune" else step.removed, "inference", dtype, "none", (),
                   mc.trust_remote_code)
        copies = 1.2 if step.stage == "prune" else 2.2     # export: merged model + its quantised reload
        size, problem = None, ""
        if step.stage == "export":
            rows = trimmed_rows(r, mpath) if r.export.trim_vocab else None
            size = export_size(mpath, step.removed, r, rows, audio_removed=step.audio_removed)
            if r.export.trim_vocab and rows is None:     # the untrimmed size: an upper bound, not a refusal
                pass
            elif not storage.fits(size, r.export.max_gb):
                problem = (f"export: the student would take {size.total / storage.GB:.3f} GB on disk, over "
                           f"export.max_gb={r.export.max_gb:g}; remove more decoder layers, quantize more "
                           f"components (export.quantize: {', '.join(storage.QUANTIZABLE)})"
                           + ("" if r.export.trim_vocab else " or trim the vocabulary (export.trim_vocab=true)")
                           + ". Breakdown:\n" + size.table())
        note = ""
        if step.stage == "export" and r.export.trim_vocab:
            note = (f"vocabulary trimmed to {rows:,} rows" if rows else
                    "untrimmed vocabulary: an upper bound until the shards are built")
        return Estimate(1, sh, dev, 0.0, sh.weight_bytes * copies + HOST_OVERHEAD_GIB * GIB, problem=problem,
                        size=size, note=note)
    sh = Shape(0, 0, 0.0, 0)
    return Estimate(1, sh, dev, 0.0, HOST_OVERHEAD_GIB * GIB)


@functools.lru_cache(maxsize=64)
def _export_size(model_path: str, removed: int, dtype: str, quant: str, quantize: tuple, double_quant: bool,
                 trust_remote_code: bool, rows: int | None, audio_removed: int = 0) -> Any:
    return storage.predict(model_path, removed=removed, dtype=dtype, quant=quant, quantize=quantize,
                           double_quant=double_quant, trust_remote_code=trust_remote_code, vocab_rows=rows,
                           audio_removed=audio_removed)


def export_size(model_path: str, removed: int, recipe: Any, rows: int | None = None, *, audio_removed: int = 0) -> Any:
    """The predicted bytes on disk (:class:`engine.models.storage.Breakdown`) of the student with
    ``removed`` decoder layers (and ``audio_removed`` audio-encoder layers) that ``recipe``'s export
    writes (``rows``: its vocabulary after trimming)."""
    mc = recipe.model
    return _export_size(model_path, removed, mc.dtype, recipe.export.quant, tuple(recipe.export.quantize),
                        mc.double_quant, mc.trust_remote_code, rows, audio_removed)


@functools.lru_cache(maxsize=8)
def _trimmed_rows(model_path: str, key: str) -> int | None:
    import json as _json

    from .config import resolve
    from .export import trim_corpus, trim_scripts
    from .models import vocab
    from .models.load import load_processor

    recipe = resolve(_json.loads(key))
    try:
        processor = load_processor(model_path)
        texts, _ = trim_corpus(recipe, processor)
        tok = getattr(processor, "tokenizer", processor)
        scripts = trim_scripts(recipe)
        extra = vocab.script_ids(tok, scripts) if scripts else ()
        return len(vocab.keep_ids(tok, texts + vocab.template_texts(tok), extra_ids=extra).ids)
    except Exception:      # no tokenizer (a config-only directory) or shards not built yet: not known now
        return None


def trimmed_rows(recipe: Any, model_path: str) -> int | None:
    """Vocabulary rows ``export.trim_vocab`` keeps, from the model's tokenizer and the trim splits'
    texts (the same rule the export applies); None when the tokenizer or the shards are not there yet."""
    import json as _json

    from .config import to_dict

    key = _json.dumps({"data": to_dict(recipe.data), "export": to_dict(recipe.export)}, sort_keys=True)
    return _trimmed_rows(model_path, key)


def estimates(plan: Any) -> dict[str, Estimate]:
    out = {}
    for s in plan.active:
        if s.stage == "shards build":
            continue
        out[s.name] = estimate(plan, s)
    return out


def problems(plan: Any) -> list[str]:
    """Per-step refusals the stages themselves would raise, found from shapes alone (one line per
    problem, naming the steps it stops)."""
    try:
        by: dict[str, list[str]] = {}
        for name, e in estimates(plan).items():
            if e.problem:
                by.setdefault(e.problem, []).append(name)
        return [f"step{'s' * (len(names) > 1)} {', '.join(names)}: {p}" for p, names in by.items()]
    except (OSError, ValueError, StcError) as e:
        return [f"model.path {plan.recipe.model.path}: cannot build the model from config.json on the meta device "
                f"({type(e).__name__}: {e})"]


def describe(plan: Any) -> dict[str, str]:
    return {name: e.text() for name, e in estimates(plan).items()}


def host_mem_gib(plan: Any, step: Any) -> int | None:
    """Host memory (GiB, rounded up) a single-task step's job asks for; None when the model's shapes
    cannot be read (the plan's validation says why)."""
    try:
        return int(math.ceil(estimate(plan, step).host_bytes / GIB))
    except (OSError, ValueError, StcError):
        return None
