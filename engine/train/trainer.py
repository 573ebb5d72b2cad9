"""One DeepSpeed trainer for ``stc finetune`` (CE on references) and ``stc distill`` (CE + KD).

A stage is a recipe with fixed steps (:class:`Trainer`: ``setup``, ``preflight``, ``train``,
``save_checkpoint``, ``close``); ``run(recipe, stage)`` is the entry point the CLI calls.

**Modes.** ``full`` trains every weight; ``lora`` freezes the base (model dtype) and trains rsLoRA
adapters; ``qlora`` does the same on an nf4 base (the paper's student recipe). Whatever the mode the
model goes through ``deepspeed.initialize`` with a torch AdamW over the *trainable* parameters only
(frozen weights get no optimizer state and no gradient buffers). ZeRO stage and "auto" values:
:mod:`engine.zero`.

**Loss** (the same whatever the world size and accumulation). For a micro batch with student logits ``z`` [B, T, V], labels ``y`` [B, T]
(-100 off the translation) and, when distilling, the teacher's top-k targets ``kd_ids`` [B, T, k],
``kd_logprobs`` [B, T, k], ``kd_tail`` [B, T], ``kd_mask`` [B, T] aligned with ``y`` (row ``t`` is the
teacher's distribution for token ``y[t]``, predicted from position ``t - 1``)::

    loss = (sum_CE + kd_weight * sum_KD) / N_global

``N_global`` is the number of label tokens of the whole optimizer step: every micro batch of the
accumulation window on every rank. The trainer reads the window's micro batches first, all-reduces
their label-token count, and only then runs forward/backward; each micro batch's backward gets
``W * sum / N_global`` (DeepSpeed averages gradients over the ``W`` ranks; accumulation scaling is
off), so the gradient is that of the global mean whatever ``W`` and the accumulation are. Padding
batches (all labels -100) therefore add nothing.

Only the label rows reach ``lm_head``: a forward pre-hook on the output layer
(:func:`head_at_label_rows`) keeps the hidden states at positions ``t - 1`` of the labels ``t``, so
the forward returns ``z`` [N, V] for the N label tokens instead of [B, T, V] (at a 156k vocabulary
the full-sequence logits of the audio and prompt positions cost more memory than the decoder
activations). The output layer is still *called* (never its ``.weight`` read), so ZeRO-3 gathers it
with its own hooks, and LoRA never wraps it (:func:`engine.models.load.lora_targets` skips it). The
online teacher goes through the same hook.

**ZeRO-3 loading.** When the resolved stage is 3 the model is built inside ``deepspeed.zero.Init``
(transformers' ``HfDeepSpeedConfig`` alive around ``from_pretrained`` and the LoRA wrapping): every
rank only ever holds ``1/W`` of the weights, on the host as on the device, instead of a whole copy
until ``deepspeed.initialize``. The stage is therefore chosen before loading, from parameter counts
of the model built on the meta device. ``STC_ZERO3_INIT=0`` loads whole copies as before (a
benchmark and fallback switch). The start record's ``zero3_load_*`` counts show the partitioning as
loaded, before ``deepspeed.initialize``.

**Teacher.** ``teacher_mode: cache`` reads the top-k targets the stream joins from the teacher cache;
``online`` runs the frozen teacher (no grad, never in the optimizer, outside DeepSpeed) on the same
batch and turns its logits into the same top-k fields (:func:`topk_targets`), so both modes share
one loss and differ only in where the targets come from.

**Stop and resume.** SIGTERM and SIGUSR1 set a flag; after every optimizer step the ranks agree on it
(``dist.any_flag``), all checkpoint the same step and the process exits with
``EXIT_RESUMABLE`` (75). Rerunning the same command resumes from the newest checkpoint in
``<out>/checkpoints`` (format: :mod:`engine.train.checkpoint`): weights, optimizer, scheduler, RNG and
the stream state, so the continuation equals an uninterrupted run. A checkpoint of another run
(the run identity: model, data, mode, loss, optimizer and batch settings) is refused with the keys
that differ; the world size and micro batch may change (the global batch may not).

Test hook: ``STC_SIGNAL_AT_STEP=<step>[:<rank>[:<signal>]]`` makes that rank send itself SIGTERM (or
the named signal, e.g. ``KILL`` for a rank that dies) after that step (rank 0 by default), the way a
scheduler would, so tests stop at a known step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .. import dist, log, stages, zero
from ..config import DistillConfig, FinetuneConfig, LoraConfig, ModelConfig, Recipe, save_resolved, to_dict
from ..data.prompt import Featurizer
from ..data.stream import Stream, StreamError
from ..errors import EXIT_OK, EXIT_RESUMABLE, StcError
from ..io import append_jsonl
from ..meta import MetaError, build_meta, fingerprint_model, fingerprint_tokenizer, read_meta, write_meta
from ..cache.format import CacheJoinError, check_compatible, read_cache_meta
from ..cache.join import joiner
from ..models.counts import meta_param_counts  # noqa: F401  (re-exported: tests count on the meta device)
from ..models import families
from ..models.load import apply_lora, check_model_dir, load_model, load_processor
from ..zero import TrainConfigError
from . import checkpoint, losses

IGNORE = -100
MODEL_KEYS = ("input_ids", "attention_mask") + families.audio_input_keys()
AUDIO_KEYS = families.audio_input_keys()
KD_KEYS = ("kd_ids", "kd_logprobs", "kd_tail", "kd_mask")


class TrainError(StcError):
    """A run that must stop; the message names the step, the batch keys or the setting at fault."""


class StopRequested(Exception):
    """Raised after the stop checkpoint is written; the CLI maps it to EXIT_RESUMABLE."""


# ============================================================================================ spec

@dataclass(frozen=True)
class Spec:
    """What a stage asks of the trainer, resolved from the recipe."""
    stage: str                      # "finetune" | "distill"
    cfg: Any                        # FinetuneConfig | DistillConfig
    model: ModelConfig              # the model that is trained (student for distill)
    mode: str                       # full | lora | qlora
    lora: LoraConfig
    out: Path
    kd: bool                        # KD term present (distill)
    teacher_mode: str = "none"      # cache | online | none
    teacher: str = ""
    cache: str = ""


def resolve_spec(recipe: Recipe, stage: str) -> Spec:
    if stage == "finetune":
        c: Any = recipe.finetune
        out = stages.out_dir("finetune", recipe)
        mode = getattr(c, "mode", "full")
        model = recipe.model if mode != "qlora" else replace(recipe.model, quant="nf4")
        return Spec("finetune", c, model, mode, getattr(c, "lora", LoraConfig()), out, kd=False)
    if stage != "distill":
        raise ValueError(f"unknown training stage {stage!r}")
    c = recipe.distill
    if not c.student:
        raise TrainConfigError("distill.student is empty: set it to the pruned model directory (`stc prune` output)")
    out = stages.out_dir("distill", recipe)
    quant = "nf4" if c.mode == "qlora" else "none"
    model = replace(recipe.model, path=c.student, quant=quant)
    kd = c.kd_weight > 0
    if c.teacher_mode == "cache" and not c.cache and (kd or c.seq_kd):
        raise TrainConfigError("distill.cache is empty: point it at a teacher cache (`stc cache build`) or set "
                               "distill.teacher_mode=online (or distill.kd_weight=0 and distill.seq_kd=false)")
    if c.teacher_mode == "online" and c.seq_kd:
        raise TrainConfigError("distill.seq_kd needs the teacher translations of a cache; with teacher_mode=online "
                               "set distill.seq_kd=false")
    teacher = recipe.cache.teacher or recipe.model.path
    return Spec("distill", c, model, c.mode, c.lora, out, kd=kd,
                teacher_mode=c.teacher_mode if kd or c.seq_kd else "none", teacher=teacher, cache=c.cache)


# Keys that say where things are or how often to save, not what is computed: never part of the identity,
# so a run and its shards copied elsewhere (scratch disk, node-local staging) still resume.
_NOT_IDENTITY = ("out", "save_every", "keep_last", "eval_every", "zero_stage", "ds_config", "offload",
                 "gradient_checkpointing", "resume", "eval_batches", "student", "cache", "zero3_persistence_threshold")


def data_fingerprint(shards: str | os.PathLike) -> str:
    """The content fingerprint of a shard directory (names + sha256 of every shard, from its meta.json)."""
    try:
        return str(read_meta(shards, kind="shards")["fingerprints"]["data"])
    except (MetaError, KeyError) as e:
        raise TrainError(f"data.shards {shards}: {e}") from None


def run_identity(recipe: Recipe, spec: Spec) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: contents, never paths (the model,
    data and cache by fingerprint); world size and micro batch excluded."""
    c = to_dict(spec.cfg)
    for k in _NOT_IDENTITY:
        c.pop(k, None)
    ident = {"stage": spec.stage, "mode": spec.mode, "model": fingerprint_model(spec.model.path),
             "dtype": spec.model.dtype, "quant": spec.model.quant, "data": data_fingerprint(recipe.data.shards),
             "data.train_split": recipe.data.train_split, "data.shuffle": recipe.data.shuffle,
             "data.bucket_window": recipe.data.bucket_window, "run.seed": recipe.run.seed}
    if spec.teacher_mode == "cache":
        meta = read_cache_meta(spec.cache)
        ident["cache"] = {"fingerprints": meta.get("fingerprints"), "k": meta.get("k"),
                          "targets": meta.get("targets")}
    elif spec.teacher_mode == "online":
        ident["teacher"] = fingerprint_model(spec.teacher)
    ident.update({f"{spec.stage}.{k}": v for k, v in c.items()})
    return json.loads(json.dumps(ident))


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: checkpoint has {old.get(k)!r}, this run {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# ============================================================================================ maths

def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based): linear warm-up, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise TrainConfigError(f"unknown lr schedule {schedule!r}; cosine, linear or constant")


