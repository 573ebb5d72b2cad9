"""Layer surgery: remove decoder (and optionally audio-encoder) layers and save a model that reloads
with plain ``transformers``.

What has to change for a pruned model to stay correct (public trackers are full of the failures):

* the ``nn.ModuleList`` of layers is rebuilt with the kept layers only;
* ``num_hidden_layers`` is set, per-layer config lists (``layer_types``) are trimmed and
  ``max_window_layers`` (Qwen2's "first N layers use full attention" rule) is recomputed, otherwise a
  reload builds a different number of layers or switches their attention type;
* every ``self_attn.layer_idx`` is renumbered 0..n-1: the KV cache is indexed by it, so a stale index
  makes ``generate`` fail (IndexError) or read another layer's cache;
* the original index of each kept layer is recorded in the config (``stc_original_layers``), composed
  across repeated prunes, so reports and later stages can always name layers by their original number.

Pruning a LoRA-wrapped or 4-bit model is refused: prune the bf16 model, then quantise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..errors import StcError
from . import families

ORIGINAL_KEY = "stc_original_layers"
ORIGINAL_AUDIO_KEY = "stc_original_audio_layers"


class SurgeryError(StcError, ValueError):
    pass


def _refuse_wrapped(model: nn.Module) -> None:
    try:
        from peft import PeftModel
        if isinstance(model, PeftModel):
            raise SurgeryError("refusing to prune a LoRA/PEFT-wrapped model: prune the base (bf16) model, "
                               "then add adapters (merge them first with merge_and_unload() if trained)")
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    if any("lora_" in n for n, _ in model.named_modules()):
        raise SurgeryError("refusing to prune a model with LoRA layers: merge or remove the adapters first")
    qc = getattr(model.config, "quantization_config", None)
    four_bit = any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    if qc is not None or four_bit or getattr(model, "is_loaded_in_4bit", False):
        raise SurgeryError("refusing to prune a quantised (4-bit/8-bit) model: prune the bf16 model, then quantise "
                           "(stc export quant=nf4)")


def text_config(config: Any) -> Any:
    """The decoder's config: ``config.text_config`` for audio-language models, else the config itself."""
    return getattr(config, "text_config", None) or config


def _layer_list(model: nn.Module, paths: tuple[str, ...]) -> nn.ModuleList | None:
    """The first ``nn.ModuleList`` found at one of the dotted ``paths`` (None when none matches)."""
    for path in paths:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list: ``model.get_decoder().layers`` when the model exposes it (peft wrappers
    pass it through), else the first of the registered families' paths (:mod:`engine.models.families`)."""
    get = getattr(model, "get_decoder", None)
    try:
        dec = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        dec = None
    found = getattr(dec, "layers", None) if dec is not None else None
    if isinstance(found, nn.ModuleList) and len(found) > 0:
        return found
    found = _layer_list(model, families.decoder_paths())
    if found is None:
        raise SurgeryError(f"cannot find the decoder layers of {type(model).__name__}; supported: "
                           f"{families.supported()}")
    return found


def audio_layers(model: nn.Module) -> nn.ModuleList | None:
    """The audio encoder's layer list (None for a model without one)."""
    fam = families.of_model(model)
    paths = fam.audio_layer_paths if fam is not None and fam.audio_layer_paths else families.audio_layer_paths()
    return _layer_list(model, paths)


def audio_config(model: nn.Module) -> tuple[Any, str]:
    """(config object, field) that counts the audio encoder's layers of a loaded model."""
    fam = families.of_model(model)
    if fam is None or not fam.audio_config:
        raise SurgeryError(f"{type(model).__name__} has no audio encoder config; audio families: "
                           f"{', '.join(f.title for f in families.registry().values() if f.audio)}")
    return getattr(model.config, fam.audio_config), fam.audio_layer_count


def normalise_indices(indices: Iterable[int], n: int, what: str = "layer") -> list[int]:
    """Negative indices count from the end; out-of-range or duplicate indices are errors."""
    out = []
    for i in indices:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise SurgeryError(f"{what} {i} does not exist (the model has {n} {what}s: 0..{n - 1})")
        if j in out:
            raise SurgeryError(f"{what} {i} given twice")
        out.append(j)
    return out


