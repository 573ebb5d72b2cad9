"""The engine paths that lean on its dependencies, small enough to run under the oldest admitted set.

``make test-floor`` runs this module (marker ``floor``) in ``.venv-floor`` with ``constraints-floor.txt``;
``make test`` runs it under ``constraints.txt``. Together they are what the dependency ranges in
``pyproject.toml`` rest on. Each test touches a different group of libraries:

* bf16 load + forward + generate: transformers (``from_pretrained(dtype=...)``, Qwen2-Audio, processor),
  safetensors;
* nf4 + LoRA train -> eval -> train: bitsandbytes, peft, accelerate (``device_map``);
* surgery round trip: transformers config internals (``layer_types``, ``max_window_layers``,
  ``layer_idx``) through save and reload;
* shards + stream with features: soundfile, soxr (a 22.05 kHz source), webdataset, the feature extractor;
* one distill step (``stc distill``, QLoRA, online teacher, ZeRO-2, one rank): DeepSpeed and the trainer;
* a task-scorer importance scan: greedy decoding from prompt embeddings, hooks on the decoder layers;
* evaluate + report: sacrebleu, matplotlib, rich, PyYAML.

Tiny random-init models, sine-wave audio, CPU only.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import config as cfg
from engine.config import LoraConfig, ModelConfig
from engine.models import load, surgery, tiny
from test_models import _lora_step  # the same train step as the newest-set test

pytestmark = pytest.mark.floor

SR = 16000
ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int, n_train: int, n_dev: int, sr: int, root: Path) -> Path:
    import soundfile as sf

    rows = []
    for i in range(n):
        t = np.arange(int((0.2 + 0.05 * (i % 4)) * sr)) / sr
        sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 20 * i) * t)).astype("float32"), sr)
        rows.append({"id": f"u{i:02d}", "audio": f"a{i}.wav", "src_text": f"hello number {i}",
                     "tgt_text": "Hallo Welt " * (1 + i % 3), "src_lang": "en", "tgt_lang": "de",
                     "split": "train" if i < n_train else "dev" if i < n_train + n_dev else "test"})
    m = root / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return m


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """A 3-layer fp32 tiny Qwen2-Audio and shards from 22.05 kHz WAVs (4 train, 2 dev, 3 test samples)."""
    from engine.data import shards

    root = tmp_path_factory.mktemp("floor")
    model = tiny.build_tiny("qwen2audio", root / "model", num_layers=3, dtype="fp32", seed=7)
    manifest = _rows(9, 4, 2, 22050, root)
    shards.build(cfg.load(None, [f"shards.manifest={manifest}", f"shards.out={root / 'sh'}",
                                 "shards.samples_per_shard=3"]), workers=1)
    return {"root": root, "model": model, "shards": root / "sh"}


def _batch(processor, answer: str | None = None) -> dict:
    msgs = [{"role": "system", "content": "You are a professional translator."},
            {"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"},
                                         {"type": "text", "text": "Translate the English speech into German:"}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)
    wav = (0.3 * np.sin(2 * np.pi * 330 * np.arange(SR) / SR)).astype(np.float32)
    return dict(processor(text=text, audio=wav, sampling_rate=SR, return_tensors="pt"))


def test_bf16_load_forward_and_generate(ws):
    model = load.load_model(ModelConfig(path=str(ws["model"]), dtype="bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    batch = _batch(load.load_processor(ws["model"]))
    with torch.no_grad():
        logits = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits.float()).all()
    assert gen.shape == (1, batch["input_ids"].shape[1] + 4)


def test_nf4_lora_train_eval_train(ws):
    import bitsandbytes as bnb

    model = load.load_model(ModelConfig(path=str(ws["model"]), quant="nf4"), for_training=True)
    layers4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers4 and all(m.weight.quant_type == "nf4" for m in layers4)
    pm = load.apply_lora(model, LoraConfig(r=4, alpha=8))
    assert load.is_peft(pm) and load.is_quantized(pm)
    batch = _batch(load.load_processor(ws["model"]), answer="Hallo Welt.")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    loss1, graded = _lora_step(pm, opt, batch)
    assert math.isfinite(loss1) and graded and all(".lora_A." in n or ".lora_B." in n for n in graded)
    assert any("audio_tower" in n for n in graded)
    pm.eval()
    with torch.no_grad():
        assert torch.isfinite(pm(**batch).logits.float()).all()
    loss2, graded2 = _lora_step(pm, opt, batch)
    assert math.isfinite(loss2) and set(graded2) == set(graded)


def test_surgery_round_trip(ws, tmp_path):
    model = load.load_model(ModelConfig(path=str(ws["model"]), dtype="fp32"))
    tcfg = surgery.text_config(model.config)
    tcfg.max_window_layers = 2
    assert surgery.drop_layers(model, [1]) == [0, 2]
    assert [layer.self_attn.layer_idx for layer in surgery.decoder_layers(model)] == [0, 1]
    assert tcfg.max_window_layers == 1
    processor = load.load_processor(ws["model"])
    batch = _batch(processor)
    with torch.no_grad():
        logits = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    out = surgery.save_pruned(model, tmp_path / "pruned", processor)
    saved = json.loads((out / "config.json").read_text())["text_config"]
    assert saved["num_hidden_layers"] == 2 and saved[surgery.ORIGINAL_KEY] == [0, 2]
    assert len(saved["layer_types"]) == 2 and saved["max_window_layers"] == 1
    again = load.load_model(ModelConfig(path=str(out), dtype="fp32"))
    assert len(surgery.decoder_layers(again)) == 2
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits)
        assert torch.equal(again.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False), gen)


def test_stream_with_features(ws):
    from engine.data import stream as st
    from engine.data.prompt import IGNORE, Featurizer

    meta = json.loads((ws["shards"] / "meta.json").read_text())
    assert meta["kind"] == "shards"
    recipe = cfg.load(None, [f"model.path={ws['model']}", f"data.shards={ws['shards']}", "data.batch_size=2"])
    s = st.Stream(ws["shards"], "train", recipe.data, Featurizer(load.load_processor(ws["model"])),
                  rank=0, world_size=1, num_workers=1)
    batches = list(s)
    assert sorted(k for b in batches for k in b["keys"]) == [f"u{i:02d}" for i in range(4)]
    for b in batches:
        assert b["input_features"].shape[:2] == (len(b["keys"]), 128)
        assert ((b["labels"] != IGNORE).sum(1) > 0).all()


def test_one_distill_step(ws, tmp_path):
    """QLoRA student under DeepSpeed ZeRO-2 with KD from the teacher run alongside: one optimizer step."""
    student = tmp_path / "student"
    m, proc = tiny.make_tiny("qwen2audio", num_layers=3, dtype="fp32", seed=7)
    surgery.drop_layers(m, [1])
    surgery.save_pruned(m, student, proc)
    out = tmp_path / "distill"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    argv = [f"model.path={ws['model']}", "model.dtype=fp32", f"data.shards={ws['shards']}", "data.batch_size=2",
            f"distill.student={student}", "distill.mode=qlora", "distill.teacher_mode=online",
            "distill.seq_kd=false", "distill.global_batch=4", "distill.epochs=1", f"distill.out={out}",
            "distill.lr=1e-3", "distill.lora.r=4", "distill.zero_stage=2", "run.threads=1"]
    r = subprocess.run([sys.executable, "-m", "engine.cli", "distill", *argv], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    steps = [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert len(steps) == 1
    assert math.isfinite(steps[0]["loss"]) and steps[0]["kd"] > 0 and steps[0]["ce"] > 0
    assert (out / "final").is_dir()


def test_importance_task_scan(ws, tmp_path):
    """Greedy translations of the dev split with a decoder layer left out (hooks on the layer list)."""
    from engine.importance import stage

    out = tmp_path / "imp"
    doc = stage.run_importance(cfg.load(None, [
        f"model.path={ws['model']}", "model.dtype=fp32", f"data.shards={ws['shards']}", f"importance.out={out}",
        f"run.out_dir={tmp_path / 'run'}", "importance.scorer=task", "importance.remove=1",
        "importance.max_new_tokens=6", "importance.decode_batch_size=2"]))
    assert doc["removed"] == [1] and doc["n_samples"] == 2     # layers 0 and 2 are protected
    assert json.loads((out / "ranking.json").read_text())["removed"] == [1]
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_and_report(ws, tmp_path):
    import sacrebleu

    from engine import evaluate as E
    from engine import report

    out = tmp_path / "eval"
    recipe = cfg.load(None, [f"model.path={ws['model']}", "model.dtype=fp32", f"data.shards={ws['shards']}",
                             f"evaluate.out={out}", "evaluate.batch_size=2", "evaluate.max_new_tokens=6",
                             "evaluate.models=teacher=" + str(ws["model"]), f"run.out_dir={tmp_path / 'run'}",
                             f"report.out={tmp_path / 'report'}"])
    res = E.run_evaluate(recipe)
    rows = [json.loads(x) for x in (out / "teacher" / E.HYPOTHESES).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3
    hyps, refs = [r["hyp"] for r in rows], [r["ref"] for r in rows]
    direction = res["teacher"]["directions"]["en-de"]
    assert direction["n"] == 3
    assert direction["chrfpp"]["score"] == sacrebleu.CHRF(word_order=2).corpus_score(hyps, [refs]).score
    assert direction["bleu"]["score"] == sacrebleu.BLEU(tokenize="13a").corpus_score(hyps, [refs]).score
    doc = report.run(recipe)
    assert (tmp_path / "report" / "report.md").is_file()
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in (tmp_path / "report").iterdir())
    assert doc["systems"]
