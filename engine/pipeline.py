"""The plan: the paper's chain as steps, validated whole, run locally or handed to SLURM.

:func:`build_plan` is the only chain in the engine. ``stc pipeline`` runs its steps here, one process
each; ``stc submit pipeline`` (``launchers/slurm.py``) submits the same steps, with the same command
lines, as jobs whose ``afterok`` dependencies are the steps' input edges. Both validate the whole plan
first (:func:`check`, :mod:`engine.preflight`) and skip finished steps by the same rule (:func:`states`).

The steps::

    [shards]            stc shards build, when shards.manifest is set (its output is data.shards)
    [finetune]          teacher fine-tune (pipeline.finetune=true; the teacher is then <run>/teacher/final)
    [export-teacher]    finetune.mode=lora: the adapter merged into whole weights (<run>/teacher-merged)
    eval-teacher        the teacher on the test split
    eval-teacher-shuffled  the same with audio shuffled across samples (pipeline.shuffle_check): a
                        model that translates as well without its own audio is not listening
    importance          iterative layer ranking on the dev split, removing the largest pipeline.students count
    cache               teacher top-k logits + translations of the train split, built once
    per fraction r of pipeline.students (name: round(100 r)):
      prune-R           the first round(r L) layers of the ranking's removal order (prune.count)
      distill-kd-R      the recipe's healing: CE + cached word-level KD (+ sequence-level KD when distill.seq_kd)
      export-kd-R       merge the adapter, quantise (export.quant)
      eval-kd-R
      export-kd-R-L, eval-kd-R-L   the same student stored with the size levers L of pipeline.storage
                        (trim: vocabulary trimmed; lm_head: lm_head quantised too; int8; bf16): the
                        report's frontier of quality against bytes on disk
    more healings of the first fraction (pipeline.variants), each distill/export/eval like kd-R:
      kdword-R          CE + word-level KD only;   seqkd-R   CE + sequence-level KD only
    prune -> heal -> prune (pipeline.progressive), for every fraction after the first, from the healed
    student of the fraction before it (kd of the first fraction, then loop-R):
      merge-R           the previous healed student merged into whole weights (export, no quantisation)
      importance-loop-R the importance scan on it, removing the layers still missing to reach R
      prune-loop-R, distill-loop-R, export-loop-R, eval-loop-R   (healed like kd-R, the same teacher cache;
                        the report compares loop-R with kd-R: in steps against at once)
      distill-kd-R-xN, export-kd-R-xN, eval-kd-R-xN   prune-R's student healed N times as long (distill.epochs
                        and max_steps x N), N the healings loop-R had in all: in steps against at once at
                        equal healing steps
    audio-encoder pruning of the first fraction (pipeline.audio, audio-language models):
      importance-audio  the iterative scan of the teacher's audio-encoder layers (importance.component=audio)
      prune-R-aQ        the decoder layers of prune-R and the first round(Q x encoder layers) of that scan
      distill-kd-R-aQ, export-kd-R-aQ, eval-kd-R-aQ   healed like kd-R; the report compares it with kd-R
                        and with the decoder-only student nearest to it in bytes on disk
    importance-S        a cheap scorer S of pipeline.scorers, oneshot: its ranking is compared in the report
    ablations of the first fraction (pipeline.ablations):
      eval-pruned-R     the pruned student before healing
      distill-ce-R, export-ce-R, eval-ce-R        healed with CE only (no cache read)
      importance-middle-R, prune-middle-R, distill-middle-R, export-middle-R, eval-middle-R
                        the same number of layers removed as one contiguous middle block
    report              `stc report` over every evaluated system

**One step = one process**: ``python -m engine.cli [run --nproc N] <stage> --config
<run>/pipeline/config.yaml <overrides>``. A crash, a leaked CUDA context or DeepSpeed's global state
cannot reach the next step, and every step is a command a user can copy and rerun by hand. The
overrides only place the step's inputs and outputs (``<run.out_dir>/students/r25/...``) and set what
makes an ablation an ablation; everything else comes from the one resolved config. Output directories
and finished markers come from the stage registry (:mod:`engine.stages`).

**Done, stale, skipped.** A step is done when its outputs hold the stage's finished marker and, where
that marker's ``meta.json`` records the resolved config, the keys that change the result equal this
run's (a key the record lacks, added to the engine since, counts as its default). Not compared:
operational keys (batch sizes, checkpoint cadence, ...), where things are (output dirs and input paths:
a run moved to another disk, or shards staged to node-local disk, stays done),
and what the stages check themselves. What the paths point to is compared instead: the pipeline
records the fingerprints of its external inputs (model.path, data.shards) in ``pipeline.json`` and a
change makes every step that reads them stale. A step whose producer still has to run is not done
either. A **stale** step's old outputs are moved aside (``<out>.stale-<time>``) before it runs again, so
a trainer never resumes a checkpoint of another config; the same holds for an unfinished output left by
a run of another config (the pipeline notes each step's config under ``pipeline/steps/`` before running
it). A step that exits 75 (stopped on request, checkpointed) stops the pipeline with 75; any other
failure stops it with one line saying which step failed and why (the step's own error line), plus the
log. Logs: ``<run>/pipeline/logs/<step>.log``; status: ``<run>/pipeline/pipeline.json``.

**Side by side.** ``pipeline.jobs`` (``--jobs``) > 1 runs independent steps at once locally, as SLURM
runs them as parallel jobs: a step starts when the steps it reads from have finished; with GPUs, each
running step gets its own (``CUDA_VISIBLE_DEVICES``), a multi-rank step ``--nproc`` of them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from . import config as cfg
from . import dist, lock, log, preflight, stages
from .errors import EXIT_FAIL, EXIT_OK, EXIT_RESUMABLE, EXIT_USAGE, ProblemsError, UsageError
from .io import atomic_write_json
from .meta import MetaError, fingerprint_model
from .models import families

PIPELINE_DIR = "pipeline"
STATUS_NAME = "pipeline.json"
CONFIG_NAME = "config.yaml"
STEPS_DIR = "steps"          # <run>/pipeline/steps/<step>.json: what each step runs with, where it writes

# Keys that do not change a stage's result: a rerun with another value keeps the step done.
# (Micro batch sizes: losses are normalised over the global batch.)
_OPERATIONAL = {"out", "resume", "save_every", "keep_last", "eval_every", "zero_stage", "ds_config", "offload",
                "gradient_checkpointing", "zero3", "zero3_persistence_threshold", "batch_size", "decode_batch_size",
                "num_workers", "log_level", "threads", "device", "progress_s", "device_memory_gb",
                "interconnect_gbps"}
# Keys that say where an input is: compared by content (the external inputs' fingerprints; producers'
# reruns), never by path.
PATH_KEYS = {"model.path", "data.shards", "shards.manifest", "cache.teacher", "distill.student", "distill.cache",
             "prune.ranking", "prune.audio_ranking", "export.source", "evaluate.models", "finetune.ds_config",
             "distill.ds_config"}
# Sections of the resolved config whose (non-operational) keys decide whether a stage output is current.
_COMPARED = {"shards build": ("shards",), "finetune": ("model", "data", "finetune"),
             "importance": ("model", "data", "importance"), "prune": ("model", "prune"),
             "cache build": ("model", "data", "cache"), "distill": ("model", "data", "distill"),
             "export": ("model", "export")}


class PipelineError(ProblemsError, UsageError):
    """The plan cannot run as asked; every problem on its own line (exit 2: nothing ran)."""

    def __init__(self, problems: Sequence[str] | str):
        super().__init__(problems, head="cannot run the pipeline")


@dataclass(frozen=True)
class Input:
    """A file a step reads that must exist before it starts."""
    path: Path
    made_by: str = ""        # the step that writes it ("" : it comes from outside the pipeline)
    what: str = ""           # how the user names it (e.g. "model.path")


@dataclass(frozen=True)
class Step:
    name: str
    stage: str                          # registry name: "prune", "cache build", ...
    overrides: tuple[str, ...]          # section.key=value, after --config
    out: Path                           # the step's output (from the registry, for the step's config)
    marker: Path                        # the file whose presence means done (the stage writes it last)
    inputs: tuple[Input, ...] = ()
    system: Mapping[str, Any] | None = None   # evaluate steps: what the report says of it (name, label, ...)
    removed: int = 0                    # decoder layers its model lacks (shapes for validation)
    audio_removed: int = 0              # audio-encoder layers its model lacks (sizes for validation)

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i.made_by for i in self.inputs if i.made_by))

    @property
    def many_ranks(self) -> bool:
        return stages.get(self.stage).ranks == "many"


@dataclass
class Plan:
    steps: list[Step]
    run_dir: Path
    config_path: Path                   # the resolved config every step reads
    recipe: cfg.Recipe
    tree: dict                          # the resolved config as data (what config_path holds)
    nproc: int = 1                      # ranks of a multi-rank step (local: --nproc; SLURM: nodes x tasks)
    jobs: int = 1                       # local runs: steps at once (independent ones; GPUs split between them)
    problems: list[str] = field(default_factory=list)
    selected: tuple[str, ...] = ()      # --stages: the steps to run ("" : all)

    @property
    def status_path(self) -> Path:
        return self.run_dir / PIPELINE_DIR / STATUS_NAME

    def log_path(self, step: Step) -> Path:
        return self.run_dir / PIPELINE_DIR / "logs" / f"{step.name}.log"

    def step_record(self, step: Step) -> Path:
        return self.run_dir / PIPELINE_DIR / STEPS_DIR / f"{step.name}.json"

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def ranks(self, step: Step) -> int:
        return self.nproc if step.many_ranks else 1

    def recipe_of(self, step: Step) -> cfg.Recipe:
        return cfg.resolve(self.tree, list(step.overrides))

    @property
    def active(self) -> list[Step]:
        """The steps to run (all, or those --stages selects), in plan order."""
        return [s for s in self.steps if not self.selected or s.name in self.selected]


# ============================================================================================ the plan

def pct(r: float) -> int:
    return int(round(100 * r))


def layer_count(r: float, n_layers: int) -> int:
    """Layers removed for fraction ``r``: the rounding `stc importance` uses for a fraction."""
    return max(1, int(round(r * n_layers)))


def read_config_json(model_dir: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def audio_layers(model_dir: str | os.PathLike) -> int | None:
    """The audio encoder's layer count from ``config.json`` (None: no audio encoder, or no config)."""
    c = read_config_json(model_dir)
    if c is None:
        return None
    try:
        return families.detect(c, str(model_dir)).audio_layer_count_of(c)
    except Exception:    # an unknown architecture: the stages name it when they load the model
        return None


