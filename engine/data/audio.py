"""Decode, cut, downmix, resample and check one clip; encode it as 16 kHz mono FLAC.

Everything libsndfile reads (WAV, FLAC, OGG/Vorbis, MP3, ...) goes through :func:`load`. A segment
(``offset_s``/``duration_s``) is read by seeking, and at most ``max_s`` seconds are decoded, so a
two-hour recording cut into MuST-C-style segments costs only the segments. Problems raise
:class:`AudioError` with a short ``code`` (for summaries) and a reason that names the fix; the
shard builder turns those into rejected rows, so one bad file never stops a build.

A segment that asks for more than the file holds (``offset_s + duration_s`` past the end, beyond
``overrun_tolerance_s``) is rejected (``overrun="reject"``) or cut to what exists with the missing
seconds reported (``overrun="truncate"``); it is never shortened silently. Samples above full scale
(float audio with ``|x| > 1``) are clipped to [-1, 1] and counted in :attr:`Clip.clipped`.

Why the extra checks: libsndfile quietly shortens a WAV whose data chunk is cut off and mpg123
skips damaged MP3 frames, so "it decoded" does not mean "it is whole". A cut WAV is caught from its
RIFF header, other formats by decoding fewer frames than the header declares.
"""
from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from ..errors import StcError

# mpg123 counts frames from a Xing/Info header or an estimate: allow a small shortfall for MP3 only
_MP3_SLACK = 0.01


class AudioError(StcError, ValueError):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Clip:
    samples: np.ndarray          # float32, mono, in [-1, 1], at ``sample_rate``
    sample_rate: int
    truncated_s: float           # seconds cut off to fit ``max_s`` (0.0 when nothing was cut)
    source_rate: int
    source_channels: int
    source_format: str
    overrun_s: float = 0.0       # seconds a segment asked for past the end of its file (overrun="truncate")
    clipped: int = 0             # samples above full scale (|x| > 1) that were clipped to [-1, 1]

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def peak_dbfs(x: np.ndarray) -> float:
    """Peak level in dB relative to full scale; ``-inf`` for digital silence."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def _riff_cut(path: str) -> tuple[int, int] | None:
    """(declared, present) data bytes when a RIFF/WAVE file's data chunk is cut short, else None."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, n = struct.unpack("<4sI", f.read(8))
            if cid == b"data":
                # 0 and 0xFFFFFFFF are "unknown length" markers written by streaming recorders
                if n in (0, 0xFFFFFFFF):
                    return None
                present = size - (pos + 8)
                return (n, present) if n > present else None
            pos += 8 + n + (n & 1)
    return None


def _fmt(seconds: float) -> str:
    return f"{seconds:.2f} s"


