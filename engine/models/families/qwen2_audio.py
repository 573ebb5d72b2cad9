"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): a Whisper-large-v3-shaped audio encoder
(``audio_tower``, 32 layers, ``audio_config.encoder_layers``), a linear projector
(``multi_modal_projector``) and a Qwen2 decoder (``text_config.num_hidden_layers``; at run time
``model.language_model.layers`` in transformers >= 4.52, ``language_model.model.layers`` before).
The processor takes 16 kHz audio and returns ``input_features`` (128 mel bins x 3000 frames) and
``feature_attention_mask``; the chat template puts one ``<|AUDIO|>`` placeholder per clip, which the
processor expands to the clip's encoder frame count."""
from . import Family

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
)
