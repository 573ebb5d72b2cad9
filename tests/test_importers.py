"""``stc import mustc|covost``: corpus layouts -> manifest -> shards, and every bad input.

The corpora are tiny fakes in ``tmp_path``: sine tones written with soundfile (a 4 s "talk" cut into
three MuST-C segments; CoVoST clips as MP3 when libsndfile can write it). The CLI runs as a
subprocess for the round trips (the import is cheap: no torch) and in-process for the errors.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine import cli
from engine.errors import StageError
from engine.data import audio, importers, manifest, tario

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
MP3 = "MP3" in sf.available_formats()


def tone(secs: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(SR * secs))) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# MuST-C writes one flow mapping per line, as here (plus rW/uW counts the importer ignores)
SEGMENTS = [("ted_1.wav", 0.5, 1.0), ("ted_1.wav", 1.7, 0.8), ("ted_2.wav", 0.1, 0.6), ("ted_1.wav", 3.0, 0.6)]
EN = ["Hello there.", "He said \"yes\u2028really\".", "Short one.", "Last one."]
DE = ["Hallo.", "Er sagte \"ja\".", "Kurz.", "Letzte."]


def make_mustc(root: Path, split: str = "tst-COMMON", *, segments=SEGMENTS, en=EN, de=DE) -> Path:
    """``root/<split>/{txt,wav}``; ted_1.wav is a 4 s talk whose samples ramp, so a slice is recognisable."""
    d = root / split
    (d / "txt").mkdir(parents=True)
    (d / "wav").mkdir()
    sf.write(d / "wav" / "ted_1.wav", tone(4.0) * np.linspace(0.2, 1.0, 4 * SR, dtype=np.float32), SR,
             subtype="FLOAT")
    sf.write(d / "wav" / "ted_2.wav", tone(1.0, 330.0), SR)
    (d / "txt" / f"{split}.yaml").write_text("".join(
        f"- {{duration: {dur:.6f}, offset: {off:.6f}, rW: 3, uW: 0, speaker_id: spk.{w[4]}, wav: {w}}}\n"
        for w, off, dur in segments))
    (d / "txt" / f"{split}.en").write_text("".join(t + "\n" for t in en), encoding="utf-8")
    (d / "txt" / f"{split}.de").write_text("".join(t + "\n" for t in de), encoding="utf-8")
    return d


def make_covost(root: Path, name: str = "covost_v2.en_de.test.tsv", rows=None) -> tuple[Path, Path]:
    """A Common Voice ``clips/`` folder and a CoVoST 2 TSV whose texts hold unbalanced quotes."""
    ext = "mp3" if MP3 else "wav"
    clips = root / "cv" / "clips"
    clips.mkdir(parents=True)
    for i, secs in enumerate([0.7, 1.2]):
        sf.write(clips / f"common_voice_en_{i}.{ext}", tone(secs, 300 + 100 * i), SR,
                 **({"format": "MP3"} if MP3 else {}))
    rows = rows if rows is not None else [
        f"common_voice_en_0.{ext}\tShe said \"hi.\tSie sagte \"hallo.\tc1",
        f"common_voice_en_1.{ext}\t\"Quoted\" start\t\"Zitiert\" am Anfang\tc2",
    ]
    tsv = root / name
    tsv.write_text("path\tsentence\ttranslation\tclient_id\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return tsv, clips


def stc(stc_env, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *argv], env=stc_env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def samples(out: Path) -> dict[str, dict]:
    meta = json.loads((out / "meta.json").read_text())
    got = {}
    for rec in meta["shards"]:
        for s in tario.iter_samples(out / rec["name"]):
            j = json.loads(s["json"])
            got[j["id"]] = {"json": j, "audio": audio.decode_flac(s["audio.flac"])[0]}
    return got


def jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------ MuST-C

def test_mustc_cli_to_manifest_to_shards(tmp_path, stc_env):
    """Segments of a long WAV become rows with stable ids, relative paths and offset/duration; the
    shards built from them hold exactly those slices; read = written + rejected is printed."""
    make_mustc(tmp_path / "corpus")
    out = tmp_path / "work" / "m.jsonl"
    r = stc(stc_env, "import", "mustc", str(tmp_path / "corpus"), "--split", "tst-COMMON", "--src", "en",
            "--tgt", "de", "--out", str(out), "--check")
    assert r.returncode == 0, r.stderr
    assert "rows read 4, written 4, rejected 0" in r.stderr
    rows = jsonl(out)
    assert [x["id"] for x in rows] == ["ted_1_0", "ted_1_1", "ted_2_0", "ted_1_2"]
    assert rows[0]["audio"] == "../corpus/tst-COMMON/wav/ted_1.wav"
    assert rows[1]["src_text"] == EN[1]  # U+2028 inside a text did not split the line
    assert {x["split"] for x in rows} == {"tst_COMMON"} and {x["corpus"] for x in rows} == {"must-c"}
    assert not (tmp_path / "work" / "m.rejects.jsonl").exists()
    man = manifest.read(out)
    assert not man.rejects and [(w.offset_s, w.duration_s) for w in man.rows] == [s[1:] for s in SEGMENTS]

    sh = tmp_path / "sh"
    b = stc(stc_env, "shards", "build", "--manifest", str(out), "--out", str(sh))
    assert b.returncode == 0, b.stderr
    got = samples(sh)
    assert set(got) == {x["id"] for x in rows}
    talk = sf.read(tmp_path / "corpus" / "tst-COMMON" / "wav" / "ted_1.wav", dtype="float32")[0]
    for sid, (_, off, dur) in zip(["ted_1_0", "ted_1_1", "ted_2_0", "ted_1_2"], SEGMENTS):
        assert got[sid]["json"]["duration_s"] == pytest.approx(dur, abs=1e-4)
        assert len(got[sid]["audio"]) == round(dur * SR)
        if sid.startswith("ted_1"):  # FLAC is 16-bit: equal up to quantisation
            np.testing.assert_allclose(got[sid]["audio"], talk[round(off * SR):round((off + dur) * SR)],
                                       atol=1e-4)


def test_mustc_root_forms_and_options(tmp_path):
    """root may be the release folder with data/, the parent of the split or the split itself;
    --as-split and --corpus are written to every row; a repeated import gives the same bytes."""
    d = make_mustc(tmp_path / "en-de" / "data", split="dev")
    out = tmp_path / "m.jsonl"
    texts = []
    for root in (tmp_path / "en-de", tmp_path / "en-de" / "data", d):
        s = importers.import_mustc(root, "dev", "en", "de", out, as_split="valid", corpus="acl6060")
        assert (s.read, s.written, s.rejected) == (4, 4, 0)
        texts.append(out.read_text())
    assert texts[0] == texts[1] == texts[2]
    assert {(x["split"], x["corpus"]) for x in jsonl(out)} == {("valid", "acl6060")}
    with pytest.raises(StageError, match="'tst-COMMON' is not a usable split name"):
        importers.import_mustc(d, "dev", "en", "de", out, as_split="tst-COMMON")
    with pytest.raises(StageError, match="--tgt: unknown language code 'xx'"):
        importers.import_mustc(d, "dev", "en", "xx", out)


def test_mustc_yaml_fast_path_matches_yaml_loader(tmp_path):
    """The one-mapping-per-line fast path reads what the YAML loader reads; other YAML styles (block
    mappings, quoted names) go through the loader and give the same manifest."""
    import yaml

    d = make_mustc(tmp_path / "c")
    y = d / "txt" / "tst-COMMON.yaml"
    assert importers._flow_lines(y.read_text()) == yaml.safe_load(y.read_text())
    out = tmp_path / "m.jsonl"
    importers.import_mustc(d, "tst-COMMON", "en", "de", out)
    fast = out.read_text()
    segs = yaml.safe_load(y.read_text())
    y.write_text(yaml.safe_dump(segs, default_style='"'))  # block style, every scalar quoted
    assert importers._flow_lines(y.read_text()) is None
    importers.import_mustc(d, "tst-COMMON", "en", "de", out)
    assert out.read_text() == fast
    y.write_text("{a: 1}\n")
    with pytest.raises(StageError, match="is not a YAML list of segments"):
        importers.import_mustc(d, "tst-COMMON", "en", "de", out)


def test_mustc_rejects_are_listed_not_dropped(tmp_path, capsys):
    """A missing WAV (with --check), an empty translation and a zero-length segment are rejected into
    <stem>.rejects.jsonl with line and reason; later ids do not shift; without --check the missing
    WAV's row is written and the summary says audio was not checked."""
    segs = [*SEGMENTS[:3], ("ted_1.wav", 3.0, 0.0), ("ted_1.wav", 3.2, 0.5)]
    d = make_mustc(tmp_path / "c", segments=segs, en=[*EN[:3], "x", "y"], de=["Hallo.", "", "Kurz.", "x", "y"])
    (d / "wav" / "ted_2.wav").unlink()
    out = tmp_path / "m.jsonl"
    assert cli.main(["import", "mustc", str(tmp_path / "c"), "--split", "tst-COMMON", "--src", "en", "--tgt",
                     "de", "-o", str(out), "--check"]) == 0
    err = capsys.readouterr().err
    assert "rows read 5, written 2, rejected 3" in err and "m.rejects.jsonl" in err
    assert [x["id"] for x in jsonl(out)] == ["ted_1_0", "ted_1_3"]
    rej = {r["id"]: r for r in jsonl(tmp_path / "m.rejects.jsonl")}
    assert {k: (r["code"], r["line"]) for k, r in rej.items()} == {
        "ted_1_1": ("missing_tgt_text", 2), "ted_2_0": ("missing_audio", 3), "ted_1_2": ("bad_segment", 4)}
    assert "ted_2.wav not found" in rej["ted_2_0"]["reason"] and rej["ted_2_0"]["file"].endswith("ted_2.wav")
    s = importers.import_mustc(tmp_path / "c", "tst-COMMON", "en", "de", out)  # no --check
    assert (s.read, s.written, s.rejected) == (5, 3, 2) and any("--check" in n for n in s.notes)


