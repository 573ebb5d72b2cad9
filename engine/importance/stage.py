"""``stc importance`` and ``stc prune``: the stage functions the CLI calls.

``stc importance`` (any number of ranks): validate the plan before anything heavy, check dev/test
separation, read the journal(s), load the model once per rank, prepare the dev set (audio encoder
once), run the search, then rank 0 writes ``ranking.json``, ``ranking.md``, ``importance.png``,
``meta.json`` (kind ``journal``) and ``config.yaml`` into ``importance.out``. The task scorer also
keeps every scored model's translations: ``hypotheses/<unit>.jsonl``, one line per dev sample (key,
target language, reference, hypothesis), named in the unit's journal record and in ``ranking.json``.

``importance.component=audio`` scans the audio encoder's layers instead (audio-language models only;
a text-only model is refused before any weight is read): ``remove``/``protect``/``force_remove``/
``target_layers`` count audio layers, each scored model's decoder inputs are recomputed through the
encoder without its layers (:func:`engine.importance.scorers.iter_audio_scores`), dev samples without
audio are skipped (they cannot tell audio layers apart), and the journal header and records,
``ranking.json`` and ``meta.json`` carry ``component: audio``, with ``removed_original`` /
``kept_original`` in the original audio-layer numbering (``stc_original_audio_layers``).

One ranking per ``importance.out``: a scan of another component, or with another method, scorer or
metric than the ranking already there, is refused (its ``ranking.json`` would silently replace the
other, and ``stc prune --from`` the directory would then remove other layers); give it its own
``importance.out``.

Stopping: SIGTERM/SIGUSR1 during a scan set a flag; the scan stops at the next dev batch or unit,
the ranks agree, and the stage raises :class:`engine.errors.Resumable` (exit 75; finished units stay
in the journal, the unit in flight is recomputed by the rerun). A second signal stops at once. A
signal that comes after the scan finished lets the outputs be written (exit 0). Test hook:
``STC_SIGNAL_AFTER_UNITS=<n>[:<rank>]`` makes that rank (default 0) send itself SIGTERM after it
journaled its n-th unit of the run, as a scheduler would.

``stc prune`` (rank 0): remove the layers of a ranking (or ``--layers``) with
:func:`engine.models.surgery.drop_layers` and save a model that plain ``transformers`` reloads, with
``meta.json`` (kind ``model``) recording kept/removed original layers and parameter/storage counts.
A ranking of the audio encoder (``component: audio``) removes audio-encoder layers (the first
``prune.count`` of its removal order, or all) and no decoder layer; ``meta.json`` then records them
under ``pruned.audio_removed`` (indices of the source model) and ``audio_removed_original`` /
``audio_kept_original`` (original numbering), and the saved ``audio_config.encoder_layers`` counts
the kept ones. ``prune.audio_ranking`` (``--audio-from``) takes the audio layers from an audio ranking
of the same model (the first ``prune.audio_count``, or all) while ``prune.ranking`` or
``prune.layers`` gives the decoder layers: both components pruned in one step, each by its own scan.
The weights are saved in ``prune.dtype``; ``auto`` keeps the source checkpoint's dtype (its
safetensors, else ``config.json``), whatever ``model.dtype`` an importance scan used, so a bf16
checkpoint stays bf16 and the pruned model is smaller than its source.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import struct
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import config as cfg
from .. import dist, log, stages
from ..errors import Resumable
from ..io import atomic_write_text
from ..meta import (MetaError, build_meta, fingerprint_feature_extractor, fingerprint_model, fingerprint_obj,
                    fingerprint_prompt, fingerprint_tokenizer, read_meta, write_meta)
from ..models import surgery
from ..models.counts import param_counts, storage_bytes
from ..models import families
from ..models.load import ModelLoadError, check_model_dir, detect_kind, load_model, load_processor
from . import devset as D
from . import journal as J
from . import layers as L
from . import report, scorers, search
from .devset import ImportanceError

def out_dir(recipe: cfg.Recipe) -> Path:
    return stages.out_dir("importance", recipe)


def _model_info(model_dir: Path) -> tuple[int, list[int]]:
    """(decoder layers, original index of each) from config.json, without loading weights."""
    with open(model_dir / "config.json", encoding="utf-8") as f:
        c = json.load(f)
    t = families.text_config_dict(c)
    n = t.get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise ImportanceError(f"{model_dir}/config.json has no decoder layer count (num_hidden_layers)")
    orig = t.get(surgery.ORIGINAL_KEY) or list(range(n))
    return n, list(orig)


def _audio_info(model_dir: Path, key: str = "importance.component=audio") -> tuple[int, list[int]]:
    """(audio-encoder layers, original index of each) from config.json, without loading weights; a
    model without an audio encoder is refused naming ``key`` (what asked for audio layers)."""
    with open(model_dir / "config.json", encoding="utf-8") as f:
        c = json.load(f)
    fam = families.detect(c, str(model_dir))
    n = fam.audio_layer_count_of(c)
    if n is None:
        fix = "importance.component=decoder" if key.startswith("importance.") else "decoder layers only"
        raise ImportanceError(f"{key} needs audio-encoder layers, but {model_dir} ({fam.title}) has no audio encoder "
                              f"(config.json has no {fam.audio_config or 'audio_config'}."
                              f"{fam.audio_layer_count or 'encoder_layers'}): use an audio-language model, or {fix}")
    orig = fam.own_config(c)[fam.audio_config].get(surgery.ORIGINAL_AUDIO_KEY) or list(range(n))
    return n, list(orig)


def component_info(model_dir: Path, component: str) -> tuple[int, list[int]]:
    """(layers, original index of each) of the component a scan ranks, from config.json."""
    return _audio_info(model_dir) if component == "audio" else _model_info(model_dir)


def _check_model_dir(path: str) -> tuple[Path, str]:
    try:
        p = check_model_dir(path)
        return p, detect_kind(p)
    except ModelLoadError as e:
        raise ImportanceError(str(e)) from None


def prompt_fingerprint(processor: Any, data: cfg.DataConfig, audio: bool) -> str:
    """The rendered prompt + answer of one fixed example (text and ids)."""
    b = D.prompt_builder(processor, data)
    meta = {"src_lang": "en", "tgt_lang": "de", "src_text": "Good morning."}

    def render() -> Any:
        text = b.full_text(meta, "Guten Morgen.", audio=audio and b.is_audio)
        return {"text": text, "ids": b.tokenize(text)}

    return fingerprint_prompt(render)


def scorer_config(recipe: cfg.Recipe, metric: str) -> dict:
    """Everything besides model, prompt and data that changes a unit's score."""
    ic, mc = recipe.importance, recipe.model
    doc = {"scorer": ic.scorer, "metric": metric, "batch_size": ic.decode_batch_size, "dtype": mc.dtype,
           "quant": mc.quant, "attn_implementation": mc.attn_implementation, "max_audio_s": recipe.data.max_audio_s}
    if ic.component != "decoder":   # decoder journals written before the key existed stay valid
        doc["component"] = ic.component
    if ic.scorer == "task":
        doc["max_new_tokens"] = ic.max_new_tokens
    return doc


