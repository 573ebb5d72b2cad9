"""The embedded demo set on a tiny configuration (6 train / 2 dev / 2 test per direction, ~1 s).

Checks what later stages rely on: a valid manifest, splits disjoint by English sentence, real
(non-silent) audio, both directions, reruns that synthesise nothing, and clear errors for a missing
espeak-ng or source package.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from engine import config as cfg
from engine import langs
from engine.demo import data as demo

ROOT = Path(__file__).resolve().parents[1]
TINY = {"train": 6, "dev": 2, "test": 2}


def _espeak() -> None:
    """The demo's speech comes from espeak-ng (a Debian package `make demo` and `make test` install):
    without it these tests fail, they do not skip."""
    assert shutil.which("espeak-ng"), "espeak-ng not installed: apt-get install -y espeak-ng (make demo does it)"


def tiny_overrides(base: Path, **extra: object) -> list[str]:
    ovs = [f"demo.sizes.{k}={v}" for k, v in TINY.items()]
    ovs += ["demo.build_shards=false", f"shards.manifest={base / 'src' / 'manifest.jsonl'}",
            f"shards.out={base / 'built'}"]
    ovs += [f"{k}={v}" for k, v in extra.items()]
    return ovs


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    _espeak()
    base = tmp_path_factory.mktemp("demo")
    summary = demo.build(tiny_overrides(base))
    rows = [json.loads(line) for line in (base / "src" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    return base, summary, rows


def test_shipped_spec_and_recipe_validate():
    spec = demo.load_spec()
    recipe = cfg.load(ROOT / spec.recipe)
    assert recipe.shards.manifest and recipe.shards.out
    assert set(spec.sources) <= set(demo.SOURCES)
    assert len(spec.voices) > 1  # the audio must not all share one timbre


def test_manifest_validates(built):
    base, summary, rows = built
    assert len(rows) == summary["rows"] == 2 * sum(TINY.values())
    assert demo.check_manifest(rows, base / "src") == []
    for r in rows:
        assert set(demo.REQUIRED_FIELDS) <= set(r) and r["corpus"]
        assert r["src_lang"] == "en"
        langs.get(r["tgt_lang"])  # a code the prompt's language table knows
        assert not Path(r["audio"]).is_absolute() and r["audio"].startswith("wav/")
        assert r["src_text"] == r["src_text"].strip() and r["tgt_text"] == r["tgt_text"].strip()
        assert 1 <= len(r["src_text"].split()) <= 20
    assert len({r["id"] for r in rows}) == len(rows)
    assert (base / "src" / "demo.json").is_file()


def test_manifest_reader_accepts_every_row(built):
    from engine.data import manifest

    base, _, rows = built
    man = manifest.read(base / "src" / "manifest.jsonl")
    assert man.rejects == [] and len(man.rows) == len(rows)
    assert set(man.splits()) == {"train", "dev", "test"}
    assert all(Path(r.audio).is_file() for r in man.rows)


def test_both_directions_and_exact_counts(built):
    _, _, rows = built
    assert {r["tgt_lang"] for r in rows} == {"de", "zh"}
    for lang in ("de", "zh"):
        for split, n in TINY.items():
            assert sum(r["tgt_lang"] == lang and r["split"] == split for r in rows) == n


def test_splits_disjoint_by_english_source(built):
    _, _, rows = built
    by_split: dict[str, set[str]] = {}
    for r in rows:
        by_split.setdefault(r["split"], set()).add(demo.source_key(r["src_text"]))
    assert not by_split["train"] & by_split["dev"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["dev"] & by_split["test"]


def test_wavs_exist_and_are_speech(built):
    base, _, rows = built
    for r in rows:
        path = base / "src" / r["audio"]
        info = sf.info(str(path))
        assert info.samplerate == 22050 and info.channels == 1
        assert 0.3 < info.duration < 30
        assert demo.audio_peak_dbfs(path) > -30  # espeak-ng speaks near full scale
    used = {demo.pick_voice(r["src_text"], demo.load_spec()).voice for r in rows}
    assert len(used) > 1


def test_rerun_synthesizes_nothing(built):
    base, first, rows = built
    assert first["synthesis"]["synthesized"] == len({r["audio"] for r in rows})
    wavs = sorted((base / "src" / "wav").glob("*.wav"))
    manifest = base / "src" / "manifest.jsonl"
    before = {p: p.stat().st_mtime_ns for p in wavs + [manifest]}
    stale = base / "src" / "wav" / "leftover.wav.tmp-999999"  # what a killed run leaves behind
    stale.write_bytes(b"partial")
    again = demo.build(tiny_overrides(base))
    assert again["synthesis"] == {"synthesized": 0, "reused": len(wavs)}
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not stale.exists()


def test_selection_is_seeded(tmp_path):
    spec = demo.load_spec(overrides=[f"demo.sizes.{k}={v}" for k, v in TINY.items()])
    pairs = demo.clean([p for s in spec.sources for p in demo.SOURCES[s].load()], spec)
    again = demo.clean([p for s in spec.sources for p in demo.SOURCES[s].load()], spec)
    assert demo.select(pairs, spec) == demo.select(again, spec)
    other = demo.load_spec(overrides=[f"demo.sizes.{k}={v}" for k, v in TINY.items()] + ["demo.seed=1"])
    assert demo.select(pairs, spec) != demo.select(pairs, other)
    # A larger train set leaves dev and test unchanged (they are filled first).
    bigger = demo.load_spec(overrides=["demo.sizes.train=20", "demo.sizes.dev=2", "demo.sizes.test=2"])
    a, b = demo.select(pairs, spec), demo.select(pairs, bigger)
    assert all(a[lang][s] == b[lang][s] for lang in a for s in ("dev", "test"))


def test_clean_drops_what_cannot_be_spoken_or_is_repeated():
    spec = demo.load_spec(overrides=["demo.max_words=5"])
    P = demo.Pair
    raw = [P("  Good  morning! ", " Guten Morgen! ", "de", "x"), P("good morning", "Morgen", "de", "x"),
           P("to do / make", "machen", "de", "x"), P("My number is ...", "Meine Nummer ist ...", "de", "x"),
           P("", "leer", "de", "x"), P("one two three four five six", "eins", "de", "x"),
           P("Good morning!", "早上好！", "zh", "y")]
    stats: dict = {}
    out = demo.clean(raw, spec, stats)
    assert out == [P("Good morning!", "Guten Morgen!", "de", "x"), P("Good morning!", "早上好！", "zh", "y")]
    assert stats["x"] == {"read": 6, "kept": 1, "duplicate_source": 1, "notation": 2, "empty": 1, "length": 1}


def test_too_few_pairs_is_a_clear_error():
    spec = demo.load_spec(overrides=["demo.sizes.train=5", "demo.sizes.dev=1", "demo.sizes.test=1"])
    pairs = [demo.Pair(f"sentence number {i}", f"Satz {i}", "de", "x") for i in range(4)]
    with pytest.raises(demo.DemoError, match="en->de: only 4 usable pairs"):
        demo.select(pairs, spec)


def test_missing_espeak_names_the_package(tmp_path, capsys):
    from engine import cli

    code = cli.main(["demo", "--data-only", *tiny_overrides(tmp_path, **{"demo.espeak": "/nonexistent/espeak-ng"})])
    err = capsys.readouterr().err
    assert code == 1
    assert "stc demo: error:" in err and "apt-get install -y espeak-ng" in err and "make demo" in err


def test_missing_source_package_names_it():
    with pytest.raises(demo.DemoError, match="no-such-dist.*pip install no-such-dist"):
        demo.package_dir("no_such_module_for_stc_tests", "no-such-dist", "pip install no-such-dist")


def test_bad_overrides_are_reported_together(capsys):
    from engine import cli

    assert cli.main(["demo", "--data-only", "demo.sizes.trian=3", "demo.voices=[{voice: en-us, pitch: 300}]"]) == 2
    err = capsys.readouterr().err
    assert "demo.sizes.train" in err and "pitch" in err


def test_shard_build_reconciles(built):
    from engine.data import shards

    base, _, _ = built
    recipe = cfg.load(ROOT / "configs" / "demo.yaml",
                      [f"shards.manifest={base / 'src' / 'manifest.jsonl'}", f"shards.out={base / 'built'}",
                       "shards.samples_per_shard=4"])
    summary = shards.build(recipe)

    def n(v: object) -> int:
        return len(v) if isinstance(v, (list, tuple, dict)) else int(v or 0)

    assert n(summary["read"]) == 2 * sum(TINY.values())
    assert n(summary["read"]) == n(summary["written"]) + n(summary.get("rejected", 0))
    assert n(summary["written"]) > 0


def test_demo_with_shards_reruns_and_follows_spec_changes(tmp_path):
    _espeak()
    ovs = [o for o in tiny_overrides(tmp_path) if o != "demo.build_shards=false"] + ["shards.samples_per_shard=4"]
    first = demo.build(ovs)
    assert first["shards"]["written"] == first["rows"] and first["shards"]["rejected"] == 0
    tars = sorted((tmp_path / "built").glob("*.tar"))
    assert {p.name.split("-")[0] for p in tars} == {"train", "dev", "test"}
    again = demo.build(ovs)
    assert again["shards"]["status"] == "up to date" and again["synthesis"]["synthesized"] == 0
    # A new count rewrites the manifest; the demo's old shards are stale and replaced, not refused.
    grown = demo.build(ovs + ["demo.sizes.train=7"])
    assert grown["rows"] == first["rows"] + 2
    assert grown["shards"]["written"] == grown["rows"]
    assert grown["synthesis"]["synthesized"] == 2  # only the two new sentences


def test_cli_demo_calls_the_builder(tmp_path, capsys):
    from engine import cli

    assert cli.main(["demo", *tiny_overrides(tmp_path, **{"demo.espeak": "/nonexistent/espeak-ng"})]) == 1
    assert "espeak-ng" in capsys.readouterr().err


def test_silent_synthesis_is_refused_and_leaves_no_wav(tmp_path, capsys):
    import stat
    import sys

    fake = tmp_path / "fake-espeak"  # writes digital silence, as a broken voice would
    fake.write_text(f"""#!{sys.executable}
