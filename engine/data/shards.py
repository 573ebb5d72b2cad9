"""``stc shards build|inspect``: a manifest becomes WebDataset tar shards of 16 kHz mono FLAC + JSON.

Layout of ``<out>``::

    {split}-{index:06d}.tar   samples_per_shard samples each (the last of a split shorter); per sample
                              ``<key>.audio.flac`` (absent for text-only rows) and ``<key>.json``
    build.jsonl               progress journal: a "start" line, then one line per finished shard
    rejects.jsonl             one line per rejected row: {"line", "id", "file", "reason", "code"}
    config.yaml               the resolved recipe
    meta.json                 written last: its presence means "finished" (schema in :func:`_meta`)

Why a journal: a build over a large corpus runs for hours and gets killed. Each shard is written
to a temporary name, fsynced and renamed, and only then journaled (fsynced) with the manifest rows
it consumed and the rows rejected among them. A rerun reads the journal, checks the shards it
lists (size and sha256), drops stale temporaries and continues after the last journaled row of
each split, so finished shards are never re-encoded and no row is built twice or skipped. The
plan (which rows, in which order, with which key) is recomputed from the manifest on every run and
is deterministic; the journal's first line pins the manifest's sha256 and every option that
changes the output, and a rerun with a different manifest or options refuses instead of mixing.

Bad lengths are never silent: a segment running past its file's end is rejected
(``shards.segment_overrun=reject``, code ``segment_overrun``) or written short and counted
(``truncate``); audio longer than ``shards.max_audio_s`` is rejected in the training split and
truncated in the others (``shards.long_audio=auto``), and meta.json says how many rows each rule
hit per split; samples above full scale are clipped, counted and warned about once per build.

Rows are processed split by split in manifest order; decoding, resampling and FLAC encoding run on
a thread pool (libsndfile and soxr release the GIL) with results consumed in order, so shard
contents do not depend on the number of threads. Tar members are written with fixed owner, mode
and mtime, so the same input gives byte-identical shards.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import os
import socket
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .. import dist, log, stages
from .. import config as cfg
from ..errors import StageError
from ..io import append_jsonl, atomic_write_text, read_jsonl, remove_stale_tmp, sha256_file, tmp_path_for
from ..meta import META_NAME, MetaError, build_meta, fingerprint_data, read_meta, write_meta
from . import audio as _audio
from . import manifest as _manifest
from . import tario

JOURNAL = "build.jsonl"
REJECTS = "rejects.jsonl"
# Bump when the bytes a build writes for the same input change: a journal of another version refuses.
BUILDER_VERSION = 1
_PARAM_KEYS = ("split", "samples_per_shard", "sample_rate", "max_audio_s", "long_audio", "min_audio_s",
               "silence_dbfs", "flac_compression", "corpus", "segment_overrun", "overrun_tolerance_s")

# Test hook: called with each journal record right after it is appended (simulate a kill there).
_on_journal: Callable[[dict], None] | None = None


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ------------------------------------------------------------------------------------------ writing

class _ShardWriter:
    """Streams samples into ``<name>.tmp-<pid>``; ``commit`` fsyncs and renames, hashing on the way."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = tmp_path_for(path)
        self._f = open(self.tmp, "wb")
        self._h = hashlib.sha256()
        self.bytes = 0
        self._tar = tarfile.open(fileobj=self, mode="w", format=tarfile.USTAR_FORMAT)

    # the file-like interface tarfile needs: write and tell
    def write(self, b: bytes) -> int:
        self._f.write(b)
        self._h.update(b)
        self.bytes += len(b)
        return len(b)

    def tell(self) -> int:
        return self.bytes

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = len(data), 0, 0o444, 0, 0
            self._tar.addfile(ti, io.BytesIO(data))

    def commit(self) -> tuple[int, str]:
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.bytes, self._h.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def long_audio_rule(setting: str, split: str, train_split: str) -> str:
    """The rule for audio longer than ``shards.max_audio_s`` in ``split``: ``auto`` rejects rows of the
    training split (a cut clip would keep the whole translation: a wrong pair to learn from) and
    truncates the others (the paper scores its test audio cut to 30 s)."""
    if setting == "auto":
        return "reject" if split == train_split else "truncate"
    return setting


