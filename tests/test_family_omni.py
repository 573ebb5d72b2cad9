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

from test_importance import build_env, dev_of, load, reference_model, reference_nll, reference_translations

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
