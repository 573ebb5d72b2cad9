"""``stc pipeline``: the paper's chain as a list of stage runs, resumable step by step.

The chain (DESIGN 1, 2)::

    [finetune]          teacher fine-tune (pipeline.finetune=true; the teacher is then <run>/teacher/final)
    eval-teacher        the teacher on the test split
    eval-teacher-shuffled  the same with audio shuffled across samples (pipeline.shuffle_check): a
                        model that translates as well without its own audio is not listening
    importance          iterative layer ranking on the dev split, removing the largest pipeline.students count
    cache               teacher top-k logits + translations of the train split, built once
    per fraction r of pipeline.students (name: round(100 r)):
      prune-R           the first round(r L) layers of the ranking's removal order (prune.count)
      distill-kd-R      CE + cached word-level KD (+ sequence-level KD when distill.seq_kd)
      export-kd-R       merge the adapter, quantise (export.quant)
      eval-kd-R
    ablations of the first fraction (pipeline.ablations):
      eval-pruned-R     the pruned student before healing
      distill-ce-R, export-ce-R, eval-ce-R        healed with CE only (no cache read)
      importance-middle-R, prune-middle-R, distill-middle-R, export-middle-R, eval-middle-R
                        the same number of layers removed as one contiguous middle block
    report              `stc report` over every evaluated system

**One step = one process.** Each step runs ``python -m engine.cli [run --nproc N] <stage> --config
<run>/pipeline/config.yaml <overrides>``: a crash, a leaked CUDA context or DeepSpeed's global state
cannot reach the next stage, and every step is a command a user can copy and rerun by hand. The
overrides only place the step's inputs and outputs (``<run.out_dir>/students/r25/...``) and set what
makes an ablation an ablation; everything else comes from the one resolved config.

**Done, skipped, resumed.** A step is done when its output holds the file the stage writes last
(``meta.json``; ``scores.json`` for an evaluated system) and, where that meta records the stage's
resolved config, the keys that change the result equal this run's (operational keys such as batch
sizes and checkpoint cadence are ignored; the stages' own fingerprint checks still apply when they
run). A step whose inputs are produced by a step that still has to run is not done either. Done steps
are skipped, so a rerun continues at the first unfinished step. A step that exits 75 (stopped on
request, checkpointed) stops the pipeline with 75; any other failure stops it with the step's name
and log. Logs: ``<run>/pipeline/logs/<step>.log`` (also streamed to the terminal); status:
``<run>/pipeline/pipeline.json`` (written atomically after every change).

**Refusals before anything runs:** a missing external input (model.path, data.shards), a stage that
is not available in this version, a config key a step override cannot set, and a dev split (used to
select layers) that overlaps the test split (used to report).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import config as cfg

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_RESUMABLE = 0, 1, 2, 75
PIPELINE_DIR = "pipeline"
STATUS_NAME = "pipeline.json"
CONFIG_NAME = "config.yaml"

# Keys that do not change a stage's result: a rerun with another value keeps the step done.
# (Micro batch sizes: losses are normalised over the global batch, DESIGN 2b.)
_OPERATIONAL = {"out", "resume", "save_every", "keep_last", "eval_every", "zero_stage", "ds_config", "offload",
                "gradient_checkpointing", "zero3", "zero3_persistence_threshold", "batch_size", "decode_batch_size",
                "num_workers", "log_level", "threads", "device"}
# Sections of the resolved config whose (non-operational) keys decide whether a stage output is current.
_COMPARED = {"finetune": ("model", "data", "finetune"), "importance": ("model", "data", "importance"),
             "prune": ("model", "prune"), "cache build": ("model", "data", "cache"),
             "distill": ("model", "data", "distill"), "export": ("model", "export")}


class PipelineError(RuntimeError):
    """A refusal with a message for the user (printed without a traceback)."""

    def __init__(self, problems: Sequence[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems) if len(self.problems) == 1 else
                         "cannot run the pipeline:\n" + "\n".join(f"  - {p}" for p in self.problems))


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
    out: Path                           # the step's output directory
    marker: Path                        # the file whose presence means done (the stage writes it last)
    inputs: tuple[Input, ...] = ()
    system: Mapping[str, Any] | None = None   # evaluate steps: what system.json says (name, label, ...)

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i.made_by for i in self.inputs if i.made_by))


@dataclass
class Plan:
    steps: list[Step]
    run_dir: Path
    config_path: Path                   # the resolved config every step reads
    recipe: cfg.Recipe
    tree: dict                          # the resolved config as data (what config_path holds)
    nproc: int = 1
    problems: list[str] = field(default_factory=list)

    @property
    def status_path(self) -> Path:
        return self.run_dir / PIPELINE_DIR / STATUS_NAME

    def log_path(self, step: Step) -> Path:
        return self.run_dir / PIPELINE_DIR / "logs" / f"{step.name}.log"


# ============================================================================================ the plan

def pct(r: float) -> int:
    return int(round(100 * r))


def layer_count(r: float, n_layers: int) -> int:
    """Layers removed for fraction ``r``: the rounding `stc importance` uses for a fraction."""
    return max(1, int(round(r * n_layers)))


def decoder_layers(model_dir: str | os.PathLike) -> int | None:
    p = Path(model_dir) / "config.json"
    try:
        c = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    n = (c.get("text_config") or c).get("num_hidden_layers")
    return n if isinstance(n, int) and n > 0 else None


def _list(values: Sequence[Any]) -> str:
    """A YAML flow list for an override value (quoted: paths and `name=path` entries stay one item)."""
    return json.dumps([str(v) for v in values])


def build_plan(recipe: cfg.Recipe, *, config_path: Path | None = None, nproc: int | None = None) -> Plan:
    """The steps for ``recipe`` (pure: reads only model.path/config.json for the layer count)."""
    pc, run = recipe.pipeline, Path(recipe.run.out_dir)
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
    if pc.finetune and recipe.finetune.mode != "full":
        problems.append(f"pipeline.finetune=true needs finetune.mode=full (got {recipe.finetune.mode!r}): the teacher "
                        f"must be a whole model that importance, cache and evaluate load directly")

    model_path = Path(recipe.model.path) if recipe.model.path else Path("<model.path is empty>")
    n_layers = decoder_layers(model_path) or 0
    ext_model = Input(model_path / "config.json", "", "model.path")
    ext_data = Input(Path(recipe.data.shards or "<data.shards is empty>") / "meta.json", "", "data.shards")

    steps: list[Step] = []
    if pc.finetune:
        ft = run / "teacher"
        steps.append(Step("finetune", "finetune", (f"finetune.out={ft}",), ft, ft / "final" / "meta.json",
                          (ext_model, ext_data)))
        teacher = ft / "final"
        t_in = Input(teacher / "meta.json", "finetune", "the fine-tuned teacher")
    else:
        teacher, t_in = model_path, ext_model
    common = (f"model.path={teacher}", f"cache.teacher={teacher}")
    eval_out = run / "eval"
    quant_teacher = recipe.model.quant

    def evaluate(system: str, model: Path, model_in: Input, *, label: str, removal: float, healing: str,
                 quant: str, removed_from: str = "", shuffle: bool = False) -> Step:
        ovs = [*common, f"evaluate.out={eval_out}", f"evaluate.models={_list([f'{system}={model}'])}"]
        if shuffle or "shuffle_audio" in _fields(cfg.EvaluateConfig):
            ovs.append(f"evaluate.shuffle_audio={'true' if shuffle else 'false'}")
        inputs = (model_in, ext_data)
        return Step(f"eval-{system}", "evaluate", tuple(ovs), eval_out / system, eval_out / system / "scores.json",
                    inputs, {"name": system, "label": label, "removal": removal, "healing": healing, "quant": quant,
                             "removed_from": removed_from, "model": str(model)})

    steps.append(evaluate("teacher", teacher, t_in, label="teacher", removal=0.0, healing="none",
                          quant=quant_teacher))
    if pc.shuffle_check:
        steps.append(evaluate("teacher-shuffled", teacher, t_in, label="teacher, audio shuffled", removal=0.0,
                              healing="none", quant=quant_teacher, shuffle=True))

    counts = {r: layer_count(r, n_layers) if n_layers else 0 for r in students}
    imp = run / "importance"
    steps.append(Step("importance", "importance",
                      (*common, f"importance.out={imp}", f"importance.remove={max(counts.values(), default=0)}"),
                      imp, imp / "meta.json", (t_in, ext_data)))
    cache = run / "cache"
    cache_step = Step("cache", "cache build", (*common, f"cache.out={cache}"),
                      cache, cache / "meta.json", (t_in, ext_data))

    def student(tag: str, pruned: Path, pruned_by: str, *, kd: bool) -> tuple[Step, Step, Path]:
        d = pruned.parent / ("kd" if kd else "ce")
        dist_ovs = [*common, f"distill.out={d / 'distill'}", f"distill.student={pruned}"]
        ins = [Input(pruned / "meta.json", pruned_by, "the pruned student"), ext_data]
        if kd:
            dist_ovs += [f"distill.cache={cache}", "distill.teacher_mode=cache"]
            ins.append(Input(cache / "meta.json", "cache", "the teacher cache"))
        else:  # CE only: no KD term and no teacher translations, so the trainer reads no cache
            dist_ovs += ["distill.cache=", "distill.kd_weight=0", "distill.seq_kd=false"]
        final = d / "distill" / "final"
        dstep = Step(f"distill-{tag}", "distill", tuple(dist_ovs), d / "distill", final / "meta.json", tuple(ins))
        exp = d / "export"
        estep = Step(f"export-{tag}", "export", (*common, f"export.source={final}", f"export.out={exp}"), exp,
                     exp / "meta.json", (Input(final / "meta.json", dstep.name, "the trained student"),))
        return dstep, estep, exp

    exp_quant = recipe.export.quant
    for i, r in enumerate(students):
        p = pct(r)
        pruned = run / "students" / f"r{p}" / "pruned"
        steps.append(Step(f"prune-{p}", "prune", (*common, f"prune.ranking={imp}", f"prune.count={counts[r]}",
                                                  "prune.layers=[]", f"prune.out={pruned}"),
                          pruned, pruned / "meta.json",
                          (t_in, Input(imp / "meta.json", "importance", "the layer ranking"))))
        if i == 0:
            steps.append(cache_step)
        dstep, estep, exp = student(f"kd-{p}", pruned, f"prune-{p}", kd=True)
        steps += [dstep, estep, evaluate(f"kd-{p}", exp, Input(exp / "meta.json", estep.name, "the exported student"),
                                         label=f"{p}% removed, CE+KD", removal=r, healing="ce+kd", quant=exp_quant,
                                         removed_from=f"prune-{p}")]
        if i == 0 and pc.ablations:
            steps.append(evaluate(f"pruned-{p}", pruned,
                                  Input(pruned / "meta.json", f"prune-{p}", "the pruned student"),
                                  label=f"{p}% removed, no healing", removal=r, healing="none",
                                  quant=recipe.model.quant, removed_from=f"prune-{p}"))
            dstep, estep, exp = student(f"ce-{p}", pruned, f"prune-{p}", kd=False)
            ce_in = Input(exp / "meta.json", estep.name, "the exported student")
            steps += [dstep, estep, evaluate(f"ce-{p}", exp, ce_in, label=f"{p}% removed, CE only", removal=r,
                                             healing="ce", quant=exp_quant, removed_from=f"prune-{p}")]
            mid = run / "students" / f"middle-r{p}"
            mimp = mid / "importance"
            steps.append(Step(f"importance-middle-{p}", "importance",
                              (*common, f"importance.out={mimp}", "importance.method=middle_block",
                               f"importance.remove={counts[r]}", "importance.force_remove=[]"),
                              mimp, mimp / "meta.json", (t_in, ext_data)))
            mpruned = mid / "pruned"
            steps.append(Step(f"prune-middle-{p}", "prune",
                              (*common, f"prune.ranking={mimp}", f"prune.count={counts[r]}", "prune.layers=[]",
                               f"prune.out={mpruned}"),
                              mpruned, mpruned / "meta.json",
                              (t_in, Input(mimp / "meta.json", f"importance-middle-{p}", "the middle-block ranking"))))
            dstep, estep, exp = student(f"middle-{p}", mpruned, f"prune-middle-{p}", kd=True)
            steps += [dstep, estep,
                      evaluate(f"middle-{p}", exp, Input(exp / "meta.json", estep.name, "the exported student"),
                               label=f"{p}% removed as a middle block, CE+KD", removal=r, healing="ce+kd",
                               quant=exp_quant, removed_from=f"prune-middle-{p}")]
    if pc.report:
        rep = run / "report"
        evals = [s for s in steps if s.stage == "evaluate"]
        runs = [f"{s.name}={s.out}" for s in steps if s.stage in ("finetune", "importance", "cache build", "distill")]
        runs.append(f"evaluate={eval_out}")
        steps.append(Step("report", "report", (f"evaluate.out={eval_out}", f"report.eval_dir={eval_out}",
                                               f"report.out={rep}", f"report.importance={imp}",
                                               f"report.systems={_list([s.system['name'] for s in evals])}",
                                               f"report.runs={_list(runs)}"), rep,
                          rep / "meta.json", tuple(Input(s.marker, s.name, f"scores of {s.system['name']}")
                                                   for s in evals)))
    names = [s.name for s in steps]
    if len(set(names)) != len(names):  # logs and status are keyed by name
        problems.append(f"two steps share a name: {sorted({n for n in names if names.count(n) > 1})}")
    cp = config_path or run / PIPELINE_DIR / CONFIG_NAME
    return Plan(steps=steps, run_dir=run, config_path=cp, recipe=recipe, tree=cfg.to_dict(recipe), nproc=n_proc,
                problems=problems)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# ============================================================================================ checks

def check(plan: Plan) -> list[str]:
    """Every refusal that needs nothing to run: problems as readable lines (empty: good to go)."""
    from .cli import STAGES

    problems = list(plan.problems)
    missing = sorted({s.stage for s in plan.steps if STAGES.get(s.stage) is None or STAGES[s.stage].func is None})
    for st in missing:
        issue = STAGES[st].issue if st in STAGES else ""
        problems.append(f"`stc {st}` is not available in this version of stc-engine"
                        f"{f' (issue {issue})' if issue else ''}; the pipeline needs it for step(s) "
                        f"{', '.join(s.name for s in plan.steps if s.stage == st)}")
    for s in plan.steps:  # every step's overrides must make a valid config (e.g. a key the engine lacks)
        try:
            cfg.resolve(plan.tree, list(s.overrides))
        except cfg.ConfigError as e:
            problems += [f"step {s.name}: {p}" for p in e.problems]
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
    problems += _split_problems(r)
    return problems


def _split_problems(r: cfg.Recipe) -> list[str]:
    """The dev split that selects layers must not share samples with the split the systems are scored on."""
    from .data.stream import StreamError
    from .importance import devset as D

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


def _compared(tree: Mapping[str, Any], sections: Sequence[str]) -> dict[str, Any]:
    out = {}
    for sec in sections:
        for k, v in (tree.get(sec) or {}).items():
            if k not in _OPERATIONAL:
                out[f"{sec}.{k}"] = v
    return json.loads(json.dumps(out))


def stale_reason(plan: Plan, step: Step) -> str | None:
    """Why a step's existing output does not count as done; None when it is done."""
    if not step.marker.exists():
        return "todo"
    sections = _COMPARED.get(step.stage)
    if not sections:
        return None
    meta = _meta(step.marker)
    if meta is None:
        return f"stale: {step.marker} is unreadable"
    theirs = meta.get("config")
    if not isinstance(theirs, Mapping):
        return None  # the stage records no config: the marker is all there is to check
    try:
        mine = cfg.to_dict(cfg.resolve(plan.tree, list(step.overrides)))
    except cfg.ConfigError:
        return "todo"
    a, b = _compared(theirs, sections), _compared(mine, sections)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        k = diff[0]
        return f"stale: {k} was {a.get(k)!r}, now {b.get(k)!r}" + (f" (+{len(diff) - 1} more)" if len(diff) > 1 else "")
    return None


