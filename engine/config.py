"""Typed stage configs: frozen dataclasses, YAML recipes as data, ``section.key=value`` overrides.

A recipe YAML has one section per stage (``shards``, ``finetune``, ``importance``, ``prune``, ``cache``,
``distill``, ``export``, ``evaluate``, ``report``) plus the shared ``model``, ``data`` and ``run``
sections. Every problem (unknown key, wrong type, bad choice) is collected and raised once in a
:class:`ConfigError` naming the key and, for a misspelt key, the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml

from .errors import UsageError


class ConfigError(UsageError):
    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        head = f"invalid config{f' {source}' if source else ''} ({len(problems)} problem{'s' * (len(problems) != 1)}):"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


# --------------------------------------------------------------------------------------------------
# Sections. Every field has a default and a comment: the comment is the documentation.
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraConfig:
    r: int = 64                      # LoRA rank (paper: 64)
    alpha: int = 128                 # LoRA alpha (paper: 128)
    dropout: float = 0.0             # LoRA dropout (paper: 0)
    rslora: bool = True              # rank-stabilised scaling alpha/sqrt(r) (paper: on)
    target: str = "all-linear"       # "all-linear" or comma-separated module names
    include_audio_tower: bool = True  # paper counts 2.41% trainable incl. the audio tower


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""                   # local Hugging Face directory (never downloaded)
    kind: str = "auto"               # auto: from config.json (model_type / architectures); else a family of engine.models.families
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # compute and storage dtype of the loaded weights
    quant: Literal["none", "nf4"] = "none"  # nf4: bitsandbytes 4-bit linear layers (QLoRA-style loading)
    double_quant: bool = True        # bitsandbytes nested quantisation of the nf4 scales
    trust_remote_code: bool = False  # off unless a recipe turns it on
    attn_implementation: str = "auto"  # auto (flash_attention_2 on CUDA bf16/fp16 when installed, else sdpa), eager, sdpa, ...


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""                 # directory written by `stc shards build`
    train_split: str = "train"       # shard split the trainer and the teacher cache read
    dev_split: str = "dev"           # shard split that selects layers (importance); kept apart from test
    test_split: str = "test"         # shard split the systems are scored on (evaluate)
    batch_size: int = 4              # per-rank micro batch (samples)
    bucket_window: int = 64          # samples sorted by length together (length bucketing)
    num_workers: int = 0             # DataLoader workers per rank
    shuffle: bool = True             # shuffle shard order and batches per epoch (seeded by run.seed)
    max_audio_s: float = 30.0        # the encoder's window
    system_prompt: str = "You are a professional translator."  # the paper's system turn
    instruction: str = "Translate the {src} speech into {tgt}:"  # user turn after the audio ({src}, {tgt}: language names)
    text_instruction: str = "Translate the following {src} text into {tgt}:"  # user turn of text-only rows


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/default"    # every stage writes under here unless given its own out
    seed: int = 0                    # seeds data order, LoRA init and every sampled choice
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # console and <out>/logs/rank<N>.log
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the rank's GPU when there is one, else CPU
    threads: int = 0                 # torch threads per rank (0: leave torch's default)
    progress_s: float = 30.0         # seconds between plain progress lines when stderr is not a terminal (0: every update)
    device_memory_gb: float = 0.0    # memory of one rank's device for planning the ZeRO stage (0: the visible GPU, or host RAM per local rank)
    interconnect_gbps: float = 400.0  # network bandwidth per node (Gb/s) for the plan's communication times between nodes


@dataclass(frozen=True)
class ShardsConfig:
    manifest: str = ""               # JSONL or TSV manifest (README: Manifest)
    out: str = ""                    # output directory (default: <run.out_dir>/shards)
    split: str = ""                  # only rows of this split (empty: all, one shard set per split)
    samples_per_shard: int = 256     # samples per tar (the unit ranks and workers split)
    sample_rate: int = 16000         # audio is resampled to this rate (the encoder's 16 kHz)
    max_audio_s: float = 30.0        # the encoder's window: longer audio is truncated or rejected (long_audio)
    long_audio: Literal["auto", "truncate", "reject"] = "auto"  # audio longer than max_audio_s: auto rejects rows of data.train_split (a cut clip would keep the full translation) and truncates other splits
    segment_overrun: Literal["reject", "truncate"] = "reject"  # a segment (offset_s + duration_s) running past its file's end: reject the row, or keep what exists (counted)
    overrun_tolerance_s: float = 0.05  # seconds a segment may run past the file's end (rounding) before segment_overrun applies
    min_audio_s: float = 0.05        # shorter (or empty) audio is rejected
    silence_dbfs: float = -70.0      # peak below this: rejected as silent
    flac_compression: int = 5        # FLAC level 0..8 (lossless either way; higher is smaller, slower)
    corpus: str = ""                 # corpus name stored with each sample


@dataclass(frozen=True)
class FinetuneConfig:
    out: str = ""                    # output directory (default: <run.out_dir>/finetune); the model is <out>/final
    mode: Literal["full", "lora", "qlora"] = "full"  # the paper's teacher: full fine-tune
    lora: LoraConfig = field(default_factory=LoraConfig)  # used when mode is lora/qlora
    epochs: float = 3.0              # passes over the train split (fractions allowed)
    max_steps: int = 0               # cap on optimizer steps (0: none, epochs decide)
    lr: float = 1e-5                 # peak learning rate (AdamW)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    warmup_steps: int = 0            # linear warm-up in optimizer steps
    weight_decay: float = 0.001      # AdamW weight decay (matrices only)
    global_batch: int = 4            # samples per optimizer step, all ranks together (= micro x ranks x accumulation)
    grad_clip: float = 1.0           # gradient-norm clipping
    zero_stage: Literal["auto", "0", "1", "2", "3"] = "auto"  # DeepSpeed ZeRO stage; auto: the lowest that fits
    ds_config: str = ""              # path to a ds_configs/*.json; "" = chosen by the engine
    offload: bool = False            # ZeRO-3 with CPU offload of parameters and optimizer state
    gradient_checkpointing: Union[Literal["auto"], bool] = "auto"  # recompute activations in backward (less memory, ~30% slower); auto: on only when the step does not fit without it (engine/memory.py)
    save_every: int = 200            # checkpoint every N optimizer steps (0: only at the end and on SIGTERM/SIGUSR1)
    keep_last: int = 2               # checkpoints kept
    eval_every: int = 0              # dev-split CE every N steps (0: never)
    resume: str = "auto"             # auto: newest checkpoint in <out>/checkpoints; never; or a checkpoint path
    zero3_persistence_threshold: int = -1  # ZeRO-3 stage3_param_persistence_threshold (-1: from hidden size)


@dataclass(frozen=True)
class ImportanceConfig:
    out: str = ""                    # output directory (default: <run.out_dir>/importance)
    component: Literal["decoder", "audio"] = "decoder"  # which layers are the candidates: the decoder's (the paper's) or the audio encoder's (audio models only); remove/protect/force_remove/target_layers count that component's layers
    scorer: Literal["task", "nll", "block_influence"] = "task"  # task: chrF++/chrF of greedy translations (the paper's); nll, block_influence: cheap proxies
    selector: Literal["auto", "chrf++", "chrf", "bleu", "primary"] = "auto"  # auto: chrF (zh), chrF++ (else); mixed: primary (each its own)
    method: Literal["iterative", "oneshot", "middle_block"] = "iterative"  # iterative: one layer per scan (the paper's)
    target_layers: int = 0           # layers to keep (0: use remove)
    remove: float = 0.25             # fraction (<1) or count (>=1) of decoder layers to remove
    force_remove: tuple[int, ...] = ()  # layers removed before the search
    protect: tuple[int, ...] = (0, -1)  # layers never removed (negative: from the end; the paper protects first and last)
    stop_below: float = 0.0          # stop when score falls below this fraction of the unpruned score
    shortlist: int = 0               # iterative: after the first iteration re-score only the N candidates that hurt least last time (0: all, the paper's)
    max_dev_samples: int = 0         # 0: all
    max_new_tokens: int = 128        # greedy decoding limit of the task scorer
    decode_batch_size: int = 16      # dev samples per forward / generate call


@dataclass(frozen=True)
class PruneConfig:
    ranking: str = ""                # ranking.json (or its directory) written by `stc importance`
    layers: tuple[int, ...] = ()     # or: decoder layers to remove, indices of the model at model.path
    count: int = 0                   # remove only the first N of the ranking's removal order (0: all); an audio ranking (importance.component=audio) removes audio-encoder layers
    out: str = ""                    # default: <run.out_dir>/pruned
    prune_audio_layers: tuple[int, ...] = ()  # audio-encoder layers to remove as well
    audio_ranking: str = ""          # or: an audio-encoder ranking (importance.component=audio) of the same model, for removing decoder layers (ranking/layers) and audio layers in one step
    audio_count: int = 0             # remove only the first N of audio_ranking's removal order (0: all)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # dtype of the saved weights (auto: the source checkpoint's, not model.dtype)


@dataclass(frozen=True)
class CacheConfig:
    out: str = ""                    # output directory (default: <run.out_dir>/cache)
    teacher: str = ""                # teacher model dir (default: model.path)
    k: int = 64                      # top-k log-probs kept per label position
    targets: tuple[str, ...] = ("ref", "teacher")  # ref: top-k on the references; teacher: greedy translations (sequence-level KD)
    teacher_topk: bool = False       # also store top-k for the teacher's own translation
    max_new_tokens: int = 128        # greedy decoding limit of the teacher translations
    batch_size: int = 8              # samples per teacher forward / generate call
    encoding: Literal["auto", "packed"] = "auto"  # record encoding (packed: the one this engine writes)
    split: str = ""                  # audio split to cache (default: data.train_split)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # teacher compute dtype (auto: model.dtype)
    quant: Literal["auto", "none", "nf4"] = "auto"           # teacher weights (auto: model.quant)
    zero3: bool = False              # ZeRO-3 inference sharding of the teacher across ranks (bf16/fp32; never nf4)
    zero3_persistence_threshold: int = -1  # ZeRO-3 stage3_param_persistence_threshold (-1: from hidden size)


@dataclass(frozen=True)
class DistillConfig:
    out: str = ""                    # output directory (default: <run.out_dir>/distill); the student is <out>/final
    student: str = ""                # pruned model dir
    cache: str = ""                  # teacher cache dir ("" with teacher_mode=online)
    teacher_mode: Literal["cache", "online"] = "cache"  # where KD targets come from: the cache, or the teacher run alongside
    mode: Literal["full", "lora", "qlora"] = "qlora"  # qlora: nf4 base + LoRA (the paper's healing)
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapter settings for lora/qlora
    kd: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"  # word-level KD divergence
    kd_weight: float = 1.0           # loss = CE + kd_weight * KD (0: CE only)
    temperature: float = 1.0         # KD temperature
    seq_kd: bool = True              # also train on teacher translations (de-duplicated)
    epochs: float = 4.0              # passes over the train split (+ teacher translations with seq_kd)
    max_steps: int = 0               # cap on optimizer steps (0: none, epochs decide): healings whose data differ in size (seq_kd adds the translations) get the same budget
    lr: float = 1e-5                 # peak learning rate (AdamW)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    warmup_steps: int = 0            # linear warm-up in optimizer steps
    weight_decay: float = 0.0        # AdamW weight decay (matrices only)
    global_batch: int = 4            # samples per optimizer step, all ranks together (= micro x ranks x accumulation)
    grad_clip: float = 1.0           # gradient-norm clipping
    zero_stage: Literal["auto", "0", "1", "2", "3"] = "auto"  # DeepSpeed ZeRO stage; auto: the lowest that fits
    ds_config: str = ""              # path to a ds_configs/*.json; "" = chosen by the engine
    offload: bool = False            # ZeRO-3 with CPU offload of parameters and optimizer state
    gradient_checkpointing: Union[Literal["auto"], bool] = "auto"  # recompute activations in backward (less memory, ~30% slower); auto: on only when the step does not fit without it (engine/memory.py)
    save_every: int = 200            # checkpoint every N optimizer steps (0: only at the end and on SIGTERM/SIGUSR1)
    keep_last: int = 2               # checkpoints kept
    eval_every: int = 0              # dev-split CE every N steps (0: never)
    resume: str = "auto"             # auto: newest checkpoint in <out>/checkpoints; never; or a checkpoint path
    zero3_persistence_threshold: int = -1  # ZeRO-3 stage3_param_persistence_threshold (-1: from hidden size)


@dataclass(frozen=True)
class ExportConfig:
    out: str = ""                    # output directory (default: <run.out_dir>/export)
    source: str = ""                 # trainer output to export (default: <distill.out>/final)
    quant: Literal["none", "nf4", "int8"] = "nf4"  # storage of the linears of export.quantize (nf4: the paper's 4-bit; int8: LLM.int8)
    quantize: tuple[str, ...] = ("encoder", "projector", "decoder")  # components whose linears take export.quant (also: lm_head); the rest stay in model.dtype
    trim_vocab: bool = False         # keep only the vocabulary rows the trim splits use (+ specials, bytes, merge closure), before quantizing
    trim_splits: tuple[str, ...] = ("train",)  # shard splits whose prompts and translations define the kept vocabulary (dev/test are only checked and counted)
    trim_languages: tuple[str, ...] = ()  # with trim_vocab, also keep every token written only in these languages' scripts (ISO codes, e.g. [en, de]): any text in them then encodes exactly as untrimmed
    max_gb: float = 0.0              # size target: plan validation refuses a student whose predicted safetensors bytes exceed it (decimal GB; 0: none)
    merge_lora: bool = True          # fold adapters into the weights (false: ship the adapter and name its base)


EXPORT_SCHEMES = ("none", "nf4", "int8")
EXPORT_QUANTIZABLE = ("encoder", "projector", "decoder", "lm_head")


def export_choice_problem(quant: str, quantize) -> str:
    """What is wrong with an export's scheme and component list ("" when nothing)."""
    if quant not in EXPORT_SCHEMES:
        return f"export.quant must be one of {', '.join(EXPORT_SCHEMES)}, got {quant!r}"
    for c in quantize:
        if c == "embeddings":
            return ("export.quantize: 'embeddings' cannot be stored quantized (bitsandbytes converts "
                    "linear layers only, and transformers reloads embeddings in the compute dtype); "
                    "shrink them by trimming the vocabulary instead")
        if c not in EXPORT_QUANTIZABLE:
            return f"export.quantize: unknown component {c!r}; choose from {', '.join(EXPORT_QUANTIZABLE)}"
    return ""


