"""SLURM launcher: ``stc submit``, ``stc jobs``, ``stc cancel``.

**One stage = one job.** ``stc submit <stage> ...`` renders ``launchers/templates/stage.sbatch`` into
``<run.out_dir>/slurm/<stage>.sbatch`` (readable; ``sbatch <file>`` re-submits it by hand) and submits
it with ``sbatch --parsable``. Inside the job ``srun`` starts ``nodes x ntasks-per-node`` copies of
``python -m engine.cli <stage> ...``: one task per GPU (``--gpus-per-node G`` implies ``G`` tasks per
node) or per CPU slot (``--ntasks-per-node``). Ranks come from ``SLURM_*`` (``engine/dist.py``), the
rendezvous host is the job's first node (``scontrol show hostnames``) and the node count is
``$SLURM_NNODES``: the script never repeats what the allocation already says.

**Pipelines are job chains.** ``stc submit pipeline`` submits one job per stage, each with
``--dependency=afterok:<previous> --kill-on-invalid-dep=yes``: the chain runs unattended and a failed
stage cancels everything after it. A stage whose output ``meta.json`` exists (the stages write it last)
is finished and not submitted again, so resubmitting a half-done pipeline continues it. If any
``sbatch`` of a chain fails, the jobs already submitted for it are cancelled: nothing is left
half-submitted.

**Importance candidates and cache shards: one multi-node job, not job arrays.** The importance scan
is iterative (iteration ``i + 1`` depends on the layer removed in ``i``), so an array would need one
array per iteration, chained, each task loading the model again; inside one job the ranks load the
model once, split the candidates of every iteration among themselves (journalled, each computed
once) and reuse the shared prefix. The teacher cache splits shards across ranks inside one job for
the same reason (a 7B teacher loaded once per rank, not once per shard) and writes its ``meta.json``
once every shard exists; both stages skip finished units when rerun, so a requeued or resubmitted
job only computes what is missing. The price: the job waits until all its nodes are free at once,
where an array's tasks could backfill gaps.

**Preemption and time limits.** Every job carries ``--signal=B:USR1@<seconds>`` and ``--requeue``.
The batch script runs ``srun ... &`` and waits in a loop so its trap fires while the tasks run; the
trap forwards USR1 to all steps (``scancel --signal=USR1 <job>``: every task on every node, not the
script). A stage that checkpoints on request exits 75 (``engine.cli.EXIT_RESUMABLE``); the script then
calls ``scontrol requeue``, the job comes back with ``SLURM_RESTART_COUNT`` >= 1 and resumes. A stage
that does not catch USR1 dies of it; it is requeued too, because every stage writes as it goes and
skips finished work. The job is never "completed" meanwhile, so ``afterok`` dependents wait. At most
``slurm.max_restarts`` requeues, so a stage that always exits 75 cannot loop forever.

**Ledger.** ``<run.out_dir>/slurm/ledger.jsonl`` gets a line per event: submitted (by ``stc submit``:
job, stage, pipeline, dependency, script, log), started / signal / requeued / finished (by the batch
script, with restarts and exit code). ``stc jobs`` merges it with ``scontrol show job`` because
finished jobs vanish from ``scontrol`` after ``MinJobAge`` and accounting (``sacct``) may be off.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

TEMPLATE = Path(__file__).resolve().parent / "templates" / "stage.sbatch"
LEDGER_NAME = "ledger.jsonl"
EXIT_RESUMABLE = 75
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
BAD = TERMINAL - {"COMPLETED"}
# The paper's chain in data-flow order (DESIGN 2): what `stc submit pipeline` submits by default.
PIPELINE = ("shards build", "finetune", "importance", "prune", "cache build", "distill", "export", "evaluate",
            "report")


# Stages that are one process by design (no ranks): in a chain they get one task on one node, so
# e.g. eight `shards build` processes never race for the same output folder.
SINGLE_TASK = {"shards build", "shards inspect", "prune", "cache verify", "export", "report"}


class SubmitError(RuntimeError):
    """A problem with a message for the user (the CLI prints it without a traceback)."""


# ----------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class JobOptions:
    """What one job asks SLURM for. Defaults come from the recipe's ``slurm:`` section, the CLI wins."""
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int = 0         # 0: gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 0           # 0: SLURM's default
    partition: str = ""
    time: str = ""
    account: str = ""
    qos: str = ""
    mem: str = ""
    signal_seconds: int = 300
    requeue: bool = True
    max_restarts: int = 10
    stage_to_local_disk: bool = False
    extra_sbatch: tuple[str, ...] = ()

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or self.gpus_per_node or 1

    def check(self) -> None:
        bad = []
        for name in ("nodes",):
            if getattr(self, name) < 1:
                bad.append(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("gpus_per_node", "ntasks_per_node", "cpus_per_task", "signal_seconds", "max_restarts"):
            if getattr(self, name) < 0:
                bad.append(f"--{name.replace('_', '-')} must be >= 0")
        if self.gpus_per_node and self.ntasks_per_node and self.ntasks_per_node != self.gpus_per_node:
            bad.append(f"--ntasks-per-node {self.ntasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                       "the engine runs one task per GPU")
        if bad:
            raise SubmitError("; ".join(bad))


def options_from(recipe: Any, **cli: Any) -> JobOptions:
    """Recipe ``slurm:`` section (when the config has one) overridden by the CLI values that are set."""
    base = JobOptions()
    sec = getattr(recipe, "slurm", None)
    if sec is not None:
        base = replace(base, **{k: getattr(sec, k) for k in JobOptions.__dataclass_fields__ if hasattr(sec, k)})
    given = {k: v for k, v in cli.items() if v is not None and k in JobOptions.__dataclass_fields__}
    opts = replace(base, **given)
    opts.check()
    return opts


# ----------------------------------------------------------------------------------------- SLURM calls

def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise SubmitError(f"`{binary}` not found on PATH: this machine is not a SLURM submit host (or SLURM's "
                          f"client tools are not loaded). To run here instead: stc run --nproc N <stage> ...")
    return path


def _slurm(args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def slurm_message(r: subprocess.CompletedProcess) -> str:
    return (r.stderr.strip() or r.stdout.strip() or f"exit code {r.returncode}")


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job -o <id>`` as a dict; {} when slurmctld no longer knows the job."""
    if shutil.which("scontrol") is None:
        return {}
    r = _slurm(["scontrol", "show", "job", "-o", str(job)])
    if r.returncode != 0:
        return {}
    info: dict[str, str] = {}
    for tok in r.stdout.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            info.setdefault(k, v)
    return info


def default_partition() -> str:
    r = _slurm(["sinfo", "-h", "-o", "%P"])
    for p in r.stdout.split():
        if p.endswith("*"):
            return p[:-1]
    return ""


def check_partition(opts: JobOptions) -> None:
    """Refuse before submitting anything: a partition that does not exist, GPUs on a CPU-only one."""
    if shutil.which("scontrol") is None or shutil.which("sinfo") is None:
        return
    part = opts.partition or default_partition()
    if opts.partition:
        r = _slurm(["scontrol", "show", "partition", "-o", opts.partition])
        if r.returncode != 0 and "not found" not in slurm_message(r):
            raise SubmitError(f"cannot ask SLURM about partition {opts.partition!r}: {slurm_message(r)}")
        if r.returncode != 0 or "PartitionName=" not in r.stdout:
            raise SubmitError(f"partition {opts.partition!r}: SLURM says: {slurm_message(r)} "
                              f"(partitions: {', '.join(_partitions()) or 'none'})")
    if opts.gpus_per_node and part:
        r = _slurm(["sinfo", "-h", "-p", part, "-o", "%G"])
        gres = [g for g in r.stdout.split() if g]
        counts = [_gpu_count(g) for g in gres]
        if not any(counts):
            raise SubmitError(f"--gpus-per-node {opts.gpus_per_node}: partition {part!r} has no GPUs (its nodes' "
                              f"GRES: {', '.join(sorted(set(gres))) or '(none)'}); drop --gpus-per-node to run one "
                              f"task per CPU slot, or pick a GPU partition (sinfo -o '%P %G')")
        if max(counts) < opts.gpus_per_node:
            raise SubmitError(f"--gpus-per-node {opts.gpus_per_node}: the nodes of partition {part!r} have at most "
                              f"{max(counts)} GPU(s)")


def _partitions() -> list[str]:
    r = _slurm(["sinfo", "-h", "-o", "%P"])
    return [p.rstrip("*") for p in r.stdout.split()]


def _gpu_count(gres: str) -> int:
    """GPUs in a sinfo %G field such as ``gpu:a100:4(S:0-1)``, ``gpu:8,shard:8`` or ``(null)``."""
    total = 0
    for part in re.split(r",(?![^()]*\))", gres):
        part = re.sub(r"\(.*\)$", "", part)
        bits = part.split(":")
        if bits and bits[0] == "gpu":
            total += int(bits[-1]) if bits[-1].isdigit() else 1
    return total


def sbatch(script: Path, dependency: str | None = None) -> str:
    """Submit; returns the job id. ``dependency``: an afterok chain (cancelled if it can never run)."""
    cmd = [_need("sbatch"), "--parsable"]
    if dependency:
        cmd += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    cmd.append(str(script))
    r = _slurm(cmd)
    if r.returncode != 0:
        raise SubmitError(f"sbatch {script.name} failed: {slurm_message(r)}")
    job = r.stdout.strip().split(";")[0]
    if not job.isdigit():
        raise SubmitError(f"sbatch {script.name}: unexpected answer {r.stdout.strip()!r}")
    return job


def scancel(jobs: Iterable[str], signal: str | None = None) -> subprocess.CompletedProcess | None:
    ids = [str(j) for j in jobs]
    if not ids:
        return None
    cmd = [_need("scancel")] + ([f"--signal={signal}"] if signal else []) + ids
    return _slurm(cmd)


# ----------------------------------------------------------------------------------------- rendering

def slug(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", stage).strip("-")


def slurm_dir(recipe: Any) -> Path:
    return Path(recipe.run.out_dir) / "slurm"


def ledger_path(recipe: Any) -> Path:
    return slurm_dir(recipe) / LEDGER_NAME


def stage_command(stage_argv: Sequence[str]) -> list[str]:
    """What each task runs: the ``stc`` entry point of the environment that submitted the job.

    The entry point rather than ``python -m engine.cli``: run as ``__main__`` the CLI module exists
    twice, and a ``StageError`` raised by a stage (imported from ``engine.cli``) would escape the
    ``except`` of ``__main__``'s copy as a traceback instead of a one-line message.
    """
    stc = Path(sys.executable).parent / "stc"
    if stc.exists():
        return [str(stc), *stage_argv]
    return [sys.executable, "-m", "engine.cli", *stage_argv]


@dataclass(frozen=True)
class Rendered:
    stage: str
    script: Path
    log: str            # sbatch --output pattern (%j: the job id)
    text: str


def render(stage: str, command: Sequence[str], opts: JobOptions, out_dir: Path, *, workdir: Path | None = None,
           shards: str = "") -> Rendered:
    """The sbatch script for one stage; pure (same inputs, same text), so --dry-run shows what is submitted."""
    out_dir = Path(out_dir).resolve()
    script = out_dir / f"{slug(stage)}.sbatch"
    log = str(out_dir / f"{slug(stage)}-%j.log")
    lines = [f"--job-name=stc-{slug(stage)}", f"--nodes={opts.nodes}", f"--ntasks-per-node={opts.tasks_per_node}"]
    if opts.gpus_per_node:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task:
        lines.append(f"--cpus-per-task={opts.cpus_per_task}")
    for key in ("partition", "time", "account", "qos", "mem"):
        if getattr(opts, key):
            lines.append(f"--{key}={getattr(opts, key)}")
    lines += [f"--output={log}", "--open-mode=append",  # a requeued job continues the same log
              f"--signal=B:USR1@{opts.signal_seconds}"]
    lines.append("--requeue" if opts.requeue else "--no-requeue")
    lines += list(opts.extra_sbatch)
    staging, extra = "", ""
    if opts.stage_to_local_disk:
        if not shards:
            raise SubmitError("slurm.stage_to_local_disk: the recipe has no data.shards to stage")
        staging = ("# Shards staged to node-local disk (one copy per node), read from there by every task.\n"
                   'LOCAL_SHARDS="$JOB_TMP/shards"\n'
                   'srun --ntasks="$NNODES" --ntasks-per-node=1 bash -c \'mkdir -p "$1" && cp -a "$0"/. "$1"/\' '
                   f'{shlex.quote(str(Path(shards).resolve()))} "$LOCAL_SHARDS" '
                   "|| { echo 'stc-slurm: staging the shards failed'; ledger finished ', \"exit\": 1'; exit 1; }\n")
        extra = ' data.shards="$LOCAL_SHARDS"'
    values = {
        "stage": stage,
        "script": str(script),
        "ledger": str(out_dir / LEDGER_NAME),
        "ledger_q": shlex.quote(str(out_dir / LEDGER_NAME)),
        "stage_json_q": shlex.quote(json.dumps(stage)),
        "max_restarts": str(opts.max_restarts),
        "workdir_q": shlex.quote(str(Path(workdir or os.getcwd()).resolve())),
        "sbatch_lines": "\n".join(f"#SBATCH {x}" for x in lines),
        "staging": staging,
        "srun_args": "",
        "command": shlex.join(command),
        "extra_args": extra,
        "requeue": "1" if opts.requeue else "0",
    }
    text = TEMPLATE.read_text(encoding="utf-8")

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {{{{{m.group(1)}}}}} has no value")
        return values[m.group(1)]

    return Rendered(stage=stage, script=script, log=log, text=re.sub(r"\{\{(\w+)\}\}", sub, text))


# ----------------------------------------------------------------------------------------- stages

def stage_of(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Split ``["shards", "build", "--config", ...]`` into ("shards build", rest) using the registry."""
    from engine.cli import STAGES

    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in STAGES:
        return f"{argv[0]} {argv[1]}", list(argv[2:])
    if argv and argv[0] in STAGES:
        return argv[0], list(argv[1:])
    raise SubmitError(f"unknown stage {' '.join(argv[:2])!r}; stages: {', '.join(STAGES)}")


def parse_stage(argv: Sequence[str]) -> argparse.Namespace:
    """Validate the stage's own arguments with the CLI's parser now, not in the queue an hour later."""
    from engine import cli

    try:
        return cli.build_parser().parse_args(list(argv))
    except SystemExit:
        raise SubmitError(f"`stc {' '.join(argv)}` is not a valid stage command line (see the message above)") \
            from None


def finished_marker(recipe: Any, stage: str) -> Path | None:
    """The ``meta.json`` whose presence means the stage's output is complete (written last)."""
    out = Path(recipe.run.out_dir)

    def o(section: str, default: str) -> Path:
        return Path(getattr(recipe, section).out or out / default)

    return {
        "shards build": o("shards", "shards") / "meta.json",
        "finetune": o("finetune", "finetune") / "final" / "meta.json",
        "importance": o("importance", "importance") / "meta.json",
        "prune": o("prune", "pruned") / "meta.json",
        "cache build": o("cache", "cache") / "meta.json",
        "distill": o("distill", "distill") / "final" / "meta.json",
        "export": o("export", "export") / "meta.json",
        "evaluate": o("evaluate", "eval") / "meta.json",
        "report": o("report", "report") / "meta.json",
    }.get(stage)


# ----------------------------------------------------------------------------------------- ledger

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append(ledger: Path, event: str, **fields: Any) -> None:
    from engine.io import append_jsonl

    append_jsonl(ledger, {"event": event, "time": _now(), **fields})


def read_ledger(ledger: Path) -> list[dict]:
    from engine.io import read_jsonl

    recs, _bad = read_jsonl(ledger)  # a line cut by a crash is skipped, the rest still counts
    for r in recs:
        r["_ledger"] = str(ledger)
    return recs


# ----------------------------------------------------------------------------------------- submit

@dataclass
class Plan:
    """What a submission does: per stage a rendered script, or the reason it is skipped."""
    items: list[tuple[str, Rendered | None, str]] = field(default_factory=list)  # (stage, rendered, skip reason)
    ledger: Path = Path()
    pipeline: str = ""


def plan(stages: Sequence[tuple[str, list[str]]], recipe: Any, opts: JobOptions, *, skip_finished: bool,
         command_for: Any = None) -> Plan:
    """Render every stage; ``stages``: (name, full stage argv). ``command_for``: test hook for the srun command."""
    out = slurm_dir(recipe)
    p = Plan(ledger=(out / LEDGER_NAME).resolve())
    for name, argv in stages:
        marker = finished_marker(recipe, name) if skip_finished else None
        if marker is not None and marker.exists():
            p.items.append((name, None, f"finished ({marker} exists)"))
            continue
        command = command_for(name, argv) if command_for else stage_command(argv)
        o = opts
        if name in SINGLE_TASK:
            o = replace(opts, nodes=1, ntasks_per_node=1, gpus_per_node=min(opts.gpus_per_node, 1))
        p.items.append((name, render(name, command, o, out, shards=recipe.data.shards), ""))
    return p


def submit(p: Plan, *, dry_run: bool = False, out=None) -> list[dict]:
    """Write the scripts and submit them as an afterok chain; on any failure cancel what was submitted."""
    out = out or sys.stdout
    done: list[dict] = []
    if dry_run:
        for name, r, why in p.items:
            if r is None:
                print(f"# skip `stc {name}`: {why}", file=out)
                continue
            dep = " --dependency=afterok:<previous job> --kill-on-invalid-dep=yes" if done else ""
            print(f"# sbatch --parsable{dep} {r.script}", file=out)
            print(r.text, end="", file=out)
            done.append({"stage": name, "script": str(r.script)})
        return done
    _need("sbatch")
    p.pipeline = p.pipeline or (time.strftime("p%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2))
    previous: str | None = None
    for name, r, why in p.items:
        if r is None:
            append(p.ledger, "skipped", stage=name, pipeline=p.pipeline, reason=why)
            print(f"stc submit: skip `stc {name}`: {why}", file=sys.stderr)
            continue
        from engine.io import atomic_write_text

        atomic_write_text(r.script, r.text)
        os.chmod(r.script, 0o755)
        try:
            job = sbatch(r.script, previous)
        except SubmitError as e:
            if done:
                scancel([d["job"] for d in done])
                for d in done:
                    append(p.ledger, "cancelled", job=d["job"], stage=d["stage"], pipeline=p.pipeline,
                           reason=f"submission of `stc {name}` failed")
                e = SubmitError(f"{e}\ncancelled the jobs already submitted for this pipeline: "
                                f"{', '.join(d['job'] for d in done)}")
            raise e from None
        log = r.log.replace("%j", job)
        rec = {"job": job, "stage": name, "pipeline": p.pipeline, "dependency": previous, "script": str(r.script),
               "log": log}
        append(p.ledger, "submitted", **rec)
        done.append(rec)
        print(f"stc submit: `stc {name}` -> job {job}" + (f" (afterok:{previous})" if previous else "")
              + f"; log {log}", file=sys.stderr)
        previous = job
    return done


# ----------------------------------------------------------------------------------------- jobs

@dataclass
class JobView:
    job: str
    stage: str
    pipeline: str
    dependency: str | None
    log: str
    state: str
    restarts: int
    why: str = ""
    exit: int | None = None


def _find_ledgers(target: str | None) -> list[Path]:
    if target:
        t = Path(target)
        for cand in (t, t / LEDGER_NAME, t / "slurm" / LEDGER_NAME):
            if cand.is_file():
                return [cand]
        raise SubmitError(f"no SLURM ledger at {t} (looked for {t / 'slurm' / LEDGER_NAME}); "
                          "jobs are recorded under <run.out_dir>/slurm/")
    return sorted(Path("runs").glob(f"*/slurm/{LEDGER_NAME}"))


def job_views(ledger: Path, live: bool = True) -> list[JobView]:
    """Every submitted job of a ledger with its state: scontrol while it knows the job, else the ledger."""
    recs = read_ledger(ledger)
    views: dict[str, JobView] = {}
    events: dict[str, list[dict]] = {}
    for r in recs:
        job = str(r.get("job", ""))
        if r["event"] == "submitted":
            views[job] = JobView(job=job, stage=r.get("stage", "?"), pipeline=r.get("pipeline") or "-",
                                 dependency=r.get("dependency"), log=r.get("log", ""), state="?", restarts=0)
        elif job:
            events.setdefault(job, []).append(r)
    for job, v in views.items():
        ev = events.get(job, [])
        for e in ev:
            v.restarts = max(v.restarts, int(e.get("restarts") or 0))
        info = job_info(job) if live else {}
        if info:
            v.state = info.get("JobState", "?")
            v.restarts = max(v.restarts, int(info.get("Restarts", "0") or 0))
            reason = info.get("Reason", "None")
            code = info.get("ExitCode", "")
            if code and ":" in code:
                v.exit = int(code.split(":")[0])
            if reason not in ("None", "") and v.state != "COMPLETED":
                v.why = {"DependencyNeverSatisfied": f"dependency {v.dependency} never satisfied: it did not "
                                                     f"complete, so this stage never ran"}.get(reason, reason)
            if v.state == "FAILED" and v.exit is not None:
                v.why = f"exit code {v.exit}"
            continue
        # Gone from slurmctld (MinJobAge) or no SLURM here: the batch script's own lines tell.
        last = ev[-1] if ev else None
        if last is None:
            v.state, v.why = "UNKNOWN", "not known to scontrol and never started (cancelled or purged before it ran)"
        elif last["event"] == "finished":
            v.exit = int(last.get("exit", 1))
            v.state = "COMPLETED" if v.exit == 0 else "FAILED"
            v.why = "" if v.exit == 0 else f"exit code {v.exit}"
        elif last["event"] == "cancelled":
            v.state, v.why = "CANCELLED", last.get("reason", "")
        elif last["event"] == "requeued":
            v.state, v.why = "REQUEUED", "requeued, then no longer known to scontrol"
        else:
            v.state = "ENDED?"
            v.why = (f"last event {last['event']!r} at {last.get('time')}; the script did not report an end "
                     "(killed: time limit, scancel or node failure?)")
    by_job = views
    for v in by_job.values():  # a job that never ran because what it depends on failed
        d = by_job.get(str(v.dependency)) if v.dependency else None
        if d is not None and v.state in ("UNKNOWN", "CANCELLED") and d.state in BAD | {"ENDED?"}:
            v.state = "CANCELLED"
            v.why = f"never ran: dependency {d.job} (`stc {d.stage}`) {d.state}"
    return list(views.values())


def tail(path: str, n: int = 15) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            return f.read().decode("utf-8", errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return [f"(no log at {path}: the job never started)"]
    except OSError as e:
        return [f"(cannot read {path}: {e})"]


def print_jobs(ledgers: Sequence[Path], lines: int = 15, out=None) -> int:
    out = out or sys.stdout
    if not ledgers:
        print("no SLURM ledgers found (runs/*/slurm/ledger.jsonl); give --ledger DIR or --config", file=out)
        return 0
    failed = 0
    for ledger in ledgers:
        views = job_views(ledger)
        print(f"ledger: {ledger}", file=out)
        rows = [("JOB", "STAGE", "PIPELINE", "STATE", "RESTARTS", "AFTER", "LOG")]
        rows += [(v.job, v.stage, v.pipeline, v.state, str(v.restarts), v.dependency or "-", v.log) for v in views]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        for v in views:
            if v.state in BAD | {"ENDED?", "UNKNOWN"}:
                failed += 1
                print(f"\njob {v.job} `stc {v.stage}` {v.state}: {v.why or 'see the log'}", file=out)
                print(f"  log: {v.log}" + ("" if Path(v.log).exists() else " (not written: the job never started)"),
                      file=out)
                if Path(v.log).exists():
                    for line in tail(v.log, lines):
                        print(f"  | {line}", file=out)
        print(file=out)
    return failed


def cancel(ledgers: Sequence[Path], pipeline: str | None = None) -> list[str]:
    """scancel the jobs of a pipeline (or of every pipeline in the ledgers) that are not finished."""
    cancelled: list[str] = []
    for ledger in ledgers:
        for v in job_views(ledger):
            if pipeline and v.pipeline != pipeline:
                continue
            if v.state in TERMINAL or v.state in ("UNKNOWN", "ENDED?"):
                continue
            cancelled.append(v.job)
            append(ledger, "cancelled", job=v.job, stage=v.stage, pipeline=v.pipeline, reason="stc cancel")
    if cancelled:
        r = scancel(cancelled)
        if r is not None and r.returncode != 0:
            raise SubmitError(f"scancel {' '.join(cancelled)}: {slurm_message(r)}")
    return cancelled