def test_mustc_line_count_mismatch_names_both_files(tmp_path, capsys):
    d = make_mustc(tmp_path / "c", de=DE[:3])
    out = tmp_path / "m.jsonl"
    out.write_text("old\n")
    assert cli.main(["import", "mustc", str(d), "--split", "tst-COMMON", "--src", "en", "--tgt", "de",
                     "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "do not line up" in err
    assert f"{d / 'txt' / 'tst-COMMON.yaml'} has 4" in err and f"{d / 'txt' / 'tst-COMMON.de'} has 3" in err
    assert out.read_text() == "old\n"  # an import that fails leaves the old manifest as it was
    with pytest.raises(StageError, match=r"tst-COMMON.fr not found .* holds tst-COMMON.de, tst-COMMON.en, "
                                         r"tst-COMMON.yaml: check --src/--tgt"):
        importers.import_mustc(d, "tst-COMMON", "en", "fr", out)


def test_wrong_layout_says_what_was_expected_and_what_fits(tmp_path, capsys):
    """mustc given a CoVoST folder, an empty folder, or a root with other splits; covost given a
    MuST-C folder: each error names the expected paths and the importer that fits."""
    tsv, _ = make_covost(tmp_path / "cov")
    out = str(tmp_path / "m.jsonl")
    argv = ["--split", "tst-COMMON", "--src", "en", "--tgt", "de", "--out", out]
    assert cli.main(["import", "mustc", str(tmp_path / "cov"), *argv]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "cov" / "tst-COMMON" / "txt" / "tst-COMMON.yaml") in err
    assert "holds CoVoST 2 TSVs (covost_v2.en_de.test.tsv)" in err and "stc import covost" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["import", "mustc", str(tmp_path / "empty"), *argv]) == 1
    assert f"{tmp_path / 'empty'} is empty" in capsys.readouterr().err
    make_mustc(tmp_path / "mc", split="dev")
    assert cli.main(["import", "mustc", str(tmp_path / "mc"), *argv]) == 1
    assert "MuST-C-style splits (dev)" in capsys.readouterr().err
    assert cli.main(["import", "covost", "--tsv", str(tmp_path / "mc"), "--clips", str(tmp_path), "--out", out]) == 1
    err = capsys.readouterr().err
    assert "is a folder; expected a CoVoST 2 TSV named covost_v2.<src>_<tgt>.<split>.tsv" in err
    assert "stc import mustc" in err
    assert cli.main(["import", "mustc", str(tsv), *argv]) == 1
    assert "is a CoVoST 2 TSV: use `stc import covost" in capsys.readouterr().err
    assert not Path(out).exists()


# ------------------------------------------------------------------------------------------ CoVoST 2

def test_covost_cli_to_manifest_to_shards(tmp_path, stc_env):
    """Quotes stay literal (QUOTE_NONE), languages and split come from the file name, clip paths are
    relative to the manifest; the shards hold each clip at its length."""
    tsv, clips = make_covost(tmp_path)
    out = tmp_path / "m.jsonl"
    r = stc(stc_env, "import", "covost", "--tsv", str(tsv), "--clips", str(clips), "--out", str(out), "--check")
    assert r.returncode == 0, r.stderr
    assert "rows read 2, written 2, rejected 0" in r.stderr
    rows = jsonl(out)
    ext = "mp3" if MP3 else "wav"
    assert rows[0] == {"id": "common_voice_en_0", "audio": f"cv/clips/common_voice_en_0.{ext}",
                       "src_text": "She said \"hi.", "tgt_text": "Sie sagte \"hallo.", "src_lang": "en",
                       "tgt_lang": "de", "split": "test", "corpus": "covost2"}
    assert rows[1]["src_text"] == "\"Quoted\" start"
    assert not manifest.read(out).rejects
    sh = tmp_path / "sh"
    b = stc(stc_env, "shards", "build", "--manifest", str(out), "--out", str(sh))
    assert b.returncode == 0, b.stderr
    got = samples(sh)
    for sid, secs in [("common_voice_en_0", 0.7), ("common_voice_en_1", 1.2)]:
        # MP3 pads with encoder delay/priming frames: allow a few ms either way
        assert got[sid]["json"]["duration_s"] == pytest.approx(secs, abs=0.06 if MP3 else 1e-4)


def test_covost_options_and_bad_rows(tmp_path, capsys):
    """--src/--tgt/--split-name override the file name; a Common Voice root is accepted for --clips;
    zh-CN maps to zh; bad rows are rejected by line, missing clips only with --check."""
    ext = "mp3" if MP3 else "wav"
    tsv, clips = make_covost(tmp_path, name="covost_v2.zh-CN_en.tsv", rows=[
        f"common_voice_en_0.{ext}\t你好\tHello\tc1",
        f"common_voice_en_1.{ext}\t再见\t\tc2",               # empty translation
        f"gone.{ext}\t走了\tGone\tc3",                        # no such clip
        f"common_voice_en_0.{ext}\t又\tAgain\tc4",            # listed twice
        "only\ttwo",                                           # wrong cell count
    ])
    out = tmp_path / "o" / "m.jsonl"
    s = importers.import_covost(tsv, clips.parent, out, split_name="dev", check=True)
    assert (s.read, s.written, s.rejected) == (5, 1, 4)
    row = jsonl(out)[0]
    assert (row["src_lang"], row["tgt_lang"], row["split"]) == ("zh", "en", "dev")
    assert row["audio"] == f"../cv/clips/common_voice_en_0.{ext}"
    rej = jsonl(tmp_path / "o" / "m.rejects.jsonl")
    assert [(r["line"], r["code"]) for r in rej] == [(3, "missing_tgt_text"), (4, "missing_audio"),
                                                     (5, "duplicate_id"), (6, "bad_line")]
    assert "line 5: clip common_voice_en_0" in rej[2]["reason"] and "already listed on line 2" in rej[2]["reason"]
    s = importers.import_covost(tsv, clips, out, src="zh", tgt="en")
    assert (s.read, s.written, s.rejected) == (5, 2, 3) and "split" not in jsonl(out)[0]

    plain = tmp_path / "test.tsv"
    plain.write_text(tsv.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(StageError, match="cannot tell the languages from the file name test.tsv"):
        importers.import_covost(plain, clips, out)
    plain.write_text("path\tsentence\tclient_id\tup_votes\nx.mp3\thi\tc\t2\n")
    with pytest.raises(StageError, match="lacks column.s. translation.*Common Voice TSV"):
        importers.import_covost(plain, clips, out, src="en", tgt="de")
    with pytest.raises(StageError, match="--clips .* is not a folder"):
        importers.import_covost(tsv, tmp_path / "nope", out)
    assert cli.main(["import", "covost", "--tsv", str(tmp_path / "covost_v2.en_de.dev.tsv"), "--clips",
                     str(clips), "--out", str(out)]) == 1
    assert "does not exist; expected a CoVoST 2 TSV" in capsys.readouterr().err


def test_all_rejected_writes_no_manifest(tmp_path):
    """Nothing usable: no (empty) manifest is written, the rejects are, and no temporary is left."""
    ext = "mp3" if MP3 else "wav"
    tsv, clips = make_covost(tmp_path, rows=[f"missing.{ext}\ta\tb\tc"])
    out = tmp_path / "m.jsonl"
    with pytest.raises(StageError, match="all 1 rows were rejected .missing_audio 1."):
        importers.import_covost(tsv, clips, out, check=True)
    assert not out.exists() and (tmp_path / "m.rejects.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
