"""Shared test settings: offline, one thread per process, project-controlled extension dir."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))


@pytest.fixture
def stc_env() -> dict:
    """Environment for CLI subprocesses: the package importable, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def stc_cmd() -> list[str]:
    return [sys.executable, "-m", "engine.cli"]


@pytest.fixture
def stc_inproc(capsys):
    """`stc` in this process, from the repository root, as a ``CompletedProcess`` (returncode, stdout,
    stderr): for dry runs and refusals, which start no ranks and no DeepSpeed. Much faster than a new
    interpreter per call, and an unexpected exception still fails the test with its traceback."""
    import subprocess

    from engine import cli

    def run(*argv):
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            code = cli.main([str(a) for a in argv])
        finally:
            os.chdir(cwd)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), code, out.out, out.err)
    return run


def pytest_collection_modifyitems(config, items):
    """A test that starts a real SLURM (the `slurm_cluster` fixture) is slow by nature: `make test-fast`
    leaves it out, `make test` and CI run it.

    Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) each module's tests run in one worker, so
    a module-scoped fixture (a tiny model, a whole pipeline run) is built once; every module with a
    real-SLURM test joins one group, so one worker starts one cluster for all of them."""
    slurm_modules = {item.module.__name__ for item in items
                     if "slurm_cluster" in getattr(item, "fixturenames", ())}
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        mod = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("slurm" if mod in slurm_modules else mod))
