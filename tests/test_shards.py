"""``stc shards build|inspect`` and the tar reader: round trip, resume, idempotence and every bad input.

All audio is synthetic (numpy tones written with soundfile into ``tmp_path``) and short, so the file
runs in seconds. Each bad input is checked for its reject ``code`` *and* for a message that names
the problem, because a reject nobody can act on is as bad as a silent drop.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from engine import config as cfg
from engine.errors import StageError
from engine.data import audio, manifest, shards, tario

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- helpers

def tone(sr: int, secs: float, channels: int = 1, amp: float = 0.3, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(sr * secs))) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels == 1:
        return x
    # distinct channels so a wrong downmix (e.g. taking channel 0) is caught
    return np.stack([x * (1.0 - 0.5 * c) for c in range(channels)], axis=1)


def row(i: str, audio_path: str = "", **kw) -> dict:
    r = {"id": i, "audio": audio_path, "src_text": f"source {i}", "tgt_text": f"Ziel {i}",
         "src_lang": "en", "tgt_lang": "de"}
    r.update(kw)
    return r


def write_manifest(path: Path, rows: list) -> Path:
    """``rows``: dicts (one JSON line each) or raw bytes (written as they are)."""
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode("utf-8"))
            f.write(b"\n")
    return path


def recipe(man: Path, out: Path, **shard_kw) -> cfg.Recipe:
    return cfg.resolve({"shards": {"manifest": str(man), "out": str(out), **shard_kw}})


def meta_of(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text(encoding="utf-8"))


def rejects_of(out: Path) -> dict[str, dict]:
    lines = (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["id"] or f"line{r['line']}": r for r in map(json.loads, lines)}


def all_samples(out: Path) -> list[dict]:
    return [s for rec in meta_of(out)["shards"] for s in tario.iter_samples(out / rec["name"])]


def balanced(summary: dict) -> None:
    assert summary["read"] == summary["written"] + summary["rejected"]


def file_state(p: Path) -> tuple:
    st = p.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


# ---------------------------------------------------------------------------------------- round trip

def test_round_trip_formats_and_paths(tmp_path):
    """WAV stereo 44.1 kHz, 8 kHz, OGG, MP3 and a path with spaces + non-ASCII all arrive as 16 kHz mono
    FLAC equal to the soxr-resampled, downmixed input; shard sizes follow samples_per_shard."""
    d = tmp_path / "données audio"
    d.mkdir()
    src = {
        "st44": (tone(44100, 0.8, channels=2), 44100, "st44.wav", {}),
        "m8k": (tone(8000, 0.6, freq=300), 8000, "m8k.wav", {}),
        "ogg": (tone(22050, 0.7, freq=500), 22050, "clip.ogg", {"format": "OGG", "subtype": "VORBIS"}),
        "mp3": (tone(16000, 0.9, freq=350), 16000, "clip.mp3", {"format": "MP3", "subtype": "MPEG_LAYER_III"}),
        "uni": (tone(16000, 0.5, freq=600), 16000, "sprach aufnahme ü é.flac", {}),
    }
    rows = []
    for k, (x, sr, name, kw) in src.items():
        sf.write(d / name, x, sr, **kw)
        rows.append(row(k, f"données audio/{name}"))
    rows.append(row("text_only", "", tgt_text="nur Text", split="train"))
    man = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out put"
    summary = shards.build(recipe(man, out, samples_per_shard=2), workers=2)
    balanced(summary)
    assert summary["written"] == 6 and summary["rejected"] == 0
    meta = meta_of(out)
    assert [r["name"] for r in meta["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [r["n"] for r in meta["shards"]] == [2, 2, 2]
    assert meta["splits"] == {"train": {"n": 6, "hours": meta["hours"], "shards": 3}}
    assert meta["languages"] == {"en-de": 6}
    assert (out / "config.yaml").exists() and (out / "rejects.jsonl").read_text() == ""

    got = {json.loads(s["json"])["id"]: s for s in all_samples(out)}
    assert list(got) == list(src) + ["text_only"]  # manifest order kept
    for k, (x, sr, name, kw) in src.items():
        y, rate = sf.read(io.BytesIO(got[k]["audio.flac"]), dtype="float32", always_2d=True)
        assert rate == 16000 and y.shape[1] == 1
        doc = json.loads(got[k]["json"])
        assert doc["duration_s"] == pytest.approx(y.shape[0] / 16000)
        assert set(doc) == {"id", "src_text", "tgt_text", "src_lang", "tgt_lang", "duration_s", "corpus",
                            "split", "truncated_s"}
        if kw.get("format") in ("OGG", "MP3"):  # lossy: compare length and level only
            assert abs(y.shape[0] - len(x) * 16000 / sr) < 0.05 * 16000
            assert 0.2 < np.abs(y).max() < 0.4
            continue
        x = sf.read(d / name, dtype="float32")[0]  # as stored (16-bit), not the float tone
        mono = x.mean(axis=1) if x.ndim == 2 else x
        ref = mono if sr == 16000 else soxr.resample(mono, sr, 16000, quality="HQ")
        assert y.shape[0] == len(ref)
        np.testing.assert_allclose(y[:, 0], ref, atol=1.5 / 32768)
    assert "audio.flac" not in got["text_only"]
    assert json.loads(got["text_only"]["json"])["duration_s"] == 0.0
    # meta samples say what the tars hold, so the stream can plan batches without opening them
    for rec in meta["shards"]:
        keys = [s.key for s in tario.index_tar(out / rec["name"])]
        assert keys == [smp[0] for smp in rec["samples"]]
    assert shards.inspect(out, verify=True)["problems"] == []


def test_webdataset_reads_our_shards(tmp_path):
    """The shards are plain WebDataset tars: webdataset's own reader sees the same keys and members."""
    import webdataset as wds

    sf.write(tmp_path / "a.wav", tone(16000, 0.3), 16000)
    man = write_manifest(tmp_path / "m.jsonl", [row("a.b", "a.wav"), row("c", "a.wav")])
    out = tmp_path / "o"
    shards.build(recipe(man, out), workers=1)
    ds = list(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in ds] == [manifest.safe_key("a.b"), "c"]
    assert all({"audio.flac", "json"} <= set(s) for s in ds)


