"""SLURM launcher: ``stc submit``, ``stc jobs``, ``stc cancel``.

**The plan as jobs.** ``stc submit pipeline`` builds the same plan as ``stc pipeline``
(:func:`engine.pipeline.build_plan`), validates it whole (inputs, batch arithmetic for the job's
ranks, model shapes and memory; :func:`engine.pipeline.check`) before anything is queued, and submits
one job per step that is not done, with the step's command line unchanged (``python -m engine.cli
<stage> --config <run>/pipeline/config.yaml <overrides>``, run by ``srun`` on every task). A step's job
depends (``--dependency=afterok:<jobs>``, ``--kill-on-invalid-dep=yes``) on the jobs of the steps it
reads from, so independent branches (the CE-only, middle-block and 50% students) run side by side and a
failed step's dependents never run. Finished steps are skipped by the pipeline's own rule and a stale
step's old output is set aside first (:func:`engine.pipeline.states`, :func:`engine.pipeline.prepare`);
``--stages`` submits only the named steps. A step already queued or running in the ledger is refused
(``stc cancel`` it first). If any ``sbatch`` fails, the jobs already submitted are cancelled.

**Resources per step** (from the stage registry): a multi-rank step gets ``--nodes`` x one task per GPU
(``--gpus-per-node G``) or per CPU slot (``--ntasks-per-node``; default without GPUs:
``pipeline.nproc``); a single-task step (prune, export, report, shards build) gets one task on one node,
no GPU (export: one, where the plan uses GPUs) and the host memory its model needs
(:func:`engine.preflight.host_mem_gib`, e.g. ~17 GB of bf16 weights for the 7B teacher), not eight
GPUs. ``stc submit <stage> ...`` submits one stage the same way. Unless the recipe's ``slurm:`` section
(or the CLI) sets them, each job asks ``--cpus-per-task`` = ``max(1, run.threads)`` plus, where the step
reads shards, ``data.num_workers`` (one core per DataLoader worker), and a multi-rank step of a plan
``--mem`` = its per-rank host estimate x its tasks per node; asks larger than the partition's nodes are
refused before anything is queued.

**GPUs and nodes.** ``--gpus-per-node G`` gives G tasks per node, one per GPU: every task sees its
node's GPUs and takes the one of its local rank (``SLURM_LOCALID``; where a site binds one GPU per task
it takes the one it sees, :func:`engine.dist.gpu_index`). Sharing the node's GPUs keeps NCCL's
peer-to-peer paths between the tasks. ``--nodes N`` spreads a multi-rank step over N nodes; each task's
node rank is ``SLURM_NODEID`` and its local world this node's entry of ``SLURM_STEP_TASKS_PER_NODE``
(``engine/dist.py``), so the data split and the losses are those of N x G ranks on one node.

**One job, many ranks.** Inside a job ``srun --kill-on-bad-exit=1`` starts the tasks (every ``srun`` of
the script carries it): ranks come from ``SLURM_*`` (``engine/dist.py``), the rendezvous host is the
job's first node, the node count is ``$SLURM_NNODES`` (never written twice by hand), and a task that
dies takes the whole job down at once instead of leaving the others in a collective until the
process-group timeout. The stage's ``srun`` is given ``--cpus-per-task="$SLURM_CPUS_PER_TASK"``: since
SLURM 22.05 a step no longer inherits the job's cores per task. Importance candidates and cache shards
are split over the ranks of one job (the model loaded once per rank), not job arrays: the scan is
iterative, and both stages skip finished units when rerun.

**JIT-built DeepSpeed ops.** When DeepSpeed starts (``deepspeed.init_distributed``) it compiles its
``deepspeed_shm_comm`` op on a CPU accelerator (~35 s cold on two cores); on GPU nodes nothing is
compiled at start, because the engine hands DeepSpeed a torch optimizer (no ``cpu_adam``/``fused_adam``).
The compiled op goes to ``$TORCH_EXTENSIONS_DIR``, which every job of a run points at one node-local
folder, ``${TMPDIR:-/tmp}/stc-ext-<uid>-<hash of the run's slurm folder>``: each node compiles once per
run (resubmissions included) instead of once per job, and nodes never share a build (builds may be CPU
specific, and torch's build lock is unreliable on network filesystems). The jobs of DeepSpeed stages
(finetune, distill, a ZeRO-3 teacher cache) first run :func:`build_jit_ops` as one task per node: it
builds under an ``flock`` on the folder, which the kernel releases when its holder dies, so jobs side by
side on a node build once and a job killed mid-build never blocks the next; holding it, it removes torch's
own build locks that no live process holds open (a killed compiler leaves one, and torch would wait for
it for ever). Where ``$TMPDIR`` is private to each job (``job_container/tmpfs``), each job builds its own,
which is correct, only slower. ``slurm.extensions_dir`` names another folder (a site's prebuilt or
shared cache; the ``flock`` then needs a filesystem that honours it); ``STC_TORCH_EXTENSIONS_DIR`` in the
submitting environment wins over both. The folder is left in place for the run's later jobs (about
1 MB per node) and goes with the node's temp cleanup.

**Preemption and time limits.** Every job carries ``--signal=B:USR1@<seconds>`` and ``--requeue``.
The batch script runs ``srun ... &`` and waits in a loop so its trap fires while the tasks run; the
trap forwards USR1 to all steps (``scancel --signal=USR1 <job>``). A stage that checkpoints on request
exits 75; the script then calls ``scontrol requeue``, the job comes back with ``SLURM_RESTART_COUNT``
>= 1 and resumes. The job is never "completed" meanwhile, so ``afterok`` dependents wait. At most
``slurm.max_restarts`` requeues.

**Ledger.** ``<run.out_dir>/slurm/ledger.jsonl`` gets a line per event: submitted (by ``stc submit``:
job, step, stage, pipeline, dependencies, script, log), started / signal / requeued / finished (by the
batch script, with restarts and exit code). ``stc jobs`` merges it with ``scontrol show job`` because
finished jobs vanish from ``scontrol`` after ``MinJobAge`` and accounting (``sacct``) may be off.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
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

from engine import config as cfg
from engine import lock, pipeline, preflight, stages
from engine.errors import StcError, UsageError
from engine.io import append_jsonl, atomic_write_text, read_jsonl

TEMPLATE = Path(__file__).resolve().parent / "templates" / "stage.sbatch"
LEDGER_NAME = "ledger.jsonl"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
BAD = TERMINAL - {"COMPLETED"}
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
          "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}


class SubmitError(StcError):
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
    extensions_dir: str = ""         # "": node-local, one per run (default_extensions_dir)

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


def check_memory(opts: JobOptions, asks: dict[str, int]) -> None:
    """Refuse before submitting when a job asks more host memory (GiB) than any node of the partition has."""
    if shutil.which("sinfo") is None or not asks:
        return
    part = opts.partition or default_partition()
    r = _slurm(["sinfo", "-h", *(["-p", part] if part else []), "-o", "%m"])
    sizes = [int(re.sub(r"\D", "", m) or 0) for m in r.stdout.split()]
    if r.returncode != 0 or not sizes or max(sizes) <= 1:
        return                                   # the cluster does not say (RealMemory unset)
    have = max(sizes) / 1024
    too_big = {n: g for n, g in asks.items() if g > have}
    if too_big:
        raise SubmitError(f"partition {part!r}: its nodes have at most {have:.0f} GiB of memory; "
                          + ", ".join(f"{n} needs ~{g} GiB" for n, g in too_big.items())
                          + " per node (the model in its dtype, per task on the node): pick a partition with larger "
                            "nodes (-p), or set slurm.mem for multi-rank steps")


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
    """Submit; returns the job id. ``dependency``: ``a:b:...`` job ids this one runs after (``afterok``;
    cancelled if one of them can never complete)."""
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

def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def slurm_dir(recipe: Any) -> Path:
    return Path(recipe.run.out_dir) / "slurm"


def ledger_path(recipe: Any) -> Path:
    return slurm_dir(recipe) / LEDGER_NAME


def stage_command(stage_argv: Sequence[str]) -> list[str]:
    """What each task runs: this environment's interpreter on the CLI module (copyable, no PATH lookup)."""
    return [sys.executable, "-m", "engine.cli", *stage_argv]