def topk_targets(teacher_logits: Any, labels: Any, k: int, vocab_size: int) -> dict[str, Any]:
    """Live-teacher logits -> the cache's top-k fields, aligned with ``labels``.

    ``teacher_logits`` [B, T, R] (R >= vocab_size rows) or only the label rows [N, R] (as
    :func:`head_at_label_rows` makes them: row-major over the positions ``t - 1`` of the labels ``t``),
    ``labels`` [B, T]. Row ``t`` of the result
    comes from logits at ``t - 1`` (the position that predicts ``labels[t]``): ``kd_ids`` [B, T, k],
    ``kd_logprobs`` [B, T, k] (log-softmax over all R rows, top-k over the first ``vocab_size``, as the
    cache builds them), ``kd_tail`` [B, T] (log of the mass outside the top k), ``kd_mask`` [B, T].
    Only label positions are normalised, so no [B, T, R] float32 copy is made for prompt positions.
    """

    b, t = labels.shape
    out = {"kd_ids": torch.zeros((b, t, k), dtype=torch.long, device=labels.device),
           "kd_logprobs": torch.full((b, t, k), float("-inf"), device=labels.device),
           "kd_tail": torch.full((b, t), float("-inf"), device=labels.device),
           "kd_mask": torch.zeros((b, t), dtype=torch.bool, device=labels.device)}
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, 1:] = labels[:, 1:] != IGNORE
    if not bool(pos.any()):
        return out
    src = torch.zeros_like(pos)
    src[:, :-1] = pos[:, 1:]
    rows = teacher_logits if teacher_logits.ndim == 2 else teacher_logits[src]
    if rows.shape[0] != int(pos.sum()):
        raise TrainError(f"teacher logits have {rows.shape[0]} label rows for {int(pos.sum())} label tokens")
    logp = torch.log_softmax(rows.float(), dim=-1)                          # [N, R]
    vals, ids = logp[:, :vocab_size].topk(k, dim=-1)                        # [N, k]
    # logsumexp of the complement, not log1p(-sum): the latter underflows for peaked rows
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)               # [N]
    out["kd_ids"][pos], out["kd_logprobs"][pos], out["kd_tail"][pos] = ids, vals, tail
    out["kd_mask"][pos] = True
    return out