def decoder_layers(model_dir: str | os.PathLike) -> int | None:
    c = read_config_json(model_dir)
    if c is None:
        return None
    n = families.text_config_dict(c).get("num_hidden_layers")
    return n if isinstance(n, int) and n > 0 else None


def _list(values: Sequence[Any]) -> str:
    """A flow list for an override value (quoted: paths and `name=path` entries stay one item)."""
    return json.dumps([str(v) for v in values], separators=(",", ":"))


def build_plan(recipe: cfg.Recipe, *, config_path: Path | None = None, nproc: int | None = None,
               select: str | Sequence[str] | None = None, jobs: int | None = None) -> Plan:
    """The steps for ``recipe`` (pure: reads only model.path/config.json for the layer count).

    ``nproc``: ranks of every multi-rank step (default ``pipeline.nproc``); ``select`` (``--stages``):
    step names, or stage names standing for all their steps; ``jobs``: steps run at once locally
    (default ``pipeline.jobs``)."""
    pc, run = recipe.pipeline, Path(recipe.run.out_dir)
    tree = cfg.to_dict(recipe)
    problems: list[str] = []
    students = list(pc.students)
    if not students:
        problems.append("pipeline.students is empty: give the fractions of decoder layers to remove, e.g. [0.25, 0.5]")
    bad = [r for r in students if not 0 < r < 1]
    if bad:
        problems.append(f"pipeline.students: fractions must be in (0, 1), got {bad}")
    if len({pct(r) for r in students}) != len(students):
        problems.append(f"pipeline.students: {students} name the same student twice (names use round(100 r))")
    n_proc = pc.nproc if nproc is None else nproc
    if n_proc < 1:
        problems.append(f"pipeline.nproc (--nproc): must be >= 1, got {n_proc}")
    if recipe.importance.component != "decoder":
        problems.append(f"importance.component={recipe.importance.component}: the pipeline's students are fractions "
                        "of the decoder layers (importance ranks them); to prune the audio encoder too, list fractions "
                        "of its layers in pipeline.audio (e.g. [0.25]: its own scan, student kd-R-a25), and set "
                        "importance.component=decoder")
    if pc.finetune and recipe.finetune.mode == "qlora":
        problems.append("pipeline.finetune=true with finetune.mode=qlora: the teacher would be merged into 4-bit "
                        "weights; fine-tune it with finetune.mode=full or lora (a LoRA teacher is merged into "
                        "whole weights by an export step)")

    def make(name: str, stage: str, ovs: Sequence[str], inputs: Sequence[Input] = (), *,
             system: Mapping[str, Any] | None = None, removed: int = 0, audio_removed: int = 0) -> Step:
        """A step whose output and marker come from the registry, for the step's own config."""
        try:
            r = cfg.resolve(tree, list(ovs))
            out = stages.outputs(stage, r)[0]
            marker = stages.markers(stage, r)[0]
        except cfg.ConfigError as e:
            problems.extend(f"step {name}: {p}" for p in e.problems)
            out = marker = run / name
        return Step(name, stage, tuple(ovs), out, marker, tuple(inputs), system, removed, audio_removed)

    model_path = Path(recipe.model.path) if recipe.model.path else Path("<model.path is empty>")
    n_layers = decoder_layers(model_path) or 0
    ext_model = Input(model_path / "config.json", "", "model.path")
    shards_dir = Path(recipe.data.shards or "<data.shards is empty>")
    steps: list[Step] = []
    if recipe.shards.manifest:
        if stages.out_dir("shards build", recipe).absolute() != shards_dir.absolute():
            problems.append(f"shards.out ({stages.out_dir('shards build', recipe)}) is not data.shards "
                            f"({recipe.data.shards}): the plan builds the shards the other steps read; set both "
                            f"to the same directory (or clear shards.manifest and build them yourself)")
        steps.append(make("shards", "shards build", (f"shards.out={shards_dir}",),
                          (Input(Path(recipe.shards.manifest), "", "shards.manifest"),)))
        ext_data = Input(shards_dir / "meta.json", "shards", "data.shards")
    else:
        ext_data = Input(shards_dir / "meta.json", "", "data.shards")
    if pc.finetune:
        ft = run / "teacher"
        steps.append(make("finetune", "finetune", (f"finetune.out={ft}",), (ext_model, ext_data)))
        teacher = ft / "final"
        t_in = Input(teacher / "meta.json", "finetune", "the fine-tuned teacher")
        if recipe.finetune.mode == "lora":  # fold the adapter into whole weights: every later step loads a plain model
            merged = run / "teacher-merged"
            steps.append(make("export-teacher", "export", (f"export.source={teacher}", f"export.out={merged}",
                                                           "export.quant=none", "export.merge_lora=true",
                                                           "export.trim_vocab=false", "export.max_gb=0"), (t_in,)))
            teacher = merged
            t_in = Input(merged / "meta.json", "export-teacher", "the fine-tuned teacher (adapter merged)")
    else:
        teacher, t_in = model_path, ext_model
    common = (f"model.path={teacher}", f"cache.teacher={teacher}")
    eval_out = run / "eval"
    quant_teacher = recipe.model.quant

    def evaluate(system: str, model: Path, model_in: Input, *, label: str, removal: float, healing: str,
                 quant: str, removed_from: str | list[str] = "", shuffle: bool = False, removed: int = 0,
                 storage: str = "", storage_of: str = "", audio_removal: float = 0.0, audio_of: str = "",
                 audio_removed: int = 0, oneshot: str = "", budget_of: str = "") -> Step:
        ovs = [*common, f"evaluate.out={eval_out}", f"evaluate.models={_list([f'{system}={model}'])}",
               f"evaluate.shuffle_audio={'true' if shuffle else 'false'}"]
        return make(f"eval-{system}", "evaluate", ovs, (model_in, ext_data),
                    system={"name": system, "label": label, "removal": removal, "healing": healing, "quant": quant,
                            "removed_from": removed_from, "model": str(model), "storage": storage,
                            **({"storage_of": storage_of} if storage_of else {}),
                            **({"audio_removal": audio_removal, "audio_of": audio_of} if audio_removal else {}),
                            **({"oneshot": oneshot} if oneshot else {}),
                            **({"budget_of": budget_of} if budget_of else {})},
                    removed=removed, audio_removed=audio_removed)

    steps.append(evaluate("teacher", teacher, t_in, label="teacher", removal=0.0, healing="none",
                          quant=quant_teacher))
    if pc.shuffle_check:
        steps.append(evaluate("teacher-shuffled", teacher, t_in, label="teacher, audio shuffled", removal=0.0,
                              healing="none", quant=quant_teacher, shuffle=True))

    dc = recipe.distill
    kd_label = "CE+KD" if dc.kd_weight <= 0 or not dc.seq_kd else "CE+word KD+seq KD"
    if dc.kd_weight <= 0:
        kd_label = "CE+seq KD" if dc.seq_kd else "CE only"
    elif not dc.seq_kd:
        kd_label = "CE+word KD"
    kd_healing = {"CE+word KD+seq KD": "ce+kd+seq", "CE+word KD": "ce+kd", "CE+seq KD": "ce+seq",
                  "CE only": "ce"}[kd_label]
    variants = {"word": ("kdword", "CE+word KD", "ce+kd"), "seq": ("seqkd", "CE+seq KD", "ce+seq")}
    for v in pc.variants:
        if v not in variants:
            problems.append(f"pipeline.variants: unknown healing {v!r}; choose from {sorted(variants)}")
    levers = {"trim": ("export.trim_vocab=true", "export.trim_languages=[]"),
              "scripts": ("export.trim_vocab=true", f"export.trim_languages={_list(recipe.export.trim_languages)}"),
              "int8": ("export.quant=int8",), "bf16": ("export.quant=none",),
              "lm_head": (f"export.quantize={_list(dict.fromkeys((*recipe.export.quantize, 'lm_head')))}",)}
    storage_ovs: dict[str, tuple[str, ...]] = {}
    for spec in pc.storage:
        parts = [x.strip() for x in str(spec).split("+")]
        bad_l = [x for x in parts if x not in levers]
        if bad_l or not parts:
            problems.append(f"pipeline.storage: {spec!r} has unknown levers {bad_l}; join with '+' levers from "
                            f"{sorted(levers)}")
            continue
        if "int8" in parts and "bf16" in parts:
            problems.append(f"pipeline.storage: {spec!r} asks for int8 and bf16 storage at once")
            continue
        if "trim" in parts and "scripts" in parts:
            problems.append(f"pipeline.storage: {spec!r} asks for two vocabulary trims; trim keeps the train split's "
                            "tokens, scripts also every token of export.trim_languages' scripts: choose one")
            continue
        if "scripts" in parts and not recipe.export.trim_languages:
            problems.append(f"pipeline.storage: {spec!r} trims to the scripts of export.trim_languages, which is "
                            "empty; set it to the run's languages (e.g. export.trim_languages=[en, de])")
            continue
        tag = "-".join(parts)
        if tag in storage_ovs:
            problems.append(f"pipeline.storage: {spec!r} is listed twice")
            continue
        storage_ovs[tag] = tuple(o for x in parts for o in levers[x])
    scorers = ("nll", "block_influence", "task")
    for sc in pc.scorers:
        if sc not in scorers:
            problems.append(f"pipeline.scorers: unknown scorer {sc!r}; choose from {list(scorers)}")
        elif sc == recipe.importance.scorer:
            problems.append(f"pipeline.scorers: {sc!r} is importance.scorer already (the main ranking)")

    counts = {r: layer_count(r, n_layers) if n_layers else 0 for r in students}
    imp = run / "importance"
    steps.append(make("importance", "importance",
                      (*common, f"importance.out={imp}", f"importance.remove={max(counts.values(), default=0)}"),
                      (t_in, ext_data)))
    ranking_cmp = []
    for sc in pc.scorers:
        if sc in scorers and sc != recipe.importance.scorer:
            sdir = run / f"importance-{sc}"
            steps.append(make(f"importance-{sc}", "importance",
                              (*common, f"importance.out={sdir}", f"importance.scorer={sc}", "importance.method=oneshot",
                               f"importance.remove={max(counts.values(), default=0)}", "importance.stop_below=0"),
                              (t_in, ext_data)))
            ranking_cmp.append(f"{sc}={sdir}")
    cache = run / "cache"
    cache_step = make("cache", "cache build", (*common, f"cache.out={cache}"), (t_in, ext_data))

    def student(tag: str, pruned: Path, pruned_by: str, *, healing: str, removed: int,
                audio_removed: int = 0, folder: str = "", extra: Sequence[str] = ()) -> tuple[Step, Step, Path]:
        """Distill + export of one healing: "kd" (the recipe's distill section: CE + word-level KD, + sequence-level
        KD when distill.seq_kd), "ce" (CE only: reads no cache), "word" (CE + word-level KD), "seq" (CE + sequence-
        level KD). The students of one pruned model sit side by side: <students>/r25/{kd,ce,word,seq} (``folder``:
        another name; ``extra``: more distill overrides)."""
        d = pruned.parent / (folder or healing)
        dist_ovs = [*common, f"distill.out={d / 'distill'}", f"distill.student={pruned}", *extra]
        ins = [Input(pruned / "meta.json", pruned_by, "the pruned student"), ext_data]
        if healing == "ce":  # no KD term and no teacher translations, so the trainer reads no cache
            dist_ovs += ["distill.cache=", "distill.kd_weight=0", "distill.seq_kd=false"]
        else:
            dist_ovs += [f"distill.cache={cache}", "distill.teacher_mode=cache"]
            ins.append(Input(cache / "meta.json", "cache", "the teacher cache"))
            if healing == "word":
                dist_ovs += ["distill.seq_kd=false"]
            elif healing == "seq":
                dist_ovs += ["distill.kd_weight=0", "distill.seq_kd=true"]
        dstep = make(f"distill-{tag}", "distill", dist_ovs, ins, removed=removed, audio_removed=audio_removed)
        final = dstep.out / "final"
        exp = d / "export"
        estep = make(f"export-{tag}", "export", (*common, f"export.source={final}", f"export.out={exp}"),
                     (Input(final / "meta.json", dstep.name, "the trained student"),), removed=removed,
                     audio_removed=audio_removed)
        return dstep, estep, exp

    exp_quant = recipe.export.quant
    n_audio = audio_layers(model_path) if pc.audio else None
    audio_counts: dict[float, int] = {}
    if pc.audio:
        bad_a = [q for q in pc.audio if not 0 < q < 1]
        if bad_a:
            problems.append(f"pipeline.audio: fractions of audio-encoder layers must be in (0, 1), got {bad_a}")
        elif len({pct(q) for q in pc.audio}) != len(pc.audio):
            problems.append(f"pipeline.audio: {list(pc.audio)} name the same student twice (names use round(100 q))")
        elif n_audio is None and read_config_json(model_path) is not None:
            problems.append(f"pipeline.audio: {model_path} has no audio encoder (config.json counts no audio-encoder "
                            "layers): audio-encoder pruning needs an audio-language model; clear pipeline.audio")
        elif n_audio:
            audio_counts = {q: max(1, int(round(q * n_audio))) for q in pc.audio}
            over = [q for q, ka in audio_counts.items() if ka >= n_audio]
            if over:
                problems.append(f"pipeline.audio: {over} would remove all {n_audio} audio-encoder layers; give "
                                "smaller fractions")
                audio_counts = {}
    for i, r in enumerate(students):
        p, k = pct(r), counts[r]
        pruned = run / "students" / f"r{p}" / "pruned"
        steps.append(make(f"prune-{p}", "prune", (*common, f"prune.ranking={imp}", f"prune.count={k}",
                                                  "prune.layers=[]", f"prune.out={pruned}"),
                          (t_in, Input(imp / "meta.json", "importance", "the layer ranking")), removed=k))
        if i == 0:
            steps.append(cache_step)
        dstep, estep, exp = student(f"kd-{p}", pruned, f"prune-{p}", healing="kd", removed=k)
        steps += [dstep, estep, evaluate(f"kd-{p}", exp, Input(exp / "meta.json", estep.name, "the exported student"),
                                         label=f"{p}% removed, {kd_label}", removal=r, healing=kd_healing,
                                         quant=exp_quant, removed_from=f"prune-{p}", removed=k)]
        for tag, lever_ovs in storage_ovs.items():
            sexp = exp.parent / f"export-{tag}"
            squant = next((o.split("=", 1)[1] for o in reversed(lever_ovs) if o.startswith("export.quant=")),
                          exp_quant)
            sstep = make(f"export-kd-{p}-{tag}", "export",
                         (*common, f"export.source={dstep.out / 'final'}", f"export.out={sexp}", *lever_ovs),
                         estep.inputs, removed=k)
            steps += [sstep, evaluate(f"kd-{p}-{tag}", sexp,
                                      Input(sexp / "meta.json", sstep.name, "the exported student"),
                                      label=f"{p}% removed, {kd_label}, {tag.replace('-', ' + ')}", removal=r,
                                      healing=kd_healing, quant=squant, removed_from=f"prune-{p}", removed=k,
                                      storage=tag, storage_of=f"kd-{p}")]
        if i == 0 and audio_counts:
            aimp = run / "importance-audio"
            steps.append(make("importance-audio", "importance",
                              (*common, f"importance.out={aimp}", "importance.component=audio",
                               f"importance.remove={max(audio_counts.values())}", "importance.force_remove=[]",
                               "importance.protect=[]", "importance.target_layers=0"), (t_in, ext_data)))
            for q, ka in audio_counts.items():
                tag = f"{p}-a{pct(q)}"
                apruned = run / "students" / f"r{tag}" / "pruned"
                steps.append(make(f"prune-{tag}", "prune",
                                  (*common, f"prune.ranking={imp}", f"prune.count={k}", "prune.layers=[]",
                                   f"prune.audio_ranking={aimp}", f"prune.audio_count={ka}",
                                   "prune.prune_audio_layers=[]", f"prune.out={apruned}"),
                                  (t_in, Input(imp / "meta.json", "importance", "the layer ranking"),
                                   Input(aimp / "meta.json", "importance-audio", "the audio-encoder layer ranking")),
                                  removed=k, audio_removed=ka))
                dstep, estep, aexp = student(f"kd-{tag}", apruned, f"prune-{tag}", healing="kd", removed=k,
                                             audio_removed=ka)
                steps += [dstep, estep,
                          evaluate(f"kd-{tag}", aexp, Input(aexp / "meta.json", estep.name, "the exported student"),
                                   label=f"{p}% of decoder + {pct(q)}% of audio-encoder layers removed, {kd_label}",
                                   removal=r, healing=kd_healing, quant=exp_quant, removed_from=f"prune-{tag}",
                                   removed=k, audio_removal=q, audio_of=f"kd-{p}", audio_removed=ka)]
        for v in (pc.variants if i == 0 else ()):
            if v not in variants:
                continue
            name, label, healing = variants[v]
            dstep, estep, exp = student(f"{name}-{p}", pruned, f"prune-{p}", healing=v, removed=k)
            steps += [dstep, estep,
                      evaluate(f"{name}-{p}", exp, Input(exp / "meta.json", estep.name, "the exported student"),
                               label=f"{p}% removed, {label}", removal=r, healing=healing, quant=exp_quant,
                               removed_from=f"prune-{p}", removed=k)]
        if i == 0 and pc.ablations:
            steps.append(evaluate(f"pruned-{p}", pruned,
                                  Input(pruned / "meta.json", f"prune-{p}", "the pruned student"),
                                  label=f"{p}% removed, no healing", removal=r, healing="none",
                                  quant=recipe.model.quant, removed_from=f"prune-{p}", removed=k))
            dstep, estep, exp = student(f"ce-{p}", pruned, f"prune-{p}", healing="ce", removed=k)
            ce_in = Input(exp / "meta.json", estep.name, "the exported student")
            steps += [dstep, estep, evaluate(f"ce-{p}", exp, ce_in, label=f"{p}% removed, CE only", removal=r,
                                             healing="ce", quant=exp_quant, removed_from=f"prune-{p}", removed=k)]
            mid = run / "students" / f"middle-r{p}"
            mimp = mid / "importance"
            steps.append(make(f"importance-middle-{p}", "importance",
                              (*common, f"importance.out={mimp}", "importance.method=middle_block",
                               f"importance.remove={k}", "importance.force_remove=[]"), (t_in, ext_data)))
            mpruned = mid / "pruned"
            steps.append(make(f"prune-middle-{p}", "prune",
                              (*common, f"prune.ranking={mimp}", f"prune.count={k}", "prune.layers=[]",
                               f"prune.out={mpruned}"),
                              (t_in, Input(mimp / "meta.json", f"importance-middle-{p}", "the middle-block ranking")),
                              removed=k))
            dstep, estep, exp = student(f"middle-{p}", mpruned, f"prune-middle-{p}", healing="kd", removed=k)
            steps += [dstep, estep,
                      evaluate(f"middle-{p}", exp, Input(exp / "meta.json", estep.name, "the exported student"),
                               label=f"{p}% removed as a middle block, {kd_label}", removal=r, healing=kd_healing,
                               quant=exp_quant, removed_from=f"prune-middle-{p}", removed=k)]
    if pc.progressive and len(students) > 1:
        chain = [f"prune-{pct(students[0])}"]
        prev_tag, prev_k = f"kd-{pct(students[0])}", counts[students[0]]
        prev_final = run / "students" / f"r{pct(students[0])}" / "kd" / "distill" / "final"
        for r in students[1:]:
            p, k = pct(r), counts[r]
            if k <= prev_k:
                problems.append(f"pipeline.progressive: fraction {r} removes {k} layers, not more than the "
                                f"{prev_k} of the fraction before it; list pipeline.students in increasing order")
                break
            loop = run / "students" / f"loop-r{p}"
            merged = loop / "from"
            mstep = make(f"merge-{p}", "export", (f"export.source={prev_final}", f"export.out={merged}",
                                                  "export.quant=none", "export.merge_lora=true",
                                                  "export.trim_vocab=false", "export.max_gb=0"),
                         (Input(prev_final / "meta.json", f"distill-{prev_tag}", "the healed student"),),
                         removed=prev_k)
            m_in = Input(merged / "meta.json", mstep.name, f"the healed {prev_tag} student, merged")
            limp = loop / "importance"
            istep = make(f"importance-loop-{p}", "importance",
                         (f"model.path={merged}", f"cache.teacher={teacher}", f"importance.out={limp}",
                          f"importance.remove={k - prev_k}", "importance.force_remove=[]"), (m_in, ext_data),
                         removed=prev_k)
            lpruned = loop / "pruned"
            pstep = make(f"prune-loop-{p}", "prune",
                         (f"model.path={merged}", f"cache.teacher={teacher}", f"prune.ranking={limp}",
                          f"prune.count={k - prev_k}", "prune.layers=[]", f"prune.out={lpruned}"),
                         (m_in, Input(limp / "meta.json", istep.name, "the healed student's layer ranking")),
                         removed=k)
            steps += [mstep, istep, pstep]
            if cache_step not in steps:
                steps.append(cache_step)
            chain.append(pstep.name)
            dstep, estep, exp = student(f"loop-{p}", lpruned, pstep.name, healing="kd", removed=k)
            steps += [dstep, estep,
                      evaluate(f"loop-{p}", exp, Input(exp / "meta.json", estep.name, "the exported student"),
                               label=f"{p}% removed in steps (from {prev_tag}, healed), {kd_label}", removal=r,
                               healing=kd_healing, quant=exp_quant, removed_from=list(chain), removed=k,
                               oneshot=f"kd-{p}")]
            # the same removal at once, healed as long as the loop student was in all (its chain's healings):
            # what the steps buy beyond more training
            times = len(chain)
            budget = [f"distill.epochs={times * dc.epochs:g}"] + \
                ([f"distill.max_steps={times * dc.max_steps}"] if dc.max_steps else [])
            pruned_r = run / "students" / f"r{p}" / "pruned"
            dstep, estep, exp = student(f"kd-{p}-x{times}", pruned_r, f"prune-{p}", healing="kd", removed=k,
                                        folder=f"kd-x{times}", extra=budget)
            steps += [dstep, estep,
                      evaluate(f"kd-{p}-x{times}", exp, Input(exp / "meta.json", estep.name, "the exported student"),
                               label=f"{p}% removed at once, {kd_label}, {times}x the healing (loop-{p}'s budget)",
                               removal=r, healing=kd_healing, quant=exp_quant, removed_from=f"prune-{p}",
                               removed=k, budget_of=f"loop-{p}")]
            prev_tag, prev_k, prev_final = f"loop-{p}", k, dstep.out / "final"
    if pc.report:
        rep = run / "report"
        evals = [s for s in steps if s.stage == "evaluate"]
        steps.append(make("report", "report", (f"evaluate.out={eval_out}", f"report.eval_dir={eval_out}",
                                               f"report.out={rep}", f"report.importance={imp}",
                                               f"report.systems={_list([s.system['name'] for s in evals])}",
                                               f"report.runs={_list([run / PIPELINE_DIR / STEPS_DIR])}",
                                               *([f"report.rankings={_list(ranking_cmp)}"] if ranking_cmp else [])),
                          tuple(Input(s.marker, s.name, f"scores of {s.system['name']}") for s in evals)))
    names = [s.name for s in steps]
    if len(set(names)) != len(names):  # logs and status are keyed by name
        problems.append(f"two steps share a name: {sorted({n for n in names if names.count(n) > 1})}")
    chosen: tuple[str, ...] = ()
    if select:
        wanted = [w.strip() for w in (select.split(",") if isinstance(select, str) else select) if w.strip()]
        for w in wanted:
            hit = [s.name for s in steps if s.name == w or s.stage == w.replace("-", " ") or s.stage == w]
            if not hit:
                problems.append(f"--stages: {w!r} is neither a step nor a stage of this plan; steps: "
                                f"{', '.join(names)}")
            chosen += tuple(h for h in hit if h not in chosen)
        chosen = tuple(n for n in names if n in chosen)
    cp = config_path or run / PIPELINE_DIR / CONFIG_NAME
    n_jobs = pc.jobs if jobs is None else jobs
    if n_jobs < 1:
        problems.append(f"pipeline.jobs (--jobs): must be >= 1, got {n_jobs}")
    return Plan(steps=steps, run_dir=run, config_path=cp, recipe=recipe, tree=tree, nproc=n_proc,
                problems=problems, selected=chosen, jobs=max(1, n_jobs))