def _long_why(setting: str, split: str, train_split: str) -> str:
    if setting == "auto":
        return (f"; shards.long_audio=auto rejects such rows of the training split {split!r} "
                f"(data.train_split={train_split!r}) because a cut clip would keep the full translation")
    return ""


def _prepare(row: _manifest.Row, sc: cfg.ShardsConfig, corpus: str,
             train_split: str = "train") -> tuple[dict | None, _manifest.Reject | None]:
    """One row -> (members, stats) or a reject. Runs on worker threads: touches no shared state."""
    flac = None
    duration = truncated = overrun = 0.0
    clipped = 0
    if row.audio:
        try:
            clip = _audio.load(row.audio, offset_s=row.offset_s, duration_s=row.duration_s,
                               sample_rate=sc.sample_rate, max_s=sc.max_audio_s,
                               long_audio=long_audio_rule(sc.long_audio, row.split, train_split),
                               long_audio_why=_long_why(sc.long_audio, row.split, train_split),
                               min_s=sc.min_audio_s, silence_dbfs=sc.silence_dbfs,
                               overrun=sc.segment_overrun, overrun_tolerance_s=sc.overrun_tolerance_s)
        except _audio.AudioError as e:
            return None, _manifest.Reject(row.line, row.id, row.audio, e.code, e.reason)
        flac = _audio.encode_flac(clip.samples, sc.sample_rate, sc.flac_compression)
        duration, truncated = round(clip.duration_s, 6), clip.truncated_s
        overrun, clipped = clip.overrun_s, clip.clipped
    doc = {"id": row.id, "src_text": row.src_text, "tgt_text": row.tgt_text, "src_lang": row.src_lang,
           "tgt_lang": row.tgt_lang, "duration_s": duration, "corpus": row.corpus or corpus, "split": row.split,
           "truncated_s": truncated}
    members = {"audio.flac": flac} if flac is not None else {}
    members["json"] = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    return {"members": members, "duration": duration, "truncated": truncated, "overrun": overrun,
            "clipped": clipped}, None


def _ordered(rows: list, fn: Callable, workers: int) -> Iterator:
    """``fn(row)`` for each row, in order, with up to ``2 * workers`` rows in flight."""
    if workers <= 1:
        for r in rows:
            yield fn(r)
        return
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="shards") as pool:
        pending: collections.deque = collections.deque()
        try:
            for r in rows:
                pending.append(pool.submit(fn, r))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


# ------------------------------------------------------------------------------------------ journal

def _params(sc: cfg.ShardsConfig, corpus: str, train_split: str = "train") -> dict:
    p = {k: getattr(sc, k) for k in _PARAM_KEYS}
    p["corpus"] = corpus
    p["builder"] = BUILDER_VERSION
    if sc.long_audio == "auto":  # which split auto treats as training changes the output
        p["data.train_split"] = train_split
    return p


def _diff(old: dict, new: dict) -> list[str]:
    """Readable differences between two build sources (what the journal/meta pinned vs now)."""
    out = []
    if old.get("manifest_sha256") != new["manifest_sha256"]:
        out.append(f"the manifest's content changed (sha256 {str(old.get('manifest_sha256'))[:12]}... then, "
                   f"{new['manifest_sha256'][:12]}... now; {old.get('manifest')} vs {new['manifest']})")
    op, np_ = old.get("params", {}), new["params"]
    for k in sorted(set(op) | set(np_)):
        if op.get(k) != np_.get(k):
            name = "builder version" if k == "builder" else k if "." in k else f"shards.{k}"
            out.append(f"{name}: {op.get(k)!r} then, {np_.get(k)!r} now")
    return out


def _read_journal(path: Path) -> list[dict]:
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        # a kill in the middle of an append: the partial last line was never acknowledged, drop it
        keep = raw[:raw.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(keep))
            f.flush()
            os.fsync(f.fileno())
        log.get().warning(f"{path}: dropped an incomplete last line (the previous run was killed mid-write)")
    recs, bad = read_jsonl(path)
    if bad:
        raise StageError(f"{path} is damaged (line {bad[0][0]}: {bad[0][1]}); delete the output folder "
                         f"{path.parent} and rebuild")
    return recs