def micro_loss_sums(logits: Any, batch: Mapping[str, Any], *, kd: bool, kd_kind: str, temperature: float) -> tuple[Any, Any, int]:
    """``(sum_CE, sum_KD, n_label_tokens)`` of one micro batch (sums over label positions).

    ``logits`` [B, T, V], or only the N label rows [N, V] (what the trainer's forward returns, see
    :func:`head_at_label_rows`); ``batch["labels"]`` [B, T]; KD fields [B, T, k] / [B, T] as in the
    module doc. Only the N label rows are passed on ([N, V]), the loss functions chunk them.
    """


    labels = batch["labels"]
    pos = labels[:, 1:] != IGNORE                     # [B, T-1]: positions whose next token is a label
    n = int(pos.sum())
    rows = logits if logits.ndim == 2 else logits[:, :-1][pos]   # [N, V]
    if rows.shape[0] != n:
        raise TrainError(f"{rows.shape[0]} logit rows for {n} label tokens")
    tgt = labels[:, 1:][pos]                          # [N]
    zero = logits.sum() * 0.0                         # keeps the graph (and ZeRO-3 hooks) alive when N = 0
    if n == 0:
        return zero, zero, 0
    ce_sum = losses.ce_loss(rows, tgt).total
    kd_sum = zero
    if kd:
        m = batch["kd_mask"][:, 1:][pos]              # [N]: label positions the teacher covers
        if bool(m.any()):
            kd_sum = losses.sparse_kd_loss(
                rows, batch["kd_ids"][:, 1:][pos], batch["kd_logprobs"][:, 1:][pos],
                batch["kd_tail"][:, 1:][pos], kind=kd_kind, mask=m, temperature=temperature).total
    return ce_sum, kd_sum, n


@contextlib.contextmanager
def head_at_label_rows(head: Any, labels: Any) -> Iterator[None]:
    """While active, the output layer ``head`` sees only the hidden states that predict a label.

    A forward pre-hook turns the head's input [B, T, H] into ``hidden[:, :-1][labels[:, 1:] != -100]``
    [N, H] (row-major: sample by sample, in sequence order), so the model returns logits [N, V] for
    the N label tokens of ``labels`` [B, T] and never [B, T, V]. The head module itself runs (its
    ZeRO-3 hooks gather the weight; DeepSpeed and autograd see an ordinary call); only the rows differ.
    """
    pos = labels[:, 1:] != IGNORE

    def keep_label_rows(module: Any, args: tuple) -> tuple:
        h = args[0]
        if h.ndim != 3 or tuple(h.shape[:2]) != tuple(labels.shape):
            raise TrainError(f"the output layer got hidden states {tuple(h.shape)} for labels "
                             f"{tuple(labels.shape)}; expected [B, T, H] aligned with the labels")
        return (h[:, :-1][pos.to(h.device)], *args[1:])

    handle = head.register_forward_pre_hook(keep_label_rows)
    try:
        yield
    finally:
        handle.remove()


