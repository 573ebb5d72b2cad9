"""Compact on-disk encoding of per-position top-k teacher targets (the teacher cache's payload).

One record holds N label positions of one example; each position is the teacher's top-k token ids,
their log-probabilities (temperature 1) and the log of the probability mass outside the top k (the
"tail"). The target is <= 160 bytes per position at k=64 and a vocabulary >= 150k with all
overhead included; the obvious layout (18-bit ids + fp16 values) is 272 B. Ids are the expensive
part: a uniformly random id out of 151,680 carries 17.2 bits, so at k=64 the ids alone are ~138 B and
everything else (values, tail, framing) must fit in ~20 B. The design follows from that.

Values: log-probs are quantised on a fixed grid of ``step`` nats (default 1/8; a power of two,
stored in the header): ``level = round(-logprob / step)``, a non-negative integer. Each row is
sorted by level (probability order), so levels are stored as their first value plus non-negative
gaps, which are small (at k=64 and step 1/8, 70 % are 0 and 95 % are <= 3). Entries whose levels tie carry no order information after
quantisation; that is used for the ids below.

Ids: within a tie group (equal level) ids are sorted ascending and every id after the first is
stored as the (positive, smaller) difference from its predecessor; this recovers the order
information that quantisation destroyed and saves ~5 % of the id bits at k=64. Ids (or
differences) are then split in a high part that fits one byte (``id >> b``) and the low ``b`` bits.
Each record uses the layout with the smaller estimated coded size (order-0 entropy plus the cost
of learning the byte statistics; one compression per record, a header flag says which):

* split: the high byte goes to the entropy coder, the low ``b`` bits are bit-packed raw. Near-
  optimal when ids are spread over the vocabulary (``b = 10`` for V=151,680: 7.2 + 10 bits).
* planes: all bytes of the id go to the entropy coder as separate byte planes. Wins when the ids
  are concentrated on frequent (small) ids, as in byte-level BPE vocabularies ordered by merge rank.

Entropy coder: one raw LZMA2 stream (stdlib ``lzma``, no container header) over the byte planes, in
column-major order for the level gaps so the coder sees one rank at a time. zlib (raw deflate) is
supported as the faster alternative (``compressor="zlib"``, ~3-6 % larger).

Tail: stored as its level relative to the row's last (smallest) level, zig-zag coded; ``-inf`` (no
mass outside the top k, e.g. k = V) has its own code.

Error bound and renormalisation. For an input log-prob ``x`` in ``[-LOGP_FLOOR, 0]`` the quantised
value is within ``step/2`` of ``x``. Decoding renormalises each row over its k + 1 outcomes (top-k +
tail) so that ``logsumexp(logprobs ++ tail) == 0`` exactly (up to float32 rounding): the
distribution stays valid whatever the rounding did. If the input row was normalised, the
renormalisation constant lies between the smallest and largest rounding error, so every decoded
log-prob and the tail differ from the input by at most ``step`` (1/8 nat = 13 % relative
probability at the default). By Hoeffding's lemma (the errors lie in an interval of width
``step``) both ``KL(original || decoded)`` and ``KL(decoded || original)`` over the k + 1 outcomes
are <= ``step**2 / 8`` per position (1/512 nat at the default; ~1e-4 on average on peaked rows,
where one entry holds most of the mass). Any
completion of the tail (one bucket, uniform spread, the student's shape) scales both tails alike,
so the same bound holds for the completed full-vocabulary distributions. Inputs above 0 (rounding
noise of a log-softmax, up to ``POSITIVE_TOLERANCE``) are clamped to 0 and inputs below
``-LOGP_FLOOR`` (including ``-inf`` entries) to the floor; the bound is stated for the clamped input.

Output order: each decoded row is in canonical order, descending log-prob with ties (equal
quantised levels) broken by ascending id. For a top-k row with distinct quantised values this is
the input order.

Record layout (little-endian; varint = unsigned LEB128)::

    b"TK"  magic                              2 bytes
    version (= 1)                             1 byte
    flags: bit0 id layout (0 split, 1 planes), bits1-2 compressor (0 lzma, 1 zlib)
    step exponent e (step = 2**-e)            1 byte
    vocab_size, k, N                          varints
    length of the compressed stream           varint
    compressed stream                         its length
    bit-packed low id bits (split layout)     ceil(N*k*b/8) bytes
    CRC32 of everything above                 4 bytes

The compressed stream holds, in order: the id byte planes, then one byte plane of small integers
(N*(k-1) level gaps column-major, N first levels, N tail codes) with 255 as an escape whose values
follow as uint32, one per escape, in plane order. A record is self-contained, so a cache shard can
hold one record per example; the framing costs ~16 bytes per record (~0.3 B/position for a
50-token translation). Larger records are a little smaller per position (the coder's statistics
are learnt once): at k=64, ~139 B/position for 10-position records, ~131 for 100, ~130 for 600.

Measured (records of 50 positions, V = 151,680, step 1/8, synthetic LM-like logits with a Zipf id
prior; see tests/test_topk_codec.py; a trained teacher's cache must be measured for real)::

    k                    8     16     32     64    128
    bytes/position     21.7   38.3   70.6  131.8  247.9     (uniform ids, worst case: 145.3 at k=64)
    KL(orig || decoded) mean 1.2e-4, max 1.7e-3 nats (bound 2.0e-3); step 1/16: 138.4 B at k=64,
    KL mean 2.7e-5; step 1/32: 145.9 B, KL mean 8e-6.

Speed: ~10k positions/s per core to encode and ~40k/s to decode at k=64 (numpy + lzma; both release
the GIL in the compressor, so a thread pool scales the cache writer).
"""
from __future__ import annotations

