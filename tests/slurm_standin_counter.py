"""TEST-ONLY stand-in for a resumable stage: counts steps, checkpoints on SIGUSR1 and exits 75.

Used by tests/test_slurm.py to prove the launcher's requeue mechanics (trap -> forward -> exit 75 ->
``scontrol requeue`` -> ``SLURM_RESTART_COUNT`` >= 1 -> resume) independently of the real trainer.
Each rank appends the step it completed to ``<dir>/data.rank<r>.jsonl`` and then saves the next step
in ``<dir>/ckpt.rank<r>.json`` (atomically), so a resumed run continues exactly once. Every start is
recorded in ``<dir>/starts.jsonl`` with its restart count. Usage: ``slurm_standin_counter.py DIR STEPS``.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

STOP = {"flag": False}


def main() -> int:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGUSR1, lambda *_: STOP.update(flag=True))
    ckpt = out / f"ckpt.rank{rank}.json"
    step = json.loads(ckpt.read_text())["next"] if ckpt.exists() else 0
    with open(out / "starts.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "pid": os.getpid(), "from": step,
                            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}) + "\n")
    print(f"rank {rank}: starting at step {step}", flush=True)
    while step < steps:
        time.sleep(0.2)  # the "work" of one step
        with open(out / f"data.rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step}) + "\n")
        step += 1
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(json.dumps({"next": step}))
        os.replace(tmp, ckpt)
        if STOP["flag"]:
            print(f"rank {rank}: stop requested; checkpointed at step {step}, exiting 75", flush=True)
            return 75
    print(f"rank {rank}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
