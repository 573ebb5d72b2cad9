"""Typed configs: every shipped recipe validates; overrides; every problem reported at once."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from engine import config as cfg

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in CONFIGS}
    assert {"qwen2audio-7b-en-de.yaml", "qwen2audio-7b-en-zh.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = cfg.load(path)
    # and survives a round trip through its resolved YAML unchanged
    again = cfg.resolve(yaml.safe_load(cfg.dump_yaml(recipe)))
    assert again == recipe


def test_paper_defaults():
    r = cfg.load(None)
    assert (r.distill.lora.r, r.distill.lora.alpha, r.distill.lora.dropout, r.distill.lora.rslora) == (64, 128, 0.0, True)
    assert r.distill.lora.target == "all-linear"
    assert (r.finetune.lr, r.finetune.weight_decay, r.finetune.global_batch, r.finetune.schedule) == (1e-5, 0.001, 4, "cosine")
    assert r.data.system_prompt == "You are a professional translator."
    assert r.data.max_audio_s == 30.0


def test_configs_are_frozen():
    r = cfg.load(None)
    with pytest.raises(Exception):
        r.data.batch_size = 3  # type: ignore[misc]


def test_overrides_typed_and_nested():
    r = cfg.resolve({}, ["data.batch_size=8", "distill.lora.r=32", "finetune.zero_stage=3",
                         "importance.force_remove=3,13", "importance.protect=[0, -1, 5]",
                         "model.trust_remote_code=true", "distill.lr=2e-5", "run.out_dir=/tmp/x y"])
    assert r.data.batch_size == 8 and isinstance(r.data.batch_size, int)
    assert r.distill.lora.r == 32
    assert r.finetune.zero_stage == "3"
    assert r.importance.force_remove == (3, 13)
    assert r.importance.protect == (0, -1, 5)
    assert r.model.trust_remote_code is True
    assert r.distill.lr == 2e-5
    assert r.run.out_dir == "/tmp/x y"


def test_override_beats_yaml():
    r = cfg.resolve({"data": {"batch_size": 2}}, ["data.batch_size=6"])
    assert r.data.batch_size == 6


def test_unknown_key_named_with_closest_and_all_problems_at_once():
    with pytest.raises(cfg.ConfigError) as ei:
        cfg.resolve({"data": {"batch_sze": 3, "num_workers": "two"}, "distil": {}, "model": {"dtype": "bf61"}},
                    ["distill.lora.rr=3", "run.seed=abc"])
    msg = str(ei.value)
    problems = ei.value.problems
    assert len(problems) == 6, problems
    assert "'data.batch_sze'" in msg and "did you mean 'data.batch_size'" in msg
    assert "'distil'" in msg and "did you mean 'distill'" in msg
    assert "'distill.lora.rr'" in msg and "'distill.lora.r'" in msg
    assert "data.num_workers" in msg and "integer" in msg
    assert "model.dtype" in msg and "'bf16'" in msg
    assert "run.seed" in msg


def test_value_rules():
    with pytest.raises(cfg.ConfigError) as ei:
        cfg.resolve({}, ["data.batch_size=0", "cache.k=-1", "cache.targets=[ref, logits]",
                         "data.instruction=Translate {language}", "run.interconnect_gbps=0",
                         "run.device_memory_gb=-80"])
    text = str(ei.value)
    for key in ("data.batch_size", "cache.k", "cache.targets", "data.instruction"):
        assert key in text
    assert "run.interconnect_gbps: must be > 0, got 0.0" in text
    assert "run.device_memory_gb: must be >= 0, got -80.0" in text


def test_bad_override_syntax():
    with pytest.raises(cfg.ConfigError, match="section.key=value"):
        cfg.resolve({}, ["batch_size"])
    with pytest.raises(cfg.ConfigError, match="must name a section"):
        cfg.resolve({}, ["batch_size=3"])


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.load(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(cfg.ConfigError, match="mapping"):
        cfg.load(notmap)
    sec = tmp_path / "sec.yaml"
    sec.write_text("data: 3\n")
    with pytest.raises(cfg.ConfigError, match="data: expected a mapping"):
        cfg.load(sec)


def test_save_resolved_roundtrip(tmp_path):
    r = cfg.resolve({}, ["data.batch_size=5", "importance.protect=[0,-1]"])
    p = cfg.save_resolved(r, tmp_path / "out")
    assert p.exists() and not list((tmp_path / "out").glob("*.tmp-*"))
    assert cfg.load(p) == r


def test_replace_validates():
    r = cfg.load(None)
    r2 = cfg.replace(r, data={"batch_size": 7}, shards={"out": "x"})
    assert r2.data.batch_size == 7 and r2.shards.out == "x" and r.data.batch_size == 4
    with pytest.raises(cfg.ConfigError):
        cfg.replace(r, data={"nope": 1})


def test_cli_reports_config_errors(stc_cmd, stc_env, tmp_path):
    out = subprocess.run([*stc_cmd, "config", "show", "data.batch_sze=3", "run.seed=x"],
                         capture_output=True, text=True, env=stc_env)
    assert out.returncode == 2
    assert "did you mean 'data.batch_size'" in out.stderr and "run.seed" in out.stderr
    ok = subprocess.run([*stc_cmd, "config", "show", "--config", str(CONFIGS[0]), "data.batch_size=9"],
                        capture_output=True, text=True, env=stc_env)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["data"]["batch_size"] == 9


@pytest.mark.parametrize("name,metric", [("qwen2audio-7b-en-de.yaml", "chrf++"), ("qwen2audio-7b-en-zh.yaml", "chrf")])
def test_7b_recipes_carry_the_papers_hyperparameters(name, metric):
    r = cfg.load(Path(__file__).resolve().parents[1] / "configs" / name)
    assert (r.model.kind, r.model.dtype) == ("qwen2audio", "bf16")
    # the paper's batch of 4 cannot be shared by the recipes' 8 GPUs: one sample per GPU, a global batch of 8
    assert (r.finetune.mode, r.finetune.epochs, r.finetune.lr, r.finetune.global_batch, r.finetune.schedule,
            r.finetune.warmup_steps, r.finetune.weight_decay) == ("full", 3, 1e-5, 8, "cosine", 0, 0.001)
    assert r.data.batch_size == 1 and r.pipeline.nproc == 8 and r.run.device_memory_gb == 80
    assert (r.importance.scorer, r.importance.method, r.importance.selector) == ("task", "iterative", metric)
    d = r.distill
    assert (d.mode, d.lora.r, d.lora.alpha, d.lora.dropout, d.lora.rslora, d.lora.target) == \
        ("qlora", 64, 128, 0.0, True, "all-linear")
    assert (d.epochs, d.lr, d.global_batch, d.seq_kd) == (4, 1e-5, 8, True)
    assert r.model.double_quant and r.export.quant == "nf4"
    assert r.pipeline.finetune and 0.25 in r.pipeline.students
    assert r.data.dev_split != r.data.test_split
