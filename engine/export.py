"""``stc export``: the trained student as a plain Hugging Face directory (safetensors only).

Input: a trainer output ``<distill.out>/final`` (or ``export.source``): either full weights (the
trainer already consolidated ZeRO-3 shards into one state dict on rank 0) or a LoRA adapter whose
``meta.json`` names its base. Steps:

1. **Merge** (adapter inputs, ``merge_lora: true``): load the base in the *compute* dtype, never in
   4 bit, even when the adapter was trained on an nf4 base (QLoRA), attach the adapter and fold it in
   (``W + s * B @ A``). Merging into dequantized-then-requantized weights would add a second
   rounding; merging into the bf16 base and quantizing once is what QLoRA exports do. With
   ``merge_lora: false`` the adapter directory is copied as it is, next to a note naming its base.
2. **Quantize** (``quant: nf4``): reload the merged model with bitsandbytes nf4 + double quant
   (``lm_head`` stays in the compute dtype, as in training) and save that; the directory's
   ``config.json`` then carries the quantization config, so ``from_pretrained`` reloads it as nf4.
3. Write ``meta.json`` (kind ``model``) with parameter and storage counts: ``params_total`` (logical
   weights; a 4-bit matrix counts its full shape), ``params_stored`` (elements as held: 4-bit weights
   packed two per byte), ``params_stored_bytes`` (incl. nf4 quant state) and ``storage_bytes``
   (safetensors bytes only, as the paper counts them), plus the resolved config.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import log, stages
from .config import ModelConfig, Recipe
from .errors import StcError
from .meta import MetaError, build_meta, fingerprint_model, read_meta, write_meta
from .models.counts import param_counts
from .models.load import load_model, load_processor


class ExportError(StcError):
    pass


def _source(recipe: Recipe) -> Path:
    src = getattr(recipe.export, "source", "") or ""
    if src:
        return Path(src)
    return stages.out_dir("distill", recipe) / "final"


def storage_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run(recipe: Recipe, *, dry_run: bool = False) -> Path:
    src = _source(recipe)
    try:
        meta = read_meta(src, kind="model")
    except MetaError as e:
        raise ExportError(f"export source: {e}") from None
    trained = meta.get("trained") or {}
    out = stages.out_dir("export", recipe)
    if dry_run:
        what = ("merge the LoRA adapter into its base " + str(trained.get("base")) if trained.get("adapter")
                and recipe.export.merge_lora else "copy the adapter (merge_lora=false)" if trained.get("adapter")
                else "the full model")
        print(f"export (dry run): {src}: {what}; store {recipe.export.quant}; write {out}")
        return out
    t_start = time.monotonic()      # meta.json "seconds" (x "world_size" 1): the device time stc report shows
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = recipe.model.dtype
    if trained.get("adapter"):
        base = trained.get("base") or ""
        if not recipe.export.merge_lora:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            write_meta(tmp, build_meta("model", config=recipe, exported={"adapter": True, "base": base},
                                       seconds=round(time.monotonic() - t_start, 3), world_size=1))
            return _finish(tmp, out)
        from peft import PeftModel

        model = load_model(ModelConfig(path=base, dtype=dtype, quant="none",
                                       attn_implementation=recipe.model.attn_implementation), device="cpu")
        model = PeftModel.from_pretrained(model, str(src), is_trainable=False)
        model = model.merge_and_unload()
    else:
        model = load_model(ModelConfig(path=str(src), dtype=dtype, quant="none",
                                       attn_implementation=recipe.model.attn_implementation), device="cpu")
    processor = load_processor(trained.get("base") if trained.get("adapter") else src)
    merged = tmp / "merged" if recipe.export.quant == "nf4" else tmp
    model.save_pretrained(merged, safe_serialization=True)
    processor.save_pretrained(merged)
    if recipe.export.quant == "nf4":
        q = load_model(ModelConfig(path=str(merged), dtype=dtype, quant="nf4",
                                   attn_implementation=recipe.model.attn_implementation))
        q.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        shutil.rmtree(merged)
        counted = q
    else:
        counted = model
    counts = param_counts(counted)
    write_meta(tmp, build_meta("model", fingerprints={"model": fingerprint_model(tmp)}, config=recipe,
                               seconds=round(time.monotonic() - t_start, 3), world_size=1,
                               exported={"source": str(src.resolve()), "quant": recipe.export.quant,
                                         "merged_lora": bool(trained.get("adapter")),
                                         # total: logical weights (a 4-bit matrix counts its full shape);
                                         # stored: elements as held (4-bit packed two per byte)
                                         "params_total": counts["total"], "params_stored": counts["stored"],
                                         "params_stored_bytes": counts["stored_bytes"],
                                         "storage_bytes": storage_bytes(tmp)}))
    return _finish(tmp, out)


def _finish(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(recipe: Recipe, args: Any) -> int:
    run(recipe, dry_run=bool(getattr(args, "dry_run", False)))
    return 0
