"""The training stream: shards -> length-bucketed batches, split by rank and worker, resumable exactly once.

Why a planned stream rather than webdataset's pipeline of shuffles: webdataset decides the batch
sequence inside each worker (shard split by worker, shuffle buffers), so the sequence depends on the
number of workers and a resumed run cannot say which samples it has already seen. Here the whole
epoch is planned up front, in the main process of every rank, from ``meta.json`` alone:

1. **Shard order.** Shards in name order; shuffled by a RNG seeded with (seed, epoch) when
   ``shuffle`` is on.
2. **Deal to ranks.** Each shard, in that order, goes whole to the rank with the fewest samples so
   far (ties: the lower rank). Ranks read disjoint shards.
3. **Balance** (the one documented exception to disjointness). With N samples over W ranks, the
   ``N % W`` ranks that hold the most samples (ties: the lower rank) are allowed ``N // W + 1``
   samples, the others ``N // W``. Every rank above its allowance hands the *tail* of its sample list
   (its last samples, in order; donors taken in rank order) to the ranks below theirs (taken in
   rank order), which append them. Per-rank sample counts then differ by at most one.
4. **Bucket.** Each rank walks its samples in order in windows of ``bucket_window`` samples rounded
   up to a multiple of ``batch_size`` (so only the rank's very last batch can be short), sorts a
   window by (duration, target characters, position) and cuts it into batches; the batches of a
   window are shuffled with a RNG seeded by (seed, epoch, rank) when ``shuffle`` is on.
5. **Equalise.** Counts that differ by one sample can still give batch counts that differ by one.
   A rank with fewer batches gets padding batches at the end: one copy of its shortest sample
   (the shortest of the whole epoch when the rank has none), flagged ``pad=True``, whose labels are
   all -100, so it adds nothing to a loss normalised by label tokens and is never counted as
   delivered. Every rank therefore yields exactly the same number of batches per epoch and
   collectives cannot hang.

Workers only *execute* the plan: worker ``w`` of ``W`` produces the planned batches ``i`` (counted
from the resume point) with ``i % W == w``; torch's DataLoader collects them round-robin, which
restores plan order. The main-process iterator checks every batch index against the plan and
counts a batch as consumed when it hands it to the caller, so prefetched batches are never counted.

**Resume.** The state names the plan (world size, batch size, window, shuffle, shard fingerprint,
and the samples that were excluded when the plan was made), the number of batches consumed, and the
samples delivered so far by *all* ranks, as ``[start, end)`` index ranges per shard. Every rank can
compute that set: the plan is deterministic and all ranks consume the same number of batches.
Loading a state with the same plan skips exactly ``batches_consumed`` batches, so the continuation
equals an uninterrupted run batch for batch, whatever the worker count. Loading it with another
world size or batch size re-plans only the undelivered samples of the epoch with the same rule for
the new world. Improvement over the brief, with its reason: the state also records ``plan.base``,
the samples the current plan excluded (empty for a fresh epoch). Without it a run that was re-planned
once could not be resumed batch-for-batch a second time, because its plan could not be rebuilt.

**Teacher cache join** (``join``). The stream does not know the cache format: the caller hands it a
factory ``join(shards, builder=...)`` (in practice :func:`engine.cache.join.joiner`) and the stream uses what it returns, per sample, before bucketing:
``virtual_infos`` (extra :class:`ShardInfo` entries, e.g. the teacher translations for sequence-level
KD, planned like any shard so exactly-once and resume hold for them too), ``wrap_reader(reader)``
(reads a ref of a real or virtual shard and attaches the cache record) and ``wrap_featurizer(f)``
(adds the targets aligned with ``labels``). Batches then also carry ``targets`` and ``kd_ids``
[B,T,k], ``kd_logprobs`` [B,T,k], ``kd_tail`` [B,T], ``kd_mask`` [B,T] (meaning and checks in
:mod:`engine.cache.join`). The shard fingerprint covers the virtual shards, so a state saved without
them is refused by a stream with them and vice versa.

**Split-by-node check.** Like webdataset's ``single_node_only``, a stream that is told
``world_size=1`` (or any world or rank that differs from the launcher's) while the dist layer sees
several ranks refuses, because every rank would read the same samples; pass ``allow_unsplit=True``
when that is intended (e.g. rank 0 alone evaluates a dev set).

**Reading.** Random access into the tars (member offsets from :func:`engine.data.tario.index_tar`,
indexed lazily per shard and cached per worker process), the way webdataset's indexed ``wids``
reader works. A shard's size is checked against ``meta.json`` when first opened (cheap); with
``verify_sha256`` the rank's shards are hashed once, in the main process, before workers start (so
workers do not re-hash every epoch); a truncated shard is an error naming it. Workers are not
persistent: the plan's start position is handed to fresh workers at the start of each epoch.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import soundfile as sf
import soxr

from .. import dist
from ..errors import StcError
from ..io import atomic_write_json, sha256_file
from ..log import console
from ..meta import fingerprint_data
from . import tario

STATE_VERSION = 1

Ref = tuple[int, int]          # (shard position in name order, sample index within the shard)
Ranges = dict[str, list[list[int]]]  # shard name -> sorted, merged [start, end) index ranges


class StreamError(StcError):
    """A problem with the shards, the plan or a saved state; the message says what to do."""


# ============================================================================================ shards

@dataclass(frozen=True)
class ShardInfo:
    """One shard as ``meta.json`` describes it (enough to plan without opening the tar)."""
    name: str
    n: int
    bytes: int
    sha256: str
    keys: tuple[str, ...]
    lengths: tuple[tuple[float, int], ...]  # (duration_s, n_tgt_chars) per sample, in tar order


def shards_from_meta(meta: Mapping[str, Any], split: str | None = None,
                     source: str = "meta.json") -> list[ShardInfo]:
    """The shards of ``split`` (all when None) from a shards ``meta.json``, in name order."""
    recs = meta.get("shards")
    if not isinstance(recs, list):
        raise StreamError(f"{source}: no 'shards' list; is this a directory written by `stc shards build`?")
    out: list[ShardInfo] = []
    for r in recs:
        if split is not None and r.get("split") != split:
            continue
        samples = r.get("samples")
        if samples is None:
            raise StreamError(f"{source}: shard {r.get('name')!r} has no per-sample 'samples' list; "
                              f"rebuild the shards with this version of `stc shards build`")
        if len(samples) != int(r["n"]):
            raise StreamError(f"{source}: shard {r['name']!r} says n={r['n']} but lists {len(samples)} samples")
        out.append(ShardInfo(
            name=str(r["name"]), n=int(r["n"]), bytes=int(r.get("bytes", 0)), sha256=str(r.get("sha256", "")),
            keys=tuple(str(s[0]) for s in samples),
            lengths=tuple((float(s[1]), int(s[2])) for s in samples)))
    out.sort(key=lambda s: s.name)
    return out


def splits_in(meta: Mapping[str, Any]) -> list[str]:
    """The split names a shards ``meta.json`` holds."""
    return sorted({str(r.get("split")) for r in meta.get("shards") or [] if r.get("split") is not None})


def split_shards(meta: Mapping[str, Any], split: str, source: str = "meta.json") -> list[ShardInfo]:
    """The shards of ``split``; :class:`StreamError` naming the splits that exist when it has none."""
    out = shards_from_meta(meta, split, source=source)
    if not out:
        raise StreamError(f"{source}: no shards of split {split!r}; splits there: "
                          f"{', '.join(splits_in(meta)) or 'none'}")
    return out


def shards_fingerprint(shards: Sequence[ShardInfo]) -> str:
    if not shards:
        return "sha256:none"
    return fingerprint_data({"name": s.name, "sha256": s.sha256} for s in shards)


# ============================================================================================ ranges

def to_ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted, merged ``[start, end)`` ranges of a set of indices."""
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def from_ranges(ranges: Iterable[Sequence[int]]) -> set[int]:
    s: set[int] = set()
    for a, b in ranges:
        s.update(range(int(a), int(b)))
    return s