@dataclass(frozen=True)
class EvaluateConfig:
    out: str = ""                    # default: <run.out_dir>/eval; one folder per system under it
    models: tuple[str, ...] = ()     # model dirs, each "path" or "name=path" (default: model.path)
    split: str = ""                  # shard split to translate and score ("" = data.test_split)
    batch_size: int = 16             # samples per generate call (batches are formed before ranks split them)
    max_new_tokens: int = 128        # decoding limit per translation
    num_beams: int = 1               # 1: greedy (the paper's); >1: beam search
    comet_model: str = ""            # local COMET checkpoint path; "" = skip (never downloaded)
    max_samples: int = 0             # first N samples of the split in shard order (0: all)
    bleu_tokenize: Literal["auto", "13a", "intl", "zh", "char", "none", "ja-mecab", "ko-mecab",
                           "flores101", "flores200"] = "auto"  # auto: zh for Chinese, 13a otherwise
    shuffle_audio: bool = False      # pair each text with another sample's audio (seed run.seed): ablation
    dev_split_check: bool = True     # refuse a test split sharing keys/sources with data.dev_split
    latency_samples: int = 16        # rank 0 times the first N samples one by one at batch 1 (speed.latency_s); 0: skip


@dataclass(frozen=True)
class ReportConfig:
    out: str = ""                    # default: <run.out_dir>/report
    title: str = "stc-engine compression report"  # heading of report.md
    plots: bool = True               # PNG plots (quality retained vs size, primary metric per system)
    eval_dir: str = ""               # <eval_dir>/<system>/scores.json from `stc evaluate` (default: evaluate.out)
    reference: str = "teacher"       # the system whose scores count as 100%
    systems: tuple[str, ...] = ()    # systems shown, in this order (default: every one found, sorted)
    importance: str = ""             # ranking.json or its directory (default: importance.out)
    runs: tuple[str, ...] = ()       # stage dirs for device-hours, "dir" or "label=dir" (default: the recipe's)
    bars: tuple[str, ...] = ()       # checks "system[@direction]:field>=value", e.g. "kd-25:retained>=97"
    strict_bars: bool = False        # exit 1 when a bar fails (n/a does not fail)
    bootstrap: int = 1000            # paired bootstrap resamples for the 95% CIs of differences (seed run.seed); 0: off
    rankings: tuple[str, ...] = ()   # further ranking.json files (or dirs) "label=path", compared with report.importance


