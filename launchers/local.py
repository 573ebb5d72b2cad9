"""Local launcher: run a stage on N processes of this machine through torchrun.

``stc run --nproc N <stage> ...`` is how every multi-rank test and laptop run starts; the SLURM
launcher (``launchers/slurm.py``) maps SLURM's variables to the same ranks instead.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any, Mapping


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, stage_argv: list[str], master_port: int | None = None,
                     nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1") -> list[str]:
    """The torchrun command line that starts ``python -m engine.cli <stage_argv>`` on ``nproc`` ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
            "--master_addr", master_addr, "--master_port", str(master_port or free_port()),
            "-m", "engine.cli", *stage_argv]


EXIT_DIR_ENV = "STC_RANK_EXIT_DIR"


def record_exit(code: int) -> None:
    """Called by ``stc`` in every rank: leave the rank's exit code where :func:`launch` finds it."""
    d = os.environ.get(EXIT_DIR_ENV)
    if d and os.path.isdir(d):
        with open(os.path.join(d, f"rank{os.environ.get('RANK', '0')}.code"), "w") as f:
            f.write(str(int(code)))


def launch(nproc: int, stage_argv: list[str], env: Mapping[str, str] | None = None) -> int:
    """Run the stage on ``nproc`` ranks; returns the stage's exit code.

    torchrun reports any failing rank as 1, which would hide the "stopped on request, rerun to
    continue" code (75). Each rank records its own code, so when every rank stopped resumably the
    launcher says so too.
    """
    import tempfile

    e = dict(os.environ if env is None else env)
    # One BLAS thread pool per rank sized to the cores, instead of every rank grabbing all cores.
    e.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".torch_extensions"))
    with tempfile.TemporaryDirectory(prefix="stc-exit-") as d:
        e[EXIT_DIR_ENV] = d
        rc = subprocess.call(torchrun_command(nproc, stage_argv), env=e)
        codes = []
        for r in range(nproc):
            p = os.path.join(d, f"rank{r}.code")
            if os.path.exists(p):
                with open(p) as f:
                    codes.append(int(f.read().strip() or 1))
    if rc != 0 and len(codes) == nproc and len(set(codes)) == 1:
        return codes[0]
    return rc


def main(recipe: object, args: object) -> int:
    """``stc run --nproc N <stage> ...``: the stage on N local ranks."""
    from engine.errors import UsageError

    a: Any = args
    if a.nproc < 1:
        raise UsageError("--nproc must be >= 1")
    argv = [x for x in (a.stage_argv or []) if x != "--"]
    if not argv:
        raise UsageError("name a stage, e.g. stc run --nproc 2 importance --config configs/demo.yaml")
    return launch(a.nproc, argv)