def _resume_state(recs: list[dict], plan: dict[str, list[_manifest.Row]], out: Path,
                  journal: Path) -> dict[str, dict]:
    """Per split: finished shard records, next row position, next shard index, done flag."""
    state = {s: {"shards": [], "tail": None, "pos": 0, "index": 0} for s in plan}

    def broken(msg: str) -> StageError:
        return StageError(f"{journal}: {msg}; the output folder does not match its journal: delete "
                          f"{out} and rebuild")

    for r in recs[1:]:
        s = r.get("split")
        if s not in state:
            raise broken(f"lists split {s!r}, which the manifest no longer has")
        st = state[s]
        rows = plan[s]
        if st["tail"] is not None:
            raise broken(f"has records after the end of split {s!r}")
        if r.get("start") != st["pos"] or not (st["pos"] <= r.get("next", -1) <= len(rows)):
            raise broken(f"row ranges of split {s!r} are not contiguous at position {st['pos']}")
        if r["next"] > r["start"] and (rows[r["start"]].line != r.get("first_line")
                                       or rows[r["next"] - 1].line != r.get("last_line")):
            raise broken(f"rows of split {s!r} moved (manifest lines {r.get('first_line')}..{r.get('last_line')})")
        if r.get("type") == "shard":
            if r["index"] != st["index"] or r["record"]["name"] != shard_name(s, st["index"]):
                raise broken(f"shard {r['record'].get('name')} is out of order")
            st["shards"].append(r)
            st["index"] += 1
        elif r.get("type") == "tail":
            st["tail"] = r
        else:
            raise broken(f"unknown record type {r.get('type')!r}")
        st["pos"] = r["next"]
    return state


def _check_shard_files(records: Iterable[dict], out: Path, hash_them: bool) -> list[str]:
    problems = []
    for rec in records:
        p = out / rec["name"]
        if not p.exists():
            problems.append(f"{rec['name']}: missing")
            continue
        size = p.stat().st_size
        if size != rec["bytes"]:
            problems.append(f"{rec['name']}: {size} bytes, expected {rec['bytes']} (truncated or changed)")
            continue
        if hash_them and sha256_file(p) != rec["sha256"]:
            problems.append(f"{rec['name']}: sha256 differs from the one recorded (the file changed)")
    return problems


# ------------------------------------------------------------------------------------------ build

def _out_dir(recipe: cfg.Recipe) -> Path:
    return stages.out_dir("shards build", recipe)


