"""The trainer end to end with real DeepSpeed: 2 ranks over gloo via ``stc run --nproc 2`` (torchrun).

Tiny Qwen2-Audio teacher (4 layers) and student (2 layers), fp32 so losses compare exactly on CPU,
16 train + 6 dev samples of short sine WAVs built with ``engine.data.shards.build``. Runs are shared
between assertions (each DeepSpeed start costs seconds); the first start JIT-builds DeepSpeed's shm op
into TORCH_EXTENSIONS_DIR (~35 s once).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sine_data import build_sine_shards

pytestmark = pytest.mark.slow

N_TRAIN = 16


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    from engine.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("train")
    build_sine_shards(root, N_TRAIN + 6, N_TRAIN)
    build_tiny("qwen2audio", root / "teacher", num_layers=4, dtype="fp32", seed=0)
    build_tiny("qwen2audio", root / "student", num_layers=2, dtype="fp32", seed=1)
    return root


def base_args(ws: Path, out: Path, **kw: str) -> list[str]:
    args = {"model.path": ws / "teacher", "model.dtype": "fp32", "data.shards": ws / "sh", "data.batch_size": 2,
            "distill.student": ws / "student", "distill.mode": "lora", "distill.teacher_mode": "online",
            "distill.seq_kd": "false", "distill.global_batch": 4, "distill.epochs": 1, "distill.out": out,
            "distill.lr": "1e-3", "distill.lora.r": 4, "distill.save_every": 100, "cache.k": 8, "run.threads": 1}
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def stc(stc_cmd, stc_env, stage: str, args: list[str], nproc: int = 1, signal_at: str = "",
        expect: int | None = 0) -> subprocess.CompletedProcess:
    env = dict(stc_env)
    if signal_at:
        env["STC_SIGNAL_AT_STEP"] = signal_at
    head = [*stc_cmd, "run", "--nproc", str(nproc)] if nproc > 1 else list(stc_cmd)
    r = subprocess.run([*head, stage, *args], env=env, capture_output=True, text=True, timeout=400)
    if expect is not None:
        assert r.returncode == expect, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def steps(out: Path) -> list[dict]:
    return [m for m in metrics(out) if "loss" in m]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in steps(out)]


def all_keys(out: Path) -> list[str]:
    return [k for m in steps(out) for k in m["keys"]]


def train_keys(ws: Path) -> set[str]:
    return {f"u{i:02d}" for i in range(N_TRAIN)}


# ============================================================================================ invariance

WORKER = r'''
import sys, torch
from dataclasses import replace
from engine import config as cfg, dist
from engine.train import checkpoint as train_ckpt
from engine.train import trainer as train
from engine.data.stream import Stream
out = sys.argv[1]
recipe = cfg.load(None, sys.argv[2:])
t = train.Trainer(recipe, "distill")
t.setup()
# The same two micro batches in both layouts: the first two of an unshuffled one-rank plan.
s = Stream(recipe.data.shards, "train", replace(recipe.data, shuffle=False), t.featurizer, rank=0, world_size=1,
           allow_unsplit=True)
it = iter(s)
b = [next(it), next(it)]
window = b if dist.world_size() == 1 else [b[dist.rank()]]
m = t.train_step(window)
params = {n: train_ckpt.full_param(p) for n, p in t.named_trainable}
if dist.is_main():
    torch.save({"loss": m["loss"], "ce": m["ce"], "kd": m["kd"], "params": params}, out)
dist.barrier()
dist.end_process(0)   # as stc ends a rank: no interpreter finalization (engine.dist)
'''


@pytest.mark.parametrize("stage", ["2", "3"])
def test_one_rank_accum_2_equals_two_ranks_accum_1(ws, tmp_path, stc_env, stage):
    """The loss and the update are those of the global batch, whatever world size x accumulation."""
    import torch

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = base_args(ws, tmp_path / "o", **{"distill.zero_stage": stage, "distill.zero3_persistence_threshold": 0})
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    r = subprocess.run([sys.executable, str(script), str(one), *args], env=stc_env, capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0, r.stderr[-4000:]
    from launchers.local import free_port

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script), str(two), *args], env=stc_env, capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = torch.load(one), torch.load(two)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["kd"] == pytest.approx(b["kd"], rel=1e-5)
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        assert torch.allclose(a["params"][n], b["params"][n], atol=1e-6, rtol=1e-5), n


# ============================================================================================ ZeRO-2 LoRA: stop and resume

@pytest.fixture(scope="module")
def z2_lora(ws, tmp_path_factory, stc_cmd_m, stc_env_m):
    """A reference run; a run stopped at step 2 (SIGTERM to rank 1) and resumed in place; the same stopped
    run copied with its shards to other folders (node-local staging, a scratch disk) and resumed there."""
    import shutil

    d = tmp_path_factory.mktemp("z2lora")
    ref, cut = d / "ref", d / "cut"
    rref = stc(stc_cmd_m, stc_env_m, "distill", base_args(ws, ref, **{"distill.zero_stage": 2}), nproc=2)
    r = stc(stc_cmd_m, stc_env_m, "distill", base_args(ws, cut, **{"distill.zero_stage": 2}), nproc=2,
            signal_at="2:1", expect=None)
    first = metrics(cut)
    moved, moved_sh = d / "elsewhere" / "cut", d / "staged" / "sh"
    shutil.copytree(cut, moved)
    shutil.copytree(ws / "sh", moved_sh)
    stc(stc_cmd_m, stc_env_m, "distill", base_args(ws, cut, **{"distill.zero_stage": 2}), nproc=2)
    rm = stc(stc_cmd_m, stc_env_m, "distill",
             base_args(ws, moved, **{"distill.zero_stage": 2, "data.shards": moved_sh}), nproc=2, expect=None)
    return {"ref": ref, "cut": cut, "stop_rc": r.returncode, "first": first, "moved": moved, "moved_rc": rm,
            "ref_stderr": rref.stderr}


@pytest.fixture(scope="module")
def stc_env_m() -> dict:
    import os

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def stc_cmd_m() -> list[str]:
    return [sys.executable, "-m", "engine.cli"]


def test_sigterm_checkpoints_the_same_step_on_all_ranks_and_exits_resumable(z2_lora):
    first = z2_lora["first"]
    # rank 1 alone got the signal; the ranks agreed and checkpointed step 2
    assert [m["step"] for m in first if m.get("event") == "checkpoint"] == [2]
    assert [m for m in first if m.get("event") == "stopped"][0]["exit"] == 75
    assert z2_lora["stop_rc"] != 0  # never 0: torchrun reports the ranks' 75 as a failure
    meta = json.loads((z2_lora["cut"] / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["kind"] == "checkpoint" and sorted(p["rank"] for p in meta["provenance"]) == [0, 1]


def test_resume_gives_identical_losses_and_exactly_once_data(ws, z2_lora):
    ref, cut = losses(z2_lora["ref"]), losses(z2_lora["cut"])
    assert [s for s, _ in cut] == [1, 2, 3, 4] and len(ref) == 4
    for (s1, a), (s2, b) in zip(ref, cut):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-7)
    keys = all_keys(z2_lora["cut"])
    assert sorted(keys) == sorted(train_keys(ws)) and len(keys) == N_TRAIN
    assert all_keys(z2_lora["ref"]) == keys
    assert any(m.get("resumed_from") for m in metrics(z2_lora["cut"]) if m.get("event") == "start")


def test_two_ranks_log_to_files_and_libraries_speak_once(z2_lora):
    """Rank 0 writes the console and logs/rank0.log, rank 1 only logs/rank1.log: what libraries print at
    start-up shows once in the job's output, and the known CPU-only noise not at all."""
    err = z2_lora["ref_stderr"]
    logs = z2_lora["ref"] / "logs"
    assert (logs / "rank0.log").exists() and (logs / "rank1.log").exists()
    assert err.count("ZeRO-2 (forced by the config;") == 1              # each rank logs it; the job shows one
    assert "ZeRO-2 (forced by the config;" in (logs / "rank1.log").read_text()
    assert "distill: 4/4 steps (100%)" in (logs / "rank0.log").read_text()
    for noise in ("kernels-community", "Setting accelerator to CPU", "FutureWarning", "rank1"):
        assert noise not in err, noise


