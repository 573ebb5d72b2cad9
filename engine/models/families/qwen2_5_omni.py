"""Qwen2.5-Omni, its thinker (``Qwen2_5OmniThinkerForConditionalGeneration``): the part that reads audio
(and images, video) and writes text. The talker and the token2wav vocoder (speech output) are out of
scope: a speech-translation student writes text, so a pruned or exported model is a thinker-only
checkpoint (``model_type`` ``qwen2_5_omni_thinker``) without them.

Checkpoints: the hub's full Omni directory (``model_type`` ``qwen2_5_omni``, the thinker's config under
``thinker_config``, weights under ``thinker.*``; the thinker class loads its part and skips the rest) or a
thinker-only directory. Layout at run time (transformers 5): decoder ``model.language_model.layers``
(``get_decoder()``), ``text_config.num_hidden_layers`` with ``layer_types`` / ``max_window_layers``;
audio encoder ``model.audio_tower.layers`` (``audio_config.encoder_layers``), whose projection to the
decoder width (``ln_post``, ``proj``) lives inside the tower; a vision tower ``model.visual`` that audio
work never runs (it is stored, and counted with the encoders; LoRA leaves it out with the audio tower).

Audio: Whisper features, 128 mel bins at 16 kHz padded to the extractor's window, renamed
``feature_attention_mask``; each ``<|AUDIO|>`` becomes ``((L - 1) // 2 + 1 - 2) // 2 + 1`` tokens for L
valid frames (25 per second), the count the model's encoder returns. Positions are 3-D (mrope), but for
text and audio alone all three are the running token index, so decoder positions equal a text LM's.
The transformers processor also builds an image and a video processor (torchvision), so audio work
uses :class:`~.speech_processor.SpeechProcessor` with the checkpoint's own feature extractor,
tokenizer and chat template (its outputs equal the transformers processor's audio path, tested).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import Family

AUDIO_TOKEN = "<|AUDIO|>"
VISION_TOKENS = ("<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>")

def _chat_template() -> str:
    """Qwen2.5-Omni's chat template for what speech translation sends: ChatML turns, an audio part rendered
    as <|audio_bos|><|AUDIO|><|audio_eos|>, a default system turn when there is none."""
    from ..tiny import chatml_template

    return chatml_template("<|audio_bos|><|AUDIO|><|audio_eos|>", "You are a helpful assistant.")


def audio_token_count(feature_lengths: Any) -> Any:
    """Tokens per clip for its number of valid mel frames (the encoder's two stride-2 reductions)."""
    after_conv = (feature_lengths - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def _counts(features: dict) -> Any:
    return audio_token_count(features["feature_attention_mask"].sum(-1))


def _processor(fe: Any, tok: Any, template: str | None, source: Any = None) -> Any:
    """Features padded to the extractor's window, as the transformers processor pads them; the feature mask
    under the name ``forward`` takes."""
    from .speech_processor import SpeechProcessor

    return SpeechProcessor(fe, tok, audio_token=getattr(tok, "audio_token", None) or AUDIO_TOKEN,
                           token_count=_counts, chat_template=template, feature_kwargs={"padding": "max_length"},
                           rename={"attention_mask": "feature_attention_mask"}, source=source)


def load_processor(path: Any) -> Any:
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from .speech_processor import read_chat_template

    p = Path(path)
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return _processor(WhisperFeatureExtractor.from_pretrained(p, local_files_only=True), tok,
                      read_chat_template(p, tok), source=p)


def make_tiny(tok: Any, text_config: dict, *, generation_config: Any = None, audio_layers: int = 2,
              audio_d_model: int = 32, audio_heads: int = 2,
              audio_ffn_dim: int | None = None, audio_seconds: int = 30, audio_hop: int = 160,
              **_: Any) -> tuple[Any, Any]:
    """A random Qwen2.5-Omni thinker of the given text shape with a small audio and vision tower, and its
    :class:`SpeechProcessor`. ``text_config`` is a Qwen2 text config dict (engine.models.tiny)."""
    from transformers import (Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration,
                              WhisperFeatureExtractor)

    tc = dict(text_config, model_type="qwen2_5_omni_text")
    head_dim = tc["hidden_size"] // tc["num_attention_heads"]
    half = head_dim // 2   # mrope splits the rotary half over (time, height, width)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    tc["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    # the checkpoint's image/video placeholders and vision start are tokens of its vocabulary, as here (no prompt
    # of ours contains them, but the config names them, so a vocabulary trim must keep and remap them)
    tok.add_tokens([t for t in VISION_TOKENS if t not in tok.get_vocab()], special_tokens=True)
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5OmniThinkerConfig(
        text_config=tc,
        audio_config=dict(num_mel_bins=128, encoder_layers=audio_layers, encoder_attention_heads=audio_heads,
                          encoder_ffn_dim=audio_ffn_dim or 2 * audio_d_model, d_model=audio_d_model,
                          max_source_positions=audio_seconds * 16000 // audio_hop // 2,
                          n_window=50, output_dim=tc["hidden_size"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=tc["hidden_size"], fullatt_block_indexes=[0]),
        audio_token_index=ids(AUDIO_TOKEN), audio_start_token_id=ids("<|audio_bos|>"),
        audio_end_token_id=ids("<|audio_eos|>"), user_token_id=ids("<|im_start|>"),
        image_token_index=ids("<|IMAGE|>"), video_token_index=ids("<|VIDEO|>"),
        # read by the rope index code but not a declared thinker field in transformers 5
        vision_start_token_id=ids("<|vision_bos|>"))
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    if generation_config is not None:
        model.generation_config = generation_config
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=audio_seconds, hop_length=audio_hop)
    template = _chat_template()
    tok.chat_template = template
    proc = _processor(fe, tok, template)
    return model, proc


FAMILY = Family(
    kind="qwen2_5_omni",
    title="Qwen2.5-Omni thinker",
    model_class="Qwen2_5OmniThinkerForConditionalGeneration",
    audio=True,
    model_types=("qwen2_5_omni_thinker", "qwen2_5_omni"),
    architectures=("Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniForConditionalGeneration"),
    decoder_paths=("model.language_model.layers", "model.layers"),
    audio_layer_paths=("model.audio_tower.layers", "audio_tower.layers"),
    audio_config="audio_config",
    audio_layer_count="encoder_layers",
    encoder_modules=("audio_tower", "visual"),
    projector_modules=(),
    unused_modules=("visual",),
    audio_inputs=("input_features", "feature_attention_mask"),
    wrapped_in="thinker_config",
    processor=load_processor,
    make_tiny=make_tiny,
)
