"""Parameter counts (logical, trainable, as stored) and on-disk size of a model.

Counting rule, per parameter (tied weights counted once):

* ``total`` is the *logical* count: a 4-bit ``Params4bit`` of an ``out x in`` linear counts
  ``out * in`` (its ``quant_state.shape``), not its packed element count.
* ``stored`` is the count *as stored*, in the unit the paper uses: bitsandbytes packs two 4-bit values
  per byte, and the paper's "4.12B parameters counted as stored" for the 4-bit student counts one per
  packed byte. So a 4-bit weight counts ``nbytes`` of its packed tensor (= ``out * in / 2``), whatever
  dtype holds the bytes (with ``bnb_4bit_quant_storage=bf16`` the tensor has ``out * in / 4``
  elements of 2 bytes: still ``out * in / 2``). Everything else counts its ``numel``.
  Quantization constants (absmax etc.) are not parameters and are not counted here.
* ``stored_bytes``: bytes of all parameters as held, plus the quantization state a 4-bit layer saves
  with it (absmax, nested absmax, quant maps: what ``save_pretrained`` writes next to the weight).
* ``trainable``: parameters with ``requires_grad`` (after :func:`engine.models.load.apply_lora`, only
  the adapters); ``trainable_share`` = trainable / total, the way peft reports "trainable%".

For Qwen2-Audio-7B (measured on the real architecture, see tests): 8,397,094,912 total; with 24 of 32
decoder layers, nf4 on all linears except ``lm_head``: 6,777,929,728 total, 4,032,233,472 stored
(the paper reports ~4.12B; the 2% gap is what the paper does not specify: e.g. counting the
167M LoRA parameters of the same model would give 4.20B).

``param_counts(model, as_nf4=True)`` predicts the nf4 figures for an unquantized (or meta-device)
model by counting each linear that :func:`engine.models.load.load_model` would quantize as packed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

# Per 4-bit layer overhead besides absmax (see _nf4_state_bytes): the 16-entry nf4 code in fp32 and
# the small packed JSON bitsandbytes saves (quant type, shape, dtype, blocksize), ~170 bytes.
_NF4_CODE_BYTES = 16 * 4
_NF4_JSON_BYTES = 171
_BLOCK = 64          # bitsandbytes 4-bit block size (values per absmax)
_NESTED_BLOCK = 256  # double quant: absmax values per fp32 second-level scale


def _is_4bit(p: Any) -> bool:
    return type(p).__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None


def _quant_state_bytes(p: Any) -> int:
    try:
        items = p.quant_state.as_dict(packed=True).values()
    except Exception:  # an older/newer bitsandbytes layout: count the tensors we know of
        qs = p.quant_state
        items = [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if getattr(qs, "nested", False) else [])
    return sum(t.numel() * t.element_size() for t in items if hasattr(t, "element_size"))


def _nf4_state_bytes(numel: int, double_quant: bool) -> int:
    """Predicted quantization-state bytes of one nf4 weight with ``numel`` values."""
    blocks = math.ceil(numel / _BLOCK)
    if double_quant:  # absmax re-quantized to uint8 + one fp32 scale per 256 blocks + fp32 code map
        absmax = blocks + 4 * math.ceil(blocks / _NESTED_BLOCK) + 256 * 4 + 4
    else:
        absmax = 4 * blocks
    return absmax + _NF4_CODE_BYTES + _NF4_JSON_BYTES


def _nf4_candidates(model: Any) -> set[int]:
    """ids of the weights load_model would quantize: every nn.Linear weight except the output embedding."""
    import torch

    get = getattr(model, "get_output_embeddings", None)
    out = get() if get is not None else None
    return {id(m.weight) for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m is not out and m.weight is not None}


def param_counts(model: Any, *, as_nf4: bool = False, double_quant: bool = True) -> dict[str, Any]:
    """``{"total", "trainable", "stored", "stored_bytes", "trainable_share"}`` (see module doc).

    ``as_nf4``: count an unquantized model as if loaded with ``quant="nf4"`` (stored and
    stored_bytes predicted; bytes of the other parameters taken as they are held now).
    """
    total = trainable = stored = stored_bytes = 0
    nf4 = _nf4_candidates(model) if as_nf4 else set()
    for _, p in model.named_parameters():  # de-duplicates tied parameters
        if _is_4bit(p):
            logical = math.prod(p.quant_state.shape)
            packed = p.numel() * p.element_size()
            total += logical
            stored += packed
            stored_bytes += packed + _quant_state_bytes(p)
        elif id(p) in nf4:
            n = p.numel()
            total += n
            stored += (n + 1) // 2
            stored_bytes += (n + 1) // 2 + _nf4_state_bytes(n, double_quant)
        else:
            n = p.numel()
            total += n
            stored += n
            stored_bytes += n * p.element_size()
        if p.requires_grad:
            trainable += math.prod(p.quant_state.shape) if _is_4bit(p) else p.numel()
    return {"total": total, "trainable": trainable, "stored": stored, "stored_bytes": stored_bytes,
            "trainable_share": trainable / total if total else 0.0}


def storage_bytes(model_dir: str | os.PathLike) -> int:
    """Sum of the sizes of ``*.safetensors`` files directly in ``model_dir`` (the paper's storage rule:
    tokenizer, config and ``.bin`` files are not counted). 0 when there are none."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory")
    return sum(p.stat().st_size for p in d.glob("*.safetensors") if p.is_file())


def meta_model(config: Any, kind: str, trust_remote_code: bool = False) -> Any:
    """The model class for ``kind`` built from ``config`` on the meta device: shapes, no memory."""
    import torch

    from . import families

    fam = families.get(kind)
    cls = fam.model_cls()
    config = fam.own_config(config)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):   # Auto classes
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls._from_config(config)


def meta_param_counts(mc: Any, mode: str, lora: Any) -> tuple[int, int, Any]:
    """``(all parameters, trainable parameters, text config)`` of the model at ``mc.path`` as the trainer
    builds it (``mode`` full/lora/qlora), counted on the meta device from ``config.json`` alone: no
    weights are read or allocated, so a config-only directory is enough (plans are validated this way,
    and the ZeRO stage must be known before loading, because ZeRO-3 loads partitioned)."""
    from transformers import AutoConfig

    from .load import apply_lora, detect_kind

    from . import families

    kind = detect_kind(mc.path)
    config = families.get(kind).own_config(
        AutoConfig.from_pretrained(mc.path, local_files_only=True, trust_remote_code=mc.trust_remote_code))
    model = meta_model(config, kind, mc.trust_remote_code)
    if mode in ("lora", "qlora"):
        model = apply_lora(model, lora)
    n_all = sum(p.numel() for p in model.parameters())
    # full: every parameter (the trainer unfreezes what a fresh module starts frozen)
    n_train = n_all if mode == "full" else sum(p.numel() for p in model.parameters() if p.requires_grad)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return n_all, n_train, text_cfg
