"""Model families: the one place that knows what differs between the models the engine compresses.

A :class:`Family` says, for one family of checkpoints:

* how to recognise it from ``config.json`` (``model_type`` and ``architectures``; :func:`detect`);
* which transformers class loads it and whether a processor (audio) or a tokenizer (text) comes with it;
* where its decoder layers live (resolved through ``get_decoder()`` first, then the family's dotted paths,
  because the wrappers moved between transformers versions), where its audio encoder's layers live and
  which config field counts them;
* which module names are the audio encoder and the projector (storage accounting, LoRA's
  ``include_audio_tower``) and which processor outputs are the audio inputs of ``forward``;
* which transformers releases cannot run it (``transformers_broken``): a checkpoint of the family is refused under
  such a release when it is detected (loading, and the plan's validation before any step runs), naming the reason
  and the release to install. Only these per-family refusals exist: the engine itself runs on every admitted
  release.

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
    # dotted path of the module whose output is the decoder's input embeddings, for a family whose backbone
    # merges audio into the embeddings itself (Phi-4-multimodal: model.embed_tokens_extend); "" when the
    # backbone is called with inputs_embeds
    embeds_module: str = ""
    # module-name components speech translation never runs (an omni model's vision tower): LoRA leaves them out
    unused_modules: tuple[str, ...] = ()
    # config.json key that holds this model's own config when the checkpoint wraps it in a larger one
    # (the full Qwen2.5-Omni checkpoint: "thinker_config"; its talker is not loaded)
    wrapped_in: str = ""
    # local dir -> processor, for families whose transformers processor needs more than audio work does
    # (None: AutoProcessor for audio families, AutoTokenizer for text LMs)
    processor: Callable[[Any], Any] | None = field(default=None, compare=False)
    # (tokenizer, text config dict, generation_config=, **audio shape) -> (model, processor): a tiny random
    # model of the family's own classes, for tests and demos (engine.models.tiny.build_tiny)
    make_tiny: Callable[..., tuple[Any, Any]] | None = field(default=None, compare=False)
    # (model, local dir) -> model, run by load_model right after from_pretrained: what must happen before the
    # engine may use or prune it (merging an audio LoRA the checkpoint ships beside its weights)
    prepare: Callable[[Any, Any], Any] | None = field(default=None, compare=False)
    # config.json dict -> True for checkpoints of this family that model_types/architectures miss
    claims: Callable[[dict], bool] | None = field(default=None, compare=False)
    # loaded model -> the function its forward applies to lm_head's output (Gemma 2's soft-capping, Granite's
    # logits_scaling), or None when forward returns lm_head's output as is; for code that applies lm_head itself
    logits_post: Callable[[Any], Callable[[Any], Any] | None] | None = field(default=None, compare=False)
    # decoder tokens per second of audio, for memory estimates (0: Whisper features pooled by 4, 25 per second, with
    # the exact conv arithmetic); audio_chunked: the processor pads audio to whole windows of the encoder
    # (max_source_positions x 2 mel frames, 30 s on the hub) and every window counts in full
    audio_tokens_per_s: float = 0.0
    audio_chunked: bool = False
    # (specifier, reason) pairs: transformers releases that cannot run this family (check_transformers)
    transformers_broken: tuple[tuple[str, str], ...] = ()

    def check_transformers(self, version: str | None = None, where: str = "") -> None:
        """Raise :class:`UnsupportedModel` when the installed (or the given) transformers release cannot run this
        family, naming the reason and the tested release to install."""
        if not self.transformers_broken:
            return
        from packaging.specifiers import SpecifierSet

        from ... import compat

        if version is None:
            import transformers

            version = transformers.__version__
        for spec, reason in self.transformers_broken:
            if SpecifierSet(spec).contains(version, prereleases=True):
                newest = compat.TESTED["transformers"][1]
                raise UnsupportedModel(f"{where + ': ' if where else ''}{self.title} does not work with transformers "
                                       f"{version}: {reason}; install the tested release: "
                                       f"pip install 'transformers=={newest}'")

    def matches(self, cfg: dict) -> bool:
        archs = cfg.get("architectures") or []
        if cfg.get("model_type", "") in self.model_types or any(a in self.architectures for a in archs):
            return True
        return bool(self.claims and self.claims(cfg))

    def model_cls(self) -> Any:
        import transformers

        return getattr(transformers, self.model_class)

    def own_config(self, cfg: Any) -> Any:
        """The config the family's model class takes: ``cfg`` itself, or its ``wrapped_in`` part (a
        ``config.json`` dict or a transformers config object)."""
        if not self.wrapped_in:
            return cfg
        inner = cfg.get(self.wrapped_in) if isinstance(cfg, dict) else getattr(cfg, self.wrapped_in, None)
        return cfg if inner is None else inner

    def audio_layer_count_of(self, cfg: dict) -> int | None:
        """The audio encoder's layer count from a ``config.json`` dict (None: no audio encoder)."""
        cfg = self.own_config(cfg)
        a = cfg.get(self.audio_config) if self.audio_config else None
        n = a.get(self.audio_layer_count) if isinstance(a, dict) else None
        return n if isinstance(n, int) and n > 0 else None


# Order matters: the first family whose matches() is true wins (specific families before the
# catch-all causal LM).
_MODULES = ("qwen2_audio", "qwen2_5_omni", "phi4_multimodal", "granite_speech", "voxtral", "causal_lm")
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


def head_fn(model: Any, head: Callable[[Any], Any] | None = None) -> Callable[[Any], Any]:
    """``head`` (default: the model's lm_head) followed by what the model's own forward does to its output, so
    logits computed from hidden states equal the forward's (the nll scorer and the teacher cache apply the head
    to selected rows only)."""
    head = head if head is not None else model.get_output_embeddings()
    fam = of_model(model)
    post = fam.logits_post(model) if fam is not None and fam.logits_post is not None else None
    if post is None:
        return head
    return lambda x: post(head(x))


def encoder_modules() -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for f in registry().values() for m in f.encoder_modules))


def audio_input_keys() -> tuple[str, ...]:
    """Every registered family's audio inputs of ``forward`` (a batch passes those it has to the model)."""
    return tuple(dict.fromkeys(k for f in registry().values() for k in f.audio_inputs))


def unused_modules() -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for f in registry().values() for m in f.unused_modules))


def projector_modules() -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for f in registry().values() for m in f.projector_modules))


def decoder_paths() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for f in registry().values() for p in f.decoder_paths))


def audio_layer_paths() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for f in registry().values() for p in f.audio_layer_paths))


def model_config_dict(cfg: dict) -> dict:
    """The part of a ``config.json`` dict the loaded model is built from (a wrapped checkpoint's inner config,
    e.g. the full Qwen2.5-Omni's ``thinker_config``), else the dict itself."""
    for fam in registry().values():
        if fam.wrapped_in and isinstance(cfg.get(fam.wrapped_in), dict):
            return cfg[fam.wrapped_in]
    return cfg


def text_config_dict(cfg: dict) -> dict:
    """The decoder's config of a ``config.json`` dict: ``text_config`` of the model's config, else that config
    (flat text LMs)."""
    inner = model_config_dict(cfg)
    return inner.get("text_config") or inner
