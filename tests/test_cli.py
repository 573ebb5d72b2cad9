"""The stage registry and CLI: canonical names (DESIGN 2b), usage errors, the local launcher."""
from __future__ import annotations

import subprocess

import pytest

from engine import cli

CANONICAL = ["shards build", "shards inspect", "finetune", "importance", "prune", "cache build",
             "cache verify", "distill", "export", "evaluate", "report", "pipeline", "submit", "jobs", "cancel"]


def test_registry_has_canonical_stage_names():
    assert set(CANONICAL) <= set(cli.STAGES)


@pytest.mark.parametrize("name", CANONICAL)
def test_every_stage_parses(name):
    argv = name.split() + (["some/dir"] if name in ("shards inspect", "cache verify") else [])
    args = cli.build_parser().parse_args(argv)
    assert args.stage == name and callable(args.func)


def test_unavailable_stage_says_so(capsys, monkeypatch):
    # every shipped stage is implemented now; a registered stage without a function must still say so
    name = "future"
    monkeypatch.setitem(cli.STAGES, name, cli.Stage(name, "a stage of a later version", None, "#99"))
    assert cli.main([name]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "not available" in err and cli.STAGES[name].issue in err


def test_unknown_stage_is_usage_error(stc_cmd, stc_env):
    out = subprocess.run([*stc_cmd, "prunne"], capture_output=True, text=True, env=stc_env)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_run_requires_stage(capsys):
    assert cli.main(["run", "--nproc", "2"]) == cli.EXIT_USAGE
    assert cli.main(["run", "--nproc", "0", "config", "keys"]) == cli.EXIT_USAGE


def test_torchrun_command_shape():
    from launchers.local import torchrun_command

    cmd = torchrun_command(2, ["importance", "--config", "c.yaml"], master_port=1234)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "1234"
    assert cmd[-5:] == ["-m", "engine.cli", "importance", "--config", "c.yaml"] or cmd[-4:] == ["engine.cli", "importance", "--config", "c.yaml"]


@pytest.mark.slow
def test_stc_run_two_ranks(stc_cmd, stc_env):
    out = subprocess.run([*stc_cmd, "run", "--nproc", "2", "config", "show", "data.batch_size=3"],
                         capture_output=True, text=True, env=stc_env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("batch_size: 3") == 2  # both ranks ran the stage