def build(recipe: cfg.Recipe, workers: int | None = None, *, dry_run: bool = False) -> dict:
    """Build (or resume, or confirm) the shards for ``recipe.shards``; returns a summary dict.

    Raises :class:`StageError` for a missing/unreadable manifest, and when ``<out>`` holds a build
    of another manifest or other options (naming what differs).
    """
    sc = recipe.shards
    env = dist.env()
    if env.rank != 0:
        # one writer per folder: other ranks of a multi-process launch leave the work to rank 0
        log.get().info("shards build runs on rank 0 only; nothing to do on this rank")
        return {"status": "skipped (not rank 0)", "read": 0, "written": 0, "rejected": 0, "problems": []}
    if not sc.manifest:
        raise StageError("no manifest given; pass --manifest PATH (or shards.manifest=PATH)")
    if sc.overrun_tolerance_s < 0:
        raise StageError(f"shards.overrun_tolerance_s must be >= 0 seconds, got {sc.overrun_tolerance_s}; "
                         f"set it to 0 or a small positive value such as 0.05")
    man_path = Path(sc.manifest).expanduser()
    out = _out_dir(recipe)
    default_split = sc.split or "train"
    man = _manifest.read(man_path, default_split=default_split, only_split=sc.split)
    corpus = sc.corpus or man_path.stem
    source = {"manifest": str(man_path.resolve()), "manifest_sha256": man.sha256, "format": man.format,
              "params": _params(sc, corpus, recipe.data.train_split)}
    lg = log.get()
    if man.unknown_fields:
        lg.warning("manifest has fields this engine ignores (misspelt?): "
                   + ", ".join(f"{k} ({n} rows)" for k, n in sorted(man.unknown_fields.items())))

    if dry_run:
        return _dry_run(out, man, source)
    out.mkdir(parents=True, exist_ok=True)
    # one build per folder: `stc shards build` holds the lock of <out> (engine.lock)
    if (out / META_NAME).exists():
        return _already_built(out, source)
    journal = out / JOURNAL
    recs = _read_journal(journal)
    if recs:
        if recs[0].get("type") != "start":
            raise StageError(f"{journal}: the first line is not a start record; delete {out} and rebuild")
        diffs = _diff(recs[0].get("source", {}), source)
        if diffs:
            raise StageError(f"{out} holds an unfinished build of another input; differences:\n  - "
                             + "\n  - ".join(diffs)
                             + f"\nrerun with the original manifest and options to finish it, or use "
                               f"another --out (or delete {out}) to start over")
    else:
        strays = sorted(p.name for p in out.glob("*.tar"))
        if strays:
            raise StageError(f"{out} already holds tar files ({', '.join(strays[:3])}"
                             f"{', ...' if len(strays) > 3 else ''}) but no build journal; use an "
                             f"empty --out folder")
    stale = remove_stale_tmp(out)
    if stale:
        lg.info(f"removed {len(stale)} temporary file(s) left by a killed run")
    cfg.save_resolved(recipe, out)

    plan: dict[str, list[_manifest.Row]] = {s: [] for s in man.splits()}
    for row in man.rows:
        plan[row.split].append(row)
    state = _resume_state(recs, plan, out, journal)
    done_records = [r["record"] for st in state.values() for r in st["shards"]]
    bad = _check_shard_files(done_records, out, hash_them=True)
    if bad:
        raise StageError(f"{out}: shards listed in {JOURNAL} do not match it: " + "; ".join(bad)
                         + f"; delete {out} and rebuild")
    if not recs:
        append_jsonl(journal, {"type": "start", "source": source, "host": socket.gethostname(),
                               "pid": os.getpid(), "time": time.time()})
    elif done_records or any(st["tail"] for st in state.values()):
        lg.info(f"resuming {out}: {len(done_records)} finished shard(s) kept, continuing after them")

    _run(plan, state, sc, corpus, out, journal, workers, train_split=recipe.data.train_split)
    meta = _meta(recipe, man, source, state, out)
    counts = meta["counts"]
    lg.info(f"wrote {len(meta['shards'])} shard(s), {counts['written']} samples, {meta['hours']:.3f} h "
            f"to {out}; rejected {counts['rejected']} row(s) (see {out / REJECTS})")
    if counts["clipped"]:
        lg.warning(f"{counts['clipped']} row(s) hold audio above full scale (|x| > 1, e.g. float WAV): "
                   f"{counts['clipped_samples']} sample(s) were clipped to [-1, 1] (example: id "
                   f"{meta.get('clipped_example')!r}); lower the level of those files to keep their peaks")
    status = "resumed" if recs else "built"
    return _summary(meta, out, status)


def _dry_run(out: Path, man: _manifest.Manifest, source: dict) -> dict:
    """What a build would do, checked as the build checks it, without writing anything."""
    splits = collections.Counter(r.split for r in man.rows)
    if (out / META_NAME).exists():
        done = _already_built(out, source)
        what = f"{out} is already built from this manifest: nothing to do"
        return {**done, "status": "dry run", "plan": what}
    recs = _read_journal(out / JOURNAL) if (out / JOURNAL).exists() else []
    if recs:
        diffs = _diff(recs[0].get("source", {}), source)
        if diffs:
            raise StageError(f"{out} holds an unfinished build of another input; differences:\n  - "
                             + "\n  - ".join(diffs))
        n = sum(1 for r in recs if r.get("type") == "shard")
        what = f"resume the unfinished build in {out} ({n} shard(s) done)"
    elif out.exists() and any(out.glob("*.tar")):
        raise StageError(f"{out} already holds tar files but no build journal; use an empty --out folder")
    else:
        what = f"build {out}"
    print(f"shards build (dry run): {len(man.rows)} manifest rows ("
          + ", ".join(f"{s} {n}" for s, n in sorted(splits.items())) + f") from {source['manifest']}; "
          + what)
    return {"status": "dry run", "out": str(out), "read": len(man.rows), "written": 0, "rejected": 0,
            "splits": {}, "problems": [], "notes": [], "plan": what}


