"""Layer surgery: pruned models reload with plain transformers and equal the in-memory pruned model."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.models import surgery
from engine.models.tiny import make_tiny


def _audio_inputs(processor, seconds=1.0):
    t = np.arange(int(16000 * seconds)) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    msgs = [{"role": "system", "content": "You are a professional translator."},
            {"role": "user", "content": [{"type": "audio", "audio_url": "x.wav"},
                                         {"type": "text", "text": "Translate the English speech into German:"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], audio=[wav], sampling_rate=16000, return_tensors="pt")


RELOAD = r"""
import json, sys, torch
from transformers import AutoConfig, Qwen2AudioForConditionalGeneration, AutoModelForCausalLM
d, kind, inp = sys.argv[1], sys.argv[2], sys.argv[3]
cls = Qwen2AudioForConditionalGeneration if kind == "audio" else AutoModelForCausalLM
m = cls.from_pretrained(d, dtype=torch.float32).eval()
batch = torch.load(inp, weights_only=True)
with torch.no_grad():
    logits = m(**batch).logits
    gen = m.generate(**batch, max_new_tokens=8, do_sample=False, min_new_tokens=8)
torch.save({"logits": logits, "gen": gen}, inp + ".out")
cfg = AutoConfig.from_pretrained(d)
print(json.dumps(cfg.to_dict()))
"""


def _reload_in_plain_transformers(tmp_path, out_dir, kind, batch, env):
    inp = tmp_path / "batch.pt"
    torch.save(dict(batch), inp)
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # no engine code on the path
    out = subprocess.run([sys.executable, str(script), str(out_dir), kind, str(inp)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(str(inp) + ".out", weights_only=True), json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_pruned_audio_model_reloads_with_plain_transformers(tmp_path, stc_env):
    model, proc = make_tiny("qwen2audio", num_layers=6, dtype="fp32", seed=1)
    kept = surgery.drop_layers(model, [1, 4])
    assert kept == [0, 2, 3, 5]
    layers = surgery.decoder_layers(model)
    assert len(layers) == 4 and [l.self_attn.layer_idx for l in layers] == [0, 1, 2, 3]
    batch = _audio_inputs(proc)
    with torch.no_grad():
        logits = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    out_dir = surgery.save_pruned(model, tmp_path / "pruned", proc)
    got, cfg = _reload_in_plain_transformers(tmp_path, out_dir, "audio", batch, stc_env)
    assert cfg["text_config"]["num_hidden_layers"] == 4
    assert len(cfg["text_config"]["layer_types"]) == 4
    assert cfg["text_config"][surgery.ORIGINAL_KEY] == [0, 2, 3, 5]
    torch.testing.assert_close(got["logits"], logits)
    assert torch.equal(got["gen"], gen)  # greedy with KV cache: same tokens


@pytest.mark.slow
def test_pruned_causal_lm_reloads_and_generates(tmp_path, stc_env):
    model, tok = make_tiny("causal_lm", num_layers=5, dtype="fp32", seed=2)
    surgery.drop_layers(model, [-1, 2])
    batch = tok(["Translate: hello world"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    out_dir = surgery.save_pruned(model, tmp_path / "pruned", tok)
    got, cfg = _reload_in_plain_transformers(tmp_path, out_dir, "lm", batch, stc_env)
    assert cfg["num_hidden_layers"] == 3 and cfg[surgery.ORIGINAL_KEY] == [0, 1, 3]
    torch.testing.assert_close(got["logits"], logits)
    assert torch.equal(got["gen"], gen)


def test_repeated_prunes_compose_original_indices():
    model, _ = make_tiny("causal_lm", num_layers=6, dtype="fp32")
    assert surgery.drop_layers(model, [1]) == [0, 2, 3, 4, 5]
    # current indices now map to originals [0, 2, 3, 4, 5]: current 0 and 2 are originals 0 and 3
    assert surgery.drop_layers(model, [0, 2]) == [2, 4, 5]
    assert model.config.num_hidden_layers == 3


def test_layer_types_and_window_rule_trimmed():
    model, _ = make_tiny("causal_lm", num_layers=6, dtype="fp32")
    model.config.layer_types = ["full_attention"] * 3 + ["sliding_attention"] * 3
    model.config.max_window_layers = 3
    surgery.drop_layers(model, [1, 4])
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert model.config.max_window_layers == 2


def test_audio_layers_optional():
    model, _ = make_tiny("qwen2audio", num_layers=4, audio_layers=3, dtype="fp32")
    surgery.drop_layers(model, [1], audio_remove=[0])
    assert len(surgery.audio_layers(model)) == 2
    assert model.config.audio_config.encoder_layers == 2
    assert getattr(model.config.audio_config, surgery.ORIGINAL_AUDIO_KEY) == [1, 2]


@pytest.mark.parametrize("remove,match", [([7], "does not exist"), ([1, 1], "twice"), ([0, 1, 2, 3], "no model")])
def test_bad_indices(remove, match):
    model, _ = make_tiny("causal_lm", num_layers=4, dtype="fp32")
    with pytest.raises(surgery.SurgeryError, match=match):
        surgery.drop_layers(model, remove)


def test_refuses_lora_and_4bit():
    from engine.config import LoraConfig
    from engine.models.load import apply_lora

    model, _ = make_tiny("causal_lm", num_layers=3, dtype="fp32")
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8))
    with pytest.raises(surgery.SurgeryError, match="LoRA"):
        surgery.drop_layers(peft_model, [1])
    model2, _ = make_tiny("causal_lm", num_layers=3, dtype="fp32")
    model2.config.quantization_config = {"load_in_4bit": True}
    with pytest.raises(surgery.SurgeryError, match="quantised"):
        surgery.drop_layers(model2, [1])
