"""`stc distill` on a teacher cache really built by `stc cache build`, QLoRA under ZeRO-2 on CPU, and the
export of the QLoRA student (merged fp32 and nf4).

Tiny Qwen2-Audio teacher (4 layers, fp32) and a student pruned from it with ``engine.models.surgery``
(layers 1 and 2 dropped), 8 train + 2 dev sine-WAV samples. Every DeepSpeed run here is one rank (the
2-rank runs are in ``test_train_ds.py``) and is shared between assertions through module fixtures;
everything but the last (config-only) test is marked slow.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sine_data import build_sine_shards

N_TRAIN = 8


@pytest.fixture(scope="module")
def env_m() -> dict:
    import os

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


CMD = [sys.executable, "-m", "engine.cli"]


def stc(env: dict, *argv, expect: int | None = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([*CMD, *map(str, argv)], env=env, capture_output=True, text=True, timeout=300)
    if expect is not None:
        assert r.returncode == expect, r.stdout[-3000:] + r.stderr[-6000:]
    return r


@pytest.fixture(scope="module")
def ws(tmp_path_factory, env_m) -> Path:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from engine.models.surgery import drop_layers, save_pruned
    from engine.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("kd")
    build_sine_shards(root, N_TRAIN + 2, N_TRAIN, period=5)
    build_tiny("qwen2audio", root / "teacher", num_layers=4, dtype="fp32", seed=0)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(root / "teacher")
    assert drop_layers(model, [1, 2]) == [0, 3]
    save_pruned(model, root / "student", AutoProcessor.from_pretrained(root / "teacher"))
    # the cache, built by the CLI (teacher translations included: cache.targets defaults to ref + teacher)
    stc(env_m, "cache", "build", f"data.shards={root / 'sh'}", f"cache.teacher={root / 'teacher'}",
        f"cache.out={root / 'cache'}", "cache.k=8", "cache.max_new_tokens=6", "cache.batch_size=2",
        "model.dtype=fp32", "run.threads=1", "run.device=cpu")
    return root


def args(ws: Path, out: Path, **kw) -> list[str]:
    a = {"model.path": ws / "teacher", "model.dtype": "fp32", "data.shards": ws / "sh", "data.batch_size": 2,
         "distill.student": ws / "student", "distill.mode": "lora", "distill.teacher_mode": "cache",
         "distill.cache": ws / "cache", "distill.seq_kd": "false", "distill.global_batch": 4, "distill.epochs": 1,
         "distill.out": out, "distill.lr": "1e-3", "distill.lora.r": 4, "distill.save_every": 100,
         "distill.zero_stage": 2, "cache.k": 8, "run.threads": 1}
    a.update(kw)
    return [f"{k}={v}" for k, v in a.items()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def steps(out: Path) -> list[dict]:
    return [m for m in metrics(out) if "loss" in m]


# ============================================================================================ cached KD

@pytest.fixture(scope="module")
def cached_runs(ws, tmp_path_factory, env_m) -> dict:
    d = tmp_path_factory.mktemp("runs")
    stc(env_m, "distill", *args(ws, d / "word"))
    stc(env_m, "distill", *args(ws, d / "seq", **{"distill.seq_kd": "true"}))
    return {"word": d / "word", "seq": d / "seq"}


@pytest.mark.slow
def test_distill_on_a_built_cache_has_a_finite_positive_kd_term(cached_runs):
    s = steps(cached_runs["word"])
    assert len(s) == N_TRAIN // 4
    for m in s:
        assert m["kd"] is not None and 0 < m["kd"] < float("inf") and m["ce"] > 0
        assert m["loss"] == pytest.approx(m["ce"] + m["kd"], rel=1e-9)
    assert sorted(k for m in s for k in m["keys"]) == [f"u{i:02d}" for i in range(N_TRAIN)]
    assert (cached_runs["word"] / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_seq_kd_adds_the_teacher_translations(ws, cached_runs):
    from engine.cache import build as cb
    from engine.cache import format as cf

    meta = cf.read_cache_meta(ws / "cache")
    n_teacher = sum(len(r.get("teacher_samples") or []) for r in meta["shards"])
    assert 0 < n_teacher <= N_TRAIN                          # de-duplicated: never more than one per sample
    word, seq = steps(cached_runs["word"]), steps(cached_runs["seq"])
    keys = [k for m in seq for k in m["keys"]]
    assert len(keys) == N_TRAIN + n_teacher                  # every reference once + every teacher sample once
    assert set(keys) == {f"u{i:02d}" for i in range(N_TRAIN)}
    assert sum(m["label_tokens"] for m in seq) > sum(m["label_tokens"] for m in word)
    # teacher samples carry no top-k (cache.teacher_topk=false): a step of only those has KD 0
    assert all(0 <= m["kd"] < float("inf") for m in seq) and any(m["kd"] > 0 for m in seq)


@pytest.mark.slow
def test_missing_cache_key_is_a_clear_error(ws, tmp_path, env_m):
    """A cache shard that lacks one sample's record (meta.json consistent with the file): the run stops
    with a message naming the key, not a traceback."""
    import hashlib

    from engine.cache import build as cb
    from engine.cache import format as cf

    c = tmp_path / "cache"
    shutil.copytree(ws / "cache", c)
    name = sorted(p.name for p in c.glob("train-*.tar"))[0]
    recs = cf.read_shard(c / name)          # the cache module's own shard reader/writer: layout-agnostic
    gone = recs[1][0]
    keep = [r for r in recs if r[0] != gone]
    (c / name).write_bytes(cf.shard_bytes([k for k, _ in keep], [b for _, b in keep]))
    meta = json.loads((c / "meta.json").read_text())
    for r in meta["shards"]:
        if r["name"] == name:
            r["bytes"] = (c / name).stat().st_size
            r["sha256"] = hashlib.sha256((c / name).read_bytes()).hexdigest()
    (c / "meta.json").write_text(json.dumps(meta))
    r = stc(env_m, "distill", *args(ws, tmp_path / "o", **{"distill.cache": c}), expect=None)
    assert r.returncode == 1, r.stderr[-3000:]
    assert gone in r.stderr and "missing" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_student_with_another_tokenizer_is_refused(ws, tmp_path, env_m):
    from engine.models.tiny import build_bpe_tokenizer, build_tiny

    other = build_tiny("qwen2audio", tmp_path / "s2", tokenizer=build_bpe_tokenizer(vocab_size=400), num_layers=2,
                                  dtype="fp32")
    r = stc(env_m, "distill", *args(ws, tmp_path / "o", **{"distill.student": other}), expect=None)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "teacher cache does not fit this run" in r.stderr and "vocabulary" in r.stderr
    assert "Traceback" not in r.stderr


# ============================================================================================ QLoRA + export

@pytest.fixture(scope="module")
def qlora_run(ws, tmp_path_factory, env_m) -> Path:
    out = tmp_path_factory.mktemp("q") / "qlora"
    # eval_every=1: validation (eval forward of the 4-bit layers) runs between training steps
    stc(env_m, "distill", *args(ws, out, **{"distill.mode": "qlora", "distill.lora.r": 8, "distill.lora.alpha": 16,
                                           "distill.eval_every": 1, "distill.epochs": 1.5}))
    return out


@pytest.mark.slow
def test_qlora_zero2_on_cpu_runs_with_eval_between_steps(qlora_run):
    s = steps(qlora_run)
    assert len(s) == 3 and all(0 < m["loss"] < float("inf") and 0 < m["kd"] < float("inf") for m in s)
    evals = [m for m in metrics(qlora_run) if m.get("event") == "eval"]
    assert len(evals) == 3 and all(0 < e["dev_ce"] < float("inf") for e in evals)
    start = [m for m in metrics(qlora_run) if m.get("event") == "start"][0]
    assert start["zero_stage"] == 2
    cfg = json.loads((qlora_run / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["use_rslora"] is True
    meta = json.loads((qlora_run / "final" / "meta.json").read_text())
    assert meta["trained"]["base_quant"] == "nf4" and meta["trained"]["adapter"] is True


RELOAD = r'''
import sys, torch
from transformers import Qwen2AudioForConditionalGeneration as M, AutoProcessor as P
d = sys.argv[1]
m = M.from_pretrained(d)
p = P.from_pretrained(d)
ids = p.tokenizer("Hallo", return_tensors="pt").input_ids
g = m.generate(ids, max_new_tokens=3, do_sample=False)
assert g.shape[1] >= ids.shape[1]
assert not any("lora" in k for k in m.state_dict())
n4 = sum(type(x).__name__ == "Linear4bit" for x in m.modules())
print("ok", n4)
'''


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_export_of_a_qlora_student_reloads_in_plain_transformers(ws, qlora_run, tmp_path, env_m, quant):
    out = tmp_path / f"export-{quant}"
    stc(env_m, "export", f"export.source={qlora_run / 'final'}", f"export.out={out}", f"export.quant={quant}",
        "model.dtype=fp32")
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out)], env=env_m, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    n4 = int(r.stdout.split()[-1])
    assert (n4 > 0) == (quant == "nf4")
    ex = json.loads((out / "meta.json").read_text())["exported"]
    from engine.models.counts import storage_bytes

    assert ex["merged_lora"] is True and ex["quant"] == quant
    assert ex["storage_bytes"] == storage_bytes(out) > 0
    # student: params total as in the pruned model (LoRA merged away), stored ~half of the 4-bit ones for nf4
    from transformers import Qwen2AudioForConditionalGeneration

    n_student = sum(p.numel() for p in Qwen2AudioForConditionalGeneration.from_pretrained(ws / "student").parameters())
    assert ex["params_total"] == n_student
    if quant == "none":
        assert ex["params_stored"] == n_student and ex["storage_bytes"] >= 4 * n_student
    else:
        assert ex["params_stored"] < n_student and ex["storage_bytes"] < 4 * n_student
        q = json.loads((out / "config.json").read_text())["quantization_config"]
        assert q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"] is True


def test_offload_config_accepts_the_engines_torch_optimizer():
    """ZeRO-3 + offload with the engine's torch AdamW: DeepSpeed refuses a client optimizer under offload
    unless zero_force_ds_cpu_optimizer is false (found by bench/train.py; the run itself is benched)."""
    from engine import zero as tds

    ds = tds.fill_config(tds.load_template(3, True), stage=3, micro_batch=1, accum=1, world_size=2, dtype="fp32",
                         grad_clip=1.0, offload=True, on_cpu=True)
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in tds.fill_config(
        tds.load_template(2, False), stage=2, micro_batch=1, accum=1, world_size=2, dtype="fp32", grad_clip=1.0,
        offload=False)
