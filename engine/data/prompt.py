"""The paper's prompt, its label mask, and the featurizer that turns decoded samples into a model batch.

Prompt (the paper's): system = ``DataConfig.system_prompt`` (left out of audio prompts for a family whose chat
format refuses a system turn beside audio: its processor says ``system_with_audio = False``); user = the audio, then
``DataConfig.instruction`` with the language names from :mod:`engine.langs` (any language of the
table); assistant = the translation, closed by the end-of-turn token (the first special token the chat
template writes after an answer: ``<|im_end|>`` for Qwen, ``<|end|>`` for Phi; else the eos token).
Rows without audio (text MT, or a decoder-only LM) get ``DataConfig.text_instruction``, a newline
and the source text as the user turn.

Why the text is rendered by the model's own chat template (``apply_chat_template``) instead of a
format string here: the real Qwen2-Audio template writes ``Audio 1: <|audio_bos|><|AUDIO|>
<|audio_eos|>\\n`` before the instruction, and any other model's template has its own quirks;
rendering through it keeps training, generation and the teacher cache on one prompt.

Label mask: every token of the prompt (system, user, assistant header) is -100; the translation
tokens and the closing end token are labels; whatever the template writes after the end token (a
newline) is not part of the sequence. The prompt length is measured by processing the prompt alone
(the processor decides how many ``<|AUDIO|>`` tokens the audio needs) and the full sequence must
start with exactly those ids; if a tokenizer merged tokens across the assistant header the label
mask would be off by a token, so that raises :class:`PromptError` instead.

Cost: the audio features are computed once per batch, by the processor on the prompts (batched).
The full sequences are then tokenized as text with ``<|AUDIO|>`` expanded to the count the processor
chose for the prompt, which is what the processor itself does, and checked against the prompt ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import langs
from ..config import DataConfig
from ..errors import StcError

IGNORE = -100
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class PromptError(StcError, ValueError):
    """The prompt cannot be built or its label mask cannot be trusted; the message names the sample."""


@dataclass(frozen=True)
class Encoded:
    """One sample's token ids. ``labels`` has -100 on the prompt (and everywhere for a pad sample)."""
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    n_audio_tokens: int


def load_processor(path: str) -> Any:
    """The model's processor (audio models) or tokenizer (text LMs) from a local directory."""
    try:
        from ..models.load import load_processor as _load
    except ImportError:  # engine.models.load not present in this checkout: plain transformers
        from transformers import AutoProcessor, AutoTokenizer

        try:
            proc = AutoProcessor.from_pretrained(path)
        except Exception:
            proc = None
        if proc is None or not hasattr(proc, "feature_extractor"):
            proc = AutoTokenizer.from_pretrained(path)
        return proc
    return _load(path)


