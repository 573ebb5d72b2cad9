"""Manifest parsing and key mapping, without audio: the rules rows are accepted or rejected by."""
from __future__ import annotations

import json
import re

import pytest

from engine.errors import StageError
from engine.data import manifest


def _jsonl(path, *rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def _row(i, **kw):
    r = {"id": i, "audio": "", "src_text": "s", "tgt_text": "t", "src_lang": "en", "tgt_lang": "de"}
    r.update(kw)
    return r


def test_safe_key_is_stable_and_webdataset_safe():
    """Safe ids stay as they are; others get sanitised + 8 hex of sha1, never a '.', at most 80 chars."""
    assert manifest.safe_key("abc_D-9") == "abc_D-9"
    for sid in ["a.b", "a b", "ü", "x/y", "__key__", "n" * 200, "."]:
        k = manifest.safe_key(sid)
        assert re.fullmatch(r"[A-Za-z0-9_-]+-[0-9a-f]{8}", k) and len(k) <= manifest.MAX_KEY, (sid, k)
        assert manifest.safe_key(sid) == k
    assert manifest.safe_key("a.b") != manifest.safe_key("a b")  # same stem, different hash
    assert manifest.safe_key("a.b").startswith("a_b-")


def test_bom_crlf_and_sniffed_format(tmp_path):
    """A UTF-8 BOM and CRLF line ends are fine; a .txt manifest is sniffed from its first line."""
    p = tmp_path / "m.txt"
    a, b = (json.dumps(_row(i)).encode() for i in "ab")
    p.write_bytes(b"\xef\xbb\xbf" + a + b"\r\n" + b + b"\r\n")
    m = manifest.read(p)
    assert m.format == "jsonl" and [r.id for r in m.rows] == ["a", "b"] and not m.rejects
    (tmp_path / "x.txt").write_text("id,audio\n1,2\n")
    with pytest.raises(StageError, match="cannot tell its format"):
        manifest.read(tmp_path / "x.txt")


def test_tsv_bad_lines_and_header(tmp_path):
    """A non-UTF-8 TSV row is rejected by line; a non-UTF-8 or incomplete header is an error."""
    p = tmp_path / "m.tsv"
    p.write_bytes(b"id\taudio\ttgt_text\tsrc_lang\ttgt_lang\n"
                  b"a\t\tgut\ten\tde\n"
                  b"b\t\tgr\xfc\xdf\ten\tde\n"
                  b"c\t\tok\ten\tde\textra\n")
    m = manifest.read(p)
    assert [r.id for r in m.rows] == ["a"]
    assert [(j.line, j.id, j.code) for j in m.rejects] == [(3, "", "bad_line"), (4, "c", "bad_line")]
    assert "not UTF-8" in m.rejects[0].reason
    assert "6 tab-separated cells, the header has 5" in m.rejects[1].reason
    p.write_bytes(b"id\taud\xffio\n")
    with pytest.raises(StageError, match="header .* is not UTF-8"):
        manifest.read(p)


def test_field_rules(tmp_path):
    """Segments, splits, audio field and unknown fields: each problem is a reject naming the fix."""
    p = _jsonl(tmp_path / "m.jsonl",
               _row("neg", audio="a.wav", offset_s=-1),
               _row("nan", audio="a.wav", duration_s="long"),
               _row("zero", audio="a.wav", duration_s=0),
               _row("noaud", offset_s=1.0),
               _row("badsplit", split="dev-2"),
               _row("num", tgt_text=5),
               _row("ok", audio="sub dir/ü.wav", split="dev", tgt_txt="typo"),
               _row("dflt"),
               b'{"id": "sur", "audio": "", "tgt_text": "bad \\udc80", "src_lang": "en", "tgt_lang": "de"}')
    m = manifest.read(p, default_split="train")
    codes = {j.id: j.code for j in m.rejects}
    assert codes == {"neg": "bad_segment", "nan": "bad_segment", "zero": "bad_segment",
                     "noaud": "bad_segment", "badsplit": "bad_split", "num": "bad_field", "sur": "bad_line"}
    ok, dflt = m.rows
    assert ok.audio == str(tmp_path / "sub dir" / "ü.wav") and ok.split == "dev" and dflt.split == "train"
    assert m.unknown_fields == {"tgt_txt": 1}
    assert m.splits() == ["dev", "train"] and m.read == 9
    assert m.rejects[-1].code == "bad_line" and "surrogate" in m.rejects[-1].reason


def test_ids_unique_across_splits(tmp_path):
    """Building one split still rejects an id first used by a row of another split, naming its line."""
    p = _jsonl(tmp_path / "m.jsonl", _row("x", split="train"), _row("x", split="dev"), _row("y", split="dev"))
    m = manifest.read(p, default_split="dev", only_split="dev")
    assert [r.id for r in m.rows] == ["y"] and m.other_split == 1
    assert m.rejects[0].code == "duplicate_id" and "line 1" in m.rejects[0].reason


def test_header_only_tsv_is_refused_like_an_empty_jsonl(tmp_path):
    """A TSV with a header and no rows (blank lines do not count) is an error naming the file, as an
    empty JSONL is; a header followed by only bad rows is read, with the rows rejected."""
    header = b"id\taudio\tsrc_text\ttgt_text\tsrc_lang\ttgt_lang\n"
    p = tmp_path / "head.tsv"
    for body in (header, header + b"\n\r\n  \n", b"\xef\xbb\xbf" + header.replace(b"\n", b"\r\n")):
        p.write_bytes(body)
        with pytest.raises(StageError, match=r"head\.tsv is empty: it has a header \(line 1\) but no rows"):
            manifest.read(p)
    (tmp_path / "e.jsonl").write_bytes(b"\n")
    with pytest.raises(StageError, match=r"e\.jsonl is empty"):
        manifest.read(tmp_path / "e.jsonl")
    p.write_bytes(b"\n" + header + b"x\t\tgr\xfc\xdf\n")
    m = manifest.read(p)
    assert not m.rows and [(j.line, j.code) for j in m.rejects] == [(3, "bad_line")]
    p.write_bytes(header + b"a\t\ts\tt\ten\tde\n")
    assert [r.id for r in manifest.read(p).rows] == ["a"]
