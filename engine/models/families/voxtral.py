"""Voxtral (``VoxtralForConditionalGeneration``): a Llama-style decoder fed by a Whisper-style encoder whose output
frames are stacked four at a time and projected into the decoder.

Layout at run time (transformers 5): ``text_config`` (llama), decoder ``model.language_model.layers``
(``get_decoder()``, ``text_config.num_hidden_layers``, nothing per-layer to trim); audio encoder
``model.audio_tower.layers`` (``audio_config.num_hidden_layers``);
projector ``model.multi_modal_projector`` (``linear_1``, ``linear_2``). The lm_head is untied.

**Audio.** Each clip is padded with zeros to a whole number of chunks (30 s for the hub checkpoints; the chunk is
the feature extractor's ``chunk_length``), and every chunk is a row of ``input_features``: (chunks, 128, frames per
chunk) Whisper log-mel features, computed per clip as transformers' ``VoxtralProcessor`` computes them (tested
equal). The encoder has no mask and sees every chunk whole, so a clip's features and embeddings do not depend on
the other clips of its batch. The encoder's frames (half the mel frames) are stacked four by four, so a clip
becomes ``[BEGIN_AUDIO]`` plus ``frames / 8`` ``[AUDIO]`` tokens (375 per 30-s chunk), the count mistral-common's
audio encoder writes (tested equal).

**Tokenizer and prompt.** Voxtral ships a Tekken tokenizer (``tekken.json``) for ``mistral-common``, which encodes
conversations to ids itself instead of rendering a chat template. The engine needs text it can render and
re-tokenize for its label mask, so the family loads the same vocabulary as a transformers fast tokenizer
(transformers converts ``tekken.json``; the control tokens ``<s>``, ``[INST]``, ``[AUDIO]`` ... stay single
tokens) and renders the v7 instruct format with :data:`CHAT_TEMPLATE`::

    <s>[INST][BEGIN_AUDIO][AUDIO]...[AUDIO]Translate the English speech into German:[/INST]Guten Morgen.</s>

A test encodes the same conversations with ``mistral-common``'s ``encode_chat_completion`` and requires the same
ids, audio and answer included. Voxtral's tokenizer (v7) refuses a system prompt in a conversation with audio, so
the processor says ``system_with_audio = False`` and the engine's prompt leaves the system turn out of audio
prompts (text-only prompts keep it, as ``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]``). Saved model directories carry the
fast tokenizer and the source's ``tekken.json``, so they load with transformers' own ``VoxtralProcessor`` (which
needs ``mistral-common``) as well. For that reason the vocabulary trim refuses a directory with ``tekken.json``:
a trimmed ``tokenizer.json`` beside the full ``tekken.json`` would give mistral-common users other ids.
"""
from __future__ import annotations

import base64
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import Family

AUDIO_TOKEN = "[AUDIO]"
BEGIN_AUDIO = "[BEGIN_AUDIO]"
TEKKEN_FILE = "tekken.json"
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# mistral-common's v7 instruct encoding of what speech translation sends: system turns as
# [SYSTEM_PROMPT]...[/SYSTEM_PROMPT], user turns as [INST]...[/INST] with each audio part as [BEGIN_AUDIO][AUDIO]
# (the processor repeats [AUDIO] for the clip), the answer closed by </s>.
CHAT_TEMPLATE = (
    "<s>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}[BEGIN_AUDIO][AUDIO]"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}</s>"
    "{% endif %}"
    "{% endfor %}"
)

# The control tokens of a v7 Tekken vocabulary with audio, at the ranks the hub's tekken.json gives them (transformers'
# VoxtralProcessor fixes [AUDIO] at 24); the tiny builder fills the other ranks below NUM_SPECIAL with <SPECIAL_n>.
_CONTROL = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
            6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]",
            11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]",
            17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 24: AUDIO_TOKEN, 25: BEGIN_AUDIO,
            32: "[ARGS]", 33: "[CALL_ID]", 34: "[TRANSCRIBE]"}


def _pop_counts(features: dict) -> Any:
    """The per-clip ``[AUDIO]`` counts :meth:`VoxtralSpeechProcessor.features` left beside the features (a module
    function, not a lambda: the processor pickles, as DataLoader workers started by spawn need)."""
    return features.pop("_counts")


