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


def write_config_only_omni_7b(d: Path) -> Path:
    """The hub's full Qwen2.5-Omni-7B config layout (thinker, talker, token2wav; model_type qwen2_5_omni)
    with the thinker's public shapes: 28 decoder layers, a 32-layer Whisper-large-shaped audio encoder, a
    32-block vision tower."""
    from transformers import Qwen2_5OmniConfig

    thinker = dict(
        model_type="qwen2_5_omni_thinker",
        text_config=dict(model_type="qwen2_5_omni_text", vocab_size=152064, hidden_size=3584,
                         intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=False),
        audio_config=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=3584),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=False)
    c = Qwen2_5OmniConfig(thinker_config=thinker)
    c.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    d.mkdir(parents=True, exist_ok=True)
    c.save_pretrained(d)
    return d


def write_config_only_phi4_multimodal(d: Path) -> Path:
    """A config-only Phi-4-multimodal-instruct directory (transformers-native layout) with its public shapes:
    a Phi-4-mini decoder (32 layers, 3072 wide, 200,064-token vocabulary, tied embeddings), a 24-block
    Conformer audio encoder and a SigLIP-shaped image encoder."""
    from transformers import Phi4MultimodalConfig

    c = Phi4MultimodalConfig(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
        num_key_value_heads=8, max_position_embeddings=131072, original_max_position_embeddings=4096,
        tie_word_embeddings=True,
        audio_config=dict(hidden_size=1024, intermediate_size=1536, num_blocks=24, num_attention_heads=16),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16))
    c.architectures = ["Phi4MultimodalForCausalLM"]
    d.mkdir(parents=True, exist_ok=True)
    c.save_pretrained(d)
    return d


def write_config_only_granite_speech_8b(d: Path) -> Path:
    """A config-only granite-speech-3.3-8b directory with the shapes of its public config (revision 3.3.2): a
    Granite-3.3-8B decoder (40 layers, 4096 wide, 49,160-token vocabulary, tied embeddings), a 16-block Conformer
    CTC encoder (1024 wide) and a 2-layer Q-Former projector."""
    from transformers import GraniteSpeechConfig

    c = GraniteSpeechConfig(
        text_config=dict(model_type="granite", vocab_size=49160, hidden_size=4096, intermediate_size=12800,
                         num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                         logits_scaling=16.0),
        encoder_config=dict(input_dim=160, num_layers=16, hidden_dim=1024, feedforward_mult=4, num_heads=8,
                            dim_head=128, output_dim=348, context_size=200, max_pos_emb=512),
        projector_config=dict(hidden_size=1024, encoder_hidden_size=1024, num_hidden_layers=2,
                              num_attention_heads=16, intermediate_size=4096, cross_attention_frequency=1),
        audio_token_index=49159, has_lora_adapter=True, tie_word_embeddings=True)
    c.architectures = ["GraniteSpeechForConditionalGeneration"]
    d.mkdir(parents=True, exist_ok=True)
    c.save_pretrained(d)
    return d


def write_config_only_voxtral_mini_3b(d: Path) -> Path:
    """A config-only Voxtral-Mini-3B-2507 directory with the shapes of its public config: a Llama decoder (30 layers,
    3072 wide, head_dim 128, 8 KV heads, 131,072-token vocabulary, untied lm_head), a 32-layer Whisper-large-v3-shaped
    encoder (1280 wide) and a two-layer projector from 4 stacked frames (5120) to 3072: 4.68B parameters."""
    from transformers import VoxtralConfig

    c = VoxtralConfig(
        text_config=dict(model_type="llama", vocab_size=131072, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e8,
                         tie_word_embeddings=False),
        audio_config=dict(model_type="voxtral_encoder", hidden_size=1280, intermediate_size=5120,
                          num_hidden_layers=32, num_attention_heads=20, num_mel_bins=128, max_source_positions=1500,
                          vocab_size=51866),
        audio_token_id=24, projector_hidden_act="gelu")
    c.architectures = ["VoxtralForConditionalGeneration"]
    d.mkdir(parents=True, exist_ok=True)
    c.save_pretrained(d)
    return d
