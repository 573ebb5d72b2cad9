"""``stc cache build``: run the teacher once over a split and store what students need.

Why a cache: the teacher is the expensive and memory-hungry part of distillation. Running it once
over the training set and storing what the student needs (top-k log-probs at the reference's label
positions, and the teacher's greedy translations) lets every student, run and world size reuse it,
and keeps the teacher out of the student's GPU memory. Formats: :mod:`engine.cache.format`.

Layout of ``<cache.out>/``::

    meta.json            kind "cache": fingerprints, k, encoding, counts, per-shard provenance
    build.json           what this cache is of (fingerprints + options), written before any shard;
                         a rerun with other inputs is refused instead of mixing two caches
    X.tar                one per audio shard X.tar of the cached split: same keys, same order
    done/X.tar.json      per-shard done record: bytes, sha256, counts, host/rank/pid, timings

**Work split.** Audio shard ``i`` (name order) goes to rank ``i % world``; each shard is processed
alone in batches cut in tar order, so a shard's batches do not depend on the world size. Shards are
written to a temporary name and renamed; a done record with the shard's sha256 follows. A rerun
skips shards whose done record matches the file; a shard without one (killed mid-shard) is
recomputed from scratch.

**ZeRO-3 teacher** (:mod:`engine.cache.teacher`). Every forward is a collective, so the ranks first
agree on the largest number of batches any rank has to run; a rank with fewer runs *padding
batches* (a real sample, results thrown away) until every rank has run that many. Each done record
gets ``zero3`` counts (parameters, how many are held as a slice, local and full element counts,
whether loading was already partitioned) as evidence of the partitioning. All samples must take the
same model path (audio or none, as the featurizer decides).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import dist, log, stages
from ..data.prompt import Featurizer
from ..errors import StcError
from ..data.stream import ShardInfo, ShardReader, StreamError, shards_fingerprint, shards_from_meta, split_shards
from ..io import atomic_write_bytes, atomic_write_json, remove_stale_tmp, sha256_bytes, sha256_file
from ..meta import MetaError, build_meta, read_meta, write_meta
from ..models.load import ModelLoadError, check_model_dir, load_processor
from . import codec
from . import teacher as T
from .verify import print_summary
from .format import (BUILD_NAME, DONE_DIR, FORMAT, PACK_EXT, PACK_GROUP, CacheError, decode_record,
                     input_fingerprints, pack_ids, shard_bytes)


def _dirs(recipe: Any) -> tuple[Path, str, Path, Path]:
    c = recipe.cache
    shards = Path(recipe.data.shards)
    split = c.split or recipe.data.train_split
    out = stages.out_dir("cache build", recipe)
    teacher = Path(c.teacher or recipe.model.path)
    return shards, split, out, teacher


def check_options(recipe: Any) -> None:
    """Refusals that need no model: ZeRO-3 never with nf4, and only for a bf16 or fp32 teacher."""
    c = recipe.cache
    quant = recipe.model.quant if c.quant == "auto" else c.quant
    dtype = recipe.model.dtype if c.dtype == "auto" else c.dtype
    if c.zero3 and quant == "nf4":
        raise CacheError("cache.zero3=true with an nf4 teacher is not supported: ZeRO-3 partitions "
                         "bf16/fp32 parameters and cannot shard bitsandbytes 4-bit weights. Use "
                         "cache.quant=nf4 on one device (it needs ~1/4 of the bf16 memory) or a bf16 teacher")
    if c.zero3 and dtype not in ("bf16", "fp32"):
        raise CacheError(f"cache.zero3=true with a {dtype} teacher: the ZeRO-3 teacher runs in bf16 or fp32; "
                         f"set cache.dtype=bf16 (or fp32)")


def _identity(recipe: Any, fps: Mapping[str, str], vocab: int, split: str, source_dir: Path) -> dict[str, Any]:
    c = recipe.cache
    return {"format": FORMAT, "fingerprints": dict(fps), "vocab_size": vocab, "k": c.k, "split": split,
            "targets": list(c.targets), "teacher_topk": c.teacher_topk, "max_new_tokens": c.max_new_tokens,
            "batch_size": c.batch_size, "dtype": c.dtype if c.dtype != "auto" else recipe.model.dtype,
            "quant": c.quant if c.quant != "auto" else recipe.model.quant,
            "encoding": {"topk": f"topk_codec v{codec.VERSION} step 2^-{codec.DEFAULT_STEP_EXP} lzma",
                         "label_ids": "bitpacked ceil(log2 V)",
                         "container": f"ustar of {PACK_EXT} packs of {PACK_GROUP} samples"},
            "source": {"shards_dir": str(source_dir.resolve())}}


def _diff_identity(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if k == "source":
            continue
        a, b = old.get(k), new.get(k)
        if k == "fingerprints":
            for f in sorted(set(a or {}) | set(b or {})):
                if (a or {}).get(f) != (b or {}).get(f):
                    out.append(f"{f} fingerprint differs ({str((a or {}).get(f))[:19]}... then, "
                               f"{str((b or {}).get(f))[:19]}... now)")
        elif a != b:
            out.append(f"{k}: {a!r} then, {b!r} now")
    return out


def _done_path(out: Path, name: str) -> Path:
    return out / DONE_DIR / f"{name}.json"


def _done_ok(out: Path, info: ShardInfo) -> dict | None:
    """The done record of a finished shard if the file on disk matches it (size and sha256)."""
    p = _done_path(out, info.name)
    if not p.exists():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    f = out / info.name
    if (rec.get("source_sha256") != info.sha256 or not f.exists() or f.stat().st_size != rec.get("bytes")
            or sha256_file(f) != rec.get("sha256")):
        return None
    return rec



def build(recipe: Any) -> dict[str, Any]:
    """``stc cache build``: the teacher pass over this rank's audio shards, then meta.json (rank 0)."""
    with dist.session() as env:
        return _build(recipe, env)


