"""Importers: the layouts real corpora ship in -> the engine's manifest (JSONL; fields in engine.data.manifest).

``stc import mustc``  MuST-C (and corpora distributed like it: ACL 60/60, IWSLT test sets):
    ``<root>/<split>/txt/<split>.yaml`` lists segments of long talks ({wav, offset, duration, ...}),
    ``<root>/<split>/txt/<split>.<src>`` and ``.<tgt>`` hold one text per segment in the same order,
    the talks are in ``<root>/<split>/wav/``. ``root`` may also be the release's ``data/`` parent or
    the ``<split>`` folder itself. A row is a segment (``offset_s``/``duration_s``), cut by seeking
    when the shards are built, so the long WAVs are never copied. Ids are ``<wav stem>_<n>``, n
    counting the segments of that WAV from 0 (the ids fairseq's MuST-C recipe uses), so they are
    stable across runs and machines.
``stc import covost`` CoVoST 2: ``covost_v2.<src>_<tgt>.<split>.tsv`` (path, sentence, translation,
    client_id; no quoting: the texts contain quotes) with the clips in a Common Voice ``clips/``
    folder. Ids are the clip's file stem.

Both write audio paths relative to the manifest's folder, write the manifest atomically, and never
drop a row silently: a row that cannot be used (empty translation, a segment without a duration, a
missing audio file with ``check=True``) goes to ``<manifest stem>.rejects.jsonl`` next to the
manifest with a reason, and the summary says read = written + rejected. A folder of another layout
is refused with the paths that were expected and the importer that fits what was found.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import io, langs
from ..errors import StageError
from . import manifest as _manifest

MUSTC_CORPUS = "must-c"
COVOST_CORPUS = "covost2"
COVOST_COLUMNS = ("path", "sentence", "translation")  # client_id is there too but not needed
_COVOST_NAME = re.compile(r"covost_v2\.([A-Za-z]{2,3}(?:-[A-Za-z]+)?)_([A-Za-z]{2,3}(?:-[A-Za-z]+)?)"
                          r"(?:\.([A-Za-z0-9_-]+))?\.tsv")


@dataclass
class ImportSummary:
    manifest: Path
    rejects_file: Path
    read: int = 0
    written: int = 0
    rejects: list[_manifest.Reject] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejects)

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rejects:
            out[r.code] = out.get(r.code, 0) + 1
        return out

    def lines(self) -> list[str]:
        """The summary as printed by the CLI."""
        out = [f"rows read {self.read}, written {self.written}, rejected {self.rejected} -> {self.manifest}"]
        if self.rejects:
            reasons = ", ".join(f"{k} {v}" for k, v in self.by_reason().items())
            out.append(f"rejected by reason: {reasons}; details: {self.rejects_file}")
        out += [f"note: {n}" for n in self.notes]
        return out


def rejects_path(manifest_path: str | os.PathLike) -> Path:
    """``<dir>/<stem>.rejects.jsonl`` next to the manifest."""
    p = Path(manifest_path)
    return p.with_name(f"{p.stem}.rejects.jsonl")


# ------------------------------------------------------------------------------------------ shared

def _lang(code: str, what: str) -> str:
    """An ISO 639-1 code from the table; a region-tagged code (CoVoST's zh-CN, sv-SE) maps to its language."""
    code = code.strip()
    base = code.split("-")[0].lower()
    if base != code and base in langs.known():
        return base
    try:
        return langs.get(code).code
    except langs.UnknownLanguage as e:
        raise StageError(f"{what}: {e}") from None


def _split_name(name: str, what: str) -> str:
    if not _manifest._SPLIT.fullmatch(name):
        raise StageError(f"{what} {name!r} is not a usable split name (it names the shard files); use "
                         f"letters, digits and '_' only, e.g. train, dev, test")
    return name


def _default_split(corpus_split: str) -> str:
    """MuST-C's ``tst-COMMON`` -> ``tst_COMMON``: the corpus name, made a usable split name."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", corpus_split).strip("_") or "test"


def _rel(audio: Path, base: Path) -> str:
    """``audio`` relative to the manifest's folder when possible, else absolute."""
    a = os.path.abspath(audio)
    try:
        return os.path.relpath(a, os.path.abspath(base))
    except ValueError:  # another drive (Windows): no relative path exists
        return a


def _text_lines(path: Path) -> list[str]:
    """One text per line. Splits on "\\n" only: str.splitlines would also split on U+2028, U+0085,
    ..., which do occur inside subtitle texts and would shift every later line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise StageError(f"{path} is not UTF-8 (line {line}); re-save it as UTF-8") from None
    text = text.lstrip("\ufeff")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(obj: dict) -> str:
    """One JSONL line, readable by ``str.splitlines`` too: json.dumps escapes control characters but
    leaves U+0085/U+2028/U+2029 raw, and those split a line for many readers (subtitles contain them)."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


def _write(summary: ImportSummary, rows: list[dict], check: bool, dry_run: bool = False) -> ImportSummary:
    if dry_run:   # everything read and checked; nothing written
        summary.written = len(rows)
        summary.notes.append(f"dry run: {summary.manifest} and {summary.rejects_file} not written")
        return summary
    if not rows:
        _write_rejects(summary)
        raise StageError(f"no rows to write to {summary.manifest}: all {summary.read} rows were rejected "
                         f"({', '.join(f'{k} {v}' for k, v in summary.by_reason().items())}); details: "
                         f"{summary.rejects_file}")
    with io.atomic_open(summary.manifest, "w") as f:
        for r in rows:
            f.write(_json_line(r))
    summary.written = len(rows)
    _write_rejects(summary)
    if not check:
        summary.notes.append("audio files were not checked; pass --check to verify that every one exists")
    assert summary.read == summary.written + summary.rejected
    return summary


def _write_rejects(summary: ImportSummary) -> None:
    if summary.rejects:
        io.atomic_write_text(summary.rejects_file, "".join(
            _json_line(r.to_json()) for r in summary.rejects))
    elif summary.rejects_file.exists():  # a stale list from an earlier import would mislead
        summary.rejects_file.unlink()


def _layout_hint(folder: Path) -> str:
    """What ``folder`` looks like and which importer fits it (for error messages)."""
    if not folder.exists():
        return f"{folder} does not exist"
    if folder.is_file():
        if _COVOST_NAME.fullmatch(folder.name):
            return (f"{folder} is a CoVoST 2 TSV: use `stc import covost --tsv {folder} --clips "
                    f"<Common Voice clips/ folder>`")
        return f"{folder} is a file, not a folder"
    entries = sorted(folder.iterdir())
    if not entries:
        return f"{folder} is empty"
    covost = [p for p in entries if _COVOST_NAME.fullmatch(p.name)]
    if covost:
        names = ", ".join(p.name for p in covost[:4]) + (", ..." if len(covost) > 4 else "")
        clips = next((c for c in (folder / "clips", *folder.glob("*/clips")) if c.is_dir()), None)
        return (f"{folder} holds CoVoST 2 TSVs ({names}): use `stc import covost --tsv {covost[0]} --clips "
                f"{clips or '<Common Voice clips/ folder>'}`")
    splits = _mustc_splits(folder)
    if splits:
        where, names = splits
        under = "" if where == folder else f" under {where}"
        return (f"{folder} holds MuST-C-style splits ({', '.join(names)}){under}: use `stc import "
                f"mustc {folder} --split {names[0]} --src <lang> --tgt <lang>`")
    if (folder / "clips").is_dir():
        return (f"{folder} looks like a Common Voice release (clips/ and TSVs without translations): "
                f"CoVoST 2 adds covost_v2.<src>_<tgt>.<split>.tsv files with the translations; import "
                f"one with `stc import covost --tsv <that file> --clips {folder / 'clips'}`")
    if any(p.suffix in (".jsonl", ".tsv") for p in entries):
        manifests = [p.name for p in entries if p.suffix in (".jsonl", ".tsv")][:4]
        return (f"{folder} holds {', '.join(manifests)}, but no corpus layout an importer knows; if one is "
                f"already an engine manifest, build shards from it with `stc shards build --manifest ...`")
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:6])
    return f"{folder} holds {shown}{', ...' if len(entries) > 6 else ''}, which is no layout an importer knows"


