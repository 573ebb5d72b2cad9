"""A real single-node SLURM (Debian's slurm-wlm + munge) for the launcher tests, owned by the test session.

Why a real one: the launcher's promises (afterok chains, ``--kill-on-invalid-dep``, ``B:USR1`` traps,
``scontrol requeue``, ``SLURM_RESTART_COUNT``, jobs vanishing from ``scontrol``) are scheduler behaviour
that a mock would only restate. Everything the daemons write (munge key/socket/seed, state, spool,
pids, logs) lives in one temp dir, ports are picked free, and the daemons run as root without
systemd, so the cluster neither needs nor touches a system SLURM or munge. ``SLURM_CONF`` is exported
for the session (sbatch/squeue/scontrol and the jobs read it) and the daemons are stopped at the end.

Settings chosen for tests:

* ``AuthInfo=socket=...,cred_expire=10``: a requeued job may only start again once its step
  credential expired (default 120 s); 10 s keeps the preemption test short.
* ``MinJobAge=60``: finished jobs stay visible to ``scontrol`` long enough for the tests to read their
  final state; the launcher itself never relies on it (its ledger covers vanished jobs).
* no ``RequeueExit``: requeueing is the batch script's decision (exit 75 -> ``scontrol requeue``).
* ``ReturnToService=2``: the node comes back ``idle`` after a daemon restart without an admin.
* Two nodes on this one host, for multi-node jobs: ``<host>`` and ``<host>-b`` (``NodeHostname=<host>``,
  its own ``Port``), each served by its own ``slurmd -N <name>`` (spool, pid and log files per node name,
  ``%n``). The default partition ``debug`` holds the first node only, so the other tests queue as on one
  node; partition ``multi`` holds both (``--nodes 2`` jobs). Both nodes claim the host's CPUs and memory
  (``SlurmdParameters=config_overrides``): SLURM_NODEID, SLURM_LOCALID and the node list are what two real
  nodes give, the hardware is shared.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


@dataclass
class Cluster:
    root: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    pids: dict[str, int]
    nodes: tuple[str, ...] = ()        # every node (the first is ``node``)
    multi_partition: str = "multi"     # the partition with every node

    def env(self, base: dict | None = None) -> dict:
        e = dict(os.environ if base is None else base)
        e["SLURM_CONF"] = str(self.conf)
        return e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install() -> str | None:
    """Install slurm-wlm and munge when missing (the Makefile does it too). Returns why not, or None."""
    need = [b for b in ("sbatch", "slurmctld", "slurmd", "munged") if not shutil.which(b)
            and not Path(f"/usr/sbin/{b}").exists()]
    if not need:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{', '.join(need)} missing and cannot apt-get install slurm-wlm munge (not root or no apt)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run("apt-get update -qq && apt-get install -y -qq slurm-wlm munge", shell=True, env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return f"apt-get install slurm-wlm munge failed: {r.stderr[-500:]}"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _pid_from(path: Path, timeout: float = 10.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"{path} not written within {timeout} s")


def _tail(p: Path, n: int = 30) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"({p} not written)"


SLURM_CONF = """\
ClusterName=stctest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=60
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
InactiveLimit=0
KillWait=5
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
NodeName={node}-b NodeHostname={node} NodeAddr=127.0.0.1 Port={slurmd_port_b} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes={node},{node}-b MaxTime=INFINITE State=UP
"""


def start(root: Path) -> Cluster:
    """Start munged, slurmctld and slurmd under ``root``; wait until the node is idle."""
    for d in ("munge", "state", "spool", "run", "log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    os.chmod(root / "munge", 0o755)  # munged refuses a socket dir writable by others
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = root / "munge" / "munge.socket"
    pids: dict[str, int] = {}
    r = subprocess.run([_sbin("munged"), f"--socket={sock}", f"--key-file={key}", f"--pid-file={root}/run/munged.pid",
                        f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/munged.seed"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"munged failed to start: {r.stderr.strip()}")
    pids["munged"] = _pid_from(root / "run" / "munged.pid")
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    # the node's memory as SLURM sees it (slurmd refuses a node that claims more than it has): jobs that ask
    # for --mem (the single-task steps of a plan) are checked against it
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    conf = root / "slurm.conf"
    ports = [_free_port() for _ in range(3)]
    conf.write_text(SLURM_CONF.format(node=node, ctld_port=ports[0], slurmd_port=ports[1], slurmd_port_b=ports[2],
                                      root=root, munge_socket=sock, cpus=cpus, mem_mb=mem_mb, partition="debug"))
    env = dict(os.environ, SLURM_CONF=str(conf))
    nodes = (node, f"{node}-b")
    daemons = [("slurmctld", [], "slurmctld"), *((f"slurmd-{n}", ["-N", n], "slurmd") for n in nodes)]
    for name, extra, binary in daemons:
        r = subprocess.run([_sbin(binary), "-f", str(conf), *extra], env=env, capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{name} failed to start: {r.stderr}\n{_tail(root / 'log' / f'{name}.log')}")
        pids[name] = _pid_from(root / "run" / f"{name}.pid")
    cluster = Cluster(root=root, conf=conf, node=node, partition="debug", cpus=cpus, pids=pids, nodes=nodes)
    end = time.monotonic() + 30
    state = ""
    while time.monotonic() < end:
        r = subprocess.run(["sinfo", "-h", "-N", "-p", "multi", "-o", "%T"], env=env, capture_output=True, text=True)
        state = " ".join(r.stdout.split())
        if state == "idle idle":
            return cluster
        time.sleep(0.3)
    stop(cluster)
    raise RuntimeError(f"nodes not idle after 30 s (states {state!r}):\n{_tail(root / 'log' / 'slurmctld.log')}\n"
                       + "\n".join(_tail(root / "log" / f"slurmd-{n}.log") for n in nodes))


def stop(cluster: Cluster) -> None:
    """Cancel leftovers, then stop the daemons this fixture started (by pid, never by name)."""
    env = cluster.env()
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
    for name in (*(f"slurmd-{n}" for n in cluster.nodes), "slurmctld", "munged"):
        pid = cluster.pids.get(name)
        if not pid:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        end = time.monotonic() + 15
        while time.monotonic() < end and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    """Running and not a zombie (daemons are re-parented to an init that may never reap them)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def job_info(job: str | int, env: dict | None = None) -> dict[str, str]:
    """``scontrol show job -o`` as a dict; {} once the job has left slurmctld's memory."""
    r = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return {}
    out: dict[str, str] = {}
    for tok in r.stdout.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out.setdefault(k, v)
    return out


