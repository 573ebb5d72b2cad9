"""Granite Speech (``GraniteSpeechForConditionalGeneration``): a Granite decoder fed by a Conformer CTC encoder
through a windowed Q-Former projector.

Layout at run time (transformers 5): ``text_config`` (granite), decoder ``model.language_model.layers``
(``get_decoder()``, ``text_config.num_hidden_layers``, nothing per-layer to trim); audio encoder
``model.encoder.layers`` (``encoder_config.num_layers``; the encoder also caches that count in its own
``num_layers`` attribute, which places its mid-stack CTC branch after layer ``num_layers // 2``, so the engine's
audio-layer surgery updates both: after a removal the branch sits after the middle of the remaining layers,
the only placement a saved config can express, which is not always after the same original layer); projector ``model.projector`` (``query``, ``qformer``, ``linear``). The input embeddings and the lm_head
are tied by default. The model's forward computes ``lm_head(hidden)`` without the text Granite's
``logits_scaling``, so the engine's head-on-hidden-states logits equal its own.

Audio: 80 log-mel bins at 16 kHz (n_fft 512, window 400, hop 160, HTK mel scale, power spectrum), log10 floored
8 decades below each clip's maximum and mapped by ``/4 + 1``, two frames stacked into one 160-wide frame:
``input_features`` (B, frames/2, 160). ``input_features_mask`` (B, tokens) marks each clip's projector outputs
(``ceil(frames/2 / 15)`` windows of 3 tokens each); the placeholder ``<|audio|>`` is repeated that many times.
The transformers feature extractor computes the mel spectrogram with torchaudio, which does not import beside
every torch the engine accepts, so :class:`GraniteMelFeatures` computes the same features with ``torch.stft``
and transformers' own HTK filter bank (compared against an independent numpy reference in the tests), with
the transformers extractor's length arithmetic (tested equal). The encoder sees a batch's padding (it has no mask):
like the transformers processor, a padded clip's features differ slightly from the same clip alone.

Chat format (Granite 3): ``<|start_of_role|>role<|end_of_role|>content<|end_of_text|>``; the hub's template
takes string contents only, so the prompt writes the placeholder into the user text (the engine's prompt
builder does that for any template that drops structured audio parts).

**Audio LoRA.** The hub checkpoints ship a peft adapter in the model directory itself (``adapter_config.json``,
``adapter_model.safetensors`` beside ``config.json``; ``has_lora_adapter``), which ``from_pretrained`` attaches
when peft is installed and which the model's own ``generate()`` switches on only for prompts with audio.
Pruning and healing must see the weights speech translation runs with, so :func:`prepare` merges it into the
base weights when the model is loaded (logged), sets ``has_lora_adapter=False`` and everything the engine saves
is the merged model: text-only prompts then run with the adapter too. A model loaded without peft installed
has no adapter attached and is refused with the fix (install peft), instead of silently losing it.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

from . import Family

log = logging.getLogger("stc")

AUDIO_TOKEN = "<|audio|>"
SPECIALS = ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", AUDIO_TOKEN)

# Granite 3's turn format for what speech translation sends. Like the hub template it takes string contents only
# (the engine writes the audio placeholder into the user text); the hub's also writes a dated default system turn
# when there is none, and the engine always sends one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|start_of_role|>{{ message['role'] }}<|end_of_role|>{{ message['content'] }}<|end_of_text|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)


@functools.cache
def _mel_features_class() -> type:
    """:class:`GraniteMelFeatures`, built on first use: the registry imports this module, and transformers
    (its base class) is not imported until a Granite processor is needed."""
    from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor

    class GraniteMelFeatures(SequenceFeatureExtractor):
        """Granite Speech's audio features without torchaudio (see the module doc). Saves and loads as the
        transformers ``GraniteSpeechFeatureExtractor`` (same ``preprocessor_config.json``)."""

        model_input_names = ["input_features"]

        def __init__(self, sampling_rate: int = 16000, n_fft: int = 512, win_length: int = 400, hop_length: int = 160,
                     n_mels: int = 80, projector_window_size: int = 15, projector_downsample_rate: int = 5,
                     padding_value: float = 0.0, **kwargs: Any):
            import numpy as np
            from transformers.audio_utils import mel_filter_bank

            spec = dict(kwargs.pop("melspec_kwargs", None) or {})   # a saved extractor's own record wins
            n_fft, win_length = spec.get("n_fft", n_fft), spec.get("win_length", win_length)
            hop_length, n_mels = spec.get("hop_length", hop_length), spec.get("n_mels", n_mels)
            sampling_rate = spec.get("sample_rate", sampling_rate)
            feature_size = kwargs.pop("feature_size", None) or n_mels
            kwargs.pop("feature_extractor_type", None)
            super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value,
                             **kwargs)
            self.melspec_kwargs = {"sample_rate": sampling_rate, "n_fft": n_fft, "win_length": win_length,
                                   "hop_length": hop_length, "n_mels": n_mels}
            self.projector_window_size = projector_window_size
            self.projector_downsample_rate = projector_downsample_rate
            # (n_fft/2 + 1, n_mels): triangles on the HTK mel scale from 0 Hz to Nyquist, unnormalised
            self._fbank = np.asarray(mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels,
                                                     min_frequency=0.0, max_frequency=sampling_rate / 2,
                                                     sampling_rate=sampling_rate, norm=None, mel_scale="htk"),
                                     dtype=np.float32)

        @classmethod
        def from_dir(cls, path: Path) -> Any:
            f = Path(path) / "preprocessor_config.json"
            d = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
            d.pop("processor_class", None)
            return cls(**d)

        def to_dict(self) -> dict[str, Any]:
            out = super().to_dict()
            out.pop("_fbank", None)
            out["feature_extractor_type"] = "GraniteSpeechFeatureExtractor"
            for k in ("n_fft", "win_length", "hop_length", "n_mels"):
                out[k] = self.melspec_kwargs[k]
            return out

        def log_mel(self, audio: Any) -> Any:
            """(B, samples) float -> (B, frames // 2, 2 * n_mels): the model's ``input_features``."""
            import torch

            k = self.melspec_kwargs
            x = audio.float()
            window = torch.hann_window(k["win_length"], periodic=True, dtype=x.dtype)
            spec = torch.stft(x, n_fft=k["n_fft"], hop_length=k["hop_length"], win_length=k["win_length"],
                              window=window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                              return_complex=True).abs().pow(2)                       # (B, F, frames)
            mel = torch.matmul(spec.transpose(-1, -2), torch.from_numpy(self._fbank))   # (B, frames, n_mels)
            logmel = mel.clamp_min(1e-10).log10()
            top = logmel.amax(dim=(-2, -1), keepdim=True)
            logmel = torch.maximum(logmel, top - 8.0) / 4 + 1
            if logmel.shape[1] % 2:
                logmel = logmel[:, :-1]
            return logmel.reshape(logmel.shape[0], -1, 2 * logmel.shape[-1])

        def token_counts(self, lengths: list[int]) -> list[int]:
            """Projector outputs per clip of ``lengths`` samples (the transformers extractor's own arithmetic)."""
            hop = self.melspec_kwargs["hop_length"]
            per_window = self.projector_window_size // self.projector_downsample_rate
            return [math.ceil((n // hop + 1) // 2 / self.projector_window_size) * per_window for n in lengths]

        def __call__(self, audios: Any, sampling_rate: int | None = None, return_tensors: Any = "pt",
                     **_: Any) -> dict[str, Any]:
            import numpy as np
            import torch

            if sampling_rate is not None and int(sampling_rate) != self.sampling_rate:
                raise ValueError(f"Granite Speech features need {self.sampling_rate} Hz audio, got {sampling_rate} Hz: "
                                 "resample first")
            clips = [audios] if isinstance(audios, np.ndarray) and audios.ndim == 1 else list(audios)
            waves = [torch.as_tensor(np.asarray(c, dtype=np.float32)).reshape(-1) for c in clips]
            lengths = [int(w.shape[0]) for w in waves]
            batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True, padding_value=0.0)
            with torch.no_grad():
                feats = self.log_mel(batch)
            counts = self.token_counts(lengths)
            mask = torch.arange(max(counts)).view(1, -1) < torch.tensor(counts).view(-1, 1)
            return {"input_features": feats, "input_features_mask": mask}

    GraniteMelFeatures.__qualname__ = "GraniteMelFeatures"   # pickled by reference through the module __getattr__
    return GraniteMelFeatures


def __getattr__(name: str) -> Any:
    if name == "GraniteMelFeatures":
        return _mel_features_class()
    raise AttributeError(name)


def _counts(features: dict) -> Any:
    return features["input_features_mask"].sum(-1)


def _processor(fe: Any, tok: Any, template: str | None, source: Any = None) -> Any:
    from .speech_processor import SpeechProcessor

    return SpeechProcessor(fe, tok, audio_token=getattr(tok, "audio_token", None) or AUDIO_TOKEN,
                           token_count=_counts, chat_template=template, source=source)


def load_processor(path: Any) -> Any:
    from transformers import AutoTokenizer

    from .speech_processor import read_chat_template

    p = Path(path)
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return _processor(_mel_features_class().from_dir(p), tok, read_chat_template(p, tok), source=p)


def prepare(model: Any, path: Any) -> Any:
    """Merge the audio LoRA that ``from_pretrained`` attached from the model directory (see module doc)."""
    p = Path(path)
    has_files = (p / "adapter_config.json").is_file()
    if not getattr(model, "_hf_peft_config_loaded", False):
        if has_files:
            raise RuntimeError(f"{p / 'adapter_config.json'}: this Granite Speech checkpoint carries its audio LoRA "
                               "beside the weights, but it was not attached (peft is not installed?): install peft "
                               "(pip install peft) so the engine can merge it before pruning")
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            merged += 1
    model._hf_peft_config_loaded = False
    if hasattr(model, "peft_config"):
        del model.peft_config
    # Loading the adapter replaced the checkpoint-key renaming that save_pretrained reverts with the adapter's own
    # (its keys under base_model.model.*): without this the merged model would save its weights under those names.
    # None makes save_pretrained use the class's default renaming, as for a model built from its config.
    model._weight_conversions = None
    model.config.has_lora_adapter = False
    log.info("merged the audio LoRA of %s into %d linear layers (every saved model carries it merged)", p, merged)
    return model


def make_tiny(tok: Any, text_config: dict, *, generation_config: Any = None, audio_layers: int = 2,
              audio_d_model: int = 32, audio_heads: int = 2, audio_ffn_dim: int | None = None,
              **_: Any) -> tuple[Any, Any]:
    """A random Granite Speech of the given text shape with a small Conformer encoder and Q-Former projector,
    and its processor (the tokenizer gains Granite's role tokens and the audio placeholder)."""
    from transformers import GenerationConfig, GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    tok.chat_template = CHAT_TEMPLATE
    end = tok.convert_tokens_to_ids("<|end_of_text|>")
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "pad_token_id")
    tc = {k: text_config[k] for k in keep if k in text_config}
    tc.update(model_type="granite", vocab_size=max(text_config["vocab_size"], -(-len(tok) // 64) * 64),
              eos_token_id=end, bos_token_id=None, tie_word_embeddings=True,
              embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
              logits_scaling=8.0)
    head = audio_d_model // audio_heads
    config = GraniteSpeechConfig(
        text_config=tc,
        encoder_config=dict(input_dim=160, num_layers=audio_layers, hidden_dim=audio_d_model,
                            feedforward_mult=max(1, (audio_ffn_dim or 2 * audio_d_model) // audio_d_model),
                            num_heads=audio_heads, dim_head=head, output_dim=16),
        projector_config=dict(hidden_size=audio_d_model, encoder_hidden_size=audio_d_model, num_hidden_layers=1,
                              num_attention_heads=audio_heads, intermediate_size=2 * audio_d_model,
                              cross_attention_frequency=1),
        audio_token_index=tok.convert_tokens_to_ids(AUDIO_TOKEN), has_lora_adapter=False,
        tie_word_embeddings=True)
    model = GraniteSpeechForConditionalGeneration(config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else end
    model.generation_config = GenerationConfig(eos_token_id=[end], pad_token_id=pad, do_sample=False)
    return model, _processor(_mel_features_class()(), tok, CHAT_TEMPLATE)


FAMILY = Family(
    kind="granite_speech",
    title="Granite Speech",
    model_class="GraniteSpeechForConditionalGeneration",
    audio=True,
    model_types=("granite_speech",),
    architectures=("GraniteSpeechForConditionalGeneration",),
    decoder_paths=("model.language_model.layers",),
    audio_layer_paths=("model.encoder.layers",),
    audio_config="encoder_config",
    audio_layer_count="num_layers",
    encoder_modules=("encoder",),
    projector_modules=("projector",),
    audio_inputs=("input_features", "input_features_mask"),
    processor=load_processor,
    audio_tokens_per_s=10.0,         # 100 mel frames/s stacked by 2, windows of 15 -> 3 queries
    make_tiny=make_tiny,
    prepare=prepare,
)