# ------------------------------------------------------------------------------------------ MuST-C

def _mustc_splits(folder: Path) -> tuple[Path, list[str]] | None:
    """(where, split names) of MuST-C-style splits at ``folder``, ``folder/data`` or ``folder`` itself."""
    for where in (folder, folder / "data"):
        if where.is_dir():
            names = sorted(d.name for d in where.iterdir() if (d / "txt" / f"{d.name}.yaml").is_file())
            if names:
                return where, names
    if (folder / "txt").is_dir():
        names = sorted(p.stem for p in (folder / "txt").glob("*.yaml"))
        if names:
            return folder, names
    return None


def mustc_split_dir(root: str | os.PathLike, split: str) -> Path:
    """The folder holding ``txt/<split>.yaml`` for ``split``: ``root/split``, ``root/data/split`` or
    ``root`` itself. Refuses, naming the paths tried and what ``root`` holds instead."""
    r = Path(root)
    candidates = [r / split, r / "data" / split, r]
    for d in candidates:
        if (d / "txt" / f"{split}.yaml").is_file():
            return d
    tried = ", ".join(str(d / "txt" / f"{split}.yaml") for d in candidates)
    raise StageError(f"MuST-C split {split!r} not found: expected {tried} (a YAML list of segments next to "
                     f"{split}.<src> and {split}.<tgt> text files, WAVs in <split>/wav/); "
                     f"{_layout_hint(r)}")


