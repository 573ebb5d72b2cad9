"""``stc export``: the trained student as a plain Hugging Face directory (safetensors only).

Input: a trainer output ``<distill.out>/final`` (or ``export.source``): either full weights (the
trainer already consolidated ZeRO-3 shards into one state dict on rank 0) or a LoRA adapter whose
``meta.json`` names its base. Steps:

1. **Merge** (adapter inputs, ``merge_lora: true``): load the base in the *compute* dtype, never in
   4 bit, even when the adapter was trained on an nf4 base (QLoRA), attach the adapter and fold it in
   (``W + s * B @ A``). Merging into dequantized-then-requantized weights would add a second
   rounding; merging into the bf16 base and quantizing once is what QLoRA exports do. With
   ``merge_lora: false`` the adapter directory is copied as it is, next to a note naming its base.
2. **Trim the vocabulary** (``trim_vocab: true``, :mod:`engine.models.vocab`): keep the embedding and
   ``lm_head`` rows of the tokens that the ``trim_splits`` samples use (their rendered prompts with the
   translation, and translation and source alone), the special tokens, the 256 byte symbols and the
   merges that build them; the tokenizer is re-indexed and must encode every trimming sentence to the
   same (mapped) tokens, else the export stops naming the sentence. Dev and test sentences that now
   fall back to smaller pieces are counted (``meta.json`` ``exported.vocab``). With ``trim_languages``
   every token written in those languages' scripts is kept too, and then any text in them (dev, test,
   anything a user sends) encodes exactly as before: fewer rows go, nothing changes.
3. **Quantize** (``quant: nf4`` or ``int8``): reload the merged model with bitsandbytes, converting the
   linears of the components in ``export.quantize`` (default: audio encoder, projector and decoder;
   ``lm_head`` stays in the compute dtype, as in training, unless listed) and save that; the other
   components' linears are named in ``llm_int8_skip_modules``. The directory's ``config.json`` then
   carries the quantization config, so ``from_pretrained`` reloads the same layout.
4. Write ``meta.json`` (kind ``model``) with parameter and storage counts: ``params_total`` (logical
   weights; a 4-bit matrix counts its full shape), ``params_stored`` (elements as held: 4-bit weights
   packed two per byte), ``params_stored_bytes`` (incl. nf4 quant state) and ``storage_bytes``
   (safetensors bytes only, as the paper counts them), plus the resolved config; and ``size``: the
   bytes per component predicted from the shapes before saving (:mod:`engine.models.storage`, the
   figure plan validation prints) beside those measured in the written files, and their relative
   difference (a warning above 1%: the prediction no longer describes what transformers writes).
"""
from __future__ import annotations

import json
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
from .models import storage, vocab
from .models.load import export_quant_config, load_model, load_processor, torch_dtype


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
        print(f"export (dry run): {src}: {what}; store {_storage_words(recipe)}; write {out}")
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
    quant, quantize = recipe.export.quant, recipe.export.quantize
    trim = recipe.export.trim_vocab
    merged = tmp / "merged" if quant != "none" or trim else tmp
    skip = storage.skip_modules(model, quantize) if quant != "none" else []
    model.save_pretrained(merged, safe_serialization=True)
    processor.save_pretrained(merged)
    trimmed = None
    if trim:
        del model
        texts, verify = trim_corpus(recipe, processor)
        stage_out = tmp / "trimmed" if quant != "none" else tmp / "final"
        trimmed = vocab.trim_model_dir(merged, stage_out, texts, verify=verify, scripts=trim_scripts(recipe))
        shutil.rmtree(merged)
        if quant == "none":       # the trimmed directory is the export
            for f in stage_out.iterdir():
                os.replace(f, tmp / f.name)
            stage_out.rmdir()
            merged = tmp
        else:
            merged = stage_out
        processor = load_processor(merged)
        log.get().info(f"export: vocabulary {trimmed['old_rows']:,} -> {trimmed['new_rows']:,} rows; embedding bytes "
                       f"{trimmed['embedding_bytes_before']:,} -> {trimmed['embedding_bytes_after']:,}; "
                       + "; ".join(f"{g}: {c['differ']} of {c['sentences']} sentences encode differently "
                                   "(a dropped token: smaller pieces)" for g, c in trimmed["verify"].items()))
    # predicted from config.json alone, as plan validation does
    predicted = storage.predict(str(merged), dtype=dtype, quant=quant, quantize=quantize,
                                double_quant=recipe.model.double_quant,
                                trust_remote_code=recipe.model.trust_remote_code)
    if quant != "none":
        model = None
        q = load_model(ModelConfig(path=str(merged), dtype=dtype, quant="none",
                                   attn_implementation=recipe.model.attn_implementation),
                       quantization=export_quant_config(torch_dtype(dtype), quant, skip, recipe.model.double_quant))
        q.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if (merged / "vocab_map.json").is_file():
            shutil.copy2(merged / "vocab_map.json", tmp / "vocab_map.json")
        shutil.rmtree(merged)
        counted = q
    else:
        counted = model if not trim else load_model(ModelConfig(path=str(tmp), dtype=dtype, quant="none"))
    measured = storage.measure(tmp)
    diff = storage.agreement(predicted, measured)
    if diff > 0.01:
        log.get().warning(f"export: {measured.total:,} bytes written, {predicted.total:,} predicted "
                          f"({100 * diff:.2f}% apart); the storage prediction of plan validation is off for this model")
    counts = param_counts(counted)
    write_meta(tmp, build_meta("model", fingerprints={"model": fingerprint_model(tmp)}, config=recipe,
                               seconds=round(time.monotonic() - t_start, 3), world_size=1,
                               exported={"source": str(src.resolve()), "quant": recipe.export.quant,
                                         "merged_lora": bool(trained.get("adapter")),
                                         # total: logical weights (a 4-bit matrix counts its full shape);
                                         # stored: elements as held (4-bit packed two per byte)
                                         "params_total": counts["total"], "params_stored": counts["stored"],
                                         "params_stored_bytes": counts["stored_bytes"],
                                         "storage_bytes": storage_bytes(tmp), "quantize": list(quantize),
                                         "skip_modules": skip,
                                         "vocab": ({k: v for k, v in trimmed.items() if k not in ("copied", "dst")}
                                                   if trimmed else None),
                                         "size": {"predicted": predicted.to_dict(), "measured": measured.to_dict(),
                                                  "relative_difference": round(diff, 6)}}))
    return _finish(tmp, out)