class PromptBuilder:
    """Renders prompts with a processor's (audio model) or a tokenizer's (text LM) chat template."""

    def __init__(self, processor: Any, data_cfg: DataConfig | None = None):
        self.processor = processor
        self.cfg = data_cfg or DataConfig()
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        self.is_audio = self.feature_extractor is not None
        self.template_owner = processor if getattr(processor, "chat_template", None) else self.tokenizer
        if not getattr(self.template_owner, "chat_template", None):
            raise PromptError("the processor/tokenizer has no chat template; the prompt needs one "
                              "(Qwen-style: <|im_start|>role ... <|im_end|>)")
        self.end_token = self._turn_end()
        if self.end_token is None:
            raise PromptError("the chat template closes the assistant turn with no special token and the tokenizer "
                              "has no eos token: the end of a translation cannot be labelled")
        self.end_id = self.tokenizer.convert_tokens_to_ids(self.end_token)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.end_id)
        self.audio_token = getattr(processor, "audio_token", "<|AUDIO|>") if self.is_audio else None
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(self.audio_token) if self.is_audio else None
        self.audio_as_part = self.is_audio and self._renders_audio_parts()
        # a family whose chat format refuses a system turn beside audio says so on its processor
        self.system_with_audio = bool(getattr(processor, "system_with_audio", True))

    def _renders_audio_parts(self) -> bool:
        """Whether the chat template renders a structured audio part of a message as the audio placeholder.
        A template that takes string contents only (Granite's) gets the placeholder written at the start of
        the user text instead, as that family's own examples write it."""
        probe = [{"role": "system", "content": "s"},
                 {"role": "user", "content": [{"type": "audio", "audio_url": "a"}, {"type": "text", "text": "u"}]}]
        try:
            return self.audio_token in self.render(probe, add_generation_prompt=True)
        except Exception:   # a template that concatenates the content as a string
            return False

    def _turn_end(self) -> str | None:
        """The token the chat template closes an assistant turn with: the first special token it writes after
        the answer (``<|im_end|>`` for ChatML, ``<|end|>`` for Phi, ``<|eot_id|>`` for Llama 3), else the
        tokenizer's eos token."""
        sentinel = "stc-answer-sentinel"
        try:
            text = self.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                {"role": "assistant", "content": sentinel}], add_generation_prompt=False)
        except Exception:   # a template that refuses this conversation: fall back to eos
            text = ""
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        special |= {int(i) for i in (getattr(self.tokenizer, "added_tokens_decoder", None) or {})}
        if sentinel in text:
            after = text.split(sentinel, 1)[1]
            ids = self.tokenize(after) if after else []
            for i in ids[:3]:
                if i in special:
                    return self.tokenizer.convert_ids_to_tokens(i)
        return self.tokenizer.eos_token

    # ------------------------------------------------------------------ text
    def user_text(self, src_lang: str, tgt_lang: str, *, audio: bool, src_text: str = "") -> str:
        names = {"src": langs.get(src_lang).name, "tgt": langs.get(tgt_lang).name}
        if audio:
            return self.cfg.instruction.format(**names)
        return self.cfg.text_instruction.format(**names) + "\n" + src_text

    def messages(self, meta: Mapping[str, Any], *, audio: bool, target: str | None = None,
                 key: str = "audio") -> list[dict[str, Any]]:
        text = self.user_text(meta["src_lang"], meta["tgt_lang"], audio=audio, src_text=meta.get("src_text", ""))
        if audio and self.audio_as_part:
            # both keys: the real Qwen2-Audio template tests `'audio_url' in content`, newer ones the type
            user: Any = [{"type": "audio", "audio_url": key}, {"type": "text", "text": text}]
        elif audio:
            user = self.audio_token + text
        else:
            user = text
        msgs = [{"role": "user", "content": user}]
        if not audio or self.system_with_audio:
            msgs.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        if target is not None:
            msgs.append({"role": "assistant", "content": target})
        return msgs

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        return self.template_owner.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)

    def prompt_text(self, meta: Mapping[str, Any], *, audio: bool) -> str:
        return self.render(self.messages(meta, audio=audio), add_generation_prompt=True)

    def full_text(self, meta: Mapping[str, Any], target: str, *, audio: bool, key: str = "sample") -> str:
        prompt = self.prompt_text(meta, audio=audio)
        full = self.render(self.messages(meta, audio=audio, target=target), add_generation_prompt=False)
        if not full.startswith(prompt):
            raise PromptError(f"{key}: the chat template renders the conversation with the answer so that it "
                              f"does not start with the generation prompt; the label mask cannot be placed")
        return full

    # ------------------------------------------------------------------ ids
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, meta: Mapping[str, Any], prompt_ids: Sequence[int], *, audio: bool, key: str,
               target: str | None = None, pad: bool = False) -> Encoded:
        """Full sequence and labels for one sample whose prompt the processor encoded as ``prompt_ids``."""
        target = meta.get("tgt_text", "") if target is None else target
        prompt_ids = [int(t) for t in prompt_ids]
        n_audio = sum(t == self.audio_token_id for t in prompt_ids) if audio else 0
        full_text = self.full_text(meta, target, audio=audio, key=key)
        if audio:
            if full_text.count(self.audio_token) != 1:
                raise PromptError(f"{key}: expected one {self.audio_token} in the rendered prompt, found "
                                  f"{full_text.count(self.audio_token)}")
            full_text = full_text.replace(self.audio_token, self.audio_token * n_audio)
        ids = self.tokenize(full_text)
        p = len(prompt_ids)
        if ids[:p] != prompt_ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), p))
            raise PromptError(
                f"{key}: the full sequence does not start with the prompt ids (first difference at token {at} "
                f"of {p}); the tokenizer merges text across the assistant header, so the label mask would be "
                f"wrong")
        try:
            end = ids.index(self.end_id, p)
        except ValueError:
            raise PromptError(f"{key}: no {self.end_token} closes the assistant turn in the rendered "
                              f"template") from None
        if end == p and not pad:
            raise PromptError(f"{key}: no label tokens (empty translation); fix or drop this sample")
        ids = ids[:end + 1]
        labels = [IGNORE] * len(ids) if pad else [IGNORE] * p + ids[p:]
        return Encoded(ids, labels, p, n_audio)


