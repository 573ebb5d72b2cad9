"""``stc``: one thin function per stage (DESIGN 2b names), the local launcher and the registry.

Exit codes: 0 finished; 1 failed; 2 bad usage or config; 75 stopped on request and resumable
(SIGTERM/SIGUSR1 before a time limit: rerun the same command to continue).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

from . import config as cfg

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_RESUMABLE = 75  # EX_TEMPFAIL: the stage checkpointed and wants to be rerun


class StageError(RuntimeError):
    """An error with a message for the user (no traceback needed)."""


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    func: Callable[[argparse.Namespace], int] | None  # None: not available yet in this version
    issue: str = ""


def _recipe(args: argparse.Namespace) -> cfg.Recipe:
    return cfg.load(getattr(args, "config", None), getattr(args, "overrides", []) or [])


# ----------------------------------------------------------------------------------------- stages

def _shards_build(args: argparse.Namespace) -> int:
    from .data import shards

    ovs = list(args.overrides or [])
    if args.manifest:
        ovs.append(f"shards.manifest={args.manifest}")
    if args.out:
        ovs.append(f"shards.out={args.out}")
    if args.split:
        ovs.append(f"shards.split={args.split}")
    recipe = cfg.load(args.config, ovs)
    summary = shards.build(recipe)
    shards.print_summary(summary)
    return EXIT_OK if summary.get("written", 0) > 0 or summary.get("read", 0) == 0 else EXIT_FAIL


def _shards_inspect(args: argparse.Namespace) -> int:
    from .data import shards

    summary = shards.inspect(args.dir, verify=args.verify)
    shards.print_summary(summary)
    return EXIT_OK if not summary.get("problems") else EXIT_FAIL


def _shards_stream(args: argparse.Namespace) -> int:
    from .data import prompt, stream

    recipe = _recipe(args)
    try:
        stream.run_diagnostic(recipe, shards=args.shards or recipe.data.shards,
                              split=args.split or recipe.data.train_split, model=args.model,
                              max_batches=args.max_batches, state_in=args.state_in, state_out=args.state_out,
                              dump=args.dump, verify_sha256=args.verify)
    except (stream.StreamError, prompt.PromptError) as e:
        raise StageError(str(e)) from None
    return EXIT_OK


def _importance(args: argparse.Namespace) -> int:
    from .importance import ImportanceError, run_importance

    recipe = _recipe(args)
    try:
        run_importance(recipe, dry_run=args.dry_run)
    except ImportanceError as e:
        raise StageError(str(e)) from None
    return EXIT_OK


def _prune(args: argparse.Namespace) -> int:
    from .importance import ImportanceError, run_prune

    ovs = list(args.overrides or [])
    if args.ranking:
        ovs.append(f"prune.ranking={args.ranking}")
    if args.layers:
        ovs.append(f"prune.layers=[{args.layers}]")
    if args.out:
        ovs.append(f"prune.out={args.out}")
    recipe = cfg.load(args.config, ovs)
    try:
        run_prune(recipe)
    except ImportanceError as e:
        raise StageError(str(e)) from None
    return EXIT_OK


def _print_import(summary) -> None:
    for line in summary.lines():
        print(f"stc import: {line}", file=sys.stderr)


def _import_mustc(args: argparse.Namespace) -> int:
    from .data import importers

    summary = importers.import_mustc(args.root, args.split, args.src, args.tgt, args.out, as_split=args.as_split,
                                     corpus=args.corpus or importers.MUSTC_CORPUS, check=args.check)
    _print_import(summary)
    return EXIT_OK


def _import_covost(args: argparse.Namespace) -> int:
    from .data import importers

    summary = importers.import_covost(args.tsv, args.clips, args.out, src=args.src, tgt=args.tgt,
                                      split_name=args.split_name, corpus=args.corpus or importers.COVOST_CORPUS,
                                      check=args.check)
    _print_import(summary)
    return EXIT_OK


def _cache_build(args: argparse.Namespace) -> int:
    from . import teacher_cache

    recipe = _recipe(args)
    if getattr(args, "dry_run", False):
        teacher_cache.check_options(recipe)
        print(cfg.dump_yaml(recipe), end="")
        return EXIT_OK
    try:
        summary = teacher_cache.build(recipe)
    except teacher_cache.CacheError as e:
        raise StageError(str(e)) from None
    from . import dist

    if dist.env().rank == 0 and summary:
        teacher_cache.print_summary({"dir": summary["out"], **summary})
    return EXIT_OK


def _cache_verify(args: argparse.Namespace) -> int:
    from . import teacher_cache

    summary = teacher_cache.verify(args.dir, deep=args.verify)
    teacher_cache.print_summary(summary)
    return EXIT_OK if not summary["problems"] else EXIT_FAIL


def _train(args: argparse.Namespace) -> int:
    from . import train
    from .models.load import ModelLoadError
    from .train_ckpt import CheckpointError
    from .train_ds import TrainConfigError

    recipe = _recipe(args)
    try:
        code = train.run(recipe, args.stage)
    except (train.TrainError, TrainConfigError, CheckpointError, ModelLoadError) as e:
        raise StageError(str(e)) from None
    except Exception as e:  # stream/cache errors carry a user message too
        from .data.stream import StreamError

        if isinstance(e, StreamError):
            raise StageError(str(e)) from None
        raise
    return EXIT_RESUMABLE if code == train.EXIT_RESUMABLE else code


def _export(args: argparse.Namespace) -> int:
    from . import export

    recipe = _recipe(args)
    try:
        export.run(recipe)
    except export.ExportError as e:
        raise StageError(str(e)) from None
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from . import evaluate
    from .importance import ImportanceError
    from .models.load import ModelLoadError

    ovs = list(args.overrides or [])
    if getattr(args, "models", None):
        ovs.append(f"evaluate.models=[{args.models}]")
    if getattr(args, "out", None):
        ovs.append(f"evaluate.out={args.out}")
    if getattr(args, "split", None):
        ovs.append(f"evaluate.split={args.split}")
    recipe = cfg.load(args.config, ovs)
    try:
        if args.dry_run:
            syss = evaluate.systems(recipe)
            print(f"evaluate {', '.join(f'{s.name}={s.path}' for s in syss)} on split "
                  f"{evaluate.test_split(recipe)!r} of {recipe.data.shards}; out {evaluate.out_dir(recipe)}")
            return EXIT_OK
        evaluate.run_evaluate(recipe)
    except (evaluate.EvalError, ImportanceError, ModelLoadError) as e:
        raise StageError(str(e)) from None
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from . import report

    recipe = _recipe(args)
    try:
        if getattr(args, "dry_run", False):
            report.dry_run(recipe)
            return EXIT_OK
        doc = report.run(recipe)
    except report.ReportError as e:
        raise StageError(str(e)) from None
    report.print_summary(doc)
    failed = recipe.report.strict_bars and any(b["status"] == "FAIL" for b in doc["bars"])
    return EXIT_FAIL if failed else EXIT_OK


def _pipeline(args: argparse.Namespace) -> int:
    from . import pipeline

    recipe = _recipe(args)
    try:
        return pipeline.main(recipe, dry_run=args.dry_run, nproc=args.nproc)
    except pipeline.PipelineError as e:
        print(f"stc pipeline: {e}", file=sys.stderr)
        return EXIT_USAGE


def _config_show(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    print(cfg.dump_yaml(recipe), end="")
    return EXIT_OK


def _config_keys(args: argparse.Namespace) -> int:
    for k, v in cfg.field_docs().items():
        print(f"{k}: {v}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data import demo

    ovs = list(getattr(args, "overrides", None) or [])
    if getattr(args, "config", None):  # --config picks the engine recipe the demo builds shards with
        ovs.insert(0, f"demo.recipe={Path(args.config).resolve()}")
    dry = bool(getattr(args, "dry_run", False))
    if not dry:
        rc = demo.main(ovs)
        if rc != EXIT_OK or getattr(args, "data_only", False):
            return rc
    # The chain on the demo recipe: the same recipe and overrides the data was built with.
    from . import pipeline

    demo_ovs, recipe_ovs = demo.split_overrides(ovs)
    try:
        spec = demo.load_spec(overrides=demo_ovs)
    except cfg.ConfigError as e:
        print(f"stc demo: {e}", file=sys.stderr)
        return EXIT_USAGE
    recipe_path = demo._resolve(spec.recipe)
    recipe = cfg.load(recipe_path, recipe_ovs)
    teacher = demo._resolve(recipe.model.path) if recipe.model.path else None
    if not recipe.pipeline.finetune and (teacher is None or not (teacher / "config.json").is_file()):
        print(f"stc demo: the demo teacher is missing ({recipe.model.path!r} from {recipe_path}: model.path); "
              f"it ships with the repository in shards/teacher; rebuild it with `make demo-teacher`",
              file=sys.stderr)
        return EXIT_FAIL
    try:
        return pipeline.main(recipe, dry_run=dry, nproc=getattr(args, "nproc", None), data_pending=dry)
    except pipeline.PipelineError as e:
        print(f"stc demo: {e}", file=sys.stderr)
        return EXIT_USAGE


# ----------------------------------------------------------------------------------------- SLURM (#7)

def _slurm_parser() -> argparse.ArgumentParser:
    """Launcher options of `stc submit`; accepted before or after the stage, the rest goes to the stage."""
    p = argparse.ArgumentParser(prog="stc submit", add_help=False, allow_abbrev=False)
    p.add_argument("--config", "-c", help="recipe YAML (also passed to the stage)")
    p.add_argument("--nodes", type=int, help="nodes per job (default: slurm.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    p.add_argument("--ntasks-per-node", type=int, help="tasks per node without GPUs (CPU slots)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--partition", "-p")
    p.add_argument("--time", "-t", help="time limit, e.g. 04:00:00")
    p.add_argument("--account", "-A")
    p.add_argument("--qos")
    p.add_argument("--mem", help="memory per node, e.g. 200G")
    p.add_argument("--signal-seconds", type=int, help="USR1 this many seconds before the time limit")
    p.add_argument("--stages", help="pipeline only: comma-separated stages (default: the whole chain)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); submit nothing")
    return p


def _submit(args: argparse.Namespace) -> int:
    from launchers import slurm

    head, stage_argv = _slurm_parser().parse_known_args(list(args.stage_argv or []))
    for k in vars(head):  # options given before the stage name count unless repeated after it
        before = getattr(args, f"_{k}", None)
        if before not in (None, False) and getattr(head, k) in (None, False):
            setattr(head, k, before)
    stage_argv = [a for a in stage_argv if a != "--"]
    if not stage_argv:
        print("stc submit: name a stage or `pipeline`, e.g. stc submit importance --config configs/demo.yaml "
              "--nodes 2 --gpus-per-node 8", file=sys.stderr)
        return EXIT_USAGE
    try:
        if stage_argv[0] == "pipeline":
            overrides = stage_argv[1:]
            if any(not ("=" in o and not o.startswith("-")) for o in overrides):
                raise slurm.SubmitError(f"stc submit pipeline takes only section.key=value overrides, got {overrides}")
            names = [n.strip().replace("-", " ") for n in head.stages.split(",")] if head.stages \
                else list(slurm.PIPELINE)
            stages = []
            for n in names:
                st = STAGES.get(n)
                if st is None or n in ("submit", "jobs", "cancel", "pipeline"):
                    raise slurm.SubmitError(f"--stages: {n!r} is not a stage that runs as a job")
                if st.func is None:
                    raise slurm.SubmitError(f"`stc {n}` is not available in this version (issue {st.issue}); "
                                            f"choose the stages with --stages")
                stages.append((n, [*n.split(), *(["--config", head.config] if head.config else []), *overrides]))
            skip_finished = True
        else:
            name, rest_argv = slurm.stage_of(stage_argv)
            if STAGES[name].func is None:
                raise slurm.SubmitError(f"`stc {name}` is not available in this version (issue {STAGES[name].issue})")
            argv = [*name.split(), *(["--config", head.config] if head.config else []), *rest_argv]
            ns = slurm.parse_stage(argv)
            overrides = list(getattr(ns, "overrides", None) or [])
            stages, skip_finished = [(name, argv)], False
        recipe = cfg.load(head.config, [o for o in overrides if "=" in o and not o.startswith("-")])
        opts = slurm.options_from(recipe, nodes=head.nodes, gpus_per_node=head.gpus_per_node,
                                  ntasks_per_node=head.ntasks_per_node, cpus_per_task=head.cpus_per_task,
                                  partition=head.partition, time=head.time, account=head.account, qos=head.qos,
                                  mem=head.mem, signal_seconds=head.signal_seconds)
        if not head.dry_run:  # a dry run only shows the script: it needs no reachable cluster
            slurm._need("sbatch")
            slurm.check_partition(opts)
        plan = slurm.plan(stages, recipe, opts, skip_finished=skip_finished)
        jobs = slurm.submit(plan, dry_run=head.dry_run)
    except slurm.SubmitError as e:
        raise StageError(str(e)) from None
    if not head.dry_run:
        for j in jobs:
            print(j["job"])
        if plan.pipeline and len(plan.items) > 1:
            print(f"stc submit: pipeline {plan.pipeline}; follow it with `stc jobs --ledger {plan.ledger.parent}`, "
                  f"stop it with `stc cancel --pipeline {plan.pipeline} --ledger {plan.ledger.parent}`",
                  file=sys.stderr)
    return EXIT_OK


def _ledgers(args: argparse.Namespace) -> list:
    from launchers import slurm

    if args.ledger:
        return slurm._find_ledgers(args.ledger)
    if args.config:
        return slurm._find_ledgers(str(slurm.ledger_path(cfg.load(args.config, args.overrides or []))))
    return slurm._find_ledgers(None)


def _jobs(args: argparse.Namespace) -> int:
    from launchers import slurm

    try:
        slurm.print_jobs(_ledgers(args), lines=args.lines)
    except slurm.SubmitError as e:
        raise StageError(str(e)) from None
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    from launchers import slurm

    try:
        if args.target and not args.ledger:
            args.ledger = args.target
        done = slurm.cancel(_ledgers(args), pipeline=args.pipeline)
    except slurm.SubmitError as e:
        raise StageError(str(e)) from None
    print(f"stc cancel: cancelled {', '.join(done) if done else 'nothing (no unfinished jobs)'}", file=sys.stderr)
    return EXIT_OK


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("shards build", "manifest -> WebDataset audio shards", _shards_build),
    Stage("shards inspect", "summarise (and verify) a shard directory", _shards_inspect),
    Stage("demo", "the embedded default: build the demo data, then run the whole chain on it", _demo),
    Stage("shards stream", "iterate the training stream as a trainer would (diagnostic)", _shards_stream),
    Stage("finetune", "teacher fine-tuning (CE on references)", _train, "#5"),
    Stage("importance", "score decoder layers and rank them for removal", _importance, "#3"),
    Stage("prune", "remove decoder layers and save the smaller model", _prune, "#3"),
    Stage("import mustc", "MuST-C-style corpus split (YAML segments + texts + WAVs) -> manifest", _import_mustc,
          "#6"),
    Stage("import covost", "CoVoST 2 TSV + Common Voice clips -> manifest", _import_covost, "#6"),
    Stage("cache build", "teacher top-k logits and translations as shards", _cache_build, "#4"),
    Stage("cache verify", "check a teacher cache (--verify: also decode every record)", _cache_verify, "#4"),
    Stage("distill", "train the pruned student (CE + KD; full, LoRA, QLoRA)", _train, "#5"),
    Stage("export", "merge adapters, quantise, save the student", _export, "#5"),
    Stage("evaluate", "BLEU / chrF / chrF++, size and speed", _evaluate, "#6"),
    Stage("report", "markdown report with tables and plots", _report, "#6"),
    Stage("pipeline", "the whole chain (finetune .. report), resumable step by step", _pipeline, "#6"),
    Stage("submit", "submit a stage or pipeline to SLURM", _submit, "#7"),
    Stage("jobs", "list submitted SLURM jobs", _jobs, "#7"),
    Stage("cancel", "cancel a pipeline's SLURM jobs", _cancel, "#7"),
]}


def _not_available(name: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"stc {name}: not available in this version of stc-engine (tracked in issue {issue}); "
              f"stages available now: {', '.join(n for n, s in STAGES.items() if s.func)}", file=sys.stderr)
        return EXIT_USAGE
    return run


# ----------------------------------------------------------------------------------------- launcher

def _run(args: argparse.Namespace) -> int:
    from launchers.local import launch

    if args.nproc < 1:
        print("stc run: --nproc must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    argv = [a for a in args.stage_argv if a != "--"]
    if not argv:
        print("stc run: name a stage, e.g. stc run --nproc 2 importance --config configs/demo.yaml",
              file=sys.stderr)
        return EXIT_USAGE
    return launch(args.nproc, argv)


# ----------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stc", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="<stage>")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", help="recipe YAML (configs/*.yaml)")
        sp.add_argument("overrides", nargs="*", help="section.key=value overrides")

    groups: dict[str, argparse._SubParsersAction] = {}
    for name, st in STAGES.items():
        func = st.func or _not_available(name, st.issue)
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands")
                groups[group] = gp.add_subparsers(dest="subcommand", required=True, metavar="<command>")
            sp = groups[group].add_parser(leaf, help=st.help)
        else:
            sp = sub.add_parser(name, help=st.help)
        sp.set_defaults(func=func, stage=name)
        if name == "shards build":
            sp.add_argument("--manifest", "-m", help="manifest (JSONL or TSV)")
            sp.add_argument("--out", "-o", help="output directory")
            sp.add_argument("--split", help="only rows of this split")
            with_config(sp)
        elif name == "shards stream":
            sp.add_argument("--shards", help="shard directory (default: data.shards)")
            sp.add_argument("--split", help="split to stream (default: data.train_split)")
            sp.add_argument("--model", help="model dir: build prompts and features with its processor")
            sp.add_argument("--max-batches", type=int, help="stop after this many batches per rank")
            sp.add_argument("--state-in", help="resume from this stream state (JSON)")
            sp.add_argument("--state-out", help="write the stream state here at the end (rank 0)")
            sp.add_argument("--dump", help="write <dump>/rank<r>.jsonl, one line per batch")
            sp.add_argument("--verify", action="store_true", help="check each shard's sha256 when opened")
            with_config(sp)
        elif name == "prune":
            sp.add_argument("--from", dest="ranking", help="ranking.json (or its directory) from `stc importance`")
            sp.add_argument("--layers", help="comma-separated decoder layers to remove instead, e.g. 3,13,20")
            sp.add_argument("--out", "-o", help="output model directory")
            with_config(sp)
        elif name in ("import mustc", "import covost"):
            if name == "import mustc":
                sp.add_argument("root", help="corpus root: holds <split>/txt/<split>.yaml (or data/<split>/...), "
                                             "or the <split> folder itself")
                sp.add_argument("--split", required=True, help="corpus split, e.g. train, dev, tst-COMMON")
                sp.add_argument("--src", required=True, help="source language code (the texts' suffix), e.g. en")
                sp.add_argument("--tgt", required=True, help="target language code, e.g. de")
                sp.add_argument("--as-split", help="split name in the manifest (default: --split with '-' -> '_')")
                sp.add_argument("--corpus", help="corpus name written to every row (default: must-c)")
            else:
                sp.add_argument("--tsv", required=True, help="covost_v2.<src>_<tgt>.<split>.tsv")
                sp.add_argument("--clips", required=True, help="the Common Voice clips/ folder")
                sp.add_argument("--src", help="source language (default: from the TSV's file name)")
                sp.add_argument("--tgt", help="target language (default: from the TSV's file name)")
                sp.add_argument("--split-name", help="split name in the manifest (default: from the file name)")
                sp.add_argument("--corpus", help="corpus name written to every row (default: covost2)")
            sp.add_argument("--out", "-o", required=True, help="manifest to write (JSONL)")
            sp.add_argument("--check", action="store_true",
                            help="check that every audio file exists; missing ones go to <out stem>.rejects.jsonl")
        elif name == "evaluate":
            sp.add_argument("--models", help="comma-separated model dirs, each path or name=path "
                            "(default: evaluate.models, else model.path)")
            sp.add_argument("--out", "-o", help="output directory (default: evaluate.out)")
            sp.add_argument("--split", help="shard split to evaluate (default: evaluate.split)")
            with_config(sp)
            sp.add_argument("--dry-run", action="store_true", help="check the inputs and print the plan only")
        elif name == "demo":
            with_config(sp)
            sp.add_argument("--data-only", action="store_true", help="build the demo data only (no pipeline)")
            sp.add_argument("--dry-run", action="store_true", help="print the pipeline plan; build and run nothing")
            sp.add_argument("--nproc", type=int, default=None, help="ranks per multi-rank step (default: pipeline.nproc)")
        elif name == "pipeline":
            with_config(sp)
            sp.add_argument("--dry-run", action="store_true",
                            help="print the steps (command, inputs, output, done/todo); run nothing")
            sp.add_argument("--nproc", type=int, default=None,
                            help="ranks per multi-rank step via `stc run --nproc` (default: pipeline.nproc)")
        elif name == "submit":
            for a in _slurm_parser()._actions:  # shown in --help; parsed again in _submit
                sp.add_argument(*a.option_strings, dest=f"_{a.dest}", default=None, help=a.help,
                                **({"action": "store_true"} if a.nargs == 0 else {"metavar": a.dest.upper()}))
            sp.add_argument("stage_argv", nargs=argparse.REMAINDER,
                            help="<stage> [--config C] [overrides] or `pipeline` [overrides]")
        elif name in ("jobs", "cancel"):
            if name == "cancel":
                sp.add_argument("target", nargs="?", help="run directory (or its slurm/ledger.jsonl)")
                sp.add_argument("--pipeline", help="only this pipeline's jobs (printed by `stc submit`)")
            else:
                sp.add_argument("--lines", type=int, default=15, help="log lines shown for a failed job")
            sp.add_argument("--ledger", help="run directory, its slurm/ folder or the ledger.jsonl")
            sp.add_argument("--config", "-c", help="recipe YAML: its run.out_dir holds the ledger")
            sp.set_defaults(overrides=[])
        elif name in ("shards inspect", "cache verify"):
            sp.add_argument("dir")
            sp.add_argument("--verify", action="store_true", help="re-hash every shard")
        else:
            with_config(sp)
            sp.add_argument("--dry-run", action="store_true", help="print the plan only")

    cp = sub.add_parser("config", help="show the resolved config or the valid keys")
    csub = cp.add_subparsers(dest="subcommand", required=True, metavar="<command>")
    show = csub.add_parser("show", help="print the resolved recipe")
    with_config(show)
    show.set_defaults(func=_config_show)
    keys = csub.add_parser("keys", help="list every valid key with its type")
    keys.set_defaults(func=_config_keys)

    rp = sub.add_parser("run", help="run a stage on N local processes (torchrun)")
    rp.add_argument("--nproc", type=int, default=1)
    rp.add_argument("stage_argv", nargs=argparse.REMAINDER, help="stage and its arguments")
    rp.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except cfg.ConfigError as e:
        print(f"stc: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageError as e:
        print(f"stc {getattr(args, 'stage', args.command)}: error: {e}", file=sys.stderr)
        return EXIT_FAIL
    return int(code or 0)


def _main_recording_exit(argv: list[str] | None = None) -> int:
    """``main`` plus the rank's exit code for ``stc run`` (torchrun folds every failure into 1)."""
    from launchers.local import record_exit

    code = EXIT_FAIL
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAIL)
        raise
    finally:
        record_exit(code)
    return code


if __name__ == "__main__":
    # Run through the importable module, not this __main__ copy: stages raise engine.cli.StageError,
    # which main() must catch as the same class.
    from engine.cli import _main_recording_exit

    sys.exit(_main_recording_exit())