def wait_job(job: str | int, timeout: float = 120.0, env: dict | None = None) -> dict[str, str]:
    """Poll ``scontrol show job`` (``sbatch --wait`` polls far too slowly) until a terminal state."""
    end = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < end:
        info = job_info(job, env)
        if not info or info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    raise TimeoutError(f"job {job} not finished after {timeout} s: {info}")


_SHARED: dict[str, Cluster] = {}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    """One cluster per test process. Every module that imports this fixture gets its own session-scoped
    instance from pytest, so the instances share the cluster the first one started (and stops last:
    session fixtures are torn down in reverse order of set-up)."""
    if "cluster" in _SHARED:
        yield _SHARED["cluster"]
        return
    why = _install()
    if why:   # the SLURM tests are part of the suite: a machine that cannot run them fails them
        pytest.fail(f"no SLURM for the tests: {why}; `make test` installs slurm-wlm and munge (as root, with apt)")
    # Not under pytest's tmp dir: munged wants every folder above its socket world-executable, and
    # pytest's base folder is 0700. A short path also keeps the socket under the 108-byte limit.
    root = Path(tempfile.mkdtemp(prefix="stc-slurm-", dir="/tmp"))
    cluster = start(root)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    _SHARED["cluster"] = cluster
    try:
        yield cluster
    finally:
        _SHARED.pop("cluster", None)
        stop(cluster)
        shutil.rmtree(root, ignore_errors=True)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
