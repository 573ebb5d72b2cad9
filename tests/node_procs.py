"""Helpers for tests that start one torchrun agent per simulated node on this machine."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# LOGLEVEL=INFO: each torchrun agent also logs its own events (workers started, finished, failed, the
# exit barrier), so that a failure says which node stopped where
AGENT_ENV = {"LOGLEVEL": "INFO"}


def run_nodes(commands: list[list[str]], env: dict, logs: list[Path], timeout: float) -> list[int | None]:
    """Start one process per node, each writing to its own log file (a pipe nobody reads while the test
    waits on the other node can fill and stall its writer), and wait for all of them. A node that fails
    ends the wait at once: torchrun's agent on a node that succeeded would otherwise wait in its exit
    barrier (5 minutes) for the failed node. Whatever still runs at the end is killed with its workers
    (each node is its own process group); its code is None."""
    files = [open(log, "w") for log in logs]
    try:
        procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
                 for c, f in zip(commands, files)]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return codes
    finally:
        for f in files:
            f.close()


def told(codes: list[int | None], logs: list[Path]) -> str:
    """Both nodes' exit codes and log tails, for an assertion message."""
    return "".join(f"\n--- node {i} (exit code {c}; None: still running, killed)\n{log.read_text()[-4000:]}"
                   for i, (c, log) in enumerate(zip(codes, logs)))