def refs_to_ranges(refs: Iterable[Ref], shards: Sequence[ShardInfo]) -> Ranges:
    by: dict[int, set[int]] = {}
    for si, i in refs:
        by.setdefault(si, set()).add(i)
    return {shards[si].name: to_ranges(ix) for si, ix in sorted(by.items())}


def ranges_to_refs(ranges: Mapping[str, Iterable[Sequence[int]]], shards: Sequence[ShardInfo]) -> set[Ref]:
    pos = {s.name: k for k, s in enumerate(shards)}
    out: set[Ref] = set()
    for name, rs in ranges.items():
        if name not in pos:
            raise StreamError(f"saved stream state names shard {name!r}, which is not in this shard set")
        k = pos[name]
        for i in from_ranges(rs):
            if not 0 <= i < shards[k].n:
                raise StreamError(f"saved stream state names sample {i} of shard {name!r}, "
                                  f"which has {shards[k].n} samples")
            out.add((k, i))
    return out


# ============================================================================================ planner
# Pure functions: (shards, parameters) -> batches. No I/O, no torch; unit-tested without tars.

@dataclass(frozen=True)
class Batch:
    """A planned batch: sample refs (in batch order) and whether it is a padding batch."""
    refs: tuple[Ref, ...]
    pad: bool = False