@functools.cache
def _speech_processor_class() -> type:
    """:class:`VoxtralSpeechProcessor`, built once: one class object, so instances pickle by reference (through the
    module ``__getattr__``)."""
    from .speech_processor import SpeechProcessor

    class VoxtralSpeechProcessor(SpeechProcessor):
        """Chunked Whisper features and ``[AUDIO]`` counts of Voxtral (see the module doc)."""

        system_with_audio = False

        def __init__(self, fe: Any, tok: Any, *, tekken: str | None = None, source: Any = None):
            super().__init__(fe, tok, audio_token=AUDIO_TOKEN, token_count=_pop_counts,
                             chat_template=CHAT_TEMPLATE, source=source)
            self.tekken = tekken          # the source's tekken.json, written beside every saved copy
            audio = (json.loads(tekken).get("audio") or {}) if tekken else {}
            self.frame_rate = float(audio.get("frame_rate", 12.5))

        @property
        def chunk_samples(self) -> int:
            return int(self.feature_extractor.n_samples)

        def tokens_for(self, n_samples: int) -> int:
            """``[AUDIO]`` tokens for a clip of ``n_samples`` (mistral-common's count after chunk padding)."""
            fe = self.feature_extractor
            padded = math.ceil(max(n_samples, 1) / self.chunk_samples) * self.chunk_samples
            frames_per_token = fe.sampling_rate / self.frame_rate / fe.hop_length
            if fe.nb_max_frames % frames_per_token:
                raise ValueError(f"a Voxtral chunk of {fe.nb_max_frames} mel frames does not stack into whole audio "
                                 f"tokens of {frames_per_token:g} frames: preprocessor_config.json chunk_length and "
                                 "tekken.json audio.frame_rate disagree")
            return math.ceil(padded // fe.hop_length / frames_per_token)

        def features(self, audio: list, sampling_rate: int) -> dict[str, Any]:
            import torch

            fe = self.feature_extractor
            if int(sampling_rate) != fe.sampling_rate:
                raise ValueError(f"Voxtral features need {fe.sampling_rate} Hz audio, got {sampling_rate} Hz: "
                                 "resample first")
            rows, counts = [], []
            for wave in audio:
                out = fe(wave, sampling_rate=fe.sampling_rate, padding=True, truncation=False,
                         pad_to_multiple_of=self.chunk_samples, return_tensors="pt")
                feats = out["input_features"]                                    # (1, mels, frames)
                rows.append(feats.reshape(fe.feature_size, -1, fe.nb_max_frames).transpose(0, 1))
                counts.append(self.tokens_for(len(wave)))
            return {"input_features": torch.cat(rows), "_counts": counts}

        def save_pretrained(self, out_dir: str | Path) -> None:
            super().save_pretrained(out_dir)
            if self.tekken is not None:
                (Path(out_dir) / TEKKEN_FILE).write_text(self.tekken, encoding="utf-8")

    VoxtralSpeechProcessor.__qualname__ = "VoxtralSpeechProcessor"
    return VoxtralSpeechProcessor


def __getattr__(name: str) -> Any:
    if name == "VoxtralSpeechProcessor":
        return _speech_processor_class()
    raise AttributeError(name)


def load_tokenizer(path: Any) -> Any:
    """The checkpoint's vocabulary as a transformers fast tokenizer: ``tokenizer.json`` when the directory has one
    (every directory the engine saves), else converted from ``tekken.json``; control tokens named, the v7 template."""
    try:
        from transformers import TokenizersBackend
    except ImportError:
        import transformers

        raise ImportError(f"Voxtral needs transformers 5 (its tekken.json -> fast tokenizer conversion); this is "
                          f"transformers {transformers.__version__}: pip install 'transformers>=5'") from None
    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / TEKKEN_FILE).is_file():
        raise FileNotFoundError(f"{p}: a Voxtral checkpoint needs tekken.json (or tokenizer.json); neither is there")
    tok = TokenizersBackend.from_pretrained(p, local_files_only=True)
    for role, name in SPECIALS.items():
        if getattr(tok, role, None) is None:
            setattr(tok, role, name)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_processor(path: Any) -> Any:
    from transformers import WhisperFeatureExtractor

    p = Path(path)
    fe = WhisperFeatureExtractor.from_pretrained(p, local_files_only=True)
    tekken = (p / TEKKEN_FILE).read_text(encoding="utf-8") if (p / TEKKEN_FILE).is_file() else None
    return _speech_processor_class()(fe, load_tokenizer(p), tekken=tekken, source=p)


