"""The Makefile's install paths: system tools per target, apt only where it exists, a clear message elsewhere.

`make demo` and `make test` must work on a fresh Debian machine (CI runs `make test` there) and must not
stop with ``apt-get: command not found`` on a RHEL/Rocky login node. These tests run the real
``sysdeps-*`` targets with a PATH that holds only what a test puts there: no apt, fake tools, a fake
apt-get that records what it was asked.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make") or "make"
# What the recipe itself runs besides builtins.
BASE_TOOLS = ("bash", "sh", "env", "sed", "cat")
TEST_TOOLS = (("sbatch", "slurm-wlm"), ("slurmctld", "slurm-wlm"), ("slurmd", "slurm-wlm"), ("munged", "munge"))


def _bin(tmp_path: Path, *, uid: int = 1000, fake: tuple[str, ...] = (), apt: bool = False) -> Path:
    b = tmp_path / "bin"
    b.mkdir()
    for tool in BASE_TOOLS:
        os.symlink(shutil.which(tool), b / tool)
    (b / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    for tool in fake:
        (b / tool).write_text("#!/bin/sh\nexit 0\n")
    if apt:
        (b / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/apt.log\n')
    for f in b.iterdir():
        if not f.is_symlink():
            f.chmod(0o755)
    return b


def _make(target: str, path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(path), "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C"}
    return subprocess.run([MAKE, "-s", "--no-print-directory", "-C", str(ROOT), target, *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_no_apt_prints_what_is_missing_and_how_to_get_it(tmp_path):
    r = _make("sysdeps-demo", _bin(tmp_path))
    assert r.returncode != 0
    assert "command not found" not in r.stderr
    assert "make demo needs system tools that are not on PATH: g++ espeak-ng" in r.stderr
    assert "dnf install -y gcc-c++ espeak-ng" in r.stderr        # the RHEL names, not the Debian ones
    assert "apt-get install -y g++ espeak-ng" in r.stderr
    assert "pip install -e ." in r.stderr


def test_non_root_without_sudo_does_not_try_apt(tmp_path):
    r = _make("sysdeps-demo", _bin(tmp_path, uid=1000, apt=True))
    assert r.returncode != 0
    assert not (tmp_path / "apt.log").exists()
    assert "not on PATH: g++ espeak-ng" in r.stderr


def test_present_tools_install_nothing(tmp_path):
    r = _make("sysdeps-demo", _bin(tmp_path, uid=0, fake=("g++", "espeak-ng"), apt=True))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "apt.log").exists()
    assert r.stdout == "" and r.stderr == ""


def test_root_with_apt_installs_only_what_the_target_needs(tmp_path):
    b = _bin(tmp_path, uid=0, fake=("g++",), apt=True)
    r = _make("sysdeps-demo", b)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls == ["update -qq", "install -y -qq espeak-ng"]      # no slurm for the demo
    (tmp_path / "apt.log").unlink()
    r = _make("sysdeps-test", b)
    assert r.returncode == 0, r.stderr
    install = (tmp_path / "apt.log").read_text().splitlines()[-1].split()
    # the test target adds SLURM; daemons found in /usr/sbin (off PATH) count as present
    expect = ["espeak-ng"]
    for cmd, pkg in TEST_TOOLS:
        if not (Path("/usr/sbin") / cmd).exists() and pkg not in expect:
            expect.append(pkg)
    assert install == ["install", "-y", "-qq", *expect]


def test_torch_choice_reaches_pip(tmp_path):
    """TORCH= keeps the torch the venv already sees; the pinned torch line gives way to the choice."""
    def dry(*args):
        r = subprocess.run([MAKE, "-n", "-B", "--no-print-directory", "-C", str(ROOT), "install", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout
    assert "install -q -c .venv/constraints.txt 'torch==2.13.0'" in dry()
    assert "'torch==2.5.1'" in dry("TORCH=torch==2.5.1")
    out = dry("TORCH=")
    assert "torch==" not in out.replace("grep -v '^torch==' constraints.txt", "")
    assert "-m venv --system-site-packages .venv" in dry("VENV_FLAGS=--system-site-packages")
