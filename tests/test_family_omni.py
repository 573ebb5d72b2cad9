"""The Qwen2.5-Omni thinker through the engine: its processor against transformers' own audio path, the
importance scorers against surgery references, pruning with a reload in plain transformers, and the whole
plan (importance, prune, teacher cache, QLoRA + KD, nf4 export, evaluate, report) on a tiny random thinker
built from the family's own config class."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import DataConfig
from engine.importance import scorers as S
from engine.models import families, surgery

from test_importance import (build_env, dev_of, load, reference_batches, reference_model, reference_nll,
                             reference_translations)

KIND = "qwen2_5_omni"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("omni"), kind=KIND, layers=4, n_dev=4, n_test=3, audio_seconds=3)


@pytest.fixture(scope="module")
def loaded(env):
    model, proc = load(env)
    return model, proc, dev_of(env, model, proc)


def test_family_detection_and_layers(env, loaded):
    model, _, _ = loaded
    doc = json.loads((env["model"] / "config.json").read_text())
    assert families.detect(doc).kind == KIND and type(model).__name__ == families.get(KIND).model_class
    assert len(surgery.decoder_layers(model)) == 4 and len(surgery.audio_layers(model)) == 2
    # the hub's full Omni config wraps the thinker's: detected by model_type, the thinker's part read
    wrapped = {"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniForConditionalGeneration"],
               "thinker_config": doc}
    assert families.detect(wrapped).kind == KIND
    assert families.text_config_dict(wrapped)["num_hidden_layers"] == 4
    assert families.get(KIND).audio_layer_count_of(wrapped) == 2


def test_processor_equals_transformers_audio_path(env, loaded):
    """Features, feature mask and the placeholder expansion equal Qwen2_5OmniProcessor's own audio code
    (its constructor needs torchvision for the video processor, so the audio method is called directly)."""
    from transformers import Qwen2_5OmniProcessor

    from engine.importance import devset as D

    _, proc, _ = loaded
    samples, _ = D.read_dev(env["shards"], DataConfig(), 0, True)
    waves = [s.audio for s in samples]
    real = Qwen2_5OmniProcessor.__new__(Qwen2_5OmniProcessor)
    real.feature_extractor, real.tokenizer, real.audio_token = proc.feature_extractor, proc.tokenizer, proc.audio_token
    feats, repl = real._process_audio(waves, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    text = "<|audio_bos|><|AUDIO|><|audio_eos|>x"
    ours = proc([text] * len(waves), audio=waves, sampling_rate=16000)
    assert torch.equal(ours["input_features"], feats["input_features"])
    assert torch.equal(ours["feature_attention_mask"], feats["feature_attention_mask"])
    for i, r in enumerate(repl):
        want = proc.tokenizer("<|audio_bos|>" + r + "<|audio_eos|>x", add_special_tokens=False)["input_ids"]
        got = ours["input_ids"][i][ours["attention_mask"][i].bool()].tolist()
        assert got == want


def test_nll_and_task_match_surgery_reference(env, loaded, tmp_path):
    """The scans run the decoder from cached inputs (3-D rope positions rebuilt from the attention mask);
    a pruned, saved and reloaded thinker run by plain transformers gives the same numbers and words."""
    model, proc, dev = loaded
    got = S.nll_scores(model, dev, [None, 1, 3])
    for c, drop in [(None, []), (1, [1]), (3, [3])]:
        ref = reference_nll(reference_model(env, drop, tmp_path), env, proc)
        assert got[c].score == pytest.approx(ref, rel=1e-5), c
    tok = proc.tokenizer
    gen = S.generation_config(model, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id, 8)
    task = dict(S.task_scores(model, tok, dev, [None, 2], metric="chrf++", gen_cfg=gen))
    for c, drop in [(None, []), (2, [2])]:
        ref = reference_translations(reference_model(env, drop, tmp_path), env, proc, gen)
        assert dict(zip(dev.keys, task[c].hypotheses)) == ref, c


# ============================================================================== the whole plan

def _stc(*argv, timeout=1800):
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plan_run(tmp_path_factory):
    """`stc pipeline` on a tiny thinker, two ranks per step: importance (task), prune to half the decoder,
    the teacher cache, QLoRA + KD healing, nf4 export, evaluation of teacher, pruned and healed student,
    the report (the ablations are the plan's own tests' business)."""
    from engine import config as cfg
    from engine.data import shards
    from engine.models.tiny import build_tiny
    from sine_data import write_sine_manifest

    root = tmp_path_factory.mktemp("omni_plan")
    build_tiny(KIND, root / "model", num_layers=4, dtype="fp32", seed=0, audio_seconds=3)
    m = write_sine_manifest(root, 14, 8, period=5)
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["split"] = "train" if i < 8 else "dev" if i < 11 else "test"
        r["src_text"] = f"hello number {i}"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards.build(cfg.load(None, [f"shards.manifest={m}", f"shards.out={root / 'sh'}", "shards.samples_per_shard=4"]),
                 workers=1)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: {root / 'model'}, dtype: fp32}}\n"
        f"data: {{shards: {root / 'sh'}, batch_size: 2}}\n"
        f"run: {{out_dir: {root / 'run'}, threads: 1, device: cpu}}\n"
        "importance: {max_new_tokens: 4, decode_batch_size: 4}\n"
        "cache: {k: 8, max_new_tokens: 6, batch_size: 2}\n"
        "distill: {mode: qlora, epochs: 1, global_batch: 4, lr: 1.0e-3, lora: {r: 4}, save_every: 100}\n"
        "evaluate: {max_new_tokens: 6, batch_size: 4}\n"
        "pipeline: {students: [0.5], ablations: false, shuffle_check: false}\n")
    dry = _stc("pipeline", "--config", recipe, "--dry-run", "--nproc", "2", timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    r = _stc("pipeline", "--config", recipe, "--nproc", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    return root


@pytest.mark.slow
def test_whole_plan_on_the_thinker(plan_run):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from engine.models.load import load_processor

    run = plan_run / "run"
    assert (run / "cache/meta.json").exists()
    ranking = json.loads((run / "importance/ranking.json").read_text())
    pruned = json.loads((run / "students/r50/pruned/meta.json").read_text())["pruned"]
    assert pruned["removed"] == ranking["removed"][:2]
    # the pruned student reloads in plain transformers and equals surgery on the teacher in memory
    teacher = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(plan_run / "model", dtype=torch.float32).eval()
    surgery.drop_layers(teacher, pruned["removed"])
    student = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(run / "students/r50/pruned",
                                                                         dtype=torch.float32).eval()
    assert len(surgery.decoder_layers(student)) == 2
    proc = load_processor(run / "students/r50/pruned")
    wave = torch.sin(torch.arange(8000) / 7.0).numpy().astype("float32") * 0.3
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio_url": "a"},
                                                                  {"type": "text", "text": "Translate."}]}],
                                    tokenize=False, add_generation_prompt=True)
    inp = proc([text], audio=[wave], sampling_rate=16000)
    with torch.no_grad():
        assert torch.equal(teacher(**inp).logits, student(**inp).logits)
        assert torch.equal(teacher.generate(**inp, max_new_tokens=5, do_sample=False),
                           student.generate(**inp, max_new_tokens=5, do_sample=False))
    # the healed nf4 export loads with plain transformers (+ bitsandbytes) and generates
    exp = run / "students/r50/kd/export"
    assert json.loads((exp / "meta.json").read_text())["exported"]["quant"] == "nf4"
    healed = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(exp).eval()
    from engine.models.load import bnb_cpu_workaround

    bnb_cpu_workaround(healed)
    with torch.no_grad():
        assert healed.generate(**inp, max_new_tokens=3, do_sample=False).shape[1] > inp["input_ids"].shape[1]
    rep = json.loads((run / "report/report.json").read_text())
    rows = {row["system"]: row for row in rep["systems"]}
    assert sorted(rows) == ["kd-50", "teacher"]
    assert rows["kd-50"]["decoder_layers"] == 2 and rows["teacher"]["decoder_layers"] == 4
    for name in ("teacher", "kd-50"):
        assert json.loads((run / "eval" / name / "scores.json").read_text())["n"] == 3


def test_dry_run_of_the_omni_7b_recipe_on_8_gpus(tmp_path, stc_inproc):
    """configs/qwen25-omni-7b-en-de.yaml validates on a config-only Qwen2.5-Omni-7B directory (the hub's full
    layout, public shapes): the thinker's 28 decoder layers, 8.93B parameters with its audio and vision towers."""
    import re

    from qwen2audio_7b import write_config_only_omni_7b
    from sine_data import build_split_shards

    model = write_config_only_omni_7b(tmp_path / "model")
    shards = build_split_shards(tmp_path)
    root = Path(__file__).resolve().parents[1]
    r = stc_inproc("pipeline", "--config", root / "configs" / "qwen25-omni-7b-en-de.yaml", "--dry-run", "--nproc", "8",
                   f"model.path={model}", f"data.shards={shards}", f"run.out_dir={tmp_path / 'runs'}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "the plan validates: every step would start" in r.stdout
    out = re.sub(r"\s+", " ", r.stdout)
    assert "est: 8.93B params, 8.93B trainable" in out
    assert "prune.count=7" in out and "prune.count=14" in out            # 28 -> 21 and 28 -> 14
    assert not (tmp_path / "runs").exists()


def test_audio_encoder_scan_matches_surgery(env, loaded):
    """importance.component=audio on the thinker: an audio candidate's nll equals the thinker with that
    encoder layer dropped by surgery; block influence runs over the packed frames its encoder layers see."""
    import copy

    from engine.importance import devset as D

    model, proc, _ = loaded
    samples, _ = D.read_dev(env["shards"], DataConfig(), 0, True)
    dev = D.prepare(model, proc, samples, DataConfig(), batch_size=3, teacher_forced=True, prompt_only=False,
                    keep_features=True)
    got = dict(S.iter_audio_scores(model, None, dev, [None, 0, 1], scorer="nll", metric="nll"))
    for c in got:
        m = copy.deepcopy(model)
        if c is not None:
            surgery.drop_layers(m, [], audio_remove=[c])
            assert m.config.audio_config.encoder_layers == 1
        assert got[c].score == pytest.approx(reference_nll(m.eval(), env, proc), rel=1e-6), c
    assert len({round(s.score, 7) for s in got.values()}) == 3
    bi = S.audio_block_influence(model, dev)
    frames = 0
    for b in dev.batches:
        after_conv, _ = model.model.audio_tower._get_feat_extract_output_lengths(
            b.features["feature_attention_mask"].sum(-1))
        frames += int(after_conv.sum())
    assert sorted(bi.layer) == [0, 1] and all(v > 0 for v in bi.layer.values())
    assert bi.n_tokens == frames                                         # every valid frame, no padding


def test_lora_on_the_thinker_trains_adapters_outside_the_vision_tower(env, loaded):
    """all-linear LoRA wraps the decoder and the audio tower but never the vision tower (speech never runs it);
    one backward of the label loss reaches every adapter on the audio path."""
    import copy

    from engine.config import LoraConfig
    from engine.data.prompt import IGNORE
    from engine.models.load import apply_lora, lora_targets

    model, proc, dev = loaded
    m = copy.deepcopy(model)
    names = lora_targets(m, LoraConfig(r=4))
    assert names and not any(".visual." in f".{n}." for n in names)
    assert any("audio_tower" in n for n in names) and any("language_model" in n for n in names)
    assert not any("audio_tower" in n for n in lora_targets(m, LoraConfig(r=4, include_audio_tower=False)))
    peft = apply_lora(m, LoraConfig(r=4))
    peft.train()
    _, fb = next(reference_batches(env, proc))
    logits = peft(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"], input_features=fb["input_features"],
                  feature_attention_mask=fb["feature_attention_mask"]).logits
    y = fb["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][y != IGNORE].float(), y[y != IGNORE])
    loss.backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    assert grads and all(".visual." not in n for n in grads)
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)
