"""The shipped 7B recipes, validated as a user on a login node would: `stc pipeline --dry-run --nproc 8`
and `stc submit pipeline --dry-run --gpus-per-node 8` on a config-only Qwen2-Audio-7B directory (the
public shapes, no weights) pass, and print plans whose every step would start; a recipe whose global
batch cannot be split over the ranks is refused at dry-run, naming the key and the fix."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["qwen2audio-7b-en-de", "qwen2audio-7b-en-zh"]


@pytest.fixture(scope="module")
def seven_b(tmp_path_factory) -> dict:
    from qwen2audio_7b import write_config_only_7b
    from sine_data import build_split_shards

    root = tmp_path_factory.mktemp("q7plan")
    return {"model": write_config_only_7b(root / "model"), "shards": build_split_shards(root), "root": root}


@pytest.fixture
def stc(stc_inproc):
    return stc_inproc


def ovs(seven_b: dict, name: str) -> list[str]:
    return [f"model.path={seven_b['model']}", f"data.shards={seven_b['shards']}",
            f"run.out_dir={seven_b['root'] / 'runs' / name}"]


def unwrap(text: str) -> str:
    return re.sub(r" \\\n +", " ", text)


@pytest.mark.parametrize("name", RECIPES)
def test_pipeline_dry_run_of_the_7b_recipe_on_8_gpus(seven_b, name, stc):
    r = stc("pipeline", "--config", ROOT / "configs" / f"{name}.yaml", "--dry-run", "--nproc", "8", *ovs(seven_b, name))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    out = r.stdout
    assert "the plan validates: every step would start" in out
    assert not (seven_b["root"] / "runs" / name).exists()                # a dry run writes nothing
    # readable at 80 columns: only a line holding one long word (a path, a quoted list) may run past it
    for line in out.splitlines():
        if len(line) > 80:
            words = shlex.split(line.rstrip(" \\")) if "'" in line else line.split()
            assert len(line) - max(len(w) for w in words) <= 40, line
    plain = unwrap(out)
    steps = re.findall(r"^\s*\d+\. (\S+)  \[([a-z ]+), (\d+) ranks?\]", out, flags=re.M)
    assert [s for s, _, _ in steps][:2] == ["finetune", "eval-teacher"] and steps[-1][0] == "report"
    for step, stage, ranks in steps:
        assert int(ranks) == (8 if stage in ("finetune", "importance", "cache build", "distill", "evaluate") else 1), step
    # every command is copyable as is: this interpreter, the CLI module, the step's stage
    assert plain.count(f"{sys.executable} -m engine.cli run --nproc 8 distill --config") == 4
    assert f"{sys.executable} -m engine.cli prune --config" in plain
    # the estimates come from the shapes: 8.40B teacher, ZeRO-1 for its full fine-tune on 8 x 80 GB, the
    # whole step counted (weights, gradients + DeepSpeed buffers, optimizer, activations of a 30 s sample)
    est = re.sub(r"\n {9}", " ", out)
    m = re.search(r"est: 8\.40B params, 8\.40B trainable; ZeRO-1: (\d+\.\d) GiB/rank of 80 GiB; accumulation 1 "
                  r"weights (\d+\.\d) \+ grads/buffers (\d+\.\d) \+ optimizer (\d+\.\d) \+ activations (\d+\.\d) GiB; "
                  r"checkpointing off comm/rank/step \(ring; 400 Gb/s/node, NVLink within one\): 1 node (\d+\.\d+) GiB",
                  est)
    assert m, out[:3000]
    total, weights, grads, optim, acts, comm = map(float, m.groups())
    assert 50 < total < 74.6 and abs(weights + grads + optim + acts - total) < 0.2
    assert weights == pytest.approx(15.6, abs=0.1) and optim == pytest.approx(11.7, abs=0.1) and acts > 4
    assert comm == pytest.approx(2 * 7 / 8 * 8.40e9 * 2 / 2**30, abs=0.1)     # ring all-reduce volume of bf16 grads
    assert re.search(r"8 nodes \d+\.\d+ GiB \d+ ms", est)
    # the 24-layer QLoRA student: ZeRO-1 (bf16 never runs DeepSpeed's stage-0 optimizer), no checkpointing
    assert re.search(r"est: 6\.78B params, 0\.1\dB trainable; ZeRO-1: 1\d\.\d GiB/rank.*?checkpointing off", est)


@pytest.mark.parametrize("name", RECIPES[:1])      # the en-zh recipe differs only in its metric and paths
def test_submit_dry_run_of_the_7b_recipe_on_8_gpus(seven_b, name, stc):
    r = stc("submit", "pipeline", "--config", ROOT / "configs" / f"{name}.yaml", "--dry-run", "--gpus-per-node", "8",
            *ovs(seven_b, name))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    out = unwrap(r.stdout)
    assert "the plan validates: every step would start" in out
    assert "srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=8 --gpus-per-node=8" in out
    assert re.search(r"srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=1 --mem=\d+G "
                     + re.escape(sys.executable) + r" -m engine.cli prune", out)
    assert out.count("# sbatch --parsable") == 23
    assert not (seven_b["root"] / "runs" / name).exists()


def test_a_global_batch_that_cannot_split_over_the_ranks_is_refused_at_dry_run(seven_b, stc):
    name = RECIPES[0]
    r = stc("pipeline", "--config", ROOT / "configs" / f"{name}.yaml", "--dry-run", "--nproc", "8",
            "finetune.global_batch=4", "data.batch_size=4", *ovs(seven_b, name))
    assert r.returncode == 2, r.stdout[-3000:]
    msg = [ln for ln in r.stdout.splitlines() if "finetune.global_batch=4" in ln]
    assert msg, r.stdout[-3000:]
    assert "step finetune:" in msg[0] and "data.batch_size=4 x 8 ranks = 32" in msg[0]
    assert "set finetune.global_batch to a multiple of 32" in msg[0] and "run on 1 rank(s)" in msg[0]
    assert not (seven_b["root"] / "runs" / name).exists()
    s = stc("submit", "pipeline", "--config", ROOT / "configs" / f"{name}.yaml", "--gpus-per-node", "8",
            "distill.global_batch=12", *ovs(seven_b, name))             # refused before anything is queued
    assert s.returncode == 2 and "distill.global_batch=12" in s.stderr and "multiple of 8" in s.stderr, s.stderr
    assert "Traceback" not in s.stderr