# MuST-C writes one flow mapping per line: ``- {duration: 3.5, offset: 16.73, speaker_id: spk.1, wav: ted_1.wav}``
_FLOW_LINE = re.compile(r"-[ \t]+\{([^{}\[\]'\"#&*!|>%@`]*)\}[ \t]*")
_FLOW_PAIR = re.compile(r"[ \t]*([A-Za-z_][A-Za-z0-9_]*):[ \t]+([^,:]*?)[ \t]*")
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _flow_lines(text: str) -> list | None:
    """The segments of a YAML written one plain flow mapping per line, or None for anything else.

    Even libyaml's C loader needs about a minute for MuST-C train's ~250k lines; this reads them in
    about a second. Values are what YAML gives for such plain scalars here: numbers for the
    number-shaped, strings for the rest. Any line outside this shape sends the file to the YAML loader.
    """
    out = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        m = _FLOW_LINE.fullmatch(line)
        if m is None:
            return None
        seg = {}
        for cell in m.group(1).split(","):
            p = _FLOW_PAIR.fullmatch(cell)
            if p is None:
                return None
            k, v = p.groups()
            seg[k] = float(v) if _FLOAT.fullmatch(v) else v
        out.append(seg)
    return out


def _load_yaml(path: Path) -> list:
    import yaml

    try:
        fast = _flow_lines(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        fast = None  # the YAML loader names the problem
    if fast:
        return fast
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, "rb") as f:
            data = yaml.load(f, Loader=loader)
    except yaml.YAMLError as e:
        raise StageError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); re-extract the corpus") from None
    if data is None:
        raise StageError(f"{path} lists no segments; it should be a YAML list of {{wav, offset, duration}}")
    if not isinstance(data, list):
        raise StageError(f"{path} is not a YAML list of segments (found a {type(data).__name__}); each "
                         f"entry should be {{duration: .., offset: .., speaker_id: .., wav: ted_1.wav}}")
    return data