def test_a_run_copied_to_other_folders_resumes(z2_lora):
    """The checkpoint's identity is content (model, data and cache fingerprints, settings), not paths."""
    r = z2_lora["moved_rc"]
    assert r.returncode == 0, r.stderr[-4000:]
    start = [m for m in metrics(z2_lora["moved"]) if m.get("event") == "start"]
    assert start[-1]["resumed_from"] and "elsewhere" in start[-1]["resumed_from"]
    ref, moved = losses(z2_lora["ref"]), losses(z2_lora["moved"])
    assert [s for s, _ in moved] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(ref, moved):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)


def test_resume_refuses_another_config_and_names_the_difference(ws, z2_lora, stc_cmd_m, stc_env_m, tmp_path):
    r = stc(stc_cmd_m, stc_env_m, "distill",
            base_args(ws, tmp_path / "x", **{"distill.resume": z2_lora["cut"] / "checkpoints", "distill.lr": "2e-3"}),
            expect=1)
    assert "belongs to another run or config" in r.stderr and "distill.lr" in r.stderr


def test_metrics_and_outputs(z2_lora):
    out = z2_lora["ref"]
    s = steps(out)
    for k in ("loss", "ce", "kd", "lr", "tokens_per_s", "peak_mem_bytes", "device_hours"):
        assert all(m[k] is not None for m in s), k
    assert all(m["kd"] > 0 for m in s)
    start = [m for m in metrics(out) if m.get("event") == "start"][0]
    assert start["zero_stage"] == 2 and start["world_size"] == 2 and start["accum"] == 1
    assert (out / "config.yaml").exists()
    meta = json.loads((out / "final" / "meta.json").read_text())
    assert meta["kind"] == "model" and meta["trained"]["adapter"] is True
    assert (out / "final" / "adapter_model.safetensors").exists()


