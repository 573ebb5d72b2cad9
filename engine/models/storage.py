"""Bytes on disk of an exported model, predicted per component and storage choice, and measured.

The compression track of the paper's venue ranks systems by the size of their weights on disk, so a
plan must know each student's size before any job runs. :func:`predict` builds the model from
``config.json`` on the meta device (no weights) and lists every tensor ``save_pretrained`` will write,
with its dtype and shape as stored; :func:`measure` reads the same from the headers of an exported
directory's ``*.safetensors`` files. Both sum into a :class:`Breakdown` over the components

=============  ============================================================================
``encoder``    the audio tower (convolutions, positions, its layers; a projector built into it, and an
               omni model's vision tower, count here too)
``projector``  audio -> text projection
``embeddings`` the decoder's input embedding table (with tied weights, also the output layer)
``decoder``    the decoder layers (attention, MLP, their norms)
``lm_head``    the output layer, when it is not tied to the input embeddings
``norms``      everything else (the decoder's final norm)
=============  ============================================================================

**Storage choices.** Every tensor is stored in the compute dtype (``bf16``/``fp16``/``fp32``) unless
its module is an ``nn.Linear`` of a component listed in ``quantize``; those linears take the export's
scheme, exactly as bitsandbytes + transformers write them (read from the files they write):

* ``nf4`` (double quant, quant storage = compute dtype): the packed weight, ``numel / 2`` bytes; per
  64-value block one ``absmax`` (uint8 with double quant, else fp32); with double quant one fp32
  ``nested_absmax`` per 256 blocks and the 256-entry fp32 ``nested_quant_map``; the 16-entry fp32
  ``quant_map``; ``quant_state.bitsandbytes__nf4``, a ~170-byte JSON blob as uint8;
* ``int8`` (LLM.int8): the int8 weight, one fp32 scale per output row (``SCB``) and a one-byte
  ``weight_format``.

Biases, norms, convolutions and embeddings are never quantized (bitsandbytes converts linears only),
so ``quantize`` may name ``encoder``, ``projector``, ``decoder`` and ``lm_head``; a tied ``lm_head``
cannot be quantized apart from the input embeddings and is refused. Each safetensors file adds an
8-byte length and its JSON header (padded to 8 bytes), which the prediction counts too; a model
saved in several shards repeats a header per shard, which is below a thousandth of the bytes at
any size where transformers shards (50 GB per shard by default).

Component boundaries come from the module names (``_COMPONENT_PATTERNS``), the same rule for the
runtime names of a built model and for the keys of a saved file, which differ between transformers
versions ("model.language_model.layers.3" at run time, "language_model.model.layers.3" on disk).
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import EXPORT_QUANTIZABLE as QUANTIZABLE
from ..config import EXPORT_SCHEMES as SCHEMES
from ..config import export_choice_problem
from . import families

COMPONENTS = ("encoder", "projector", "embeddings", "decoder", "lm_head", "norms")



def _part(names: Iterable[str]) -> re.Pattern:
    return re.compile(r"(^|\.)(" + "|".join(re.escape(n) for n in names) + r")(\.|$)")


# name fragment -> component, first match wins (audio layers are "layers" too: the encoder comes first);
# the encoder and projector module names come from the model families (engine.models.families)
_COMPONENT_PATTERNS = (
    (_part(families.encoder_modules()), "encoder"),
    (_part(families.projector_modules()), "projector"),
    (re.compile(r"(^|\.)embed_tokens(\.|$)"), "embeddings"),
    (re.compile(r"(^|\.)lm_head(\.|$)"), "lm_head"),
    (re.compile(r"(^|\.)layers\.\d+(\.|$)"), "decoder"),
)
_ST_DTYPE = {"torch.bfloat16": ("BF16", 2), "torch.float16": ("F16", 2), "torch.float32": ("F32", 4),
             "torch.int8": ("I8", 1), "torch.uint8": ("U8", 1), "torch.int64": ("I64", 8),
             "torch.int32": ("I32", 4), "torch.bool": ("BOOL", 1), "torch.float64": ("F64", 8)}
_ITEM = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
_COMPUTE = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_BLOCK = 64             # bitsandbytes 4-bit block (values per absmax)
_NESTED_BLOCK = 256     # double quant: absmax values per fp32 second-level scale
_NF4_JSON = 171         # bytes of the packed quant-state JSON bitsandbytes saves with each 4-bit weight
GB = 10**9              # sizes are reported in decimal GB, as the track's bins (2-4 GB, ...) are


class StorageError(ValueError):
    pass


def check_choice(quant: str, quantize: Iterable[str]) -> tuple[str, ...]:
    """Validate an export's scheme and component list (see ``engine.config.export_choice_problem``)."""
    problem = export_choice_problem(quant, quantize)
    if problem:
        raise StorageError(problem)
    return tuple(quantize)