def _agree(err: str | None) -> None:
    """Raise on every rank when any rank failed a check (so no rank waits at a barrier forever)."""
    dist.agree(err, CacheError)


def _build(recipe: Any, env: Any) -> dict[str, Any]:
    import torch  # heavy: the model pass needs it, the dry run and meta checks do not

    shards_dir, split, out, teacher, shards = _inputs(recipe)
    lg = log.setup(recipe.run.log_level, out, progress_s=recipe.run.progress_s)
    c = recipe.cache
    if recipe.run.threads > 0:
        torch.set_num_threads(recipe.run.threads)
    processor = load_processor(teacher)
    featurizer = Featurizer(processor, recipe.data)
    vocab = len(featurizer.builder.tokenizer)
    if c.k > vocab:
        raise CacheError(f"cache.k={c.k} is larger than the vocabulary ({vocab} tokens); use k <= {vocab}")
    try:
        fps = input_fingerprints(featurizer.builder, teacher)
    except MetaError as e:
        raise CacheError(f"teacher {teacher}: {e}") from None
    fps["data"] = shards_fingerprint(shards)
    ident = _identity(recipe, fps, vocab, split, shards_dir)

    err = None
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / DONE_DIR).mkdir(exist_ok=True)
        bpath = out / BUILD_NAME
        if bpath.exists():
            diffs = _diff_identity(json.loads(bpath.read_text(encoding="utf-8")), ident)
            if diffs:
                err = (f"{out} holds a cache of other inputs; differences:\n  - " + "\n  - ".join(diffs)
                       + f"\nuse another cache.out, or delete {out} to rebuild")
        else:
            atomic_write_json(bpath, ident)
        if err is None:
            for d in (out, out / DONE_DIR):
                n = len(remove_stale_tmp(d))
                if n:
                    lg.info(f"removed {n} temporary file(s) left by a killed run in {d}")
    _agree(err)

    device = torch.device("cpu") if recipe.run.device == "cpu" else dist.device()
    mine = [s for i, s in enumerate(shards) if i % env.world_size == env.rank]
    todo = [s for s in mine if _done_ok(out, s) is None]
    lg.info(f"rank {env.rank}: {len(mine)} shard(s), {len(mine) - len(todo)} already done, {len(todo)} to compute")
    zero3 = bool(c.zero3)
    # ZeRO-3: every forward is a collective; all ranks run the largest rank's number of batches.
    n_batches = sum(math.ceil(s.n / c.batch_size) for s in todo)
    rounds = max(dist.all_gather_object(n_batches)) if zero3 else n_batches
    model = None
    z3stats: dict[str, int] | None = None
    err = None
    stack = contextlib.ExitStack()
    try:
        if zero3 and rounds:
            model, z3stats = T.zero3_teacher(recipe, teacher, vocab, env, device)
        elif todo:
            model = T.load_teacher(recipe, teacher, device)
            rows = T.teacher_vocab_rows(model)
            if rows < vocab:
                raise CacheError(f"teacher {teacher}: its output layer has {rows} rows but the tokenizer has "
                                 f"{vocab} tokens: tokenizer and model do not belong together")
        if zero3 and rounds:
            lg.info(f"rank {env.rank}: ZeRO-3 teacher: {z3stats['partitioned']} of {z3stats['params']} "
                    f"parameters sliced, {z3stats['local_numel']} of {z3stats['numel']} elements held here; "
                    f"{n_batches} batch(es) of work, {rounds - n_batches} padding")
        reader = ShardReader(shards_dir, shards, sample_rate=16000, max_audio_s=float(recipe.data.max_audio_s))
        pos = {s.name: i for i, s in enumerate(shards)}
        prov = dist.provenance() | ({"zero3": z3stats} if z3stats else {})
        prog = stack.enter_context(log.progress())
        bar = prog.task(f"cache build (rank {env.rank}'s shards)", total=sum(s.n for s in todo), unit="samples")
        t_start = time.perf_counter()
        for info in todo:
            t0 = time.perf_counter()
            samples = [dict(reader.read((pos[info.name], i)), pad=False) for i in range(info.n)]
            timings = {"featurize": 0.0, "word_level": 0.0, "generate": 0.0, "word_level_teacher": 0.0}

            def on_batch(n: int) -> None:
                bar.advance(n, shard=info.name,
                            **{"samples/s": bar.completed / max(time.perf_counter() - t_start, 1e-9)})

            recs = T.process_shard(model, featurizer, samples, recipe, vocab, device, timings, info.name, zero3,
                                   on_batch)
            data = shard_bytes([s["key"] for s in samples], recs)
            atomic_write_bytes(out / info.name, data)
            stats = _shard_stats(recs, vocab)
            done = {"name": info.name, "n": info.n, "bytes": len(data), "sha256": sha256_bytes(data),
                    "source_sha256": info.sha256, **stats,
                    "seconds": {k: round(v, 4) for k, v in timings.items()}
                    | {"total": round(time.perf_counter() - t0, 4)},
                    "time": time.time(), **prov}
            atomic_write_json(_done_path(out, info.name), done)
            lg.info(f"rank {env.rank}: {info.name}: {info.n} samples, {stats['label_tokens']} label tokens, "
                    f"{len(data)} bytes in {time.perf_counter() - t0:.1f}s")
        if zero3 and rounds > n_batches:    # padding batches: the first sample(s) of shard 0, discarded
            pad = [dict(reader.read((0, i)), pad=False) for i in range(min(c.batch_size, shards[0].n))]
            scratch = {"featurize": 0.0, "word_level": 0.0, "generate": 0.0, "word_level_teacher": 0.0}
            for _ in range(rounds - n_batches):
                T.process_shard(model, featurizer, pad, recipe, vocab, device, scratch, "", zero3)
    except StcError as e:   # a cache, stream or model problem: every rank stops with it
        err = f"rank {env.rank}: {e}"
    finally:
        stack.close()
    del model
    _agree(err)
    dist.barrier()
    summary: dict[str, Any] = {}
    if env.rank == 0:
        summary = _write_meta(recipe, out, shards, ident)
    return dist.broadcast_object(summary)


