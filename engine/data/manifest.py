"""Read a speech-translation manifest (JSONL, or TSV with a header row) into checked rows.

Every row either becomes a :class:`Row` or a :class:`Reject` that names the line, the problem and
the fix; one bad line never stops the rest. Only a manifest that cannot be read at all (missing,
empty, a TSV with a header and no rows, a TSV without the required columns) raises :class:`StageError`, because then there is
nothing sensible to build.

Fields: ``id``, ``audio`` (relative to the manifest's folder, or absolute; empty for a
text-only row), ``src_text``, ``tgt_text``, ``src_lang``, ``tgt_lang`` (ISO 639-1 codes from
:mod:`engine.langs`), optional ``split`` and optional ``offset_s``/``duration_s``. TSV cells are
taken literally (no quoting or escapes), so a TSV text cannot contain a tab or a newline; use JSONL
for such texts.

Keys: WebDataset splits a member name at its first ``.``, so ids outside ``[A-Za-z0-9_-]`` (or very
long, or ``__x__``-shaped ids that webdataset treats as metadata) get a stable safe key: the
sanitised id plus ``-`` plus 8 hex digits of ``sha1(id)``. The same id gives the same key on every
machine and every run, which keeps resumed builds and teacher caches joinable.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .. import langs
from ..errors import StageError

REQUIRED_TSV = ("id", "audio", "tgt_text", "src_lang", "tgt_lang")
KNOWN_FIELDS = ("id", "audio", "src_text", "tgt_text", "src_lang", "tgt_lang", "split", "offset_s",
                "duration_s", "corpus")
MAX_KEY = 80  # key + ".audio.flac" stays inside a 100-byte ustar name
_SAFE = re.compile(r"[A-Za-z0-9_-]+")
_SPLIT = re.compile(r"[A-Za-z0-9_]+")


def safe_key(sample_id: str) -> str:
    """A WebDataset-safe key for ``sample_id``: the id itself when it is safe, else a stable mapping."""
    if (_SAFE.fullmatch(sample_id) and len(sample_id) <= MAX_KEY
            and not (sample_id.startswith("__") and sample_id.endswith("__"))):
        return sample_id
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", sample_id).strip("_")[:MAX_KEY - 9] or "id"
    return f"{stem}-{hashlib.sha1(sample_id.encode('utf-8')).hexdigest()[:8]}"


@dataclass(frozen=True)
class Row:
    """One usable manifest row. ``audio`` is the resolved path ("" for a text-only row)."""
    line: int
    id: str
    key: str
    audio: str
    src_text: str
    tgt_text: str
    src_lang: str
    tgt_lang: str
    split: str
    offset_s: float | None = None
    duration_s: float | None = None
    corpus: str = ""  # optional per-row corpus name; shards.corpus (or the manifest name) otherwise


@dataclass(frozen=True)
class Reject:
    """A row that is not built: ``code`` groups reasons in summaries, ``reason`` says what to fix."""
    line: int
    id: str
    file: str
    code: str
    reason: str

    def to_json(self) -> dict:
        return {"line": self.line, "id": self.id, "file": self.file, "reason": self.reason, "code": self.code}


@dataclass
class Manifest:
    path: Path
    format: str                      # "jsonl" | "tsv"
    sha256: str                      # of the file's bytes: a changed manifest refuses a resume
    rows: list[Row] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    other_split: int = 0             # rows of another split than the one asked for (not read)
    unknown_fields: dict[str, int] = field(default_factory=dict)  # likely misspellings, with counts

    @property
    def read(self) -> int:
        return len(self.rows) + len(self.rejects)

    def splits(self) -> list[str]:
        """Split names in order of first appearance."""
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.setdefault(r.split, None)
        return list(seen)


def detect_format(path: Path, first_line: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    s = first_line.lstrip("\ufeff").lstrip()
    if s.startswith("{"):
        return "jsonl"
    if "\t" in s:
        return "tsv"
    raise StageError(f"manifest {path}: cannot tell its format (no .jsonl/.tsv suffix; the first line is "
                     f"neither a JSON object nor a tab-separated header); name it .jsonl or .tsv")


def _open_lines(path: Path) -> tuple[list[bytes], str]:
    if not path.exists():
        raise StageError(f"manifest {path} does not exist; pass an existing JSONL or TSV file with "
                         f"--manifest (or shards.manifest=...)")
    if not path.is_file():
        raise StageError(f"manifest {path} is not a file; pass the JSONL or TSV manifest, not a folder")
    data = path.read_bytes()
    return data.splitlines(), hashlib.sha256(data).hexdigest()


def _records(path: Path, lines: list[bytes], fmt: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record, problem) per non-blank line; with a problem, the record is None or holds
    only a best-effort id under the key ``"\\0id"``."""
    header: list[str] | None = None
    header_line = 0
    rows_seen = 0
    for no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        if header is not None:
            rows_seen += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if fmt == "tsv" and header is None:
                raise StageError(f"manifest {path}: the header (line {no}) is not UTF-8; save the file "
                                 f"as UTF-8") from None
            yield no, None, (f"is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                             f"re-save the manifest as UTF-8")
            continue
        if no == 1:
            text = text.lstrip("\ufeff")
        text = text.rstrip("\r")
        if fmt == "jsonl":
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield no, None, f"is not valid JSON ({e.msg} at column {e.colno}); fix the line"
                continue
            if not isinstance(obj, dict):
                yield no, None, "is not a JSON object; each line must be one object with id, audio, tgt_text, ..."
                continue
            yield no, obj, None
        else:
            cells = text.split("\t")
            if header is None:
                header = [c.strip() for c in cells]
                missing = [c for c in REQUIRED_TSV if c not in header]
                if missing:
                    raise StageError(
                        f"manifest {path}: no usable header on line {no} (missing column"
                        f"{'s' * (len(missing) > 1)} {', '.join(missing)}); the first line of a TSV "
                        f"manifest must name the columns: {', '.join(KNOWN_FIELDS)}")
                dup = sorted({c for c in header if header.count(c) > 1 and c})
                if dup:
                    raise StageError(f"manifest {path}: header names column(s) {', '.join(dup)} twice; "
                                     f"each column once")
                header_line = no
                continue
            if len(cells) != len(header):
                # keep the id (when the id column is there) so the reject can be found by id
                hint = cells[header.index("id")].strip() if header.index("id") < len(cells) else ""
                yield no, {"\0id": hint}, (f"has {len(cells)} tab-separated cells, the header has "
                                           f"{len(header)}; texts in a TSV cannot contain tabs (use JSONL "
                                           f"for such texts)")
                continue
            yield no, dict(zip(header, cells)), None
    if fmt == "tsv" and header is None:
        raise StageError(f"manifest {path} is empty; a TSV manifest needs a header row "
                         f"({', '.join(REQUIRED_TSV)}, ...) and one row per sample")
    if fmt == "tsv" and not rows_seen:
        raise StageError(f"manifest {path} is empty: it has a header (line {header_line}) but no rows; "
                         f"add one row per sample below the header")


def _number(rec: dict, name: str) -> tuple[float | None, str | None]:
    v = rec.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None, None
    if isinstance(v, bool):
        return None, f"{name} must be a number of seconds, got {v!r}"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None, f"{name} must be a number of seconds, got {v!r}"
    if not math.isfinite(x) or x < 0:
        return None, f"{name} must be a finite number of seconds >= 0, got {v!r}"
    return x, None


def _text(rec: dict, name: str) -> tuple[str, str | None]:
    v = rec.get(name, "")
    if v is None:
        return "", None
    if not isinstance(v, str):
        return "", f"{name} must be a string, got {type(v).__name__}"
    return v, None


def _unencodable(rec: dict) -> str | None:
    """The first field whose string cannot be written as UTF-8 (a JSON escape like "\\ud800")."""
    for k, v in rec.items():
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return str(k)
    return None


def read(path: str | Path, default_split: str = "train", only_split: str = "") -> Manifest:
    """Parse and check every line of the manifest at ``path``.

    ``default_split`` is given to rows without a ``split``; with ``only_split`` set, rows of other
    splits are counted in ``other_split`` and otherwise ignored. Ids are unique over the whole
    manifest (all splits): the first row with an id keeps it, later ones are rejected naming it.
    """
    p = Path(path)
    lines, digest = _open_lines(p)
    first = next((b for b in lines if b.strip()), None)
    if first is None:
        raise StageError(f"manifest {p} is empty; it needs one row per sample (JSONL objects or a TSV "
                         f"with a header)")
    fmt = detect_format(p, first.decode("utf-8", "replace"))
    base = p.parent
    man = Manifest(path=p, format=fmt, sha256=digest)
    first_line_of_id: dict[str, int] = {}
    id_of_key: dict[str, str] = {}

    for no, rec, problem in _records(p, lines, fmt):
        if problem is not None:
            hint = rec.get("\0id", "") if rec else ""
            man.rejects.append(Reject(no, hint, "", "bad_line", f"line {no} {problem}"))
            continue
        bad_text = _unencodable(rec)
        if bad_text:
            hint = rec.get("id") if bad_text != "id" and isinstance(rec.get("id"), (str, int)) else ""
            man.rejects.append(Reject(no, str(hint), "", "bad_line",
                                      f"line {no}: {bad_text!r} holds an unpaired UTF-16 surrogate escape "
                                      f"(\\udXXX) that is not valid text; fix the line"))
            continue
        for k in rec:
            if k not in KNOWN_FIELDS:
                man.unknown_fields[k] = man.unknown_fields.get(k, 0) + 1
        raw_id = rec.get("id")
        sid = "" if raw_id is None or isinstance(raw_id, (dict, list, bool)) else str(raw_id).strip()
        audio_raw = rec.get("audio")
        audio_field = audio_raw.strip() if isinstance(audio_raw, str) else ""
        audio = ""
        if audio_field:
            ap = Path(audio_field)
            audio = str(ap if ap.is_absolute() else base / ap)

        def reject(code: str, reason: str) -> None:
            man.rejects.append(Reject(no, sid, audio, code, reason))

        split = rec.get("split")
        split = split.strip() if isinstance(split, str) else ("" if split is None else str(split))
        split = split or default_split
        if only_split and split != only_split:
            man.other_split += 1
            if sid and sid not in first_line_of_id:
                first_line_of_id[sid] = no
            continue
        if not sid:
            reject("missing_id", "no id; give every row a unique non-empty id")
            continue
        if sid in first_line_of_id:
            reject("duplicate_id", f"id {sid!r} is already used on line {first_line_of_id[sid]} (that row is "
                                   f"kept); give this row its own id")
            continue
        first_line_of_id[sid] = no
        key = safe_key(sid)
        if id_of_key.get(key, sid) != sid:
            reject("key_collision", f"id {sid!r} maps to key {key!r}, already taken by id "
                                    f"{id_of_key[key]!r}; rename one of them")
            continue
        if "audio" not in rec:
            reject("bad_field", "no 'audio' field; give the audio path (relative to the manifest's folder "
                                "or absolute), or \"\" for a text-only row")
            continue
        if audio_raw is not None and not isinstance(audio_raw, str):
            reject("bad_field", f"audio must be a path string, got {type(audio_raw).__name__}")
            continue
        src_text, e1 = _text(rec, "src_text")
        tgt_text, e2 = _text(rec, "tgt_text")
        if e1 or e2:
            reject("bad_field", f"{e1 or e2}; fix the row")
            continue
        if not tgt_text.strip():
            reject("missing_tgt_text", "tgt_text is missing or empty; every row needs its reference "
                                       "translation (drop the row or add the text)")
            continue
        bad_lang = None
        for name in ("src_lang", "tgt_lang"):
            code = rec.get(name)
            code = code.strip() if isinstance(code, str) else ""
            if not code:
                bad_lang = ("missing_lang", f"{name} is missing; give an ISO 639-1 code such as 'en' or 'de'")
                break
            try:
                langs.get(code)
            except langs.UnknownLanguage as e:
                bad_lang = ("unknown_lang", f"{name}: {e}")
                break
        if bad_lang:
            reject(*bad_lang)
            continue
        if not _SPLIT.fullmatch(split):
            reject("bad_split", f"split {split!r} is not a usable name (it names the shard files); use "
                                f"letters, digits and '_' only, e.g. train, dev, test")
            continue
        offset_s, e3 = _number(rec, "offset_s")
        duration_s, e4 = _number(rec, "duration_s")
        if e3 or e4:
            reject("bad_segment", f"{e3 or e4}; fix the segment times")
            continue
        if duration_s is not None and duration_s <= 0:
            reject("bad_segment", f"duration_s is {duration_s}; a segment needs a positive duration")
            continue
        if (offset_s is not None or duration_s is not None) and not audio:
            reject("bad_segment", "offset_s/duration_s given but no audio; give the audio file the segment "
                                  "is cut from")
            continue
        id_of_key[key] = sid
        man.rows.append(Row(
            line=no, id=sid, key=key, audio=audio, src_text=src_text.strip(), tgt_text=tgt_text.strip(),
            src_lang=rec["src_lang"].strip(), tgt_lang=rec["tgt_lang"].strip(), split=split,
            offset_s=offset_s, duration_s=duration_s,
            corpus=rec["corpus"].strip() if isinstance(rec.get("corpus"), str) else "",
        ))
    return man

