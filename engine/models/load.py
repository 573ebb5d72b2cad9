"""Load local Hugging Face checkpoints (bf16/fp16/fp32 or nf4) and attach (rs)LoRA adapters.

Rules:

* **Local only.** ``model.path`` must be a directory with ``config.json`` and weights
  (``*.safetensors`` or ``*.bin``); otherwise :class:`ModelLoadError` says which path and what to do.
  ``local_files_only=True`` is always passed, so nothing ever reaches a model hub.
* **nf4** (the paper's QLoRA student): ``BitsAndBytesConfig(load_in_4bit, nf4, double quant,
  compute dtype = model.dtype, quant storage = compute dtype)``. Storing the packed 4-bit data in a
  2-byte dtype (4 values per element) lets FSDP/ZeRO-3 shard it like any bf16 tensor later; the byte
  count is the same as with uint8 storage. What is quantized: every ``nn.Linear`` of the model,
  i.e. the audio tower's attention and MLP linears, the audio->text projector and the decoder's
  linears (the paper quantizes "all linear layers"), *except* ``lm_head``: transformers keeps the
  output embedding in the compute dtype (quantizing it costs quality and peft's "all-linear" skips
  it as well). Convolutions, embeddings and norms are not linears and stay in the compute dtype.
* **bitsandbytes 0.50.2 on CPU**: see :func:`bnb_cpu_workaround`; it touches only 4-bit layers whose
  weights are on the CPU. On CUDA, nf4 layers run bitsandbytes' CUDA kernels unchanged.
* **Device.** A CUDA target without an index (``"cuda"``) means this rank's GPU
  (:func:`rank_cuda_device`: the current device, which the rank session sets to the rank's local GPU), and the
  weights go there as ``device_map={"": "cuda:N"}``; never ``device_map="auto"``, which would spread one
  rank's model over the GPUs of its neighbours on the same node.
* **Attention** (:func:`choose_attn`): ``model.attn_implementation`` empty or ``auto`` picks
  ``flash_attention_2`` when the ``flash_attn`` package imports, the model runs on CUDA and the dtype
  is bf16/fp16, else ``sdpa``; one log line says which and why. An explicit value is used as given; if
  transformers refuses it (package missing, unsupported model) the load falls back to ``sdpa`` for an
  automatic choice and to ``eager`` for an explicit one.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from .. import compat
from ..config import LoraConfig, ModelConfig
from ..errors import StcError
from . import families

log = logging.getLogger("stc")

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_KNOWN_ATTN = ("eager", "sdpa", "flash_attention", "flex_attention", "paged")


class ModelLoadError(StcError):
    """A model directory that cannot be loaded; the message names the path and the fix."""


# --------------------------------------------------------------------------------------------------
# Directory checks and kind detection
# --------------------------------------------------------------------------------------------------

def _fetch_hint(p: Path) -> str:
    return ("stc-engine never downloads models: copy a Hugging Face checkpoint there first "
            f"(e.g. on a machine with internet `huggingface-cli download Qwen/Qwen2-Audio-7B-Instruct "
            f"--local-dir {p}`), or set model.path=<local dir>")


def check_model_dir(path: str | os.PathLike) -> Path:
    """The directory as a ``Path`` if it holds ``config.json`` and weights, else :class:`ModelLoadError`."""
    if path is None or str(path).strip() == "":
        raise ModelLoadError("model.path is empty; set model.path=<local Hugging Face model directory>")
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model directory {p} does not exist; {_fetch_hint(p)}")
    if not p.is_dir():
        raise ModelLoadError(f"model path {p} is a file, not a directory; point model.path at the "
                             "directory that holds config.json and the weights")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p} has no config.json, so it is not a Hugging Face model directory; "
                             f"{_fetch_hint(p)}")
    weights = [q for q in p.iterdir() if q.is_file() and (q.suffix in (".safetensors", ".bin")
                                                         and not q.name.startswith("adapter_"))]
    if not weights:
        extra = (" (it holds a LoRA adapter only: load its base model and the adapter, or export a merged model)"
                 if (p / "adapter_config.json").exists() else "")
        raise ModelLoadError(f"{p} has config.json but no weights (*.safetensors or *.bin){extra}; "
                             "an interrupted download or save leaves this state: copy the weight files "
                             "again or re-run the stage that writes this directory")
    return p


def _read_config(p: Path) -> dict:
    try:
        with open(p / "config.json", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{p / 'config.json'} is not valid JSON ({e.msg} at line {e.lineno})") from None


def detect_family(path: str | os.PathLike) -> families.Family:
    """The model family (:mod:`engine.models.families`) of the checkpoint at ``path``, from its
    ``config.json``'s ``model_type`` / ``architectures``; an unsupported one names the supported ones, and a family
    the installed transformers cannot run names the reason (``Family.transformers_broken``)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model directory {p} does not exist; {_fetch_hint(p)}")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p} has no config.json; cannot tell what model it holds")
    try:
        fam = families.detect(_read_config(p), str(p))
        fam.check_transformers(where=str(p))
    except families.UnsupportedModel as e:
        raise ModelLoadError(str(e)) from None
    return fam