def _seconds(seg: dict, name: str) -> float | None:
    v = seg.get(name)
    if isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x and x not in (float("inf"), float("-inf")) else None


def import_mustc(root: str | os.PathLike, split: str, src: str, tgt: str, out: str | os.PathLike, *,
                 as_split: str | None = None, corpus: str = MUSTC_CORPUS, check: bool = False,
                 dry_run: bool = False) -> ImportSummary:
    """Write the manifest ``out`` for one MuST-C-style split; see the module docstring for the layout.

    ``as_split`` is the manifest's split name (default: ``split`` made a usable name, tst-COMMON ->
    tst_COMMON). With ``check``, rows whose WAV does not exist are rejected instead of written.
    """
    src, tgt = _lang(src, "--src"), _lang(tgt, "--tgt")
    name = _split_name(as_split or _default_split(split), "--as-split")
    d = mustc_split_dir(root, split)
    yaml_path = d / "txt" / f"{split}.yaml"
    text_paths = {lang: d / "txt" / f"{split}.{lang}" for lang in (src, tgt)}
    for lang, p in text_paths.items():
        if not p.is_file():
            have = sorted(q.name for q in (d / "txt").iterdir() if q.name.startswith(f"{split}."))
            raise StageError(f"MuST-C split {split!r}: {p} not found (the {lang} texts); {d / 'txt'} holds "
                             f"{', '.join(have)}: check --src/--tgt")
    segments = _load_yaml(yaml_path)
    texts = {lang: _text_lines(p) for lang, p in text_paths.items()}
    counts = {str(yaml_path): len(segments), **{str(text_paths[k]): len(v) for k, v in texts.items()}}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{p} has {n}" for p, n in counts.items())
        raise StageError(f"MuST-C split {split!r}: segments and text lines do not line up ({detail}; "
                         f"segments in the YAML, lines in the text files); each segment needs one line "
                         f"in each text file, in the same order: re-extract the corpus")

    out_p = Path(out)
    base = out_p.parent
    wav_dir = d / "wav"
    summary = ImportSummary(manifest=out_p, rejects_file=rejects_path(out_p), read=len(segments))
    if check and not wav_dir.is_dir():
        summary.notes.append(f"{wav_dir} does not exist: every row is rejected as missing_audio")
    exists: dict[str, bool] = {}
    per_wav: dict[str, int] = {}
    rows: list[dict] = []
    for i, seg in enumerate(segments):
        no = i + 1  # the segment's line in the text files
        where = f"segment {no} of {yaml_path.name} (line {no} of the text files)"
        wav = seg.get("wav") if isinstance(seg, dict) else None
        if not isinstance(wav, str) or not wav.strip():
            summary.rejects.append(_manifest.Reject(no, "", "", "bad_segment",
                                                    f"{where} names no wav; fix the YAML entry"))
            continue
        wav = wav.strip()
        stem = Path(wav).stem
        n = per_wav.get(stem, 0)
        per_wav[stem] = n + 1  # counted before any reject, so ids do not shift when a row is rejected
        sid = f"{stem}_{n}"
        audio = wav_dir / wav
        offset, duration = _seconds(seg, "offset"), _seconds(seg, "duration")
        if offset is None or duration is None or offset < 0 or duration <= 0:
            summary.rejects.append(_manifest.Reject(
                no, sid, str(audio), "bad_segment",
                f"{where}: offset {seg.get('offset')!r}, duration {seg.get('duration')!r}; a segment needs "
                f"an offset >= 0 and a duration > 0 (seconds)"))
            continue
        src_text, tgt_text = texts[src][i].strip(), texts[tgt][i].strip()
        if not tgt_text:
            summary.rejects.append(_manifest.Reject(
                no, sid, str(audio), "missing_tgt_text",
                f"{where}: line {no} of {text_paths[tgt].name} is empty; the row has no reference translation"))
            continue
        if check:
            if wav not in exists:
                exists[wav] = audio.is_file()
            if not exists[wav]:
                summary.rejects.append(_manifest.Reject(
                    no, sid, str(audio), "missing_audio",
                    f"{where}: audio file {audio} not found; restore it or re-download the corpus"))
                continue
        rows.append({"id": sid, "audio": _rel(audio, base), "offset_s": round(offset, 6),
                     "duration_s": round(duration, 6), "src_text": src_text, "tgt_text": tgt_text,
                     "src_lang": src, "tgt_lang": tgt, "split": name, "corpus": corpus})
    return _write(summary, rows, check, dry_run)


