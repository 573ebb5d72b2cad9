"""``stc evaluate``: translate a test split with one or more models, score it, measure size and speed.

For every system (``evaluate.models``: ``path`` or ``name=path`` entries; default ``model.path``)
the stage writes ``<evaluate.out>/<name>/``:

* ``hypotheses.jsonl``: one line per sample in split order (shard name, then tar order):
  ``key, src_lang, tgt_lang, src_text, ref, hyp`` (+ ``audio_from`` with ``shuffle_audio``);
* ``scores.json`` (schema 1, see :data:`SCORES_SCHEMA_DOC`): per direction sacrebleu corpus BLEU, chrF
  and chrF++ with their signatures, the primary metric (chrF++; chrF for spaceless targets, as the
  importance selector), optional COMET, echo/wrong-language/empty rates; model size; speed;
* ``meta.json`` (kind ``eval``) and the resolved ``config.yaml``.

``scores.json`` is written last, so its presence marks a finished system. A rerun skips a system
whose ``scores.json`` carries the same fingerprint (model weights + tokenizer, the split's shards and
selected keys, and every setting that changes a hypothesis: prompt, batch size, decoding, dtype/quant,
audio shuffling) and recomputes it otherwise. The world size is not part of it: results do not
depend on it (below).

Ranks. Samples are sorted by length and cut into batches of ``evaluate.batch_size`` *before* the
ranks split the work; whole batches go to ranks round-robin. A sample therefore sees the same batch
neighbours (the same left padding) on 1 or N ranks, so greedy outputs are identical whatever the
world size (tested). Hypotheses are gathered to rank 0, which scores and writes.

Speed (``speed`` in ``scores.json``), two different figures kept apart:

* **throughput at batch ``evaluate.batch_size``** (``speed.batch_size``): ``seconds`` is the wall time of
  the batched inference (audio encoder + generation, timed per batch, the slowest rank's sum);
  ``sentences_per_s`` and ``tokens_per_s`` (generated tokens up to the stop token) are per ``seconds`` of
  wall time; ``batch_seconds_per_sentence`` = summed rank time / sentences (the cost of one sentence
  when batched as configured; not a latency).
* **latency at batch 1**: with ``evaluate.latency_samples`` = N > 0, rank 0 translates the first N
  samples of the split (split order) one at a time at batch size 1, after one untimed warm-up
  translation, each timed from prompt preparation to the decoded string (CUDA synchronised).
  ``latency_s`` is the mean seconds per sentence, ``latency_p50_s`` the median and
  ``latency_samples`` the number timed. With N = 0 these three are null. These translations are
  timing only: they are not scored, and the setting is not part of the fingerprint (it changes no
  hypothesis), so changing it alone does not recompute a finished system.

Diagnostics, per direction, as shares of all its samples (rules in :func:`is_copy` and
:func:`is_wrong_language`): ``copy_source_rate`` (the model echoed the source), ``wrong_language_rate``
(the output is not in the target language by a script/stopword heuristic) and ``empty_rate``.
"""
from __future__ import annotations

import json
import re
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import config as cfg
from . import compat, dist, langs, log, stages
from .data.stream import StreamError, shards_from_meta
from .errors import StcError
from .importance import devset as D
from .importance import scorers as SC
from .importance.devset import ImportanceError
from .io import atomic_open, atomic_write_json
from .meta import (build_meta, fingerprint_feature_extractor, fingerprint_model, fingerprint_obj,
                   fingerprint_tokenizer, write_meta)
from .models import families
from .models.counts import param_counts, storage_bytes
from .models.load import ModelLoadError, check_model_dir, detect_kind, is_quantized, load_model, load_processor

SCORES = "scores.json"
HYPOTHESES = "hypotheses.jsonl"
SCHEMA = 1
COPY_CHRF = 80.0          # sentence chrF(hyp, [src]) at or above this counts as a copy of the source
SCRIPT_SHARE = 0.5        # share of letters that decides the script of a hypothesis
_WHITESPACE_TOKENIZERS = ("13a", "intl", "none")  # useless for scripts written without spaces