def _agree(error: str | None) -> None:
    """Raise the same error on every rank when any rank hit one (so no rank waits in a collective)."""
    dist.agree(error, ImportanceError)


def _compute_fn(scorer: str, model: Any, tokenizer: Any, dev: D.DevSet, metric: str, gen_cfg: Any,
                interrupt: scorers.Interrupt = None, component: str = "decoder"):
    def compute(units):
        groups: dict[tuple[int, ...], list] = {}
        for u in units:
            groups.setdefault(tuple(u.removed), []).append(u)
        for removed, us in groups.items():
            by_c = {u.candidate: u for u in us}
            if component == "audio":
                for c, sc in scorers.iter_audio_scores(model, tokenizer, dev, list(by_c), removed, scorer=scorer,
                                                       metric=metric, gen_cfg=gen_cfg, interrupt=interrupt):
                    yield by_c[c], sc
            elif scorer == "nll":
                for c, sc in scorers.iter_nll_scores(model, dev, list(by_c), removed, interrupt=interrupt):
                    yield by_c[c], sc
            elif scorer == "block_influence":
                res = scorers.block_influence_scores(model, dev, list(by_c), removed, interrupt=interrupt)
                yield from ((by_c[c], res[c]) for c in by_c)
            else:
                for c, sc in scorers.task_scores(model, tokenizer, dev, list(by_c), removed, metric=metric,
                                                 gen_cfg=gen_cfg, interrupt=interrupt):
                    yield by_c[c], sc
    return compute


def _cost_fn(scorer: str, num_layers: int, component: str = "decoder"):
    def cost(u: search.Unit) -> float:
        if scorer != "nll" or component == "audio":   # audio: every unit runs the encoder and the whole decoder
            return 1.0
        if u.candidate is None:
            return 0.5  # cheap: it continues from the prefix the rank's candidates reached
        return 1.0 + sum(1 for i in range(u.candidate + 1, num_layers) if i not in u.removed)
    return cost


# ------------------------------------------------------------------------------------------------ hypotheses

HYPOTHESES = "hypotheses"


def hypotheses_name(u: search.Unit, component: str = "decoder") -> str:
    """``hypotheses/it2-layer7-without-3.13.jsonl``: iteration 2, layer 7 removed from the model without
    layers 3 and 13; ``it0-model.jsonl``: the unpruned model (one file per unit key). An audio scan's
    candidates are ``audiolayer<i>``."""
    what = "model" if u.candidate is None else f"{'audio' if component == 'audio' else ''}layer{u.candidate}"
    rest = "-without-" + ".".join(str(r) for r in sorted(u.removed)) if u.removed else ""
    return f"{HYPOTHESES}/it{u.iteration}-{what}{rest}.jsonl"