def test_export_merges_lora_and_reloads_in_plain_transformers(ws, z2_lora, stc_cmd_m, stc_env_m, tmp_path):
    out = tmp_path / "export"
    stc(stc_cmd_m, stc_env_m, "export", [f"export.source={z2_lora['ref'] / 'final'}", f"export.out={out}",
                                         "export.quant=none", "model.dtype=fp32"])
    code = (f"import torch; from transformers import Qwen2AudioForConditionalGeneration as M, AutoProcessor as P;"
            f"m = M.from_pretrained(r'{out}'); p = P.from_pretrained(r'{out}');"
            f"ids = p.tokenizer('Hallo', return_tensors='pt').input_ids;"
            f"g = m.generate(ids, max_new_tokens=3, do_sample=False); assert g.shape[1] >= ids.shape[1];"
            f"assert not any('lora' in k for k in m.state_dict()); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], env=stc_env_m, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))


# ============================================================================================ ZeRO-3 full: partitioned, resume on 1 rank

def test_zero3_full_partitions_and_resumes_on_one_rank(ws, tmp_path, stc_cmd_m, stc_env_m):
    out = tmp_path / "z3"
    args = base_args(ws, out, **{"distill.mode": "full", "distill.zero_stage": 3,
                                 "distill.zero3_persistence_threshold": 0})
    stc(stc_cmd_m, stc_env_m, "distill", args, nproc=2, signal_at="2:0", expect=None)
    start = [m for m in metrics(out) if m.get("event") == "start"][0]
    assert start["zero_stage"] == 3 and start["zero3_params"] > 0
    assert start["zero3_partitioned"] == start["zero3_params"]          # threshold 0: every parameter sliced
    assert start["zero3_local_numel"] * 2 <= start["zero3_numel"] + start["zero3_params"]  # ~half per rank
    assert [m["step"] for m in steps(out)] == [1, 2]
    # resume the 2-rank ZeRO-3 checkpoint on 1 rank (ZeRO stage chosen again: auto)
    stc(stc_cmd_m, stc_env_m, "distill", base_args(ws, out, **{"distill.mode": "full",
                                                              "distill.zero3_persistence_threshold": 0}))
    starts = [m for m in metrics(out) if m.get("event") == "start"]
    assert starts[-1]["world_size"] == 1 and starts[-1]["accum"] == 2 and starts[-1]["resumed_from"]
    assert [m["step"] for m in steps(out)] == [1, 2, 3, 4]
    keys = all_keys(out)
    assert sorted(keys) == sorted(train_keys(ws))                     # every sample once
    final = out / "final"
    assert (final / "model.safetensors").exists()
    meta = json.loads((final / "meta.json").read_text())
    assert meta["trained"]["adapter"] is False


def test_zero3_lora_partitions_frozen_base(ws, tmp_path, stc_cmd_m, stc_env_m):
    out = tmp_path / "z3l"
    stc(stc_cmd_m, stc_env_m, "distill", base_args(ws, out, **{"distill.zero_stage": 3, "distill.epochs": 0.5,
                                                              "distill.zero3_persistence_threshold": 0}), nproc=2)
    start = [m for m in metrics(out) if m.get("event") == "start"][0]
    assert start["zero_stage"] == 3 and start["zero3_partitioned"] == start["zero3_params"]
    assert len(steps(out)) == 2 and all(m["loss"] == m["loss"] for m in steps(out))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_zero3_loads_partitioned_with_the_losses_of_whole_loading(ws, tmp_path, stc_cmd_m, stc_env_m, mode):
    """ZeRO-3 builds the model under zero.Init: already partitioned right after loading (before
    deepspeed.initialize), and the per-step losses equal those of loading whole copies (STC_ZERO3_INIT=0,
    the previous path) and of ZeRO-2."""
    kw = {"distill.mode": mode, "distill.epochs": 0.5, "distill.zero3_persistence_threshold": 0}
    runs = {}
    # ZeRO-2 against ZeRO-3 once (LoRA): the full-model runs compare the two ZeRO-3 loading paths
    for name, stage, init in (("init", 3, "1"), ("whole", 3, "0"), *((("z2", 2, "1"),) if mode == "lora" else ())):
        out = tmp_path / name
        env = dict(stc_env_m, STC_ZERO3_INIT=init)
        stc(stc_cmd_m, env, "distill", base_args(ws, out, **kw, **{"distill.zero_stage": stage}), nproc=2)
        runs[name] = out
    start = [m for m in metrics(runs["init"]) if m.get("event") == "start"][0]
    assert start["zero3_init"] is True and start["zero_stage"] == 3
    assert start["zero3_load_params"] > 0
    assert start["zero3_load_partitioned"] == start["zero3_load_params"]       # every base weight a slice
    assert start["zero3_load_local_numel"] * 2 <= start["zero3_load_numel"] + start["zero3_load_params"]
    assert start["zero3_partitioned"] == start["zero3_params"]
    whole = [m for m in metrics(runs["whole"]) if m.get("event") == "start"][0]
    assert whole["zero3_init"] is False and whole["zero3_load_params"] == 0
    ref = losses(runs["init"])
    assert [s for s, _ in ref] == [1, 2]
    for other in runs.keys() - {"init"}:
        for (s1, a), (s2, b) in zip(ref, losses(runs[other]), strict=True):
            assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-7), other