def _shape(p: Any) -> tuple[int, ...]:
    """Full shape of a parameter, also when ZeRO-3 holds only a slice of it (``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _numel(p: Any) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def zero3_counts(model: Any) -> dict[str, int]:
    """How the model's parameters are held: ``params`` under ZeRO-3 management, how many of them only
    as a slice (``partitioned``), the local and full element counts."""
    z3 = [(int(p.ds_tensor.numel()), int(p.ds_numel)) for p in model.parameters() if hasattr(p, "ds_numel")]
    return {"params": len(z3), "partitioned": sum(loc < full for loc, full in z3),
            "local_numel": sum(loc for loc, _ in z3), "numel": sum(f for _, f in z3)}


# ============================================================================================ trainer

def _peak_mem_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class Trainer:
    def __init__(self, recipe: Recipe, stage: str):
        self.recipe = recipe
        self.spec = resolve_spec(recipe, stage)
        self.cfg = self.spec.cfg
        self.step = 0
        self.device_seconds = 0.0
        self._stop = False
        self._signal_at = self._parse_signal_hook()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _parse_signal_hook() -> tuple[int, int, int] | None:
        v = os.environ.get("STC_SIGNAL_AT_STEP", "")
        if not v:
            return None
        step, _, rest = v.partition(":")
        rank, _, sig = rest.partition(":")
        return int(step), int(rank or 0), int(getattr(signal, f"SIG{sig or 'TERM'}"))

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop = True
        self.log.warning("received %s: checkpointing after the current step, then exiting with %d (resumable)",
                         signal.Signals(signum).name, EXIT_RESUMABLE)

    def setup(self) -> None:
        self.env = dist.init()   # inside run()'s session: the group is up (or one rank)
        self.log = log.setup(self.recipe.run.log_level, self.spec.out, progress_s=self.recipe.run.progress_s)
        if self.recipe.run.threads:
            torch.set_num_threads(self.recipe.run.threads)
        self.device = dist.device()
        self.accum = zero.accumulation(self.cfg.global_batch, self.recipe.data.batch_size, self.env.world_size)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        if stages.early_stop_request():   # asked to stop while starting: stop at the first agreed point
            self._stop = True
        self.spec.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.spec.out / "checkpoints"
        self.metrics_path = self.spec.out / "metrics.jsonl"
        self.processor = load_processor(self.spec.model.path)
        self.featurizer = Featurizer(self.processor, self.recipe.data)
        self.vocab = len(self.featurizer.builder.tokenizer)
        self._seed_all(self.recipe.run.seed)
        self._setup_teacher_checks()
        self.stream = self._stream(self.recipe.data.train_split, shuffle=None)
        self.dev_split = self.recipe.data.dev_split if self._has_split(self.recipe.data.dev_split) else ""
        self._plan_zero()
        self._setup_model()
        self._setup_engine()
        self.resumed_from = self._maybe_resume()

    def _seed_all(self, seed: int) -> None:
        random.seed(seed + self.env.rank)
        np.random.seed(seed + self.env.rank)
        torch.manual_seed(seed)  # same init of new weights (LoRA A) on every rank

    def _has_split(self, split: str) -> bool:
        meta_path = Path(self.recipe.data.shards) / "meta.json"
        if not split or not meta_path.exists():
            return False
        with open(meta_path, encoding="utf-8") as f:
            return any(s.get("split") == split for s in json.load(f).get("shards", []))

    def _stream(self, split: str, shuffle: bool | None, dev: bool = False) -> Any:
        data = self.recipe.data if shuffle is None else replace(self.recipe.data, shuffle=shuffle)
        join = None
        if self.spec.teacher_mode == "cache" and not dev:
            join = joiner(self.spec.cache, seq_kd=bool(getattr(self.cfg, "seq_kd", False)))
        elif self.spec.teacher_mode == "cache" and dev and self.spec.kd:
            join = joiner(self.spec.cache)
        try:
            return Stream(self.recipe.data.shards, split, data, self.featurizer, seed=self.recipe.run.seed, join=join)
        except CacheJoinError:
            if not dev:
                raise
            # the dev split is usually not cached: validation is then CE only
            return Stream(self.recipe.data.shards, split, data, self.featurizer, seed=self.recipe.run.seed)

    def _setup_teacher_checks(self) -> None:
        """Refuse a teacher (or cache) whose vocabulary or tokenizer differs from the student's."""
        self.teacher = None
        self.teacher_head = None
        if self.spec.teacher_mode == "online":
            t_proc = load_processor(self.spec.teacher)
            t_tok = getattr(t_proc, "tokenizer", t_proc)
            s_tok = self.featurizer.builder.tokenizer
            if len(t_tok) != len(s_tok) or fingerprint_tokenizer(t_tok) != fingerprint_tokenizer(s_tok):
                raise TrainError(
                    f"teacher/student vocabulary mismatch: the teacher {self.spec.teacher} has a tokenizer of "
                    f"{len(t_tok)} tokens, the student {self.spec.model.path} one of {len(s_tok)} tokens"
                    f"{' (same size, different tokens)' if len(t_tok) == len(s_tok) else ''}; KD needs the same "
                    f"tokenizer")
        elif self.spec.teacher_mode == "cache":

            check_compatible(read_cache_meta(self.spec.cache), builder=self.featurizer.builder)

    def _plan_zero(self) -> None:
        """Choose the ZeRO stage and fill the DeepSpeed config before the model exists (ZeRO-3 loads
        partitioned); parameter counts come from the model built on the meta device."""

        from ..preflight import train_choice

        # the plan's own rule (stage and gradient checkpointing from the full memory estimate)
        choice, sh = train_choice(self.recipe, self.spec.stage, self.spec.model.path, 0, self.env.world_size,
                                  zero.device_memory_bytes())
        text_cfg = sh.dims
        self.log.info("gradient checkpointing %s (%s: %s)", "on" if choice.checkpointing else "off",
                      f"{self.spec.stage}.gradient_checkpointing={self.cfg.gradient_checkpointing}", choice.reason)
        template = zero.load_template(choice.stage, choice.offload, self.cfg.ds_config, self.spec.stage)
        threshold = getattr(self.cfg, "zero3_persistence_threshold", -1)
        self.ds_config = zero.fill_config(
            template, stage=choice.stage, micro_batch=self.recipe.data.batch_size, accum=self.accum,
            world_size=self.env.world_size, dtype=self.spec.model.dtype, grad_clip=self.cfg.grad_clip,
            offload=choice.offload, hidden_size=int(text_cfg.hidden),
            param_persistence_threshold=threshold if threshold >= 0 else None, on_cpu=self.device.type == "cpu")
        self.zero = choice
        self.zero_init = choice.stage == 3 and os.environ.get("STC_ZERO3_INIT", "1") != "0"

    def _load_student(self) -> Any:
        hf_ds = None
        if self.zero_init:
            from transformers.integrations import HfDeepSpeedConfig

            dist.deepspeed_bootstrap()
            # while alive, from_pretrained builds the model under deepspeed.zero.Init and loads each
            # rank's slices directly (no device_map: the partitions are placed by DeepSpeed)
            hf_ds = HfDeepSpeedConfig(self.ds_config)
            model = load_model(self.spec.model, for_training=True, device=None)
        else:
            model = load_model(self.spec.model, for_training=True,
                               device=None if self.spec.mode == "qlora" else "cpu", run_device=self.device)
        try:
            self.load_counts = zero3_counts(model)           # before deepspeed.initialize: the evidence
            if self.spec.mode in ("lora", "qlora"):
                # the same adapter init whatever the loading path consumed from the RNG
                torch.manual_seed(self.recipe.run.seed)
                model = apply_lora(model, self.spec.lora, gradient_checkpointing=self.zero.checkpointing)
            else:
                # full trains every weight. Said explicitly because the loading path decides otherwise:
                # from_pretrained returns all parameters trainable, but under zero.Init it keeps what the
                # module's __init__ froze (Whisper's embed_positions), which would change the run.
                for prm in model.parameters():
                    prm.requires_grad_(True)
                if self.zero.checkpointing:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        finally:
            del hf_ds   # the teacher (and anything else) loads whole again
        return model

    def _setup_model(self) -> None:
        model = self._load_student()
        rows = _shape(model.get_output_embeddings().weight)[0]
        if rows < self.vocab:
            raise TrainError(f"the model's output layer has {rows} rows, fewer than its tokenizer's {self.vocab} tokens")
        self.out_rows = rows
        self.model = model
        self.head = model.get_output_embeddings()
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_trainable:
            raise TrainError("no trainable parameters")
        if self.spec.teacher_mode == "online":
            teacher = load_model(replace(self.recipe.model, path=self.spec.teacher, quant="none"),
                                 for_training=False, device="cpu", run_device=self.device)
            for p in teacher.parameters():
                p.requires_grad_(False)
            t_rows = _shape(teacher.get_output_embeddings().weight)[0]
            if t_rows < self.vocab:
                raise TrainError(f"teacher/student vocabulary mismatch: the teacher's output layer has {t_rows} rows "
                                 f"for a {self.vocab}-token tokenizer")
            self.teacher = teacher.to(self.device).eval()
            self.teacher_head = self.teacher.get_output_embeddings()
        if self.device.type == "cuda" and self.spec.mode != "qlora" and not self.zero_init:
            self.model.to(self.device)
        _ = torch

    def _setup_engine(self) -> None:
        import deepspeed

        n_params = sum(_numel(p) for p in self.model.parameters())
        n_train = sum(_numel(p) for _, p in self.named_trainable)
        ds, choice = self.ds_config, self.zero
        params = [p for _, p in self.named_trainable]
        # by the full shape: a weight loaded under zero.Init is a 1-D slice locally
        decay = [p for p in params if len(_shape(p)) >= 2]
        no_decay = [p for p in params if len(_shape(p)) < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
        self.total_steps = self._plan_total_steps()
        sched = lambda s: lr_factor(s, total=self.total_steps, warmup=self.cfg.warmup_steps,  # noqa: E731
                                    schedule=self.cfg.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sched)
        dist.deepspeed_bootstrap()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds,
            model_parameters=params, dist_init_required=True)
        self.log.info("ZeRO-%d%s%s (%s); %d trainable of %d params; micro %d x %d ranks x accum %d = %d",
                      choice.stage, " + offload" if choice.offload else "",
                      ", loaded partitioned (zero.Init)" if self.zero_init else "", choice.reason, n_train, n_params,
                      self.recipe.data.batch_size, self.env.world_size, self.accum, self.cfg.global_batch)

    def _plan_total_steps(self) -> int:
        per_epoch = math.ceil(len(self.stream) / self.accum)
        total = max(1, math.ceil(self.cfg.epochs * per_epoch))
        cap = int(getattr(self.cfg, "max_steps", 0) or 0)
        if cap > 0 and cap < per_epoch and getattr(self.cfg, "seq_kd", False) and hasattr(self, "log"):
            # the stream shuffles whole shards: a run shorter than one epoch reads a few shards, which may hold
            # none (or only) of the teacher's translations
            self.log.warning("distill.max_steps=%d covers %.0f%% of one epoch of %d samples (references and teacher "
                             "translations); the stream shuffles whole shards (%d here), so the teacher translations "
                             "may be under- or over-represented: build smaller shards (shards.samples_per_shard) or "
                             "train at least one epoch", cap, 100.0 * cap / per_epoch, len(self.stream),
                             len(getattr(self.stream, "shards", ()) or ()))
        return min(total, cap) if cap > 0 else total

    # ------------------------------------------------------------------ resume
    def _maybe_resume(self) -> Path | None:
        self.identity = run_identity(self.recipe, self.spec)
        where = str(getattr(self.cfg, "resume", "auto") or "auto")
        if where == "never":
            return None
        if where == "auto":
            found = checkpoint.list_checkpoints(self.ckpt_root)
            if not found:
                return None
            ckpt = found[-1][1]
        else:
            p = Path(where)
            found = checkpoint.list_checkpoints(p) if not (p / "state.json").exists() else [(0, p)]
            if not found:
                raise TrainError(f"resume={where}: no finished checkpoint there (a directory with state.json and "
                                 f"meta.json, or a checkpoints/ directory holding some)")
            ckpt = found[-1][1]
        state = checkpoint.read_state(ckpt)
        diffs = identity_diff(state.get("identity", {}), self.identity)
        if diffs:
            raise TrainError(f"checkpoint {ckpt} belongs to another run or config; refusing to resume it:\n  - "
                             + "\n  - ".join(diffs) + f"\n(start in a new out directory, or resume=never)")
        state = checkpoint.load(ckpt, engine=self.engine, named_trainable=self.named_trainable)
        self.step = int(state["step"])
        self.total_steps = int(state["total_steps"])
        self.device_seconds = float(state.get("device_seconds", 0.0))
        sch = state.get("scheduler")
        if sch:
            self.scheduler.load_state_dict(dict(sch, lr_lambdas=[None] * len(self.scheduler.lr_lambdas)))
            # load_state_dict restores the counters, not the lr the optimizer will use next
            for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
        self.stream.load_state_dict(state["stream"])
        self.log.info("resumed %s at step %d (written by %d rank(s), now %d)", ckpt, self.step,
                      state.get("world_size", 0), self.env.world_size)
        return ckpt

    # ------------------------------------------------------------------ batches
    def _windows(self) -> Iterator[list[dict]]:
        """Optimizer-step windows of ``accum`` micro batches; the last window of an epoch may be shorter
        (the same on every rank: all ranks have the same number of batches per epoch)."""
        while True:
            window: list[dict] = []
            it = iter(self.stream)
            for b in it:
                window.append(b)
                if len(window) == self.accum:
                    yield window
                    window = []
            if window:
                yield window

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.spec.model.dtype]
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device)
                if k in AUDIO_KEYS and v.is_floating_point():   # audio features run in the model's dtype
                    v = v.to(dtype)
            out[k] = v
        return out

    def _forward(self, module: Any, head: Any, batch: Mapping[str, Any]) -> Any:
        """Logits at the label rows only, [N, V] (see :func:`head_at_label_rows`)."""
        inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
        with head_at_label_rows(head, batch["labels"]):
            return module(**inputs).logits

    def _with_teacher(self, batch: dict) -> dict:
        if self.spec.teacher_mode != "online" or not self.spec.kd:
            return batch
        with torch.no_grad():
            t_logits = self._forward(self.teacher, self.teacher_head, batch)
        batch.update(topk_targets(t_logits, batch["labels"], self.recipe.cache.k, self.vocab))
        return batch

    # ------------------------------------------------------------------ step
    def train_step(self, window: list[dict]) -> dict[str, Any]:
        """One optimizer step over this rank's micro batches (all ranks call it with equally long windows)."""
        t0 = time.perf_counter()
        n_local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in window)
        tokens_local = sum(int(b["attention_mask"].sum()) for b in window)
        counts = dist.all_reduce_sum(torch.tensor([n_local, tokens_local], dtype=torch.float64))
        n_global, tokens_global = int(counts[0]), int(counts[1])
        if n_global == 0:
            keys = dist.all_gather_object([k for b in window for k in b["keys"]])
            raise TrainError(f"step {self.step + 1}: empty batch, no label tokens on any rank "
                             f"(keys {[k for ks in keys for k in ks]}); check the shards' translations")
        w = self.env.world_size
        sums = torch.zeros(2, dtype=torch.float64)
        finite = True
        for i, raw in enumerate(window):
            batch = self._with_teacher(self._to_device(raw))
            self.engine.set_gradient_accumulation_boundary(i == len(window) - 1)
            logits = self._forward(self.engine, self.head, batch)
            ce, kd, _ = micro_loss_sums(logits, batch, kd=self.spec.kd, kd_kind=getattr(self.cfg, "kd", "forward_kl"),
                                        temperature=getattr(self.cfg, "temperature", 1.0))
            kd_w = getattr(self.cfg, "kd_weight", 0.0) if self.spec.kd else 0.0
            loss = (ce + kd_w * kd) * (w / n_global)
            finite = finite and bool(torch.isfinite(loss.detach()).item())
            self.engine.backward(loss, scale_wrt_gas=False)
            sums += torch.tensor([float(ce.detach()), float(kd.detach())], dtype=torch.float64)
        if dist.any_flag(not finite):
            keys = dist.all_gather_object([k for b in window for k in b["keys"]])
            raise TrainError(f"step {self.step + 1}: loss is NaN/inf; batch keys {[k for ks in keys for k in ks]}. "
                             f"Lower the lr, check these samples, or use fp32/bf16 instead of fp16")
        lr = self.scheduler.get_last_lr()[0]
        self.engine.step()
        sums = dist.all_reduce_sum(sums)
        self.step += 1
        dt = time.perf_counter() - t0
        self.device_seconds += dt * w
        ce_m, kd_m = float(sums[0]) / n_global, float(sums[1]) / n_global
        kd_w = getattr(self.cfg, "kd_weight", 0.0) if self.spec.kd else 0.0
        keys = dist.all_gather_object([k for b in window for k, p in zip(b["keys"], b["pad"]) if not p])
        return {"step": self.step, "epoch": self.stream.epoch, "loss": ce_m + kd_w * kd_m, "ce": ce_m,
                "kd": kd_m if self.spec.kd else None, "lr": lr, "label_tokens": n_global,
                "tokens_per_s": tokens_global / dt if dt > 0 else None, "step_s": dt,
                "peak_mem_bytes": max(dist.all_gather_object(_peak_mem_bytes())),
                "device_hours": self.device_seconds / 3600.0, "keys": [k for ks in keys for k in ks]}

    # ------------------------------------------------------------------ validation
    def preflight(self) -> None:
        """Two validation batches and a shape check before the first step (fail in seconds, not hours)."""
        split = self.dev_split or self.recipe.data.train_split
        s = self._stream(split, shuffle=False, dev=bool(self.dev_split))
        seen = 0
        self.engine.eval()
        with torch.no_grad():
            for raw in s:
                b = self._with_teacher(self._to_device(raw))
                bsz, t = b["input_ids"].shape
                if b["labels"].shape != b["input_ids"].shape:
                    raise TrainError(f"preflight: labels {tuple(b['labels'].shape)} vs input_ids {bsz}x{t}")
                logits = self._forward(self.engine, self.head, b)
                n_rows = int((b["labels"][:, 1:] != IGNORE).sum())
                if logits.ndim != 2 or logits.shape[0] != n_rows or logits.shape[-1] < self.vocab:
                    raise TrainError(f"preflight: logits {tuple(logits.shape)} for {n_rows} label tokens of input "
                                     f"{bsz}x{t} with a {self.vocab}-token vocabulary")
                if self.spec.kd and "kd_ids" in b and tuple(b["kd_ids"].shape[:2]) != (bsz, t):
                    raise TrainError(f"preflight: kd_ids {tuple(b['kd_ids'].shape)} not aligned with labels {bsz}x{t}")
                ce, kd, n = micro_loss_sums(logits, b, kd=self.spec.kd and "kd_ids" in b,
                                            kd_kind=getattr(self.cfg, "kd", "forward_kl"),
                                            temperature=getattr(self.cfg, "temperature", 1.0))
                if not (math.isfinite(float(ce)) and math.isfinite(float(kd))):
                    raise TrainError(f"preflight: non-finite loss on batch keys {b['keys']}")
                seen += 1
                if seen == 2:
                    break
        self.engine.train()

    def validate(self) -> dict[str, Any]:
        """Mean CE per label token over the dev split (all ranks, global token count)."""
        if not self.dev_split:
            return {}
        s = self._stream(self.dev_split, shuffle=False, dev=True)
        sums = torch.zeros(2, dtype=torch.float64)
        self.engine.eval()
        with torch.no_grad():
            for raw in s:
                b = self._to_device(raw)
                ce, _, n = micro_loss_sums(self._forward(self.engine, self.head, b), b, kd=False, kd_kind="forward_kl",
                                           temperature=1.0)
                sums += torch.tensor([float(ce), float(n)], dtype=torch.float64)
        self.engine.train()
        sums = dist.all_reduce_sum(sums)
        return {"dev_ce": float(sums[0] / sums[1]) if sums[1] > 0 else None, "dev_tokens": int(sums[1])}

    # ------------------------------------------------------------------ outputs
    def _meta_common(self) -> dict[str, Any]:
        return {"fingerprints": {"model": fingerprint_model(self.spec.model.path),
                                 "tokenizer": fingerprint_tokenizer(self.spec.model.path)}}

    def save_checkpoint(self, reason: str) -> Path | None:
        state = {"identity": self.identity, "total_steps": self.total_steps, "device_seconds": self.device_seconds,
                 "optimizer_steps": checkpoint.optimizer_step_count(self.engine),
                 "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                 "stream": self.stream.state_dict(), "reason": reason, "zero_stage": self.zero.stage,
                 "accum": self.accum, "micro_batch": self.recipe.data.batch_size}
        meta = build_meta("checkpoint", config=self.recipe, **self._meta_common(), stage=self.spec.stage,
                          step=self.step, reason=reason)
        path = checkpoint.save(self.ckpt_root, engine=self.engine, named_trainable=self.named_trainable,
                               step=self.step, state=state, meta=meta, keep_last=self.cfg.keep_last)
        if path is not None:
            self._metric({"event": "checkpoint", "step": self.step, "path": str(path), "reason": reason})
        return path

    def save_final(self) -> Path:
        """``<out>/final``: the trained HF model (full) or the adapter (LoRA/QLoRA) + processor + meta."""
        final = self.spec.out / "final"
        if self.zero.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()  # gathers to rank 0 only
        else:
            sd = self.engine.module.state_dict() if dist.is_main() else None
        if dist.is_main():
            tmp = final.with_name(f"final.tmp-{os.getpid()}")

            shutil.rmtree(tmp, ignore_errors=True)
            module = self.engine.module
            if self.spec.mode == "full":
                sd = {k: v.detach().cpu() for k, v in sd.items()}
                module.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            else:
                from peft import get_peft_model_state_dict

                adapter = get_peft_model_state_dict(module, state_dict={k: v.detach().cpu() for k, v in sd.items()})
                module.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
            self.processor.save_pretrained(tmp)
            save_resolved(self.recipe, tmp)
            fps = self._meta_common()["fingerprints"]
            if self.spec.mode == "full":
                fps["model"] = fingerprint_model(tmp)
            write_meta(tmp, build_meta("model", fingerprints=fps, config=self.recipe, stage=self.spec.stage,
                                       trained={"mode": self.spec.mode, "steps": self.step,
                                                "zero_stage": self.zero.stage, "base": str(Path(self.spec.model.path).resolve()),
                                                "base_quant": self.spec.model.quant,
                                                "adapter": self.spec.mode != "full"},
                                       provenance=dist.provenance()))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        dist.barrier()
        _ = torch
        return final

    def _metric(self, rec: Mapping[str, Any]) -> None:
        if dist.is_main():
            append_jsonl(self.metrics_path, dict(rec, time=time.time()))

    # ------------------------------------------------------------------ loop
    def train(self) -> int:
        if dist.is_main():
            save_resolved(self.recipe, self.spec.out)
        self.preflight()
        # ZeRO-3 evidence for tests and users: how many parameters hold only a slice locally, now and as
        # loaded (before deepspeed.initialize; all zero without zero.Init).
        z3 = zero3_counts(self.engine.module)
        self._metric({"event": "start", "step": self.step, "world_size": self.env.world_size, "accum": self.accum,
                      **{f"zero3_{k}": v for k, v in z3.items()}, "zero3_init": self.zero_init,
                      **{f"zero3_load_{k}": v for k, v in self.load_counts.items()},
                      "zero_stage": self.zero.stage, "offload": self.zero.offload, "zero_reason": self.zero.reason,
                      "total_steps": self.total_steps, "resumed_from": str(self.resumed_from or "")})
        windows = self._windows()
        with log.progress() as prog:
            bar = prog.task(self.spec.stage, total=self.total_steps, unit="steps", completed=self.step)
            while self.step < self.total_steps:
                m = self.train_step(next(windows))
                self._metric(m)
                bar.update(completed=self.step, loss=round(m["loss"], 4),
                           kd=None if m["kd"] is None else round(m["kd"], 4), lr=m["lr"],
                           **{"tok/s": m["tokens_per_s"]})
                if self._signal_at is not None and (self.step, self.env.rank) == self._signal_at[:2]:
                    os.kill(os.getpid(), self._signal_at[2])
                stop = dist.any_flag(self._stop)
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    ev = self.validate()
                    self._metric({"event": "eval", "step": self.step, **ev})
                    self.log.info(f"step {self.step}: dev CE {ev.get('dev_ce')}")
                if stop:
                    self.save_checkpoint("signal")
                    self._metric({"event": "stopped", "step": self.step, "exit": EXIT_RESUMABLE})
                    self.log.info(f"stopped at step {self.step} after a checkpoint; rerun the same command to resume")
                    return EXIT_RESUMABLE
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint("periodic")
        self.save_checkpoint("final")
        self.save_final()
        self._metric({"event": "done", "step": self.step, "device_hours": self.device_seconds / 3600.0})
        return EXIT_OK

    def close(self) -> None:
        dist.barrier()