def _shard_stats(records: Sequence[bytes], vocab: int) -> dict[str, Any]:
    """Counts and byte split of a shard's records, plus what the stream plans teacher samples from."""
    lab = ref_b = teach_b = 0
    teacher_samples, dups, empties = [], 0, 0
    for i, r in enumerate(records):
        t = decode_record(r, vocab, decode_topk=False)
        if "ref" in t:
            lab += len(t["ref"].label_ids)
            ref_b += len(t["ref"].topk_bytes or b"")
        if "teacher" in t:
            tt = t["teacher"]
            teach_b += len(tt.topk_bytes or b"") + len(pack_ids(tt.label_ids, vocab))
            if tt.empty:
                empties += 1
            elif tt.equals_ref:
                dups += 1
            else:
                teacher_samples.append([i, len(tt.text), len(tt.label_ids), tt.topk_bytes is not None])
    return {"label_tokens": lab, "ref_topk_bytes": ref_b, "teacher_bytes": teach_b,
            "teacher_samples": teacher_samples, "teacher_equal_ref": dups, "teacher_empty": empties}


def _write_meta(recipe: Any, out: Path, shards: Sequence[ShardInfo], ident: Mapping[str, Any]) -> dict[str, Any]:
    recs = []
    for s in shards:
        rec = _done_ok(out, s)
        if rec is None:
            raise CacheError(f"{out / s.name}: missing or does not match its done record after the build")
        recs.append(rec)
    counts = {"shards": len(recs), "samples": sum(r["n"] for r in recs),
              "label_tokens": sum(r["label_tokens"] for r in recs), "bytes": sum(r["bytes"] for r in recs),
              "ref_topk_bytes": sum(r["ref_topk_bytes"] for r in recs),
              "teacher_samples": sum(len(r["teacher_samples"]) for r in recs),
              "teacher_equal_ref": sum(r["teacher_equal_ref"] for r in recs),
              "teacher_empty": sum(r["teacher_empty"] for r in recs)}
    counts["bytes_per_label_token"] = round(counts["bytes"] / max(counts["label_tokens"], 1), 2)
    shard_list = [{k: r[k] for k in ("name", "n", "bytes", "sha256", "source_sha256", "label_tokens",
                                     "teacher_samples", "host", "rank", "pid", "seconds")} for r in recs]
    meta = build_meta("cache", fingerprints=ident["fingerprints"], config=recipe,
                      **{k: v for k, v in ident.items() if k != "fingerprints"},
                      counts=counts, shards=shard_list, error_bound={
                          "logprob_abs": codec.max_logprob_error(), "kl_per_position": codec.kl_bound()})
    write_meta(out, meta)
    log.get().info(f"cache {out}: {counts['shards']} shard(s), {counts['samples']} samples, "
                   f"{counts['label_tokens']} label tokens, {counts['bytes']} bytes "
                   f"({counts['bytes_per_label_token']} B/label token); {counts['teacher_samples']} teacher "
                   f"sample(s) for sequence-level KD ({counts['teacher_equal_ref']} equal to the reference)")
    return {"out": str(out), "counts": counts}


