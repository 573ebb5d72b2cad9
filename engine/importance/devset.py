"""The selection (dev) set: read once, checked against the test split, turned into decoder inputs once.

Why the decoder inputs are computed here, once: pruning decoder layers never changes the audio encoder,
so its output (38% of a forward at the 7B shape) is the same for every candidate and iteration. Each
dev batch goes through the model *up to* the decoder exactly once: a pre-hook on the backbone captures
the ``inputs_embeds`` (B, T, H) that the model's own code builds (text embeddings with the projected
audio features scattered into the ``<|AUDIO|>`` positions) and stops the forward there. Every scorer
then runs only the decoder from those embeddings. Because the model's own merge code produced them,
nothing about the merge is re-implemented (a test checks equality with the full forward).

Two views of each batch are kept, both cut from the same captured embeddings:

* teacher-forced (``nll``, ``block_influence``): the full prompt + reference sequence, right padded,
  with the label mask of :class:`engine.data.prompt.Featurizer`;
* prompt-only (``task``): the prompt part of each row (everything before the first label token),
  left padded so that ``generate`` appends to every row at once.

Samples are sorted by length (audio duration, then source and target characters, then key) before
batching, so a batch wastes little on padding and generation stops early for short batches.

Audio-encoder candidates (``importance.component=audio``) change the encoder's output, so there
the decoder inputs cannot be shared between candidates: :func:`prepare` with ``keep_features`` also
keeps each batch's Featurizer output (input ids, masks, log-mel features; on the CPU), and
:func:`reembed` recomputes both views of every batch from them with the model as it is at the call
(e.g. inside :func:`engine.importance.layers.without_audio_layers`). The decoder scorers then score
that dev set unchanged; the decoder path keeps no features and never re-encodes.

Dev and test are kept apart (the paper selected layers on its test set): a dev sample whose
key, or whose normalised source text, also occurs in the test split is refused.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import langs
from ..config import DataConfig
from ..errors import StcError
from ..data import tario
from ..data.prompt import IGNORE, Featurizer, PromptBuilder, PromptError
from ..data.stream import ShardInfo, ShardReader, StreamError, shards_fingerprint, shards_from_meta
from ..meta import fingerprint_obj
from ..models import families
from . import layers as L


class ImportanceError(StcError, ValueError):
    """A problem with the importance inputs (config, dev set, journal); the message names the fix."""


@dataclass
class DevSample:
    key: str
    shard: str
    index: int
    meta: dict
    audio: np.ndarray | None
    sample_rate: int = 16000


@dataclass
class DevBatch:
    """One batch of the prepared dev set (B rows).

    ``embeds`` (B, T, H) right padded / ``attention_mask`` (B, T) / ``labels`` (B, T) with -100 off the
    reference: the teacher-forced view. ``gen_embeds`` (B, P, H) left padded / ``gen_mask`` (B, P):
    the prompt-only view. Either view is None when the scorer does not need it.
    """
    keys: list[str]
    refs: list[str]
    tgt_langs: list[str]
    embeds: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    gen_embeds: torch.Tensor | None = None
    gen_mask: torch.Tensor | None = None
    features: dict[str, Any] | None = field(default=None, repr=False)  # the Featurizer batch (keep_features)

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum()) if self.labels is not None else 0


@dataclass
class DevSet:
    batches: list[DevBatch]
    keys: list[str]
    tgt_langs: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (key, reason)
    encode_seconds: float = 0.0

    @property
    def n_samples(self) -> int:
        return len(self.keys)


# ---------------------------------------------------------------------------------------------- reading

def _shard_meta(shard_dir: str | Path) -> dict:
    p = Path(shard_dir) / "meta.json"
    if not p.exists():
        raise ImportanceError(f"{shard_dir}: no meta.json; build the shards first (`stc shards build`) and "
                              f"set data.shards to that directory")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def dev_shards(shard_dir: str | Path, split: str) -> list[ShardInfo]:
    meta = _shard_meta(shard_dir)
    try:
        infos = shards_from_meta(meta, split, source=str(Path(shard_dir) / "meta.json"))
    except StreamError as e:
        raise ImportanceError(str(e)) from None
    if not infos:
        have = sorted({r.get("split") for r in meta.get("shards", [])})
        raise ImportanceError(f"{shard_dir} has no shards of split {split!r} (splits there: "
                              f"{', '.join(map(str, have)) or 'none'}); set data.dev_split")
    return infos


def select_refs(infos: Sequence[ShardInfo], max_samples: int) -> list[tuple[int, int]]:
    """The first ``max_samples`` samples in shard-name and tar order (all when 0): deterministic, so
    every rank and every rerun scores the same samples."""
    refs = [(si, i) for si, s in enumerate(infos) for i in range(s.n)]
    return refs[:max_samples] if max_samples > 0 else refs


def dev_fingerprint(infos: Sequence[ShardInfo], split: str, max_samples: int) -> str:
    """Shard names + sha256 of the split, the split name, the sample cap and the selected keys."""
    keys = [infos[si].keys[i] for si, i in select_refs(infos, max_samples)]
    return fingerprint_obj({"shards": shards_fingerprint(infos), "split": split, "max_samples": max_samples,
                            "keys": keys})


def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().casefold()


def _json_members(shard_dir: Path, info: ShardInfo) -> list[tuple[str, dict]]:
    """(key, sample json) of every sample of a shard, without decoding audio."""
    path = shard_dir / info.name
    try:
        out = []
        for s in tario.index_tar(path):
            if "json" in s.members:
                off, size = s.members["json"]
                out.append((s.key, json.loads(tario.read_member(path, off, size).decode("utf-8"))))
        return out
    except (tario.TarError, FileNotFoundError, json.JSONDecodeError) as e:
        raise ImportanceError(f"cannot read {path}: {e}") from None


def check_disjoint(shard_dir: str | Path, dev_split: str, test_split: str, dev_keys: Sequence[str],
                   dev_sources: Sequence[str]) -> list[str]:
    """Refuse a dev set that shares keys or source texts with the test split; returns notes to log."""
    if dev_split == test_split:
        raise ImportanceError(f"data.dev_split and data.test_split are both {dev_split!r}: layers selected on "
                              f"the test set make its scores optimistic; use a separate dev split")
    d = Path(shard_dir)
    meta = _shard_meta(d)
    test = shards_from_meta(meta, test_split, source=str(d / "meta.json"))
    if not test:
        return [f"no {test_split!r} split in {d}: dev/test overlap not checked"]
    test_keys = {k for s in test for k in s.keys}
    shared = sorted(set(dev_keys) & test_keys)
    if shared:
        raise ImportanceError(f"the dev split {dev_split!r} shares {len(shared)} key(s) with the test split "
                              f"{test_split!r} (e.g. {', '.join(shared[:3])}): layers must not be selected on "
                              f"test data; rebuild the shards with disjoint splits")
    test_src = {_norm_text(js.get("src_text", "")) for s in test for _, js in _json_members(d, s)}
    test_src.discard("")
    same = sorted({k for k, src in zip(dev_keys, dev_sources) if src and _norm_text(src) in test_src})
    if same:
        raise ImportanceError(f"{len(same)} dev sample(s) of split {dev_split!r} have a source text that is also "
                              f"in the test split {test_split!r} (e.g. {', '.join(same[:3])}): the same sentence "
                              f"would be selected on and reported on; remove the duplicates from one split")
    return []


def read_dev(shard_dir: str | Path, data: DataConfig, max_samples: int,
             is_audio_model: bool) -> tuple[list[DevSample], list[tuple[str, str]]]:
    """Decoded dev samples that a prompt can be built for, and (key, reason) for those skipped."""
    infos = dev_shards(shard_dir, data.dev_split)
    reader = ShardReader(Path(shard_dir), infos, max_audio_s=data.max_audio_s)
    good: list[DevSample] = []
    skipped: list[tuple[str, str]] = []
    for ref in select_refs(infos, max_samples):
        try:
            s = reader.read(ref)
        except StreamError as e:
            raise ImportanceError(str(e)) from None
        m = s["meta"]
        reason = None
        if not str(m.get("tgt_text", "")).strip():
            reason = "empty reference (tgt_text)"
        else:
            try:
                langs.get(m.get("src_lang", "")), langs.get(m.get("tgt_lang", ""))
            except langs.UnknownLanguage as e:
                reason = str(e).split(":")[0]
        if reason is None and s["audio"] is None and not str(m.get("src_text", "")).strip():
            reason = "no audio and no source text"
        if reason is None and s["audio"] is not None and not is_audio_model and not str(m.get("src_text", "")).strip():
            reason = "a text model needs the source text, which is empty"
        if reason is not None:
            skipped.append((s["key"], reason))
            continue
        good.append(DevSample(s["key"], s["shard"], s["index"], m, s["audio"], s["sample_rate"]))
    return good, skipped


# ---------------------------------------------------------------------------------------------- embeddings

class _Captured(Exception):
    pass


@torch.inference_mode()
def decoder_inputs(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The ``inputs_embeds`` (B, T, H) the model hands to its decoder for a Featurizer batch.

    For an audio model the model's own forward runs up to the decoder (encoder, projector, merge at
    the ``<|AUDIO|>`` positions) and is stopped there by a pre-hook; for a text LM it is the
    embedding lookup, which is what its backbone does with ``input_ids``.
    """
    dev = next(model.parameters()).device
    ids = batch["input_ids"].to(dev)
    audio = {k: batch[k].to(dev) for k in families.audio_input_keys() if k in batch}
    if not audio:
        return model.get_input_embeddings()(ids)
    box: dict[str, torch.Tensor] = {}

    def grab(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        box["e"] = kwargs.get("inputs_embeds")
        raise _Captured

    def grab_output(mod: torch.nn.Module, args: tuple, out: Any) -> None:
        box["e"] = out
        raise _Captured

    fam = families.of_model(model)
    if fam is not None and fam.embeds_module:   # the backbone merges the audio into its embeddings itself
        mod = next((m for n, m in model.named_modules() if n == fam.embeds_module
                    or n.endswith("." + fam.embeds_module)), None)
        if mod is None:
            raise ImportanceError(f"{type(model).__name__} has no {fam.embeds_module}: the {fam.title} layout changed")
        h = mod.register_forward_hook(grab_output)
    else:
        h = L.backbone(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=batch["attention_mask"].to(dev), **audio, use_cache=False)
    except _Captured:
        pass
    finally:
        h.remove()
    if box.get("e") is None:
        raise ImportanceError(f"{type(model).__name__} did not call its decoder with inputs_embeds; "
                              "cannot cache the audio encoder's output for this model class")
    return box["e"]


def _length_key(s: DevSample) -> tuple:
    dur = 0.0 if s.audio is None else len(s.audio) / s.sample_rate
    return (round(dur, 3), len(s.meta.get("src_text", "")), len(s.meta.get("tgt_text", "")), s.key)


def _as_feature_sample(s: DevSample) -> dict[str, Any]:
    return {"key": s.key, "shard": s.shard, "index": s.index, "meta": s.meta, "audio": s.audio,
            "sample_rate": s.sample_rate, "pad": False}


def _featurize(feat: Featurizer, chunk: list[DevSample]) -> tuple[dict | None, list[DevSample], list[tuple[str, str]]]:
    """Featurize a batch; if the prompt of some sample cannot be built, drop just those samples."""
    try:
        return feat([_as_feature_sample(s) for s in chunk]), chunk, []
    except PromptError:
        pass
    kept, bad = [], []
    for s in chunk:
        try:
            feat([_as_feature_sample(s)])
            kept.append(s)
        except PromptError as e:
            bad.append((s.key, str(e)))
    return (feat([_as_feature_sample(s) for s in kept]) if kept else None), kept, bad


def _set_views(db: DevBatch, emb: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *,
               teacher_forced: bool, prompt_only: bool) -> None:
    """Cut the teacher-forced and/or prompt-only view of one batch from its decoder inputs."""
    dev = emb.device
    if teacher_forced:
        db.embeds, db.attention_mask, db.labels = emb, mask, labels
    if prompt_only:
        # prompt = everything before the first label token (PromptBuilder puts labels right after it)
        plen = [int((labels[r] != IGNORE).nonzero()[0]) for r in range(labels.shape[0])]
        p = max(plen)
        g = emb.new_zeros((emb.shape[0], p, emb.shape[2]))
        gm = torch.zeros((emb.shape[0], p), dtype=mask.dtype, device=dev)
        for r, n in enumerate(plen):
            g[r, p - n:] = emb[r, :n]
            gm[r, p - n:] = 1
        db.gen_embeds, db.gen_mask = g, gm


@torch.inference_mode()
def prepare(model: torch.nn.Module, processor: Any, samples: Sequence[DevSample], data: DataConfig, *,
            batch_size: int, teacher_forced: bool, prompt_only: bool, keep_features: bool = False) -> DevSet:
    """Featurize the dev samples in length-sorted batches and compute their decoder inputs once.
    ``keep_features``: also keep each batch's Featurizer output, for :func:`reembed`."""
    import time

    feat = Featurizer(processor, data)
    order = sorted(samples, key=_length_key)
    batches: list[DevBatch] = []
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    for b0 in range(0, len(order), batch_size):
        fb, chunk, bad = _featurize(feat, order[b0:b0 + batch_size])
        skipped.extend(bad)
        if fb is None:
            continue
        emb = decoder_inputs(model, fb)
        mask = fb["attention_mask"].to(dev)
        labels = fb["labels"].to(dev)
        db = DevBatch(keys=list(fb["keys"]), refs=[s.meta["tgt_text"] for s in chunk],
                      tgt_langs=[s.meta["tgt_lang"] for s in chunk], features=fb if keep_features else None)
        _set_views(db, emb, mask, labels, teacher_forced=teacher_forced, prompt_only=prompt_only)
        batches.append(db)
    keys = [k for b in batches for k in b.keys]
    tl = [t for b in batches for t in b.tgt_langs]
    return DevSet(batches=batches, keys=keys, tgt_langs=tl, skipped=skipped,
                  encode_seconds=time.perf_counter() - t0)


@torch.inference_mode()
def reembed(model: torch.nn.Module, dev: DevSet, *, interrupt: Any = None) -> DevSet:
    """``dev`` with the decoder inputs of every batch recomputed by ``model`` as it is now (same samples,
    batches, views and labels; the kept features are shared, not copied). ``interrupt`` is called
    between batches (a scan's stop request). Needs a dev set prepared with ``keep_features``."""
    import time

    t0 = time.perf_counter()
    out: list[DevBatch] = []
    for b in dev.batches:
        if interrupt is not None:
            interrupt()
        if b.features is None:
            raise ImportanceError("the dev set was prepared without its features (keep_features=True): "
                                  "cannot recompute its decoder inputs")
        emb = decoder_inputs(model, b.features)
        nb = DevBatch(keys=b.keys, refs=b.refs, tgt_langs=b.tgt_langs, features=b.features)
        mask = b.attention_mask if b.attention_mask is not None else b.features["attention_mask"].to(emb.device)
        labels = b.labels if b.labels is not None else b.features["labels"].to(emb.device)
        _set_views(nb, emb, mask, labels, teacher_forced=b.embeds is not None, prompt_only=b.gen_embeds is not None)
        out.append(nb)
    return DevSet(batches=out, keys=dev.keys, tgt_langs=dev.tgt_langs, skipped=dev.skipped,
                  encode_seconds=time.perf_counter() - t0)


def prompt_builder(processor: Any, data: DataConfig) -> PromptBuilder:
    return PromptBuilder(processor, data)