SCORES_SCHEMA_DOC = """{"schema": 1, "system", "model", "split", "n", "shuffle_audio", "fingerprint",
 "directions": {"en-de": {"n", "bleu": {"score", "signature"}, "chrf": {...}, "chrfpp": {...},
   "comet": {"score"} | {"skipped": reason}, "primary": {"metric", "score"},
   "copy_source_rate", "wrong_language_rate", "empty_rate"}},
 "model_info": {"decoder_layers", "params_total", "params_stored", "storage_bytes", "quant", "dtype"},
 "speed": {"seconds", "batch_size", "batch_seconds_per_sentence", "sentences_per_s", "tokens_per_s",
   "generated_tokens", "latency_s", "latency_p50_s", "latency_samples", "device", "world_size", "per_rank"},
 "hypotheses": "hypotheses.jsonl", "skipped": [[key, reason]], "warnings": [...]}"""


class EvalError(StcError, ValueError):
    """A problem with the evaluation inputs; the message names the config key and the fix."""


# ============================================================================================ heuristics

def normalise(text: str) -> str:
    """Casefolded, NFKC, punctuation and symbols dropped, whitespace collapsed (for copy detection)."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = "".join(" " if unicodedata.category(c)[0] in "PSZ" else c for c in t)
    return re.sub(r"\s+", " ", t).strip()


def is_copy(hyp: str, src: str) -> bool:
    """The hypothesis echoes the source text: equal after :func:`normalise`, or a sentence chrF of the
    hypothesis against the source of at least ``COPY_CHRF`` (80): a near copy with a changed word or
    punctuation. Empty hypotheses or sources are never copies (an empty output is counted apart)."""
    h, s = normalise(hyp), normalise(src)
    if not h or not s:
        return False
    if h == s:
        return True
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(hyp, [src]).score >= COPY_CHRF


def _is_cjk(c: str) -> bool:
    o = ord(c)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2A6DF or 0xF900 <= o <= 0xFAFF
            or 0x3040 <= o <= 0x30FF or 0xAC00 <= o <= 0xD7AF)  # Han, kana, Hangul


def cjk_share(text: str) -> float | None:
    """Share of CJK characters among the letters (``str.isalpha``) of ``text``; None without letters."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    return sum(_is_cjk(c) for c in letters) / len(letters)


# Small lists of frequent function words; enough to tell which of these languages a sentence is in.
STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the a an and of to is are was were in on for with that this it be not you we they have has "
                    "will would can at from by or but".split()),
    "de": frozenset("der die das und ist sind war nicht ein eine einen dem den des zu mit von für auf ich wir sie es "
                    "im auch sich wird werden hat haben dass oder aber".split()),
    "fr": frozenset("le la les et est sont un une des du de pas que qui dans pour avec sur nous vous il elle".split()),
    "es": frozenset("el la los las y es son un una del de que en para con por no se lo su al".split()),
}


def stopword_counts(text: str) -> dict[str, int]:
    words = re.findall(r"[^\W\d_]+", text.casefold())
    return {lang: sum(w in sw for w in words) for lang, sw in STOPWORDS.items()}


def is_wrong_language(hyp: str, tgt_lang: str) -> bool:
    """The hypothesis is evidently not in ``tgt_lang``. Rules, on non-empty hypotheses with letters:
    * spaceless target (zh, ja: :attr:`engine.langs.Language.spaceless`): wrong when under half of its
      letters are CJK (Han, kana, Hangul), e.g. an English echo;
    * any other target: wrong when over half of its letters are CJK;
    * a target with a stopword list (en, de, fr, es): also wrong when another listed language's
      stopwords occur at least twice and more often than the target's (English output for a German
      target). Scripts besides Latin/CJK are not checked.
    """
    share = cjk_share(hyp)
    if share is None:
        return False
    if langs.get(tgt_lang).spaceless:
        return share < SCRIPT_SHARE
    if share > SCRIPT_SHARE:
        return True
    if tgt_lang not in STOPWORDS:
        return False
    counts = stopword_counts(hyp)
    own = counts[tgt_lang]
    return any(n >= 2 and n > own for lang, n in counts.items() if lang != tgt_lang)


# ============================================================================================ scoring

def bleu_tokenizer(tgt_lang: str, forced: str) -> tuple[str, str | None]:
    """(sacrebleu tokenize, warning or None). ``auto``: the language table's (zh for Chinese, 13a else).
    A whitespace tokenizer forced on a spaceless target would score whole sentences as one word: the
    language's own tokenizer is used instead, with a warning naming the setting."""
    own = langs.get(tgt_lang).bleu_tokenize
    if forced == "auto":
        return own, None
    if langs.get(tgt_lang).spaceless and forced in _WHITESPACE_TOKENIZERS:
        return own, (f"evaluate.bleu_tokenize={forced} splits on spaces, but {tgt_lang} is written without "
                     f"them: BLEU for *-{tgt_lang} uses tokenize={own!r} instead")
    return forced, None