def _hypotheses_writer(out: Path, dev: D.DevSet, component: str = "decoder"):
    """``Runner.annotate`` for the task scorer: write the unit's translations (before its journal record,
    so a journaled unit always has its file) and name the file in the record."""
    refs = [r for b in dev.batches for r in b.refs]

    def annotate(u: search.Unit, score: Any) -> dict:
        hyps = getattr(score, "hypotheses", None)
        if hyps is None:
            return {}
        name = hypotheses_name(u, component)
        atomic_write_text(out / name, "".join(
            json.dumps({"key": k, "tgt_lang": t, "ref": r, "hyp": h}, ensure_ascii=False) + "\n"
            for k, t, r, h in zip(dev.keys, dev.tgt_langs, refs, hyps)))
        return {"hypotheses": name}
    return annotate


def _annotate(out: Path, dev: D.DevSet, scorer: str, component: str):
    """``Runner.annotate``: the task scorer's translations file, and an audio scan's ``component`` (a
    record without it is a decoder unit)."""
    hyps = _hypotheses_writer(out, dev, component) if scorer == "task" else (lambda u, sc: {})
    if component == "decoder":
        return hyps
    return lambda u, sc: {"component": component, **hyps(u, sc)}


# ------------------------------------------------------------------------------------------------ stopping

SIGNAL_HOOK = "STC_SIGNAL_AFTER_UNITS"