# ------------------------------------------------------------------------------------------ CoVoST 2

def covost_langs(tsv: str | os.PathLike) -> tuple[str, str, str] | None:
    """(src, tgt, split) from ``covost_v2.<src>_<tgt>.<split>.tsv`` (split "" when absent), else None."""
    m = _COVOST_NAME.fullmatch(Path(tsv).name)
    return (m.group(1), m.group(2), m.group(3) or "") if m else None


def _covost_tsv(tsv: Path) -> None:
    if tsv.is_file():
        return
    expected = "a CoVoST 2 TSV named covost_v2.<src>_<tgt>.<split>.tsv (columns path, sentence, translation, client_id)"
    if not tsv.exists():
        raise StageError(f"--tsv {tsv} does not exist; expected {expected}; {_layout_hint(tsv.parent)}")
    raise StageError(f"--tsv {tsv} is a folder; expected {expected}; {_layout_hint(tsv)}")


def _covost_clips(clips: Path, first_path: str | None) -> Path:
    """The clips folder; a Common Voice root (holding ``clips/``) is accepted too."""
    if not clips.is_dir():
        raise StageError(f"--clips {clips} is not a folder; expected the Common Voice clips/ folder that "
                         f"holds the TSV's path column files (e.g. {first_path or 'common_voice_en_1.mp3'})")
    if first_path and not (clips / first_path).exists() and (clips / "clips" / first_path).exists():
        return clips / "clips"
    return clips


