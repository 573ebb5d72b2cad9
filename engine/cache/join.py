"""The stream's side of a teacher cache: join a cache shard's records to the audio samples.

The training stream (:mod:`engine.data.stream`) is *handed* a :class:`CacheJoin`; it never imports
this package. The join happens per sample, before bucketing: cache shard ``X.tar`` mirrors audio shard
``X.tar`` (same keys, same order), so sample ``i`` of a shard is joined with record ``i`` of its cache
shard and the key is checked; it is independent of world size, batch size, shard order and workers.
With ``seq_kd`` the teacher's translations that differ from their reference are added as *virtual
shards* ``X.tar#teacher`` (the stream plans them like any shard). Every mismatch (a missing key, other
label ids, another tokenizer or prompt) is a :class:`~engine.cache.format.CacheJoinError`, never a skip.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..data.stream import Ref, ShardInfo
from ..io import sha256_file
from .format import (FORMAT, IGNORE, CacheError, CacheJoinError, Target, check_compatible, decode_record,
                     index_shard, key_diff, read_cache_meta, read_entry)

@dataclass(frozen=True)
class VirtualShard:
    """A planned list of teacher-target samples of one audio shard (for sequence-level KD)."""
    shard: int                      # position of the audio shard in the stream's real shard list
    indices: tuple[int, ...]        # sample indices in that shard


class CacheJoin:
    """Everything the stream needs to join a cache: meta checks, virtual shards, reader and featurizer wraps."""

    def __init__(self, cache_dir: str | os.PathLike, shards: Sequence[ShardInfo], *, seq_kd: bool = False,
                 builder: Any = None):
        self.dir = Path(cache_dir)
        meta = read_cache_meta(self.dir)
        if meta.get("format") != FORMAT:
            raise CacheJoinError(f"teacher cache {self.dir} has format {meta.get('format')!r}, this engine reads "
                                 f"{FORMAT!r}: rebuild it (`stc cache build`)")
        self.meta = meta
        self.k = int(meta["k"])
        self.vocab = int(meta["vocab_size"])
        recs = {r["name"]: r for r in meta["shards"]}
        problems = []
        for s in shards:
            r = recs.get(s.name)
            if r is None:
                problems.append(f"{s.name}: not in the cache (cached split {meta.get('split')!r}); "
                                f"build the cache for these shards")
            elif r["source_sha256"] != s.sha256:
                problems.append(f"{s.name}: the audio shard changed since caching (sha256 differs from the "
                                f"cache's record); rebuild the cache")
        if problems:
            raise CacheJoinError(f"teacher cache {self.dir} does not match the audio shards:\n  - "
                                 + "\n  - ".join(problems))
        if builder is not None:
            check_compatible(meta, builder=builder)
        self.records = [recs[s.name] for s in shards]
        self.n_real = len(shards)
        self.virtual: list[VirtualShard] = []
        self.virtual_infos: list[ShardInfo] = []
        if seq_kd:
            if "teacher" not in meta.get("targets", []):
                raise CacheJoinError(f"teacher cache {self.dir} has no teacher translations (cache.targets="
                                     f"{meta.get('targets')}); seq_kd needs them")
            for si, (s, r) in enumerate(zip(shards, self.records)):
                ts = r.get("teacher_samples") or []
                if not ts:
                    continue
                idx = tuple(int(t[0]) for t in ts)
                self.virtual.append(VirtualShard(si, idx))
                self.virtual_infos.append(ShardInfo(
                    name=f"{s.name}#teacher", n=len(idx), bytes=0, sha256=r["sha256"],
                    keys=tuple(s.keys[i] for i in idx),
                    lengths=tuple((s.lengths[i][0], int(t[1])) for i, t in zip(idx, ts))))

    def wrap_reader(self, reader: Any) -> "JoinReader":
        return JoinReader(reader, self)

    def wrap_featurizer(self, featurizer: Callable[[list[dict]], dict]) -> "JoinFeaturizer":
        return JoinFeaturizer(featurizer, self.k)


class JoinReader:
    """Reads (shard, index) refs of the real and virtual shards and attaches the cache record."""

    def __init__(self, reader: Any, join: CacheJoin):
        self.reader, self.join = reader, join
        self.verify_sha256 = reader.verify_sha256
        self._index: dict[int, list] = {}

    def _real(self, ref: Ref) -> tuple[Ref, str]:
        si, i = ref
        if si < self.join.n_real:
            return (si, i), "ref"
        v = self.join.virtual[si - self.join.n_real]
        return (v.shard, v.indices[i]), "teacher"

    def check(self, si: int) -> None:
        self.reader.check(si if si < self.join.n_real else self.join.virtual[si - self.join.n_real].shard)

    def _cache_index(self, si: int) -> list:
        idx = self._index.get(si)
        if idx is not None:
            return idx
        info, rec = self.reader.shards[si], self.join.records[si]
        path = self.join.dir / info.name
        if not path.exists():
            raise CacheJoinError(f"teacher cache shard {path} is missing")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise CacheJoinError(f"teacher cache shard {path} is {'truncated' if size < rec['bytes'] else 'changed'}: "
                                 f"{size} bytes, meta.json says {rec['bytes']}; rebuild it (`stc cache build`)")
        if self.verify_sha256 and sha256_file(path) != rec["sha256"]:
            raise CacheJoinError(f"teacher cache shard {path}: sha256 differs from meta.json")
        try:
            idx = index_shard(path)
        except CacheError as e:
            raise CacheJoinError(str(e)) from None
        keys = [s.key for s in idx]
        if keys != list(info.keys):
            raise CacheJoinError(f"teacher cache shard {path} does not mirror audio shard {info.name}: "
                                 f"{key_diff(keys, info.keys)}")
        self._index[si] = idx
        return idx

    def read(self, ref: Ref) -> dict[str, Any]:
        real, target = self._real(ref)
        s = self.reader.read(real)
        entry = self._cache_index(real[0])[real[1]]
        name = f"{self.join.dir / self.reader.shards[real[0]].name}:{entry.key}"
        if entry.key != s["key"]:
            raise CacheJoinError(f"{name}: cache key {entry.key!r} where the audio shard has {s['key']!r}")
        try:
            recs = decode_record(read_entry(self.join.dir / self.reader.shards[real[0]].name, entry),
                                 self.join.vocab, name=name)
        except CacheError as e:
            raise CacheJoinError(str(e)) from None
        if target not in recs:
            raise CacheJoinError(f"{name}: key {s['key']!r} has no {target!r} record in the cache")
        rec = recs[target]
        if target == "teacher":
            s["meta"] = dict(s["meta"], tgt_text=rec.text)
        s["target"], s["kd"] = target, rec
        return s


class JoinFeaturizer:
    """Runs the stream's featurizer, then adds the cache's targets aligned with ``labels``.

    Adds ``targets`` (``ref``/``teacher`` per sample) and, when the featurizer made ``labels``:
    ``kd_ids`` [B,T,k] int64, ``kd_logprobs`` [B,T,k] float32, ``kd_tail`` [B,T] float32,
    ``kd_mask`` [B,T] bool. Label ids of each sample must equal the ones the cache stored.
    """

    def __init__(self, featurizer: Callable[[list[dict]], dict], k: int):
        self.featurizer, self.k = featurizer, k
        self.builder = getattr(featurizer, "builder", None)

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        import torch

        out = self.featurizer(samples)
        out["targets"] = [s.get("target", "ref") for s in samples]
        if "labels" not in out:
            out["kd"] = [s.get("kd") for s in samples]
            return out
        labels = out["labels"]
        b, t = labels.shape
        kd_ids = torch.zeros((b, t, self.k), dtype=torch.long)
        kd_lp = torch.full((b, t, self.k), float("-inf"), dtype=torch.float32)
        kd_tail = torch.full((b, t), float("-inf"), dtype=torch.float32)
        kd_mask = torch.zeros((b, t), dtype=torch.bool)
        for i, s in enumerate(samples):
            if s.get("pad"):
                continue            # all labels -100: nothing to check, nothing to distil
            rec: Target = s["kd"]
            pos = torch.nonzero(labels[i] != IGNORE, as_tuple=False)[:, 0]
            have = labels[i, pos].numpy()
            if len(have) != len(rec.label_ids) or not np.array_equal(have, rec.label_ids):
                j = next((j for j, (a, c) in enumerate(zip(have, rec.label_ids)) if a != c),
                         min(len(have), len(rec.label_ids)))
                raise CacheJoinError(
                    f"key {s['key']!r} ({s.get('target', 'ref')}): the featurizer's label ids differ from the "
                    f"ones the teacher cache was computed on ({len(have)} vs {len(rec.label_ids)} tokens, first "
                    f"difference at label {j}); the cache belongs to another tokenizer, prompt or reference: "
                    f"rebuild it")
            if rec.topk is None:
                continue            # a teacher target without its own top-k: CE only
            kd_ids[i, pos] = torch.from_numpy(rec.topk.ids)
            kd_lp[i, pos] = torch.from_numpy(rec.topk.logprobs)
            kd_tail[i, pos] = torch.from_numpy(rec.topk.tail_logmass)
            kd_mask[i, pos] = True
        out.update(kd_ids=kd_ids, kd_logprobs=kd_lp, kd_tail=kd_tail, kd_mask=kd_mask)
        return out


def joiner(cache_dir: str | os.PathLike, *, seq_kd: bool = False) -> Callable[..., CacheJoin]:
    """What :class:`engine.data.stream.Stream` takes as ``join``: ``joiner(dir)(shards, builder=...)``."""
    return functools.partial(CacheJoin, cache_dir, seq_kd=seq_kd)