class _Stop:
    """SIGTERM/SIGUSR1 while ``handling()``: the first sets the flag the runner and scorers poll, a
    second raises :class:`Resumable` at once."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> str | None:
        return self.signal

    def check(self) -> None:
        """The scorers' ``interrupt``: abandon the unit in flight once a stop was requested."""
        if self.signal is not None:
            raise search.StopScan(self.signal)

    def agree(self, where: str) -> None:
        """Raise :class:`Resumable` on every rank when any rank was asked to stop (a collective)."""
        if dist.any_flag(self.signal is not None):
            exc = Resumable(f"stopped by {self.signal or 'a signal to another rank'} {where}; finished units are "
                            f"kept in the journal: rerun the same command to continue")
            exc.agreed = True  # type: ignore[attr-defined]
            raise exc

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise Resumable(f"stopped by a second {name}; finished units are kept in the journal: rerun the same "
                            f"command to continue")
        self.signal = name
        log.get().warning(f"received {name}: stopping after the current dev batch; finished units stay in the "
                          f"journal (exit 75: rerun the same command to continue)")

    @contextlib.contextmanager
    def handling(self) -> Iterator["_Stop"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _signal_hook(rank: int) -> int | None:
    """``STC_SIGNAL_AFTER_UNITS=<n>[:<rank>]``: after how many units this rank signals itself (None: never)."""
    v = os.environ.get(SIGNAL_HOOK, "").strip()
    if not v:
        return None
    n, _, r = v.partition(":")
    try:
        return int(n) if int(r or 0) == rank else None
    except ValueError:
        raise ImportanceError(f"{SIGNAL_HOOK}={v!r}: expected <units>[:<rank>]") from None


# ------------------------------------------------------------------------------------------------ one ranking per out

def _check_same_ranking(out: Path, method: str, scorer: str, metric: str, component: str = "decoder") -> None:
    """Refuse a scan whose ``ranking.json`` would replace a ranking of another component, method, scorer or
    metric (a ranking without ``component`` predates the key and ranks decoder layers)."""
    p = out / report.RANKING
    if not p.is_file():
        return
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # not a readable ranking: nothing a later prune could take from it
    if not isinstance(doc, dict) or doc.get("kind") != "importance_ranking":
        return
    theirs_c = doc.get("component", "decoder")
    if theirs_c != component:
        other = out.with_name(f"{out.name}-{component}")
        raise ImportanceError(
            f"{out} already holds a ranking of the {search.COMPONENT_LAYERS.get(theirs_c, theirs_c)} ({p.name}: "
            f"component={theirs_c}); this scan ranks the {search.COMPONENT_LAYERS[component]} "
            f"(importance.component={component}) and would replace it, and `stc prune --from {out}` would then "
            f"remove layers of another component. Give this scan its own directory (importance.out={other}), or "
            f"delete {p} to replace that ranking")
    theirs = (doc.get("method"), doc.get("scorer"), doc.get("metric"))
    if theirs == (method, scorer, metric):
        return
    other = out.with_name(f"{out.name}-{method}-{scorer}")
    raise ImportanceError(
        f"{out} already holds a ranking ({p.name}: method={theirs[0]}, scorer={theirs[1]}, metric={theirs[2]}); "
        f"this scan (method={method}, scorer={scorer}, metric={metric}) would replace it, and `stc prune --from "
        f"{out}` would then remove other layers. Give this scan its own directory (importance.out={other}), or "
        f"delete {p} to replace that ranking")


def run_importance(recipe: cfg.Recipe, *, dry_run: bool = False) -> dict | None:
    """``stc importance`` (any number of ranks); returns the ranking document on rank 0."""
    if dry_run:
        return _run_importance(recipe, dist.env(), dry_run, _Stop())
    stop = _Stop()
    with dist.session() as env, stop.handling():
        return _run_importance(recipe, env, dry_run, stop)


def _run_importance(recipe: cfg.Recipe, env: dist.DistEnv, dry_run: bool, stop: _Stop) -> dict | None:
    ic, data = recipe.importance, recipe.data
    out = out_dir(recipe)
    lg = log.get() if dry_run else log.setup(recipe.run.log_level, out, progress_s=recipe.run.progress_s)
    if recipe.run.threads > 0:
        torch.set_num_threads(recipe.run.threads)
    if not data.shards:
        raise ImportanceError("data.shards is empty: point it at a directory written by `stc shards build`")
    model_dir, kind = _check_model_dir(recipe.model.path)
    if recipe.model.kind not in ("auto", kind):   # refused now, not after the dev set is read
        raise ImportanceError(f"{model_dir} holds a {kind} model but model.kind is {recipe.model.kind!r}; set "
                              f"model.kind={kind} or auto")
    component = ic.component
    is_audio = families.get(kind).audio
    if component == "audio" and not is_audio:
        raise ImportanceError(f"importance.component=audio scores audio-encoder layers, but {model_dir} holds a "
                              f"{kind} model without an audio encoder ({families.get(kind).title}): use an "
                              f"audio-language model, or importance.component=decoder")
    n_layers, original = component_info(model_dir, component)

    # Cheap checks first: dev data, metric, plan, dev/test separation.
    infos = D.dev_shards(data.shards, data.dev_split)
    samples, skipped = D.read_dev(data.shards, data, ic.max_dev_samples, is_audio)
    if component == "audio":   # a row without audio scores the same without any audio layer: no signal
        skipped += [(s.key, "no audio (importance.component=audio scores the audio encoder)")
                    for s in samples if s.audio is None]
        samples = [s for s in samples if s.audio is not None]
    if not samples:
        why = "; ".join(f"{k}: {r}" for k, r in skipped[:5]) or "the split is empty"
        raise ImportanceError(f"the dev split {data.dev_split!r} of {data.shards} has no usable samples "
                              f"({len(skipped)} skipped: {why})")
    metric = scorers.resolve_metric(ic.scorer, ic.selector, [s.meta["tgt_lang"] for s in samples])
    if ic.scorer != "task" and ic.selector != "auto" and env.is_main:
        lg.warning(f"importance.selector={ic.selector} applies to the task scorer only; {ic.scorer} ranks by {metric}")
    plan = search.make_plan(ic, n_layers, metric)
    signal_after = _signal_hook(env.rank)
    for note in D.check_disjoint(data.shards, data.dev_split, data.test_split, [s.key for s in samples],
                                 [s.meta.get("src_text", "") for s in samples]):
        if env.is_main:
            lg.warning(note)
    for k, r in skipped:
        if env.is_main:
            lg.warning(f"dev sample {k} skipped: {r}")
    if dry_run:
        _check_same_ranking(out, plan.method, ic.scorer, metric, component)
        if env.is_main:
            print(f"importance (dry run): {plan.method} search by {metric} ({ic.scorer}) over {n_layers} "
                  f"{plan.layer_word}; remove {plan.n_remove} (forced {list(plan.forced)}), protected "
                  f"{list(plan.protected)}, candidates {plan.prunable}; {len(samples)} dev samples; out {out}")
        return None

    processor = load_processor(model_dir)
    tokenizer = getattr(processor, "tokenizer", processor)
    fps = {"model": fingerprint_model(model_dir), "weights": J.weights_probe(model_dir),
           "tokenizer": fingerprint_tokenizer(model_dir),
           "prompt": prompt_fingerprint(processor, data, is_audio),
           "dev": D.dev_fingerprint(infos, data.dev_split, ic.max_dev_samples),
           "scorer": fingerprint_obj(scorer_config(recipe, metric))}
    fx = fingerprint_feature_extractor(model_dir)
    if fx:
        fps["features"] = fx
    head = J.header(fps, {"model": str(model_dir), "dev": {"shards": str(data.shards), "split": data.dev_split,
                                                           "max_samples": ic.max_dev_samples},
                          "scorer_config": scorer_config(recipe, metric), "num_layers": n_layers,
                          "component": component})

    out.mkdir(parents=True, exist_ok=True)
    # one scan per output: `stc importance` holds the lock of importance.out (engine.lock)
    J.repair_tail(J.journal_path(out, env.rank))
    dist.barrier()
    state, err = None, None
    if env.is_main:
        try:
            # another component, scorer or metric: refused here, naming what differs
            state = J.read(out, fps, metric, component=component)
            _check_same_ranking(out, plan.method, ic.scorer, metric, component)
        except ImportanceError as e:
            err = str(e)
    _agree(err)
    state = dist.broadcast_object(state)
    if env.is_main:
        for p in state.problems:
            lg.warning(f"journal: {p}")
        if state.units:
            lg.info(f"journal: {len(state.units)} finished unit(s) from {', '.join(state.files)} will not be recomputed")
    writer = J.Writer(out, env.rank, head)

    device = dist.device() if recipe.run.device != "cpu" else torch.device("cpu")
    if recipe.run.device == "cuda" and device.type != "cuda":
        raise ImportanceError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    model = load_model(recipe.model, device=device if device.type == "cuda" else None)
    stop.agree("while the model was loading")
    t0 = time.perf_counter()
    if component == "audio":
        try:
            L.audio_layer_list(model)
        except surgery.SurgeryError as e:
            raise ImportanceError(f"importance.component=audio: {e}") from None
    dev = D.prepare(model, processor, samples, data, batch_size=ic.decode_batch_size,
                    teacher_forced=ic.scorer != "task", prompt_only=ic.scorer == "task",
                    keep_features=component == "audio")
    if dev.n_samples == 0:
        why = "; ".join(f"{k}: {r}" for k, r in dev.skipped[:5])
        raise ImportanceError(f"the dev split {data.dev_split!r} has no usable samples after building prompts ({why})")
    if env.is_main:
        lg.info(f"dev set: {dev.n_samples} samples in {len(dev.batches)} batches; decoder inputs cached in "
                f"{time.perf_counter() - t0:.1f}s")
    gen_cfg = None
    if ic.scorer == "task":
        b = D.prompt_builder(processor, data)
        gen_cfg = scorers.generation_config(model, b.end_id, b.pad_id, ic.max_new_tokens)
    stop.agree("while the dev set was prepared")

    with log.progress() as prog:
        task_id: dict[str, Any] = {}

        def on_start(it: int, n: int) -> None:
            task_id["t"] = prog.task(f"importance iteration {it}", total=max(n, 1), unit="candidates")

        def on_unit(u: search.Unit, rec: dict) -> None:
            task_id["t"].advance(1)
            if signal_after is not None and runner.computed == signal_after:
                os.kill(os.getpid(), signal.SIGTERM)

        runner = search.Runner(compute=_compute_fn(ic.scorer, model, tokenizer, dev, metric, gen_cfg, stop.check,
                                                   component),
                               writer=writer, done=dict(state.units), cost=_cost_fn(ic.scorer, n_layers, component),
                               on_unit=on_unit, on_start=on_start, stop=stop,
                               annotate=_annotate(out, dev, ic.scorer, component))
        dist.barrier()
        t_scan = time.perf_counter()
        result = search.run_search(plan, runner, lg if env.is_main else None)
        dist.barrier()
        scan_s = time.perf_counter() - t_scan
    if stop.signal is not None and env.is_main:
        lg.warning(f"{stop.signal} came after the scan finished: writing the outputs before exiting")
    computed = dist.all_gather_object({"rank": env.rank, "computed": runner.computed,
                                       "skipped": runner.skipped, **dist.provenance()})
    angular = None
    if ic.scorer == "block_influence" and env.is_main:
        bi = (scorers.audio_block_influence if component == "audio" else scorers.block_influence)(
            model, dev, (), [plan.n_remove])
        angular = {str(k): {str(c): v for c, v in vals.items()} for k, vals in bi.angular.items()}
    doc = None
    if env.is_main:
        doc = ranking_doc(result, plan, recipe, model_dir=model_dir, original=original, fps=fps, dev=dev,
                          scan_s=scan_s, computed=computed, angular=angular, skipped=skipped)
        report.write(out, doc)
        write_meta(out, build_meta("journal", fingerprints=fps, config=recipe, ranking=report.RANKING,
                                   journal_files=sorted(p.name for p in out.glob(J.JOURNAL_GLOB)),
                                   journal_problems=state.problems, units=doc["scan"], method=plan.method,
                                   metric=metric, removed=result.removed, component=component,
                                   removed_original=doc["removed_original"]))
        cfg.save_resolved(recipe, out)
        _print_summary(doc, out)
    dist.barrier()
    return doc


def ranking_doc(result: search.Result, plan: search.Plan, recipe: cfg.Recipe, *, model_dir: Path,
                original: list[int], fps: dict, dev: D.DevSet, scan_s: float, computed: list[dict],
                angular: dict | None, skipped: list) -> dict:
    kept = [i for i in range(plan.num_layers) if i not in result.removed]
    return {
        "schema": 1, "kind": "importance_ranking", "component": plan.component, "method": plan.method,
        "scorer": recipe.importance.scorer,
        "metric": plan.metric, "higher_is_better": plan.higher_is_better, "model": str(model_dir),
        "num_layers": plan.num_layers, "protected": list(plan.protected), "forced": list(plan.forced),
        "target_remove": plan.n_remove, "stop_below": plan.stop_below, "shortlist": plan.shortlist,
        "removed": list(result.removed), "removed_original": [original[i] for i in result.removed],
        "kept": kept, "kept_original": [original[i] for i in kept],
        "baseline": result.baseline, "final": result.final, "stopped": result.stopped, "block": result.block,
        "iterations": result.iterations, "n_samples": dev.n_samples,
        "dev": {"shards": str(recipe.data.shards), "split": recipe.data.dev_split,
                "max_samples": recipe.importance.max_dev_samples, "skipped": [list(s) for s in skipped + dev.skipped]},
        "block_angular_distance": angular, "fingerprints": fps,
        "scan": {"seconds": round(scan_s, 3), "world_size": dist.env().world_size,
                 "computed_this_run": sum(c["computed"] for c in computed), "per_rank": computed},
    }


def summary_rows(doc: dict) -> list[tuple[str, str, str, str, str]]:
    """The removal order as table rows (step, layer, original layer, score, of unpruned): forced layers,
    then each search step; a middle block is one row per layer, its score (the model without the
    whole block) on the last."""
    orig = dict(zip(doc["removed"], doc["removed_original"]))
    rows = []
    for c in doc["forced"]:
        rows.append((str(len(rows) + 1), str(c), str(orig[c]), "forced", "-"))
    for it in doc["iterations"]:
        for c in it["chosen"]:
            rel = it["relative"] if len(it["chosen"]) == 1 else None
            rows.append((str(len(rows) + 1), str(c), str(orig[c]), report.fmt_cell(it["scores"][str(c)]),
                         "-" if rel is None else f"{100 * rel:.1f}%"))
    block = doc.get("block") or []
    fin = doc.get("final") or {}
    for k, c in enumerate(block):
        last = k == len(block) - 1
        rel = fin.get("relative")
        rows.append((str(len(rows) + 1), str(c), str(orig[c]), report.fmt_cell(fin.get("score")) if last else "block",
                     ("-" if rel is None else f"{100 * rel:.1f}%") if last else "-"))
    return rows


def _print_summary(doc: dict, out: Path, console: Any = None) -> None:
    """The removal order on the console. Every cell is short and no column may shrink below its
    widest value, so an 80-column terminal shows every value whole; the closing line is not
    wrapped by rich (a long path stays one string)."""
    from rich.table import Table

    con = console if console is not None else log.console
    audio = doc.get("component") == "audio"
    title = f"{doc['method']} {'audio-encoder layer ' if audio else ''}importance by {doc['metric']}: removal order"
    if doc.get("block"):
        title = f"middle block of {len(doc['block'])} {'audio-encoder ' if audio else ''}layers by {doc['metric']}"
    rows = summary_rows(doc)
    heads = ("step", "layer", "original", doc["metric"], "of unpruned")
    t = Table(title=title, title_justify="left")
    for k, h in enumerate(heads):
        width = max([len(h)] + [len(r[k]) for r in rows])
        t.add_column(h, justify="right", no_wrap=True, overflow="fold", min_width=width)
    for r in rows:
        t.add_row(*r)
    con.print(t)
    base, fin = doc.get("baseline") or {}, doc.get("final") or {}
    rel = fin.get("relative")
    con.print(f"unpruned {report.fmt_cell(base.get('score'))}, pruned {report.fmt_cell(fin.get('score'))}"
              + ("" if rel is None else f" ({100 * rel:.1f}% of unpruned)")
              + f"; scan {doc['scan']['seconds']}s on {doc['scan']['world_size']} rank(s); "
              f"wrote {out / report.RANKING}",
              soft_wrap=True)


# ================================================================================================ prune

def _ranking_layers(path: str, model_fp: dict, count: int) -> tuple[list[int], dict]:
    p = Path(path)
    if p.is_dir():
        p = p / report.RANKING
    if not p.exists():
        raise ImportanceError(f"ranking {p} does not exist; run `stc importance` first (it writes "
                              f"<importance.out>/{report.RANKING})")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ImportanceError(f"{p} is not valid JSON ({e.msg}); rerun `stc importance`") from None
    if doc.get("kind") != "importance_ranking" or not isinstance(doc.get("removed"), list):
        raise ImportanceError(f"{p} is not a ranking written by `stc importance`")
    if doc.get("component", "decoder") not in search.COMPONENT_LAYERS:
        raise ImportanceError(f"{p} ranks layers of an unknown component {doc.get('component')!r} (one of "
                              f"{', '.join(search.COMPONENT_LAYERS)}); rerun `stc importance`")
    theirs = doc.get("fingerprints") or {}
    diff = [k for k in ("model", "weights") if theirs.get(k) != model_fp[k]]
    if diff:
        raise ImportanceError(f"{p} ranks the layers of another model ({doc.get('model')}; "
                              f"{' and '.join(J.FINGERPRINT_NAMES[k] for k in diff)} differ from model.path): prune "
                              f"the model it scanned, or give the layers explicitly with --layers")
    layers = list(doc["removed"])
    if count:
        if count > len(layers):
            raise ImportanceError(f"prune.count={count} but the ranking removes only {len(layers)} "
                                  f"{search.COMPONENT_LAYERS[doc.get('component', 'decoder')]}")
        layers = layers[:count]
    return layers, doc


_ST_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
                  "fp32": "fp32"}