def _rng(*parts: Any) -> random.Random:
    # A str seed is hashed with sha512 by `random`, independent of PYTHONHASHSEED: stable everywhere.
    return random.Random(":".join(str(p) for p in parts))


def shard_order(n_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n_shards))
    if shuffle:
        _rng("shards", seed, epoch).shuffle(order)
    return order


def deal(pieces: Sequence[Sequence[Ref]], world_size: int) -> list[list[Ref]]:
    """Each piece (a shard's samples), in order, whole to the rank with the fewest samples so far."""
    ranks: list[list[Ref]] = [[] for _ in range(world_size)]
    for piece in pieces:
        r = min(range(world_size), key=lambda k: (len(ranks[k]), k))
        ranks[r].extend(piece)
    return ranks


def balance(per_rank: Sequence[Sequence[Ref]]) -> list[list[Ref]]:
    """Move tail samples from ranks over their allowance to ranks under it (module docstring, 3)."""
    lists = [list(x) for x in per_rank]
    w = len(lists)
    total = sum(len(x) for x in lists)
    q, rem = divmod(total, w)
    by_size = sorted(range(w), key=lambda k: (-len(lists[k]), k))
    allow = [q] * w
    for k in by_size[:rem]:
        allow[k] = q + 1
    pool: list[Ref] = []
    for k in range(w):
        extra = len(lists[k]) - allow[k]
        if extra > 0:
            pool.extend(lists[k][-extra:])
            del lists[k][-extra:]
    for k in range(w):
        need = allow[k] - len(lists[k])
        if need > 0:
            lists[k].extend(pool[:need])
            del pool[:need]
    assert not pool
    return lists


def bucket(refs: Sequence[Ref], lengths: Callable[[Ref], tuple[float, int]], *, batch_size: int,
           bucket_window: int, rng: random.Random | None) -> list[Batch]:
    """Length-bucketed batches of one rank's samples (module docstring, 4)."""
    window = max(1, math.ceil(bucket_window / batch_size)) * batch_size
    out: list[Batch] = []
    for w0 in range(0, len(refs), window):
        chunk = list(enumerate(refs[w0:w0 + window]))
        chunk.sort(key=lambda pr: (*lengths(pr[1]), pr[0]))
        ordered = [r for _, r in chunk]
        batches = [Batch(tuple(ordered[b:b + batch_size])) for b in range(0, len(ordered), batch_size)]
        if rng is not None:
            rng.shuffle(batches)
        out.extend(batches)
    return out


@dataclass(frozen=True)
class Plan:
    """One epoch's batches for every rank (all ranks compute the same plan)."""
    epoch: int
    world_size: int
    batch_size: int
    batches: tuple[tuple[Batch, ...], ...]      # [rank][batch]
    base: frozenset[Ref]                         # samples excluded when planning (delivered before)

    @property
    def n_batches(self) -> int:
        return len(self.batches[0]) if self.batches else 0

    def delivered(self, consumed: int) -> set[Ref]:
        """Samples delivered by all ranks after each consumed ``consumed`` batches (plus ``base``)."""
        out = set(self.base)
        for rank_batches in self.batches:
            for b in rank_batches[:consumed]:
                if not b.pad:
                    out.update(b.refs)
        return out


