"""Decoder-only text LMs (``*ForCausalLM``: Qwen2/2.5, Llama, Mistral, Gemma, ...), loaded with
``AutoModelForCausalLM``: the catch-all family, matched last. Decoder layers are ``model.layers`` (GPT-2
style ``transformer.h`` and encoder-decoder style ``model.decoder.layers`` are looked up too); no audio
encoder; a tokenizer (with its chat template) instead of a processor."""
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


FAMILY = Family(
    kind="causal_lm",
    title="decoder-only text LMs",
    model_class="AutoModelForCausalLM",
    audio=False,
    decoder_paths=("model.layers", "transformer.h", "model.decoder.layers"),
    claims=_is_causal_lm,
)
