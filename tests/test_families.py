"""The model-family registry: detection from config.json, refusal of unknown families naming the supported
ones, model.kind validation, and the layer lists every stage finds through it."""
from __future__ import annotations

import json

import pytest

from engine import config as cfg
from engine.models import families
from engine.models.load import ModelLoadError, detect_family, detect_kind


def _write(tmp_path, doc):
    (tmp_path / "config.json").write_text(json.dumps(doc))
    return tmp_path


@pytest.mark.parametrize("doc,kind", [
    ({"model_type": "qwen2_audio", "architectures": ["Qwen2AudioForConditionalGeneration"]}, "qwen2audio"),
    ({"model_type": "qwen2_audio"}, "qwen2audio"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "causal_lm"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "causal_lm"),
    ({"model_type": "mistral"}, "causal_lm"),                  # no architectures: the causal-LM auto mapping
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "causal_lm"),
    ({"model_type": "qwen2_5_omni_thinker", "architectures": ["Qwen2_5OmniThinkerForConditionalGeneration"]},
     "qwen2_5_omni"),
    ({"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniForConditionalGeneration"]}, "qwen2_5_omni"),
    # its architecture ends in ForCausalLM: claimed before the catch-all text LM, which would lose the audio
    ({"model_type": "phi4_multimodal", "architectures": ["Phi4MultimodalForCausalLM"]}, "phi4_multimodal"),
    ({"model_type": "voxtral", "architectures": ["VoxtralForConditionalGeneration"]}, "voxtral"),
    ({"model_type": "granite_speech", "architectures": ["GraniteSpeechForConditionalGeneration"]}, "granite_speech"),
])
def test_detect_recognises_each_registered_family(tmp_path, doc, kind):
    assert detect_kind(_write(tmp_path, doc)) == kind
    assert families.detect(doc).kind == kind


def test_an_unsupported_family_is_refused_naming_the_supported_ones(tmp_path):
    doc = {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"]}
    with pytest.raises(ModelLoadError) as e:
        detect_family(_write(tmp_path, doc))
    msg = str(e.value)
    assert "whisper" in msg and str(tmp_path) in msg
    for fam in families.registry().values():
        assert fam.title in msg and fam.model_class in msg


@pytest.mark.parametrize("doc", [
    {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"]},
    {"model_type": "qwen3_omni_moe"},
])
def test_known_but_unsupported_families_are_refused_with_the_reason(doc):
    with pytest.raises(families.UnsupportedModel) as e:
        families.detect(doc)
    assert families.REFUSED[doc["model_type"]] in str(e.value) and "Qwen2-Audio" in str(e.value)


def test_model_kind_is_checked_against_the_registry():
    assert cfg.resolve({}, ["model.kind=qwen2audio"]).model.kind == "qwen2audio"
    with pytest.raises(cfg.ConfigError) as e:
        cfg.resolve({}, ["model.kind=gemma3n"])
    assert "model.kind" in str(e.value) and "qwen2audio" in str(e.value) and "causal_lm" in str(e.value)


def test_registry_is_consistent():
    reg = families.registry()
    assert list(reg) == list(families.kinds()) and reg["causal_lm"] is list(reg.values())[-1]   # catch-all last
    for fam in reg.values():
        assert fam.model_cls() is not None                          # the class exists in this transformers
        if fam.audio:
            assert fam.audio_layer_paths and fam.audio_config and fam.audio_layer_count and fam.audio_inputs
            # a projector inside the encoder (the Omni thinker's audio_tower.proj) counts with the encoder
            assert fam.encoder_modules
    assert families.get("qwen2audio").audio_layer_count_of(
        {"audio_config": {"encoder_layers": 32}}) == 32
    assert families.get("causal_lm").audio_layer_count_of({"num_hidden_layers": 4}) is None
    with pytest.raises(families.UnsupportedModel, match="one of auto, qwen2audio"):
        families.get("nope")


def test_loaded_models_resolve_their_family_and_layers(tmp_path):
    """The tiny models of both families: family by class (also through a peft wrapper), decoder layers
    through get_decoder(), audio layers and the config field that counts them."""
    from peft import LoraConfig, get_peft_model

    from engine.models import surgery
    from engine.models.storage import component_of
    from engine.models.tiny import make_tiny

    audio, _ = make_tiny("qwen2audio", num_layers=3, audio_layers=2)
    text, _ = make_tiny("causal_lm", num_layers=3)
    assert families.of_model(audio).kind == "qwen2audio" and families.of_model(text).kind == "causal_lm"
    assert surgery.decoder_layers(audio) is audio.get_decoder().layers and len(surgery.decoder_layers(audio)) == 3
    assert surgery.decoder_layers(text) is text.get_decoder().layers
    assert len(surgery.audio_layers(audio)) == 2 and surgery.audio_layers(text) is None
    acfg, key = surgery.audio_config(audio)
    assert getattr(acfg, key) == 2
    with pytest.raises(surgery.SurgeryError, match="no audio encoder"):
        surgery.audio_config(text)
    wrapped = get_peft_model(audio, LoraConfig(r=2, target_modules=["q_proj"]))
    assert families.of_model(wrapped).kind == "qwen2audio"
    names = {component_of(n) for n, _ in audio.named_parameters()}
    assert {"encoder", "projector", "decoder", "embeddings"} <= names


@pytest.mark.parametrize("cls,extra", [
    ("Gemma2", {"final_logit_softcapping": 3.0, "head_dim": 8, "query_pre_attn_scalar": 8}),
    ("Granite", {"logits_scaling": 4.0, "embedding_multiplier": 3.0, "residual_multiplier": 0.5}),
    ("Cohere", {"logit_scale": 0.25}),
    ("Qwen2", {}),
])
def test_logits_from_hidden_states_equal_the_forward(cls, extra):
    """Causal LMs whose forward transforms lm_head's output (soft-capping, scaling): the logits the engine computes
    from hidden states (nll scorer, teacher cache) equal the model's own, and the nll scorer equals the forward's
    label loss; Qwen2 has nothing to apply."""
    import torch
    import transformers

    from engine.importance import scorers as S
    from engine.importance.devset import DevBatch, DevSet

    cfg = getattr(transformers, f"{cls}Config")(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = families.head_fn(model)(model.model(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fam = families.of_model(model)
    assert (fam.logits_post(model) is None) == (cls == "Qwen2")
    # the nll scorer (prefix reuse over cached embeddings, lm_head on label rows) against the forward's loss
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * int((labels[:, 1:] != -100).sum())
        embeds = model.get_input_embeddings()(ids)
    batch = DevBatch(keys=["a", "b"], refs=["", ""], tgt_langs=["de", "de"], embeds=embeds, attention_mask=mask,
                     labels=labels)
    dev = DevSet(batches=[batch], keys=["a", "b"], tgt_langs=["de", "de"])
    got_nll = S.nll_scores(model, dev, [None])[None].score
    assert got_nll == pytest.approx(ref / batch.n_label_tokens, rel=1e-5)
