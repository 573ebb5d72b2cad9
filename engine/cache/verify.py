"""``stc cache verify``: is a cache complete, unchanged and readable?"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ..data.stream import StreamError, shards_fingerprint, shards_from_meta
from ..io import sha256_file
from ..log import console
from ..meta import MetaError, fingerprint_model, read_meta
from .format import BUILD_NAME, DONE_DIR, FORMAT, CacheError, decode_record, index_shard, key_diff, read_entry

def verify(cache_dir: str | os.PathLike, deep: bool = False) -> dict[str, Any]:
    """``stc cache verify``: completeness vs the audio shards, fingerprints, sizes and checksums.

    Always: the cache's format is this engine's (``FORMAT``); every audio shard of the cached split
    has its cache shard; the audio shards are the ones cached (per-shard sha256 against
    ``meta.json``); each cache shard's size and sha256 match; its packs' framing holds (magic,
    version, index CRC, sizes; :func:`index_shard`) and their keys are the audio shard's keys in the
    same order, each once; the teacher still has the
    fingerprint it had (when its directory exists). ``deep`` also decodes every record.
    """
    d = Path(cache_dir)
    problems: list[str] = []
    try:
        meta = read_meta(d, kind="cache")
    except MetaError as e:
        bp = d / BUILD_NAME
        extra = ""
        if bp.exists():
            n = len(list((d / DONE_DIR).glob("*.json")))
            extra = f" (an unfinished build: {n} shard(s) done; rerun `stc cache build` to finish it)"
        return {"dir": str(d), "problems": [f"{e}{extra}"], "shards": 0}
    if meta.get("format") != FORMAT:
        return {"dir": str(d), "problems": [f"cache format {meta.get('format')!r}, this engine reads {FORMAT!r}: "
                                            f"rebuild the cache"], "shards": 0}
    src = Path(meta["source"]["shards_dir"])
    try:
        smeta = read_meta(src, kind="shards")
        audio = shards_from_meta(smeta, meta["split"])
    except (MetaError, StreamError) as e:
        return {"dir": str(d), "problems": [f"audio shards {src}: {e}"], "shards": 0}
    if shards_fingerprint(audio) != meta["fingerprints"].get("data"):
        problems.append(f"audio shards of split {meta['split']!r} in {src} changed since caching "
                        f"(data fingerprint differs): rebuild the cache")
    recs = {r["name"]: r for r in meta["shards"]}
    for a in audio:
        r = recs.get(a.name)
        if r is None:
            problems.append(f"{a.name}: audio shard has no cache shard (incomplete cache)")
            continue
        if r["source_sha256"] != a.sha256:
            problems.append(f"{a.name}: the audio shard changed since caching (sha256 differs)")
        p = d / a.name
        if not p.exists():
            problems.append(f"{a.name}: cache shard missing")
            continue
        size = p.stat().st_size
        if size != r["bytes"]:
            problems.append(f"{a.name}: {size} bytes, meta.json says {r['bytes']} "
                            f"({'truncated' if size < r['bytes'] else 'changed'})")
            continue
        if sha256_file(p) != r["sha256"]:
            problems.append(f"{a.name}: sha256 differs from meta.json (the shard changed)")
            continue
        try:
            idx = index_shard(p)
        except CacheError as e:
            problems.append(str(e))
            continue
        keys = [s.key for s in idx]
        if keys != list(a.keys):
            problems.append(f"{a.name}: {key_diff(keys, a.keys)}")
            continue
        if deep:
            for s in idx:
                try:
                    decode_record(read_entry(p, s), meta["vocab_size"], name=f"{a.name}:{s.key}")
                except CacheError as e:
                    problems.append(f"{a.name}:{s.key}: {e}")
    extra = sorted(set(recs) - {a.name for a in audio})
    if extra:
        problems.append(f"meta.json lists cache shards with no audio shard: {', '.join(extra[:3])}")
    teacher = Path(meta.get("config", {}).get("cache", {}).get("teacher") or
                   meta.get("config", {}).get("model", {}).get("path") or "")
    if str(teacher) and (teacher / "config.json").exists():
        try:
            if fingerprint_model(teacher) != meta["fingerprints"].get("teacher"):
                problems.append(f"teacher {teacher} changed since caching (weights fingerprint differs)")
        except MetaError as e:
            problems.append(f"teacher {teacher}: {e}")
    return {"dir": str(d), "problems": problems, "shards": len(audio), "counts": meta.get("counts", {})}



def print_summary(summary: Mapping[str, Any]) -> None:
    if summary.get("problems"):
        console.print(f"[red]cache {summary['dir']}: {len(summary['problems'])} problem(s)[/red]")
        for p in summary["problems"]:
            console.print(f"  - {p}")
    else:
        c = summary.get("counts", {})
        console.print(f"cache {summary.get('dir', summary.get('out'))}: OK, {c.get('shards', summary.get('shards'))} "
                      f"shard(s), {c.get('samples')} samples, {c.get('label_tokens')} label tokens, "
                      f"{c.get('bytes')} bytes ({c.get('bytes_per_label_token')} B/label token)")


def main(recipe: Any, args: Any) -> int:
    """``stc cache verify DIR [--verify]``: 1 when a problem is found."""
    summary = verify(args.dir, deep=args.verify)
    print_summary(summary)
    return 0 if not summary["problems"] else 1