@dataclass(frozen=True)
class Rendered:
    name: str           # step (or stage) name: names the script and the log
    stage: str
    script: Path
    log: str            # sbatch --output pattern (%j: the job id)
    text: str


def default_extensions_dir(out_dir: Path) -> str:
    """The jobs' TORCH_EXTENSIONS_DIR when ``slurm.extensions_dir`` is unset, as a shell word: node-local
    temp, one folder per user and run (the run's slurm folder hashed), shared by every job of the run that
    lands on the node. ``$TMPDIR`` is read on the node when the job runs."""
    tag = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
    return f'"${{TMPDIR:-/tmp}}/stc-ext-$(id -u)-{tag}"'


def render(name: str, command: Sequence[str], opts: JobOptions, out_dir: Path, *, workdir: Path | None = None,
           shards: str = "", stage: str = "", step_record: Path | None = None, deepspeed: bool = False) -> Rendered:
    """The sbatch script of one step; pure (same inputs, same text), so --dry-run shows what is submitted.
    ``shards``: with ``stage_to_local_disk``, the shard directory copied to node-local disk first.
    ``step_record``: a plan step's record, where the stage adds its wall seconds (``$STC_STEP_RECORD``).
    ``deepspeed``: the stage starts DeepSpeed, so its JIT ops are built once per node before the tasks."""
    stage = stage or name
    out_dir = Path(out_dir).resolve()
    script = out_dir / f"{slug(name)}.sbatch"
    log = str(out_dir / f"{slug(name)}-%j.log")
    lines = [f"--job-name=stc-{slug(name)}", f"--nodes={opts.nodes}", f"--ntasks-per-node={opts.tasks_per_node}"]
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
    if opts.stage_to_local_disk and shards:
        staging = ("# Shards staged to node-local disk (one copy per node), read from there by every task.\n"
                   'LOCAL_SHARDS="$JOB_TMP/shards"\n'
                   'srun --kill-on-bad-exit=1 --ntasks="$NNODES" --ntasks-per-node=1 bash -c \'mkdir -p "$1" && cp -a "$0"/. "$1"/\' '
                   f'{shlex.quote(str(Path(shards).resolve()))} "$LOCAL_SHARDS" '
                   "|| { echo 'stc-slurm: staging the shards failed'; ledger finished ', \"exit\": 1'; exit 1; }\n")
        extra = ' data.shards="$LOCAL_SHARDS"'
    ext_dir = shlex.quote(opts.extensions_dir) if opts.extensions_dir else default_extensions_dir(out_dir)
    jit = ""
    if deepspeed:
        jit = ("# DeepSpeed JIT-builds ops when it starts: build them once per node, under a kernel lock, before the\n"
               "# tasks start (a failure here is not fatal: the tasks then build and report the error themselves).\n"
               'srun --kill-on-bad-exit=1 --ntasks="$NNODES" --ntasks-per-node=1 '
               f"{shlex.join(jit_ops_command())} "
               "|| echo 'stc-slurm: building the JIT ops before the tasks failed; the tasks build them'\n")
    values = {
        "stage": stage,
        "name": name,
        "script": str(script),
        "ledger": str(out_dir / LEDGER_NAME),
        "ledger_q": shlex.quote(str(out_dir / LEDGER_NAME)),
        "step_json_q": shlex.quote(json.dumps(name)),
        "step_record": (f"export {stages.STEP_RECORD_ENV}={shlex.quote(str(Path(step_record).resolve()))}"
                        if step_record else f"unset {stages.STEP_RECORD_ENV}"),
        "max_restarts": str(opts.max_restarts),
        "workdir_q": shlex.quote(str(Path(workdir or os.getcwd()).resolve())),
        "sbatch_lines": "\n".join(f"#SBATCH {x}" for x in lines),
        "staging": staging,
        "srun_args": '--kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" ',
        "ext_dir": ext_dir,
        "jit_build": jit,
        "command": shlex.join(command),
        "extra_args": extra,
        "requeue": "1" if opts.requeue else "0",
    }
    text = TEMPLATE.read_text(encoding="utf-8")

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {{{{{m.group(1)}}}}} has no value")
        return values[m.group(1)]

    return Rendered(name=name, stage=stage, script=script, log=log, text=re.sub(r"\{\{(\w+)\}\}", sub, text))