def _safetensors_dtypes(path: Path) -> Counter:
    """Bytes per dtype of one safetensors file, from its header (no tensor is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    out: Counter = Counter()
    for name, t in head.items():
        if name != "__metadata__" and isinstance(t, dict):
            a, b = t.get("data_offsets", (0, 0))
            out[t.get("dtype")] += b - a
    return out


def source_dtype(model_dir: Path) -> tuple[str | None, str]:
    """(bf16 | fp16 | fp32 or None, where it was read): the floating dtype that holds most bytes of the
    checkpoint's safetensors, else ``config.json`` ``torch_dtype``/``dtype`` (top level, then the
    text config)."""
    total: Counter = Counter()
    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            total.update(_safetensors_dtypes(f))
        except (OSError, ValueError, struct.error):
            continue
    floats = {k: v for k, v in total.items() if k in _ST_DTYPES}
    if floats:
        return _ST_DTYPES[max(floats, key=lambda k: (floats[k], k))], "its safetensors"
    try:
        c = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, ""
    for d in (c, families.model_config_dict(c), families.text_config_dict(c)):
        for key in ("torch_dtype", "dtype"):
            v = d.get(key) if isinstance(d, dict) else None
            if isinstance(v, str) and v.replace("torch.", "") in _CONFIG_DTYPES:
                return _CONFIG_DTYPES[v.replace("torch.", "")], f"config.json {key}"
    return None, ""


def prune_dtype(pc: cfg.PruneConfig, model_cfg: cfg.ModelConfig, model_dir: Path) -> tuple[str, str]:
    """(dtype to load and save the pruned model in, why)."""
    if pc.dtype != "auto":
        return pc.dtype, "prune.dtype"
    d, where = source_dtype(model_dir)
    if d is None:
        log.get().warning(f"prune.dtype=auto: cannot tell the dtype of {model_dir} (no safetensors header or "
                          f"config.json dtype); saving in model.dtype={model_cfg.dtype}")
        return model_cfg.dtype, "model.dtype (source dtype unknown)"
    return d, f"the source's ({where})"


def run_prune(recipe: cfg.Recipe, *, dry_run: bool = False) -> dict | None:
    """Rank 0 prunes; other ranks (under `stc run --nproc N prune`) have nothing to do."""
    if dist.env().rank != 0:
        return None
    pc = recipe.prune
    lg = log.get()
    model_dir, _ = _check_model_dir(recipe.model.path)
    out = stages.out_dir("prune", recipe)
    src_fp = {"model": fingerprint_model(model_dir), "weights": J.weights_probe(model_dir)}
    if pc.ranking and pc.layers:
        raise ImportanceError("give a ranking (--from / prune.ranking) or layers (--layers / prune.layers), not both")
    ranking_doc_ = None
    audio_remove = list(pc.prune_audio_layers)
    if pc.ranking:
        layers, ranking_doc_ = _ranking_layers(pc.ranking, src_fp, pc.count)
        if ranking_doc_.get("component") == "audio":
            if audio_remove:
                raise ImportanceError(f"{pc.ranking} ranks audio-encoder layers (component=audio), and "
                                      f"prune.prune_audio_layers={audio_remove} names audio layers too: give one of "
                                      f"them, not both")
            layers, audio_remove = [], layers
    elif pc.layers:
        layers = list(pc.layers)
    elif not pc.audio_ranking:
        raise ImportanceError("nothing to prune: give --from RANKING (ranking.json or its directory) or --layers 3,13,...")
    else:
        layers = []
    if pc.audio_ranking:
        if audio_remove:
            raise ImportanceError(f"prune.audio_ranking={pc.audio_ranking} and "
                                  f"{'prune.ranking (component=audio)' if pc.ranking else 'prune.prune_audio_layers'} "
                                  f"both name audio-encoder layers to remove: give one of them")
        audio_remove, audio_doc = _ranking_layers(pc.audio_ranking, src_fp, pc.audio_count)
        if audio_doc.get("component", "decoder") != "audio":
            raise ImportanceError(f"prune.audio_ranking={pc.audio_ranking} ranks decoder layers; give an audio-encoder "
                                  f"ranking (`stc importance importance.component=audio`) or pass it as prune.ranking")
    if out.resolve() == model_dir.resolve():
        raise ImportanceError(f"prune.out {out} is the source model directory; write the pruned model elsewhere")
    if out.exists() and any(out.iterdir()):
        try:
            prev = read_meta(out, "model")
        except MetaError:
            prev = None
        if prev is None or "pruned" not in prev:
            raise ImportanceError(f"{out} exists and is not an earlier `stc prune` output; choose an empty --out")
    n_layers, original = _model_info(model_dir)
    try:
        layers = surgery.normalise_indices(layers, n_layers)
    except surgery.SurgeryError as e:
        raise ImportanceError(f"prune layers: {e}") from None
    audio_original: list[int] | None = None
    if audio_remove:   # checked against config.json before any weight is read
        where = (f"prune.audio_ranking={pc.audio_ranking}" if pc.audio_ranking else
                 f"prune.ranking={pc.ranking} (component=audio)" if ranking_doc_ is not None and
                 not pc.prune_audio_layers else "prune.prune_audio_layers")
        n_audio, audio_original = _audio_info(model_dir, where)
        try:
            audio_remove = surgery.normalise_indices(audio_remove, n_audio, "audio layer")
        except surgery.SurgeryError as e:
            raise ImportanceError(f"{where}: {e}") from None
        if len(audio_remove) >= n_audio:
            raise ImportanceError(f"{where}: removing all {n_audio} audio-encoder layers leaves no encoder")
    else:
        with contextlib.suppress(ImportanceError):   # a text-only model has none: no audio fields
            _, audio_original = _audio_info(model_dir)
    dtype, dtype_why = prune_dtype(pc, recipe.model, model_dir)
    if dry_run:
        what = (f"decoder layer(s) {[original[i] for i in layers]} (original numbering; indices {layers} of "
                f"{n_layers})") if layers or not audio_remove else ""
        if audio_remove:
            what += (" and " if what else "") + (
                f"audio-encoder layer(s) {[audio_original[i] for i in audio_remove]} (original numbering; indices "
                f"{audio_remove} of {len(audio_original)})")
        print(f"prune (dry run): remove {what} from {model_dir}; write {out} in {dtype} ({dtype_why})")
        return None
    t_start = time.monotonic()      # meta.json "seconds" (x "world_size" 1): the device time stc report shows
    # loaded in the dtype it is saved in: nothing is computed, and a bf16 source never takes fp32 memory
    model = load_model(dataclasses.replace(recipe.model, dtype=dtype))
    before = param_counts(model)
    bytes_before = storage_bytes(model_dir)
    try:
        kept_original = surgery.drop_layers(model, layers, audio_remove=audio_remove)
    except surgery.SurgeryError as e:
        raise ImportanceError(str(e)) from None
    after = param_counts(model)
    processor = load_processor(model_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    surgery.save_pruned(model, tmp, processor)
    removed_original = [original[i] for i in layers]
    pruned = {"removed": layers, "removed_original": removed_original, "kept_original": kept_original,
              "audio_removed": audio_remove,
              "audio_removed_original": None if audio_original is None else [audio_original[i] for i in audio_remove],
              "audio_kept_original": None if audio_original is None else
              [a for i, a in enumerate(audio_original) if i not in audio_remove],
              "ranking_component": ranking_doc_.get("component", "decoder") if ranking_doc_ else None,
              "source": str(model_dir),
              "ranking": str(pc.ranking) if pc.ranking else None,
              "ranking_metric": ranking_doc_.get("metric") if ranking_doc_ else None,
              "ranking_method": ranking_doc_.get("method") if ranking_doc_ else None,
              "audio_ranking": str(pc.audio_ranking) if pc.audio_ranking else None,
              "dtype": dtype, "dtype_from": dtype_why}
    counts = {"before": {"total": before["total"], "stored": before["stored"], "stored_bytes": before["stored_bytes"],
                         "storage_bytes": bytes_before},
              "after": {"total": after["total"], "stored": after["stored"], "stored_bytes": after["stored_bytes"],
                        "storage_bytes": storage_bytes(tmp)}}
    fps = {"model": fingerprint_model(tmp), "source_model": src_fp["model"], "source_weights": src_fp["weights"],
           "tokenizer": fingerprint_tokenizer(tmp),
           "features": fingerprint_feature_extractor(tmp)}
    write_meta(tmp, build_meta("model", fingerprints=fps, config=recipe, pruned=pruned, params=counts,
                               dtype=dtype, seconds=round(time.monotonic() - t_start, 3), world_size=1))
    cfg.save_resolved(recipe, tmp)
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    b, a = counts["before"], counts["after"]
    what = f"{len(layers)} decoder layer(s) {removed_original}"
    if audio_remove:
        what = (what + " and " if layers else "") + \
            f"{len(audio_remove)} audio-encoder layer(s) {pruned['audio_removed_original']}"
    lg.info(f"pruned {what} (original numbering) from {model_dir}: "
            f"params {b['total']:,} -> {a['total']:,} ({100 * a['total'] / b['total']:.1f}%), storage "
            f"{b['storage_bytes']:,} -> {a['storage_bytes']:,} bytes ({dtype}, {dtype_why}); wrote {out}")
    return {"out": str(out), **pruned, "params": counts}


# ================================================================================================ stc entries

def importance_main(recipe: cfg.Recipe, args: Any) -> int:
    run_importance(recipe, dry_run=bool(getattr(args, "dry_run", False)))
    return 0


def prune_main(recipe: cfg.Recipe, args: Any) -> int:
    run_prune(recipe, dry_run=bool(getattr(args, "dry_run", False)))
    return 0