import lzma
import struct
import zlib
from typing import NamedTuple

import numpy as np

from ..errors import StcError

MAGIC = b"TK"
VERSION = 1
DEFAULT_STEP_EXP = 3              # step = 1/8 nat: see the module docstring for the bound it gives
MAX_STEP_EXP = 12
MAX_VOCAB = 1 << 31
LOGP_FLOOR = 1000.0               # nats; exp(-1000) is 0 in every float format
POSITIVE_TOLERANCE = 1e-2         # log-probs up to this above 0 are rounding noise, clamped to 0
COMPRESSORS = {"lzma": 0, "zlib": 1}
_LAYOUT_SPLIT, _LAYOUT_PLANES = 0, 1
_ESC = 255
# Raw LZMA2 with no literal context: the planes are near order-0 sources and small records do not
# feed a richer model. The dictionary is part of the format (the decoder must allocate at least the
# encoder's); 64 KiB covers a record of ~1,000 positions at k=64, and a larger one costs ~10x the
# time per record in match-finder set-up for no gain on this data (matches are rare).
_LZMA_FILTERS = [dict(id=lzma.FILTER_LZMA2, preset=6, dict_size=1 << 16, lc=0, lp=0, pb=0)]


class CodecError(StcError, ValueError):
    """A payload that is not a valid top-k record, or inputs that cannot be encoded."""


class TopK(NamedTuple):
    """Decoded targets: ``ids`` [N, k] int64, ``logprobs`` [N, k] float32 (descending per row),
    ``tail_logmass`` [N] float32 (log of the mass outside the k ids; -inf when there is none)."""
    ids: np.ndarray
    logprobs: np.ndarray
    tail_logmass: np.ndarray


class RecordInfo(NamedTuple):
    version: int
    vocab_size: int
    k: int
    n: int
    step: float
    layout: str
    compressor: str
    nbytes: int


def max_logprob_error(step_exp: int = DEFAULT_STEP_EXP) -> float:
    """Largest |decoded - input| log-prob (and tail) difference for a normalised input row."""
    return 2.0 ** -step_exp


def kl_bound(step_exp: int = DEFAULT_STEP_EXP) -> float:
    """Bound on KL(original || decoded) and KL(decoded || original) per position, in nats."""
    return (2.0 ** -step_exp) ** 2 / 8.0


# ----------------------------------------------------------------------------------------------
# small helpers

def _varint(x: int) -> bytes:
    out = bytearray()
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        if pos >= end:
            raise CodecError("truncated top-k record header")
        b = buf[pos]
        pos += 1
        x |= (b & 0x7F) << shift
        if not b & 0x80:
            return x, pos
        shift += 7
        if shift > 63:
            raise CodecError("corrupt varint in top-k record header")


