"""Teacher cache: the teacher's top-k targets and greedy translations as shards that mirror the audio.

Why a cache: the teacher is the expensive and memory-hungry part of distillation. Running it once
over the training set and storing what the student needs (DESIGN 2b, 3) lets every student, run and
world size reuse it, and keeps the teacher out of the student's GPU memory.

Layout of ``<out>/``::

    meta.json            kind "cache": fingerprints, k, encoding, counts, per-shard provenance
    build.json           what this cache is of (fingerprints + options), written before any shard;
                         a rerun with other inputs is refused instead of mixing two caches
    X.tar                one per audio shard X.tar of the cached split: same keys, same order
    done/X.tar.json      per-shard done record: bytes, sha256, counts, host/rank/pid, timings

**Shard format** (``stc-kd/2``). A cache shard is a plain ustar archive of *packs*: the audio
shard's samples, in its order, cut into consecutive groups of ``PACK_GROUP`` (32; the last group may
be shorter; readers accept any grouping, since each pack's index says what it holds), one tar
member ``<first key of the group>.kdpack`` per group. Headers are deterministic (mtime 0, uid/gid 0,
no user names, mode 0444) and the archive ends with the two zero blocks only (no padding to tar's
10 KB record), so the bytes of a shard depend only on the teacher, the data and the options: a run
on 1 rank, on 2 ranks, or killed and resumed writes the same bytes (the grouping is by position in
the audio shard, never by batch or rank). Why packs: a tar member costs a 512-byte header plus
padding to 512 bytes. With ~43 label tokens per sample, format 1 (one ``<key>.kd`` member per sample)
spent 19.0 B per label token on tar framing. Packs of 32 bring that to 1.1 B, plus 0.4 B for the
pack index (bench/cache.py, 48 samples in 2 packs). Format 1 caches are refused: rebuild them.

**Pack format** (``<key>.kdpack``; little-endian)::

    b"STKP" | version u8 (=1) | index length u32 | index (JSON, UTF-8) | CRC32 u32 | records

The index is ``{"keys": [...], "sizes": [...]}``: the group's keys in audio-shard order and the byte
size of each one's record; the records follow back to back in that order, so record ``j`` starts at
``sum(sizes[:j])`` after the CRC. The CRC32 covers everything before it (magic to index). A reader
indexes a shard by reading each pack's head (tar header offsets from :func:`engine.data.tario.index_tar`,
then one short read per pack), which gives every key's (offset, size) in the file; a sample is then
one read. :func:`index_shard` checks the framing (magic, version, CRC, first key = member name,
sizes adding up to the member) and raises :class:`CacheError` naming the shard otherwise.

**Record format** (one sample's record inside a pack; little-endian)::

    b"STKD" | version u8 (=1) | header length u16 | header (JSON, UTF-8) | blobs

The JSON header lists the sample's records (key, target), ``{"t": [[target, n, ids_len, topk_len,
flags, text], ...]}``: ``target`` ``ref`` or ``teacher``, ``n`` label tokens, the byte lengths of
the label-id blob and the top-k blob that follow in that order, ``flags`` (1: the teacher's output
equals the reference, the paper's de-duplication; 2: the teacher produced no label tokens) and, for
``teacher``, the greedy translation text. Label ids are bit-packed at ``ceil(log2 V)`` bits. The
top-k blob is an :mod:`engine.topk_codec` record: per label position the teacher's top-k token ids,
log-probs quantised to 1/8 nat and the log of the mass outside the top k; decoded log-probs are
within ``topk_codec.max_logprob_error()`` (1/8 nat) of the teacher's, KL <= 1/512 nat per position.

**Alignment.** Row ``j`` of a target's top-k is the teacher's distribution for its ``j``-th label
token (the ``j``-th position with ``labels != -100`` as :class:`engine.data.prompt.Featurizer`
builds them), i.e. computed from the hidden state one position earlier. Only those rows go
through ``lm_head``: the hidden states are sliced at label positions first, so full-vocabulary
logits are never materialised for the prompt and audio positions.

**Vocabulary.** ``V`` is the tokenizer's length, not the embedding row count: Qwen checkpoints pad
the embedding (152,064 or 156,032 rows for ~151,650 tokens). Log-softmax runs over all rows, top-k
over the first ``V``; the padded rows' (tiny) mass lands in the tail. A student is compatible when
its tokenizer is identical (fingerprint) and its embedding has at least ``V`` rows.

**Work split.** Audio shard ``i`` (name order) goes to rank ``i % world``; each shard is processed
alone in batches cut in tar order, so a shard's batches do not depend on the world size. Shards are
written to a temporary name and renamed; a done record with the shard's sha256 follows. A rerun
skips shards whose done record matches the file; a shard without one (killed mid-shard) is
recomputed from scratch.

**ZeRO-3 teacher** (``cache.zero3=true``, bf16 or fp32 only). For a teacher that does not fit one
device, the teacher is loaded partitioned (``zero.Init`` through transformers' ``HfDeepSpeedConfig``:
no rank ever holds all its weights, on the host or the device) and wrapped by ``deepspeed.initialize``
(ZeRO-3, no optimizer: DeepSpeed's inference path). Each rank keeps ``1/world`` of every parameter
(``cache.zero3_persistence_threshold``: parameters smaller than it stay whole; 0 slices all of them)
and gathers each layer's weights for the moment its forward runs; weights a forward reads as
``.weight`` of a child module (the audio encoder's ``embed_positions``) are registered as external
parameters so they are gathered too. So every teacher forward is a collective, and the ranks must
make the same calls in lockstep:

* the work split is unchanged (shard ``i`` -> rank ``i % world``, batches cut per shard), but the
  ranks agree first on the largest number of batches any rank has to run; a rank with fewer runs
  *padding batches* (a real sample, results thrown away) until every rank has run that many;
* every batch makes the same sequence of calls whatever its data: the word-level pass (one forward
  of the decoder stack, then ``lm_head`` applied once with its weight gathered explicitly, instead of
  the chunked module call whose count depends on the number of label tokens), ``generate`` with
  ``synced_gpus=True`` (a rank whose batch has finished keeps stepping until all have), and with
  ``cache.teacher_topk`` always the teacher-target pass (on the reference batch, discarded, when no
  sample needs it);
* the output is the same: same batches, same math, so the shards' bytes equal an unsharded build's
  (checked byte for byte in fp32 on CPU by the tests; bf16 on GPUs may round differently).

Each done record gets ``zero3`` counts (parameters, how many are held as a slice, local and full
element counts, whether loading was already partitioned) as evidence of the partitioning. Limits: a rank that fails mid-build leaves the
others waiting in a collective until the process-group timeout (checks that can fail run before the
first forward, on all ranks); all samples must take the same model path (audio or none, as the
featurizer decides). An nf4 teacher is refused under ZeRO-3 (DeepSpeed cannot partition
bitsandbytes 4-bit weights): use ``cache.quant=nf4`` on one device instead.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import topk_codec
from .data.stream import Ref, ShardInfo, StreamError

FORMAT = "stc-kd/2"
MAGIC = b"STKD"
RECORD_VERSION = 1
PACK_MAGIC = b"STKP"
PACK_VERSION = 1
PACK_EXT = "kdpack"
PACK_GROUP = 32                   # samples per pack (part of the format: it fixes the shard's bytes)
_PACK_HEAD = struct.Struct("<4sBI")
FLAG_EQUALS_REF = 1
FLAG_EMPTY = 2
TARGETS = ("ref", "teacher")
IGNORE = -100
DONE_DIR = "done"
BUILD_NAME = "build.json"


class CacheError(RuntimeError):
    """A cache that cannot be built, trusted or used; the message says what and how to fix it."""


class CacheJoinError(CacheError, StreamError):
    """Raised by the stream's join (a missing key, other label ids, another teacher/tokenizer)."""


