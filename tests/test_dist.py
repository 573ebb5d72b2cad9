"""Rank detection from torchrun, deepspeed and SLURM variables; a real 2-rank gloo run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine import dist


def test_single_process_defaults():
    d = dist.detect({})
    assert (d.rank, d.world_size, d.local_rank, d.launcher, d.is_main, d.distributed) == (0, 1, 0, "single", True, False)


def test_torchrun_env():
    d = dist.detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                     "GROUP_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (d.rank, d.world_size, d.local_rank, d.node_rank, d.num_nodes, d.master_addr, d.master_port) == \
        (3, 8, 1, 1, 4, "n0", 1234)
    assert d.launcher == "torchrun"


def test_slurm_env():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NNODES": "4",
           "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-09,12],login", "SLURM_JOB_ID": "123456"}
    d = dist.detect(env)
    assert (d.rank, d.local_rank, d.world_size, d.num_nodes, d.node_rank) == (5, 1, 8, 4, 2)
    assert d.master_addr == "gpu07" and d.launcher == "slurm"
    assert d.master_port == 20000 + 123456 % 20000
    assert d.local_world_size == 2
    # explicit torch variables win (srun torchrun ...)
    d2 = dist.detect({**env, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert d2.launcher == "torchrun" and d2.world_size == 2


def test_bad_env_value():
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist.detect({"RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.parametrize("text,hosts", [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[007-009,12]", ["gpu007", "gpu008", "gpu009", "gpu12"]),
    ("a[1-2],b,c[5]", ["a1", "a2", "b", "c5"]),
    ("rack[1-2]-n", ["rack1-n", "rack2-n"]),
])
def test_expand_nodelist(text, hosts):
    assert dist.expand_nodelist(text) == hosts


SCRIPT = r"""
import json, sys, torch
from engine import dist
d = dist.init()
got = dist.all_gather_object(dist.provenance())
x = torch.tensor([float(d.rank + 1)])
dist.all_reduce_sum(x)
flag = dist.any_flag(d.rank == 1)
b = dist.broadcast_object({"from": d.rank})
if d.rank == 0:
    print(json.dumps({"world": d.world_size, "ranks": [g["rank"] for g in got], "sum": x.item(),
                      "flag": flag, "bcast": b, "launcher": d.launcher}))
dist.barrier()
dist.finalize()
"""


def on_two_ranks(code: str, tmp_path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """``code`` as a script (with ``args``) on two gloo ranks under torchrun; fails the test unless both
    exit 0."""
    from launchers.local import torchrun_command

    script = tmp_path / "script.py"
    script.write_text(code)
    cmd = torchrun_command(2, [])
    cmd = cmd[:cmd.index("-m", 3)] + [str(script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_rank_gloo_via_torchrun(tmp_path, stc_env):
    out = on_two_ranks(SCRIPT, tmp_path, stc_env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"world": 2, "ranks": [0, 1], "sum": 3.0, "flag": True, "bcast": {"from": 0}, "launcher": "torchrun"}


def test_stale_jit_build_lock_is_removed_fresh_one_kept(tmp_path, monkeypatch):
    import time

    from engine import dist

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "other_op" / "lock"
    for p in (stale, fresh):
        p.parent.mkdir(parents=True)
        p.write_text("")
    old = time.time() - 2 * dist.STALE_BUILD_LOCK_S
    os.utime(stale, (old, old))
    assert dist.clear_stale_build_locks() == [str(stale)]
    assert not stale.exists() and fresh.exists()


TEARDOWN = r"""
import json, pathlib, sys, time
from engine import dist
out = pathlib.Path(sys.argv[1])
with dist.session() as d:
    store = __import__("torch").distributed.distributed_c10d._get_default_store()
    both = dist.teardown_rendezvous(key="both")
    counts = (store.add("both/in", 0), store.add("both/seen", 0))   # rank 0 returns only after both saw the count
    dist.barrier()
    t0 = time.monotonic()
    alone = dist.teardown_rendezvous(timeout_s=1.0, key="alone") if d.rank == 1 else None
    waited = time.monotonic() - t0
    dist.barrier()
    doc = {"rank": d.rank, "both": both, "counts": counts, "alone": alone, "waited": waited}
# the session's own teardown rendezvous ran and the group is destroyed; one file per rank, because two
# ranks printing to one pipe at once can interleave their lines
(out / f"rank{d.rank}.json").write_text(json.dumps({**doc, "exited": True}))
"""


@pytest.mark.slow
def test_teardown_rendezvous_waits_for_every_rank_and_gives_up_after_its_timeout(tmp_path, stc_env):
    """Two gloo ranks under torchrun: the store rendezvous before teardown returns True once both ranks
    are in, rank 0 last (both have seen the full count by then); a rank left alone warns and returns
    False after its timeout instead of hanging; a whole session then tears down and exits 0."""
    out = on_two_ranks(TEARDOWN, tmp_path, stc_env, str(tmp_path))
    docs = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert [docs[r]["rank"] for r in (0, 1)] == [0, 1] and docs[0]["exited"] is docs[1]["exited"] is True
    assert docs[0]["both"] is docs[1]["both"] is True
    assert docs[0]["counts"] == [2, 2] and docs[1]["counts"][0] == 2
    assert docs[1]["alone"] is False and 1.0 <= docs[1]["waited"] < 10
    assert "rendezvous before the process group's teardown failed" in out.stderr + out.stdout
    assert "1 of 2 ranks arrived in time" in out.stderr + out.stdout
    assert out.stderr.count("teardown failed") == 1      # the session's own rendezvous (default key) did not


SITECUSTOMIZE = r"""
import atexit, json, os, sys
def _finalized():
    with open(os.path.join(os.environ["STC_TEST_ATEXIT_DIR"], f"{os.getpid()}.json"), "w") as f:
        json.dump({"rank": os.environ.get("RANK"), "argv": sys.argv}, f)
if os.environ.get("STC_TEST_ATEXIT_DIR"):
    atexit.register(_finalized)
"""


@pytest.mark.slow
def test_a_rank_that_ran_a_process_group_ends_without_interpreter_finalization(tmp_path, stc_cmd, stc_env):
    """Two ranks of a stage end through os._exit with their code, after the streams are flushed: no atexit
    handler (a stand-in for the interpreter's finalization, where a gloo thread that outlived its group
    can abort the rank) runs in a rank. One rank, which starts no group, ends as usual."""
    from tests.sine_data import build_sine_shards

    sh = build_sine_shards(tmp_path, 8, 8)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marks = tmp_path / "atexit"
    marks.mkdir()
    env = {**stc_env, "STC_TEST_ATEXIT_DIR": str(marks),
           "PYTHONPATH": str(site) + os.pathsep + stc_env["PYTHONPATH"]}
    stream = ["shards", "stream", "--shards", str(sh), "--split", "train", "data.batch_size=2", "data.num_workers=0"]

    def finalized() -> list[dict]:
        found = [json.loads(p.read_text()) for p in marks.glob("*.json")]
        for p in marks.glob("*.json"):
            p.unlink()
        return found

    one = subprocess.run([*stc_cmd, *stream, f"run.out_dir={tmp_path / 'one'}"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    assert [m["rank"] for m in finalized()] == [None]        # no group: the interpreter finalized as usual
    two = subprocess.run([*stc_cmd, "run", "--nproc", "2", *stream, f"run.out_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [m["rank"] for m in finalized()]
    assert None in ranks and "0" not in ranks and "1" not in ranks, ranks   # only the launcher finalized
    assert two.stderr.rstrip().endswith("samples delivered this epoch"), two.stderr[-2000:]  # rank 0's last line