def direction_scores(hyps: Sequence[str], refs: Sequence[str], srcs: Sequence[str], tgt_lang: str,
                     tokenize: str) -> dict[str, Any]:
    """sacrebleu corpus BLEU / chrF / chrF++ (with signatures), the primary metric and the diagnostics."""
    from sacrebleu.metrics import BLEU, CHRF

    hyps, rr = list(hyps), [list(refs)]
    out: dict[str, Any] = {"n": len(hyps)}
    for name, metric in (("bleu", BLEU(tokenize=tokenize)), ("chrf", CHRF()), ("chrfpp", CHRF(word_order=2))):
        try:
            score = metric.corpus_score(hyps, rr).score
        except Exception as e:  # e.g. ja-mecab without its dictionary installed
            raise EvalError(f"sacrebleu {name} (tokenize={tokenize!r}) failed: {e}; install its extra or set "
                            f"evaluate.bleu_tokenize") from None
        out[name] = {"score": float(score), "signature": str(metric.get_signature())}
    spaceless = langs.get(tgt_lang).spaceless
    out["primary"] = {"metric": "chrf" if spaceless else "chrf++",
                      "score": out["chrf" if spaceless else "chrfpp"]["score"]}
    n = max(1, len(hyps))
    out["copy_source_rate"] = sum(is_copy(h, s) for h, s in zip(hyps, srcs)) / n
    out["wrong_language_rate"] = sum(is_wrong_language(h, tgt_lang) for h in hyps) / n
    out["empty_rate"] = sum(not h.strip() for h in hyps) / n
    return out


def comet_scores(comet_model: str, rows_by_dir: dict[str, list[dict]], device: str) -> tuple[dict[str, dict], str | None]:
    """COMET system score per direction, or ``{"skipped": reason}`` for all. Never downloads: runs only
    when the ``comet`` package imports and ``comet_model`` is an existing local checkpoint."""
    def skip(reason: str) -> tuple[dict[str, dict], str | None]:
        return {d: {"skipped": reason} for d in rows_by_dir}, None

    if not comet_model:
        return skip("evaluate.comet_model not set")
    try:
        from comet import load_from_checkpoint
    except ImportError:
        return skip("the comet package (unbabel-comet) is not installed")
    p = Path(comet_model).expanduser()
    ckpt = p if p.is_file() else next(iter(sorted(p.glob("checkpoints/*.ckpt"))), None) if p.is_dir() else None
    if ckpt is None:
        return skip(f"evaluate.comet_model={comet_model} is not a local checkpoint (never downloaded)")
    try:
        m = load_from_checkpoint(str(ckpt))
        out = {}
        for d, rows in rows_by_dir.items():
            data = [{"src": r["src_text"], "mt": r["hyp"], "ref": r["ref"]} for r in rows]
            res = m.predict(data, batch_size=16, gpus=1 if device.startswith("cuda") else 0, progress_bar=False)
            out[d] = {"score": float(res.system_score)}
        return out, None
    except Exception as e:  # a broken checkpoint must not lose the other scores
        reason = f"COMET failed: {type(e).__name__}: {e}"
        return {d: {"skipped": reason} for d in rows_by_dir}, reason


# ============================================================================================ plan

@dataclass(frozen=True)
class System:
    name: str
    path: Path
    key: str                 # the config key the path came from, for messages


def systems(recipe: cfg.Recipe) -> list[System]:
    """The systems to evaluate (:func:`engine.stages.evaluate_systems`), each checked to be a loadable model
    directory (before anything heavy)."""
    entries = stages.evaluate_systems(recipe)
    if not entries:
        raise EvalError("nothing to evaluate: set evaluate.models=[name=path,...] (or model.path) to local "
                        "model directories")
    out: list[System] = []
    for name, path, k in entries:
        try:
            p = check_model_dir(path)
        except ModelLoadError as err:
            raise EvalError(f"{k}: {err}. Fix the path, or list the systems as "
                            f"evaluate.models=[name=/path/to/model,...]") from None
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise EvalError(f"{k}: system name {name!r} must be a plain folder name ([A-Za-z0-9_.+-]); "
                            f"write the entry as name=path")
        if any(s.name == name for s in out):
            raise EvalError(f"{k}: two systems are named {name!r}; name them: evaluate.models=[a={path},...]")
        out.append(System(name, p, k))
    return out