# ============================================================================================ records

def _bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def pack_ids(ids: np.ndarray, vocab_size: int) -> bytes:
    """Label ids -> ``ceil(log2 V)``-bit little-endian bit stream."""
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
        return b""
    nb = _bits(vocab_size)
    bits = (ids[:, None] >> np.arange(nb, dtype=np.int64)) & 1
    return np.packbits(bits.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_ids(buf: bytes, n: int, vocab_size: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, np.int64)
    nb = _bits(vocab_size)
    if len(buf) != (n * nb + 7) // 8:
        raise CacheError(f"label-id blob has {len(buf)} bytes, expected {(n * nb + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(buf, np.uint8), count=n * nb, bitorder="little")
    return (bits.reshape(n, nb).astype(np.int64) << np.arange(nb, dtype=np.int64)).sum(1)


@dataclass
class Target:
    """One (key, target) record. ``topk`` is None when not stored (a teacher target without
    ``cache.teacher_topk``, or an empty/duplicate teacher output)."""
    target: str
    label_ids: np.ndarray                       # [n] int64
    topk: topk_codec.TopK | None = None         # ids [n,k], logprobs [n,k], tail_logmass [n]
    text: str = ""
    equals_ref: bool = False
    empty: bool = False
    topk_bytes: bytes | None = None             # encoded form (set by encode/decode)


def encode_record(targets: Sequence[Target], vocab_size: int) -> bytes:
    """Targets of one sample -> its record bytes (module docstring, "Record format")."""
    head, blobs = [], []
    for t in targets:
        ids_blob = pack_ids(t.label_ids, vocab_size)
        tk = t.topk_bytes
        if tk is None and t.topk is not None:
            tk = topk_codec.encode(t.topk.ids, t.topk.logprobs, t.topk.tail_logmass, vocab_size)
        tk = tk or b""
        flags = (FLAG_EQUALS_REF if t.equals_ref else 0) | (FLAG_EMPTY if t.empty else 0)
        head.append([t.target, int(len(t.label_ids)), len(ids_blob), len(tk), flags]
                    + ([t.text] if t.target == "teacher" else []))
        blobs += [ids_blob, tk]
    hj = json.dumps({"t": head}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<BH", RECORD_VERSION, len(hj)) + hj + b"".join(blobs)


def decode_record(buf: bytes, vocab_size: int, *, name: str = "record", decode_topk: bool = True) -> dict[str, Target]:
    """A record's bytes -> {target: Target}; :class:`CacheError` naming ``name`` when corrupt."""
    try:
        if buf[:4] != MAGIC:
            raise CacheError("bad magic")
        version, hl = struct.unpack_from("<BH", buf, 4)
        if version != RECORD_VERSION:
            raise CacheError(f"record version {version}, this engine reads {RECORD_VERSION}")
        head = json.loads(buf[7:7 + hl].decode("utf-8"))["t"]
        pos = 7 + hl
        out: dict[str, Target] = {}
        for row in head:
            target, n, li, lt, flags = row[:5]
            ids = unpack_ids(buf[pos:pos + li], n, vocab_size)
            pos += li
            tk_bytes = bytes(buf[pos:pos + lt]) if lt else None
            if lt and len(tk_bytes) != lt:
                raise CacheError("truncated top-k blob")
            pos += lt
            topk = None
            if tk_bytes is not None and decode_topk:
                topk = topk_codec.decode(tk_bytes)
                if topk.ids.shape[0] != n:
                    raise CacheError(f"{target}: top-k has {topk.ids.shape[0]} rows for {n} label tokens")
            out[target] = Target(target, ids, topk, text=row[5] if len(row) > 5 else "",
                                 equals_ref=bool(flags & FLAG_EQUALS_REF), empty=bool(flags & FLAG_EMPTY),
                                 topk_bytes=tk_bytes)
        if pos != len(buf):
            raise CacheError(f"{len(buf) - pos} unexplained trailing bytes")
        return out
    except CacheError as e:
        raise CacheError(f"{name}: corrupt cache record ({e})") from None
    except (struct.error, ValueError, KeyError, IndexError, TypeError, topk_codec.CodecError) as e:
        raise CacheError(f"{name}: corrupt cache record ({type(e).__name__}: {e})") from None


# ============================================================================================ tar writing

def _tar_header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o444, 0, 0, "", ""
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A deterministic ustar archive: fixed header fields, two zero blocks at the end, nothing more."""
    out = io.BytesIO()
    for name, data in members:
        out.write(_tar_header(name, len(data)))
        out.write(data)
        out.write(b"\0" * (-len(data) % 512))
    out.write(b"\0" * 1024)
    return out.getvalue()


def pack_bytes(keys: Sequence[str], records: Sequence[bytes]) -> bytes:
    """One ``.kdpack`` member: the index of a group's keys and record sizes, then the records."""
    if len(keys) != len(records) or not keys:
        raise CacheError(f"a pack needs one record per key ({len(keys)} keys, {len(records)} records)")
    idx = json.dumps({"keys": list(keys), "sizes": [len(r) for r in records]}, ensure_ascii=False,
                     separators=(",", ":")).encode("utf-8")
    head = _PACK_HEAD.pack(PACK_MAGIC, PACK_VERSION, len(idx)) + idx
    return head + struct.pack("<I", zlib.crc32(head)) + b"".join(records)


def shard_bytes(keys: Sequence[str], records: Sequence[bytes], group: int | None = None) -> bytes:
    """A cache shard: the (key, record) pairs of one audio shard, in its order, in packs of ``group``
    (default ``PACK_GROUP``; readers take any grouping, the index of each pack says what it holds)."""
    group = int(group or PACK_GROUP)
    if group < 1:
        raise CacheError(f"pack group {group}: must be >= 1")
    if len(keys) != len(records):
        raise CacheError(f"{len(keys)} keys but {len(records)} records")
    return tar_bytes((f"{keys[i]}.{PACK_EXT}", pack_bytes(keys[i:i + group], records[i:i + group]))
                     for i in range(0, len(keys), group))


@dataclass(frozen=True)
class Entry:
    """One sample's record in a cache shard: its key and (offset, size) of the record in the file."""
    key: str
    offset: int
    size: int


def _parse_pack_head(buf: bytes, name: str) -> tuple[list[str], list[int], int]:
    if len(buf) < _PACK_HEAD.size or buf[:4] != PACK_MAGIC:
        raise CacheError(f"{name}: not a {PACK_EXT} member (bad magic)")
    _, version, il = _PACK_HEAD.unpack_from(buf)
    if version != PACK_VERSION:
        raise CacheError(f"{name}: pack version {version}, this engine reads {PACK_VERSION}")
    end = _PACK_HEAD.size + il
    if len(buf) < end + 4:
        raise CacheError(f"{name}: pack index cut short")
    if struct.unpack_from("<I", buf, end)[0] != zlib.crc32(buf[:end]):
        raise CacheError(f"{name}: pack index CRC mismatch")
    try:
        idx = json.loads(buf[_PACK_HEAD.size:end].decode("utf-8"))
        keys, sizes = idx["keys"], idx["sizes"]
        if (not isinstance(keys, list) or not isinstance(sizes, list) or len(keys) != len(sizes) or not keys
                or not all(isinstance(k, str) for k in keys)
                or not all(isinstance(n, int) and n >= 0 for n in sizes)):
            raise ValueError("keys/sizes malformed")
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(f"{name}: bad pack index ({e})") from None
    return keys, sizes, end + 4


def index_shard(path: str | os.PathLike) -> list[Entry]:
    """Every sample's record in a cache shard, in file order (see "Pack format").

    Reads the tar headers and each pack's head; :class:`CacheError` naming the shard (and the pack)
    when the tar is truncated/corrupt, a member is not a pack, or a pack's framing does not hold.
    """
    from .data import tario

    path = Path(path)
    try:
        members = tario.index_tar(path)
    except tario.TarError as e:
        raise CacheError(f"teacher cache shard {e}") from None
    out: list[Entry] = []
    with open(path, "rb") as f:
        for m in members:
            name = f"teacher cache shard {path}: pack {m.key}.{PACK_EXT}"
            if set(m.members) != {PACK_EXT}:
                raise CacheError(f"{name}: member(s) .{', .'.join(sorted(m.members))} where a .{PACK_EXT} "
                                 f"is expected (a cache of another format; rebuild it with this engine)")
            off, size = m.members[PACK_EXT]
            f.seek(off)
            head = f.read(min(size, 4096))
            if len(head) >= _PACK_HEAD.size and head[:4] == PACK_MAGIC:
                want = _PACK_HEAD.size + _PACK_HEAD.unpack_from(head)[2] + 4
                if want > len(head) and want <= size:
                    head += f.read(want - len(head))
            keys, sizes, hl = _parse_pack_head(head, name)
            if keys[0] != m.key:
                raise CacheError(f"{name}: its first key is {keys[0]!r}, not the member's name")
            if hl + sum(sizes) != size:
                raise CacheError(f"{name}: records add up to {hl + sum(sizes)} bytes, the member has {size}")
            pos = off + hl
            for k, n in zip(keys, sizes):
                out.append(Entry(k, pos, n))
                pos += n
    return out


def read_entry(path: str | os.PathLike, entry: Entry) -> bytes:
    """The record bytes of ``entry`` (one read); :class:`CacheError` when the shard is cut short."""
    from .data import tario

    try:
        return tario.read_member(path, entry.offset, entry.size)
    except tario.TarError as e:
        raise CacheError(f"teacher cache shard {e}") from None


def read_shard(path: str | os.PathLike) -> list[tuple[str, bytes]]:
    """All (key, record bytes) of a cache shard in order (tests, tools)."""
    return [(e.key, read_entry(path, e)) for e in index_shard(path)]


# ============================================================================================ teacher pass

def _backbone_and_head(model: Any) -> tuple[Any, Any]:
    head = model.get_output_embeddings()
    base = getattr(model, "model", None)
    if base is None or head is None:
        raise CacheError(f"{type(model).__name__}: cannot find the decoder stack (.model) and lm_head")
    return base, head


MODEL_INPUTS = ("input_ids", "attention_mask", "input_features", "feature_attention_mask")


def model_inputs(batch: Mapping[str, Any], device: Any) -> dict[str, Any]:
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}


def label_positions(labels: Any) -> Any:
    """``(b, t)`` index pairs of label tokens (row-major, so per sample in sequence order)."""
    import torch

    return torch.nonzero(labels != IGNORE, as_tuple=False)


def topk_from_hidden(hidden: Any, head: Any, k: int, vocab_size: int, chunk: int = 512) -> tuple[Any, Any, Any]:
    """hidden [N, H] -> (ids [N,k] int64, logprobs [N,k] fp32, tail [N] fp32) over the first V rows.

    The distribution is the softmax over all logit rows (fp32 logits); top-k among the first
    ``vocab_size``; the tail is the log of everything else (padded rows included). Chunked over N so
    at most ``chunk x rows`` fp32 logits exist at once.

    Why not ``log_softmax`` then ``topk`` then a masked ``logsumexp``: each of those walks the whole
    [N, rows] matrix, which on a small model costs more than the matmul that made the logits. Here:
    one ``topk`` on the raw logits (same order as the log-probs), the k winners set to -inf in place,
    one fused ``logsumexp`` of the rest; the normaliser is ``logaddexp`` of that and the top-k's own
    log-sum-exp. The rest is summed directly (not as total minus top-k), so the tiny tail of a peaked
    row keeps its full relative precision.
    """
    import torch

    ids, lps, tails = [], [], []
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s:s + chunk]).float()
        pad_lse = None
        if logits.shape[1] > vocab_size:      # padded embedding rows: never a top-k id, mass -> tail
            pad_lse = torch.logsumexp(logits[:, vocab_size:], dim=-1)
            logits[:, vocab_size:] = float("-inf")
        top = logits.topk(k, dim=-1)
        logits.scatter_(-1, top.indices, float("-inf"))
        rest = torch.logsumexp(logits, dim=-1)
        if pad_lse is not None:
            rest = torch.logaddexp(rest, pad_lse)
        logz = torch.logaddexp(torch.logsumexp(top.values, dim=-1), rest)
        ids.append(top.indices)
        lps.append(top.values - logz[:, None])
        tails.append(rest - logz)
    if not ids:
        e = hidden.new_zeros((0, k))
        return e.long(), e.float(), e.new_zeros(0).float()
    return torch.cat(ids), torch.cat(lps), torch.cat(tails)