def _already_built(out: Path, source: dict) -> dict:
    try:
        meta = read_meta(out, kind="shards")
    except MetaError as e:
        raise StageError(str(e)) from None
    diffs = _diff(meta.get("source", {}), source)
    if diffs:
        raise StageError(f"{out} already holds a finished build of another input; differences:\n  - "
                         + "\n  - ".join(diffs) + f"\nuse another --out, or delete {out} to rebuild")
    bad = _check_shard_files(meta["shards"], out, hash_them=False)
    if bad:
        raise StageError(f"{out} is finished but its shards do not match meta.json: " + "; ".join(bad)
                         + f"; run `stc shards inspect {out}` for details, delete {out} and rebuild")
    log.get().info(f"{out} is up to date (built {meta.get('created')}); nothing to do")
    return _summary(meta, out, "up to date")


def _new_stats() -> dict:
    return {"truncated": 0, "truncated_seconds": 0.0, "overrun": 0, "overrun_seconds": 0.0, "clipped": 0,
            "clipped_samples": 0, "clipped_example": "", "languages": collections.Counter()}


def _run(plan: dict[str, list[_manifest.Row]], state: dict[str, dict], sc: cfg.ShardsConfig, corpus: str,
         out: Path, journal: Path, workers: int | None, *, train_split: str = "train") -> None:
    nworkers = workers if workers is not None else min(8, os.cpu_count() or 1)
    total = sum(len(r) for r in plan.values())
    already = sum(st["pos"] for st in state.values())
    t0 = time.monotonic()
    seen = 0
    hours = sum(r["record"]["seconds"] for st in state.values() for r in st["shards"]) / 3600
    with log.progress() as prog:
        task = prog.task("shards build", total=total, unit="rows", completed=already)
        for split, rows in plan.items():
            st = state[split]
            if st["tail"] is not None or st["pos"] >= len(rows):
                continue
            start = st["pos"]
            writer: _ShardWriter | None = None
            cur: list[list] = []
            rejects: list[dict] = []
            stats = _new_stats()

            def finish(next_pos: int) -> None:
                nonlocal writer, cur, rejects, start, stats
                rec = {"type": "tail", "split": split, "start": start, "next": next_pos,
                       "first_line": rows[start].line, "last_line": rows[next_pos - 1].line,
                       "rejects": rejects, "host": socket.gethostname(), "pid": os.getpid()}
                if writer is not None:
                    nbytes, digest = writer.commit()
                    rec.update(type="shard", index=st["index"], record={
                        "name": writer.path.name, "split": split, "n": len(cur), "bytes": nbytes,
                        "sha256": digest, "seconds": round(sum(c[1] for c in cur), 6), "samples": cur},
                        truncated=stats["truncated"], truncated_seconds=round(stats["truncated_seconds"], 6),
                        overrun=stats["overrun"], overrun_seconds=round(stats["overrun_seconds"], 6),
                        clipped=stats["clipped"], clipped_samples=stats["clipped_samples"],
                        clipped_example=stats["clipped_example"], languages=dict(stats["languages"]))
                    st["shards"].append(rec)
                    st["index"] += 1
                else:
                    st["tail"] = rec
                append_jsonl(journal, rec)
                st["pos"] = start = next_pos
                writer, cur, rejects = None, [], []
                stats = _new_stats()
                if _on_journal is not None:
                    _on_journal(rec)

            results = _ordered(rows[start:], lambda r: _prepare(r, sc, corpus, train_split), nworkers)
            try:
                # closing(): on an error, cancel queued rows and join the pool before the error leaves
                with contextlib.closing(results):
                    for i, (res, rej) in enumerate(results, start):
                        row = rows[i]
                        if rej is not None:
                            rejects.append(rej.to_json())
                        else:
                            if writer is None:
                                writer = _ShardWriter(out / shard_name(split, st["index"]))
                            writer.add(row.key, res["members"])
                            cur.append([row.key, res["duration"], len(row.tgt_text)])
                            stats["languages"][f"{row.src_lang}-{row.tgt_lang}"] += 1
                            if res["truncated"] > 0:
                                stats["truncated"] += 1
                                stats["truncated_seconds"] += res["truncated"]
                            if res["overrun"] > 0:
                                stats["overrun"] += 1
                                stats["overrun_seconds"] += res["overrun"]
                            if res["clipped"] > 0:
                                stats["clipped"] += 1
                                stats["clipped_samples"] += res["clipped"]
                                stats["clipped_example"] = stats["clipped_example"] or row.id
                            hours += res["duration"] / 3600
                        seen += 1
                        rate = seen / max(time.monotonic() - t0, 1e-9)
                        task.advance(1, **{"h audio": round(hours, 3), "rows/s": round(rate, 1)})
                        if len(cur) == sc.samples_per_shard:
                            finish(i + 1)
                    if cur or rejects:
                        finish(len(rows))
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise


# ------------------------------------------------------------------------------------------ meta

def _meta(recipe: cfg.Recipe, man: _manifest.Manifest, source: dict, state: dict[str, dict],
          out: Path) -> dict:
    records = sorted((r["record"] for st in state.values() for r in st["shards"]), key=lambda r: r["name"])
    row_rejects = [rj for st in state.values()
                   for r in st["shards"] + ([st["tail"]] if st["tail"] else []) for rj in r["rejects"]]
    rejects = sorted([r.to_json() for r in man.rejects] + row_rejects, key=lambda r: r["line"])
    written = sum(r["n"] for r in records)
    if man.read != written + len(rejects):
        raise StageError(f"internal error: {man.read} rows read but {written} written + {len(rejects)} "
                         f"rejected; delete {out} and rebuild, and report this")
    shard_recs = [r for st in state.values() for r in st["shards"]]
    languages: collections.Counter = collections.Counter()
    for r in shard_recs:
        languages.update(r["languages"])
    by_reason = collections.Counter(r["code"] for r in rejects)
    splits: dict[str, dict] = {}
    for rec in records:
        s = splits.setdefault(rec["split"], {"n": 0, "hours": 0.0, "shards": 0})
        s["n"] += rec["n"]
        s["hours"] += rec["seconds"] / 3600
        s["shards"] += 1
    for s in splits.values():
        s["hours"] = round(s["hours"], 6)
    written_keys = {smp[0] for rec in records for smp in rec["samples"]}
    key_map = {row.key: row.id for row in man.rows if row.key != row.id and row.key in written_keys}
    counts = {"read": man.read, "written": written, "rejected": len(rejects),
              "truncated": sum(r["truncated"] for r in shard_recs),
              "truncated_seconds": round(sum(r["truncated_seconds"] for r in shard_recs), 6),
              "too_long_rejected": by_reason.get("too_long", 0),
              "overrun": sum(r.get("overrun", 0) for r in shard_recs),
              "overrun_seconds": round(sum(r.get("overrun_seconds", 0.0) for r in shard_recs), 6),
              "overrun_rejected": by_reason.get("segment_overrun", 0),
              "clipped": sum(r.get("clipped", 0) for r in shard_recs),
              "clipped_samples": sum(r.get("clipped_samples", 0) for r in shard_recs),
              "other_split": man.other_split}
    clipped_example = next((r["clipped_example"] for r in shard_recs if r.get("clipped_example")), "")
    sc = recipe.shards
    long_audio: dict[str, Any] = {"setting": sc.long_audio, "max_audio_s": sc.max_audio_s, "splits": {}}
    if sc.long_audio == "auto":
        long_audio["train_split"] = recipe.data.train_split
    for split, st in state.items():
        recs_ = st["shards"] + ([st["tail"]] if st["tail"] else [])
        long_audio["splits"][split] = {
            "rule": long_audio_rule(sc.long_audio, split, recipe.data.train_split),
            "rejected": sum(1 for r in recs_ for rj in r["rejects"] if rj["code"] == "too_long"),
            "truncated": sum(r["truncated"] for r in st["shards"]),
            "truncated_seconds": round(sum(r["truncated_seconds"] for r in st["shards"]), 6)}
    atomic_write_text(out / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    meta = build_meta(
        "shards",
        fingerprints={"data": fingerprint_data(records) if records else None,
                      "manifest": "sha256:" + man.sha256},
        config=recipe,
        source=source,
        audio={"codec": "flac", "subtype": "PCM_16", "sample_rate": recipe.shards.sample_rate, "channels": 1,
               "max_audio_s": recipe.shards.max_audio_s},
        shards=records,
        splits=splits,
        counts=counts,
        rejected_by_reason=dict(sorted(by_reason.items())),
        languages=dict(sorted(languages.items())),
        hours=round(sum(r["seconds"] for r in records) / 3600, 6),
        key_map=key_map,
        long_audio=long_audio,
        clipped_example=clipped_example,
    )
    write_meta(out, meta)
    return meta


def _summary(meta: dict, out: Path, status: str, problems: list[str] | None = None,
             notes: list[str] | None = None) -> dict:
    c = meta.get("counts", {})
    return {
        "status": status, "out": str(out),
        "read": c.get("read", 0), "written": c.get("written", 0), "rejected": c.get("rejected", 0),
        "truncated": c.get("truncated", 0), "truncated_seconds": c.get("truncated_seconds", 0.0),
        "too_long_rejected": c.get("too_long_rejected", 0),
        "overrun": c.get("overrun", 0), "overrun_seconds": c.get("overrun_seconds", 0.0),
        "overrun_rejected": c.get("overrun_rejected", 0),
        "clipped": c.get("clipped", 0), "clipped_samples": c.get("clipped_samples", 0),
        "clipped_example": meta.get("clipped_example", ""),
        "long_audio": meta.get("long_audio", {}),
        "other_split": c.get("other_split", 0),
        "shards": len(meta.get("shards", [])), "hours": meta.get("hours", 0.0),
        "splits": meta.get("splits", {}), "languages": meta.get("languages", {}),
        "rejected_by_reason": meta.get("rejected_by_reason", {}),
        "problems": list(problems or []), "notes": list(notes or []),
    }


# ------------------------------------------------------------------------------------------ inspect

def inspect(directory: str | os.PathLike, verify: bool = False) -> dict:
    """Check a finished shard folder against its meta.json; returns the summary with ``problems``.

    Every listed shard must exist with the recorded size (and sha256 with ``verify``), be a complete,
    safe tar (see :mod:`engine.data.tario`) and hold the recorded keys in order with a ``json``
    member, plus ``audio.flac`` for samples with audio. ``verify`` also parses every JSON member.
    """
    out = Path(directory)
    if not out.is_dir():
        raise StageError(f"{out} is not a folder; pass the --out folder of `stc shards build`")
    if not (out / META_NAME).exists():
        j = out / JOURNAL
        hint = (f"the build did not finish ({j.name} is there): rerun `stc shards build` with the same "
                f"manifest and --out to resume it") if j.exists() else "run `stc shards build` first"
        raise StageError(f"{out} has no {META_NAME}; {hint}")
    try:
        meta = read_meta(out, kind="shards")
    except MetaError as e:
        raise StageError(str(e)) from None
    problems: list[str] = []
    notes: list[str] = []
    records = meta.get("shards", [])
    problems += _check_shard_files(records, out, hash_them=verify)
    present = {r["name"] for r in records}
    for rec in records:
        p = out / rec["name"]
        if not p.exists():
            continue
        try:
            index = tario.index_tar(p)
        except tario.TarError as e:
            problems.append(f"{rec['name']}: {e}")
            continue
        keys = [s.key for s in index]
        want = [smp[0] for smp in rec["samples"]]
        if len(index) != rec["n"] or keys != want:
            problems.append(f"{rec['name']}: holds {len(index)} samples, meta.json lists {rec['n']}"
                            + ("" if len(index) != rec["n"] else " (keys differ)"))
            continue
        for s, smp in zip(index, rec["samples"]):
            need = {"json"} | ({"audio.flac"} if smp[1] > 0 else set())
            if not need <= set(s.members):
                problems.append(f"{rec['name']}: sample {s.key} lacks {', '.join(sorted(need - set(s.members)))}")
                break
            if verify:
                off, size = s.members["json"]
                try:
                    doc = json.loads(tario.read_member(p, off, size))
                    if meta.get("key_map", {}).get(s.key, s.key) != doc.get("id"):
                        raise ValueError(f"id {doc.get('id')!r} does not map to key {s.key!r}")
                except (ValueError, tario.TarError) as e:
                    problems.append(f"{rec['name']}: sample {s.key}: bad json member ({e})")
                    break
    if records:
        try:
            fp = fingerprint_data(records)
            if meta.get("fingerprints", {}).get("data") != fp:
                problems.append("meta.json data fingerprint does not match its shard list")
        except MetaError as e:
            problems.append(str(e))
    c = meta.get("counts", {})
    if c.get("read") != c.get("written", 0) + c.get("rejected", 0):
        problems.append(f"counts do not add up: read {c.get('read')} != written {c.get('written')} + "
                        f"rejected {c.get('rejected')}")
    if sum(r["n"] for r in records) != c.get("written"):
        problems.append(f"shards hold {sum(r['n'] for r in records)} samples, counts.written is "
                        f"{c.get('written')}")
    extra = sorted(p.name for p in out.glob("*.tar") if p.name not in present)
    if extra:
        notes.append(f"tar files not listed in meta.json (ignored by readers): {', '.join(extra)}")
    stale = sorted(p.name for p in out.iterdir() if ".tmp-" in p.name)
    if stale:
        notes.append(f"temporary files left by a killed run: {', '.join(stale)}")
    return _summary(meta, out, "verified" if verify else "checked", problems, notes)


# ------------------------------------------------------------------------------------------ output

def print_summary(summary: dict[str, Any]) -> None:
    """Rich tables: splits, languages, rejects by reason, truncation, and any problems."""
    from rich.table import Table

    con = log.console

    def say(msg: str) -> None:   # one line per fact, never wrapped: logs are grepped
        con.print(msg, soft_wrap=True)
    t = Table(title=f"shards: {summary.get('out', '')} ({summary.get('status', '')})", title_justify="left")
    for col in ("split", "shards", "samples", "hours"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for name, s in sorted(summary.get("splits", {}).items()):
        t.add_row(name, str(s["shards"]), str(s["n"]), f"{s['hours']:.3f}")
    t.add_row("[bold]total", str(summary.get("shards", 0)), str(summary.get("written", 0)),
              f"{summary.get('hours', 0.0):.3f}")
    con.print(t)
    if summary.get("languages"):
        lt = Table(title="languages", title_justify="left")
        lt.add_column("pair")
        lt.add_column("samples", justify="right")
        for k, v in summary["languages"].items():
            lt.add_row(k, str(v))
        con.print(lt)
    say(f"rows read {summary.get('read', 0)}, written {summary.get('written', 0)}, "
        f"rejected {summary.get('rejected', 0)}; truncated {summary.get('truncated', 0)} "
        f"({summary.get('truncated_seconds', 0.0):.1f} s cut)"
        + (f"; {summary['other_split']} rows of other splits skipped" if summary.get("other_split") else ""))
    la = summary.get("long_audio") or {}
    if la.get("splits"):
        how = ", ".join(
            f"{name}: {v['rule']} ({v['rejected']} rejected, {v['truncated']} truncated)"
            for name, v in sorted(la["splits"].items()))
        say(f"audio over {la.get('max_audio_s')} s (shards.long_audio={la.get('setting')}"
              + (f", training split {la['train_split']!r}" if la.get("train_split") else "") + f"): {how}")
    if summary.get("overrun") or summary.get("overrun_rejected"):
        say(f"segments past the end of their file: {summary.get('overrun_rejected', 0)} rejected, "
              f"{summary.get('overrun', 0)} written short ({summary.get('overrun_seconds', 0.0):.2f} s "
              f"missing)")
    if summary.get("clipped"):
        say(f"[yellow]clipped:[/] {summary['clipped']} row(s) above full scale, "
              f"{summary.get('clipped_samples', 0)} sample(s) clipped (e.g. id "
              f"{summary.get('clipped_example')!r})")
    if summary.get("rejected_by_reason"):
        rt = Table(title="rejected by reason", title_justify="left")
        rt.add_column("reason")
        rt.add_column("rows", justify="right")
        for k, v in summary["rejected_by_reason"].items():
            rt.add_row(k, str(v))
        con.print(rt)
        say(f"details: {Path(summary.get('out', '.')) / REJECTS}")
    for n in summary.get("notes", []):
        say(f"[yellow]note:[/] {n}")
    for p in summary.get("problems", []):
        say(f"[bold red]problem:[/] {p}")


# ------------------------------------------------------------------------------------------ stc entries

def main(recipe: cfg.Recipe, args: Any) -> int:
    """``stc shards build``: 0 when something was written (or nothing was to be), 1 when every row was
    rejected."""
    summary = build(recipe, dry_run=bool(getattr(args, "dry_run", False)))
    if summary.get("status") == "dry run":
        return 0
    print_summary(summary)
    return 0 if summary.get("written", 0) > 0 or summary.get("read", 0) == 0 else 1


def inspect_main(recipe: Any, args: Any) -> int:
    """``stc shards inspect DIR [--verify]``: 1 when a problem is found."""
    summary = inspect(args.dir, verify=args.verify)
    print_summary(summary)
    return 0 if not summary.get("problems") else 1