import sys
import numpy as np
import soundfile as sf
if "--version" in sys.argv:
    print("eSpeak NG text-to-speech: 0.0-fake")
    sys.exit(0)
sys.stdin.read()
sf.write(sys.argv[sys.argv.index("-w") + 1], np.zeros(22050, np.int16), 22050, format="WAV", subtype="PCM_16")
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(demo.DemoError, match="silence"):
        demo.main(tiny_overrides(tmp_path, **{"demo.espeak": str(fake)}))
    assert not list((tmp_path / "src" / "wav").glob("*"))  # neither a wav nor a temporary


def test_stc_demo_dry_run_prints_the_whole_chain(stc_env, stc_cmd, tmp_path):
    """`make demo` runs `stc demo`: with --dry-run it builds nothing and prints the pipeline plan on the
    shipped teacher (every step of the paper's chain, each system evaluated, then the report)."""
    import subprocess

    teacher = ROOT / "shards" / "teacher"
    if not (teacher / "config.json").is_file():
        pytest.fail(f"the demo teacher is not in the repository ({teacher}); `make demo-teacher` builds it")
    r = subprocess.run([*stc_cmd, "demo", "--dry-run", f"run.out_dir={tmp_path / 'run'}"], cwd=ROOT,
                       env={**stc_env, "COLUMNS": "250"}, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for step in ("importance", "prune-25", "prune-50", "cache", "distill-kd-25", "distill-ce-25", "export-kd-25",
                 "eval-teacher-shuffled", "eval-middle-25", "eval-kd-38", "eval-kd-50", "importance-audio",
                 "prune-25-a50", "eval-kd-25-a50", "report"):
        assert step in out, step
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.safetensors"))