@contextlib.contextmanager
def _gathered_head(head: Any, zero3: bool):
    """``lm_head`` as a callable. Under ZeRO-3 its weight is gathered once (one collective, whatever
    the number of rows) and applied with ``F.linear`` (what ``nn.Linear.forward`` computes), so the
    number of collectives does not depend on the data."""
    if not zero3:
        yield head
        return
    import deepspeed
    import torch.nn.functional as F

    with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
        yield lambda x: F.linear(x, head.weight, head.bias)


def word_level(model: Any, batch: Mapping[str, Any], k: int, vocab_size: int, device: Any,
               zero3: bool = False) -> list[topk_codec.TopK]:
    """The teacher's top-k at every label position of a featurized batch, one TopK per sample.

    The label at position t is predicted from the hidden state at t-1, so hidden states are
    gathered at (b, t-1) for every label (b, t), then ``lm_head`` runs on those rows only.
    """
    import torch

    base, head = _backbone_and_head(model)
    labels = batch["labels"]
    with torch.inference_mode():
        out = base(**model_inputs(batch, device), use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pos = label_positions(labels)
        if (pos[:, 1] == 0).any():
            raise CacheError("a label at position 0 has no preceding hidden state")
        h = hidden[pos[:, 0].to(hidden.device), (pos[:, 1] - 1).to(hidden.device)]
        with _gathered_head(head, zero3) as fn:
            ids, lp, tail = topk_from_hidden(h, fn, k, vocab_size)
    ids, lp, tail = ids.cpu().numpy(), lp.cpu().numpy(), tail.cpu().numpy()
    counts = (labels != IGNORE).sum(1).tolist()
    res, s = [], 0
    for n in counts:
        res.append(topk_codec.TopK(ids[s:s + n], lp[s:s + n], tail[s:s + n]))
        s += n
    return res


def _left_padded_prompts(featurizer: Any, samples: list[dict]) -> tuple[dict[str, Any], list[list[int]]]:
    """Generation inputs built exactly as the featurizer builds its prompts, padded on the left."""
    import torch

    b = featurizer.builder
    with_audio = [featurizer.use_audio and s.get("audio") is not None for s in samples]
    texts = [b.prompt_text(s["meta"], audio=a) for s, a in zip(samples, with_audio)]
    prompt_ids: list[list[int]] = [[] for _ in samples]
    feats: dict[str, Any] = {}
    rows = [i for i, a in enumerate(with_audio) if a]
    if rows:
        ids, feats = featurizer._prompt_ids_audio([texts[i] for i in rows], [samples[i]["audio"] for i in rows],
                                                  int(samples[rows[0]].get("sample_rate", 16000)))
        for i, p in zip(rows, ids):
            prompt_ids[i] = p
    for i, a in enumerate(with_audio):
        if not a:
            prompt_ids[i] = b.tokenize(texts[i])
    t = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(samples), t), b.pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), t), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        input_ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": mask, **feats}, prompt_ids


