"""``stc importance`` and ``stc prune``: the stage functions the CLI calls.

``stc importance`` (any number of ranks): validate the plan before anything heavy, check dev/test
separation, read the journal(s), load the model once per rank, prepare the dev set (audio encoder
once), run the search, then rank 0 writes ``ranking.json``, ``ranking.md``, ``importance.png``,
``meta.json`` (kind ``journal``) and ``config.yaml`` into ``importance.out``.

``stc prune`` (rank 0): remove the layers of a ranking (or ``--layers``) with
:func:`engine.models.surgery.drop_layers` and save a model that plain ``transformers`` reloads, with
``meta.json`` (kind ``model``) recording kept/removed original layers and parameter/storage counts.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from .. import config as cfg
from .. import dist, log
from ..meta import (MetaError, build_meta, fingerprint_feature_extractor, fingerprint_model, fingerprint_obj,
                    fingerprint_prompt, fingerprint_tokenizer, read_meta, write_meta)
from ..models import surgery
from . import devset as D
from . import journal as J
from . import report, scorers, search
from .devset import ImportanceError

LOCK = ".importance.lock"


def out_dir(recipe: cfg.Recipe) -> Path:
    return Path(recipe.importance.out or Path(recipe.run.out_dir) / "importance")


def _model_info(model_dir: Path) -> tuple[int, list[int]]:
    """(decoder layers, original index of each) from config.json, without loading weights."""
    with open(model_dir / "config.json", encoding="utf-8") as f:
        c = json.load(f)
    t = c.get("text_config") or c
    n = t.get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise ImportanceError(f"{model_dir}/config.json has no decoder layer count (num_hidden_layers)")
    orig = t.get(surgery.ORIGINAL_KEY) or list(range(n))
    return n, list(orig)


def _check_model_dir(path: str) -> tuple[Path, str]:
    from ..models.load import ModelLoadError, check_model_dir, detect_kind

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
    if ic.scorer == "task":
        doc["max_new_tokens"] = ic.max_new_tokens
    return doc


def _agree(error: str | None) -> None:
    """Raise the same error on every rank when any rank hit one (so no rank waits in a collective)."""
    errs = [e for e in dist.all_gather_object(error) if e]
    if errs:
        raise ImportanceError(errs[0])


@contextlib.contextmanager
def _lock(out: Path, enabled: bool) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield f"another `stc importance` is writing to {out} (lock {LOCK} held); wait for it or use another importance.out"
            return
        yield None
    finally:
        f.close()


def _compute_fn(scorer: str, model: Any, tokenizer: Any, dev: D.DevSet, metric: str, gen_cfg: Any):
    def compute(units):
        groups: dict[tuple[int, ...], list] = {}
        for u in units:
            groups.setdefault(tuple(u.removed), []).append(u)
        for removed, us in groups.items():
            by_c = {u.candidate: u for u in us}
            if scorer == "nll":
                res = scorers.nll_scores(model, dev, list(by_c), removed)
                yield from ((by_c[c], res[c]) for c in by_c)
            elif scorer == "block_influence":
                res = scorers.block_influence_scores(model, dev, list(by_c), removed)
                yield from ((by_c[c], res[c]) for c in by_c)
            else:
                for c, sc in scorers.task_scores(model, tokenizer, dev, list(by_c), removed, metric=metric,
                                                 gen_cfg=gen_cfg):
                    yield by_c[c], sc
    return compute


def _cost_fn(scorer: str, num_layers: int):
    def cost(u: search.Unit) -> float:
        if scorer != "nll":
            return 1.0
        if u.candidate is None:
            return 0.5  # free with the prefix pass the rank runs anyway
        return 1.0 + sum(1 for i in range(u.candidate + 1, num_layers) if i not in u.removed)
    return cost


def run_importance(recipe: cfg.Recipe, *, dry_run: bool = False) -> dict | None:
    owns = not dist.is_initialized()
    env = dist.init()
    try:
        return _run_importance(recipe, env, dry_run)
    finally:
        if owns:
            dist.finalize()


def _run_importance(recipe: cfg.Recipe, env: dist.DistEnv, dry_run: bool) -> dict | None:
    import torch

    ic, data = recipe.importance, recipe.data
    out = out_dir(recipe)
    lg = log.setup(recipe.run.log_level, out)
    if recipe.run.threads > 0:
        torch.set_num_threads(recipe.run.threads)
    if not data.shards:
        raise ImportanceError("data.shards is empty: point it at a directory written by `stc shards build`")
    model_dir, kind = _check_model_dir(recipe.model.path)
    n_layers, original = _model_info(model_dir)
    is_audio = kind == "qwen2audio"

    # Cheap checks first: dev data, metric, plan, dev/test separation.
    infos = D.dev_shards(data.shards, data.dev_split)
    samples, skipped = D.read_dev(data.shards, data, ic.max_dev_samples, is_audio)
    if not samples:
        why = "; ".join(f"{k}: {r}" for k, r in skipped[:5]) or "the split is empty"
        raise ImportanceError(f"the dev split {data.dev_split!r} of {data.shards} has no usable samples "
                              f"({len(skipped)} skipped: {why})")
    metric = scorers.resolve_metric(ic.scorer, ic.selector, [s.meta["tgt_lang"] for s in samples])
    if ic.scorer != "task" and ic.selector != "auto" and env.is_main:
        lg.warning(f"importance.selector={ic.selector} applies to the task scorer only; {ic.scorer} ranks by {metric}")
    plan = search.make_plan(ic, n_layers, metric)
    for note in D.check_disjoint(data.shards, data.dev_split, data.test_split, [s.key for s in samples],
                                 [s.meta.get("src_text", "") for s in samples]):
        if env.is_main:
            lg.warning(note)
    for k, r in skipped:
        if env.is_main:
            lg.warning(f"dev sample {k} skipped: {r}")
    if dry_run:
        if env.is_main:
            log.console.print(f"importance plan: {plan.method} search by {metric} ({ic.scorer}) over {n_layers} "
                              f"decoder layers; remove {plan.n_remove} (forced {list(plan.forced)}), protected "
                              f"{list(plan.protected)}, candidates {plan.prunable}; {len(samples)} dev samples; "
                              f"out {out}")
        return None

    from ..models.load import load_model, load_processor

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
                          "scorer_config": scorer_config(recipe, metric), "num_layers": n_layers})

    out.mkdir(parents=True, exist_ok=True)
    with _lock(out, env.is_main) as lock_err:
        _agree(lock_err)
        J.repair_tail(J.journal_path(out, env.rank))
        dist.barrier()
        state, err = None, None
        if env.is_main:
            try:
                state = J.read(out, fps, metric)
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
        t0 = time.perf_counter()
        dev = D.prepare(model, processor, samples, data, batch_size=ic.decode_batch_size,
                        teacher_forced=ic.scorer != "task", prompt_only=ic.scorer == "task")
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

        with log.progress("candidates") as prog:
            task_id: dict[str, Any] = {}

            def on_start(it: int, n: int) -> None:
                task_id["t"] = prog.add_task(f"iteration {it}", total=max(n, 1), extra=f"rank {env.rank}")

            def on_unit(u: search.Unit, rec: dict) -> None:
                prog.advance(task_id["t"])

            runner = search.Runner(compute=_compute_fn(ic.scorer, model, tokenizer, dev, metric, gen_cfg),
                                   writer=writer, done=dict(state.units), cost=_cost_fn(ic.scorer, n_layers),
                                   on_unit=on_unit, on_start=on_start)
            dist.barrier()
            t_scan = time.perf_counter()
            result = search.run_search(plan, runner, lg if env.is_main else None)
            dist.barrier()
            scan_s = time.perf_counter() - t_scan
        computed = dist.all_gather_object({"rank": env.rank, "computed": runner.computed,
                                           "skipped": runner.skipped, **dist.provenance()})
        angular = None
        if ic.scorer == "block_influence" and env.is_main:
            bi = scorers.block_influence(model, dev, (), [plan.n_remove])
            angular = {str(k): {str(c): v for c, v in vals.items()} for k, vals in bi.angular.items()}
        doc = None
        if env.is_main:
            doc = ranking_doc(result, plan, recipe, model_dir=model_dir, original=original, fps=fps, dev=dev,
                              scan_s=scan_s, computed=computed, angular=angular, skipped=skipped)
            report.write(out, doc)
            write_meta(out, build_meta("journal", fingerprints=fps, config=recipe, ranking=report.RANKING,
                                       journal_files=sorted(p.name for p in out.glob(J.JOURNAL_GLOB)),
                                       journal_problems=state.problems, units=doc["scan"], method=plan.method,
                                       metric=metric, removed=result.removed))
            cfg.save_resolved(recipe, out)
            _print_summary(doc, out)
        dist.barrier()
        return doc


def ranking_doc(result: search.Result, plan: search.Plan, recipe: cfg.Recipe, *, model_dir: Path,
                original: list[int], fps: dict, dev: D.DevSet, scan_s: float, computed: list[dict],
                angular: dict | None, skipped: list) -> dict:
    kept = [i for i in range(plan.num_layers) if i not in result.removed]
    return {
        "schema": 1, "kind": "importance_ranking", "method": plan.method, "scorer": recipe.importance.scorer,
        "metric": plan.metric, "higher_is_better": plan.higher_is_better, "model": str(model_dir),
        "num_layers": plan.num_layers, "protected": list(plan.protected), "forced": list(plan.forced),
        "target_remove": plan.n_remove, "stop_below": plan.stop_below,
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


def _print_summary(doc: dict, out: Path) -> None:
    from rich.table import Table

    t = Table(title=f"{doc['method']} importance by {doc['metric']}: removal order")
    for c in ("step", "layer", "original", doc["metric"], "of unpruned"):
        t.add_column(c, justify="right")
    step = 0
    for c in doc["forced"]:
        step += 1
        t.add_row(str(step), str(c), str(doc["removed_original"][step - 1]), "forced", "-")
    for it in doc["iterations"]:
        for c in it["chosen"]:
            step += 1
            rel = it["relative"] if len(it["chosen"]) == 1 else None
            t.add_row(str(step), str(c), str(doc["removed_original"][doc["removed"].index(c)]),
                      f"{it['scores'][str(c)]:.4f}", "-" if rel is None else f"{100 * rel:.1f}%")
    log.console.print(t)
    fin = doc.get("final") or {}
    log.console.print(f"unpruned {((doc.get('baseline') or {}).get('score'))}, pruned {fin.get('score')}; "
                      f"scan {doc['scan']['seconds']}s on {doc['scan']['world_size']} rank(s); wrote {out / report.RANKING}")


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
    theirs = doc.get("fingerprints") or {}
    diff = [k for k in ("model", "weights") if theirs.get(k) != model_fp[k]]
    if diff:
        raise ImportanceError(f"{p} ranks the layers of another model ({doc.get('model')}; "
                              f"{' and '.join(J.FINGERPRINT_NAMES[k] for k in diff)} differ from model.path): prune "
                              f"the model it scanned, or give the layers explicitly with --layers")
    layers = list(doc["removed"])
    if count:
        if count > len(layers):
            raise ImportanceError(f"prune.count={count} but the ranking removes only {len(layers)} layers")
        layers = layers[:count]
    return layers, doc


def run_prune(recipe: cfg.Recipe) -> dict | None:
    """Rank 0 prunes; other ranks (under `stc run --nproc N prune`) have nothing to do."""
    if dist.env().rank != 0:
        return None
    from ..models.counts import param_counts, storage_bytes
    from ..models.load import load_model, load_processor

    pc = recipe.prune
    lg = log.setup(recipe.run.log_level)
    model_dir, _ = _check_model_dir(recipe.model.path)
    out = Path(pc.out or Path(recipe.run.out_dir) / "pruned")
    src_fp = {"model": fingerprint_model(model_dir), "weights": J.weights_probe(model_dir)}
    if pc.ranking and pc.layers:
        raise ImportanceError("give a ranking (--from / prune.ranking) or layers (--layers / prune.layers), not both")
    ranking_doc_ = None
    if pc.ranking:
        layers, ranking_doc_ = _ranking_layers(pc.ranking, src_fp, pc.count)
    elif pc.layers:
        layers = list(pc.layers)
    else:
        raise ImportanceError("nothing to prune: give --from RANKING (ranking.json or its directory) or --layers 3,13,...")
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
    model = load_model(recipe.model)
    before = param_counts(model)
    bytes_before = storage_bytes(model_dir)
    try:
        kept_original = surgery.drop_layers(model, layers, audio_remove=pc.prune_audio_layers)
    except surgery.SurgeryError as e:
        raise ImportanceError(str(e)) from None
    after = param_counts(model)
    processor = load_processor(model_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    surgery.save_pruned(model, tmp, processor)
    removed_original = [original[i] for i in layers]
    pruned = {"removed": layers, "removed_original": removed_original, "kept_original": kept_original,
              "audio_removed": list(pc.prune_audio_layers), "source": str(model_dir),
              "ranking": str(pc.ranking) if pc.ranking else None,
              "ranking_metric": ranking_doc_.get("metric") if ranking_doc_ else None}
    counts = {"before": {"total": before["total"], "stored": before["stored"], "stored_bytes": before["stored_bytes"],
                         "storage_bytes": bytes_before},
              "after": {"total": after["total"], "stored": after["stored"], "stored_bytes": after["stored_bytes"],
                        "storage_bytes": storage_bytes(tmp)}}
    fps = {"model": fingerprint_model(tmp), "source_model": src_fp["model"], "source_weights": src_fp["weights"],
           "tokenizer": fingerprint_tokenizer(tmp),
           "features": fingerprint_feature_extractor(tmp)}
    write_meta(tmp, build_meta("model", fingerprints=fps, config=recipe, pruned=pruned, params=counts,
                               dtype=recipe.model.dtype))
    cfg.save_resolved(recipe, tmp)
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    b, a = counts["before"], counts["after"]
    lg.info(f"pruned {len(layers)} decoder layer(s) {removed_original} (original numbering) from {model_dir}: "
            f"params {b['total']:,} -> {a['total']:,} ({100 * a['total'] / b['total']:.1f}%), storage "
            f"{b['storage_bytes']:,} -> {a['storage_bytes']:,} bytes; wrote {out}")
    return {"out": str(out), **pruned, "params": counts}