def tekken_from_tokenizer(tok: Any, out: Path, *, chunk_seconds: float, num_special: int = 128) -> Path:
    """Write a v7 ``tekken.json`` with audio from a byte-level BPE fast tokenizer's ordinary vocabulary (bytes first,
    then the merges in rank order) and the Voxtral control tokens: a tiny stand-in for the hub's 131k vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from ..qwen_vocab import QWEN2_PATTERN

    raw = json.loads(tok.backend_tokenizer.to_str())
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    ranks = [bytes([i]) for i in range(256)]
    seen = set(ranks)
    for s, _ in sorted(raw["model"]["vocab"].items(), key=lambda kv: kv[1]):
        b = bytes(u2b[c] for c in s)
        if b not in seen:
            seen.add(b)
            ranks.append(b)
    specials = [{"rank": i, "token_str": _CONTROL.get(i, f"<SPECIAL_{i}>"), "is_control": True}
                for i in range(num_special)]
    vocab = [{"rank": r, "token_bytes": base64.b64encode(b).decode("ascii"),
              "token_str": b.decode("utf-8", "replace")} for r, b in enumerate(ranks)]
    data = {"config": {"pattern": QWEN2_PATTERN, "num_vocab_tokens": len(vocab),
                       "default_vocab_size": len(vocab) + num_special, "default_num_special_tokens": num_special,
                       "version": "v7"},
            "vocab": vocab, "special_tokens": specials,
            "audio": {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": float(chunk_seconds),
                      "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}}}
    out.mkdir(parents=True, exist_ok=True)
    (out / TEKKEN_FILE).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out / TEKKEN_FILE


def make_tiny(tok: Any, text_config: dict, *, generation_config: Any = None, audio_layers: int = 2,
              audio_d_model: int = 32, audio_heads: int = 2, chunk_seconds: int = 2, **_: Any) -> tuple[Any, Any]:
    """A random Voxtral of the given text shape with a small encoder, a Tekken vocabulary made from ``tok``'s
    ordinary vocabulary, and its processor. Audio is cut into ``chunk_seconds`` chunks (the hub's are 30 s; a chunk's
    100 mel frames per second must stack into whole tokens of 8 frames, so an even number of seconds); longer clips
    take several chunks, so the shared ``audio_seconds`` window keyword does not apply."""
    from transformers import GenerationConfig, VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor

    work = Path(tempfile.mkdtemp(prefix="stc-voxtral-tok-"))
    try:
        tekken_from_tokenizer(tok, work, chunk_seconds=chunk_seconds)
        fe = WhisperFeatureExtractor(feature_size=128, chunk_length=chunk_seconds, hop_length=160)
        fe.save_pretrained(work)
        proc = load_processor(work)
        proc.source = None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    vtok = proc.tokenizer
    ids = vtok.convert_tokens_to_ids
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps")
    tc = {k: text_config[k] for k in keep if k in text_config}
    tc.update(model_type="llama", vocab_size=-(-len(vtok) // 64) * 64, head_dim=tc["hidden_size"] // tc["num_attention_heads"],
              bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"),
              tie_word_embeddings=False, rope_theta=1e8)
    frames = proc.feature_extractor.nb_max_frames
    config = VoxtralConfig(
        text_config=tc,
        audio_config=dict(model_type="voxtral_encoder", hidden_size=audio_d_model, intermediate_size=4 * audio_d_model,
                          num_hidden_layers=audio_layers, num_attention_heads=audio_heads, num_mel_bins=128,
                          max_source_positions=frames // 2),
        audio_token_id=ids(AUDIO_TOKEN), projector_hidden_act="gelu")
    model = VoxtralForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=ids("<s>"), eos_token_id=[ids("</s>")],
                                               pad_token_id=ids("<pad>"), do_sample=False)
    return model, proc


FAMILY = Family(
    kind="voxtral",
    title="Voxtral",
    model_class="VoxtralForConditionalGeneration",
    audio=True,
    model_types=("voxtral",),
    architectures=("VoxtralForConditionalGeneration",),
    decoder_paths=("model.language_model.layers",),
    audio_layer_paths=("model.audio_tower.layers",),
    audio_config="audio_config",
    audio_layer_count="num_hidden_layers",
    encoder_modules=("audio_tower",),
    projector_modules=("multi_modal_projector",),
    audio_inputs=("input_features",),
    processor=load_processor,
    audio_tokens_per_s=12.5,         # 8 mel frames per token: 375 per 30-s window
    audio_chunked=True,
    make_tiny=make_tiny,
    transformers_broken=(("<5", "the engine reads tekken.json through transformers 5's fast-tokenizer conversion "
                                "(TokenizersBackend); tested with 5.24"),),
)