def greedy(model: Any, featurizer: Any, samples: list[dict], max_new_tokens: int, device: Any,
           zero3: bool = False) -> tuple[list[str], list[list[int]]]:
    """The teacher's greedy translations (text, prompt ids) for decoded samples (``zero3``: generate with
    ``synced_gpus=True``, so every rank steps until all ranks' batches are done)."""
    import torch

    inputs, prompt_ids = _left_padded_prompts(featurizer, samples)
    tok = featurizer.builder.tokenizer
    with torch.inference_mode():
        out = model.generate(**model_inputs(inputs, device), max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=featurizer.builder.pad_id,
                             **({"synced_gpus": True} if zero3 else {}))
    new = out[:, inputs["input_ids"].shape[1]:].cpu()
    texts = [tok.decode(row.tolist(), skip_special_tokens=True).strip() for row in new]
    return texts, prompt_ids


def _norm(text: str) -> str:
    return " ".join(text.split())


# ============================================================================================ build

def _dirs(recipe: Any) -> tuple[Path, str, Path, Path]:
    c = recipe.cache
    shards = Path(recipe.data.shards)
    split = c.split or recipe.data.train_split
    out = Path(c.out) if c.out else Path(recipe.run.out_dir) / "cache"
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


def teacher_vocab_rows(model: Any) -> int:
    w = model.get_output_embeddings().weight
    return int(getattr(w, "ds_shape", w.shape)[0])          # ds_shape: the full shape of a ZeRO-3 slice


