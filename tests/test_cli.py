"""The CLI built from the stage registry: canonical names, overrides anywhere, typed values, --version,
`stc config keys`, one-line errors (never a traceback for a known problem), the local launcher."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine import __version__, cli, stages
from engine import config as cfg
from engine.errors import EXIT_FAIL, EXIT_USAGE

CANONICAL = ["shards build", "shards inspect", "finetune", "importance", "prune", "cache build",
             "cache verify", "distill", "export", "evaluate", "report", "pipeline", "submit", "jobs", "cancel"]


def test_registry_has_canonical_stage_names():
    assert set(CANONICAL) <= set(stages.STAGES)


@pytest.mark.parametrize("name", CANONICAL)
def test_every_stage_parses(name):
    argv = name.split() + (["some/dir"] if name in ("shards inspect", "cache verify") else [])
    _, args = stages.parse(argv)
    assert args.stage == name and callable(stages.load_entry(stages.STAGES[name]))


def test_every_entry_resolves_and_every_step_stage_has_an_output_rule():
    recipe = cfg.load(None, ["run.out_dir=/r"])
    for st in stages.REGISTRY:
        assert callable(stages.load_entry(st)), st.name
        if st.step:   # a stage the plan runs: output directory and marker from the registry alone
            assert st.section and st.default_out, st.name
            assert stages.out_dir(st.name, recipe).is_absolute()
    assert stages.out_dir("prune", cfg.load(None, ["prune.out=/x/p"])) == stages.Path("/x/p")
    assert stages.markers("distill", recipe) == [stages.Path("/r/distill/final/meta.json")]
    assert stages.outputs("evaluate", cfg.load(None, ["evaluate.models=[a=/m/x, /m/y]", "run.out_dir=/r"])) == \
        [stages.Path("/r/eval/a"), stages.Path("/r/eval/y")]


def test_overrides_anywhere_on_the_line():
    for argv in (["prune", "--from", "R", "prune.count=2", "--out", "O"],
                 ["prune", "prune.count=2", "--from", "R", "--out", "O"],
                 ["prune", "--out", "O", "--from", "R", "prune.count=2"]):
        _, args = stages.parse(argv)
        assert args.overrides == ["prune.count=2"] and args.ranking == "R" and args.out == "O"
        r = cfg.load(None, stages.overrides_for(stages.STAGES["prune"], args))
        assert (r.prune.ranking, r.prune.count, r.prune.out) == ("R", 2, "O")
    # the command line's own overrides win over an option that sets the same key
    _, args = stages.parse(["prune", "--out", "O", "prune.out=P"])
    assert cfg.load(None, stages.overrides_for(stages.STAGES["prune"], args)).prune.out == "P"


def test_unknown_tokens_are_usage_errors(capsys):
    assert cli.main(["prune", "--bogus"]) == EXIT_USAGE
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert cli.main(["jobs", "data.batch_size=3"]) == EXIT_USAGE
    assert "takes no section.key=value overrides" in capsys.readouterr().err


def test_override_values_follow_the_keys_type():
    r = cfg.load(None, ["data.system_prompt=no", "report.title=a: b", "importance.protect=[0, -1]",
                        'evaluate.models=["a=/x,y", b]', "pipeline.students=0.25,0.5", "distill.lora={r: 8}",
                        "distill.cache=", "prune.layers=[]", "distill.lr=1e-4", "data.shuffle=no",
                        'data.instruction="Say {tgt}:"', "model.dtype=fp32"])
    assert r.data.system_prompt == "no" and r.report.title == "a: b"      # YAML 1.1 would give False / a dict
    assert r.importance.protect == (0, -1) and r.evaluate.models == ("a=/x,y", "b")
    assert r.pipeline.students == (0.25, 0.5) and r.distill.lora.r == 8 and r.distill.cache == ""
    assert r.prune.layers == () and r.distill.lr == 1e-4 and r.data.shuffle is False
    assert r.data.instruction == "Say {tgt}:" and r.model.dtype == "fp32"
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(None, ["data.batch_size=eight", "distill.zero_stage=4", "data.shuffle=maybe"])
    text = str(e.value)
    assert "data.batch_size: expected an integer, got eight" in text
    assert "distill.zero_stage: 4 is not one of" in text and "data.shuffle: expected true or false" in text


def test_version(stc_cmd, stc_env):
    r = subprocess.run([*stc_cmd, "--version"], capture_output=True, text=True, env=stc_env)
    assert r.returncode == 0 and r.stdout.strip() == f"stc {__version__}"


def test_config_keys_documents_every_key(capsys):
    assert cli.main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    docs = cfg.field_docs()
    assert len(docs) > 150
    for key, d in docs.items():
        assert d["doc"], f"{key} has no documentation (a trailing comment in engine/config.py)"
        assert f"{key}: {d['type']} = {d['default']}" in out
    assert "importance.protect: list of int = [0, -1]" in out
    assert "layers never removed" in out


def test_unknown_stage_is_usage_error(stc_cmd, stc_env):
    out = subprocess.run([*stc_cmd, "prunne"], capture_output=True, text=True, env=stc_env)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_known_errors_print_one_line_not_a_traceback(tmp_path, stc_cmd, stc_env, stc_inproc):
    from engine.models.tiny import build_tiny

    build_tiny("qwen2audio", tmp_path / "m", num_layers=2, hidden_size=32, dtype="fp32", seed=0)
    for argv, want in ((["prune", "--layers", "1", f"model.path={tmp_path / 'm'}", "model.kind=causal_lm",
                         f"prune.out={tmp_path / 'p'}"], "model.kind"),
                       (["prune", "--layers", "1", f"model.path={tmp_path / 'nope'}"], "does not exist"),
                       (["cache", "verify", str(tmp_path)], "")):
        r = stc_inproc(*argv)        # in process: an exception that is not an StcError fails the test here
        assert r.returncode in (EXIT_FAIL, EXIT_USAGE), r.stderr
        if want:
            assert f"stc {' '.join(argv[:1])}: error:" in r.stderr and want in r.stderr, r.stderr
    # and as a user runs it: one line on stderr, no traceback
    r = subprocess.run([*stc_cmd, "prune", "--layers", "1", f"model.path={tmp_path / 'nope'}"], capture_output=True,
                       text=True, env=stc_env, timeout=120)
    assert r.returncode == EXIT_FAIL and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_requires_stage(capsys):
    assert cli.main(["run", "--nproc", "2"]) == EXIT_USAGE
    assert cli.main(["run", "--nproc", "0", "config", "keys"]) == EXIT_USAGE


def test_config_keys_into_a_closed_pipe_is_not_an_error(stc_env):
    r = subprocess.run(f"{sys.executable} -m engine.cli config keys | head -1", shell=True, capture_output=True,
                       text=True, env=stc_env)
    assert r.returncode == 0 and "Traceback" not in r.stderr and r.stdout.startswith("model.path")


def test_torchrun_command_shape():
    from launchers.local import torchrun_command

    cmd = torchrun_command(2, ["importance", "--config", "c.yaml"], master_port=1234)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "1234"
    assert cmd[-5:] == ["-m", "engine.cli", "importance", "--config", "c.yaml"]


@pytest.mark.slow
def test_stc_run_two_ranks(stc_cmd, stc_env):
    out = subprocess.run([*stc_cmd, "run", "--nproc", "2", "config", "show", "data.batch_size=3"],
                         capture_output=True, text=True, env=stc_env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("batch_size: 3") == 2  # both ranks ran the stage