def default_cpus(recipe: Any, reads_data: bool) -> int:
    """``--cpus-per-task`` when the recipe leaves it unset: the torch threads of a rank (``run.threads``,
    at least 1) plus, where the step reads shards, one core per DataLoader worker."""
    return max(1, recipe.run.threads) + (recipe.data.num_workers if reads_data else 0)


def step_options(plan: pipeline.Plan, step: pipeline.Step, opts: JobOptions) -> JobOptions:
    """What the job of ``step`` asks for: the whole allocation for a multi-rank step; one task, no GPU (one
    for export where GPUs are used) for a single-task step. Unless the recipe or the CLI set them: the
    cores of :func:`default_cpus`, and the host memory of the step's model (:func:`engine.preflight.host_mem_gib`,
    per rank) times the tasks of a node."""
    st = stages.get(step.stage)
    if st.ranks != "many":
        gpus = min(opts.gpus_per_node, 1) if st.resources == "gpu" else 0
        o = replace(opts, nodes=1, ntasks_per_node=1, gpus_per_node=gpus)
        gib = preflight.host_mem_gib(plan, step) if step.stage != "shards build" else None
        mem = f"{gib}G" if gib else opts.mem     # a single-task step always asks what its model needs
    else:
        o = opts
        gib = None if opts.mem else preflight.host_mem_gib(plan, step)
        mem = f"{gib * opts.tasks_per_node}G" if gib else opts.mem
    cpus = opts.cpus_per_task or default_cpus(plan.recipe_of(step), reads_shards(step))
    return replace(o, mem=mem, cpus_per_task=cpus)