def prompt_fingerprint(builder: Any) -> str:
    """The prompt template rendered on a fixed example (text and token ids), with and without audio."""
    from .meta import fingerprint_prompt

    meta = {"src_lang": "en", "tgt_lang": "de", "src_text": "Good morning.", "tgt_text": "Guten Morgen."}

    def render() -> Any:
        docs = []
        for audio in ((True, False) if builder.is_audio else (False,)):
            text = builder.full_text(meta, meta["tgt_text"], audio=audio)
            docs.append([text, builder.tokenize(text)])
        return docs

    return fingerprint_prompt(render)


def input_fingerprints(builder: Any, teacher_dir: Path | None = None) -> dict[str, str]:
    """Fingerprints a student run compares against a cache: tokenizer and prompt (+ teacher weights and
    feature extractor when ``teacher_dir`` is given).

    The feature extractor is fingerprinted from the loaded object (``to_dict()``), not a file:
    transformers 5 saves it inside ``processor_config.json``, older versions as
    ``preprocessor_config.json``, and the same extractor must give the same fingerprint either way.
    """
    from .meta import fingerprint_model, fingerprint_obj, fingerprint_tokenizer

    fp = {"tokenizer": fingerprint_tokenizer(builder.tokenizer), "prompt": prompt_fingerprint(builder)}
    if teacher_dir is not None:
        fp["teacher"] = fingerprint_model(teacher_dir)
    if builder.feature_extractor is not None:
        fe = builder.feature_extractor.to_dict()
        fe.pop("processor_class", None)
        fp["feature_extractor"] = fingerprint_obj(fe)
    return fp


