"""A config-only Qwen2-Audio-7B-Instruct directory (config.json from the public shapes, no weights) for
plan validation tests: the engine builds it on the meta device, so the 7B arithmetic is real."""
from __future__ import annotations

from pathlib import Path


def write_config_only_7b(d: Path, text_layers: int = 32) -> Path:
    from transformers import Qwen2AudioConfig

    c = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=1280, encoder_layers=32,
                          encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
                          max_source_positions=1500),
        text_config=dict(model_type="qwen2", hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=text_layers, num_attention_heads=32, num_key_value_heads=32,
                         vocab_size=156032, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False),
        audio_token_index=151646)
    c.architectures = ["Qwen2AudioForConditionalGeneration"]
    d.mkdir(parents=True, exist_ok=True)
    c.save_pretrained(d)
    return d