def import_covost(tsv: str | os.PathLike, clips: str | os.PathLike, out: str | os.PathLike, *,
                  src: str | None = None, tgt: str | None = None, split_name: str | None = None,
                  corpus: str = COVOST_CORPUS, check: bool = False, dry_run: bool = False) -> ImportSummary:
    """Write the manifest ``out`` from one CoVoST 2 TSV; see the module docstring for the layout.

    Languages come from the file name unless ``src``/``tgt`` are given; the split from
    ``split_name``, else the file name, else a ``split`` column (the unsplit release has one).
    """
    tsv_p, clips_p = Path(tsv), Path(clips)
    _covost_tsv(tsv_p)
    parsed = covost_langs(tsv_p)
    if (src is None or tgt is None) and parsed is None:
        raise StageError(f"cannot tell the languages from the file name {tsv_p.name} (expected "
                         f"covost_v2.<src>_<tgt>.<split>.tsv); pass --src and --tgt")
    src = _lang(src or parsed[0], "--src")
    tgt = _lang(tgt or parsed[1], "--tgt")
    split = split_name or (parsed[2] if parsed else "")
    if split:
        split = _split_name(split, "--split-name" if split_name else f"the split in {tsv_p.name}")

    lines = _text_lines(tsv_p)
    if not lines or not lines[0].strip():
        raise StageError(f"{tsv_p} is empty; a CoVoST 2 TSV starts with the header path, sentence, "
                         f"translation, client_id")
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [c.strip() for c in next(reader)]
    missing = [c for c in COVOST_COLUMNS if c not in header]
    if missing:
        hint = ""
        if "id" in header and "tgt_text" in header:
            hint = "; it is an engine manifest already: build shards from it with `stc shards build --manifest`"
        elif "path" in header and "sentence" in header:
            hint = ("; it looks like a Common Voice TSV (no translations): use the matching "
                    "covost_v2.<src>_<tgt>.<split>.tsv from CoVoST 2")
        raise StageError(f"{tsv_p}: header {header[:6]} lacks column(s) {', '.join(missing)}; a CoVoST 2 "
                         f"TSV has path, sentence, translation, client_id{hint}")
    col = {c: header.index(c) for c in (*COVOST_COLUMNS, "split") if c in header}
    rows_in = list(reader)
    first = next((r[col["path"]] for r in rows_in if len(r) == len(header) and r[col["path"]].strip()), None)
    clip_dir = _covost_clips(clips_p, first)

    out_p = Path(out)
    base = out_p.parent
    summary = ImportSummary(manifest=out_p, rejects_file=rejects_path(out_p), read=len(rows_in))
    seen: dict[str, int] = {}
    rows: list[dict] = []
    for no, cells in enumerate(rows_in, 2):
        def reject(sid: str, audio: str, code: str, reason: str) -> None:
            summary.rejects.append(_manifest.Reject(no, sid, audio, code, f"{tsv_p.name} line {no}: {reason}"))

        if len(cells) != len(header):
            reject(cells[col["path"]].strip() if len(cells) > col["path"] else "", "", "bad_line",
                   f"has {len(cells)} tab-separated cells, the header has {len(header)}")
            continue
        path = cells[col["path"]].strip()
        if not path:
            reject("", "", "bad_line", "the path cell is empty")
            continue
        sid = Path(path).stem
        audio = clip_dir / path
        if sid in seen:
            reject(sid, str(audio), "duplicate_id", f"clip {path} is already listed on line {seen[sid]} (that "
                                                    f"row is kept)")
            continue
        seen[sid] = no
        tgt_text = cells[col["translation"]].strip()
        if not tgt_text:
            reject(sid, str(audio), "missing_tgt_text", "the translation is empty")
            continue
        row_split = split
        if not row_split and "split" in col:
            row_split = cells[col["split"]].strip()
            if row_split and not _manifest._SPLIT.fullmatch(row_split):
                reject(sid, str(audio), "bad_split", f"split {row_split!r} is not a usable name; pass "
                                                     f"--split-name")
                continue
        if check and not audio.is_file():
            reject(sid, str(audio), "missing_audio", f"audio file {audio} not found; restore the clip or use "
                                                     f"the Common Voice release the TSV was made for")
            continue
        r = {"id": sid, "audio": _rel(audio, base), "src_text": cells[col["sentence"]].strip(),
             "tgt_text": tgt_text, "src_lang": src, "tgt_lang": tgt}
        if row_split:
            r["split"] = row_split
        r["corpus"] = corpus
        rows.append(r)
    return _write(summary, rows, check, dry_run)


# ------------------------------------------------------------------------------------------ stc entries

def _print(summary: ImportSummary, dry_run: bool = False) -> None:
    """The summary: on stderr after an import, on stdout for a dry run (what the import would write)."""
    import sys

    for line in summary.lines():
        print(f"stc import{' (dry run)' if dry_run else ''}: {line}", file=sys.stdout if dry_run else sys.stderr)


def mustc_main(recipe: object, args: object) -> int:
    """``stc import mustc ROOT --split S --src en --tgt de --out M``."""
    a: Any = args
    _print(import_mustc(a.root, a.split, a.src, a.tgt, a.out, as_split=a.as_split, corpus=a.corpus or MUSTC_CORPUS,
                        check=a.check, dry_run=a.dry_run), a.dry_run)
    return 0


def covost_main(recipe: object, args: object) -> int:
    """``stc import covost --tsv T --clips DIR --out M``."""
    a: Any = args
    _print(import_covost(a.tsv, a.clips, a.out, src=a.src, tgt=a.tgt, split_name=a.split_name,
                         corpus=a.corpus or COVOST_CORPUS, check=a.check, dry_run=a.dry_run), a.dry_run)
    return 0