def _inputs(recipe: Any) -> tuple[Path, str, Path, Path, list[ShardInfo]]:
    """(shard dir, split, out, teacher dir, the split's shards), checked without loading a model."""
    check_options(recipe)
    shards_dir, split, out, teacher = _dirs(recipe)
    try:
        check_model_dir(teacher)
        smeta = read_meta(shards_dir, kind="shards")
        return shards_dir, split, out, teacher, split_shards(smeta, split, source=str(shards_dir / "meta.json"))
    except (ModelLoadError, MetaError) as e:
        raise CacheError(f"teacher/shards: {e}") from None
    except StreamError as e:
        raise CacheError(str(e)) from None


def dry_run(recipe: Any) -> None:
    """``stc cache build --dry-run``: the checks that need no model, and what would be computed."""
    shards_dir, split, out, teacher, shards = _inputs(recipe)
    done = sum(1 for s in shards if (out / DONE_DIR / f"{s.name}.json").exists())
    print(f"cache build (dry run): teacher {teacher}, split {split!r} of {shards_dir}: {len(shards)} "
          f"shard(s), {sum(s.n for s in shards)} samples ({done} shard(s) already done); k={recipe.cache.k}, "
          f"targets {list(recipe.cache.targets)}" + (", ZeRO-3 teacher" if recipe.cache.zero3 else "")
          + f"; write {out}")


def main(recipe: Any, args: Any) -> int:
    if getattr(args, "dry_run", False):
        dry_run(recipe)
        return 0
    summary = build(recipe)
    if dist.env().rank == 0 and summary:
        print_summary({"dir": summary["out"], **summary})
    return 0