class Featurizer:
    """Decoded samples -> a padded batch dict for the model (runs inside the DataLoader workers).

    Input samples (from :class:`engine.data.stream.ShardReader`): ``key``, ``shard``, ``index``,
    ``pad``, ``meta`` (the shard json), ``audio`` (float32 mono or None), ``sample_rate``.

    Output (B samples, T tokens, A = samples with audio, right padding):
      ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long, ``labels`` [B, T] long (-100 on
      prompts, padding and pad samples), the processor's audio inputs (audio models, rows in batch
      order of the samples with audio; Qwen2-Audio: ``input_features`` [A, 128, 3000] float32 and
      ``feature_attention_mask`` [A, 3000] long; integer tensors as long), and the non-tensor ``keys``,
      ``shards``, ``indices``, ``pad`` (bools),
      ``n_audio_tokens`` (per sample).
    """

    def __init__(self, processor: Any, data_cfg: DataConfig | None = None, *, use_audio: bool = True):
        self.builder = PromptBuilder(processor, data_cfg)
        self.use_audio = use_audio and self.builder.is_audio

    def _prompt_ids_audio(self, texts: list[str], waves: list[np.ndarray], sr: int) -> tuple[list[list[int]], dict]:
        proc = self.builder.processor
        out = proc(text=texts, audio=waves, sampling_rate=sr, return_tensors="pt", padding=True,
                   add_special_tokens=False)
        ids = out["input_ids"]
        mask = out["attention_mask"].bool()
        prompt_ids = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
        # everything else the processor returns is the family's audio input (features, masks, sizes)
        feats = {}
        for k, v in out.items():
            if k in TEXT_KEYS or not torch.is_tensor(v):
                continue
            feats[k] = v.long() if not v.is_floating_point() and v.dtype != torch.bool else v
        return prompt_ids, feats

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        b = self.builder
        with_audio = [self.use_audio and s.get("audio") is not None for s in samples]
        texts = [b.prompt_text(s["meta"], audio=a) for s, a in zip(samples, with_audio)]
        prompt_ids: list[list[int] | None] = [None] * len(samples)
        feats: dict[str, torch.Tensor] = {}
        audio_rows = [i for i, a in enumerate(with_audio) if a]
        if audio_rows:
            srs = {int(samples[i].get("sample_rate", 16000)) for i in audio_rows}
            if len(srs) != 1:
                raise PromptError(f"samples of one batch have different sample rates {sorted(srs)}")
            ids, feats = self._prompt_ids_audio([texts[i] for i in audio_rows],
                                                [samples[i]["audio"] for i in audio_rows], srs.pop())
            for i, p in zip(audio_rows, ids):
                prompt_ids[i] = p
        for i, a in enumerate(with_audio):
            if not a:
                prompt_ids[i] = b.tokenize(texts[i])
        enc = [b.encode(s["meta"], prompt_ids[i], audio=with_audio[i], key=s["key"], pad=bool(s.get("pad")))
               for i, s in enumerate(samples)]
        t = max(len(e.input_ids) for e in enc)
        input_ids = torch.full((len(enc), t), b.pad_id, dtype=torch.long)
        attention = torch.zeros((len(enc), t), dtype=torch.long)
        labels = torch.full((len(enc), t), IGNORE, dtype=torch.long)
        for i, e in enumerate(enc):
            n = len(e.input_ids)
            input_ids[i, :n] = torch.tensor(e.input_ids)
            attention[i, :n] = 1
            labels[i, :n] = torch.tensor(e.labels)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        out.update(feats)
        out.update({
            "keys": [s["key"] for s in samples], "shards": [s.get("shard", "") for s in samples],
            "indices": [int(s.get("index", -1)) for s in samples], "pad": [bool(s.get("pad")) for s in samples],
            "n_audio_tokens": [e.n_audio_tokens for e in enc],
        })
        return out