def plan_epoch(shards: Sequence[ShardInfo], *, seed: int, epoch: int, world_size: int, batch_size: int,
               bucket_window: int, shuffle: bool, exclude: Iterable[Ref] = ()) -> Plan:
    """Plan an epoch over every sample not in ``exclude`` (module docstring, 1-5)."""
    if world_size < 1 or batch_size < 1 or bucket_window < 1:
        raise StreamError(f"world_size, batch_size and bucket_window must be >= 1 "
                          f"(got {world_size}, {batch_size}, {bucket_window})")
    excluded = frozenset(exclude)
    total = sum(s.n for s in shards)
    if not excluded and total < world_size:
        raise StreamError(f"{total} sample{'s' * (total != 1)} for {world_size} ranks: every rank needs at "
                          f"least one sample; use fewer ranks or more data")
    pieces = []
    for si in shard_order(len(shards), seed=seed, epoch=epoch, shuffle=shuffle):
        piece = [(si, i) for i in range(shards[si].n) if (si, i) not in excluded]
        if piece:
            pieces.append(piece)
    per_rank = balance(deal(pieces, world_size))

    def length(ref: Ref) -> tuple[float, int]:
        return shards[ref[0]].lengths[ref[1]]

    batches = [bucket(refs, length, batch_size=batch_size, bucket_window=bucket_window,
                      rng=_rng("batches", seed, epoch, r) if shuffle else None)
               for r, refs in enumerate(per_rank)]
    n = max((len(b) for b in batches), default=0)
    if n:
        everything = [(si, i) for si, s in enumerate(shards) for i in range(s.n)]
        fallback = min(everything, key=lambda ref: (*length(ref), ref))
        for r, refs in enumerate(per_rank):
            pad_ref = min(refs, key=lambda ref: (*length(ref), ref)) if refs else fallback
            batches[r].extend(Batch((pad_ref,), pad=True) for _ in range(n - len(batches[r])))
    return Plan(epoch=epoch, world_size=world_size, batch_size=batch_size,
                batches=tuple(tuple(b) for b in batches), base=excluded)


# ============================================================================================ reading

def decode_flac(data: bytes, *, sample_rate: int = 16000, max_s: float | None = None,
                name: str = "audio") -> np.ndarray:
    """FLAC (or any soundfile format) bytes -> float32 mono at ``sample_rate``, cut at ``max_s``."""
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own LibsndfileError/RuntimeError
        raise StreamError(f"{name}: cannot decode audio ({e})") from None
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if sr != sample_rate:
        wav = soxr.resample(wav, sr, sample_rate).astype(np.float32)
    if max_s is not None and max_s > 0:
        wav = wav[: int(round(max_s * sample_rate))]
    return np.ascontiguousarray(wav, dtype=np.float32)