def split_texts(recipe: Recipe, split: str, builder: Any) -> list[str]:
    """What the model reads and writes for every sample of shard split ``split``: the rendered prompt
    with its translation (as training tokenizes it, the audio placeholder once), and the translation and
    source text alone. Only the samples' json members are read (no audio decoding)."""
    from .data import tario
    from .data.stream import split_shards
    from .meta import read_meta

    shards_dir = Path(recipe.data.shards)
    meta = read_meta(shards_dir, kind="shards")
    out: list[str] = []
    for info in split_shards(meta, split, str(shards_dir / "meta.json")):
        path = shards_dir / info.name
        for entry in tario.index_tar(path):
            if "json" not in entry.members:
                continue
            m = json.loads(tario.read_member(path, *entry.members["json"]).decode("utf-8"))
            tgt = m.get("tgt_text", "")
            audio = builder.is_audio and any(e.startswith("audio.") or e in ("flac", "wav") for e in entry.members)
            out.append(builder.full_text(m, tgt, audio=audio, key=f"{info.name}:{entry.key}"))
            out += [t for t in (tgt, m.get("src_text", "")) if t]
    return out


def trim_scripts(recipe: Recipe) -> tuple[str, ...]:
    """The Unicode scripts of ``export.trim_languages`` (each language's, see :mod:`engine.langs`)."""
    from . import langs

    return tuple(dict.fromkeys(s for code in recipe.export.trim_languages for s in langs.get(code).scripts))


def trim_corpus(recipe: Recipe, processor: Any) -> tuple[list[str], dict[str, list[str]]]:
    """(the trimming corpus from ``export.trim_splits``, the dev and test splits' texts to check)."""
    from .data.prompt import PromptBuilder

    builder = PromptBuilder(processor, recipe.data)
    texts: list[str] = []
    for split in recipe.export.trim_splits:
        texts += split_texts(recipe, split, builder)
    if not texts:
        raise ExportError(f"export.trim_vocab: the splits {list(recipe.export.trim_splits)} of {recipe.data.shards} "
                          "hold no text; set export.trim_splits to the splits the student is trained on")
    verify = {s: split_texts(recipe, s, builder) for s in dict.fromkeys((recipe.data.dev_split, recipe.data.test_split))
              if s and s not in recipe.export.trim_splits}
    return texts, verify


def _storage_words(recipe: Recipe) -> str:
    e = recipe.export
    if e.quant == "none":
        return f"everything in {recipe.model.dtype}"
    return f"{e.quant} for the linears of {', '.join(e.quantize)}, the rest in {recipe.model.dtype}"


def _finish(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(recipe: Recipe, args: Any) -> int:
    run(recipe, dry_run=bool(getattr(args, "dry_run", False)))
    return 0
