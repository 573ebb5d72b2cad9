"""A processor for audio-LMs whose transformers processor cannot be built for audio work alone.

Omni-style processors bundle an image and a video processor, which import torchvision (and others
need torchaudio or ``mistral-common``) even when only audio is processed. For speech translation the
audio part of those processors is always the same three steps, which this class does with the
checkpoint's own feature extractor and tokenizer:

1. features: ``feature_extractor(audio, sampling_rate, padding=..., return_attention_mask=True)``,
   with the outputs renamed to the names the model's ``forward`` takes (``rename``);
2. placeholder expansion: each audio placeholder in the text (``audio_token``) becomes
   ``token_count(features)[i]`` copies, the number of encoder frames the model scatters there;
3. tokenization of the expanded text.

It answers the calls the engine makes (``__call__(text=..., audio=..., sampling_rate=...)``,
``tokenizer``, ``feature_extractor``, ``chat_template``, ``audio_token``, ``save_pretrained``), and a
family test checks its ids and features against the family's real processor logic. ``save_pretrained``
copies the processor files of the checkpoint it was loaded from (preprocessor, chat template, image and
video processor configs) after writing the tokenizer, so a pruned or exported model directory still
loads with the family's full ``AutoProcessor`` where its dependencies are installed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

# Files of a checkpoint directory that belong to its processor (copied by save_pretrained).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def read_chat_template(path: Path, tokenizer: Any) -> str | None:
    """The chat template a checkpoint directory ships: ``chat_template.jinja``, ``chat_template.json``
    (``{"chat_template": ...}``), else the tokenizer's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = path / "chat_template.json"
    if js.is_file():
        tpl = json.loads(js.read_text(encoding="utf-8")).get("chat_template")
        if tpl:
            return tpl
    return getattr(tokenizer, "chat_template", None)


class SpeechProcessor:
    def __init__(self, feature_extractor: Any, tokenizer: Any, *, audio_token: str,
                 token_count: Callable[[dict], Any], chat_template: str | None = None,
                 feature_kwargs: Mapping[str, Any] | None = None, rename: Mapping[str, str] | None = None,
                 source: str | Path | None = None):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.audio_token = audio_token
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_token)
        self.token_count = token_count
        self.chat_template = chat_template
        self.feature_kwargs = dict(feature_kwargs or {})
        self.rename = dict(rename or {})
        self.source = Path(source) if source is not None else None

    def apply_chat_template(self, messages: list, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def features(self, audio: list, sampling_rate: int) -> dict[str, Any]:
        out = self.feature_extractor(audio, sampling_rate=sampling_rate, return_attention_mask=True,
                                     return_tensors="pt", **self.feature_kwargs)
        return {self.rename.get(k, k): v for k, v in out.items()}

    def __call__(self, text: str | list[str], audio: list | None = None, sampling_rate: int | None = None,
                 return_tensors: str = "pt", padding: bool | str = True, add_special_tokens: bool = False,
                 **kwargs: Any) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        feats: dict[str, Any] = {}
        if audio is not None:
            waves = list(audio) if isinstance(audio, (list, tuple)) else [audio]
            feats = self.features(waves, int(sampling_rate or self.feature_extractor.sampling_rate))
            counts = [int(n) for n in self.token_count(feats)]
            placeholders = sum(t.count(self.audio_token) for t in texts)
            if placeholders != len(counts):
                raise ValueError(f"{placeholders} {self.audio_token} placeholders in the text but {len(counts)} "
                                 "audio clips")
            it = iter(counts)
            expanded = []
            for t in texts:
                parts = t.split(self.audio_token)
                out = parts[0]
                for p in parts[1:]:
                    out += self.audio_token * next(it) + p
                expanded.append(out)
            texts = expanded
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding,
                             add_special_tokens=add_special_tokens, **kwargs)
        result = dict(enc)
        result.update(feats)
        return result

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # the tokenizer first: it may write its own (text-only) chat template, which the processor's replaces
        self.tokenizer.save_pretrained(out)
        copied = set()
        if self.source is not None and self.source.resolve() != out.resolve():
            for name in PROCESSOR_FILES:
                if (self.source / name).is_file():
                    shutil.copyfile(self.source / name, out / name)
                    copied.add(name)
        if "preprocessor_config.json" not in copied:
            self.feature_extractor.save_pretrained(out)
        if self.chat_template and not ({"chat_template.jinja", "chat_template.json"} & copied):
            (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