class ShardReader:
    """Random access to samples by (shard, index): lazy per-shard index, checks on first open."""

    def __init__(self, shard_dir: str | os.PathLike, shards: Sequence[ShardInfo], *,
                 verify_sha256: bool = False, sample_rate: int = 16000, max_audio_s: float | None = None):
        self.dir = Path(shard_dir)
        self.shards = list(shards)
        self.verify_sha256 = verify_sha256
        self.sample_rate = sample_rate
        self.max_audio_s = max_audio_s
        self._index: dict[int, list] = {}
        self._checked: set[int] = set()

    def check(self, si: int) -> None:
        """Size (always) and sha256 (when asked) of shard ``si`` against meta.json, once per process."""
        if si in self._checked:
            return
        info = self.shards[si]
        path = self.dir / info.name
        if not path.exists():
            raise StreamError(f"shard {path} is missing (meta.json lists it)")
        size = path.stat().st_size
        if info.bytes and size != info.bytes:
            what = "truncated" if size < info.bytes else "changed"
            raise StreamError(f"shard {path} is {what}: {size} bytes on disk, meta.json says {info.bytes}; "
                              f"rebuild the shards")
        if self.verify_sha256 and info.sha256:
            got = sha256_file(path)
            if got != info.sha256:
                raise StreamError(f"shard {path}: sha256 {got[:12]}... differs from meta.json's "
                                  f"{info.sha256[:12]}...; the shard changed since it was built")
        self._checked.add(si)

    def _open(self, si: int) -> list:
        idx = self._index.get(si)
        if idx is not None:
            return idx
        self.check(si)
        info = self.shards[si]
        path = self.dir / info.name
        try:
            idx = tario.index_tar(path)
        except tario.TarError as e:
            raise StreamError(str(e)) from None
        if len(idx) != info.n or any(s.key != k for s, k in zip(idx, info.keys)):
            raise StreamError(f"shard {path}: its samples do not match meta.json ({len(idx)} in the tar, "
                              f"{info.n} listed, or keys differ); rebuild the shards")
        self._index[si] = idx
        return idx

    def read(self, ref: Ref) -> dict[str, Any]:
        """Decoded sample: ``key``, ``shard``, ``index``, ``meta`` (the json) and ``audio`` (or None)."""
        si, i = ref
        entry = self._open(si)[i]
        path = self.dir / self.shards[si].name
        try:
            raw = {ext: tario.read_member(path, off, size) for ext, (off, size) in entry.members.items()}
        except tario.TarError as e:
            raise StreamError(str(e)) from None
        name = f"{self.shards[si].name}:{entry.key}"
        if "json" not in raw:
            raise StreamError(f"{name}: sample has no json member")
        meta = json.loads(raw["json"].decode("utf-8"))
        audio_ext = next((e for e in raw if e.startswith("audio.") or e in ("flac", "wav")), None)
        audio = None if audio_ext is None else decode_flac(
            raw[audio_ext], sample_rate=self.sample_rate, max_s=self.max_audio_s, name=name)
        return {"key": entry.key, "shard": self.shards[si].name, "index": i, "meta": meta, "audio": audio,
                "sample_rate": self.sample_rate}


# ============================================================================================ stream