def _identity(recipe: Any, fps: Mapping[str, str], vocab: int, split: str, source_dir: Path) -> dict[str, Any]:
    c = recipe.cache
    return {"format": FORMAT, "fingerprints": dict(fps), "vocab_size": vocab, "k": c.k, "split": split,
            "targets": list(c.targets), "teacher_topk": c.teacher_topk, "max_new_tokens": c.max_new_tokens,
            "batch_size": c.batch_size, "dtype": c.dtype if c.dtype != "auto" else recipe.model.dtype,
            "quant": c.quant if c.quant != "auto" else recipe.model.quant,
            "encoding": {"topk": f"topk_codec v{topk_codec.VERSION} step 2^-{topk_codec.DEFAULT_STEP_EXP} lzma",
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
    from .io import sha256_file

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


def _load_teacher(recipe: Any, teacher: Path, device: Any, zero3: bool = False) -> Any:
    """The teacher, eval mode, on ``device`` (``zero3``: left on the host; :func:`_zero3_teacher` shards it)."""
    from .config import ModelConfig
    from .models.load import load_model

    c, m = recipe.cache, recipe.model
    mc = ModelConfig(path=str(teacher), kind="auto", dtype=c.dtype if c.dtype != "auto" else m.dtype,
                     quant=c.quant if c.quant != "auto" else m.quant, double_quant=m.double_quant,
                     trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation)
    model = load_model(mc, device=device if mc.quant == "nf4" else None)
    if mc.quant != "nf4" and not zero3:
        model.to(device)
    return model.eval()


def _zero3_teacher(recipe: Any, teacher: Path, vocab: int, env: Any, device: Any) -> tuple[Any, dict[str, int]]:
    """Load the teacher partitioned (``zero.Init`` through transformers' ``HfDeepSpeedConfig``: no rank
    ever holds all weights) and wrap it with ``deepspeed.initialize`` (ZeRO-3, no optimizer): the module
    (its ZeRO hooks gather each layer's weights around its forward) and the partitioning counts."""
    import dataclasses
    import socket

    import deepspeed
    import torch
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    from . import dist
    from .train_ds import fill_config, load_template

    c = recipe.cache
    dtype = c.dtype if c.dtype != "auto" else recipe.model.dtype
    mcfg = AutoConfig.from_pretrained(teacher, local_files_only=True,
                                      trust_remote_code=recipe.model.trust_remote_code)
    text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    ds = fill_config(load_template(3, False), stage=3, micro_batch=c.batch_size, accum=1,
                     world_size=env.world_size, dtype=dtype, grad_clip=1.0, offload=False,
                     hidden_size=int(getattr(text_cfg, "hidden_size", 0)),
                     param_persistence_threshold=c.zero3_persistence_threshold
                     if c.zero3_persistence_threshold >= 0 else None, on_cpu=device.type == "cpu")
    if not dist.is_initialized():       # one rank: DeepSpeed still wants a process group
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.export_torch_env(dataclasses.replace(env, master_port=int(os.environ.get("MASTER_PORT", port))))
    dist.clear_stale_build_locks()  # a build lock left by a killed start would hang us
    deepspeed.init_distributed(dist_backend=dist.backend_for_device())
    hf_ds = HfDeepSpeedConfig(ds)       # while alive, from_pretrained loads under zero.Init
    model = _load_teacher(recipe, teacher, device, zero3=True)
    rows = teacher_vocab_rows(model)
    if rows < vocab:
        raise CacheError(f"teacher {teacher}: its output layer has {rows} rows but the tokenizer has "
                         f"{vocab} tokens: tokenizer and model do not belong together")
    zero_init = all(hasattr(p, "ds_id") for p in model.parameters())   # partitioned while loading
    engine, *_ = deepspeed.initialize(model=model, config=ds, dist_init_required=True)
    del hf_ds
    module = engine.module.eval()
    # Weights read as ``.weight`` in the parent's forward, outside their own module's forward (the audio
    # encoder's ``embed_positions.weight`` in Qwen2-Audio/Whisper): ZeRO-3 would hand the parent an
    # empty slice. Registered as the parent's external parameters, they are gathered with it.
    for sub in list(module.modules()):
        for child_name, child in sub.named_children():
            if child_name == "embed_positions" and isinstance(getattr(child, "weight", None), torch.nn.Parameter):
                deepspeed.zero.register_external_parameter(sub, child.weight)
    z3 = [(int(p.ds_tensor.numel()), int(p.ds_numel)) for p in module.parameters() if hasattr(p, "ds_numel")]
    stats = {"params": len(z3), "partitioned": sum(loc < full for loc, full in z3),
             "local_numel": sum(loc for loc, _ in z3), "numel": sum(f for _, f in z3), "world_size": env.world_size,
             "zero_init": bool(zero_init)}
    return module, stats


def _featurize(featurizer: Any, samples: list[dict], keys: list[str]) -> dict[str, Any]:
    from .data.prompt import PromptError

    try:
        return featurizer(samples)
    except PromptError as e:
        raise CacheError(f"cannot build the label sequence: {e}") from None


FAULT_ENV = "STC_FAULT_KILL_AT"   # tests only: "<shard name>:<batch>" -> SIGKILL self after that batch


def _fault_point(shard: str, batch: int) -> None:
    """Fault injection for the kill-and-resume test: a real SIGKILL in the middle of a shard."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{shard}:{batch}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def process_shard(model: Any, featurizer: Any, samples: list[dict], recipe: Any, vocab: int, device: Any,
                  timings: dict[str, float], shard: str = "", zero3: bool = False) -> list[bytes]:
    """Decoded samples of one audio shard -> one record per sample (in order; :func:`shard_bytes` packs them).

    ``zero3``: every batch makes the same teacher calls whatever its data (module docstring)."""
    from .data.prompt import PromptError

    c = recipe.cache
    records: list[bytes] = []
    bs = c.batch_size
    for s0 in range(0, len(samples), bs):
        chunk = samples[s0:s0 + bs]
        keys = [s["key"] for s in chunk]
        t0 = time.perf_counter()
        batch = _featurize(featurizer, chunk, keys)
        t1 = time.perf_counter()
        labels = batch["labels"]
        per: list[list[Target]] = [[] for _ in chunk]
        ref_ids = [labels[i][labels[i] != IGNORE].numpy().astype(np.int64) for i in range(len(chunk))]
        if "ref" in c.targets:
            topks = word_level(model, batch, c.k, vocab, device, zero3)
            for i, tk in enumerate(topks):
                per[i].append(Target("ref", ref_ids[i], tk))
        t2 = time.perf_counter()
        timings["featurize"] += t1 - t0
        timings["word_level"] += t2 - t1
        if "teacher" in c.targets:
            t3 = time.perf_counter()
            texts, prompt_ids = greedy(model, featurizer, chunk, c.max_new_tokens, device,
                                       **({"zero3": True} if zero3 else {}))
            timings["generate"] += time.perf_counter() - t3
            tsamples, tidx = [], []
            teach: list[Target] = []
            for i, (s, text) in enumerate(zip(chunk, texts)):
                meta = dict(s["meta"], tgt_text=text)
                equal = _norm(text) == _norm(s["meta"].get("tgt_text", ""))
                try:
                    enc = featurizer.builder.encode(meta, prompt_ids[i], audio=featurizer.use_audio and
                                                    s.get("audio") is not None, key=s["key"])
                    ids = np.array([t for t in enc.labels if t != IGNORE], np.int64)
                    t = Target("teacher", ids, text=text, equals_ref=equal)
                    if c.teacher_topk and not equal:
                        tsamples.append(dict(s, meta=meta))
                        tidx.append(i)
                except PromptError:   # the teacher said nothing: no sequence-level sample for this key
                    t = Target("teacher", np.zeros(0, np.int64), text=text, equals_ref=equal, empty=True)
                teach.append(t)
            if tsamples:
                t4 = time.perf_counter()
                tb = _featurize(featurizer, tsamples, [s["key"] for s in tsamples])
                for j, tk in zip(tidx, word_level(model, tb, c.k, vocab, device, zero3)):
                    teach[j].topk = tk
                timings["word_level_teacher"] += time.perf_counter() - t4
            elif zero3 and c.teacher_topk:   # keep the collectives in lockstep: same call, result discarded
                word_level(model, batch, c.k, vocab, device, zero3)
            for i, t in enumerate(teach):
                per[i].append(t)
        for s, targets in zip(chunk, per):
            records.append(encode_record(targets, vocab))
        _fault_point(shard, s0 // bs)
    return records


def build(recipe: Any) -> dict[str, Any]:
    """``stc cache build``: the teacher pass over this rank's audio shards, then meta.json (rank 0)."""
    from . import dist

    owns = not dist.is_initialized()
    env = dist.init()
    try:
        return _build(recipe, env)
    finally:
        if owns:
            dist.finalize()


def _agree(err: str | None) -> None:
    """Raise on every rank when any rank failed a check (so no rank waits at a barrier forever)."""
    from . import dist

    errs = [e for e in dist.all_gather_object(err) if e]
    if errs:
        raise CacheError(errs[0])


def _build(recipe: Any, env: Any) -> dict[str, Any]:
    import torch

    from . import dist, log
    from .data.prompt import Featurizer
    from .data.stream import ShardReader, shards_fingerprint, shards_from_meta
    from .io import atomic_write_bytes, atomic_write_json, remove_stale_tmp, sha256_bytes
    from .meta import MetaError, read_meta
    from .models.load import ModelLoadError, check_model_dir, load_processor

    lg = log.get()
    check_options(recipe)
    shards_dir, split, out, teacher = _dirs(recipe)
    c = recipe.cache
    if recipe.run.threads > 0:
        torch.set_num_threads(recipe.run.threads)
    try:
        check_model_dir(teacher)
        smeta = read_meta(shards_dir, kind="shards")
    except (ModelLoadError, MetaError) as e:
        raise CacheError(f"teacher/shards: {e}") from None
    shards = shards_from_meta(smeta, split, source=str(shards_dir / "meta.json"))
    if not shards:
        raise CacheError(f"{shards_dir}: no audio shards of split {split!r}")
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
    try:
        if zero3 and rounds:
            model, z3stats = _zero3_teacher(recipe, teacher, vocab, env, device)
        elif todo:
            model = _load_teacher(recipe, teacher, device)
            rows = teacher_vocab_rows(model)
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
        for info in todo:
            t0 = time.perf_counter()
            samples = [dict(reader.read((pos[info.name], i)), pad=False) for i in range(info.n)]
            timings = {"featurize": 0.0, "word_level": 0.0, "generate": 0.0, "word_level_teacher": 0.0}
            recs = process_shard(model, featurizer, samples, recipe, vocab, device, timings, info.name, zero3)
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
                process_shard(model, featurizer, pad, recipe, vocab, device, scratch, "", zero3)
    except (CacheError, StreamError, ModelLoadError) as e:
        err = f"rank {env.rank}: {e}"
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
    from .meta import build_meta, write_meta

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
                          "logprob_abs": topk_codec.max_logprob_error(), "kl_per_position": topk_codec.kl_bound()})
    write_meta(out, meta)
    from . import log

    log.get().info(f"cache {out}: {counts['shards']} shard(s), {counts['samples']} samples, "
                   f"{counts['label_tokens']} label tokens, {counts['bytes']} bytes "
                   f"({counts['bytes_per_label_token']} B/label token); {counts['teacher_samples']} teacher "
                   f"sample(s) for sequence-level KD ({counts['teacher_equal_ref']} equal to the reference)")
    return {"out": str(out), "counts": counts}