def load(path: str | os.PathLike, *, offset_s: float | None = None, duration_s: float | None = None,
         sample_rate: int = 16000, max_s: float = 30.0, long_audio: str = "truncate",
         min_s: float = 0.05, silence_dbfs: float = -70.0, overrun: str = "reject",
         overrun_tolerance_s: float = 0.05, long_audio_why: str = "") -> Clip:
    """Read ``path`` (or the segment ``offset_s``..``offset_s + duration_s``) as a checked mono clip.

    Raises :class:`AudioError` for: a missing or zero-byte file, an unreadable/corrupt/truncated file,
    an offset at or beyond the end, (with ``overrun="reject"``) a segment ending more than
    ``overrun_tolerance_s`` past the end, no audio or less than ``min_s`` seconds, non-finite samples,
    a peak below ``silence_dbfs``, or (with ``long_audio="reject"``) more than ``max_s`` seconds.
    ``long_audio_why`` is added to the ``too_long`` reason (which rule rejected the row).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise AudioError("missing_audio", f"audio file {p} not found; fix the path (relative paths are "
                                          f"read from the manifest's folder) or drop the row")
    if not os.path.isfile(p):
        raise AudioError("missing_audio", f"audio path {p} is not a file; point it at an audio file")
    if os.path.getsize(p) == 0:
        raise AudioError("empty_file", f"audio file {p} is empty (0 bytes); re-export or re-download it")
    try:
        f = sf.SoundFile(p)
    except Exception as e:  # libsndfile raises several types; any of them means "cannot read this"
        raise AudioError("unreadable_audio", f"cannot decode {p} ({_short(e)}); it is corrupt or not an "
                                             f"audio format libsndfile reads (WAV, FLAC, OGG, MP3): "
                                             f"re-export it") from None
    with f:
        sr_in, channels, frames, fmt = f.samplerate, f.channels, f.frames, f.format
        if sr_in <= 0 or channels <= 0:
            raise AudioError("unreadable_audio", f"{p}: header says {sr_in} Hz, {channels} channels; "
                                                 f"the file is corrupt: re-export it")
        cut = _riff_cut(p) if fmt in ("WAV", "WAVEX") else None
        if cut is not None:
            raise AudioError("truncated_audio", f"{p} is truncated: its header declares {cut[0]} bytes of "
                                                f"audio but only {cut[1]} are present; re-export or "
                                                f"re-download it")
        start = 0
        if offset_s:
            start = int(round(offset_s * sr_in))
            if start >= frames:
                raise AudioError("offset_beyond_end",
                                 f"offset_s={offset_s} is at or beyond the end of {p} "
                                 f"({_fmt(frames / sr_in)} long); fix the segment times")
        avail = frames - start
        want = avail
        overrun_s = 0.0
        if duration_s is not None:
            asked = int(round(duration_s * sr_in))
            want = min(avail, asked)
            missing = (asked - avail) / sr_in
            if missing > overrun_tolerance_s:
                if overrun != "truncate":
                    end = (offset_s or 0.0) + duration_s
                    raise AudioError("segment_overrun",
                                     f"segment offset_s={offset_s or 0} + duration_s={duration_s} ends at "
                                     f"{end:.2f} s, past the end of {p} ({_fmt(frames / sr_in)} long): "
                                     f"{_fmt(missing)} of the segment do not exist; fix the segment times "
                                     f"(or set shards.segment_overrun=truncate to keep the "
                                     f"{_fmt(avail / sr_in)} that exist)")
                overrun_s = missing
        max_in = int(math.floor(max_s * sr_in))
        truncated_s = 0.0
        if want > max_in:
            if long_audio == "reject":
                raise AudioError("too_long", f"{p}: {_fmt(want / sr_in)} of audio, longer than "
                                             f"shards.max_audio_s={max_s} s (the encoder window)"
                                             f"{long_audio_why}; cut it into segments with "
                                             f"offset_s/duration_s or set shards.long_audio=truncate")
            truncated_s = (want - max_in) / sr_in
            want = max_in
        try:
            if start:
                f.seek(start)
            data = f.read(frames=want, dtype="float32", always_2d=True) if want > 0 else \
                np.zeros((0, channels), np.float32)
        except Exception as e:
            raise AudioError("unreadable_audio", f"decoding {p} failed ({_short(e)}); the file is corrupt "
                                                 f"or truncated: re-export it") from None
    got = data.shape[0]
    slack = int(want * _MP3_SLACK) if fmt == "MP3" else 0
    if got + slack < want:
        raise AudioError("truncated_audio", f"{p}: decoded only {got} of the {want} frames its header "
                                            f"declares; the file is truncated or corrupt: re-export it")
    if got == 0:
        raise AudioError("empty_audio", f"{p} holds no audio samples; drop the row or fix the file")
    if not np.isfinite(data).all():
        raise AudioError("nonfinite_audio", f"{p} contains NaN or infinite samples; re-export it")
    mono = data.mean(axis=1, dtype=np.float32) if channels > 1 else data[:, 0]
    if sr_in != sample_rate:
        mono = soxr.resample(mono, sr_in, sample_rate, quality="HQ").astype(np.float32, copy=False)
    limit = int(math.floor(max_s * sample_rate))
    if len(mono) > limit:  # resampling can round one sample past the window
        mono = mono[:limit]
    clipped = int(np.count_nonzero(np.abs(mono) > 1.0))
    if clipped:
        mono = np.clip(mono, -1.0, 1.0)
    dur = len(mono) / sample_rate
    if dur < min_s:
        raise AudioError("too_short", f"{p}: {_fmt(dur)} of audio, shorter than shards.min_audio_s="
                                      f"{min_s} s; drop the row or fix the segment times")
    level = peak_dbfs(mono)
    if level < silence_dbfs:
        lv = "-inf" if math.isinf(level) else f"{level:.1f}"
        raise AudioError("silent_audio", f"{p} is silent (peak {lv} dBFS, below shards.silence_dbfs="
                                         f"{silence_dbfs}); check the recording or lower silence_dbfs")
    return Clip(mono, sample_rate, round(truncated_s, 6), sr_in, channels, fmt, round(overrun_s, 6), clipped)


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return msg[:200]


def encode_flac(samples: np.ndarray, sample_rate: int = 16000, compression: int = 5) -> bytes:
    """16-bit mono FLAC bytes. ``compression`` is FLAC's level 0..8 (smaller files, slower encoding)."""
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="FLAC", subtype="PCM_16",
             compression_level=max(0, min(8, compression)) / 8.0)
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """Decode FLAC bytes (a shard's ``audio.flac``) to float32 mono samples and their rate."""
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    if x.ndim > 1:
        x = x.mean(axis=1, dtype=np.float32)
    return x, sr