def out_dir(recipe: cfg.Recipe) -> Path:
    return stages.out_dir("evaluate", recipe)


def test_split(recipe: cfg.Recipe) -> str:
    return recipe.evaluate.split or recipe.data.test_split


def split_infos(shard_dir: str, split: str) -> list:
    try:
        meta = D._shard_meta(shard_dir)
        infos = shards_from_meta(meta, split, source=str(Path(shard_dir) / "meta.json"))
    except (ImportanceError, StreamError) as e:
        raise EvalError(str(e)) from None
    if not infos:
        have = sorted({str(r.get("split")) for r in meta.get("shards", [])})
        raise EvalError(f"{shard_dir} has no shards of the test split {split!r} (splits there: "
                        f"{', '.join(have) or 'none'}); set evaluate.split (or data.test_split) to one of them")
    return infos


def check_dev_disjoint(recipe: cfg.Recipe, split: str, samples: Sequence[Any]) -> list[str]:
    """Refuse a test split that shares keys or normalised source texts with ``data.dev_split`` (the split
    layers were selected on). Returns notes to log. ``evaluate.dev_split_check=false`` skips it."""

    dev = recipe.data.dev_split
    off = "; set evaluate.dev_split_check=false only if you knowingly report on data the model was selected on"
    if not recipe.evaluate.dev_split_check:
        return [f"dev/test overlap not checked (evaluate.dev_split_check=false): scores on {split!r} may be "
                f"optimistic if it overlaps the dev split {dev!r}"]
    if dev == split:
        raise EvalError(f"evaluate.split {split!r} is also the dev split (data.dev_split={dev!r}) that layers "
                        f"are selected on: its scores would be optimistic; evaluate a held-out split{off}")
    d = Path(recipe.data.shards)
    dev_infos = shards_from_meta(D._shard_meta(d), dev, source=str(d / "meta.json"))
    if not dev_infos:
        return [f"no dev split {dev!r} in {d}: dev/test overlap not checked"]
    dev_rows = [(k, js) for s in dev_infos for k, js in D._json_members(d, s)]
    dev_keys = {k for k, _ in dev_rows}
    shared = sorted(s.key for s in samples if s.key in dev_keys)
    if shared:
        raise EvalError(f"the test split {split!r} shares {len(shared)} key(s) with the dev split {dev!r} "
                        f"(data.dev_split) (e.g. {', '.join(shared[:3])}): scores on it would be optimistic; "
                        f"rebuild the shards with disjoint splits{off}")
    dev_src = {D._norm_text(js.get("src_text", "")): k for k, js in dev_rows}
    dev_src.pop("", None)
    same = [(s.key, dev_src[n]) for s in samples
            if (n := D._norm_text(s.meta.get("src_text", ""))) and n in dev_src]
    if same:
        ex = ", ".join(f"test {t} = dev {dv}" for t, dv in same[:3])
        raise EvalError(f"{len(same)} sample(s) of the test split {split!r} have a source text that is also in the "
                        f"dev split {dev!r} (data.dev_split) (e.g. {ex}): the same sentence would be selected on "
                        f"and reported on; remove the duplicates from one split{off}")
    return []


def _length_key(s: Any) -> tuple:
    return D._length_key(s)


