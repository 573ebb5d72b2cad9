"""A small, safe reader for WebDataset tar shards: index by headers, then read members by offset.

Why not ``tarfile``: it reads happily past a truncated archive in some modes, follows no policy on
links or ``..`` names, and cannot tell the stream where a member's bytes are so that a resumed
epoch can jump to sample N without decoding samples 0..N-1. This module scans only the 512-byte
headers (member data is skipped with ``seek``), so indexing a 1 GB shard costs a few reads per
sample. It refuses anything that is not a plain file (links, devices, FIFOs, sparse files),
absolute names and names with ``..`` components, and it raises :class:`TarError` naming the shard
for a truncated or corrupt archive, so a broken shard is reported instead of silently ending early.

WebDataset key rule (as ``webdataset.tariterators.base_plus_ext``): the key is the member name up
to the first ``.`` of its last path component (a directory prefix stays part of the key) and the
extension is the rest, lower-cased. Consecutive members with the same key form one sample.
Directories, ``__meta__``-style members and names without an extension are skipped, as webdataset
skips them; a key that comes back after another key, or an extension repeated within one sample,
is an error (webdataset would yield a second sample with the same key, which breaks joins by key).
"""
from __future__ import annotations

import os
import re
from typing import Iterator, NamedTuple

from ..errors import StcError

BLOCK = 512

# type flags (POSIX ustar, pax, GNU)
_REGULAR = (b"0", b"\0", b"7")       # '7' is "contiguous file": a regular file in practice
_DIRECTORY = b"5"
_PAX_LOCAL = b"x"
_PAX_GLOBAL = b"g"
_GNU_LONGNAME = b"L"
_REFUSED = {
    b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
    b"6": "a FIFO", b"K": "a GNU long link name", b"S": "a GNU sparse file", b"V": "a GNU volume header",
    b"M": "a GNU multi-volume continuation",
}
_META_RE = re.compile(r"(^|/)__[^/]*__($|/)")
# a member longer than this is surely a corrupt size field rather than one audio clip
_MAX_MEMBER = 1 << 36


class TarError(StcError, ValueError):
    """A shard that cannot be read safely; the message names the shard and what is wrong."""


class Sample(NamedTuple):
    """One indexed sample: its key and, per extension, (offset of the data in the file, size)."""
    key: str
    members: dict[str, tuple[int, int]]