@dataclass(frozen=True)
class SlurmConfig:
    """Defaults for `stc submit` (launchers/slurm.py); its command-line options win."""
    partition: str = ""              # "" = the cluster's default partition
    time: str = ""                   # --time, e.g. "04:00:00" ("" = the partition's default)
    account: str = ""                # --account (charged project)
    qos: str = ""                    # --qos
    mem: str = ""                    # --mem per node of multi-rank jobs, e.g. "200G" ("": each step's host estimate x its tasks per node; single-task jobs ask what their model needs)
    nodes: int = 1                   # nodes per multi-rank job
    gpus_per_node: int = 0           # one task per GPU; 0: CPU-only, ntasks_per_node tasks
    ntasks_per_node: int = 0         # 0: gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 0           # 0: per step, data.num_workers + max(1, run.threads) where it reads shards, else max(1, run.threads)
    signal_seconds: int = 300        # USR1 this long before the time limit: checkpoint, requeue
    requeue: bool = True             # requeue a job whose stage stopped resumably (exit 75)
    max_restarts: int = 10           # stop requeueing after this many restarts
    stage_to_local_disk: bool = False  # copy data.shards to node-local disk first (once per node)
    extra_sbatch: tuple[str, ...] = ()  # further sbatch options, e.g. ["--constraint=a100"]
    extensions_dir: str = ""         # TORCH_EXTENSIONS_DIR of the jobs ("": node-local, one per run and node; a path: a site-provided cache)