def test_zero2_full_finetune(ws, tmp_path, stc_cmd_m, stc_env_m):
    out = tmp_path / "ft"
    stc(stc_cmd_m, stc_env_m, "finetune", [f"model.path={ws / 'student'}", "model.dtype=fp32", f"data.shards={ws / 'sh'}",
                                           "data.batch_size=2", "finetune.global_batch=4", "finetune.epochs=0.5",
                                           f"finetune.out={out}", "finetune.zero_stage=2", "finetune.lr=1e-3",
                                           "finetune.eval_every=1", "run.threads=1"], nproc=2)
    s = steps(out)
    assert len(s) == 2 and all(m["kd"] is None for m in s)
    assert len([m for m in metrics(out) if m.get("event") == "eval"]) == 2
    assert (out / "final" / "model.safetensors").exists()


# ============================================================================================ bad input

def test_global_batch_that_does_not_divide_the_world(ws, tmp_path, stc_cmd_m, stc_env_m):
    r = stc(stc_cmd_m, stc_env_m, "distill", base_args(ws, tmp_path / "o", **{"distill.global_batch": 6}),
            nproc=2, expect=None)
    assert r.returncode != 0
    assert "global batch 6 does not divide by micro batch 2 x world size 2 = 4" in r.stderr


def test_teacher_with_another_vocabulary_is_refused(ws, tmp_path, stc_cmd_m, stc_env_m):
    from engine.models.tiny import build_bpe_tokenizer, build_tiny

    other = build_tiny("qwen2audio", tmp_path / "t2", tokenizer=build_bpe_tokenizer(vocab_size=400), num_layers=2,
                                  dtype="fp32")
    r = stc(stc_cmd_m, stc_env_m, "distill", base_args(ws, tmp_path / "o", **{"model.path": other}), expect=1)
    assert "teacher/student vocabulary mismatch" in r.stderr