def split_name(name: str) -> tuple[str, str] | None:
    """``"dir/abc.audio.flac"`` -> ``("dir/abc", "audio.flac")``; None when there is no extension."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def _octal(field: bytes, what: str, shard: str, at: int) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large values
        v = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:
            raise TarError(f"{shard}: negative {what} in the header at byte {at}: the tar is corrupt")
        return v
    s = field.split(b"\0", 1)[0].strip(b" \0")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise TarError(f"{shard}: unreadable {what} {s[:16]!r} in the header at byte {at}: "
                       f"the tar is corrupt (rebuild the shard)") from None


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156].split(b"\0", 1)[0].strip(b" \0")
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = sum((b - 256 if b > 127 else b) for b in block[:148]) + 8 * 32 + \
        sum((b - 256 if b > 127 else b) for b in block[156:])
    return want in (unsigned, signed)


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _parse_pax(data: bytes, shard: str, at: int) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] == b"\0":
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise TarError(f"{shard}: malformed pax header at byte {at}: the tar is corrupt")
        try:
            n = int(data[pos:sp])
        except ValueError:
            raise TarError(f"{shard}: malformed pax record length at byte {at}: the tar is corrupt") from None
        rec = data[sp + 1:pos + n]
        if n <= 0 or pos + n > len(data) or not rec.endswith(b"\n") or b"=" not in rec:
            raise TarError(f"{shard}: malformed pax record at byte {at}: the tar is corrupt")
        k, v = rec[:-1].split(b"=", 1)
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        pos += n
    return out


def _check_name(name: str, shard: str) -> None:
    if not name:
        raise TarError(f"{shard}: a member has an empty name; refusing the shard")
    if "\0" in name:
        raise TarError(f"{shard}: member name {name!r} contains a NUL byte; refusing the shard")
    if name.startswith("/") or name.startswith("\\") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise TarError(f"{shard}: member {name!r} has an absolute path; refusing the shard "
                       f"(shard members must be relative names such as key.audio.flac)")
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        raise TarError(f"{shard}: member {name!r} has a '..' component; refusing the shard "
                       f"(it could point outside the dataset)")


def _members(path: str) -> Iterator[tuple[str, int, int]]:
    """Yield (name, data offset, size) for each regular-file member, checking every header."""
    shard = os.fspath(path)
    try:
        f = open(shard, "rb")
    except OSError as e:
        raise TarError(f"{shard}: cannot open the shard ({e.strerror})") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        pos = 0
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            f.seek(pos)
            block = f.read(BLOCK)
            if len(block) < BLOCK:
                raise TarError(
                    f"{shard}: truncated tar (ends at byte {file_size} inside a header or before the "
                    f"end-of-archive marker); the shard is incomplete: rebuild it")
            if block == b"\0" * BLOCK:
                return  # end of archive: one zero block is enough (GNU tar accepts it too)
            if not _checksum_ok(block):
                raise TarError(f"{shard}: bad header checksum at byte {pos}: the tar is corrupt or "
                               f"not a tar file (rebuild the shard)")
            size = _octal(block[124:136], "size", shard, pos)
            if size > _MAX_MEMBER:
                raise TarError(f"{shard}: implausible member size {size} at byte {pos}: the tar is corrupt")
            typeflag = block[156:157]
            data_at = pos + BLOCK
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise TarError(f"{shard}: bad pax size at byte {pos}: the tar is corrupt") from None
            end = data_at + size
            if end > file_size:
                raise TarError(
                    f"{shard}: truncated tar: a member at byte {pos} needs {size} bytes of data but the "
                    f"file ends at byte {file_size}; the shard is incomplete: rebuild it")
            padded = data_at + (size + BLOCK - 1) // BLOCK * BLOCK
            if typeflag in (_PAX_LOCAL, _PAX_GLOBAL, _GNU_LONGNAME):
                f.seek(data_at)
                meta = f.read(size)
                if typeflag == _PAX_LOCAL:
                    pax = _parse_pax(meta, shard, pos)
                elif typeflag == _GNU_LONGNAME:
                    long_name = _cstr(meta).decode("utf-8", "surrogateescape")
                # global pax headers carry defaults we do not need (times, owners)
                pos = padded
                continue
            if typeflag in _REFUSED:
                raise TarError(f"{shard}: member at byte {pos} is {_REFUSED[typeflag]}; refusing the "
                               f"shard (only regular files are allowed in a shard)")
            if typeflag not in _REGULAR and typeflag != _DIRECTORY:
                raise TarError(f"{shard}: member at byte {pos} has unsupported type {typeflag!r}; "
                               f"refusing the shard")
            if "path" in pax:
                name = pax["path"]
            elif long_name is not None:
                name = long_name
            else:
                raw = _cstr(block[0:100])
                magic = block[257:263]
                prefix = _cstr(block[345:500]) if magic.startswith(b"ustar") else b""
                raw = prefix + b"/" + raw if prefix else raw
                name = raw.decode("utf-8", "surrogateescape")
            pax, long_name = {}, None
            _check_name(name, shard)
            if typeflag != _DIRECTORY:
                yield name, data_at, size
            pos = padded


def index_tar(path: str | os.PathLike) -> list[Sample]:
    """Index a shard by its headers: samples in file order, each ``Sample(key, {ext: (offset, size)})``.

    Raises :class:`TarError` (naming the shard) for truncated/corrupt tars, unsafe member names,
    links or devices, an extension repeated within a sample, or a key that reappears later.
    """
    shard = os.fspath(path)
    samples: list[Sample] = []
    seen: set[str] = set()
    for name, off, size in _members(shard):
        if _META_RE.search(name):
            continue
        kv = split_name(name)
        if kv is None:
            continue
        key, ext = kv
        if samples and samples[-1].key == key:
            if ext in samples[-1].members:
                raise TarError(f"{shard}: sample {key!r} has two {ext!r} members; the shard is corrupt")
            samples[-1].members[ext] = (off, size)
            continue
        if key in seen:
            raise TarError(f"{shard}: key {key!r} appears twice (not consecutively); keys must be unique "
                           f"within a shard")
        seen.add(key)
        samples.append(Sample(key, {ext: (off, size)}))
    return samples


def read_member(path: str | os.PathLike, offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` (as returned by :func:`index_tar`)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise TarError(f"{os.fspath(path)}: member at byte {offset} wants {size} bytes, the file has "
                       f"{len(data)} there: the shard is truncated (rebuild it)")
    return data


def iter_samples(path: str | os.PathLike, start: int = 0) -> Iterator[dict]:
    """Yield ``{"__key__": key, ext: bytes, ...}`` per sample, in file order, from sample ``start``.

    The whole shard is indexed first, so a truncated or unsafe shard raises before any sample is
    yielded (a consumer never trains on the first half of a broken shard without knowing).
    """
    shard = os.fspath(path)
    index = index_tar(shard)
    with open(shard, "rb") as f:
        for s in index[start:]:
            out: dict = {"__key__": s.key}
            for ext, (off, size) in s.members.items():
                f.seek(off)
                data = f.read(size)
                if len(data) != size:
                    raise TarError(f"{shard}: member {s.key}.{ext} is cut short: the shard changed while "
                                   f"being read or is truncated")
                out[ext] = data
            yield out