def _low_bits(vocab_size: int) -> int:
    """Bits kept out of the entropy coder in the split layout, so the high part fits one byte."""
    return max(int(vocab_size - 1).bit_length() - 8, 0)


def _n_planes(vocab_size: int) -> int:
    return max((int(vocab_size - 1).bit_length() + 7) // 8, 1)


def _entropy_bits(x: np.ndarray) -> float:
    """Estimated adaptive-coding cost of a byte array, in bits: order-0 entropy plus the cost of
    learning the symbol statistics ((distinct - 1)/2 * log2(n), the usual two-part code length),
    which is what decides between the layouts on records of a few thousand bytes."""
    if x.size == 0:
        return 0.0
    c = np.bincount(x, minlength=256)
    c = c[c > 0]
    return float(-(c * np.log2(c / x.size)).sum() + (c.size - 1) / 2 * np.log2(x.size))


def _bitpack(x: np.ndarray, nbits: int) -> bytes:
    if nbits == 0 or x.size == 0:
        return b""
    bits = (x.astype(np.uint32)[:, None] >> np.arange(nbits, dtype=np.uint32)) & 1
    return np.packbits(bits.astype(np.uint8).ravel(), bitorder="little").tobytes()


def _bitunpack(buf: bytes, count: int, nbits: int) -> np.ndarray:
    if nbits == 0 or count == 0:
        return np.zeros(count, np.int64)
    bits = np.unpackbits(np.frombuffer(buf, np.uint8), count=count * nbits, bitorder="little")
    return (bits.reshape(count, nbits).astype(np.int64) << np.arange(nbits, dtype=np.int64)).sum(1)


def _compress(data: bytes, compressor: int) -> bytes:
    if compressor == 0:
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return zlib.compress(data, 9)[2:-4]          # raw deflate: the record has its own CRC


def _decompress(data: bytes, compressor: int, expect: int) -> bytes:
    try:
        if compressor == 0:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            out = d.decompress(data, max_length=expect + 1)
        else:
            d = zlib.decompressobj(-15)
            out = d.decompress(data, expect + 1)
    except (lzma.LZMAError, zlib.error) as e:
        raise CodecError(f"corrupt top-k record stream: {e}") from None
    if not d.eof or d.unused_data or len(out) > expect:
        raise CodecError("corrupt top-k record stream: wrong length")
    return out


def _as_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):                     # torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# encode