# ============================================================================================ one run per output, dead ranks

def test_a_second_distill_into_the_same_out_dir_is_refused(ws, tmp_path, stc_cmd_m, stc_env_m):
    """Two `stc distill` in one out dir: the second is refused naming the first's pid and host; the first
    finishes with every step once (no resumes of each other's checkpoints)."""
    import socket
    import time

    from engine import lock

    out = tmp_path / "out"
    first = subprocess.Popen([*stc_cmd_m, "distill", *base_args(ws, out, **{"distill.zero_stage": 2})],
                             env=stc_env_m, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while time.monotonic() < end and not (lock.lock_path(out).exists() and lock.lock_path(out).read_text().strip()):
        time.sleep(0.05)
    second = stc(stc_cmd_m, stc_env_m, "distill", base_args(ws, out, **{"distill.zero_stage": 2}), expect=1)
    assert f"(pid {first.pid} on {socket.gethostname()}" in second.stderr and "stc distill" in second.stderr
    _, err = first.communicate(timeout=400)
    assert first.returncode == 0, err[-3000:]
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]
    # stderr is a pipe here, as in a batch job: plain progress lines (the first step and the end at least)
    assert re.search(r"distill: 1/4 steps \(25%\) \| loss [0-9.]+ \| .*tok/s \| elapsed \d+m\d\ds \| ETA", err), err[-3000:]
    assert "distill: 4/4 steps (100%)" in err
    assert "distill: 4/4 steps (100%)" in (out / "logs" / "rank0.log").read_text()


def test_a_rank_that_dies_takes_the_job_down_quickly(ws, tmp_path, stc_cmd_m, stc_env_m):
    """Rank 1 is SIGKILLed after step 1: the job ends (non-zero) within 60 s of the death, not after the
    process-group timeout, and says which rank failed."""
    import time

    out = tmp_path / "out"
    t0 = time.time()
    r = stc(stc_cmd_m, stc_env_m, "distill", base_args(ws, out, **{"distill.zero_stage": 2}), nproc=2,
            signal_at="1:1:KILL", expect=None)
    ended = time.time()
    assert r.returncode not in (0, 75), r.stderr[-3000:]
    died = [m["time"] for m in metrics(out) if m.get("step") == 1 and "loss" in m][0]
    assert t0 < died < ended and ended - died < 60, (ended - died)
    assert "rank" in (r.stdout + r.stderr).lower()
