"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): a Whisper-large-v3-shaped audio encoder
(``audio_tower``, 32 layers, ``audio_config.encoder_layers``), a linear projector
(``multi_modal_projector``) and a Qwen2 decoder (``text_config.num_hidden_layers``; at run time
``model.language_model.layers`` in transformers >= 4.52, ``language_model.model.layers`` before).
The processor takes 16 kHz audio and returns ``input_features`` (128 mel bins x 3000 frames) and
``feature_attention_mask``; the chat template puts one ``<|AUDIO|>`` placeholder per clip, which the
processor expands to the clip's encoder frame count."""
from typing import Any

from . import Family


def make_tiny(tok: Any, text_config: dict, *, generation_config: Any = None, audio_layers: int = 2,
              audio_d_model: int = 32, audio_heads: int = 2, audio_ffn_dim: int | None = None,
              audio_seconds: int = 30, audio_hop: int = 160, **_: Any) -> tuple[Any, Any]:
    """A random ``Qwen2AudioForConditionalGeneration`` of the given text shape and its ``Qwen2AudioProcessor``.

    Shapes: audio ``input_features`` (B, 128 mel bins, 100 frames per second of window) -> conv stride 2 and
    pooling -> ``audio_d_model`` -> projector -> the decoder width, scattered into the ``<|AUDIO|>`` positions.
    ``audio_seconds`` < 30 shrinks the window (feature extractor ``chunk_length`` and the encoder's
    ``max_source_positions`` = 50 per second): the CPU demo uses 3 s, i.e. 75 audio tokens instead of 750.
    ``audio_hop`` (samples between mel frames, Whisper: 160 = 10 ms) > 160 makes frames coarser and the audio
    token sequence shorter in proportion. The chat template is the tokenizer's (Qwen ChatML with
    ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>`` parts, as Qwen2-Audio-7B-Instruct renders)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, \
        WhisperFeatureExtractor

    if audio_d_model % audio_heads:
        raise ValueError(f"audio_d_model {audio_d_model} must divide by audio_heads {audio_heads}")
    config = Qwen2AudioConfig(
        text_config=text_config,
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=128, d_model=audio_d_model,
                          encoder_layers=audio_layers, encoder_attention_heads=audio_heads,
                          encoder_ffn_dim=audio_ffn_dim or 2 * audio_d_model,
                          max_source_positions=audio_seconds * 16000 // audio_hop // 2),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    model = Qwen2AudioForConditionalGeneration(config)
    if generation_config is not None:
        model.generation_config = generation_config
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=audio_seconds, hop_length=audio_hop)
    return model, Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=tok.chat_template)


FAMILY = Family(
    kind="qwen2audio",
    title="Qwen2-Audio",
    model_class="Qwen2AudioForConditionalGeneration",
    audio=True,
    model_types=("qwen2_audio",),
    architectures=("Qwen2AudioForConditionalGeneration",),
    decoder_paths=("model.language_model.layers", "language_model.model.layers"),
    audio_layer_paths=("model.audio_tower.layers", "audio_tower.layers"),
    audio_config="audio_config",
    audio_layer_count="encoder_layers",
    encoder_modules=("audio_tower",),
    projector_modules=("multi_modal_projector",),
    audio_inputs=("input_features", "feature_attention_mask"),
    make_tiny=make_tiny,
    transformers_broken=(("<4.45", "it has no Qwen2AudioForConditionalGeneration"),
                         ("==4.54.*", "Qwen2-Audio's forward() rejects the cache_position argument that its "
                                      "generate() passes")),
)