def check_batch(recipe: Recipe, stage: str, world_size: int) -> int:
    """The accumulation for ``world_size`` ranks, or :class:`TrainConfigError` naming the key and the fix
    (checked before the process group starts, so a job refuses before it waits for its peers)."""
    c = getattr(recipe, stage)
    try:
        return zero.accumulation(c.global_batch, recipe.data.batch_size, world_size)
    except TrainConfigError as e:
        raise TrainConfigError(f"{stage}.global_batch: {e}") from None


def run(recipe: Recipe, stage: str) -> int:
    """``stc finetune`` / ``stc distill``: returns EXIT_OK (finished) or EXIT_RESUMABLE (stopped on request)."""
    resolve_spec(recipe, stage)
    check_batch(recipe, stage, dist.detect().world_size)
    with dist.session():
        t = Trainer(recipe, stage)
        t.setup()
        code = t.train()
        t.close()
        return code


def dry_run(recipe: Recipe, stage: str) -> dict[str, Any]:
    """What ``stc finetune|distill`` would do, checked without loading weights or starting ranks."""
    spec = resolve_spec(recipe, stage)
    world = dist.detect().world_size
    accum = check_batch(recipe, stage, world)
    check_model_dir(spec.model.path)
    data_fingerprint(recipe.data.shards)
    if spec.teacher_mode == "cache":
        check_compatible(read_cache_meta(spec.cache))
    from ..preflight import train_choice

    device_bytes = recipe.run.device_memory_gb * 2**30 if recipe.run.device_memory_gb > 0 else \
        zero.device_memory_bytes()
    choice, sh = train_choice(recipe, stage, spec.model.path, 0, world, device_bytes)
    n_all, n_train = sh.params, sh.trainable
    ckpts = checkpoint.list_checkpoints(spec.out / "checkpoints")
    plan = {"stage": stage, "model": spec.model.path, "mode": spec.mode, "params": n_all, "trainable": n_train,
            "world_size": world, "accumulation": accum, "zero_stage": choice.stage, "offload": choice.offload,
            "gradient_checkpointing": choice.checkpointing, "zero_reason": choice.reason, "out": str(spec.out),
            "resume_from": str(ckpts[-1][1]) if ckpts and spec.cfg.resume == "auto" else None}
    print(f"{stage} (dry run): {spec.mode} on {spec.model.path} ({n_train:,} of {n_all:,} parameters "
          f"trainable); {world} rank(s) x micro {recipe.data.batch_size} x accumulation {accum} = global "
          f"{spec.cfg.global_batch}; ZeRO-{choice.stage}{' + offload' if choice.offload else ''}, gradient "
          f"checkpointing {'on' if choice.checkpointing else 'off'} ({choice.reason}); teacher: {spec.teacher_mode}; "
          f"out {spec.out}"
          + (f"; would resume {plan['resume_from']}" if plan["resume_from"] else ""))
    return plan


def main(recipe: Recipe, args: Any) -> int:
    if getattr(args, "dry_run", False):
        dry_run(recipe, args.stage)
        return EXIT_OK
    return run(recipe, args.stage)