def states(plan: Plan) -> dict[str, str]:
    """``done`` or why not, per step; a step after an unfinished producer is never done."""
    out: dict[str, str] = {}
    for s in plan.steps:
        why = stale_reason(plan, s)
        pending = [d for d in s.deps if out.get(d, "done") != "done"]
        if why is None and pending:
            why = f"todo (after {pending[0]})"
        out[s.name] = "done" if why is None else why
    return out


def command(plan: Plan, step: Step) -> list[str]:
    """The step's command line (what runs, and what --dry-run prints)."""
    from launchers.slurm import SINGLE_TASK

    argv = [*step.stage.split(), "--config", str(plan.config_path), *step.overrides]
    if plan.nproc > 1 and step.stage not in SINGLE_TASK:
        argv = ["run", "--nproc", str(plan.nproc), *argv]
    return [sys.executable, "-m", "engine.cli", *argv]


def print_plan(plan: Plan, st: Mapping[str, str]) -> None:
    import shlex

    from rich.table import Table

    from .log import console

    t = Table(title=f"stc pipeline: {len(plan.steps)} steps, {sum(v == 'done' for v in st.values())} done "
                    f"(run dir {plan.run_dir})", show_lines=True)
    for c in ("#", "step", "command", "inputs", "output", "state"):
        t.add_column(c, overflow="fold")
    for i, s in enumerate(plan.steps, 1):
        cmd = shlex.join(command(plan, s)[1:])  # without the interpreter path
        ins = "\n".join(f"{i_.path}" + (f" ({i_.made_by})" if i_.made_by else f" ({i_.what})") for i_ in s.inputs)
        t.add_row(str(i), s.name, cmd, ins, str(s.out), st[s.name])
    console.print(t)