def make_batches(samples: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Indices of ``samples`` in length-sorted batches, formed for all ranks at once."""
    order = sorted(range(len(samples)), key=lambda i: _length_key(samples[i]))
    return [order[a:a + batch_size] for a in range(0, len(order), batch_size)]


def derangement(n: int, seed: int) -> list[int]:
    """``perm[i] != i`` for all i (n >= 2): a seeded shuffle, each element mapped to the next in it."""

    if n < 2:
        raise EvalError("evaluate.shuffle_audio needs at least 2 samples")
    order = np.random.RandomState(seed).permutation(n).tolist()
    perm = [0] * n
    for a, b in zip(order, order[1:] + order[:1]):
        perm[a] = b
    return perm


def _model_config(recipe: cfg.Recipe, path: Path) -> tuple[cfg.ModelConfig, str]:
    """ModelConfig for a system, and its quantisation as stored: a directory saved in nf4 carries its
    quantization_config in config.json and is loaded as saved (model.quant then does not apply)."""
    c = json.loads((path / "config.json").read_text(encoding="utf-8"))
    qc = c.get("quantization_config") or {}
    if qc:
        quant = "int8" if qc.get("load_in_8bit") else str(qc.get("bnb_4bit_quant_type") or qc.get("quant_method")
                                                            or "quantized")
        return replace(recipe.model, path=str(path), quant="none"), quant
    return replace(recipe.model, path=str(path)), recipe.model.quant


def decoder_layers(path: Path) -> int:
    c = json.loads((path / "config.json").read_text(encoding="utf-8"))
    t = families.text_config_dict(c)
    return int(t.get("num_hidden_layers") or 0)


def fingerprint(recipe: cfg.Recipe, sysm: System, infos: Sequence[Any], split: str, quant: str) -> tuple[str, dict]:
    ec, d = recipe.evaluate, recipe.data
    settings = {"batch_size": ec.batch_size, "max_new_tokens": ec.max_new_tokens, "num_beams": ec.num_beams,
                "bleu_tokenize": ec.bleu_tokenize, "comet_model": ec.comet_model,
                "shuffle_audio": ec.shuffle_audio, "seed": recipe.run.seed if ec.shuffle_audio else None,
                "dtype": recipe.model.dtype, "quant": quant, "attn": recipe.model.attn_implementation,
                "max_audio_s": d.max_audio_s, "system_prompt": d.system_prompt, "instruction": d.instruction,
                "text_instruction": d.text_instruction}
    fps = {"model": fingerprint_model(sysm.path), "tokenizer": fingerprint_tokenizer(sysm.path),
           "features": fingerprint_feature_extractor(sysm.path),
           "data": D.dev_fingerprint(infos, split, ec.max_samples), "settings": fingerprint_obj(settings)}
    return fingerprint_obj(fps), fps


# ============================================================================================ run

def run_evaluate(recipe: cfg.Recipe) -> dict[str, dict]:
    """Evaluate every system; returns {name: scores document} (on rank 0; {} elsewhere)."""
    with dist.session() as env:
        return _run(recipe, env)


def _agree(error: str | None) -> None:
    dist.agree(error, EvalError)


def _run(recipe: cfg.Recipe, env: dist.DistEnv) -> dict[str, dict]:
    ec = recipe.evaluate
    out = out_dir(recipe)
    lg = log.setup(recipe.run.log_level, out, progress_s=recipe.run.progress_s)
    if recipe.run.threads > 0:
        torch.set_num_threads(recipe.run.threads)
    if not recipe.data.shards:
        raise EvalError("data.shards is empty: point it at a directory written by `stc shards build`")
    # Cheap checks on every rank (same files, same answers): models, split, samples, dev/test overlap.
    syss = systems(recipe)
    split = test_split(recipe)
    infos = split_infos(recipe.data.shards, split)

    kinds = {s.name: detect_kind(s.path) for s in syss}
    data = replace(recipe.data, dev_split=split)
    samples_by_audio: dict[bool, tuple[list, list]] = {}
    try:
        for audio in sorted({families.get(k).audio for k in kinds.values()}):
            samples_by_audio[audio] = D.read_dev(recipe.data.shards, data, ec.max_samples, audio)
    except D.ImportanceError as e:
        raise EvalError(str(e)) from None
    notes: list[str] = []
    for samples, _ in samples_by_audio.values():
        if not samples:
            raise EvalError(f"the test split {split!r} of {recipe.data.shards} has no usable samples")
        notes = check_dev_disjoint(recipe, split, samples)
    if env.is_main:
        for n in notes:
            lg.warning(n)
    results: dict[str, dict] = {}
    for s in syss:
        samples, skipped = samples_by_audio[families.get(kinds[s.name]).audio]
        doc = _evaluate_system(recipe, env, s, split, infos, list(samples), list(skipped), notes, lg)
        if doc is not None:
            results[s.name] = doc
    if env.is_main and results:
        print_summary(results, out)
    dist.barrier()
    return results


def _evaluate_system(recipe: cfg.Recipe, env: dist.DistEnv, s: System, split: str, infos: list,
                     samples: list, skipped: list, notes: list[str], lg: Any) -> dict | None:


    ec = recipe.evaluate
    sdir = out_dir(recipe) / s.name
    mcfg, quant = _model_config(recipe, s.path)
    fp, fps = fingerprint(recipe, s, infos, split, quant)
    prev = None
    if env.is_main and (sdir / SCORES).exists() and (sdir / HYPOTHESES).exists():
        try:
            prev = json.loads((sdir / SCORES).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            prev = None
    done = dist.broadcast_object(bool(prev) and prev.get("fingerprint") == fp)
    if done:
        if env.is_main:
            lg.info(f"{s.name}: {sdir / SCORES} is up to date (same model, data and settings); skipped")
        return prev

    warnings = list(notes)
    if ec.shuffle_audio:
        perm = derangement(len(samples), recipe.run.seed)
        audio_from = {samples[i].key: samples[perm[i]].key for i in range(len(samples))}
        samples = [replace(samples[i], audio=samples[perm[i]].audio, sample_rate=samples[perm[i]].sample_rate)
                   for i in range(len(samples))]
    else:
        audio_from = {}
    batches = make_batches(samples, ec.batch_size)
    mine = batches[env.rank::env.world_size]

    device = dist.device() if recipe.run.device != "cpu" else torch.device("cpu")
    if recipe.run.device == "cuda" and device.type != "cuda":
        raise EvalError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    err = None
    try:
        model = load_model(mcfg, device=device if device.type == "cuda" else None)
        processor = load_processor(s.path)
    except Exception as e:
        err = f"{s.key}: cannot load {s.path}: {e}"
    _agree(err)
    tok = getattr(processor, "tokenizer", processor)
    b = D.prompt_builder(processor, recipe.data)
    gen_cfg = SC.generation_config(model, b.end_id, b.pad_id, ec.max_new_tokens)
    if ec.num_beams > 1:
        gen_cfg.num_beams = ec.num_beams
    stop = set(int(e) for e in gen_cfg.eos_token_id)

    local: list[tuple[int, str, int]] = []     # (sample index, hypothesis, generated tokens)
    bad: list[tuple[str, str]] = []
    secs = 0.0
    with log.progress() as prog:
        task = prog.task(f"evaluate {s.name}", total=len(mine), unit="batches")
        for idx in mine:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dev = D.prepare(model, processor, [samples[i] for i in idx], recipe.data, batch_size=len(idx),
                            teacher_forced=False, prompt_only=True)
            bad.extend(dev.skipped)
            pos = {samples[i].key: i for i in idx}
            for batch in dev.batches:
                with torch.inference_mode():
                    seqs = compat.generate_from_embeds(model, batch.gen_embeds, batch.gen_mask,
                                                       generation_config=gen_cfg)
                hyps = SC.decode_new_tokens(tok, seqs, gen_cfg.eos_token_id)
                for k, h, row in zip(batch.keys, hyps, seqs.tolist()):
                    local.append((pos[k], h, next((j for j, t in enumerate(row) if t in stop), len(row))))
            if device.type == "cuda":
                torch.cuda.synchronize()
            secs += time.perf_counter() - t0
            task.advance(1, sentences=len(local))
    gathered = dist.all_gather_object({"rows": local, "skipped": bad, "seconds": secs, **dist.provenance()})
    if not env.is_main:
        del model
        dist.barrier()
        return None
    lat = batch1_latency(model, processor, tok, samples, recipe.data, gen_cfg, device, ec.latency_samples)

    rows_by_idx = {i: (h, n) for g in gathered for i, h, n in g["rows"]}
    skipped = skipped + [tuple(x) for g in gathered for x in g["skipped"]]
    rows = []
    for i, smp in enumerate(samples):
        if i not in rows_by_idx:
            continue
        m = smp.meta
        r = {"key": smp.key, "src_lang": m["src_lang"], "tgt_lang": m["tgt_lang"], "src_text": m.get("src_text", ""),
             "ref": m["tgt_text"], "hyp": rows_by_idx[i][0]}
        if audio_from:
            r["audio_from"] = audio_from[smp.key]
        rows.append(r)
    if not rows:
        raise EvalError(f"{s.name}: no sample of split {split!r} could be translated "
                        f"({'; '.join(f'{k}: {r}' for k, r in skipped[:3])})")
    for k, r in skipped:
        warnings.append(f"sample {k} skipped: {r}")
    by_dir: dict[str, list[dict]] = {}
    for r in rows:
        by_dir.setdefault(f"{r['src_lang']}-{r['tgt_lang']}", []).append(r)
    directions: dict[str, dict] = {}
    for d, rs in sorted(by_dir.items()):
        tgt = rs[0]["tgt_lang"]
        tk, warn = bleu_tokenizer(tgt, ec.bleu_tokenize)
        if warn:
            lg.warning(warn)
            warnings.append(warn)
        directions[d] = direction_scores([r["hyp"] for r in rs], [r["ref"] for r in rs],
                                         [r["src_text"] for r in rs], tgt, tk)
    comet, comet_err = comet_scores(ec.comet_model, by_dir, str(device))
    if comet_err:
        lg.warning(comet_err)
        warnings.append(comet_err)
    for d in directions:
        directions[d]["comet"] = comet[d]
    trim_warn = trimmed_vocab_warning(s.path, split)
    if trim_warn:
        lg.warning(f"{s.name}: {trim_warn}")
        warnings.append(trim_warn)
    counts = param_counts(model)
    n_tok = sum(n for _, n in rows_by_idx.values())
    wall = max(g["seconds"] for g in gathered)
    total = sum(g["seconds"] for g in gathered)
    dtype = str(getattr(model, "dtype", "")).replace("torch.", "")
    doc = {
        "schema": SCHEMA, "system": s.name, "model": str(s.path), "split": split, "n": len(rows),
        "shuffle_audio": bool(ec.shuffle_audio), "fingerprint": fp, "directions": directions,
        "model_info": {"decoder_layers": decoder_layers(s.path), "params_total": counts["total"],
                       "params_stored": counts["stored"], "storage_bytes": storage_bytes(s.path),
                       "quant": quant if is_quantized(model) else "none", "dtype": dtype},
        "speed": {"seconds": round(wall, 6), "batch_size": ec.batch_size,
                  "batch_seconds_per_sentence": total / len(rows),
                  "sentences_per_s": len(rows) / wall if wall > 0 else 0.0,
                  "tokens_per_s": n_tok / wall if wall > 0 else 0.0, "generated_tokens": n_tok,
                  **lat, "device": str(device), "world_size": env.world_size,
                  "per_rank": [{k: g[k] for k in ("rank", "host", "pid", "seconds")} | {"n": len(g["rows"])}
                               for g in gathered]},
        "decoding": {"num_beams": ec.num_beams, "max_new_tokens": ec.max_new_tokens, "batch_size": ec.batch_size},
        "hypotheses": HYPOTHESES, "skipped": [list(x) for x in skipped], "warnings": warnings,
    }
    del model
    sdir.mkdir(parents=True, exist_ok=True)
    with atomic_open(sdir / HYPOTHESES, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    write_meta(sdir, build_meta("eval", fingerprints=fps, config=recipe, system=s.name, model=str(s.path),
                                split=split, scores=SCORES, hypotheses=HYPOTHESES))
    cfg.save_resolved(recipe, sdir)
    atomic_write_json(sdir / SCORES, doc)  # last: its presence marks the system finished
    lg.info(f"{s.name}: {len(rows)} sentences in {wall:.2f}s on {env.world_size} rank(s); wrote {sdir}")
    dist.barrier()
    return doc


def trimmed_vocab_warning(model_dir: str | Path, split: str) -> str | None:
    """A warning when ``model_dir`` holds a vocabulary-trimmed export (``vocab_map.json``) under which
    texts of ``split`` no longer encode as before trimming (the export's check of that split); None
    otherwise. Such a system is not scored on the untrimmed model's inputs: a dropped token falls back
    to smaller pieces."""
    p = Path(model_dir) / "vocab_map.json"
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return f"{p} is not readable JSON: cannot tell whether the trimmed vocabulary encodes the {split!r} split"
    v = (doc.get("verify") or {}).get(split)
    if not isinstance(v, dict):
        return (f"vocabulary trimmed to {doc.get('new_vocab_size')} tokens, but the export did not check the "
                f"{split!r} split: some of its texts may encode differently than before trimming")
    if not v.get("differ"):
        return None
    return (f"vocabulary trimmed from {doc.get('old_vocab_size'):,} to {doc.get('new_vocab_size'):,} tokens: "
            f"{v['differ']} of {v['sentences']} texts of the {split!r} split (prompts, sources, references) encode "
            f"differently than before trimming ({v.get('tokens_old'):,} -> {v.get('tokens_new'):,} tokens; a "
            f"dropped token falls back to smaller pieces), so this system does not see the untrimmed model's "
            f"inputs; trim with a corpus that covers the languages, not only the train split")


def batch1_latency(model: Any, processor: Any, tok: Any, samples: Sequence[Any], data: cfg.DataConfig,
                   gen_cfg: Any, device: torch.device, n: int) -> dict[str, Any]:
    """Latency at batch size 1 (rank 0 only): one untimed warm-up translation of the first sample, then
    each of the first ``n`` samples (split order) prepared, generated and decoded alone, timed from
    prompt preparation to the decoded string. Returns ``latency_s`` (mean seconds per sentence),
    ``latency_p50_s`` (median) and ``latency_samples`` (how many were timed; samples that cannot be
    prompted are passed over); all null when ``n`` is 0."""
    none = {"latency_s": None, "latency_p50_s": None, "latency_samples": 0}
    if n <= 0 or not samples:
        return none

    def one(smp: Any) -> bool:
        dev = D.prepare(model, processor, [smp], data, batch_size=1, teacher_forced=False, prompt_only=True)
        for batch in dev.batches:
            with torch.inference_mode():
                seqs = compat.generate_from_embeds(model, batch.gen_embeds, batch.gen_mask, generation_config=gen_cfg)
            SC.decode_new_tokens(tok, seqs, gen_cfg.eos_token_id)
        return bool(dev.batches)

    chosen = list(samples[:n])
    one(chosen[0])                                     # warm-up: kernels, caches, lazy initialisation
    times: list[float] = []
    for smp in chosen:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ok = one(smp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if ok:
            times.append(time.perf_counter() - t0)
    if not times:
        return none
    return {"latency_s": float(np.mean(times)), "latency_p50_s": float(np.median(times)),
            "latency_samples": len(times)}


def print_summary(results: dict[str, dict], out: Path) -> None:
    """One row per system and direction (rank 0)."""
    from rich.table import Table

    t = Table(title=f"stc evaluate: {out}")
    for c in ("system", "dir", "n", "BLEU", "chrF", "chrF++", "rates %", "layers", "MB", "sent/s"):
        t.add_column(c, justify="left" if c in ("system", "dir") else "right")
    for name, doc in results.items():
        mi, sp = doc["model_info"], doc["speed"]
        for d, r in doc["directions"].items():
            rates = "/".join(f"{100 * r[k]:.0f}" for k in ("copy_source_rate", "wrong_language_rate", "empty_rate"))
            t.add_row(name, d, str(r["n"]), f"{r['bleu']['score']:.1f}", f"{r['chrf']['score']:.1f}",
                      f"{r['chrfpp']['score']:.1f}", rates, str(mi["decoder_layers"]),
                      f"{mi['storage_bytes'] / 1e6:.1f}", f"{sp['sentences_per_s']:.2f}")
    log.console.print(t)
    log.console.print(f"rates: copy-source/wrong-language/empty; primary metric: chrF++ (chrF for spaceless "
                      f"targets); files: {out}/<system>/{SCORES}, {HYPOTHESES}")


def dry_run(recipe: cfg.Recipe) -> None:
    """``stc evaluate --dry-run``: the systems, the split and the dev/test check; nothing is loaded."""
    syss = systems(recipe)
    split = test_split(recipe)
    infos = split_infos(recipe.data.shards, split)
    n = sum(i.n for i in infos)
    print(f"evaluate (dry run): {', '.join(f'{s.name}={s.path}' for s in syss)} on split {split!r} of "
          f"{recipe.data.shards} ({n} samples"
          f"{f', first {recipe.evaluate.max_samples}' if recipe.evaluate.max_samples else ''}); "
          f"{'beam ' + str(recipe.evaluate.num_beams) if recipe.evaluate.num_beams > 1 else 'greedy'}; "
          f"out {out_dir(recipe)}")


def main(recipe: cfg.Recipe, args: Any) -> int:
    if getattr(args, "dry_run", False):
        dry_run(recipe)
        return 0
    run_evaluate(recipe)
    return 0