def _renumber(layers: Sequence[nn.Module]) -> None:
    for new_idx, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx


def _trim_config(cfg: Any, keep: list[int], count_key: str, original_key: str) -> None:
    old_n = getattr(cfg, count_key)
    prior = getattr(cfg, original_key, None) or list(range(old_n))
    setattr(cfg, original_key, [prior[i] for i in keep])
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == old_n:
        cfg.layer_types = [layer_types[i] for i in keep]
    mwl = getattr(cfg, "max_window_layers", None)
    if isinstance(mwl, int):
        cfg.max_window_layers = sum(1 for i in keep if i < mwl)
    setattr(cfg, count_key, len(keep))


def drop_layers(model: nn.Module, remove: Iterable[int], audio_remove: Iterable[int] = ()) -> list[int]:
    """Remove decoder layers ``remove`` (current indices) in place; returns the kept original indices.

    ``audio_remove`` removes audio-encoder layers the same way (the paper found pruning both worse;
    it is an option for experiments).
    """
    _refuse_wrapped(model)
    layers = decoder_layers(model)
    n = len(layers)
    drop = set(normalise_indices(remove, n))
    keep = [i for i in range(n) if i not in drop]
    if not keep:
        raise SurgeryError(f"removing all {n} decoder layers leaves no model")
    tcfg = text_config(model.config)
    if getattr(tcfg, "num_hidden_layers", n) != n:
        raise SurgeryError(f"config says {tcfg.num_hidden_layers} decoder layers but the model has {n}")
    kept_layers = [layers[i] for i in keep]
    _renumber(kept_layers)
    _replace_list(model, layers, nn.ModuleList(kept_layers))
    _trim_config(tcfg, keep, "num_hidden_layers", ORIGINAL_KEY)
    if tcfg is not model.config and "num_hidden_layers" in vars(model.config):
        model.config.num_hidden_layers = len(keep)

    audio_remove = list(audio_remove)
    if audio_remove:
        alayers = audio_layers(model)
        if alayers is None:
            raise SurgeryError("audio-encoder layers were asked to be removed but the model has no audio tower")
        an = len(alayers)
        adrop = set(normalise_indices(audio_remove, an, "audio layer"))
        akeep = [i for i in range(an) if i not in adrop]
        if not akeep:
            raise SurgeryError("removing every audio-encoder layer leaves no encoder")
        kept_a = [alayers[i] for i in akeep]
        _renumber(kept_a)
        owner = list_owner(model, alayers)
        _replace_list(model, alayers, nn.ModuleList(kept_a))
        acfg, count_key = audio_config(model)
        _trim_config(acfg, akeep, count_key, ORIGINAL_AUDIO_KEY)
        set_cached_count(owner, count_key, an, len(akeep))
    return list(getattr(tcfg, ORIGINAL_KEY))


def list_owner(model: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    """The module that holds ``layers`` as a child."""
    return next((m for m in model.modules() if any(c is layers for c in m.children())), None)


def set_cached_count(owner: nn.Module | None, count_key: str, old: int, new: int) -> None:
    """An encoder that caches its layer count in an attribute named like its config field (Granite Speech's CTC
    encoder: ``num_layers``, which places its mid-stack branch) gets the new count too; the config alone would
    leave the module running with the old one."""
    if owner is not None and isinstance(getattr(owner, count_key, None), int) \
            and not isinstance(getattr(owner, count_key), bool) and getattr(owner, count_key) == old:
        setattr(owner, count_key, new)


def _replace_list(model: nn.Module, old: nn.ModuleList, new: nn.ModuleList) -> None:
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if child is old:
                setattr(mod, child_name, new)
                return
    raise SurgeryError("internal: layer list not found in the module tree")


def save_pruned(model: nn.Module, out_dir: str | Path, processor: Any = None) -> Path:
    """Save as safetensors (plus the processor/tokenizer) so plain ``from_pretrained`` reloads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(out)
    return out