@dataclass(frozen=True)
class PipelineConfig:
    """`stc pipeline` (engine/pipeline.py): which systems the chain builds; each stage keeps its own section."""
    finetune: bool = False           # fine-tune the teacher first (finetune.mode full); else model.path is the teacher
    students: tuple[float, ...] = (0.25, 0.5)  # fractions of decoder layers to remove, one student each (kd-25, kd-50)
    ablations: bool = True           # for the first fraction: no healing, CE-only healing, contiguous middle block
    variants: tuple[str, ...] = ()   # more healings of the first fraction, each its own student: "word" (CE + word-level KD from the cache), "seq" (CE + sequence-level KD on the teacher's translations)
    progressive: bool = False        # also prune -> heal -> prune: loop-R of every later fraction starts from the previous fraction's healed student (merged, re-scanned by importance), beside kd-R pruned from the teacher at once
    storage: tuple[str, ...] = ()    # more exports of every kd-R student, each its own system kd-R-<levers>: "+"-joined levers of trim (export.trim_vocab: the train split's tokens), scripts (trim_vocab keeping every token of export.trim_languages' scripts), lm_head (lm_head quantised too), int8 (export.quant=int8), bf16 (export.quant=none), e.g. [trim, trim+lm_head]
    audio: tuple[float, ...] = ()    # audio-language models: fractions of audio-encoder layers to remove as well from the first fraction's student, each its own student kd-R-aQ (its own importance scan of the encoder on the teacher, healed like kd-R); the report compares it with kd-R and with the decoder-only student nearest in bytes
    scorers: tuple[str, ...] = ()    # cheap importance scorers (nll, block_influence) also run once (oneshot) on the dev split; the report compares their layer rankings with the main one (Spearman)
    shuffle_check: bool = True       # also score the teacher on shuffled audio (it must drop: the model listens)
    nproc: int = 1                   # local ranks per multi-rank stage (`stc run --nproc`); --nproc wins
    jobs: int = 1                    # local steps at once: independent steps side by side (GPUs split among them); --jobs wins
    report: bool = True              # end with `stc report` over every evaluated system


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe))


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, collecting every problem.
# --------------------------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _unquote(value: "RawStr") -> "RawStr":
    """``"a b"`` or ``'a b'`` typed on a command line (quotes kept by an outer shell quote) -> ``a b``."""
    s = str(value)
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        return RawStr(s[1:-1])
    return value