def component_of(name: str) -> str:
    """The component a parameter or module name belongs to (see module doc)."""
    for pat, comp in _COMPONENT_PATTERNS:
        if pat.search(name):
            return comp
    return "norms"


@dataclass(frozen=True)
class Entry:
    """One tensor as a safetensors file holds it."""
    name: str
    component: str
    dtype: str                 # safetensors dtype ("BF16", "U8", ...)
    shape: tuple[int, ...]
    params: int = 0            # logical parameters it carries (0 for quantization constants)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEM[self.dtype]


@dataclass(frozen=True)
class Breakdown:
    """Bytes and parameters per component (see module doc); ``header`` = safetensors length fields and
    JSON headers. ``storage`` says how each component is stored."""
    bytes: dict[str, int]
    params: dict[str, int]
    storage: dict[str, str]
    header: int
    files: int = 1

    @property
    def total(self) -> int:
        return sum(self.bytes.values()) + self.header

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total, "header_bytes": self.header, "files": self.files,
                "components": {c: {"bytes": self.bytes.get(c, 0), "params": self.params.get(c, 0),
                                   "storage": self.storage.get(c, "")} for c in COMPONENTS
                               if self.bytes.get(c) or self.params.get(c)}}

    def table(self, title: str = "") -> str:
        """A fixed-width table: component, parameters, storage, bytes, share."""
        rows = [f"{'component':<11} {'params':>14} {'storage':<9} {'bytes':>15} {'share':>6}"]
        tot = self.total or 1
        for c in COMPONENTS:
            if not (self.bytes.get(c) or self.params.get(c)):
                continue
            rows.append(f"{c:<11} {self.params.get(c, 0):>14,} {self.storage.get(c, ''):<9} "
                        f"{self.bytes.get(c, 0):>15,} {100 * self.bytes.get(c, 0) / tot:>5.1f}%")
        rows.append(f"{'headers':<11} {'':>14} {'':<9} {self.header:>15,} {100 * self.header / tot:>5.1f}%")
        rows.append(f"{'total':<11} {sum(self.params.values()):>14,} {'':<9} {self.total:>15,} "
                    f"= {self.total / GB:.3f} GB")
        return "\n".join(([title] if title else []) + rows)

    def short(self) -> str:
        """One line: total and the three largest components."""
        big = sorted(((b, c) for c, b in self.bytes.items() if b), reverse=True)[:3]
        return (f"{self.total / GB:.3f} GB on disk (" + ", ".join(
            f"{c} {b / GB:.3f} {self.storage.get(c, '')}".rstrip() for b, c in big) + ")")


def _entries_of_linear(name: str, comp: str, shape: tuple[int, ...], quant: str, dtype: str,
                       double_quant: bool) -> list[Entry]:
    n = math.prod(shape)
    if quant == "nf4":
        item = _ITEM[dtype]
        packed = (n + 1) // 2
        out = [Entry(name, comp, dtype, (math.ceil(packed / item), 1), n)]
        blocks = math.ceil(n / _BLOCK)
        if double_quant:
            out += [Entry(name + ".absmax", comp, "U8", (blocks,)),
                    Entry(name + ".nested_absmax", comp, "F32", (math.ceil(blocks / _NESTED_BLOCK),)),
                    Entry(name + ".nested_quant_map", comp, "F32", (256,))]
        else:
            out.append(Entry(name + ".absmax", comp, "F32", (blocks,)))
        out += [Entry(name + ".quant_map", comp, "F32", (16,)),
                Entry(name + ".quant_state.bitsandbytes__nf4", comp, "U8", (_NF4_JSON,))]
        return out
    if quant == "int8":
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        return [Entry(name, comp, "I8", shape, n), Entry(base + ".SCB", comp, "F32", (shape[0],)),
                Entry(name + "_format", comp, "U8", ())]
    raise AssertionError(quant)