def encode(ids, logprobs, tail_logmass, vocab_size: int, *, step_exp: int = DEFAULT_STEP_EXP,
           compressor: str = "lzma") -> bytes:
    """Encode one record of N positions.

    ids [N, k] int (distinct per row, in ``[0, vocab_size)``), logprobs [N, k] float (any order),
    tail_logmass [N] float (log of the mass outside the k ids, ``-inf`` when none). numpy arrays or
    torch tensors. Returns the record bytes; see the module docstring for format and error bound.
    """
    if compressor not in COMPRESSORS:
        raise CodecError(f"compressor must be one of {sorted(COMPRESSORS)}, got {compressor!r}")
    if not (0 <= step_exp <= MAX_STEP_EXP):
        raise CodecError(f"step_exp must be in [0, {MAX_STEP_EXP}], got {step_exp}")
    vocab_size = int(vocab_size)
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise CodecError(f"vocab_size must be in [1, {MAX_VOCAB}], got {vocab_size}")
    ids = _as_numpy(ids, np.int64)
    lp = _as_numpy(logprobs, np.float64)
    tail = _as_numpy(tail_logmass, np.float64)
    if ids.ndim != 2 or lp.shape != ids.shape or tail.shape != ids.shape[:1]:
        raise CodecError(f"shapes must be ids [N,k], logprobs [N,k], tail [N]; got {ids.shape}, "
                         f"{lp.shape}, {tail.shape}")
    n, k = ids.shape
    if k < 1 or k > vocab_size:
        raise CodecError(f"k must be in [1, vocab_size={vocab_size}], got {k}")
    if n and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CodecError(f"ids must be in [0, {vocab_size}); got range [{ids.min()}, {ids.max()}]")
    if np.isnan(lp).any() or np.isnan(tail).any():
        raise CodecError("NaN in log-probs or tail")
    if n and (lp.max() > POSITIVE_TOLERANCE or tail.max() > POSITIVE_TOLERANCE):
        raise CodecError(f"log-probs must be <= 0 (tolerance {POSITIVE_TOLERANCE}); got max "
                         f"{max(lp.max(), tail.max()):.4g}")
    step = 2.0 ** -step_exp
    scale = 1.0 / step
    lmax = int(round(LOGP_FLOOR * scale))
    levels = np.clip(np.rint(-lp * scale), 0, lmax).astype(np.int64)

    # canonical order: level ascending (probability descending), ties by id ascending
    order = np.argsort(levels * vocab_size + ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, 1)
    levels = np.take_along_axis(levels, order, 1)
    dup = (np.diff(np.sort(ids, axis=1), axis=1) == 0).any(axis=1)
    if dup.any():
        raise CodecError(f"duplicate ids within a row (row {int(np.nonzero(dup)[0][0])})")
    tie = np.diff(levels, axis=1) == 0                               # [N, k-1]
    delta = ids.copy()
    delta[:, 1:] = np.where(tie, ids[:, 1:] - ids[:, :-1], ids[:, 1:])

    gaps = np.diff(levels, axis=1)
    first = levels[:, 0]
    tail_level = np.clip(np.rint(-tail * scale), 0, lmax).astype(np.int64)
    rel = tail_level - levels[:, -1]
    zig = np.where(rel >= 0, 2 * rel, -2 * rel - 1) + 1
    tail_code = np.where(np.isneginf(tail), 0, zig)
    small = np.concatenate([gaps.T.ravel(), first, tail_code])
    escapes = small[small >= _ESC]
    small_plane = np.minimum(small, _ESC).astype(np.uint8).tobytes() + escapes.astype("<u4").tobytes()

    flat = delta.ravel()
    b = _low_bits(vocab_size)
    hi = (flat >> b).astype(np.uint8)
    planes = [((flat >> (8 * p)) & 0xFF).astype(np.uint8) for p in reversed(range(_n_planes(vocab_size)))]
    # Pick the layout by the estimated size of its coded bytes, so only one compression runs: on the
    # synthetic sets, compressing both and keeping the smaller chose the same layout every time.
    if _entropy_bits(hi) + b * flat.size <= sum(_entropy_bits(p) for p in planes):
        layout, stream, raw = _LAYOUT_SPLIT, hi.tobytes(), _bitpack(flat & ((1 << b) - 1), b)
    else:
        layout, stream, raw = _LAYOUT_PLANES, b"".join(p.tobytes() for p in planes), b""
    stream = _compress(stream + small_plane, COMPRESSORS[compressor])
    flags = layout | (COMPRESSORS[compressor] << 1)
    body = (MAGIC + bytes([VERSION, flags, step_exp]) + _varint(vocab_size) + _varint(k) + _varint(n)
            + _varint(len(stream)) + stream + raw)
    return body + struct.pack("<I", zlib.crc32(body))


# ----------------------------------------------------------------------------------------------
# decode

def _parse_header(buf: bytes) -> tuple[RecordInfo, int, int, int]:
    """Check framing and CRC; return (info, stream start, stream length, flags)."""
    if len(buf) < 2 + 3 + 4 + 4:
        raise CodecError(f"top-k record too short ({len(buf)} bytes)")
    if buf[:2] != MAGIC:
        raise CodecError("not a top-k record (bad magic)")
    end = len(buf) - 4
    (crc,) = struct.unpack_from("<I", buf, end)
    if zlib.crc32(memoryview(buf)[:end]) != crc:
        raise CodecError("top-k record CRC mismatch: corrupt or truncated")
    version, flags, step_exp = buf[2], buf[3], buf[4]
    if version != VERSION:
        raise CodecError(f"unsupported top-k record version {version} (this build reads {VERSION})")
    if step_exp > MAX_STEP_EXP or flags >> 3 or ((flags >> 1) & 3) not in COMPRESSORS.values():
        raise CodecError("corrupt top-k record header")
    pos = 5
    vocab_size, pos = _read_varint(buf, pos, end)
    k, pos = _read_varint(buf, pos, end)
    n, pos = _read_varint(buf, pos, end)
    slen, pos = _read_varint(buf, pos, end)
    if not 1 <= vocab_size <= MAX_VOCAB or not 1 <= k <= vocab_size:
        raise CodecError(f"corrupt top-k record header: k={k}, vocab_size={vocab_size}")
    layout = flags & 1
    comp = (flags >> 1) & 3
    raw_len = (n * k * _low_bits(vocab_size) + 7) // 8 if layout == _LAYOUT_SPLIT else 0
    if pos + slen + raw_len != end:
        raise CodecError(f"top-k record length mismatch: header promises {pos + slen + raw_len + 4} "
                         f"bytes, got {len(buf)}")
    info = RecordInfo(version, vocab_size, k, n, 2.0 ** -step_exp,
                      "split" if layout == _LAYOUT_SPLIT else "planes",
                      [c for c, v in COMPRESSORS.items() if v == comp][0], len(buf))
    return info, pos, slen, flags