def _show(value: Any) -> str:
    """A value in a message: as typed for command-line values, repr for YAML ones."""
    return str(value) if isinstance(value, RawStr) else repr(value)


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    out = _coerce_raw(value, tp, key, problems)
    return str(out) if isinstance(out, RawStr) else out


def _coerce_raw(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, RawStr) and origin is not tuple and not dataclasses.is_dataclass(tp):
        value = _unquote(value)
    if isinstance(value, RawStr) and (dataclasses.is_dataclass(tp) or origin is None and tp is Any):
        try:  # a whole section or a nested mapping given on the command line: YAML flow syntax
            value = yaml.safe_load(str(value)) if str(value).strip() else {}
        except yaml.YAMLError as e:
            problems.append(f"{key}: {str(value)!r} is not a YAML mapping ({str(e).splitlines()[0]})")
            return tp()
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            problems.append(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
            return tp()
        return _build(tp, value, key, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        # YAML reads `zero_stage: 2` as int: accept the int form of string choices.
        if value not in choices and str(value) in choices:
            return str(value)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key}: {_show(value)} is not {_type_name(tp)}{hint}")
            return choices[0]
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        sub: list[str] = []
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, a, key, trial)
            if not trial:
                return out
            sub.extend(trial)
        problems.append(f"{key}: {value!r} is not {_type_name(tp)}")
        return None
    if origin is tuple:
        (elem,) = typing.get_args(tp)[:1]
        if isinstance(value, RawStr):
            value = [RawStr(v) for v in split_list(value)]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            # "3,13,20" or a single value from the command line
            value = [v.strip() for v in str(value).split(",") if v.strip()] if isinstance(value, str) else [value]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return ()
        return tuple(_coerce(v, elem, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        problems.append(f"{key}: expected true or false, got {_show(value)}")
        return False
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{key}: expected an integer, got {value!r}")
            return 0
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected an integer, got {_show(value)}")
        return 0
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{key}: expected a number, got {value!r}")
            return 0.0
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected a number, got {_show(value)}")
        return 0.0
    if tp is str:
        if isinstance(value, bool):
            problems.append(f"{key}: expected a string, got {value!r} (YAML reads yes/no/on/off/true/false "
                            f"as booleans: quote the value)")
            return ""
        if isinstance(value, (str, int, float)):
            return str(value)
        if value is None:
            return ""
        problems.append(f"{key}: expected a string, got {value!r}")
        return ""
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else \
                f"; valid keys: {', '.join(names)}"
            problems.append(f"unknown key {key!r}{hint}")
            continue
        kwargs[k] = _coerce(v, hints[k], key, problems)
    return cls(**kwargs)


def _check_values(recipe: Recipe, problems: list[str]) -> None:
    """Value rules that types cannot express."""
    def positive(key: str, v: float, strict: bool = True) -> None:
        if (v <= 0) if strict else (v < 0):
            problems.append(f"{key}: must be {'> 0' if strict else '>= 0'}, got {v!r}")

    positive("data.batch_size", recipe.data.batch_size)
    positive("data.bucket_window", recipe.data.bucket_window)
    positive("data.num_workers", recipe.data.num_workers, strict=False)
    positive("data.max_audio_s", recipe.data.max_audio_s)
    positive("run.interconnect_gbps", recipe.run.interconnect_gbps)
    positive("run.device_memory_gb", recipe.run.device_memory_gb, strict=False)
    positive("shards.samples_per_shard", recipe.shards.samples_per_shard)
    positive("shards.sample_rate", recipe.shards.sample_rate)
    positive("shards.max_audio_s", recipe.shards.max_audio_s)
    if not 0 <= recipe.shards.flac_compression <= 8:
        problems.append(f"shards.flac_compression: must be 0..8, got {recipe.shards.flac_compression}")
    positive("cache.k", recipe.cache.k)
    positive("cache.batch_size", recipe.cache.batch_size)
    positive("cache.max_new_tokens", recipe.cache.max_new_tokens)
    for sec in ("finetune", "distill"):
        c = getattr(recipe, sec)
        positive(f"{sec}.lr", c.lr)
        positive(f"{sec}.global_batch", c.global_batch)
        positive(f"{sec}.epochs", c.epochs)
        positive(f"{sec}.keep_last", c.keep_last)
        positive(f"{sec}.max_steps", c.max_steps, strict=False)
    positive("distill.lora.r", recipe.distill.lora.r)
    positive("distill.temperature", recipe.distill.temperature)
    positive("export.max_gb", recipe.export.max_gb, strict=False)
    problem = export_choice_problem(recipe.export.quant, recipe.export.quantize)
    if problem:
        problems.append(problem)
    from . import langs

    for code in recipe.export.trim_languages:
        try:
            langs.get(code)
        except langs.UnknownLanguage as e:
            problems.append(f"export.trim_languages: {e}")
    positive("evaluate.batch_size", recipe.evaluate.batch_size)
    positive("evaluate.max_new_tokens", recipe.evaluate.max_new_tokens)
    positive("evaluate.num_beams", recipe.evaluate.num_beams)
    positive("evaluate.max_samples", recipe.evaluate.max_samples, strict=False)
    from .models import families

    if recipe.model.kind != "auto" and recipe.model.kind not in families.kinds():
        problems.append(f"model.kind: {recipe.model.kind!r} is not a supported family; one of auto, "
                        f"{', '.join(families.kinds())}")
    if recipe.importance.remove < 0:
        problems.append(f"importance.remove: must be >= 0, got {recipe.importance.remove}")
    if recipe.prune.count < 0:
        problems.append(f"prune.count: must be >= 0 (0: the whole ranking), got {recipe.prune.count}")
    if recipe.prune.audio_count < 0:
        problems.append(f"prune.audio_count: must be >= 0 (0: the whole ranking), got {recipe.prune.audio_count}")
    if recipe.prune.audio_ranking and recipe.prune.prune_audio_layers:
        problems.append("prune.audio_ranking and prune.prune_audio_layers both name audio-encoder layers to remove; "
                        "give one of them")
    bad_t = [t for t in recipe.cache.targets if t not in ("ref", "teacher")]
    if bad_t:
        problems.append(f"cache.targets: {bad_t} not in ('ref', 'teacher')")
    for key in ("data.instruction", "data.text_instruction"):
        sec, name = key.split(".")
        tmpl = getattr(getattr(recipe, sec), name)
        try:
            tmpl.format(src="English", tgt="German")
        except (KeyError, IndexError, ValueError) as e:
            problems.append(f"{key}: template {tmpl!r} may use only {{src}} and {{tgt}} ({e})")


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

class RawStr(str):
    """A value as typed on the command line: parsed by the type of the key it sets (:func:`_coerce`),
    never by YAML's rules (YAML 1.1 would read ``no`` as false and ``a: b`` as a mapping)."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], the value as a :class:`RawStr`)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected section.key=value"])
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError([f"override {text!r}: the key must name a section, e.g. data.batch_size=8"])
    return parts, RawStr(raw)


def split_list(text: str) -> list[str]:
    """``[a, "b,c", 'd']`` or ``a,b`` -> items; commas inside quotes or brackets do not split."""
    s = text.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    items, cur, quote, depth = [], "", "", 0
    for ch in s:
        if quote:
            if ch == quote:
                quote = ""
            else:
                cur += ch
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            cur += ch
        elif ch in "]}":
            depth -= 1
            cur += ch
        elif ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip() or items:
        items.append(cur.strip())
    return [i for i in items if i != ""] if len(items) == 1 and items[0] == "" else items


def _set_path(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError([f"recipe {p} does not exist (recipes live in configs/)"])
    try:
        with open(p, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {e}"], source=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of sections"], source=str(p))
    return data


def resolve(data: Mapping[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = (),
            source: str | None = None) -> Recipe:
    """Build a validated :class:`Recipe` from recipe data plus command-line overrides."""
    tree: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in (data or {}).items()}
    problems: list[str] = []
    for ov in overrides:
        try:
            parts, value = parse_override(ov)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        _set_path(tree, parts, value)
    for sec, val in tree.items():
        if sec in SECTIONS and not isinstance(val, Mapping) and val is not None:
            problems.append(f"{sec}: expected a mapping of keys, got {val!r}")
    tree = {k: (v if v is not None else {}) for k, v in tree.items()
            if not (k in SECTIONS and not isinstance(v, Mapping) and v is not None)}
    recipe = _build(Recipe, tree, "", problems)
    _check_values(recipe, problems)
    if problems:
        raise ConfigError(problems, source=source)
    return recipe


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    data = load_yaml(path) if path else {}
    return resolve(data, overrides, source=str(path) if path else None)


def replace(recipe: Recipe, **sections: Mapping[str, Any]) -> Recipe:
    """A copy of ``recipe`` with some keys of some sections changed (validated like overrides)."""
    tree = to_dict(recipe)
    for sec, kv in sections.items():
        if sec not in tree:
            raise ConfigError([f"unknown section {sec!r}; sections: {', '.join(SECTIONS)}"])
        tree[sec] = {**tree[sec], **{k: to_dict(v) for k, v in kv.items()}}
    return resolve(tree)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)


def save_resolved(recipe: Recipe, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output (atomically)."""
    from .io import atomic_write_text

    p = Path(out_dir) / name
    atomic_write_text(p, dump_yaml(recipe))
    return p


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its trailing comment in this file (the documentation of the key), continued by
    comment-only lines right below it."""
    import inspect
    import re

    out: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s{4}(\w+):[^#]*(?:#\s?(.*))?$", line)
        if m and not line.strip().startswith("#"):
            last = m.group(1)
            out[last] = (m.group(2) or "").strip()
        elif line.strip().startswith("#") and last and out.get(last):
            out[last] += " " + line.strip().lstrip("#").strip()
        elif last and not out.get(last) and "#" in line:   # a field written over two lines
            out[last] = line.split("#", 1)[1].strip()
        else:
            last = None
    return out


def field_docs(cls: type = Recipe) -> dict[str, dict[str, str]]:
    """Dotted key -> {"type", "default", "doc"} (``stc config keys``)."""
    out: dict[str, dict[str, str]] = {}
    docs = _comments(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            for k, v in field_docs(tp).items():
                out[f"{f.name}.{k}"] = v
        else:
            value = to_dict(getattr(defaults, f.name))
            out[f.name] = {"type": _type_name(tp), "default": yaml.safe_dump(value, default_flow_style=True,
                                                                           allow_unicode=True).strip().removesuffix("...").strip(),
                           "doc": docs.get(f.name, "")}
    return out


# --------------------------------------------------------------------------------------------------
# `stc config show` / `stc config keys`
# --------------------------------------------------------------------------------------------------

def show_main(recipe: Recipe, args: Any) -> int:
    """``stc config show``: the resolved recipe as YAML on stdout."""
    print(dump_yaml(recipe), end="")
    return 0


def keys_main(recipe: Any, args: Any) -> int:
    """``stc config keys``: every key with its type, default and documentation."""
    for key, d in field_docs().items():
        print(f"{key}: {d['type']} = {d['default']}")
        if d["doc"]:
            print(f"    {d['doc']}")
    return 0