def model_entries(model: Any, *, dtype: str, quant: str = "none", quantize: Sequence[str] = (),
                  double_quant: bool = True) -> list[Entry]:
    """Every tensor ``model`` (built, e.g. on the meta device, unquantized) would be saved as, with the
    linears of the ``quantize`` components in ``quant`` and everything else in ``dtype``."""
    import torch

    quantize = check_choice(quant, quantize)
    cdt = _COMPUTE[dtype]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    if tied and "lm_head" in quantize and quant != "none":
        raise StorageError("export.quantize: lm_head is tied to the input embeddings in this model "
                           "(tie_word_embeddings), so it is stored once, as the embeddings; drop lm_head")
    linear_weights = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight is not None:
            linear_weights[id(mod.weight)] = mname
    entries: list[Entry] = []
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:                       # tied weights are saved once
            continue
        seen.add(id(t))
        comp = component_of(name)
        if tied and comp == "lm_head":
            comp = "embeddings"
        shape = tuple(int(s) for s in t.shape)
        mname = linear_weights.get(id(t))
        if quant != "none" and mname is not None and comp in quantize and not (tied and comp == "embeddings"):
            entries += _entries_of_linear(name, comp, shape, quant, cdt, double_quant)
            continue
        st = _ST_DTYPE.get(str(t.dtype), (cdt, 0))[0]
        if t.is_floating_point():
            st = cdt
        entries.append(Entry(name, comp, st, shape, math.prod(shape) if t.is_floating_point() else 0))
    return entries


def header_bytes(entries: Sequence[Entry]) -> int:
    """Length field plus JSON header of one safetensors file holding ``entries`` (compact JSON, padded
    to a multiple of 8 bytes, as the safetensors writer does)."""
    head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for e in entries:
        head[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    n = len(json.dumps(head, separators=(",", ":")).encode())
    return 8 + n + (-n) % 8


def breakdown(entries: Sequence[Entry], storage: dict[str, str], header: int, files: int = 1) -> Breakdown:
    b: dict[str, int] = {}
    p: dict[str, int] = {}
    for e in entries:
        b[e.component] = b.get(e.component, 0) + e.nbytes
        p[e.component] = p.get(e.component, 0) + e.params
    return Breakdown(b, p, storage, header, files)


def _storage_labels(components: Iterable[str], dtype: str, quant: str, quantize: Sequence[str]) -> dict[str, str]:
    return {c: (quant if quant != "none" and c in quantize else dtype) for c in components}


def predict_model(model: Any, *, dtype: str, quant: str = "none", quantize: Sequence[str] = (),
                  double_quant: bool = True) -> Breakdown:
    """The :class:`Breakdown` of ``model`` saved with these choices (see :func:`model_entries`)."""
    entries = model_entries(model, dtype=dtype, quant=quant, quantize=quantize, double_quant=double_quant)
    return breakdown(entries, _storage_labels({e.component for e in entries}, dtype, quant, quantize),
                     header_bytes(entries))


def predict(model_path: str, *, removed: int = 0, dtype: str = "bf16", quant: str = "none",
            quantize: Sequence[str] = (), double_quant: bool = True, trust_remote_code: bool = False,
            vocab_rows: int | None = None, audio_removed: int = 0) -> Breakdown:
    """The breakdown of the model at ``model_path`` (``config.json`` alone is enough) with ``removed``
    decoder layers and ``audio_removed`` audio-encoder layers taken out and, when given, its vocabulary
    cut to ``vocab_rows`` rows."""
    from transformers import AutoConfig

    from .counts import meta_model
    from .load import detect_kind

    kind = detect_kind(model_path)
    fam = families.get(kind)
    config = fam.own_config(
        AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code))
    if audio_removed:
        audio = getattr(config, fam.audio_config, None) if fam.audio_config else None
        na = getattr(audio, fam.audio_layer_count, None) if audio is not None else None
        if not isinstance(na, int) or not 0 <= audio_removed < na:
            raise StorageError(f"{model_path}: cannot remove {audio_removed} audio-encoder layers "
                               f"(it has {na if isinstance(na, int) else 'no audio encoder'})")
        setattr(audio, fam.audio_layer_count, na - audio_removed)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = int(text.num_hidden_layers)
    if removed:
        if not 0 <= removed < n:
            raise StorageError(f"{model_path}: cannot remove {removed} of {n} decoder layers")
        text.num_hidden_layers = n - removed
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[: n - removed]
        if isinstance(getattr(text, "max_window_layers", None), int):
            text.max_window_layers = min(text.max_window_layers, n - removed)
    if vocab_rows:
        text.vocab_size = int(vocab_rows)
        pad = getattr(text, "pad_token_id", None)
        if isinstance(pad, int) and pad >= vocab_rows:    # ids are remapped by trimming; shapes are all we need
            text.pad_token_id = None
    model = meta_model(config, kind, trust_remote_code)
    return predict_model(model, dtype=dtype, quant=quant, quantize=quantize, double_quant=double_quant)


