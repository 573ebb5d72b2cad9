"""The distributed layer: the only module that knows about ranks.

It owns the process-group lifecycle (:func:`session`, the one context manager every multi-rank stage
runs in), the agree-or-raise rule (:func:`agree`: a check that failed on one rank raises on every rank,
so no rank waits forever in the next collective) and the one DeepSpeed bootstrap
(:func:`deepspeed_bootstrap`) shared by the trainer and the ZeRO-3 cache teacher.

Ranks come from whichever launcher started us: torchrun (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``GROUP_WORLD_SIZE``), the deepspeed launcher (same variables), or a
bare ``srun`` (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_NNODES``, ``SLURM_NODEID``,
first host of ``SLURM_JOB_NODELIST``). Explicit torch variables win over SLURM ones, so ``srun torchrun
...`` works.

**Nodes and local ranks.** The node rank is the launcher's (torchrun's ``GROUP_RANK``, SLURM's
``SLURM_NODEID``), never guessed from host names, so two "nodes" on one host (two torchrun agents with
``--nnodes 2``, or two slurmd on one machine) are two nodes. The local world size under SLURM is this
node's entry of ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``: nodes may differ), else
``SLURM_NTASKS_PER_NODE``. A rank's GPU is :func:`gpu_index`: its local rank among the GPUs it sees, so
one task per GPU works both where every task sees the node's GPUs and where SLURM binds one GPU per task.

A rank that dies takes the job down through the launcher: torchrun (``stc run``) stops every worker
when one exits, and the SLURM jobs run ``srun --kill-on-bad-exit=1``; a survivor blocked in a gloo
collective also gets "connection closed by peer" at once. The process-group timeout
(``DEFAULT_TIMEOUT_S``) is the last resort only, for a peer that hangs without dying.

**Ending a process that ran a process group.** A stage's process ends through :func:`end_process`:
``os._exit`` with the stage's exit code once the streams and log files are flushed, without the
interpreter's finalization. destroy_process_group does not always free the backend: once DeepSpeed,
``torch._dynamo`` or ``torch.distributed.fsdp`` has been imported while a group is up (measured with
torch 2.13), something in C++ keeps the gloo backend, and its worker threads live on into interpreter
shutdown and the C++ static destructors. Ranks of DeepSpeed stages were seen to abort there ("terminate
called without an active exception", exit 134) after their work was written, failing the SLURM job or
the torchrun launch; the likely path is a backend thread that asks for the GIL while the interpreter
finalizes, which Python before 3.14 ends with ``pthread_exit`` inside a C++ destructor. ``os._exit``
runs neither, whatever holds the backend.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from .errors import StcError

if TYPE_CHECKING:  # torch is imported lazily: `stc shards ...` and `stc config` need no torch
    import torch


def _torch():
    import torch

    return torch


def _tdist():
    import torch.distributed as tdist

    return tdist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | deepspeed | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist such as ``gpu[01-03,7],login-a`` into host names (order kept)."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{str(i).zfill(width)}{suffix}")
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node list (``SLURM_STEP_TASKS_PER_NODE``), e.g. ``2(x3),1`` -> ``[2, 2, 2, 1]``;
    [] when empty or not in that form."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU (index among the ``visible`` ones) of the rank with this local rank: one GPU per local rank
    where the task sees every GPU of its node, the one GPU it sees where SLURM binds one GPU per task."""
    return local_rank % max(visible, 1)


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    v = env.get(key)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {key}={v!r} is not an integer") from None


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "DEEPSPEED_ENVIRONMENT_NAME" in env or env.get("DS_LAUNCHER") else "torchrun"
        world = _int(env, "WORLD_SIZE", 1)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        rank = _int(env, "RANK", 0)
        node_rank = _int(env, "GROUP_RANK", _int(env, "NODE_RANK", rank // max(local_world, 1)))
        nodes = _int(env, "GROUP_WORLD_SIZE", _int(env, "NNODES", (world + local_world - 1) // max(local_world, 1)))
        return DistEnv(
            rank=rank, local_rank=_int(env, "LOCAL_RANK", 0), world_size=world,
            local_world_size=local_world, node_rank=node_rank, num_nodes=max(1, nodes),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_int(env, "MASTER_PORT", 29500),
            launcher=launcher,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS", 1)
        nnodes = _int(env, "SLURM_NNODES", 1)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        hosts = expand_nodelist(nodelist)
        master = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        # One port per job, derived rather than configured, so two jobs on a node do not collide.
        port = _int(env, "MASTER_PORT", 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000)
        node_rank = _int(env, "SLURM_NODEID", 0)
        per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
        local_world = (per_node[node_rank] if node_rank < len(per_node) else 0) \
            or _int(env, "SLURM_NTASKS_PER_NODE", 0) or max(1, world // max(nnodes, 1))
        return DistEnv(
            rank=_int(env, "SLURM_PROCID", 0), local_rank=_int(env, "SLURM_LOCALID", 0), world_size=world,
            local_world_size=local_world, node_rank=node_rank, num_nodes=nnodes,
            master_addr=master, master_port=port, launcher="slurm",
        )
    return DistEnv()


_STATE: dict[str, Any] = {"env": None}


def export_torch_env(d: DistEnv) -> None:
    """Mirror the detected ranks into the variables torch, deepspeed and webdataset read."""
    os.environ.update({
        "RANK": str(d.rank), "LOCAL_RANK": str(d.local_rank), "WORLD_SIZE": str(d.world_size),
        "LOCAL_WORLD_SIZE": str(d.local_world_size), "MASTER_ADDR": d.master_addr,
        "MASTER_PORT": str(d.master_port),
    })


def backend_for_device() -> str:
    return "nccl" if _torch().cuda.is_available() else "gloo"


DEFAULT_TIMEOUT_S = 1800.0


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Detect ranks and, when more than one, start the process group (idempotent)."""
    if _STATE["env"] is not None:
        return _STATE["env"]
    d = detect()
    if d.distributed:
        torch, tdist = _torch(), _tdist()
        export_torch_env(d)
        if torch.cuda.is_available():
            torch.cuda.set_device(gpu_index(d.local_rank, torch.cuda.device_count()))
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend_for_device(), rank=d.rank, world_size=d.world_size,
                                     timeout=datetime.timedelta(seconds=timeout_s))
    _STATE["env"] = d
    return d


def env() -> DistEnv:
    return _STATE["env"] if _STATE["env"] is not None else detect()


def is_initialized() -> bool:
    if "torch" not in sys.modules:  # nothing can have started a process group
        return False
    tdist = _tdist()
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return env().rank


def world_size() -> int:
    return env().world_size


def is_main() -> bool:
    return env().rank == 0


def device() -> "torch.device":
    torch = _torch()
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_index(env().local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        _tdist().barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    tdist = _tdist()
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    _tdist().broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(x: "torch.Tensor") -> "torch.Tensor":
    """Sum ``x`` over ranks in place. NCCL only reduces CUDA tensors: a CPU tensor (the trainer's token
    counts) goes through this rank's GPU and back."""
    if is_initialized():
        tdist = _tdist()
        if x.device.type == "cpu" and tdist.get_backend() == "nccl":
            y = x.to(device())
            tdist.all_reduce(y, op=tdist.ReduceOp.SUM)
            x.copy_(y.cpu())
        else:
            tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def any_flag(flag: bool) -> bool:
    """True on every rank when any rank passes True (used to agree on stop requests)."""
    if not is_initialized():
        return bool(flag)
    torch, tdist = _torch(), _tdist()
    t = torch.tensor([1 if flag else 0], dtype=torch.int64,
                     device="cuda" if backend_for_device() == "nccl" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def provenance() -> dict[str, Any]:
    """Who computed a unit of work: stored with every journal line, cache shard and checkpoint."""
    d = env()
    return {"host": socket.gethostname(), "rank": d.rank, "pid": os.getpid(), "world_size": d.world_size}


def finalize() -> None:
    if is_initialized():
        _STATE["had_group"] = True
        _tdist().destroy_process_group()
    _STATE["env"] = None


def end_process(code: int) -> None:
    """End this process now with ``code`` if it ran a process group; return if it never did.

    Tears down a group still up (without the barrier: an error path), flushes the log handlers and the
    standard streams, then ``os._exit(code)``: no interpreter finalization, so no backend thread that
    outlived its group can abort the process at exit (see the module docstring). Everything a stage
    writes is written atomically and closed before its stage returns; ``atexit`` handlers do not run."""
    if is_initialized():
        finalize()
    if not _STATE.get("had_group"):
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):    # a closed or broken pipe must not change the exit code
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def session(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistEnv]:
    """The process group for the duration of a stage: started when several ranks run and no group is
    up yet, destroyed on exit by the session that saw it start (also when DeepSpeed started it inside,
    as :func:`deepspeed_bootstrap` does on one rank). Nested sessions are no-ops."""
    owns = not is_initialized()
    env_ = init(timeout_s)
    try:
        yield env_
    except BaseException:
        if owns:
            finalize()
        raise
    if owns:
        # every rank done with its last collective before any rank tears its connections down: a rank
        # that closes while a peer's gloo threads still talk to it can abort that peer at exit
        barrier()
        teardown_rendezvous()
        finalize()


TEARDOWN_WAIT_S = 60.0


def teardown_rendezvous(timeout_s: float = TEARDOWN_WAIT_S, key: str | None = None) -> bool:
    """After the last barrier and before the process group is destroyed: wait until every rank has
    returned from that barrier.

    The barrier alone does not ensure it. A rank leaves it as soon as it holds its peers' messages, and
    one that then closes its connections while a slower peer's transport is still finishing the same
    barrier can make that peer fail at exit. gloo keeps this open as "barrier followed by context
    destruction causes some participants to fail". On two torchrun agents, the node whose rank
    succeeded then waits 5 minutes in torchrun's exit barrier for the failed one.

    This rendezvous goes over the process group's key-value store, which does not use those
    connections. Each rank counts itself in and waits for all. Rank 0 waits last, until every rank
    has seen the full count: under a bare ``srun``, rank 0's own process hosts the store, so it must
    not exit while another rank still asks the store.

    Returns False, after a warning, where the store failed or some rank did not arrive within
    ``timeout_s``; teardown then goes on as before. ``key`` defaults to the number of this call in the
    process and the torchrun attempt: the same on every rank, new for every process group."""
    if not is_initialized():
        return True
    tdist = _tdist()
    try:
        store = tdist.distributed_c10d._get_default_store()
        world, me = tdist.get_world_size(), tdist.get_rank()
        if key is None:
            _STATE["teardowns"] = _STATE.get("teardowns", 0) + 1
            key = f"stc/teardown/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_STATE['teardowns']}"
        end = time.monotonic() + timeout_s
        _count_in(store, key, "in", world)
        _wait_for_all(store, key, "in", world, end, "arrived")
        _count_in(store, key, "seen", world)
        if me == 0:
            _wait_for_all(store, key, "seen", world, end, "saw the count")
        return True
    except Exception as e:      # the work is done and written; a failed extra wait must not fail the stage
        logging.getLogger("stc").warning(
            f"rank {env().rank}: the rendezvous before the process group's teardown failed ({type(e).__name__}: {e}); "
            f"tearing it down anyway")
        return False


def _count_in(store: Any, key: str, what: str, world: int) -> None:
    """Add this rank to ``key/what``; the rank that completes the count sets the flag ``key/what/all``,
    on which the others block in the store (no polling: with hundreds of ranks, polling would load the
    one store server that every rank shares)."""
    if store.add(f"{key}/{what}", 1) == world:
        store.set(f"{key}/{what}/all", "1")


def _wait_for_all(store: Any, key: str, what: str, world: int, end: float, said: str) -> None:
    left = max(end - time.monotonic(), 0.001)
    try:
        store.wait([f"{key}/{what}/all"], datetime.timedelta(seconds=left))
    except Exception:
        n = store.add(f"{key}/{what}", 0)
        if n < world:
            raise TimeoutError(f"{n} of {world} ranks {said} in time") from None
        raise


def agree(error: str | None, cls: type[StcError] = StcError) -> None:
    """Raise ``cls`` on every rank when any rank passes an error message (first by rank), so that no
    rank goes on into a collective the failed one will never join. The raised error has
    ``agreed = True``: every rank holds the same message, and ``stc`` prints it once (rank 0)."""
    errs = [e for e in all_gather_object(error) if e]
    if errs:
        exc = cls(errs[0])
        exc.agreed = True  # type: ignore[attr-defined]
        raise exc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_bootstrap() -> None:
    """Start DeepSpeed's communication layer, the same way for the trainer and the ZeRO-3 cache teacher.

    DeepSpeed (``initialize``, ``zero.Init``) wants a process group even on one rank: without one, a
    1-rank group is made on a free port. Stale JIT build locks are cleared first (a start killed while
    compiling would otherwise hang every later start, see :func:`clear_stale_build_locks`).
    """
    import deepspeed  # heavy: imported only by the stages that run DeepSpeed

    if not is_initialized():
        d = env()
        port = int(os.environ.get("MASTER_PORT") or free_port())
        export_torch_env(dataclasses.replace(d, master_port=port))
    clear_stale_build_locks()
    deepspeed.init_distributed(dist_backend=backend_for_device())


STALE_BUILD_LOCK_S = 900.0


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove JIT-extension build locks left by a process killed while compiling; returns those removed.

    DeepSpeed JIT-builds its ``deepspeed_shm_comm`` op at every start (torch cpp_extension, under
    ``$TORCH_EXTENSIONS_DIR``). torch guards the build with a ``lock`` file and every later process
    *waits for that file to disappear*: a process killed mid-build (SIGKILL, OOM, a preempted job)
    leaves it behind and every later start hangs silently. A build takes well under a minute, so a lock
    older than ``max_age_s`` (15 min) is stale. Called before DeepSpeed starts.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    removed = []
    for lock in glob.glob(os.path.join(root, "**", "lock"), recursive=True):
        try:
            if time.time() - os.stat(lock).st_mtime > max_age_s:
                os.unlink(lock)
                removed.append(lock)
        except OSError:
            continue
    if removed:
        print(f"stc: removed stale JIT build lock(s) {removed} (older than {max_age_s:.0f} s; left by a "
              f"process killed while compiling)", file=sys.stderr)
    return removed