def starts_deepspeed(stage: str, recipe: Any) -> bool:
    """Whether the stage starts DeepSpeed (whose start JIT-builds ops on CPU nodes): the trainers always,
    the teacher cache with its ZeRO-3 teacher."""
    return stage in ("finetune", "distill") or stage == "cache build" and bool(recipe.cache.zero3)


def reads_shards(step: pipeline.Step) -> bool:
    return any(i.what == "data.shards" for i in step.inputs)


# ----------------------------------------------------------------------------------------- JIT ops

JIT_LOCK = ".stc-build.lock"


def jit_ops_command() -> list[str]:
    """What one task per node runs before a DeepSpeed stage's tasks: :func:`build_jit_ops`."""
    return [sys.executable, "-m", "launchers.slurm", "jit-ops"]


def _open_here(path: Path) -> bool:
    """Whether a process of this node that we may inspect holds ``path`` open (torch's build lock is held
    open by the process that builds, so a lock nobody holds was left by a process that died)."""
    target = os.path.realpath(path)
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == target:
                    return True
            except OSError:
                continue
    return False


def build_jit_ops(root: str | os.PathLike | None = None, build: Any = None) -> dict[str, Any]:
    """Build, or find built, the ops DeepSpeed JIT-builds when it starts, into ``root``
    (``$TORCH_EXTENSIONS_DIR``), holding an exclusive ``flock`` on ``root/.stc-build.lock``.

    The kernel drops a ``flock`` when its holder dies, so jobs that share the folder build one at a time
    and a killed build never blocks the next one. torch's own build lock (a ``lock`` file it creates and
    holds open while compiling) survives a killed compiler and makes every later start wait for ever; with
    the ``flock`` held, such a file that no process on this node holds open is stale and is removed first.
    ``build``: what builds (default: DeepSpeed's own ``build_shm_op``, the shm communication op it builds
    at start on a CPU accelerator and skips elsewhere). Returns the folder, the stale locks removed, the
    op's file (None where nothing is built) and whether it was compiled now."""
    root = Path(root or os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    root.mkdir(parents=True, exist_ok=True)
    if build is None:
        from deepspeed.comm.torch import build_shm_op as build
    t0 = time.monotonic()
    with open(root / JIT_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        waited = time.monotonic() - t0
        stale = [p for p in sorted(root.rglob("lock")) if p.is_file() and not _open_here(p)]
        if stale:   # torch closes its lock, then removes it: a lock still there a second later is left over
            time.sleep(1.0)
            stale = [p for p in stale if p.is_file() and not _open_here(p)]
        for p in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        stale = [str(p) for p in stale]
        before = {str(p.resolve()): p.stat().st_mtime_ns for p in root.rglob("*.so")}
        op = build()
        so = getattr(op, "__file__", None) if op is not None else None
        compiled = bool(so) and before.get(str(Path(so).resolve())) != Path(so).stat().st_mtime_ns
    return {"dir": str(root), "stale_locks": stale, "op": so, "compiled": compiled, "waited_s": round(waited, 1),
            "seconds": round(time.monotonic() - t0, 1)}


def _jit_main() -> int:
    r = build_jit_ops()
    host = os.uname().nodename
    if r["stale_locks"]:
        print(f"stc-slurm: {host}: removed stale JIT build lock(s) {r['stale_locks']}")
    what = ("nothing to build on this node's accelerator" if r["op"] is None
            else f"{'built' if r['compiled'] else 'cached'} {r['op']}")
    print(f"stc-slurm: {host}: DeepSpeed JIT ops in {r['dir']}: {what} ({r['seconds']} s, "
          f"{r['waited_s']} s waiting for another build)", flush=True)
    return 0


# ----------------------------------------------------------------------------------------- ledger

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append(ledger: Path, event: str, **fields: Any) -> None:
    append_jsonl(ledger, {"event": event, "time": _now(), **fields})


def read_ledger(ledger: Path) -> list[dict]:
    recs, _bad = read_jsonl(ledger)  # a line cut by a crash is skipped, the rest still counts
    for r in recs:
        r["_ledger"] = str(ledger)
    return recs



# ----------------------------------------------------------------------------------------- submit

@dataclass
class Submission:
    """What a submission does: per step a rendered script and its dependencies, or why it is skipped."""
    items: list[tuple[str, Rendered | None, str, tuple[str, ...]]] = field(default_factory=list)
    ledger: Path = Path()
    pipeline: str = ""
    host_mem_gib: dict[str, int] = field(default_factory=dict)   # --mem per node derived from the model


def active_jobs(ledger: Path) -> dict[str, JobView]:
    """Step name -> a job of it that is still queued or running (by scontrol, else the ledger)."""
    if not ledger.exists():
        return {}
    return {v.step: v for v in job_views(ledger) if v.state in ACTIVE or v.state in ("?", "ENDED?") and v.live}


def plan_jobs(plan: pipeline.Plan, opts: JobOptions, *, only_todo: bool = True) -> Submission:
    """Render the job of every step to run; dependencies are the steps' input edges (step names)."""
    out = slurm_dir(plan.recipe)
    sub = Submission(ledger=(out / LEDGER_NAME).resolve())
    st = pipeline.states(plan)
    runs: set[str] = set()
    for s in plan.active:
        if only_todo and st[s.name] == "done" and not (set(s.deps) & runs):
            sub.items.append((s.name, None, f"done ({s.marker})", ()))
            continue
        runs.add(s.name)
        argv = pipeline.command(replace(plan, nproc=1), s)[3:]      # the stage's own argv, without `run`
        o = step_options(plan, s, opts)
        if o.mem.endswith("G") and o.mem != opts.mem:
            sub.host_mem_gib[s.name] = int(o.mem[:-1])
        r = render(s.name, stage_command(argv), o, out, stage=s.stage, step_record=plan.step_record(s),
                   shards=plan.recipe.data.shards if reads_shards(s) else "",
                   deepspeed=starts_deepspeed(s.stage, plan.recipe_of(s)))
        deps = tuple(d for d in s.deps if d in runs)
        sub.items.append((s.name, r, "", deps))
    return sub


def submit_jobs(sub: Submission, plan: pipeline.Plan | None = None, *, say=None) -> list[dict]:
    """Write the scripts and sbatch them in plan order, each after its dependencies; on any failure
    cancel what this submission already queued."""
    say = say or (lambda m: print(m, file=sys.stderr))
    _need("sbatch")
    sub.pipeline = sub.pipeline or (time.strftime("p%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2))
    done: list[dict] = []
    job_of: dict[str, str] = {}
    st = pipeline.states(plan) if plan is not None else {}
    for name, r, why, deps in sub.items:
        if r is None:
            append(sub.ledger, "skipped", step=name, pipeline=sub.pipeline, reason=why)
            say(f"stc submit: skip {name}: {why}")
            if plan is not None and name in {s.name for s in plan.steps}:
                pipeline.refresh_record(plan, plan.step(name))
            continue
        if plan is not None:
            pipeline.prepare(plan, st, plan.step(name), say)
        atomic_write_text(r.script, r.text)
        os.chmod(r.script, 0o755)
        dep_jobs = [job_of[d] for d in deps]
        try:
            job = sbatch(r.script, ":".join(dep_jobs) or None)
        except SubmitError as e:
            if done:
                scancel([d["job"] for d in done])
                for d in done:
                    append(sub.ledger, "cancelled", job=d["job"], step=d["step"], stage=d["stage"],
                           pipeline=sub.pipeline, reason=f"submission of {name} failed")
                e = SubmitError(f"{e}\ncancelled the jobs already submitted for this pipeline: "
                                f"{', '.join(d['job'] for d in done)}")
            raise e from None
        log = r.log.replace("%j", job)
        rec = {"job": job, "step": name, "stage": r.stage, "pipeline": sub.pipeline,
               "dependency": ":".join(dep_jobs) or None, "script": str(r.script), "log": log}
        append(sub.ledger, "submitted", **rec)
        done.append(rec)
        job_of[name] = job
        say(f"stc submit: {name} -> job {job}" + (f" (afterok:{':'.join(dep_jobs)})" if dep_jobs else "")
            + f"; log {log}")
    return done


def print_submission(sub: Submission, out=None, full: bool = False) -> None:
    """Each job's sbatch command and what it asks SLURM for (``full``: the whole script)."""
    out = out or sys.stdout
    for name, r, why, deps in sub.items:
        if r is None:
            print(f"# skip {name}: {why}", file=out)
            continue
        dep = (" --dependency=afterok:" + ":".join(f"<{d}>" for d in deps) + " --kill-on-invalid-dep=yes") if deps else ""
        print(f"# sbatch --parsable{dep} {r.script}", file=out)
        if full:
            print(r.text, end="", file=out)
        else:
            print("\n".join(ln for ln in r.text.splitlines() if ln.startswith("#SBATCH")), file=out)


# ----------------------------------------------------------------------------------------- stc submit

def _launcher_parser() -> argparse.ArgumentParser:
    """``stc submit``'s own options (the registry's submit arguments), accepted before or after the stage."""
    p = argparse.ArgumentParser(prog="stc submit", add_help=False, allow_abbrev=False)
    for a in stages.get("submit").args:
        if a.flags[0].startswith("-"):
            p.add_argument(*a.flags, dest=a.dest, help=a.help, default=None,
                           **{k: v for k, v in a.options.items() if k not in ("dest", "default")})
    return p


def _merge(args: argparse.Namespace, head: argparse.Namespace) -> argparse.Namespace:
    for k in vars(head):
        before = getattr(args, k, None)
        if getattr(head, k) in (None, False) and before not in (None, False):
            setattr(head, k, before)
    return head


def _options(recipe: cfg.Recipe, head: argparse.Namespace) -> JobOptions:
    opts = options_from(recipe, nodes=head.nodes, gpus_per_node=head.gpus_per_node,
                        ntasks_per_node=head.ntasks_per_node, cpus_per_task=head.cpus_per_task,
                        partition=head.partition, time=head.time, account=head.account, qos=head.qos, mem=head.mem,
                        signal_seconds=head.signal_seconds)
    if not opts.gpus_per_node and not opts.ntasks_per_node:   # CPU jobs: as many ranks as stc pipeline runs
        opts = replace(opts, ntasks_per_node=max(1, recipe.pipeline.nproc))
    return opts


def submit_main(recipe: object, args: argparse.Namespace) -> int:
    """``stc submit [options] <stage|pipeline> [--config C] [stage options] [overrides]``."""
    head, rest = _launcher_parser().parse_known_args(list(args.stage_argv or []))
    head = _merge(args, head)
    rest = [a for a in rest if a != "--"]
    if not rest:
        raise UsageError("name a stage or `pipeline`, e.g. stc submit pipeline --config configs/demo.yaml "
                         "--gpus-per-node 8")
    if rest[0] == "pipeline":
        return _submit_pipeline(head, rest[1:])
    return _submit_stage(head, rest)


def _submit_pipeline(head: argparse.Namespace, rest: list[str]) -> int:
    is_override = stages.is_override
    extra = [a for a in rest if not is_override(a)]
    if extra:
        raise UsageError(f"stc submit pipeline takes launcher options and section.key=value overrides, not "
                         f"{' '.join(extra)}")
    recipe = cfg.load(head.config, [a for a in rest if is_override(a)])
    opts = _options(recipe, head)
    plan = pipeline.build_plan(recipe, nproc=opts.nodes * opts.tasks_per_node, select=head.stages)
    if head.dry_run:   # shows what would be submitted; needs no reachable cluster
        code = pipeline.dry_run(plan, title="stc submit pipeline", cmd=_srun_view(opts))
        print("\n# the jobs" + (" (refused as they stand)" if code else "")
              + " (scripts are written to <run.out_dir>/slurm/<step>.sbatch when submitted):")
        print_submission(plan_jobs(plan, opts))
        return code
    problems = pipeline.check(plan)
    if problems:
        raise pipeline.PipelineError(problems)
    _need("sbatch")
    check_partition(opts)
    with lock.hold([plan.run_dir / pipeline.PIPELINE_DIR], "stc submit pipeline"):
        busy = active_jobs(ledger_path(recipe))
        clash = [f"{n} is queued or running as job {busy[n].job} (pipeline {busy[n].pipeline})"
                 for n in (s.name for s in plan.active) if n in busy]
        if clash:
            raise SubmitError("; ".join(clash) + f"; wait for it, or `stc cancel --pipeline <id> --ledger "
                              f"{plan.run_dir}` first")
        sub = plan_jobs(plan, opts)
        check_memory(opts, sub.host_mem_gib)
        cfg.save_resolved(plan.recipe, plan.config_path.parent, plan.config_path.name)
        jobs = submit_jobs(sub, plan)
    for j in jobs:
        print(j["job"])
    if jobs:
        print(f"stc submit: pipeline {sub.pipeline}: {len(jobs)} job(s); follow it with `stc jobs --ledger "
              f"{plan.run_dir}`, stop it with `stc cancel --pipeline {sub.pipeline} --ledger {plan.run_dir}`",
              file=sys.stderr)
    else:
        print("stc submit: every step is done; nothing submitted", file=sys.stderr)
    return 0


def _srun_view(opts: JobOptions):
    """How a step's command shows in a SLURM dry run: what each task of its job runs."""
    def cmd(plan: pipeline.Plan, step: pipeline.Step) -> list[str]:
        o = step_options(plan, step, opts)
        argv = pipeline.command(replace(plan, nproc=1), step)[3:]
        return ["srun", "--kill-on-bad-exit=1", f"--nodes={o.nodes}", f"--ntasks-per-node={o.tasks_per_node}",
                *([f"--gpus-per-node={o.gpus_per_node}"] if o.gpus_per_node else []),
                *([f"--mem={o.mem}"] if o.mem else []), *stage_command(argv)]
    return cmd


def _submit_stage(head: argparse.Namespace, rest: list[str]) -> int:
    st, stage_rest = stages.split_name(rest)
    if st.name in ("submit", "jobs", "cancel", "pipeline", "run", "demo") or not st.default_out and st.recipe is False:
        raise UsageError(f"`stc {st.name}` does not run as a job; stages: "
                         f"{', '.join(s.name for s in stages.REGISTRY if s.step)}")
    argv = [*st.words, *(["--config", head.config] if head.config else []), *stage_rest]
    try:
        _, ns = stages.parse(argv)  # the stage's own arguments, checked now, not in the queue an hour later
    except SystemExit:
        raise UsageError(f"`stc {' '.join(argv)}` is not a valid stage command line (see the message above)") \
            from None
    recipe = cfg.load(head.config, stages.overrides_for(st, ns))
    opts = _options(recipe, head)
    if st.ranks != "many":
        opts = replace(opts, nodes=1, ntasks_per_node=1, gpus_per_node=min(opts.gpus_per_node, 1)
                       if st.resources == "gpu" else 0)
    # a lone stage has no plan to estimate its memory from (slurm.mem or --mem, else SLURM's default);
    # the multi-rank stages are the ones that read shards
    opts = replace(opts, cpus_per_task=opts.cpus_per_task or default_cpus(recipe, st.ranks == "many"))
    out = slurm_dir(recipe)
    r = render(st.name, stage_command(argv), opts, out, stage=st.name, shards=recipe.data.shards,
               deepspeed=starts_deepspeed(st.name, recipe))
    if head.dry_run:
        print(f"# sbatch --parsable {r.script}")
        print(r.text, end="")
        return 0
    _need("sbatch")
    check_partition(opts)
    sub = Submission(items=[(st.name, r, "", ())], ledger=(out / LEDGER_NAME).resolve())
    for j in submit_jobs(sub):
        print(j["job"])
    return 0


def _ledgers(args: argparse.Namespace) -> list[Path]:
    if getattr(args, "ledger", None):
        return _find_ledgers(args.ledger)
    if getattr(args, "config", None):
        return _find_ledgers(str(ledger_path(cfg.load(args.config, []))))
    return _find_ledgers(None)


def jobs_main(recipe: object, args: argparse.Namespace) -> int:
    """``stc jobs``: every job of the ledger(s) with its state; the log tail of each failed one."""
    print_jobs(_ledgers(args), lines=args.lines)
    return 0


def cancel_main(recipe: object, args: argparse.Namespace) -> int:
    if args.target and not args.ledger:
        args.ledger = args.target
    done = cancel(_ledgers(args), pipeline=args.pipeline)
    print(f"stc cancel: cancelled {', '.join(done) if done else 'nothing (no unfinished jobs)'}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- jobs

@dataclass
class JobView:
    job: str
    step: str
    stage: str
    pipeline: str
    dependency: str | None
    log: str
    state: str
    restarts: int
    why: str = ""
    exit: int | None = None
    live: bool = False       # scontrol still knows the job


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
            views[job] = JobView(job=job, step=r.get("step") or r.get("stage", "?"), stage=r.get("stage", "?"),
                                 pipeline=r.get("pipeline") or "-",
                                 dependency=r.get("dependency"), log=r.get("log", ""), state="?", restarts=0)
        elif job:
            events.setdefault(job, []).append(r)
    for job, v in views.items():
        ev = events.get(job, [])
        for e in ev:
            v.restarts = max(v.restarts, int(e.get("restarts") or 0))
        info = job_info(job) if live else {}
        if info:
            v.live = True
            v.state = info.get("JobState", "?")
            v.restarts = max(v.restarts, int(info.get("Restarts", "0") or 0))
            reason = info.get("Reason", "None")
            code = info.get("ExitCode", "")
            if code and ":" in code:
                v.exit = int(code.split(":")[0])
            if reason not in ("None", "") and v.state != "COMPLETED":
                v.why = {"DependencyNeverSatisfied": f"dependency {v.dependency} never satisfied: it did not "
                                                     f"complete, so this step never ran"}.get(reason, reason)
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
    for v in views.values():  # a job that never ran because what it depends on failed
        deps = [views[j] for j in str(v.dependency or "").split(":") if j in views]
        d = next((d for d in deps if d.state in BAD | {"ENDED?"}), None)
        if d is not None and v.state in ("UNKNOWN", "CANCELLED"):
            v.state = "CANCELLED"
            v.why = f"never ran: dependency {d.job} ({d.step}) {d.state}"
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
        rows = [("JOB", "STEP", "PIPELINE", "STATE", "RESTARTS", "AFTER", "LOG")]
        rows += [(v.job, v.step, v.pipeline, v.state, str(v.restarts), v.dependency or "-", v.log) for v in views]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        for v in views:
            if v.state in BAD | {"ENDED?", "UNKNOWN"}:
                failed += 1
                print(f"\njob {v.job} {v.step} (stc {v.stage}) {v.state}: {v.why or 'see the log'}", file=out)
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
            append(ledger, "cancelled", job=v.job, step=v.step, stage=v.stage, pipeline=v.pipeline, reason="stc cancel")
    if cancelled:
        r = scancel(cancelled)
        if r is not None and r.returncode != 0:
            raise SubmitError(f"scancel {' '.join(cancelled)}: {slurm_message(r)}")
    return cancelled


if __name__ == "__main__":   # the per-node step of a job script (jit_ops_command)
    if sys.argv[1:] != ["jit-ops"]:
        sys.exit("usage: python -m launchers.slurm jit-ops")
    sys.exit(_jit_main())