def _collate_plain(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Featurizer used without a model: the non-tensor fields and the raw material."""
    return {
        "keys": [s["key"] for s in samples], "shards": [s["shard"] for s in samples],
        "indices": [s["index"] for s in samples], "pad": [bool(s.get("pad")) for s in samples],
        "audio": [s["audio"] for s in samples], "meta": [s["meta"] for s in samples],
    }


def _identity(x: Any) -> Any:
    return x


def _produce(reader: ShardReader, featurizer: Callable[[list[dict]], dict], batch: Batch) -> dict[str, Any]:
    samples = []
    for ref in batch.refs:
        s = reader.read(ref)
        s["pad"] = batch.pad
        samples.append(s)
    return featurizer(samples)


def _iterable_dataset_cls():
    import torch.utils.data as tud  # torch: only when workers are asked for

    class _EpochBatches(tud.IterableDataset):
        """This rank's remaining planned batches; each worker takes every W-th, starting at its id."""

        def __init__(self, reader: ShardReader, featurizer, batches: Sequence[Batch], start: int, epoch: int):
            self.reader, self.featurizer, self.batches = reader, featurizer, batches
            self.start, self.epoch = start, epoch

        def __iter__(self):
            info = tud.get_worker_info()
            w, nw = (0, 1) if info is None else (info.id, info.num_workers)
            for i in range(self.start + w, len(self.batches), nw):
                out = _produce(self.reader, self.featurizer, self.batches[i])
                out["batch"], out["epoch"] = i, self.epoch
                yield out

    return _EpochBatches


class Stream:
    """Batches for this rank, epoch after epoch, resumable exactly once (module docstring).

    ``featurizer(samples) -> batch dict`` runs in the workers; samples are decoded dicts (``key``,
    ``shard``, ``index``, ``pad``, ``meta``, ``audio``). Default: no model, raw audio and metadata.
    Every yielded batch also carries ``batch`` (its index in the plan) and ``epoch``.
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str, data_cfg: Any,
                 featurizer: Callable[[list[dict]], dict] | None = None, *, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, num_workers: int | None = None,
                 verify_sha256: bool = False, allow_unsplit: bool = False, sample_rate: int = 16000,
                 join: Callable[..., Any] | None = None):
        self.dir = Path(shard_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise StreamError(f"{self.dir}: no meta.json; build shards with `stc shards build` first")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        self.shards = split_shards(meta, split, source=str(meta_path))
        self.split = split
        env = dist.env()
        rank = env.rank if rank is None else rank
        world_size = env.world_size if world_size is None else world_size
        if env.world_size > 1 and not allow_unsplit and (world_size, rank) != (env.world_size, env.rank):
            raise StreamError(
                f"the launcher runs {env.world_size} ranks but this stream was told rank {rank} of "
                f"{world_size}: ranks would read the same samples. Leave rank/world_size unset (they come "
                f"from engine.dist), or pass allow_unsplit=True if every rank should read everything")
        if not 0 <= rank < world_size:
            raise StreamError(f"rank {rank} is outside world size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.batch_size = int(data_cfg.batch_size)
        self.bucket_window = int(data_cfg.bucket_window)
        self.shuffle = bool(data_cfg.shuffle)
        self.num_workers = int(data_cfg.num_workers if num_workers is None else num_workers)
        self.seed = int(seed)
        self.featurizer = featurizer or _collate_plain
        self.reader = ShardReader(self.dir, self.shards, verify_sha256=verify_sha256,
                                  sample_rate=sample_rate, max_audio_s=float(data_cfg.max_audio_s))
        self.cache = None
        if join is not None:
            # The join (module docstring, "Teacher cache join"), made for these shards and the
            # featurizer's tokenizer/prompt: checks the cache, adds teacher samples as virtual shards.
            self.cache = join(self.shards, builder=getattr(self.featurizer, "builder", None))
            self.shards = self.shards + self.cache.virtual_infos
            self.reader = self.cache.wrap_reader(self.reader)
            self.featurizer = self.cache.wrap_featurizer(self.featurizer)
        self.fingerprint = shards_fingerprint(self.shards)
        self.epoch = 0
        self.consumed = 0
        self._base: frozenset[Ref] = frozenset()
        self._plan: Plan | None = None

    # ------------------------------------------------------------------ plan and state
    @property
    def plan(self) -> Plan:
        if self._plan is None or self._plan.epoch != self.epoch:
            self._plan = plan_epoch(self.shards, seed=self.seed, epoch=self.epoch, world_size=self.world_size,
                                    batch_size=self.batch_size, bucket_window=self.bucket_window,
                                    shuffle=self.shuffle, exclude=self._base)
        return self._plan

    def __len__(self) -> int:
        """Batches per rank in the current epoch's plan (equal on every rank)."""
        return self.plan.n_batches

    def remaining(self) -> int:
        return max(0, len(self) - self.consumed)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; the current epoch keeps its position (safe after resume)."""
        if epoch != self.epoch:
            self.epoch, self.consumed, self._base, self._plan = int(epoch), 0, frozenset(), None

    def _plan_params(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "batch_size": self.batch_size, "bucket_window": self.bucket_window,
                "shuffle": self.shuffle, "shards": self.fingerprint,
                "base": refs_to_ranges(self._base, self.shards)}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "seed": self.seed, "split": self.split,
                "plan": self._plan_params(), "batches_consumed": self.consumed,
                "delivered": refs_to_ranges(self.plan.delivered(self.consumed), self.shards)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: same plan -> skip the consumed batches; otherwise re-plan what is left of the epoch."""
        if state.get("version") != STATE_VERSION:
            raise StreamError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}")
        plan = state["plan"]
        if plan["shards"] != self.fingerprint:
            raise StreamError("the saved stream state belongs to other shards (data fingerprint differs); "
                              "resume with the shards it was saved with")
        self.seed = int(state["seed"])  # the saved plan's seed wins: it defines what was delivered
        self.epoch = int(state["epoch"])
        consumed = int(state["batches_consumed"])
        same = (plan["world_size"] == self.world_size and plan["batch_size"] == self.batch_size
                and plan["bucket_window"] == self.bucket_window and bool(plan["shuffle"]) == self.shuffle)
        if same:
            self._base = frozenset(ranges_to_refs(plan.get("base", {}), self.shards))
            self._plan = None
            if consumed > len(self):
                raise StreamError(f"saved state consumed {consumed} batches but the plan has {len(self)}")
            self.consumed = consumed
        else:
            self._base = frozenset(ranges_to_refs(state["delivered"], self.shards))
            self._plan = None
            self.consumed = 0
        if self.consumed >= len(self):
            self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch, self.consumed, self._base, self._plan = self.epoch + 1, 0, frozenset(), None

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; after its last batch the stream moves to the next epoch."""
        plan = self.plan
        mine = plan.batches[self.rank]
        start, epoch = self.consumed, self.epoch
        if start >= len(mine):
            self._next_epoch()
            return
        if self.reader.verify_sha256:
            # Hash this rank's shards once, here: workers inherit the checked set instead of each
            # re-hashing every shard at the start of every epoch.
            for si in sorted({ref[0] for b in mine[start:] for ref in b.refs}):
                self.reader.check(si)
        ds = _iterable_dataset_cls()(self.reader, self.featurizer, mine, start, epoch)
        if self.num_workers > 0:
            import torch.utils.data as tud  # torch: only when workers are asked for

            # collate_fn=_identity: torch's default would turn numpy arrays into tensors only when
            # workers are used, so a batch would differ in type between 0 and N workers.
            source: Iterable[dict] = tud.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                    collate_fn=_identity, persistent_workers=False,
                                                    in_order=True)
        else:
            source = ds
        expect = start
        for batch in source:
            if batch["batch"] != expect or self.epoch != epoch or self.consumed != expect:
                raise StreamError(f"stream out of order: got batch {batch['batch']} of epoch {epoch}, "
                                  f"expected {self.consumed} of epoch {self.epoch} (was the stream iterated "
                                  f"twice at once, or its state loaded mid-iteration?)")
            expect += 1
            self.consumed = expect
            if self.consumed >= len(mine):
                self._next_epoch()
            yield batch

    # ------------------------------------------------------------------ helpers for tools and tests
    def keys_of(self, batch: Batch) -> list[str]:
        return [self.shards[si].keys[i] for si, i in batch.refs]


# ============================================================================================ diagnostic stage

def run_diagnostic(recipe: Any, *, shards: str, split: str, model: str | None = None,
                   max_batches: int | None = None, state_in: str | None = None, state_out: str | None = None,
                   dump: str | None = None, verify_sha256: bool = False) -> dict[str, Any]:
    """``stc shards stream``: iterate the stream exactly as a trainer would and record what each rank got.

    Writes ``<dump>/rank<r>.jsonl`` (one line per batch: plan index, keys, pad flags, token counts and
    provenance), saves the state on rank 0 after checking that every rank computed the same state,
    and prints a summary on rank 0. Returns the summary (all ranks).
    """
    with dist.session() as env:
        return _diagnose(recipe, env, shards=shards, split=split, model=model, max_batches=max_batches,
                         state_in=state_in, state_out=state_out, dump=dump, verify_sha256=verify_sha256)


def _diagnose(recipe: Any, env: Any, *, shards: str, split: str, model: str | None, max_batches: int | None,
              state_in: str | None, state_out: str | None, dump: str | None, verify_sha256: bool) -> dict[str, Any]:
    featurizer = None
    if model:
        from .prompt import Featurizer, load_processor  # torch + transformers: only with a model

        featurizer = Featurizer(load_processor(model), recipe.data)
    stream = Stream(shards, split, recipe.data, featurizer, seed=recipe.run.seed, verify_sha256=verify_sha256)
    if state_in:
        with open(state_in, encoding="utf-8") as f:
            stream.load_state_dict(json.load(f))
    start_epoch, start_batch, plan_len = stream.epoch, stream.consumed, len(stream)
    replanned_from = len(stream.plan.base)
    out = None
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        out = open(Path(dump) / f"rank{env.rank}.jsonl", "w", encoding="utf-8")
    prov = dist.provenance()
    n_batches = n_real = n_pad = 0
    t0 = time.perf_counter()
    it = iter(stream)
    try:
        for batch in it:
            pads = [bool(p) for p in batch["pad"]]
            n_batches += 1
            n_real += pads.count(False)
            n_pad += pads.count(True)
            if out is not None:
                rec: dict[str, Any] = {"epoch": batch["epoch"], "batch": batch["batch"], "keys": batch["keys"],
                                       "pad": pads}
                if "attention_mask" in batch:
                    rec["n_tokens"] = int(batch["attention_mask"].sum())
                    rec["n_label_tokens"] = int((batch["labels"] != -100).sum())
                else:
                    rec["n_tokens"] = None
                    rec["n_tgt_chars"] = sum(len(m.get("tgt_text", "")) for m, p in zip(batch["meta"], pads)
                                             if not p)
                rec.update(prov)
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
            if max_batches is not None and n_batches >= max_batches:
                break
    finally:
        it.close()  # shuts the DataLoader workers down now, not at garbage collection
        if out is not None:
            out.close()
    seconds = time.perf_counter() - t0
    state = stream.state_dict()
    states = dist.all_gather_object(state)
    if any(s != states[0] for s in states):
        raise StreamError("ranks disagree on the stream state after the same number of batches; the plan "
                          "is not deterministic across ranks (different shards or config per rank?)")
    mine = {"batches": n_batches, "samples": n_real, "pad_samples": n_pad, "seconds": seconds, **prov}
    per_rank = dist.all_gather_object(mine)
    if state_out and env.rank == 0:
        atomic_write_json(state_out, state, indent=None)
    summary = {"split": split, "world_size": stream.world_size, "num_workers": stream.num_workers,
               "start": {"epoch": start_epoch, "batch": start_batch, "plan_batches": plan_len,
                         "replanned_after": replanned_from},
               "ranks": per_rank, "state": state}
    if env.rank == 0:
        print_diagnostic(summary)
    dist.barrier()
    return summary


def print_diagnostic(summary: Mapping[str, Any]) -> None:
    from rich.table import Table

    st = summary["start"]
    t = Table(title=f"stream {summary['split']}: {summary['world_size']} rank(s) x {summary['num_workers']} "
                    f"worker(s), from epoch {st['epoch']} batch {st['batch']} of {st['plan_batches']}"
                    + (f" (re-planned: {st['replanned_after']} samples were delivered before)"
                       if st.get("replanned_after") else ""))
    for c in ("rank", "host", "pid", "batches", "samples", "pad samples", "seconds", "samples/s"):
        t.add_column(c, justify="right")
    for r in summary["ranks"]:
        rate = r["samples"] / r["seconds"] if r["seconds"] > 0 else float("nan")
        t.add_row(str(r["rank"]), r["host"], str(r["pid"]), str(r["batches"]), str(r["samples"]),
                  str(r["pad_samples"]), f"{r['seconds']:.2f}", f"{rate:.1f}")
    total = sum(r["samples"] for r in summary["ranks"])
    slowest = max(r["seconds"] for r in summary["ranks"])
    t.add_row("all", "", "", str(sum(r["batches"] for r in summary["ranks"])), str(total),
              str(sum(r["pad_samples"] for r in summary["ranks"])), f"{slowest:.2f}",
              f"{total / slowest:.1f}" if slowest > 0 else "nan")
    console.print(t)
    s = summary["state"]
    console.print(f"state: epoch {s['epoch']}, {s['batches_consumed']} batches consumed, "
                  f"{sum(b - a for rs in s['delivered'].values() for a, b in rs)} samples delivered this epoch")


def diagnostic_main(recipe: Any, args: Any) -> int:
    """``stc shards stream``; with ``--dry-run`` it prints the epoch plan (batches per rank) and reads no audio."""
    shards = args.shards or recipe.data.shards
    split = args.split or recipe.data.train_split
    if args.dry_run:
        env = dist.env()
        s = Stream(shards, split, recipe.data, seed=recipe.run.seed, rank=env.rank, world_size=env.world_size)
        if args.state_in:
            with open(args.state_in, encoding="utf-8") as f:
                s.load_state_dict(json.load(f))
        n = sum(si.n for si in s.shards)
        print(f"stream {split} of {shards}: {n} samples in {len(s.shards)} shard(s); {env.world_size} "
              f"rank(s) x {s.num_workers} worker(s); epoch {s.epoch}: {len(s)} batches of up to "
              f"{s.batch_size} per rank, from batch {s.consumed}")
        return 0
    run_diagnostic(recipe, shards=shards, split=split, model=args.model, max_batches=args.max_batches,
                   state_in=args.state_in, state_out=args.state_out, dump=args.dump, verify_sha256=args.verify)
    return 0