# ============================================================================================ verify

def verify(cache_dir: str | os.PathLike, deep: bool = False) -> dict[str, Any]:
    """``stc cache verify``: completeness vs the audio shards, fingerprints, sizes and checksums.

    Always: the cache's format is this engine's (``FORMAT``); every audio shard of the cached split
    has its cache shard; the audio shards are the ones cached (per-shard sha256 against
    ``meta.json``); each cache shard's size and sha256 match; its packs' framing holds (magic,
    version, index CRC, sizes; :func:`index_shard`) and their keys are the audio shard's keys in the
    same order, each once; the teacher still has the
    fingerprint it had (when its directory exists). ``deep`` also decodes every record.
    """
    from .data.stream import shards_fingerprint, shards_from_meta
    from .io import sha256_file
    from .meta import MetaError, fingerprint_model, read_meta

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
            problems.append(f"{a.name}: {_key_diff(keys, a.keys)}")
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


def _key_diff(got: Sequence[str], want: Sequence[str]) -> str:
    seen: set[str] = set()
    for k in got:
        if k in seen:
            return f"key {k!r} is present twice"
        seen.add(k)
    missing = [k for k in want if k not in seen]
    if missing:
        return f"key {missing[0]!r} is missing ({len(missing)} missing)"
    extra = [k for k in got if k not in set(want)]
    if extra:
        return f"key {extra[0]!r} is not in the audio shard"
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    return f"keys out of order at position {i} ({got[i]!r}, audio shard has {want[i]!r})"