def detect_kind(path: str | os.PathLike) -> str:
    """The family's ``model.kind`` (``"qwen2audio"``, ``"causal_lm"``, ...) of the checkpoint at ``path``."""
    return detect_family(path).kind


def load_processor(path: str | os.PathLike) -> Any:
    """``AutoProcessor`` (feature extractor + tokenizer + chat template) for audio models, the tokenizer
    for text LMs. Local files only."""
    p = Path(path).expanduser()
    fam = detect_family(p)
    try:
        if fam.processor is not None:
            return fam.processor(p)
        if fam.audio:
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(p, local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{p}: cannot load the {'processor' if fam.audio else 'tokenizer'} "
                             f"({e}); the directory needs tokenizer.json/tokenizer_config.json"
                             f"{' and preprocessor_config.json' if fam.audio else ''}") from e


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def torch_dtype(name: str) -> Any:
    import torch

    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return getattr(torch, _DTYPES[name])


def nf4_config(dtype: Any, double_quant: bool = True) -> Any:
    """The QLoRA quantization config (see module doc)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def export_quant_config(dtype: Any, quant: str, skip_modules: list[str], double_quant: bool = True) -> Any:
    """The bitsandbytes config an export stores with: ``nf4`` as :func:`nf4_config`, or ``int8``
    (LLM.int8), converting every linear except the modules named in ``skip_modules`` (run-time module
    names, see :func:`engine.models.storage.skip_modules`). The list is saved in ``config.json``, so a
    plain ``from_pretrained`` rebuilds the same layout."""
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        c = nf4_config(dtype, double_quant)
        c.llm_int8_skip_modules = list(skip_modules)
        return c
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    raise ValueError(f"export quantization must be nf4 or int8, got {quant!r}")


def rank_cuda_device() -> Any:
    """This rank's GPU: the current CUDA device, which the engine's distributed layer sets to the rank's
    local GPU when the rank session starts (:func:`engine.dist.init`; models know nothing of ranks)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device())


def resolve_device(device: Any) -> Any:
    """``device`` as a ``torch.device``; a CUDA device without an index becomes :func:`rank_cuda_device`.
    Placement strategies (``"auto"``, ``"balanced"``, ...) are refused: one rank, one device."""
    import torch

    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"device {device!r} is not a device; stc-engine places a rank's whole model on "
                             "one device (cpu, cuda or cuda:N), never spread by device_map strategies") from None
    if d.type == "cuda" and d.index is None:
        d = rank_cuda_device()
    return d


def device_map(device: Any) -> dict[str, str] | None:
    """The ``from_pretrained`` ``device_map`` that puts every weight on ``device`` (None: leave on CPU)."""
    d = resolve_device(device)
    return None if d is None else {"": str(d)}


def _default_device(quantized: bool) -> Any:
    import torch

    if not quantized:
        return None  # leave on CPU: the trainer (or DeepSpeed) places it
    if torch.cuda.is_available():
        return rank_cuda_device()
    return torch.device("cpu")


ATTN_AUTO = ("", "auto")


def flash_attn_importable() -> tuple[bool, str]:
    """Whether the ``flash_attn`` package imports here, and a short reason."""
    try:
        import flash_attn
    except Exception as e:  # ImportError, or a wheel built for another torch/CUDA (undefined symbols)
        first = (str(e).splitlines() or [""])[0][:100]
        return False, f"flash_attn does not import ({type(e).__name__}{': ' + first if first else ''})"
    return True, f"flash_attn {getattr(flash_attn, '__version__', '?')} imports"


def choose_attn(requested: str, device_type: str, dtype: str) -> tuple[str, str]:
    """(attention implementation, why) for a model that runs on ``device_type`` in ``dtype``
    (``bf16``/``fp16``/``fp32``); see the module doc. ``flash_attn`` is only imported when the device
    and dtype could use it."""
    req = (requested or "").strip()
    if req.lower() not in ATTN_AUTO:
        return req, "set by model.attn_implementation"
    if device_type != "cuda":
        return "sdpa", f"auto: the model runs on {device_type}; flash-attention needs CUDA"
    if dtype not in ("bf16", "fp16"):
        return "sdpa", f"auto: dtype {dtype}; flash-attention needs bf16 or fp16"
    ok, why = flash_attn_importable()
    return ("flash_attention_2" if ok else "sdpa"), f"auto: CUDA, {dtype}, {why}"