# ---------------------------------------------------------------------------------------- bad inputs

def test_every_bad_input_is_rejected_with_its_reason(tmp_path):
    """One manifest with one row per problem: each is rejected with its code and a message naming it;
    the rest of the manifest is still built."""
    a = tmp_path / "a"
    a.mkdir()
    sf.write(a / "good.wav", tone(16000, 0.5), 16000)
    sf.write(a / "flac.flac", tone(44100, 1.0), 44100)
    flac = (a / "flac.flac").read_bytes()
    (a / "cut.flac").write_bytes(flac[: len(flac) // 2])
    sf.write(a / "whole.wav", tone(16000, 1.0), 16000)
    wav = (a / "whole.wav").read_bytes()
    (a / "cut.wav").write_bytes(wav[: len(wav) // 2])
    (a / "junk.wav").write_bytes(b"this is not audio at all" * 20)
    (a / "zero.wav").write_bytes(b"")
    sf.write(a / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(a / "silent.wav", np.zeros(8000, np.float32), 16000)
    sf.write(a / "short.wav", tone(16000, 0.01), 16000)
    rows = [
        row("ok", "a/good.wav"),
        row("corrupt", "a/junk.wav"),
        row("cut_flac", "a/cut.flac"),
        row("cut_wav", "a/cut.wav"),
        row("zero", "a/zero.wav"),
        row("empty", "a/empty.wav"),
        row("silent", "a/silent.wav"),
        row("short", "a/short.wav"),
        row("missing", "a/nowhere.wav"),
        row("no_tgt", "a/good.wav", tgt_text=""),
        {k: v for k, v in row("absent_tgt", "a/good.wav").items() if k != "tgt_text"},
        row("bad_lang", "a/good.wav", tgt_lang="xx"),
        {k: v for k, v in row("no_lang", "a/good.wav").items() if k != "src_lang"},
        row("far", "a/good.wav", offset_s=5.0, duration_s=1.0),
        b'{"id": "latin1", "audio": "a/good.wav", "tgt_text": "Gr\xfc\xdfe", "src_lang": "en", "tgt_lang": "de"}',
        b'{"id": "broken", "audio": ',
        row("ok", "a/whole.wav", tgt_text="second row with the same id"),
        {k: v for k, v in row("no_audio_field").items() if k != "audio"},
        row("ok2", "a/whole.wav"),
    ]
    man = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    summary = shards.build(recipe(man, out), workers=2)
    balanced(summary)
    assert summary["read"] == len(rows) and summary["written"] == 2
    rj = rejects_of(out)
    expect = {
        "corrupt": ("unreadable_audio", "corrupt"),
        "cut_flac": ("unreadable_audio", "truncated"),
        "cut_wav": ("truncated_audio", "truncated"),
        "zero": ("empty_file", "0 bytes"),
        "empty": ("empty_audio", "no audio"),
        "silent": ("silent_audio", "silent"),
        "short": ("too_short", "shorter than shards.min_audio_s"),
        "missing": ("missing_audio", "not found"),
        "no_tgt": ("missing_tgt_text", "tgt_text is missing or empty"),
        "absent_tgt": ("missing_tgt_text", "tgt_text is missing or empty"),
        "bad_lang": ("unknown_lang", "unknown language code 'xx'"),
        "no_lang": ("missing_lang", "src_lang is missing"),
        "far": ("offset_beyond_end", "beyond the end"),
        "line15": ("bad_line", "not UTF-8"),
        "line16": ("bad_line", "not valid JSON"),
        "ok": ("duplicate_id", "already used on line 1"),
        "no_audio_field": ("bad_field", "no 'audio' field"),
    }
    assert set(rj) == set(expect)
    for k, (code, words) in expect.items():
        assert rj[k]["code"] == code, (k, rj[k])
        assert words in rj[k]["reason"], (k, rj[k]["reason"])
        assert set(rj[k]) == {"line", "id", "file", "reason", "code"}
    assert rj["line15"]["line"] == 15 and rj["ok"]["line"] == 17
    assert rj["missing"]["file"].endswith("nowhere.wav")
    # the duplicate never overwrote the first row
    docs = {json.loads(s["json"])["id"]: json.loads(s["json"]) for s in all_samples(out)}
    assert docs["ok"]["tgt_text"] == "Ziel ok"
    assert meta_of(out)["rejected_by_reason"]["duplicate_id"] == 1


def test_ids_with_dots_and_odd_characters_get_stable_keys(tmp_path):
    """Ids with '.', '/', spaces, non-ASCII or the __x__ shape map to stable safe keys; meta keeps the map."""
    sf.write(tmp_path / "a.wav", tone(16000, 0.3), 16000)
    ids = ["utt.1.en", "talk/12 seg", "über", "__key__", "plain_id-7"]
    man = write_manifest(tmp_path / "m.jsonl", [row(i, "a.wav") for i in ids])
    out = tmp_path / "o"
    shards.build(recipe(man, out), workers=1)
    meta = meta_of(out)
    keys = [smp[0] for smp in meta["shards"][0]["samples"]]
    assert keys == [manifest.safe_key(i) for i in ids]
    assert keys[-1] == "plain_id-7" and all(k.count(".") == 0 for k in keys)
    assert manifest.safe_key("utt.1.en") == manifest.safe_key("utt.1.en") != manifest.safe_key("utt_1.en")
    assert meta["key_map"] == {manifest.safe_key(i): i for i in ids[:-1]}
    for s in all_samples(out):
        doc = json.loads(s["json"])
        assert meta["key_map"].get(s["__key__"], s["__key__"]) == doc["id"]


def test_long_audio_truncated_or_rejected(tmp_path):
    """Over max_audio_s (30 s) is cut to 30 s and counted with long_audio=truncate, or rejected with
    long_audio=reject (both explicit: the default, auto, depends on the split)."""
    sf.write(tmp_path / "long.wav", tone(8000, 31.5), 8000)
    sf.write(tmp_path / "ok.wav", tone(8000, 2.0), 8000)
    man = write_manifest(tmp_path / "m.jsonl", [row("long", "long.wav"), row("ok", "ok.wav")])
    s1 = shards.build(recipe(man, tmp_path / "t", long_audio="truncate"), workers=1)
    balanced(s1)
    assert s1["truncated"] == 1 and s1["truncated_seconds"] == pytest.approx(1.5)
    doc = json.loads(all_samples(tmp_path / "t")[0]["json"])
    assert doc["duration_s"] == pytest.approx(30.0) and doc["truncated_s"] == pytest.approx(1.5)
    s2 = shards.build(recipe(man, tmp_path / "r", long_audio="reject"), workers=1)
    balanced(s2)
    assert s2["written"] == 1 and s2["truncated"] == 0
    rj = rejects_of(tmp_path / "r")["long"]
    assert rj["code"] == "too_long" and "longer than shards.max_audio_s=30.0" in rj["reason"]
    assert s1["long_audio"]["splits"]["train"] == {"rule": "truncate", "rejected": 0, "truncated": 1,
                                                   "truncated_seconds": pytest.approx(1.5)}
    assert s2["long_audio"]["splits"]["train"]["rule"] == "reject" and s2["too_long_rejected"] == 1


def test_long_audio_auto_rejects_training_rows_and_truncates_other_splits(tmp_path):
    """The default long_audio=auto rejects over-long rows of the training split (a cut clip with the
    full translation is a wrong pair) and truncates them in the other splits; meta.json and the
    summary say how many rows each rule hit, per split."""
    assert cfg.ShardsConfig().long_audio == "auto"
    sf.write(tmp_path / "long.wav", tone(8000, 31.5), 8000)
    sf.write(tmp_path / "ok.wav", tone(8000, 2.0), 8000)
    rows = [row("tr_long", "long.wav", split="train"), row("nosplit_long", "long.wav"),
            row("tr_ok", "ok.wav", split="train"), row("dev_long", "long.wav", split="dev"),
            row("test_long", "long.wav", split="test"), row("test_ok", "ok.wav", split="test")]
    man = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "o"
    s = shards.build(recipe(man, out), workers=2)
    balanced(s)
    assert s["read"] == 6 and s["written"] == 4 and s["rejected"] == 2
    rj = rejects_of(out)
    assert set(rj) == {"tr_long", "nosplit_long"}  # a row without a split belongs to train
    for r in rj.values():
        assert r["code"] == "too_long"
        assert "longer than shards.max_audio_s=30.0" in r["reason"]
        assert "shards.long_audio=auto" in r["reason"] and "training split 'train'" in r["reason"]
    docs = {json.loads(d["json"])["id"]: json.loads(d["json"]) for d in all_samples(out)}
    assert docs["test_long"]["duration_s"] == pytest.approx(30.0)
    assert docs["test_long"]["truncated_s"] == pytest.approx(1.5)
    assert docs["dev_long"]["truncated_s"] == pytest.approx(1.5)
    assert s["truncated"] == 2 and s["too_long_rejected"] == 2
    la = meta_of(out)["long_audio"]
    assert la["setting"] == "auto" and la["train_split"] == "train" and la["max_audio_s"] == 30.0
    assert la["splits"] == {
        "train": {"rule": "reject", "rejected": 2, "truncated": 0, "truncated_seconds": 0.0},
        "dev": {"rule": "truncate", "rejected": 0, "truncated": 1, "truncated_seconds": pytest.approx(1.5)},
        "test": {"rule": "truncate", "rejected": 0, "truncated": 1, "truncated_seconds": pytest.approx(1.5)}}
    assert s["long_audio"] == la
    assert meta_of(out)["counts"]["too_long_rejected"] == 2

    # auto follows data.train_split; changing it changes the output, so a rebuild into `out` refuses
    other = cfg.resolve({"shards": {"manifest": str(man), "out": str(tmp_path / "o2")},
                         "data": {"train_split": "test"}})
    s2 = shards.build(other, workers=1)
    balanced(s2)
    assert set(rejects_of(tmp_path / "o2")) == {"test_long"}
    assert s2["long_audio"]["splits"]["train"]["rule"] == "truncate"
    moved = cfg.resolve({"shards": {"manifest": str(man), "out": str(out)}, "data": {"train_split": "test"}})
    with pytest.raises(StageError, match=r"data\.train_split: 'train' then, 'test' now"):
        shards.build(moved)


def test_long_audio_rules_in_printed_summary(tmp_path, capsys):
    """The printed build summary names the long-audio rule of each split and its counts."""
    sf.write(tmp_path / "long.wav", tone(8000, 31.5), 8000)
    man = write_manifest(tmp_path / "m.jsonl", [row("a", "long.wav"), row("b", "long.wav", split="test")])
    s = shards.build(recipe(man, tmp_path / "o"), workers=1)
    capsys.readouterr()
    shards.print_summary(s)
    err = capsys.readouterr()
    text = err.out + err.err
    assert "shards.long_audio=auto" in text
    assert "train: reject (1 rejected, 0 truncated)" in text and "test: truncate (0 rejected, 1 truncated)" in text


def test_segments_by_offset_and_duration(tmp_path):
    """offset_s/duration_s cut a long recording by seeking; the samples are exactly that slice."""
    rng = np.random.default_rng(0)
    x = (0.2 * rng.standard_normal(16000 * 12)).astype(np.float32).clip(-1, 1)
    sf.write(tmp_path / "talk.flac", x, 16000, subtype="PCM_16")
    x16 = sf.read(tmp_path / "talk.flac", dtype="float32")[0]
    rows = [row("s1", "talk.flac", offset_s=1.5, duration_s=2.0),
            row("s2", "talk.flac", offset_s=10.0, duration_s=5.0),  # runs 3 s past the end
            row("s3", "talk.flac", offset_s=12.5, duration_s=1.0),
            row("s4", "talk.flac", offset_s=10.0)]  # no duration: to the end of the file
    man = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "o"
    s = shards.build(recipe(man, out), workers=1)
    balanced(s)
    got = {json.loads(d["json"])["id"]: audio.decode_flac(d["audio.flac"])[0] for d in all_samples(out)}
    np.testing.assert_allclose(got["s1"], x16[24000:56000], atol=1e-6)
    np.testing.assert_allclose(got["s4"], x16[160000:], atol=1e-6)
    assert rejects_of(out)["s2"]["code"] == "segment_overrun"  # never written silently shorter
    assert rejects_of(out)["s3"]["code"] == "offset_beyond_end"
    t = shards.build(recipe(man, tmp_path / "t", segment_overrun="truncate"), workers=1)
    balanced(t)
    got = {json.loads(d["json"])["id"]: audio.decode_flac(d["audio.flac"])[0] for d in all_samples(tmp_path / "t")}
    np.testing.assert_allclose(got["s2"], x16[160000:], atol=1e-6)  # what exists, counted
    assert t["overrun"] == 1 and t["overrun_seconds"] == pytest.approx(3.0)


def test_segment_overrun_is_rejected_or_counted(tmp_path, caplog):
    """A segment running past the end of its file is rejected (segment_overrun=reject, the default)
    with a reason naming the file, the times and the fix, or written short and counted
    (segment_overrun=truncate); a rounding overrun within overrun_tolerance_s is fine; an offset at or
    beyond the end is always rejected."""
    sf.write(tmp_path / "short.wav", tone(16000, 1.5), 16000)
    sf.write(tmp_path / "talk.wav", tone(16000, 12.0, freq=200), 16000)
    rows = [row("past", "short.wav", offset_s=1.0, duration_s=10.0),    # asks 10 s, 0.5 s exist
            row("mustc", "talk.wav", offset_s=5.0, duration_s=40.0, split="test"),  # asks 40 s, 7 s exist
            row("round", "short.wav", offset_s=1.0, duration_s=0.53),   # 0.03 s past: rounding
            row("at_end", "short.wav", offset_s=1.5, duration_s=1.0),
            row("beyond", "short.wav", offset_s=2.0, duration_s=1.0),
            row("inside", "talk.wav", offset_s=2.0, duration_s=3.0)]
    man = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "r"
    s = shards.build(recipe(man, out), workers=2)
    balanced(s)
    assert s["written"] == 2 and s["rejected"] == 4 and s["overrun"] == 0 and s["overrun_rejected"] == 2
    rj = rejects_of(out)
    assert {k: v["code"] for k, v in rj.items()} == {
        "past": "segment_overrun", "mustc": "segment_overrun",
        "at_end": "offset_beyond_end", "beyond": "offset_beyond_end"}
    reason = rj["past"]["reason"]
    assert "short.wav" in reason and "offset_s=1.0 + duration_s=10.0" in reason and "1.50 s long" in reason
    assert "past the end" in reason and "shards.segment_overrun=truncate" in reason
    assert "talk.wav" in rj["mustc"]["reason"] and "33.00 s" in rj["mustc"]["reason"]
    assert meta_of(out)["rejected_by_reason"]["segment_overrun"] == 2
    assert meta_of(out)["counts"]["overrun_rejected"] == 2

    t_out = tmp_path / "t"
    t = shards.build(recipe(man, t_out, segment_overrun="truncate"), workers=1)
    balanced(t)
    assert t["written"] == 4 and t["rejected"] == 2
    assert t["overrun"] == 2 and t["overrun_seconds"] == pytest.approx(9.5 + 33.0)
    c = meta_of(t_out)["counts"]
    assert c["overrun"] == 2 and c["overrun_seconds"] == pytest.approx(42.5)
    docs = {json.loads(d["json"])["id"]: json.loads(d["json"]) for d in all_samples(t_out)}
    assert docs["past"]["duration_s"] == pytest.approx(0.5) and docs["mustc"]["duration_s"] == pytest.approx(7.0)
    assert docs["round"]["duration_s"] == pytest.approx(0.5)
    assert set(rejects_of(t_out)) == {"at_end", "beyond"}
    # the option is part of the build's identity
    with pytest.raises(StageError, match=r"shards\.segment_overrun: 'truncate' then, 'reject' now"):
        shards.build(recipe(man, t_out))
    tight = shards.build(recipe(man, tmp_path / "z", overrun_tolerance_s=0.0), workers=1)
    assert rejects_of(tmp_path / "z")["round"]["code"] == "segment_overrun" and tight["overrun_rejected"] == 3
    with pytest.raises(StageError, match="overrun_tolerance_s must be >= 0"):
        shards.build(recipe(man, tmp_path / "neg", overrun_tolerance_s=-1.0))


def test_float_audio_above_full_scale_is_clipped_counted_and_warned(tmp_path, caplog):
    """Float samples with |x| > 1 are clipped (not rejected), counted in meta.json and the summary,
    and one warning per build names the count and an example id."""
    hot = tone(16000, 1.0, amp=1.5)
    sf.write(tmp_path / "hot.wav", hot, 16000, subtype="FLOAT")
    sf.write(tmp_path / "hot2.wav", tone(16000, 0.5, amp=1.2), 16000, subtype="FLOAT")
    sf.write(tmp_path / "ok.wav", tone(16000, 0.5), 16000, subtype="FLOAT")
    man = write_manifest(tmp_path / "m.jsonl", [row("ok", "ok.wav"), row("hot", "hot.wav"),
                                                 row("hot2", "hot2.wav")])
    out = tmp_path / "o"
    with caplog.at_level("WARNING"):
        s = shards.build(recipe(man, out), workers=2)
    balanced(s)
    assert s["written"] == 3 and s["rejected"] == 0
    n_hot = int(np.count_nonzero(np.abs(hot) > 1.0)) + int(np.count_nonzero(np.abs(tone(16000, 0.5, amp=1.2)) > 1.0))
    assert s["clipped"] == 2 and s["clipped_samples"] == n_hot and s["clipped_example"] == "hot"
    c = meta_of(out)["counts"]
    assert c["clipped"] == 2 and c["clipped_samples"] == n_hot and meta_of(out)["clipped_example"] == "hot"
    warnings = [r.getMessage() for r in caplog.records if "above full scale" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 row(s)" in warnings[0] and f"{n_hot} sample(s)" in warnings[0] and "'hot'" in warnings[0]
    got = {json.loads(d["json"])["id"]: audio.decode_flac(d["audio.flac"])[0] for d in all_samples(out)}
    assert np.abs(got["hot"]).max() <= 1.0 and np.abs(got["hot"]).max() > 0.99
    clip = audio.load(tmp_path / "ok.wav")
    assert clip.clipped == 0
    assert audio.load(tmp_path / "hot.wav").clipped == int(np.count_nonzero(np.abs(hot) > 1.0))
    # a clean build warns about nothing
    caplog.clear()
    man2 = write_manifest(tmp_path / "m2.jsonl", [row("ok", "ok.wav")])
    with caplog.at_level("WARNING"):
        s2 = shards.build(recipe(man2, tmp_path / "o2"), workers=1)
    assert s2["clipped"] == 0 and not [r for r in caplog.records if "above full scale" in r.getMessage()]


def test_tsv_manifest_and_split_selection(tmp_path):
    """A TSV with a header builds like JSONL; shards.split keeps only that split's rows (and rows
    without a split), and the other rows are counted apart from read."""
    sf.write(tmp_path / "a.wav", tone(16000, 0.3), 16000)
    lines = ["id\taudio\tsrc_text\ttgt_text\tsrc_lang\ttgt_lang\tsplit",
             "r1\ta.wav\thello\thallo\ten\tde\ttrain",
             "r2\ta.wav\thello\t你好\ten\tzh\tdev",
             "r3\ta.wav\thello\thallo\ten\tde\t",
             "r4\ta.wav\tonly three cells",
             "r5\ta.wav\thello\thallo\ten\tde\tdev"]
    man = tmp_path / "m.tsv"
    man.write_text("\n".join(lines) + "\n", encoding="utf-8")
    s = shards.build(recipe(man, tmp_path / "all"), workers=1)
    balanced(s)
    assert s["splits"]["train"]["n"] == 2 and s["splits"]["dev"]["n"] == 2
    assert s["languages"] == {"en-de": 3, "en-zh": 1}
    assert rejects_of(tmp_path / "all")["r4"]["code"] == "bad_line"
    d = shards.build(recipe(man, tmp_path / "dev", split="dev"), workers=1)
    balanced(d)
    # r3 has no split and takes shards.split ("dev"); r1 belongs to train and is left out
    assert d["written"] == 3 and d["other_split"] == 1 and list(d["splits"]) == ["dev"]
    assert [r["name"] for r in meta_of(tmp_path / "dev")["shards"]] == ["dev-000000.tar"]


def test_manifest_errors_are_clear(tmp_path):
    """A missing manifest, an empty one and a TSV without the needed header are errors naming the fix."""
    with pytest.raises(StageError, match=r"nope\.jsonl does not exist; pass an existing"):
        shards.build(recipe(tmp_path / "nope.jsonl", tmp_path / "o"))
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(StageError, match="is empty"):
        shards.build(recipe(tmp_path / "e.jsonl", tmp_path / "o"))
    (tmp_path / "only_header.tsv").write_text("id\taudio\tsrc_text\ttgt_text\tsrc_lang\ttgt_lang\n\n")
    with pytest.raises(StageError, match=r"only_header\.tsv is empty: it has a header \(line 1\) but no rows"):
        shards.build(recipe(tmp_path / "only_header.tsv", tmp_path / "o"))
    assert not (tmp_path / "o" / "meta.json").exists()
    (tmp_path / "h.tsv").write_text("id\tpath\ttext\nx\ty\tz\n")
    with pytest.raises(StageError, match=r"no usable header on line 1 \(missing columns audio, tgt_text"):
        shards.build(recipe(tmp_path / "h.tsv", tmp_path / "o"))
    with pytest.raises(StageError, match="no manifest given"):
        shards.build(cfg.resolve({"shards": {"out": str(tmp_path / "o")}}))


# ---------------------------------------------------------------------------------------- resume

def _resume_inputs(tmp_path: Path, n: int = 7) -> Path:
    for i in range(n):
        sf.write(tmp_path / f"c{i}.wav", tone(22050, 0.3 + 0.05 * i, freq=300 + 40 * i), 22050)
    rows = [row(f"u{i}", f"c{i}.wav") for i in range(n)]
    rows.insert(3, row("gone", "missing.wav"))  # a reject inside a shard's range survives the resume
    return write_manifest(tmp_path / "m.jsonl", rows)


def _shard_hashes(out: Path) -> dict[str, str]:
    return {r["name"]: r["sha256"] for r in meta_of(out)["shards"]}


def test_resume_after_failure_keeps_finished_shards(tmp_path, monkeypatch):
    """A build that dies after shard 2 resumes: finished shards are neither re-encoded nor changed,
    no key is lost or doubled, and the result is byte-identical to an uninterrupted build."""
    man = _resume_inputs(tmp_path)
    ref = tmp_path / "ref"
    shards.build(recipe(man, ref, samples_per_shard=2), workers=1)

    out = tmp_path / "out"

    def die(rec):
        if rec.get("index") == 1:
            raise KeyboardInterrupt("simulated kill after shard 2")
    monkeypatch.setattr(shards, "_on_journal", die)
    with pytest.raises(KeyboardInterrupt):
        shards.build(recipe(man, out, samples_per_shard=2), workers=2)
    monkeypatch.setattr(shards, "_on_journal", None)
    assert not (out / "meta.json").exists()
    done = {n: file_state(out / n) for n in ("train-000000.tar", "train-000001.tar")}
    assert not (out / "train-000002.tar").exists()
    with pytest.raises(StageError, match="did not finish"):
        shards.inspect(out)

    # a changed manifest or option refuses to mix with the unfinished build, naming the difference
    with pytest.raises(StageError, match=r"shards\.samples_per_shard: 2 then, 3 now"):
        shards.build(recipe(man, out, samples_per_shard=3))
    original = man.read_bytes()
    man.write_bytes(original + json.dumps(row("extra", "c0.wav")).encode() + b"\n")
    with pytest.raises(StageError, match="manifest's content changed"):
        shards.build(recipe(man, out, samples_per_shard=2))
    man.write_bytes(original)

    calls = []
    real_load = audio.load
    monkeypatch.setattr(audio, "load", lambda p, **k: calls.append(Path(p).name) or real_load(p, **k))
    s = shards.build(recipe(man, out, samples_per_shard=2), workers=2)
    assert s["status"] == "resumed"
    balanced(s)
    assert sorted(calls) == ["c4.wav", "c5.wav", "c6.wav"]  # only rows after the journaled shards
    assert {n: file_state(out / n) for n in done} == done
    assert _shard_hashes(out) == _shard_hashes(ref)
    keys = [smp[0] for r in meta_of(out)["shards"] for smp in r["samples"]]
    assert keys == [f"u{i}" for i in range(7)]
    assert rejects_of(out)["gone"]["code"] == "missing_audio" and s["rejected"] == 1


def test_resume_after_sigkill_mid_shard(tmp_path, stc_env):
    """SIGKILL in the middle of a shard (temp file half written): the rerun drops the temp file and
    finishes with the same bytes as an uninterrupted build."""
    man = _resume_inputs(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "out"
    shards.build(recipe(man, ref, samples_per_shard=2), workers=1)
    script = textwrap.dedent(f"""
        import os, signal
        from engine import config as cfg
        from engine.data import audio, shards
        real, n = audio.load, [0]
        def load(*a, **k):
            n[0] += 1
            if n[0] == 7:  # u0..u3 and the reject made shards 0-1; u4 sits in the temp shard
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        audio.load = load
        r = cfg.resolve({{"shards": {{"manifest": {str(man)!r}, "out": {str(out)!r}, "samples_per_shard": 2}}}})
        shards.build(r, workers=1)
    """)
    p = subprocess.run([sys.executable, "-c", script], env=stc_env, cwd=ROOT, capture_output=True, timeout=60)
    assert p.returncode == -9, p.stderr.decode()
    assert any(".tmp-" in q.name for q in out.iterdir())
    done = {n: file_state(out / n) for n in ("train-000000.tar", "train-000001.tar")}
    s = shards.build(recipe(man, out, samples_per_shard=2), workers=1)
    balanced(s)
    assert not any(".tmp-" in q.name for q in out.iterdir())
    assert {n: file_state(out / n) for n in done} == done
    assert _shard_hashes(out) == _shard_hashes(ref)


def test_rerun_is_idempotent_and_refuses_other_inputs(tmp_path):
    """A finished build is not touched by a rerun (says 'up to date'); other options are refused."""
    man = _resume_inputs(tmp_path, n=3)
    out = tmp_path / "o"
    shards.build(recipe(man, out, samples_per_shard=2), workers=1)
    before = {p.name: file_state(p) for p in out.iterdir()}
    s = shards.build(recipe(man, out, samples_per_shard=2), workers=1)
    assert s["status"] == "up to date"
    balanced(s)
    assert {p.name: file_state(p) for p in out.iterdir()} == before
    with pytest.raises(StageError, match=r"(?s)finished build of another input.*shards\.long_audio"):
        shards.build(recipe(man, out, samples_per_shard=2, long_audio="reject"))


# ---------------------------------------------------------------------------------------- tars

def test_truncated_shard_is_reported(tmp_path):
    """A cut shard (mid-member, or just its end-of-archive blocks) is a problem naming the shard in
    inspect, and tario raises naming it; nothing is silently skipped."""
    man = _resume_inputs(tmp_path, n=4)
    out = tmp_path / "o"
    shards.build(recipe(man, out, samples_per_shard=2), workers=1)
    p = out / "train-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    summary = shards.inspect(out)
    assert any(q.startswith("train-000001.tar:") and "truncated" in q for q in summary["problems"])
    with pytest.raises(tario.TarError, match=r"train-000001\.tar: truncated tar"):
        tario.index_tar(p)
    with pytest.raises(tario.TarError, match="train-000001.tar"):
        list(tario.iter_samples(p))
    # cut exactly after the last member: no end-of-archive marker
    index = tario.index_tar(out / "train-000000.tar")
    off, size = index[-1].members["json"]
    end = off + (size + 511) // 512 * 512
    q = tmp_path / "member-boundary.tar"
    q.write_bytes((out / "train-000000.tar").read_bytes()[:end])
    with pytest.raises(tario.TarError, match="member-boundary.tar: truncated"):
        tario.index_tar(q)


def _tar_with(path: Path, *infos: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for ti, data in infos:
            ti.size = len(data) if ti.isreg() else 0
            t.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return path


@pytest.mark.parametrize("name,kind,words", [
    ("/etc/passwd.json", tarfile.REGTYPE, "absolute path"),
    ("../up.json", tarfile.REGTYPE, "'..' component"),
    ("a/../../b.json", tarfile.REGTYPE, "'..' component"),
    ("link.json", tarfile.SYMTYPE, "symbolic link"),
    ("hard.json", tarfile.LNKTYPE, "hard link"),
    ("dev.json", tarfile.CHRTYPE, "character device"),
    ("fifo.json", tarfile.FIFOTYPE, "FIFO"),
])
def test_unsafe_members_are_refused(tmp_path, name, kind, words):
    """Absolute names, '..' components, links and devices make the whole shard unreadable."""
    ti = tarfile.TarInfo(name)
    ti.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        ti.linkname = "/etc/shadow"
    p = _tar_with(tmp_path / "evil.tar", (tarfile.TarInfo("ok.json"), b"{}"), (ti, b"{}"))
    with pytest.raises(tario.TarError, match=words) as e:
        tario.index_tar(p)
    assert "evil.tar" in str(e.value)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tario_reads_pax_and_long_names_and_groups_by_key(tmp_path, fmt):
    """Shards written by other tools (pax or GNU long names, directories) index by webdataset's
    key rule: name up to the first '.' of the last component; consecutive members form a sample."""
    long_key = "d/" + "k" * 120
    p = tmp_path / "pax.tar"
    with tarfile.open(p, "w", format=fmt) as t:
        dti = tarfile.TarInfo("d")
        dti.type = tarfile.DIRTYPE
        t.addfile(dti)
        for name, data in [("d/a.x.txt", b"1"), ("d/a.json", b"{}"), (long_key + ".json", b"[]"),
                           ("__index__", b"skip"), ("noext", b"skip")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    idx = tario.index_tar(p)
    assert [(s.key, sorted(s.members)) for s in idx] == [("d/a", ["json", "x.txt"]), (long_key, ["json"])]
    samples = list(tario.iter_samples(p))
    assert samples[0] == {"__key__": "d/a", "x.txt": b"1", "json": b"{}"}
    off, size = idx[1].members["json"]
    assert tario.read_member(p, off, size) == b"[]"
    dup = _tar_with(tmp_path / "dup.tar", (tarfile.TarInfo("a.json"), b"1"), (tarfile.TarInfo("b.json"), b"2"),
                    (tarfile.TarInfo("a.txt"), b"3"))
    with pytest.raises(tario.TarError, match="key 'a' appears twice"):
        tario.index_tar(dup)


# ---------------------------------------------------------------------------------------- CLI

def test_cli_build_and_inspect(tmp_path, stc_env, stc_cmd, capsys):
    """`stc shards build` then `stc shards inspect --verify` as subprocesses; then (in-process, to keep
    the file fast: each subprocess pays the torch import) a damaged shard and a missing manifest
    exit 1 with the shard or the path named."""
    from engine import cli

    man = _resume_inputs(tmp_path, n=3)
    out = tmp_path / "cli out"
    b = subprocess.run(stc_cmd + ["shards", "build", "--manifest", str(man), "--out", str(out),
                                  "shards.samples_per_shard=2"], env=stc_env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert b.returncode == 0, b.stderr
    assert "rejected by reason" in b.stderr and "missing_audio" in b.stderr
    i = subprocess.run(stc_cmd + ["shards", "inspect", str(out), "--verify"], env=stc_env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert i.returncode == 0, i.stderr
    assert "verified" in i.stderr
    p = out / "train-000000.tar"
    p.write_bytes(p.read_bytes()[:-2000])
    capsys.readouterr()
    assert cli.main(["shards", "inspect", str(out)]) == 1
    assert "problem" in capsys.readouterr().err
    problems = shards.inspect(out)["problems"]
    assert problems and all(q.startswith("train-000000.tar") for q in problems)
    assert cli.main(["shards", "build", "--manifest", str(tmp_path / "none.jsonl"), "--out",
                     str(tmp_path / "x")]) == 1
    assert "none.jsonl does not exist" in capsys.readouterr().err
