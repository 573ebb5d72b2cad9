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
    return demo.main(ovs)


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("shards build", "manifest -> WebDataset audio shards", _shards_build),
    Stage("shards inspect", "summarise (and verify) a shard directory", _shards_inspect),
    Stage("demo", "the embedded default: build the demo data (the whole chain once #6 lands)", _demo),
    Stage("shards stream", "iterate the training stream as a trainer would (diagnostic)", _shards_stream),
    Stage("finetune", "teacher fine-tuning (CE on references)", None, "#5"),
    Stage("importance", "score decoder layers and rank them for removal", None, "#3"),
    Stage("prune", "remove decoder layers and save the smaller model", None, "#3"),
    Stage("cache build", "teacher top-k logits and translations as shards", None, "#4"),
    Stage("cache verify", "check a teacher cache", None, "#4"),
    Stage("distill", "train the pruned student (CE + KD; full, LoRA, QLoRA)", None, "#5"),
    Stage("export", "merge adapters, quantise, save the student", None, "#6"),
    Stage("evaluate", "BLEU / chrF / chrF++, size and speed", None, "#6"),
    Stage("report", "markdown report with tables and plots", None, "#6"),
    Stage("pipeline", "the whole chain, resumable", None, "#6"),
    Stage("submit", "submit a stage or pipeline to SLURM", None, "#7"),
    Stage("jobs", "list submitted SLURM jobs", None, "#7"),
    Stage("cancel", "cancel a pipeline's SLURM jobs", None, "#7"),
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


if __name__ == "__main__":
    sys.exit(main())