def _run_device_type(run_device: Any, device: Any) -> str:
    import torch

    for d in (run_device, device):
        if d is not None:
            return torch.device(d).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(cfg: ModelConfig, *, device: Any = None, for_training: bool = False,
               run_device: Any = None, quantization: Any = None) -> Any:
    """Load ``cfg.path`` as configured; returns the transformers model.

    ``device``: where to put the weights (``None``: CPU for unquantized models, left to the caller;
    this rank's CUDA device, else CPU, for nf4, which bitsandbytes quantizes while loading; ``"cuda"``:
    this rank's GPU). ``run_device``: where the model will run when the caller loads it on the CPU and
    moves it later (decides the automatic attention; default ``device``, else CUDA when available).
    ``for_training``: ``model.train()`` and ``use_cache=False``; otherwise ``model.eval()``.
    ``quantization``: a bitsandbytes config used instead of ``cfg.quant``'s (an export's, see
    :func:`export_quant_config`).
    """
    compat.check_versions()
    p = check_model_dir(cfg.path)
    fam = detect_family(p)
    if cfg.kind != "auto" and cfg.kind != fam.kind:
        raise ModelLoadError(f"{p} holds a {fam.title} model (model.kind={fam.kind}) but model.kind is {cfg.kind!r}; "
                             f"set model.kind={fam.kind} or auto")
    dtype = torch_dtype(cfg.dtype)
    quantized = cfg.quant == "nf4" or quantization is not None
    if cfg.quant not in ("none", "nf4"):
        raise ValueError(f"model.quant must be none or nf4, got {cfg.quant!r}")
    if device is None:
        device = _default_device(quantized)

    cls = fam.model_cls()
    kwargs: dict[str, Any] = dict(compat.dtype_kwargs(dtype), local_files_only=True,
                                  trust_remote_code=cfg.trust_remote_code)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    elif quantized:
        kwargs["quantization_config"] = nf4_config(dtype, cfg.double_quant)
    dmap = device_map(device)
    if dmap is not None:
        kwargs["device_map"] = dmap

    auto = (cfg.attn_implementation or "").strip().lower() in ATTN_AUTO
    attn, why = choose_attn(cfg.attn_implementation, _run_device_type(run_device, device), cfg.dtype)
    if not attn.startswith(_KNOWN_ATTN):
        raise ModelLoadError(f"model.attn_implementation={attn!r} is not an attention implementation "
                             "(auto, eager, sdpa, flash_attention_2, flash_attention_3, flex_attention)")
    log.info("attention for %s: %s (%s)", p.name, attn, why)
    try:
        model = _from_pretrained(cls, p, attn, kwargs)
    except (ValueError, ImportError) as e:
        # A real implementation this machine or model cannot use (flash-attn not installed, sdpa not
        # supported by a remote-code model): sdpa for an automatic choice, else eager, which always
        # works, only slower.
        fallback = "sdpa" if auto and attn != "sdpa" else "eager"
        if attn == "eager" or "attn" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        log.warning("attention implementation %r refused for %s (%s); falling back to %s", attn, p, e, fallback)
        model = _from_pretrained(cls, p, fallback, kwargs)

    if fam.prepare is not None:
        model = fam.prepare(model, p)
    # Also for a directory saved already quantized (its config.json carries the quantization); it
    # touches CPU layers only, so a model on CUDA keeps bitsandbytes' CUDA path untouched.
    if is_quantized(model):
        bnb_cpu_workaround(model)
    if for_training:
        model.train()
        _set_use_cache(model, False)
    else:
        model.eval()
    return model


def _from_pretrained(cls: Any, p: Path, attn: str | None, kwargs: dict) -> Any:
    try:
        return cls.from_pretrained(p, attn_implementation=attn, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"{p}: transformers could not load it ({e}); check that the weight files are "
                             "complete (sizes in model.safetensors.index.json) and readable") from e


def _set_use_cache(model: Any, value: bool) -> None:
    configs = [model.config]
    sub = getattr(model.config, "get_text_config", None)
    if sub is not None:
        configs.append(sub())
    for c in configs:
        if hasattr(c, "use_cache"):
            c.use_cache = value


# --------------------------------------------------------------------------------------------------
# bitsandbytes CPU fix, predicates
# --------------------------------------------------------------------------------------------------

