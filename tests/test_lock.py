"""One lock per output directory: the lock module, and every stage refusing a second run into the same
output (naming the first one's pid and host), a stale lock of a killed run taken over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import lock, stages
from engine import config as cfg

ROOT = Path(__file__).resolve().parents[1]

HOLDER = r"""
import sys, time
from engine import lock
h, _ = lock.acquire(sys.argv[1], "stc holder-for-test")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def hold(target: Path, seconds: float = 120) -> subprocess.Popen:
    """Another process that holds the lock of ``target`` until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), str(seconds)], env=env(), stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_naming_pid_and_host(tmp_path):
    out = tmp_path / "out"
    p = hold(out)
    try:
        with pytest.raises(lock.LockedError) as e:
            lock.acquire(out, "stc second")
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and socket.gethostname() in msg and "stc holder-for-test" in msg
        assert not out.exists()                                          # the lock lives beside the output
        assert lock.lock_path(out) == tmp_path / ".out.stc-lock"
    finally:
        p.kill()
        p.wait()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    p = hold(out)
    p.send_signal(signal.SIGKILL)       # killed mid-run: its description stays in the file, its flock is gone
    p.wait()
    assert json.loads(lock.lock_path(out).read_text())["pid"] == p.pid
    h, note = lock.acquire(out, "stc next")
    try:
        assert note and f"pid {p.pid}" in note and "no longer running" in note
        assert json.loads(lock.lock_path(out).read_text())["pid"] == os.getpid()
    finally:
        h.release()
    h2, note2 = lock.acquire(out, "stc after")     # released cleanly: nothing to take over
    h2.release()
    assert note2 is None


def test_hold_locks_several_targets_and_releases_all(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with lock.hold([b, a], "stc x"):
        with pytest.raises(lock.LockedError):
            lock.acquire(a, "stc y")
    for t in (a, b):
        h, _ = lock.acquire(t, "stc z")
        h.release()


@pytest.mark.parametrize("stage", ["distill", "finetune", "cache build", "evaluate", "importance", "prune",
                                   "export", "report", "shards build"])
def test_every_writing_stage_refuses_a_second_run_into_its_output(tmp_path, stage, capsys):
    """The lock is taken before the stage reads anything: the refusal is immediate and names the holder."""
    from engine import cli

    recipe = cfg.load(None, [f"run.out_dir={tmp_path / 'run'}", f"evaluate.models=[a={tmp_path / 'm'}]"])
    target = stages.outputs(stage, recipe)[0]
    p = hold(target)
    try:
        argv = [*stage.split(), f"run.out_dir={tmp_path / 'run'}", f"evaluate.models=[a={tmp_path / 'm'}]"]
        if stage == "prune":
            argv += ["--layers", "1"]
        t0 = time.monotonic()
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 1, err
        assert f"is being written by `stc holder-for-test` (pid {p.pid} on {socket.gethostname()}" in err
        assert f"stc {stage}: error:" in err and time.monotonic() - t0 < 60
    finally:
        p.kill()
        p.wait()


def test_pipeline_refuses_a_second_pipeline_on_the_same_run(tmp_path):
    from engine import pipeline as P

    plan = P.build_plan(cfg.load(None, [f"run.out_dir={tmp_path / 'run'}", "model.path=x"]))
    p = hold(plan.run_dir / P.PIPELINE_DIR)
    try:
        with pytest.raises(lock.LockedError, match="stc holder-for-test"):
            with lock.hold([plan.run_dir / P.PIPELINE_DIR], "stc pipeline"):
                pass
    finally:
        p.kill()
        p.wait()
