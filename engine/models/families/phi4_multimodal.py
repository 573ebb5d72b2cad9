"""Phi-4-multimodal (``Phi4MultimodalForCausalLM``, the transformers-native checkpoint layout): a Phi-4-mini
decoder whose backbone also holds the audio and vision encoders.

Layout at run time (transformers 5): a flat config (``config.get_text_config() is config``,
``num_hidden_layers``, nothing per-layer to trim); decoder ``model.layers`` (``get_decoder()``); the
audio encoder, a Conformer, at ``model.embed_tokens_extend.audio_embed.encoder.encoders``
(``audio_config.num_blocks``), its projection to the decoder width (``up_proj_for_speech``,
``down_proj_for_speech``) beside it; the image encoder at ``model.embed_tokens_extend.image_embed`` and the
projections of audio that comes with an image (``*_proj_for_vision_speech``), which speech alone never runs
(LoRA leaves them out). The backbone merges the audio into the token embeddings itself
(``embed_tokens_extend``), so the engine takes the decoder's input embeddings at that module's output.

Audio: ``Phi4MultimodalFeatureExtractor`` (80 log-mel bins at 16 kHz) returns ``audio_input_features``
(B, frames, 80), ``audio_embed_sizes`` (tokens per clip: frames / 8, rounded up) and
``audio_attention_mask``; the audio placeholder (``tokenizer.audio_token``, ``<|endoftext11|>``, id
200011) is repeated ``audio_embed_sizes`` times. The transformers processor also needs an image processor
(torchvision), so audio work uses :class:`~.speech_processor.SpeechProcessor`. Turns end with ``<|end|>``.

**Speech LoRA.** The checkpoint's speech ability partly lives in a LoRA adapter in ``speech-lora/``
(``adapter_config.json``, ``adapter_model.safetensors``) on the decoder's linears, which transformers does
not load by itself. Pruning and healing must see the weights speech translation runs with, so
:func:`prepare` merges it into the base weights when the model is loaded (peft's ``merge_and_unload``;
logged), and everything the engine saves is the merged model, without ``speech-lora/``. Text-only
prompts then run with the adapter too (the vision LoRA, ``vision-lora/``, is never applied).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import Family

log = logging.getLogger("stc")

AUDIO_TOKEN = "<|endoftext11|>"
IMAGE_TOKEN = "<|endoftext10|>"      # id 200010 in the checkpoint's vocabulary
SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", AUDIO_TOKEN, IMAGE_TOKEN)
SPEECH_LORA = "speech-lora"

# Phi-4-multimodal's turn format: <|role|>content<|end|>; an audio part is its placeholder token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}" + AUDIO_TOKEN +
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% else %}{{ eos_token }}{% endif %}"
)


def audio_token_count(features: dict) -> list[int]:
    return [int(n) for n in features["audio_embed_sizes"]]


def load_processor(path: Any) -> Any:
    from transformers import AutoTokenizer, Phi4MultimodalFeatureExtractor

    from .speech_processor import SpeechProcessor, read_chat_template

    p = Path(path)
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    fe = Phi4MultimodalFeatureExtractor.from_pretrained(p, local_files_only=True)
    return SpeechProcessor(fe, tok, audio_token=getattr(tok, "audio_token", None) or AUDIO_TOKEN,
                           token_count=audio_token_count, chat_template=read_chat_template(p, tok), source=p)


def prepare(model: Any, path: Any) -> Any:
    """Merge ``<path>/speech-lora`` into the weights (see module doc); a model without one is returned as is."""
    adapter = Path(path) / SPEECH_LORA
    if not (adapter / "adapter_config.json").is_file():
        return model
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    log.info("merged the speech LoRA %s into the weights (every saved model carries it merged)", adapter)
    return merged


def make_tiny(tok: Any, text_config: dict, *, generation_config: Any = None, audio_layers: int = 2,
              audio_d_model: int = 32, audio_heads: int = 2, audio_ffn_dim: int | None = None,
              **_: Any) -> tuple[Any, Any]:
    """A random Phi-4-multimodal of the given text shape with a small Conformer audio encoder and vision
    tower, and its :class:`SpeechProcessor` (the tokenizer gains Phi's turn tokens and audio placeholder)."""
    from transformers import GenerationConfig, Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor, \
        Phi4MultimodalForCausalLM

    from .speech_processor import SpeechProcessor

    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    tok.chat_template = CHAT_TEMPLATE
    tc = {k: v for k, v in text_config.items() if k not in ("model_type", "vocab_size")}
    vocab = max(text_config["vocab_size"], -(-len(tok) // 64) * 64)
    end = tok.convert_tokens_to_ids("<|end|>")
    tc.update(vocab_size=vocab, eos_token_id=end, original_max_position_embeddings=tc["max_position_embeddings"])
    config = Phi4MultimodalConfig(
        **tc,
        audio_config=dict(hidden_size=audio_d_model, intermediate_size=audio_ffn_dim or 2 * audio_d_model,
                          num_blocks=audio_layers, num_attention_heads=audio_heads, ext_pw_out_channel=audio_d_model,
                          depthwise_separable_out_channel=audio_d_model, nemo_conv_channels=audio_d_model,
                          audio_token_id=tok.convert_tokens_to_ids(AUDIO_TOKEN)),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN)))
    model = Phi4MultimodalForCausalLM(config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else end
    model.generation_config = GenerationConfig(eos_token_id=[end, tok.eos_token_id], pad_token_id=pad,
                                               do_sample=False)
    proc = SpeechProcessor(Phi4MultimodalFeatureExtractor(), tok, audio_token=AUDIO_TOKEN,
                           token_count=audio_token_count, chat_template=CHAT_TEMPLATE)
    return model, proc


FAMILY = Family(
    kind="phi4_multimodal",
    title="Phi-4-multimodal",
    model_class="Phi4MultimodalForCausalLM",
    audio=True,
    model_types=("phi4_multimodal",),
    architectures=("Phi4MultimodalForCausalLM",),
    decoder_paths=("model.layers",),
    audio_layer_paths=("model.embed_tokens_extend.audio_embed.encoder.encoders",),
    audio_config="audio_config",
    audio_layer_count="num_blocks",
    encoder_modules=("embed_tokens_extend",),
    projector_modules=(),
    audio_inputs=("audio_input_features", "audio_embed_sizes", "audio_attention_mask"),
    embeds_module="model.embed_tokens_extend",
    # the image tower and the projections of audio that accompanies an image: never run for speech alone
    unused_modules=("image_embed", "up_proj_for_vision_speech", "down_proj_for_vision_speech"),
    processor=load_processor,
    audio_tokens_per_s=12.5,         # 100 mel frames/s, the Conformer's time reduction of 8
    make_tiny=make_tiny,
    prepare=prepare,
)