# ============================================================================================ join (the stream)

def read_cache_meta(cache_dir: str | os.PathLike) -> dict:
    from .meta import MetaError, read_meta

    try:
        return read_meta(cache_dir, kind="cache")
    except MetaError as e:
        raise CacheJoinError(f"teacher cache: {e}") from None


def check_compatible(meta: Mapping[str, Any], *, builder: Any = None, teacher: str | os.PathLike | None = None,
                     student_rows: int | None = None) -> None:
    """Refuse a cache made with another teacher, tokenizer, vocabulary or prompt template.

    ``builder``: the student run's :class:`engine.data.prompt.PromptBuilder` (tokenizer and prompt
    are compared by fingerprint, the vocabulary by tokenizer length); ``teacher``: the teacher
    directory the run expects; ``student_rows``: the student's output-embedding rows, which may exceed
    the tokenizer length (padded rows: 151,936 vs 152,064 is fine) but never fall short of it.
    """
    from .meta import fingerprint_model

    fp = meta.get("fingerprints", {})
    diffs = []
    if builder is not None:
        v = len(builder.tokenizer)
        if v != meta.get("vocab_size"):
            diffs.append(f"vocabulary: the cache's tokenizer has {meta.get('vocab_size')} tokens, the student's "
                         f"{v} (padded embedding rows do not count; this is a real mismatch)")
        mine = input_fingerprints(builder)
        for name in ("tokenizer", "prompt"):
            if fp.get(name) != mine[name]:
                what = "tokenizer" if name == "tokenizer" else \
                    "prompt template (system prompt, instruction or chat template)"
                diffs.append(f"{what} differs from the one the cache was built with "
                             f"({str(fp.get(name))[:19]}... vs {mine[name][:19]}...)")
    if teacher is not None and fingerprint_model(teacher) != fp.get("teacher"):
        diffs.append(f"teacher: the cache was built from other teacher weights than {teacher}")
    if student_rows is not None and student_rows < int(meta.get("vocab_size", 0)):
        diffs.append(f"vocabulary: the student's output layer has {student_rows} rows, fewer than the "
                     f"{meta.get('vocab_size')} tokens of the cache's tokenizer")
    if diffs:
        raise CacheJoinError("teacher cache does not fit this run:\n  - " + "\n  - ".join(diffs))


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
        from .io import sha256_file

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
                                 f"{_key_diff(keys, info.keys)}")
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


# ============================================================================================ CLI helpers

def print_summary(summary: Mapping[str, Any]) -> None:
    from .log import console

    if summary.get("problems"):
        console.print(f"[red]cache {summary['dir']}: {len(summary['problems'])} problem(s)[/red]")
        for p in summary["problems"]:
            console.print(f"  - {p}")
    else:
        c = summary.get("counts", {})
        console.print(f"cache {summary.get('dir', summary.get('out'))}: OK, {c.get('shards', summary.get('shards'))} "
                      f"shard(s), {c.get('samples')} samples, {c.get('label_tokens')} label tokens, "
                      f"{c.get('bytes')} bytes ({c.get('bytes_per_label_token')} B/label token)")