def read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise StorageError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        try:
            return json.loads(f.read(n))
        except ValueError as e:
            raise StorageError(f"{path}: unreadable safetensors header ({e})") from None


def measure(model_dir: str | Path) -> Breakdown:
    """The breakdown of an exported directory, from its ``*.safetensors`` headers and file sizes.
    ``storage`` names the dtypes seen per component (a quantized linear shows as ``U8``/``I8`` beside
    its constants)."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise StorageError(f"{d}: no *.safetensors files")
    b: dict[str, int] = {}
    p: dict[str, int] = {}
    kinds: dict[str, set[str]] = {}
    header = 0
    for f in files:
        h = read_header(f)
        data = 0
        for name, v in h.items():
            if name == "__metadata__":
                continue
            comp = component_of(name)
            lo, hi = v["data_offsets"]
            b[comp] = b.get(comp, 0) + (hi - lo)
            data += hi - lo
            if not _is_constant(name):
                kinds.setdefault(comp, set()).add(_kind_of(name, v["dtype"], h))
            if not _is_constant(name):
                p[comp] = p.get(comp, 0) + math.prod(v["shape"]) * _packing(name, v["dtype"], h)
        header += f.stat().st_size - data
    storage = {c: "+".join(sorted(k)) for c, k in kinds.items()}
    return Breakdown(b, p, storage, header, len(files))


_CONSTANT = re.compile(r"\.(absmax|nested_absmax|nested_quant_map|quant_map|quant_state\.[^.]+|SCB|weight_format)$")


def _is_constant(name: str) -> bool:
    return bool(_CONSTANT.search(name))


def _kind_of(name: str, dtype: str, header: dict) -> str:
    if name + ".quant_map" in header:
        return "nf4" if "nf4" in "".join(k for k in header if k.startswith(name + ".quant_state.")) else "4bit"
    return {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "I8": "int8"}.get(dtype, dtype.lower())


def _packing(name: str, dtype: str, header: dict) -> float:
    """Logical values per stored element: a 4-bit weight (it has a ``quant_map`` beside it) packs
    2 per byte."""
    if name + ".quant_map" in header:
        return 2 * _ITEM[dtype]
    return 1


def agreement(predicted: Breakdown, measured: Breakdown) -> float:
    """Relative difference of the totals, ``|measured - predicted| / measured``."""
    return abs(measured.total - predicted.total) / max(1, measured.total)


def fits(b: Breakdown, max_gb: float) -> bool:
    return max_gb <= 0 or b.total <= max_gb * GB


def skip_modules(model: Any, quantize: Sequence[str]) -> list[str]:
    """Module names for bitsandbytes' ``llm_int8_skip_modules`` so that exactly the linears of the
    ``quantize`` components are converted: the outermost module of every other component that holds
    linears, by its run-time name in ``model`` (the same names transformers matches when loading)."""
    import torch

    keep = set(quantize)
    roots: list[str] = []
    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        comp = component_of(mname)
        if comp in keep:
            continue
        root = _component_root(mname, comp)
        if root not in roots:
            roots.append(root)
    return roots


def _component_root(mname: str, comp: str) -> str:
    """The shortest prefix of ``mname`` that still belongs to ``comp`` (e.g. ``model.audio_tower``)."""
    parts = mname.split(".")
    for i in range(1, len(parts) + 1):
        head = ".".join(parts[:i])
        if component_of(head) == comp and comp != "norms":
            if comp == "decoder":                    # "...layers.3" -> the layer list "...layers"
                return ".".join(parts[: i - 1])
            return head
    return mname
