"""Skipping decoder layers without copying the model, and the module handles the scorers need.

Why a context manager instead of a pruned copy: a 7B model held twice does not fit next to its
activations, and a scan visits hundreds of candidate sets. :func:`without_layers` swaps the decoder's
``nn.ModuleList`` for one holding only the kept layers (the same modules, no weights copied), sets
``num_hidden_layers`` and ``layer_types`` of the decoder's config(s), and renumbers every
``self_attn.layer_idx`` 0..n-1, exactly what :func:`engine.models.surgery.drop_layers` does
permanently; so ``generate`` builds a KV cache of the right depth and indexes it correctly. On exit
(also on an exception) the original list, config values and ``layer_idx`` values come back.
Contexts nest: the inner one acts on the list the outer one installed.

:func:`without_audio_layers` does the same for the audio encoder's layer list (Qwen2-Audio:
``audio_tower.layers``) and its config's ``encoder_layers`` / ``stc_original_audio_layers``, as
:func:`engine.models.surgery.drop_layers` with ``audio_remove`` does permanently. The encoder runs
whatever its ``layers`` list holds (``encoder_layers`` is read only when the model is built, and
LayerDrop acts only in training), so the swapped list is all a forward sees; the config is set so
that anything reading it (a save, a meta-device size prediction) sees the model it is running.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

from torch import nn

from ..models import surgery

_CFG_KEYS = ("num_hidden_layers", "layer_types", "max_window_layers", surgery.ORIGINAL_KEY)
_MISSING = object()
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


def backbone(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layer list and runs it (``Qwen2Model`` for both Qwen2-Audio and
    Qwen2 LMs): called with ``inputs_embeds`` (B, T, H) it returns final-normed hidden states (B, T, H)."""
    layers = surgery.decoder_layers(model)
    for mod in model.modules():
        for child in mod.children():
            if child is layers:
                return mod
    raise surgery.SurgeryError(f"cannot find the module that owns the decoder layers of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm the backbone applies after its last layer (``Qwen2Model.norm``), or None if unknown."""
    bb = backbone(model)
    for name in _FINAL_NORMS:
        mod = getattr(bb, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def _decoder_configs(model: nn.Module) -> list[Any]:
    """Every config object whose per-layer fields the decoder reads (deduplicated by identity):
    the text config of the wrapper and the backbone's own config (the same object in transformers
    5, but a copy elsewhere)."""
    out: list[Any] = []
    for c in (surgery.text_config(model.config), getattr(backbone(model), "config", None)):
        if c is not None and all(c is not o for o in out):
            out.append(c)
    return out


def _restore(saved_cfg: list[tuple[Any, dict[str, Any]]], saved_idx: list[tuple[nn.Module, int]]) -> None:
    """Puts back config values (a key that was absent is removed again) and ``layer_idx`` values."""
    for c, vals in saved_cfg:
        for k, v in vals.items():
            if v is _MISSING:
                c.__dict__.pop(k, None)
            else:
                setattr(c, k, v)
    for m, idx in saved_idx:
        m.layer_idx = idx


def num_layers(model: nn.Module) -> int:
    return len(surgery.decoder_layers(model))


@contextlib.contextmanager
def without_layers(model: nn.Module, drop: Iterable[int]) -> Iterator[list[int]]:
    """Run ``model`` without the decoder layers at positions ``drop`` of its *current* layer list.

    Yields the kept positions. Dropping every layer is allowed (the backbone then only embeds and
    normalises), which the NLL scan needs for the suffix after the last layer.
    """
    layers = surgery.decoder_layers(model)
    n = len(layers)
    dropped = set(surgery.normalise_indices(drop, n))
    keep = [i for i in range(n) if i not in dropped]
    if not dropped:
        yield keep
        return
    configs = _decoder_configs(model)
    saved_cfg = [(c, {k: c.__dict__.get(k, _MISSING) for k in _CFG_KEYS}) for c in configs]
    top = model.config
    top_n = top.__dict__.get("num_hidden_layers", _MISSING) if all(top is not c for c in configs) else _MISSING
    saved_idx = [(m, m.layer_idx) for layer in layers for m in layer.modules() if hasattr(m, "layer_idx")]
    new = nn.ModuleList([layers[i] for i in keep])
    try:
        surgery._replace_list(model, layers, new)
        surgery._renumber(list(new))
        for c in configs:
            surgery._trim_config(c, keep, "num_hidden_layers", surgery.ORIGINAL_KEY)
        if top_n is not _MISSING:
            top.num_hidden_layers = len(keep)
        yield keep
    finally:
        # Restore in reverse order of change; each step is safe to run even if its forward step did not.
        if top_n is not _MISSING:
            top.num_hidden_layers = top_n
        _restore(saved_cfg, saved_idx)
        if surgery.decoder_layers(model) is new:
            surgery._replace_list(model, new, layers)


def audio_layer_list(model: nn.Module) -> nn.ModuleList:
    """The audio encoder's layer list; an :class:`engine.models.surgery.SurgeryError` naming the model
    class when it has none (a text-only LM)."""
    found = surgery.audio_layers(model)
    if found is None:
        raise surgery.SurgeryError(f"{type(model).__name__} has no audio encoder: only an audio-language model has "
                                   "audio layers to skip")
    return found


def num_audio_layers(model: nn.Module) -> int:
    return len(audio_layer_list(model))


def _audio_configs(model: nn.Module) -> tuple[list[Any], str]:
    """Every config object that counts the audio encoder's layers (deduplicated by identity: the
    wrapper's audio config and the encoder's own config, the same object in transformers 5), and the
    field that counts them."""
    layers = audio_layer_list(model)
    acfg, key = surgery.audio_config(model)
    owner = surgery.list_owner(model, layers)
    out: list[Any] = []
    for c in (acfg, getattr(owner, "config", None)):
        if c is not None and hasattr(c, key) and all(c is not o for o in out):
            out.append(c)
    return out, key


@contextlib.contextmanager
def without_audio_layers(model: nn.Module, drop: Iterable[int]) -> Iterator[list[int]]:
    """Run ``model`` without the audio-encoder layers at positions ``drop`` of its *current* audio
    layer list. Yields the kept positions; restores list, config values and ``layer_idx`` values on
    exit (also on an exception). Dropping every audio layer is refused, as
    :func:`engine.models.surgery.drop_layers` refuses it."""
    layers = audio_layer_list(model)
    n = len(layers)
    dropped = set(surgery.normalise_indices(drop, n, "audio layer"))
    keep = [i for i in range(n) if i not in dropped]
    if not dropped:
        yield keep
        return
    if not keep:
        raise surgery.SurgeryError("removing every audio-encoder layer leaves no encoder")
    configs, count_key = _audio_configs(model)
    keys = (count_key, "layer_types", "max_window_layers", surgery.ORIGINAL_AUDIO_KEY)
    saved_cfg = [(c, {k: c.__dict__.get(k, _MISSING) for k in keys}) for c in configs]
    saved_idx = [(m, m.layer_idx) for layer in layers for m in layer.modules() if hasattr(m, "layer_idx")]
    new = nn.ModuleList([layers[i] for i in keep])
    owner = surgery.list_owner(model, layers)
    try:
        surgery._replace_list(model, layers, new)
        surgery._renumber(list(new))   # as drop_layers does (the encoder keeps no cache: layer_idx is unused)
        for c in configs:
            surgery._trim_config(c, keep, count_key, surgery.ORIGINAL_AUDIO_KEY)
        surgery.set_cached_count(owner, count_key, n, len(keep))
        yield keep
    finally:
        surgery.set_cached_count(owner, count_key, len(keep), n)
        _restore(saved_cfg, saved_idx)
        if surgery.audio_layers(model) is new:
            surgery._replace_list(model, new, layers)


@contextlib.contextmanager
def replace_input(module: nn.Module, hidden: Any) -> Iterator[None]:
    """Feed ``hidden`` (B, T, H) to ``module`` in place of the hidden states it is called with.

    Why a hook rather than passing ``hidden`` as ``inputs_embeds``: the backbone still builds its
    causal mask and rotary embeddings from the call as usual, and a backbone that rescales its input
    embeddings (Gemma multiplies by sqrt(H)) cannot rescale a hidden state that is injected here.
    """
    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return args, kwargs

    h = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def first_arg(args: tuple, kwargs: dict) -> Any:
    """The hidden states a decoder layer (or norm) was called with."""
    return args[0] if args else kwargs["hidden_states"]


def first_out(out: Any) -> Any:
    """A decoder layer's output hidden states (transformers 5 returns a tensor, older versions a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out
