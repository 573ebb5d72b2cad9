"""Decoder-only text LMs (``*ForCausalLM``: Qwen2/2.5, Llama, Mistral, Gemma, ...), loaded with
``AutoModelForCausalLM``: the catch-all family, matched last. Decoder layers are ``model.layers`` (GPT-2
style ``transformer.h`` and encoder-decoder style ``model.decoder.layers`` are looked up too); no audio
encoder; a tokenizer (with its chat template) instead of a processor.

Logits: some causal LMs transform lm_head's output in their forward, and the engine's nll scorer and teacher
cache (which apply lm_head to label rows themselves) must do the same: ``final_logit_softcapping`` (Gemma 2 and
3: ``tanh(x / cap) * cap``), ``logits_scaling`` (Granite: ``x / s``) and ``logit_scale`` (Cohere: ``x * s``),
read from the text config; tested equal to the forward's logits on tiny models of those classes.
"""
from typing import Any, Callable

from . import Family


def _is_causal_lm(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return True
    mtype = cfg.get("model_type", "")
    if not archs and mtype:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return False


def make_tiny(tok: Any, text_config: dict, *, generation_config: Any = None, **_: Any) -> tuple[Any, Any]:
    """A random ``Qwen2ForCausalLM`` of the given text shape, and the tokenizer (with its chat template)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in text_config.items() if k != "model_type"}))
    if generation_config is not None:
        model.generation_config = generation_config
    return model, tok


def _logits_post(model: Any) -> Callable[[Any], Any] | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    div = getattr(cfg, "logits_scaling", None)
    mul = getattr(cfg, "logit_scale", None)
    steps: list[Callable[[Any], Any]] = []
    if isinstance(div, (int, float)) and div != 1:
        steps.append(lambda x: x / div)
    if isinstance(mul, (int, float)) and mul != 1:
        steps.append(lambda x: x * mul)
    if isinstance(cap, (int, float)) and cap > 0:
        import torch

        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def post(x: Any) -> Any:
        for f in steps:
            x = f(x)
        return x

    return post


FAMILY = Family(
    kind="causal_lm",
    title="decoder-only text LMs",
    model_class="AutoModelForCausalLM",
    audio=False,
    decoder_paths=("model.layers", "transformer.h", "model.decoder.layers"),
    claims=_is_causal_lm,
    logits_post=_logits_post,
    make_tiny=make_tiny,
)
