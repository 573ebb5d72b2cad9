"""Model families: the one place that knows what differs between the models the engine compresses.

A :class:`Family` says, for one family of checkpoints:

* how to recognise it from ``config.json`` (``model_type`` and ``architectures``; :func:`detect`);
* which transformers class loads it and whether a processor (audio) or a tokenizer (text) comes with it;
* where its decoder layers live (resolved through ``get_decoder()`` first, then the family's dotted paths,
  because the wrappers moved between transformers versions), where its audio encoder's layers live and
  which config field counts them;
* which module names are the audio encoder and the projector (storage accounting, LoRA's
  ``include_audio_tower``) and which processor outputs are the audio inputs of ``forward``.

Every other module asks this registry (by ``model.kind`` or by the loaded model's class) instead of
naming a family. Adding a family is one file here that builds a :class:`Family` and is listed in
:data:`_MODULES`. Nothing here imports torch or transformers at import time.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import StcError


class UnsupportedModel(StcError, ValueError):
    """A ``config.json`` no registered family recognises; the message lists the supported ones."""


@dataclass(frozen=True)
class Family:
    kind: str                                # model.kind value, also written to meta.json
    title: str                               # for messages and the README table
    model_class: str                         # transformers class that loads it (from_pretrained)
    audio: bool                              # takes audio (a processor with a feature extractor) or text only
    model_types: tuple[str, ...] = ()        # config.json model_type values it claims
    architectures: tuple[str, ...] = ()      # config.json architectures entries it claims
    decoder_paths: tuple[str, ...] = ("model.layers",)   # fallbacks when get_decoder() has no .layers
    audio_layer_paths: tuple[str, ...] = ()  # dotted paths of the audio encoder's layer list
    audio_config: str = ""                   # config attribute holding the audio encoder's config
    audio_layer_count: str = ""              # field of that config counting the encoder's layers
    encoder_modules: tuple[str, ...] = ()    # module-name components that are the audio encoder
    projector_modules: tuple[str, ...] = ()  # ... the audio -> text projector
    audio_inputs: tuple[str, ...] = ()       # processor outputs that forward() takes as audio inputs
    # config.json dict -> True for checkpoints of this family that model_types/architectures miss
    claims: Callable[[dict], bool] | None = field(default=None, compare=False)

    def matches(self, cfg: dict) -> bool:
        archs = cfg.get("architectures") or []
        if cfg.get("model_type", "") in self.model_types or any(a in self.architectures for a in archs):
            return True
        return bool(self.claims and self.claims(cfg))

    def model_cls(self) -> Any:
        import transformers

        return getattr(transformers, self.model_class)

    def audio_layer_count_of(self, cfg: dict) -> int | None:
        """The audio encoder's layer count from a ``config.json`` dict (None: no audio encoder)."""
        a = cfg.get(self.audio_config) if self.audio_config else None
        n = a.get(self.audio_layer_count) if isinstance(a, dict) else None
        return n if isinstance(n, int) and n > 0 else None


# Order matters: the first family whose matches() is true wins (specific families before the
# catch-all causal LM).
_MODULES = ("qwen2_audio", "causal_lm")
_REGISTRY: dict[str, Family] | None = None


def registry() -> dict[str, Family]:
    global _REGISTRY
    if _REGISTRY is None:
        fams = [importlib.import_module(f".{m}", __name__).FAMILY for m in _MODULES]
        _REGISTRY = {f.kind: f for f in fams}
    return _REGISTRY


def kinds() -> tuple[str, ...]:
    return tuple(registry())


def get(kind: str) -> Family:
    try:
        return registry()[kind]
    except KeyError:
        raise UnsupportedModel(f"model.kind={kind!r} is not a supported family; one of auto, "
                               f"{', '.join(kinds())}") from None


def supported() -> str:
    return "; ".join(f"{f.title} ({f.model_class})" for f in registry().values())


# Families recognised but refused, with the reason (checked before the registry: Phi-4-multimodal's
# architecture ends in ForCausalLM, and the catch-all would load it as a text LM without its audio).
REFUSED = {
    "phi4_multimodal": "Phi-4-multimodal has no adapter yet (its speech LoRA must be merged before pruning)",
    "granite_speech": "Granite Speech has no adapter yet (its audio LoRA must be merged before pruning)",
    "voxtral": "Voxtral has no adapter yet",
    "qwen2_5_omni": "the Qwen2.5-Omni thinker has no adapter yet (the talker is out of scope)",
    "qwen2_5_omni_thinker": "the Qwen2.5-Omni thinker has no adapter yet",
    "gemma3n": "Gemma 3n keeps per-layer embeddings and shares KV caches between layers: removing a layer "
               "needs surgery on both, which the engine does not do",
    "qwen3_omni_moe": "Qwen3-Omni is a mixture of experts with per-layer expert maps (mlp_only_layers, "
                      "decoder_sparse_step) and a talker that reads a fixed thinker layer: layer removal would "
                      "have to remap all three",
}


def detect(cfg: dict, where: str = "config.json") -> Family:
    """The family of a ``config.json`` dict, else :class:`UnsupportedModel` naming the supported ones."""
    mtype = cfg.get("model_type", "")
    if mtype in REFUSED:
        raise UnsupportedModel(f"{where}: model_type {mtype!r}: {REFUSED[mtype]}; supported: {supported()}")
    for fam in registry().values():
        if fam.matches(cfg):
            return fam
    raise UnsupportedModel(f"{where}: model_type {cfg.get('model_type', '')!r} / architectures "
                           f"{cfg.get('architectures') or []} is not a family stc-engine supports; supported: "
                           f"{supported()}")


def of_model(model: Any) -> Family | None:
    """The family of a loaded model, by its class (peft wrappers unwrapped), or None."""
    base = model
    for _ in range(3):   # PeftModel -> LoraModel -> the transformers model
        inner = getattr(base, "base_model", None)
        if inner is None or inner is base or not hasattr(base, "peft_config"):
            break
        base = getattr(inner, "model", inner)
    name = type(base).__name__
    for fam in registry().values():
        if fam.model_class == name:
            return fam
    cfg = getattr(base, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        try:
            return detect(cfg.to_dict())
        except UnsupportedModel:
            return None
    return None


def encoder_modules() -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for f in registry().values() for m in f.encoder_modules))


def projector_modules() -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for f in registry().values() for m in f.projector_modules))


def decoder_paths() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for f in registry().values() for p in f.decoder_paths))


def audio_layer_paths() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for f in registry().values() for p in f.audio_layer_paths))