# ============================================================================================ checks

def check(plan: Plan, *, data_pending: bool = False) -> list[str]:
    """Every refusal that needs nothing to run: problems as readable lines (empty: good to go).

    Inputs (each produced by an earlier step that runs or is done, or existing), model shapes, the dev
    and test splits, and, per step (:mod:`engine.preflight`), the config its stage would refuse: global
    batch vs micro batch x ranks, a model that fits nowhere. ``data_pending``: ``stc demo`` builds
    the manifest and data.shards before the plan runs, so their absence is not a refusal."""
    problems = list(plan.problems)
    st = states(plan)
    active = {s.name for s in plan.active}
    for s in plan.steps:  # every step's overrides must make a valid config (e.g. a key the engine lacks)
        try:
            plan.recipe_of(s)
        except cfg.ConfigError as e:
            problems += [f"step {s.name}: {p}" for p in e.problems]
    missing: dict[tuple[str, Path], list[str]] = {}
    for s in plan.active:
        if st[s.name] == "done":
            continue      # what a finished step read may be gone (a deleted manifest): it is not read again
        for i in s.inputs:
            if i.made_by and (i.made_by in active or st.get(i.made_by) == "done"):
                continue
            if i.made_by:
                problems.append(f"step {s.name} needs {i.path} ({i.what}), made by step {i.made_by}, which is neither "
                                f"done nor selected (--stages)")
            elif not i.path.exists() and not (data_pending and i.what in ("data.shards", "shards.manifest")) \
                    and i.what != "model.path":
                missing.setdefault((i.what, i.path), []).append(s.name)
    for (what, path), users in missing.items():
        hint = ("; build the shards first with `stc shards build --config ...` (or set shards.manifest so the plan "
                "builds them)" if what == "data.shards" else "")
        where = path.parent if path.name in ("meta.json", "config.json") else path
        steps_txt = ", ".join(users[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
        problems.append(f"{what} {where}: no {path.name} there (needed by step{'s' * (len(users) > 1)} {steps_txt})"
                        f"{hint}")
    if plan.jobs > 1:
        gpus = local_gpus()
        big = [s.name for s in plan.active if gpus is not None and gpus_needed(plan, s) > len(gpus)]
        if big:
            problems.append(f"--jobs {plan.jobs} with {len(gpus or [])} GPU(s) here: step(s) {', '.join(big[:3])} "
                            f"need {plan.nproc} each (--nproc); lower --nproc")
    r = plan.recipe
    if not r.model.path or not (Path(r.model.path) / "config.json").exists():
        first = next((s.name for s in plan.steps if any(i.what == "model.path" for i in s.inputs)), "")
        problems.append(f"model.path {r.model.path or '(empty)'}: no config.json there (needed by step {first}); "
                        f"point model.path at a local Hugging Face model directory"
                        + ("" if r.pipeline.finetune else " (with pipeline.finetune=false it is the teacher)"))
    elif decoder_layers(r.model.path) is None:
        problems.append(f"model.path {r.model.path}: config.json has no num_hidden_layers")
    else:
        n = decoder_layers(r.model.path)
        for f in r.pipeline.students:
            if 0 < f < 1 and layer_count(f, n) >= n - 1:
                problems.append(f"pipeline.students: {f} of {n} decoder layers removes {layer_count(f, n)}, leaving "
                                f"fewer than 2 (the first and last are protected)")
    if r.distill.seq_kd and "teacher" not in r.cache.targets:
        problems.append("distill.seq_kd=true needs the teacher translations: add 'teacher' to cache.targets")
    if not (r.shards.manifest or data_pending or any(w == "data.shards" for w, _ in missing)):
        problems += _split_problems(r)
    if not problems:
        problems += preflight.problems(plan)
    return list(dict.fromkeys(problems))


def _split_problems(r: cfg.Recipe) -> list[str]:
    """The dev split that selects layers must not share samples with the split the systems are scored on."""
    from .data.stream import StreamError
    from .importance import devset as D   # torch: only `stc pipeline` itself needs it, not `stc jobs`

    shards = Path(r.data.shards) if r.data.shards else None
    if shards is None or not (shards / "meta.json").exists():
        return [f"data.shards {r.data.shards or '(empty)'}: no meta.json there (needed by every step); build the "
                f"shards first with `stc shards build --config ...`"]
    out: list[str] = []
    try:
        infos = D.dev_shards(shards, r.data.dev_split)
        refs = D.select_refs(infos, r.importance.max_dev_samples)
        wanted = {(si, i) for si, i in refs}
        keys, srcs = [], []
        for si, info in enumerate(infos):
            for i, (k, js) in enumerate(D._json_members(shards, info)):
                if (si, i) in wanted:
                    keys.append(k)
                    srcs.append(js.get("src_text", ""))
        for test in [r.evaluate.split or r.data.test_split]:
            notes = D.check_disjoint(shards, r.data.dev_split, test, keys, srcs)
            if notes:
                out.append(f"data.shards {shards} has no {test!r} split to evaluate on (evaluate.split / "
                           f"data.test_split); rebuild the shards with a test split")
    except (D.ImportanceError, StreamError) as e:
        out.append(f"dev split {r.data.dev_split!r} (data.dev_split) vs test split "
                   f"{r.evaluate.split or r.data.test_split!r} (evaluate.split): {e}")
    return out


# ============================================================================================ state

def _meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def compared(tree: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The keys of a resolved config that decide whether ``stage``'s output is current."""
    out = {}
    for sec in _COMPARED.get(stage, ()):
        for k, v in (tree.get(sec) or {}).items():
            if k not in _OPERATIONAL and f"{sec}.{k}" not in PATH_KEYS:
                out[f"{sec}.{k}"] = v
    return json.loads(json.dumps(out))


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    """Every key of a default recipe, dotted: what a key that an older engine did not record stands for."""
    tree = json.loads(json.dumps(cfg.to_dict(cfg.Recipe())))
    return {f"{sec}.{k}": v for sec, keys in tree.items() if isinstance(keys, Mapping) for k, v in keys.items()}


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first key whose value differs between a recorded config ``a`` and this run's ``b``. A key that
    only one side records (an engine version added it since) counts as its default there: new keys
    default to the behaviour before them, so upgrading the engine does not make a finished run stale."""
    dflt = _defaults()

    def get(m: Mapping[str, Any], k: str) -> Any:
        return m[k] if k in m else dflt.get(k)

    diff = [k for k in sorted(set(a) | set(b)) if get(a, k) != get(b, k)]
    if not diff:
        return None
    k = diff[0]
    return f"{k} was {get(a, k)!r}, now {get(b, k)!r}" + (f" (+{len(diff) - 1} more)" if len(diff) > 1 else "")


def external_fingerprints(recipe: cfg.Recipe) -> dict[str, str]:
    """What the plan's external inputs hold (model.path, data.shards), by content."""
    out: dict[str, str] = {}
    with_suppress = (OSError, MetaError, json.JSONDecodeError, KeyError)
    try:
        out["model.path"] = fingerprint_model(recipe.model.path)
    except with_suppress:
        pass
    try:
        out["data.shards"] = json.loads((Path(recipe.data.shards) / "meta.json").read_text())["fingerprints"]["data"]
    except with_suppress:
        pass
    return out


def _reads_external(plan: Plan, step: Step, key: str) -> bool:
    """Whether ``step`` reads the external input ``key``, directly or through the steps it depends on."""
    seen, todo = set(), [step.name]
    while todo:
        s = plan.step(todo.pop())
        if any(i.what == key and not i.made_by for i in s.inputs):
            return True
        for d in s.deps:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return False


def stale_reason(plan: Plan, step: Step, changed: Mapping[str, str] | None = None) -> str | None:
    """Why a step's existing output does not count as done; None when it is done."""
    if not step.marker.exists():
        rec = _meta(plan.step_record(step))
        if rec and isinstance(rec.get("config"), Mapping) and step.out.exists():
            try:
                why = _diff(rec["config"], compared(cfg.to_dict(plan.recipe_of(step)), step.stage))
            except cfg.ConfigError:
                why = None
            if why:
                return f"stale: an unfinished run of another config is there ({why})"
        return "todo"
    for key, what in (changed or {}).items():
        if _reads_external(plan, step, key):
            return f"stale: {what}"
    if step.stage not in _COMPARED:
        return None
    meta = _meta(step.marker)
    if meta is None:
        return f"stale: {step.marker} is unreadable"
    if step.stage == "shards build":  # built from another manifest (e.g. by hand before the first pipeline run)
        why = _manifest_changed(plan, meta)
        if why:
            return f"stale: {why}"
    theirs = meta.get("config")
    if not isinstance(theirs, Mapping):
        return None  # the stage records no config: the marker is all there is to check
    try:
        mine = cfg.to_dict(plan.recipe_of(step))
    except cfg.ConfigError:
        return "todo"
    why = _diff(compared(theirs, step.stage), compared(mine, step.stage))
    return f"stale: {why}" if why else None


def _manifest_changed(plan: Plan, meta: Mapping[str, Any]) -> str | None:
    """Whether shards.manifest now holds other bytes than the shards were built from (their meta.json)."""
    import hashlib

    built = (meta.get("fingerprints") or {}).get("manifest")
    path = Path(plan.recipe.shards.manifest)
    if not built or not path.is_file():
        return None
    now = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return None if now == built else f"{path} changed since the shards were built from it"


def changed_externals(plan: Plan) -> dict[str, str]:
    """External inputs whose content differs from the last run's (recorded in pipeline.json)."""
    old = (_meta(plan.status_path) or {}).get("inputs") or {}
    if not old:
        return {}
    now = external_fingerprints(plan.recipe)
    return {k: f"the content of {k} changed since the last run" for k in now if k in old and old[k] != now[k]}


def states(plan: Plan) -> dict[str, str]:
    """``done`` or why not, per step; a step after an unfinished producer is never done."""
    out: dict[str, str] = {}
    changed = changed_externals(plan)
    for s in plan.steps:
        why = stale_reason(plan, s, changed)
        pending = [d for d in s.deps if out.get(d, "done") != "done"]
        if why is None and pending:
            why = f"todo (after {pending[0]})"
        out[s.name] = "done" if why is None else why
    return out


def command(plan: Plan, step: Step) -> list[str]:
    """The step's command line (what runs locally, and what --dry-run prints)."""
    argv = [*step.stage.split(), "--config", str(plan.config_path), *step.overrides]
    if plan.nproc > 1 and step.many_ranks:
        argv = ["run", "--nproc", str(plan.nproc), *argv]
    return [sys.executable, "-m", "engine.cli", *argv]


def wrap_command(argv: Sequence[str], width: int = 80, indent: int = 4) -> list[str]:
    """A shell command split into lines of at most ``width`` columns (where the words allow), joined by
    backslash continuations: copied as is, it still runs."""
    words = [shlex.quote(a) for a in argv]
    lines, cur = [], " " * indent
    for w in words:
        if cur.strip() and len(cur) + 1 + len(w) + 2 > width:
            lines.append(cur + " \\")
            cur = " " * (indent + 2) + w
        else:
            cur = cur + (" " if cur.strip() else "") + w
    lines.append(cur)
    return lines


def print_plan(plan: Plan, st: Mapping[str, str], estimates: Mapping[str, Any] | None = None,
               cmd: Callable[[Plan, Step], list[str]] = command, title: str = "stc pipeline", out=None) -> None:
    """The plan on stdout, readable at 80 columns: per step its state, ranks, inputs, output, estimate and
    the command (copyable as is, interpreter included)."""
    out = out or sys.stdout
    active = plan.active
    done = sum(st[s.name] == "done" for s in active)
    print(f"{title}: {len(active)} step(s), {done} done", file=out)
    print(f"run dir: {plan.run_dir}", file=out)
    print(f"config: {plan.config_path}", file=out)
    for i, s in enumerate(active, 1):
        ranks = plan.ranks(s)
        print(f"\n{i:>2}. {s.name}  [{s.stage}, {ranks} rank{'s' * (ranks != 1)}]  {st[s.name]}", file=out)
        for i_ in s.inputs:
            print(f"    in:  {i_.path}  ({i_.made_by or i_.what})", file=out)
        print(f"    out: {s.out}", file=out)
        if estimates and s.name in estimates:
            for k, part in enumerate(estimates[s.name].split("\n")):   # one fact per line, each wrapped
                print(textwrap.fill(part, width=80, initial_indent="    est: " if k == 0 else " " * 9,
                                    subsequent_indent=" " * 9, break_long_words=False, break_on_hyphens=False),
                      file=out)
        for line in wrap_command(cmd(plan, s)):
            print(line, file=out)


# ============================================================================================ running

Runner = Callable[[Step, list[str], Path], int]


_LIVE: set[subprocess.Popen] = set()      # the steps running now (what a stop request is passed on to)
_LIVE_LOCK = threading.Lock()


def subprocess_runner(step: Step, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> int:
    """Run one step; its output goes to ``log_path`` and, prefixed with the step name, to stderr.

    ``env``: variables added for this step (its GPUs when steps run side by side). While it runs the
    process is listed in ``_LIVE``: SIGTERM / SIGUSR1 sent to the pipeline are passed on to every running
    step (:func:`_forward_stop_requests`), which checkpoints and exits 75; Ctrl-C reaches the steps
    through the terminal's process group anyway.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    e = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    e["PYTHONPATH"] = root + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    e.update(env or {})
    with open(log_path, "a", encoding="utf-8") as lf:
        lf.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {shlex.join(argv)}\n")
        lf.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e, text=True,
                                errors="replace", bufsize=1)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    lf.write(line)
                    lf.flush()
                    sys.stderr.write(f"[{step.name}] {line}")
            except KeyboardInterrupt:  # the step got the Ctrl-C too: let it checkpoint and report (75)
                lf.write(proc.stdout.read())
            return proc.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)


@contextlib.contextmanager
def _forward_stop_requests() -> Iterator[None]:
    """While steps run: SIGTERM / SIGUSR1 to the pipeline go to every running step (main thread only)."""
    def forward(signum: int, _frame: Any) -> None:
        with _LIVE_LOCK:
            procs = list(_LIVE)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            old[sig] = signal.signal(sig, forward)
        except ValueError:   # not the main thread (a test calling run() from a thread): no forwarding
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def local_gpus() -> list[str] | None:
    """The GPUs this machine shows (ids as CUDA_VISIBLE_DEVICES names them), or None without any."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        ids = [x.strip() for x in vis.split(",") if x.strip() and x.strip() != "-1"]
        return ids or None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    ids = [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    return ids or None


def gpus_needed(plan: Plan, step: Step) -> int:
    """GPUs a step holds while it runs: its ranks for a GPU stage, none for a host stage."""
    return plan.ranks(step) if stages.get(step.stage).resources == "gpu" else 0


_ERROR_LINE = re.compile(r"^(?:\[[\w.-]+\] )?(stc [\w ]+?(?: \(rank \d+\))?: error: .*)$")


def failure_reason(log_path: Path) -> str:
    """The step's own one-line error (``stc <stage>: error: ...``) from its log, or its last line."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    for i in range(len(lines) - 1, -1, -1):
        m = _ERROR_LINE.match(lines[i])
        if m:
            rest = []   # a multi-line message continues with indented lines
            for more in lines[i + 1:i + 6]:
                if more.startswith("  "):
                    rest.append(more.strip())
                else:
                    break
            return m.group(1) + ("; " + "; ".join(rest) if rest else "")
    tail = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    return tail[-1].strip() if tail else "(the log is empty)"


def _write_status(plan: Plan, status: dict) -> None:
    status["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(plan.status_path, status)


def missing_inputs(plan: Plan, step: Step) -> list[str]:
    out = []
    for i in step.inputs:
        if not i.path.exists():
            by = f"it is made by step {i.made_by!r}" if i.made_by else f"it comes from outside the pipeline ({i.what})"
            out.append(f"step {step.name!r} needs {i.path} ({i.what}), which does not exist; {by}")
    return out


def set_aside(step: Step) -> Path | None:
    """Move a stale step's output out of the way (kept for inspection, never resumed)."""
    if not step.out.exists():
        return None
    dest = step.out.with_name(f"{step.out.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        dest = step.out.with_name(f"{step.out.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    step.out.rename(dest)
    return dest


def note_step(plan: Plan, step: Step) -> None:
    """Record a step in ``<run>/pipeline/steps/<step>.json``: the config it is about to run with (how a
    later run tells an unfinished output of another config from one to resume), its output and ranks
    (what ``stc report`` reads for device time). The stage itself adds its wall seconds when it succeeds
    (``stages.note_seconds``, through ``$STC_STEP_RECORD``), whether the plan runs here or as SLURM jobs."""
    atomic_write_json(plan.step_record(step), {
        "step": step.name, "index": plan.steps.index(step), "stage": step.stage, "out": str(step.out),
        "ranks": plan.ranks(step),
        "config": compared(cfg.to_dict(plan.recipe_of(step)), step.stage),
        **({"system": dict(step.system)} if step.system else {})})


def refresh_record(plan: Plan, step: Step) -> None:
    """A finished step that is kept: its record takes this plan's description of the system it evaluates
    (what ``stc report`` labels and pairs it by, which a newer engine may describe more fully), and keeps
    what its run recorded (config, seconds)."""
    path = plan.step_record(step)
    rec = _meta(path)
    if not isinstance(rec, dict) or not step.system:
        return
    mine = json.loads(json.dumps(dict(step.system)))
    if rec.get("system") != mine:
        atomic_write_json(path, {**rec, "system": mine})


def prepare(plan: Plan, st: Mapping[str, str], step: Step, say: Callable[[str], None]) -> None:
    """Before a step (re)runs: set a stale output aside, note the step's config."""
    if st[step.name].startswith("stale"):
        moved = set_aside(step)
        if moved is not None:
            say(f"{step.name}: {st[step.name]}; its old output is set aside as {moved}")
    note_step(plan, step)


def run(plan: Plan, *, runner: Runner | None = None, echo: Callable[[str], None] | None = None) -> int:
    """Run every unfinished (selected) step in order; returns 0, 75 (stopped, rerun to continue) or 1."""
    runner = runner or subprocess_runner
    say = echo or (lambda m: log.console.print(m, highlight=False, soft_wrap=True))
    problems = check(plan)
    if problems:
        raise PipelineError(problems)
    plan.config_path.parent.mkdir(parents=True, exist_ok=True)
    with lock.hold([plan.run_dir / PIPELINE_DIR], "stc pipeline"):
        return _run_locked(plan, runner, say)


def _run_locked(plan: Plan, runner: Runner, say: Callable[[str], None]) -> int:
    """Run the steps in plan order, up to ``plan.jobs`` at once: a step starts when every step it reads
    from has finished (skipped ones count) and, with GPUs, when enough of them are free (each running
    step sees only its own through ``CUDA_VISIBLE_DEVICES``). The first failure or stop starts nothing
    more; the steps already running finish, then the pipeline reports."""
    cfg.save_resolved(plan.recipe, plan.config_path.parent, plan.config_path.name)
    st = states(plan)
    active = plan.active
    status: dict[str, Any] = {
        "kind": "pipeline", "config": str(plan.config_path), "nproc": plan.nproc, "jobs": plan.jobs,
        "state": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": (_meta(plan.status_path) or {}).get("inputs") or external_fingerprints(plan.recipe),
        "steps": [{"name": s.name, "stage": s.stage, "out": str(s.out), "log": str(plan.log_path(s)),
                   "command": command(plan, s), "state": "done" if st[s.name] == "done" else "todo",
                   "seconds": None, "exit": None} for s in active]}
    rec = {r["name"]: r for r in status["steps"]}
    _write_status(plan, status)
    n = len(active)
    num = {s.name: k for k, s in enumerate(active, 1)}
    names = set(num)
    ran: set[str] = set()
    finished: set[str] = set()
    pending = list(active)
    running: dict[Future, tuple[Step, float, list[str]]] = {}
    free = local_gpus() if plan.jobs > 1 else None
    outcome: tuple[int, str] | None = None         # (exit code, step) of the first failure or stop

    def startable(s: Step) -> bool:
        return all(d in finished or d not in names for d in s.deps)

    def start_what_can(pool: ThreadPoolExecutor) -> None:
        progressed = True
        while progressed and outcome is None:
            progressed = False
            for s in list(pending):
                if not startable(s):
                    continue
                k = num[s.name]
                if st[s.name] == "done" and not (set(s.deps) & ran):   # done, and nothing it reads was remade
                    say(f"[{k}/{n}] {s.name}: done, skipped ({s.marker})")
                    refresh_record(plan, s)
                    rec[s.name]["state"] = "skipped"
                    pending.remove(s)
                    finished.add(s.name)
                    _write_status(plan, status)
                    progressed = True
                    continue
                need = gpus_needed(plan, s) if free is not None else 0
                if len(running) >= plan.jobs or (free is not None and need > len(free)):
                    continue
                missing = missing_inputs(plan, s)
                if missing:
                    rec[s.name]["state"] = status["state"] = "failed"
                    _write_status(plan, status)
                    raise PipelineError(missing)
                prepare(plan, st, s, say)
                ids = [free.pop(0) for _ in range(need)] if free is not None else []
                extra = {stages.STEP_RECORD_ENV: str(plan.step_record(s).resolve()),   # the stage adds its seconds
                         **({"CUDA_VISIBLE_DEVICES": ",".join(ids) if ids else ""} if free is not None else {})}
                say(f"[{k}/{n}] {s.name}: {st[s.name]} -> running (log {plan.log_path(s)})"
                    + (f" on GPU(s) {','.join(ids)}" if ids else ""))
                rec[s.name].update(state="running", started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                _write_status(plan, status)
                args = (s, command(plan, s), plan.log_path(s))
                fut = pool.submit(runner, *args, env=extra)
                running[fut] = (s, time.perf_counter(), ids)
                pending.remove(s)
                progressed = True

    def collect(fut: Future) -> None:
        nonlocal outcome
        s, t0, ids = running.pop(fut)
        if free is not None:
            free.extend(ids)
        try:
            code = int(fut.result())
        except Exception as e:   # the runner itself broke (not the step): a failure of this step
            code, rec[s.name]["error"] = EXIT_FAIL, f"{type(e).__name__}: {e}"
        secs = round(time.perf_counter() - t0, 1)
        rec[s.name].update(seconds=secs, exit=code)
        if code == 0 and not s.marker.exists():
            say(f"step {s.name} exited 0 but wrote no {s.marker}; treating it as failed")
            code = EXIT_FAIL
            rec[s.name]["exit"] = code
        if code == EXIT_RESUMABLE:
            rec[s.name]["state"] = "stopped"
            say(f"step {s.name} stopped resumably after {secs}s (exit 75); rerun the same `stc pipeline` command "
                f"to continue from it")
            outcome = outcome or (EXIT_RESUMABLE, s.name)
        elif code != 0:
            why = rec[s.name].get("error") or failure_reason(plan.log_path(s))
            rec[s.name].update(state="failed", error=why)
            say(f"step {s.name} failed (exit {code}) after {secs}s: {why}\n  log: {plan.log_path(s)}")
            if outcome is None or outcome[0] == EXIT_RESUMABLE:
                outcome = (EXIT_FAIL, s.name)
        else:
            ran.add(s.name)
            finished.add(s.name)
            rec[s.name]["state"] = "done"
            say(f"[{num[s.name]}/{n}] {s.name}: done in {secs}s")
        _write_status(plan, status)

    with _forward_stop_requests(), ThreadPoolExecutor(max_workers=max(1, plan.jobs)) as pool:
        try:
            start_what_can(pool)
            while running:
                done_now, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done_now:
                    collect(fut)
                start_what_can(pool)
        except KeyboardInterrupt:   # the steps got the Ctrl-C too: they checkpoint; wait for them
            outcome = outcome or (EXIT_RESUMABLE, "Ctrl-C")
            for fut in list(running):
                collect(fut)
    if outcome is None and pending:   # cannot happen when check() passed: say so rather than claim success
        outcome = (EXIT_FAIL, pending[0].name)
        say(f"steps {', '.join(s.name for s in pending)} could not start (their inputs never finished)")
    if outcome is not None:
        code, step = outcome
        status["state"] = "stopped" if code == EXIT_RESUMABLE else "failed"
        if code != EXIT_RESUMABLE:
            status["failed_step"] = step
        _write_status(plan, status)
        return code
    status["state"] = "done"
    status["inputs"] = external_fingerprints(plan.recipe)
    _write_status(plan, status)
    say(f"pipeline finished: {n} steps ({len(ran)} run, {n - len(ran)} already done); status {plan.status_path}")
    return EXIT_OK


def dry_run(plan: Plan, *, data_pending: bool = False, title: str = "stc pipeline",
            cmd: Callable[[Plan, Step], list[str]] = command) -> int:
    """Validate the whole plan and print it (with the per-step estimates); 0 when it would start, else 2."""
    problems = check(plan, data_pending=data_pending)
    estimates = preflight.describe(plan) if not problems else {}
    print_plan(plan, states(plan), estimates, cmd=cmd, title=title)
    if problems:
        print("\nthe plan would be refused:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stdout)
        return EXIT_USAGE
    if data_pending and not (Path(plan.recipe.data.shards) / "meta.json").exists():
        print(f"\ndata.shards {plan.recipe.data.shards}: not built yet; `stc demo` builds it before the plan runs")
    print("\nthe plan validates: every step would start", file=sys.stdout)
    return EXIT_OK


def main(recipe: cfg.Recipe, args: Any) -> int:
    """``stc pipeline``: plan, validate the whole plan, then run it (or print it with --dry-run)."""
    if dist.detect().distributed:
        raise PipelineError("stc pipeline runs as one process and starts each stage on its ranks itself: run "
                            "`stc pipeline --nproc N ...`, not `stc run --nproc N pipeline ...`")
    plan = build_plan(recipe, nproc=getattr(args, "nproc", None), select=getattr(args, "stages", None),
                      jobs=getattr(args, "jobs", None))
    if getattr(args, "dry_run", False):
        return dry_run(plan)
    return run(plan)
