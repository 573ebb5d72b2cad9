"""Models: local loading (bf16 / nf4), LoRA, parameter counts, tiny test models.

Submodules import torch/transformers lazily, so ``import engine.models`` stays cheap for the CLI;
the names below resolve on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelLoadError": "load", "load_model": "load", "load_processor": "load", "detect_kind": "load",
    "check_model_dir": "load", "apply_lora": "load", "lora_targets": "load", "bnb_cpu_workaround": "load",
    "is_quantized": "load", "is_peft": "load",
    "param_counts": "counts", "storage_bytes": "counts",
    "build_bpe_tokenizer": "tiny", "build_qwen_tokenizer": "tiny", "build_tiny": "tiny", "make_tiny": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