# ============================================================================================ running

Runner = Callable[[Step, list[str], Path], int]


def subprocess_runner(step: Step, argv: list[str], log_path: Path) -> int:
    """Run one step; its output goes to ``log_path`` and, prefixed with the step name, to stderr.

    SIGTERM / SIGUSR1 sent to the pipeline are passed on to the step, which checkpoints and exits 75;
    Ctrl-C reaches the step through the terminal's process group anyway.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                errors="replace", bufsize=1)
        old = {}

        def forward(signum, _frame):
            if proc.poll() is None:
                proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                old[sig] = signal.signal(sig, forward)
            except ValueError:  # not the main thread
                pass
        try:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    sys.stderr.write(f"[{step.name}] {line}")
            except KeyboardInterrupt:  # the step got the Ctrl-C too: let it checkpoint and report (75)
                log.write(proc.stdout.read())
            return proc.wait()
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)


def _write_status(plan: Plan, status: dict) -> None:
    from .io import atomic_write_json

    status["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(plan.status_path, status)


def removed_layers(step: Step, plan: Plan) -> list[int]:
    """The original decoder-layer numbers an evaluated system lacks (from the prune step's meta)."""
    if not step.system or not step.system.get("removed_from"):
        return []
    prune = next(s for s in plan.steps if s.name == step.system["removed_from"])
    meta = _meta(prune.marker) or {}
    return list((meta.get("pruned") or {}).get("removed_original") or [])


def write_system(step: Step, plan: Plan) -> Path:
    """``system.json`` next to the system's scores: what `stc report` labels the row with."""
    from .io import atomic_write_json

    sysd = dict(step.system or {})
    doc = {"name": sysd.get("name"), "label": sysd.get("label"), "removed_layers": removed_layers(step, plan),
           "removal": sysd.get("removal"), "healing": sysd.get("healing"), "quant": sysd.get("quant"),
           "model": sysd.get("model"), "step": step.name}
    p = step.out / "system.json"
    atomic_write_json(p, doc)
    return p


def missing_inputs(plan: Plan, step: Step) -> list[str]:
    out = []
    for i in step.inputs:
        if not i.path.exists():
            by = f"it is made by step {i.made_by!r}" if i.made_by else f"it comes from outside the pipeline ({i.what})"
            out.append(f"step {step.name!r} needs {i.path} ({i.what}), which does not exist; {by}")
    return out


def run(plan: Plan, *, runner: Runner | None = None, echo: Callable[[str], None] | None = None) -> int:
    """Run every unfinished step in order; returns 0, 75 (stopped, rerun to continue) or 1 (a step failed)."""
    from .log import console

    runner = runner or subprocess_runner
    say = echo or (lambda m: console.print(m, highlight=False))
    problems = check(plan)
    if problems:
        raise PipelineError(problems)
    plan.config_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.save_resolved(plan.recipe, plan.config_path.parent, plan.config_path.name)
    st = states(plan)
    status: dict[str, Any] = {
        "kind": "pipeline", "config": str(plan.config_path), "nproc": plan.nproc, "state": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps": [{"name": s.name, "stage": s.stage, "out": str(s.out), "log": str(plan.log_path(s)),
                   "command": command(plan, s), "state": "done" if st[s.name] == "done" else "todo",
                   "seconds": None, "exit": None} for s in plan.steps]}
    rec = {r["name"]: r for r in status["steps"]}
    _write_status(plan, status)
    ran: set[str] = set()
    n = len(plan.steps)
    for k, s in enumerate(plan.steps, 1):
        # done unless it, or a step it reads from, was (re)made in this run
        if st[s.name] == "done" and not (set(s.deps) & ran):
            say(f"[{k}/{n}] {s.name}: done, skipped ({s.marker})")
            rec[s.name]["state"] = "skipped"
            if s.stage == "evaluate":
                write_system(s, plan)
            _write_status(plan, status)
            continue
        missing = missing_inputs(plan, s)
        if missing:
            rec[s.name]["state"] = "failed"
            status["state"] = "failed"
            _write_status(plan, status)
            raise PipelineError(missing)
        argv = command(plan, s)
        say(f"[{k}/{n}] {s.name}: {st[s.name]} -> running `stc {' '.join(argv[3:])}` (log {plan.log_path(s)})")
        rec[s.name].update(state="running", started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _write_status(plan, status)
        t0 = time.perf_counter()
        code = runner(s, argv, plan.log_path(s))
        secs = round(time.perf_counter() - t0, 1)
        rec[s.name].update(seconds=secs, exit=code)
        if code == 0 and not s.marker.exists():
            say(f"step {s.name} exited 0 but wrote no {s.marker}; treating it as failed")
            code = EXIT_FAIL
            rec[s.name]["exit"] = code
        if code == EXIT_RESUMABLE:
            rec[s.name]["state"] = status["state"] = "stopped"
            _write_status(plan, status)
            say(f"step {s.name} stopped resumably after {secs}s (exit 75); rerun the same `stc pipeline` command "
                f"to continue from it")
            return EXIT_RESUMABLE
        if code != 0:
            rec[s.name]["state"] = status["state"] = "failed"
            status["failed_step"] = s.name
            _write_status(plan, status)
            say(f"step {s.name} failed (exit {code}) after {secs}s; log: {plan.log_path(s)}")
            return EXIT_FAIL
        ran.add(s.name)
        rec[s.name]["state"] = "done"
        if s.stage == "evaluate":
            write_system(s, plan)
        _write_status(plan, status)
        say(f"[{k}/{n}] {s.name}: done in {secs}s")
    status["state"] = "done"
    _write_status(plan, status)
    say(f"pipeline finished: {n} steps ({len(ran)} run, {n - len(ran)} already done); status {plan.status_path}")
    return EXIT_OK


def main(recipe: cfg.Recipe, *, dry_run: bool = False, nproc: int | None = None,
         runner: Runner | None = None, data_pending: bool = False) -> int:
    """``stc pipeline``: plan, refuse early, then run (or print the plan with --dry-run).

    ``data_pending`` (``stc demo --dry-run``): the caller builds ``data.shards`` before running the
    chain, so a dry run does not count their absence as a refusal."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise PipelineError("stc pipeline runs as one process and starts each stage on its ranks itself: run "
                            "`stc pipeline --nproc N ...`, not `stc run --nproc N pipeline ...`")
    plan = build_plan(recipe, nproc=nproc)
    if dry_run:
        print_plan(plan, states(plan))
        problems = check(plan)
        if data_pending:
            from .log import console

            pending = [p for p in problems if p.startswith("data.shards")]
            problems = [p for p in problems if p not in pending]
            if pending:
                console.print(f"data.shards {recipe.data.shards}: not built yet; `stc demo` builds it before the "
                              f"chain runs", highlight=False)
        if problems:
            from .log import console

            console.print("[bold red]the pipeline would refuse to run:[/]\n" + "\n".join(f"  - {p}" for p in problems),
                          highlight=False)
            return EXIT_USAGE
        return EXIT_OK
    return run(plan, runner=runner)