def info(buf: bytes) -> RecordInfo:
    """Header of a record (validates framing and CRC, does not decompress)."""
    return _parse_header(bytes(buf))[0]


def decode(buf: bytes) -> TopK:
    """Decode a record written by :func:`encode`; raises :class:`CodecError` on any inconsistency.

    Returns ids [N, k] int64, logprobs [N, k] float32, tail_logmass [N] float32, each row
    renormalised so that ``logsumexp(logprobs ++ tail) == 0``.
    """
    buf = bytes(buf)
    hdr, pos, slen, flags = _parse_header(buf)
    n, k, vocab_size = hdr.n, hdr.k, hdr.vocab_size
    layout, comp = flags & 1, (flags >> 1) & 3
    m = n * k
    b = _low_bits(vocab_size)
    id_bytes = m if layout == _LAYOUT_SPLIT else m * _n_planes(vocab_size)
    n_small = n * (k - 1) + 2 * n
    stream = _decompress(buf[pos:pos + slen], comp, id_bytes + n_small + 4 * n_small)
    if len(stream) < id_bytes + n_small:
        raise CodecError("top-k record stream too short")
    small = np.frombuffer(stream, np.uint8, n_small, id_bytes).astype(np.int64)
    n_esc = int((small == _ESC).sum())
    if len(stream) != id_bytes + n_small + 4 * n_esc:
        raise CodecError("top-k record stream has the wrong length")
    if n_esc:
        small[small == _ESC] = np.frombuffer(stream, "<u4", n_esc, id_bytes + n_small)

    if layout == _LAYOUT_SPLIT:
        hi = np.frombuffer(stream, np.uint8, m).astype(np.int64)
        low = _bitunpack(buf[pos + slen:len(buf) - 4], m, b)
        delta = (hi << b) | low
    else:
        planes = np.frombuffer(stream, np.uint8, id_bytes).astype(np.int64).reshape(-1, m) if m else []
        delta = np.zeros(m, np.int64)
        for p in planes:
            delta = (delta << 8) | p
    delta = delta.reshape(n, k)

    gaps = small[:n * (k - 1)].reshape(k - 1, n).T
    first = small[n * (k - 1):n * k]
    tail_code = small[n * k:]
    levels = np.concatenate([first[:, None], gaps], axis=1).cumsum(axis=1)
    # undo the tie-group differences: a segmented cumulative sum restarting at every group start
    starts = np.ones((n, k), bool)
    starts[:, 1:] = gaps != 0
    csum = delta.cumsum(axis=1)
    base = np.where(starts, csum - delta, 0)
    base = np.maximum.accumulate(np.where(starts, base, -1), axis=1)   # csum is non-decreasing
    ids = csum - base
    if m and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CodecError("decoded id out of range: corrupt record")
    if k > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
        raise CodecError("decoded duplicate ids: corrupt record")

    step = hdr.step
    lp = -levels.astype(np.float64) * step
    zz = tail_code - 1
    rel = np.where(zz % 2 == 0, zz // 2, -(zz + 1) // 2)
    tail = np.where(tail_code == 0, -np.inf, -(levels[:, -1] + rel).astype(np.float64) * step)
    # renormalise over the k + 1 outcomes (top-k ++ tail) in float64
    top = lp[:, :1]                                    # the row maximum: levels ascend
    z = np.exp(lp - top).sum(1) + np.exp(tail - top[:, 0])
    lse = top[:, 0] + np.log(z)
    lp = lp - lse[:, None]
    tail = tail - lse
    return TopK(ids, lp.astype(np.float32), tail.astype(np.float32))
