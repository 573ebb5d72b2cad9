"""The teacher cache on disk: shard, pack and record formats, and what a cache is of.

A cache is a folder (layout in :mod:`engine.cache`) of shards ``X.tar`` that mirror the audio shards
``X.tar`` of one split: same keys, same order. This module reads and writes their bytes and says
whether a cache fits a run; it runs no model.

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
top-k blob is an :mod:`engine.cache.codec` record: per label position the teacher's top-k token ids,
log-probs quantised to 1/8 nat and the log of the mass outside the top k; decoded log-probs are
within ``codec.max_logprob_error()`` (1/8 nat) of the teacher's, KL <= 1/512 nat per position.

**Alignment.** Row ``j`` of a target's top-k is the teacher's distribution for its ``j``-th label
token (the ``j``-th position with ``labels != -100`` as :class:`engine.data.prompt.Featurizer`
builds them), i.e. computed from the hidden state one position earlier.

**Vocabulary.** ``V`` is the tokenizer's length, not the embedding row count: Qwen checkpoints pad
the embedding (152,064 or 156,032 rows for ~151,650 tokens). Log-softmax runs over all rows, top-k
over the first ``V``; the padded rows' (tiny) mass lands in the tail. A student is compatible when
its tokenizer is identical (fingerprint) and its embedding has at least ``V`` rows
(:func:`check_compatible`).
"""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..data import tario
from ..data.stream import StreamError
from ..errors import StcError
from ..meta import MetaError, fingerprint_model, fingerprint_obj, fingerprint_prompt, fingerprint_tokenizer, read_meta
from . import codec

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


class CacheError(StcError):
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
    topk: codec.TopK | None = None         # ids [n,k], logprobs [n,k], tail_logmass [n]
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
            tk = codec.encode(t.topk.ids, t.topk.logprobs, t.topk.tail_logmass, vocab_size)
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
                topk = codec.decode(tk_bytes)
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
    except (struct.error, ValueError, KeyError, IndexError, TypeError, codec.CodecError) as e:
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
    try:
        return tario.read_member(path, entry.offset, entry.size)
    except tario.TarError as e:
        raise CacheError(f"teacher cache shard {e}") from None


def read_shard(path: str | os.PathLike) -> list[tuple[str, bytes]]:
    """All (key, record bytes) of a cache shard in order (tests, tools)."""
    return [(e.key, read_entry(path, e)) for e in index_shard(path)]


def prompt_fingerprint(builder: Any) -> str:
    """The prompt template rendered on a fixed example (text and token ids), with and without audio."""
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
    fp = {"tokenizer": fingerprint_tokenizer(builder.tokenizer), "prompt": prompt_fingerprint(builder)}
    if teacher_dir is not None:
        fp["teacher"] = fingerprint_model(teacher_dir)
    if builder.feature_extractor is not None:
        fe = builder.feature_extractor.to_dict()
        fe.pop("processor_class", None)
        fp["feature_extractor"] = fingerprint_obj(fe)
    return fp



def key_diff(got: Sequence[str], want: Sequence[str]) -> str:
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


def read_cache_meta(cache_dir: str | os.PathLike) -> dict:
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