def bnb_cpu_workaround(model: Any) -> int:
    """Stop bitsandbytes 0.50.2 from repacking 4-bit weights for CPU inference; returns layers touched.

    Why: on CPUs with avx512_bf16, ``Linear4bit.forward`` in eval mode without grad converts its
    weight in place to a CPU-specific packed layout (and marks the quant state). The next training
    forward then goes through the autograd path with that layout and fails with "a view of a leaf
    Variable that requires grad is being used in an in-place operation". Turning the per-layer flag
    ``support_avx512bf16_for_cpu`` off keeps the portable layout (eval is a little slower on CPU;
    GPUs never take that path). A layer already repacked by an earlier eval is converted back.
    Only layers whose weight is on the CPU are touched (and counted): on CUDA the flag and the
    weights stay as bitsandbytes made them. Must run before the first eval forward;
    :func:`load_model` calls it for nf4 models and :func:`apply_lora` again after wrapping.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.nn import modules as bnb_modules
    except ImportError:
        return 0
    undo = getattr(bnb_modules, "_convert_weight_packed_for_cpu_inverse", None)
    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit) and mod.weight.device.type == "cpu":
            mod.support_avx512bf16_for_cpu = False
            qs = getattr(mod.weight, "quant_state", None)
            if qs is not None and getattr(qs, "packing_format_for_cpu", False) and undo is not None:
                mod.weight.data, mod.weight.quant_state = undo(mod.weight.data, qs)
            n += 1
    return n


def is_quantized(model: Any) -> bool:
    """True for bitsandbytes 4/8-bit models (peft-wrapped or not)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def is_peft(model: Any) -> bool:
    """True for a ``PeftModel`` or any model with adapter layers injected."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------

def _output_module_names(model: Any) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get is not None else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def lora_targets(model: Any, lora: LoraConfig) -> list[str]:
    """Full module names LoRA wraps under ``lora.target`` and ``lora.include_audio_tower``.

    ``"all-linear"`` means what peft means by it: every ``nn.Linear`` (bitsandbytes ``Linear4bit`` is
    one) except the output embedding (``lm_head``). For Qwen2-Audio that includes the audio tower's
    q/k/v/out_proj and fc1/fc2 and the projector, which is how the paper counts 2.41% trainable
    (r=64; 167M of 6.78B+167M for the 24-layer student). ``include_audio_tower=False`` drops the
    tower's linears (the projector stays: it is the bridge, not part of the tower). Modules a family marks
    unused for speech (an omni model's vision tower) never get adapters.
    A comma-separated list (``"q_proj,v_proj"``) matches the last name component.
    """
    import torch

    skip = _output_module_names(model)
    tower = set(families.encoder_modules())
    unused = set(families.unused_modules())
    wanted = None if lora.target.strip().lower() == "all-linear" else \
        {t.strip() for t in lora.target.split(",") if t.strip()}
    names, leaves = [], set()
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name in skip:
            continue
        parts = set(name.split("."))
        if unused & parts or not lora.include_audio_tower and tower & parts:
            continue
        leaves.add(name.rsplit(".", 1)[-1])
        if wanted is None or name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    if not names:
        raise ValueError(f"LoRA target {lora.target!r} matches no linear layer; linear layers here: "
                         f"{', '.join(sorted(leaves)) or 'none'}")
    return names


def apply_lora(model: Any, lora: LoraConfig, *, gradient_checkpointing: bool = False,
               upcast: bool = True) -> Any:
    """Wrap ``model`` in a peft LoRA model (the paper's QLoRA student with the default ``lora``).

    Defaults (``LoraConfig``): r=64, alpha=128, dropout 0, rsLoRA (scaling alpha/sqrt(r) = 16 instead
    of alpha/r = 2), all linear layers incl. the audio tower. Only the adapters are trainable.

    4-bit models first go through peft's ``prepare_model_for_kbit_training`` (``upcast=True``): base
    frozen, and every non-4-bit parameter (embeddings, lm_head, norms, biases, convs) cast to fp32 for
    stable updates of what flows into the adapters; this works on CPU (the 4-bit matmuls still run in
    the compute dtype and cast back). It costs memory: for the 7B student the 1.28B embedding+head
    parameters double to ~5.1 GB. ``upcast=False`` only freezes the base and keeps dtypes as loaded.
    ``gradient_checkpointing`` (off unless asked) uses non-reentrant checkpointing.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_peft(model):
        raise ValueError("model already has adapters; merge them (export) or load the base model again")
    targets = lora_targets(model, lora)
    quantized = is_quantized(model)
    gc_kwargs = {"use_reentrant": False}
    if quantized and upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    else:
        for prm in model.parameters():
            prm.requires_grad_(False)
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if gradient_checkpointing:
        _set_use_cache(model, False)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              use_rslora=lora.rslora, target_modules=targets, bias="none",
                              task_type="CAUSAL_LM")
    pm = get_peft_model(model, peft_cfg)
    if quantized:
        bnb_cpu_workaround(pm)
    return pm


def lora_parameters(model: Any) -> Iterable[tuple[str, Any]]:
    """``(name, parameter)`` of the LoRA adapter weights (``lora_A`` / ``lora_B``)."""
    return ((n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
