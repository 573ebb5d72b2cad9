"""``stc report``: one markdown page (+ ``report.json`` and PNG plots) from the stage outputs.

Reads (nothing is recomputed):

* ``<eval_dir>/<system>/scores.json`` written by ``stc evaluate``. ``eval_dir`` defaults to
  ``evaluate.out``. What each system is (label, removed layers, removal, healing) comes from the
  pipeline's step records when ``report.runs`` names ``<run>/pipeline/steps`` (:func:`plan_systems`),
  else from a ``system.json`` beside the scores when there is one.
* ``ranking.json`` and ``importance.png`` from ``stc importance`` (``report.importance``, default
  ``importance.out``): the removal order per iteration and the plot, copied next to the report.
* For device-hours, each stage directory in ``report.runs`` (default: the recipe's finetune,
  importance, cache, distill, export and evaluate outputs), by what that stage actually records:
  trainer ``metrics.jsonl`` (``device_hours``: optimizer-step seconds x world size, cumulative over
  resumes), importance ``ranking.json`` (``scan.seconds`` x ``scan.world_size``), cache ``meta.json``
  (sum of per-shard seconds, each shard made by one rank), evaluate ``scores.json`` (``speed.seconds``
  x ``speed.world_size`` per system), or any ``meta.json`` with ``device_hours`` or ``seconds`` +
  ``world_size`` (prune and export record these), else the wall seconds of its pipeline step record x
  the step's ranks. The report's own row is its own build time. A stage that records none of these is
  shown as "n/a", never guessed.
* ``config.yaml`` files found next to those outputs, shown as differences: against the pipeline's
  resolved config (``<run>/pipeline/config.yaml``, the recipe, when ``report.runs`` names
  ``<run>/pipeline/steps``) as ``key: recipe value -> stage value``; without one, against the first
  config found. Configs with the same differences are grouped.
* ``hypotheses.jsonl`` beside each ``scores.json`` (key, ref, hyp), for the statistics below.
* Further ``ranking.json`` files (``report.rankings``, ``label=path``), compared with the main one.

What the report computes (all of it also in ``report.json``):

* ``significance``: a paired bootstrap (``report.bootstrap`` resamples, seed ``run.seed``; 0 = off) of the
  primary metric per direction (chrF++, chrF for Chinese), for every system against ``report.reference``
  every healed variant against the CE-only system of the same removal, every other export against its
  source, a student pruned in the audio encoder too against its decoder-only twin and against the
  decoder-only student of about its size, and a student pruned in steps against the one pruned at once
  (:func:`comparison_pairs`),
  on the two systems' hypotheses aligned by key (different key sets are an error naming both files).
  Each entry: ``kind, baseline, system, direction, metric, n, baseline_score, system_score, delta,
  ci_low, ci_high, p_value, significant, resamples, seed`` (:func:`paired_bootstrap`); report.md prints
  a difference whose 95% CI includes 0 (or p >= 0.05) as "not significant".
* ``metric_warnings``: directions where BLEU-4 is meaningless (references mostly under 4 tokens by the
  direction's BLEU tokenizer: :func:`short_reference_warnings`); their messages are also in ``warnings``.
* per system and direction ``copy_source_count``, ``wrong_language_count``, ``empty_count`` (n x rate).
* speed per system: ``sentences_per_s`` at ``batch_size`` (throughput), ``batch_seconds_per_sentence``,
  ``latency_s`` / ``latency_p50_s`` / ``latency_samples`` at batch 1 (null for a ``scores.json`` written
  before batch-1 latency existed, whose ``latency_s`` was the batched figure).
* ``rankings`` (with ``report.rankings``): Spearman's rho between the first-iteration per-layer
  importances of each pair of rankings, oriented so larger = more important, and each removal order.

Writes into ``report.out`` (every file atomically, so a rerun replaces a report whole): ``report.md``,
``report.json`` (the same table, machine-readable), ``quality_vs_size.png``, ``primary_by_system.png``,
``importance.png``, ``config.yaml`` and last ``meta.json`` (kind ``report``: the finished marker).

Bars (``report.bars``) are data: ``system[@direction]:field OP value`` with OP one of ``>= <= > < ==``.
Per-direction fields (every direction of the system must pass unless ``@direction`` names one):
``primary``, ``retained`` (primary metric as % of the reference), ``bleu``, ``chrf``, ``chrfpp``,
``comet``, ``copy_source_rate``, ``wrong_language_rate``, ``empty_rate``. System fields:
``tokens_per_s``, ``sentences_per_s``, ``latency_s`` (batch 1), ``latency_p50_s``,
``batch_seconds_per_sentence``, ``storage_mb``, ``params_stored``,
``decoder_layers``, ``params_stored_pct`` and ``storage_pct`` (of the reference). A bar whose system
or value is missing is "n/a", not FAIL.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import operator
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import config as cfg
from . import log, stages
from .errors import StcError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from .meta import build_meta, write_meta
from .importance.report import fmt_cell

SCORES = "scores.json"
HYPOTHESES = "hypotheses.jsonl"
SYSTEM = "system.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PLOT_SIZE = "quality_vs_size.png"
PLOT_PRIMARY = "primary_by_system.png"
PLOT_IMPORTANCE = "importance.png"
PLOT_FRONTIER = "frontier.png"
# The IWSLT 2025 compression track's size bins (bytes on disk): < 200 MB, 200-500 MB, 0.5-1 GB, 1-2 GB, 2-4 GB
SIZE_BINS = (200e6, 500e6, 1e9, 2e9, 4e9)
METRICS = ("bleu", "chrf", "chrfpp")
DIR_FIELDS = ("primary", "retained", "bleu", "chrf", "chrfpp", "comet", "copy_source_rate",
              "wrong_language_rate", "empty_rate")
SYS_FIELDS = ("tokens_per_s", "sentences_per_s", "latency_s", "latency_p50_s", "batch_seconds_per_sentence",
              "storage_mb", "params_stored", "decoder_layers", "params_stored_pct", "storage_pct")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_BAR = re.compile(r"^\s*([^:@\s]+)(?:@([^:\s]+))?\s*:\s*([a-z_+]+)\s*(>=|<=|==|>|<)\s*"
                  r"(-?[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*$")


class ReportError(StcError):
    """A message for the user: missing or unreadable inputs, bad bars."""


# ------------------------------------------------------------------------------------------- paths

def out_dir(recipe: cfg.Recipe) -> Path:
    return stages.out_dir("report", recipe)


def eval_dir(recipe: cfg.Recipe) -> Path:
    return Path(recipe.report.eval_dir) if recipe.report.eval_dir else stages.out_dir("evaluate", recipe)


def ranking_path(recipe: cfg.Recipe) -> Path:
    p = Path(recipe.report.importance) if recipe.report.importance else stages.out_dir("importance", recipe)
    return p if p.suffix == ".json" else p / "ranking.json"


def run_dirs(recipe: cfg.Recipe) -> list[tuple[str, Path]]:
    """(label, directory) for device-hours: ``report.runs`` or the recipe's stage outputs."""
    if recipe.report.runs:
        out = []
        for r in recipe.report.runs:
            label, _, path = r.partition("=") if "=" in r else ("", "", r)
            steps = _step_records(Path(path))
            if steps is not None:       # the pipeline's step records: every step's output
                out += [(s["step"], Path(s["out"])) for s in steps]
                continue
            out.append((label or Path(path).name, Path(path)))
        return out
    return [("finetune", stages.out_dir("finetune", recipe)),
            ("importance", ranking_path(recipe).parent),
            ("prune", stages.out_dir("prune", recipe)),
            ("cache", stages.out_dir("cache build", recipe)),
            ("distill", stages.out_dir("distill", recipe)),
            ("export", stages.out_dir("export", recipe)),
            ("evaluate", eval_dir(recipe))]


# ------------------------------------------------------------------------------------------- inputs

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); rerun the stage that wrote it") \
            from None


def plan_systems(recipe: cfg.Recipe) -> dict[str, dict]:
    """What a pipeline says about each system it evaluated (label, removal, healing, quant, the layers
    its model lacks), from its step records (``report.runs`` naming ``<run>/pipeline/steps``): the same
    whether the steps ran locally or as SLURM jobs. The removed layers come from the prune step's output."""
    recs: list[dict] = []
    for r in recipe.report.runs:
        steps = _step_records(Path(r.partition("=")[2] if "=" in r else r))
        recs += steps or []
    by_step = {s["step"]: s for s in recs}
    out: dict[str, dict] = {}
    for s in recs:
        sysd = s.get("system")
        if not isinstance(sysd, dict) or not sysd.get("name"):
            continue
        info = {k: sysd.get(k) for k in ("name", "label", "removal", "healing", "quant", "model", "storage",
                                         "storage_of", "audio_removal", "audio_of", "oneshot", "budget_of")}
        info["step"] = s["step"]
        removed: list = []
        audio_removed: list = []
        froms = sysd.get("removed_from") or []      # a prune step, or the chain of them of a pruned-in-steps student
        for name in ([froms] if isinstance(froms, str) else froms):
            prune = by_step.get(name)
            if prune:
                mp = Path(prune["out"]) / "meta.json"
                meta = _read_json(mp) if mp.exists() else {}
                removed += list(((meta or {}).get("pruned") or {}).get("removed_original") or [])
                audio_removed += list(((meta or {}).get("pruned") or {}).get("audio_removed_original") or [])
        info["removed_layers"] = sorted(set(removed)) if not isinstance(froms, str) else removed
        info["audio_removed_layers"] = audio_removed
        out[sysd["name"]] = info
    return out


def load_systems(edir: Path, order: Sequence[str], reference: str, warnings: list[str],
                 described: Mapping[str, dict] | None = None) -> list[dict]:
    """Every ``<edir>/<system>/scores.json`` with its description (``described``: from the pipeline's step
    records; else ``system.json`` beside the scores when present); in ``order`` when given, else the
    reference first and the rest by name."""
    found = {p.parent.name: p for p in sorted(edir.glob(f"*/{SCORES}"))} if edir.is_dir() else {}
    if not found:
        raise ReportError(f"no {SCORES} under {edir}: nothing to report. Run `stc evaluate --config <recipe>` "
                          f"first (it writes <evaluate.out>/<system>/{SCORES}), or point report.eval_dir at "
                          f"its output")
    names = list(order) or sorted(found, key=lambda n: (n != reference, n))
    missing = [n for n in names if n not in found]
    if missing:
        warnings.append(f"report.systems names {missing} but {edir} has no {SCORES} for them "
                        f"(found: {sorted(found)})")
    systems = []
    for n in names:
        if n not in found:
            continue
        s = _read_json(found[n])
        if not isinstance(s, dict) or not isinstance(s.get("directions"), dict):
            raise ReportError(f"{found[n]}: not a `stc evaluate` scores file (no 'directions' mapping)")
        if s.get("schema", 1) != 1:
            raise ReportError(f"{found[n]}: schema {s.get('schema')!r}; this report reads schema 1")
        meta_p = found[n].parent / SYSTEM
        sysinfo = (described or {}).get(n) or (_read_json(meta_p) if meta_p.exists() else {})
        systems.append({"name": n, "dir": found[n].parent, "scores": s,
                        "info": sysinfo if isinstance(sysinfo, dict) else {}})
    return systems


def _score(d: Mapping[str, Any], key: str) -> float | None:
    v = d.get(key)
    if isinstance(v, Mapping):
        v = v.get("score")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else 100.0 * a / b


def _speed_fields(sp: Mapping[str, Any]) -> dict:
    """Speed as the report shows it. ``latency_s`` is the batch-1 latency; a ``scores.json`` written before
    that existed (no ``batch_seconds_per_sentence``) kept the batched time per sentence under
    ``latency_s``: it is read as such, and its latency is unknown."""
    new = "batch_seconds_per_sentence" in sp
    return {"tokens_per_s": sp.get("tokens_per_s"), "sentences_per_s": sp.get("sentences_per_s"),
            "batch_size": sp.get("batch_size"),
            "batch_seconds_per_sentence": sp.get("batch_seconds_per_sentence") if new else sp.get("latency_s"),
            "latency_s": sp.get("latency_s") if new else None, "latency_p50_s": sp.get("latency_p50_s"),
            "latency_samples": sp.get("latency_samples")}


def _count(n: Any, rate: Any) -> int | None:
    """How many sentences a rate of ``n`` stands for (rates are counts / n, so this is exact)."""
    if not isinstance(n, (int, float)) or not isinstance(rate, (int, float)):
        return None
    return int(round(n * rate))


def build_rows(systems: list[dict], reference: str) -> tuple[list[str], list[dict]]:
    """Directions (in first-seen order) and one row per system with scores, retained % and size/speed."""
    directions: list[str] = []
    for s in systems:
        for d in s["scores"]["directions"]:
            if d not in directions:
                directions.append(d)
    ref = next((s for s in systems if s["name"] == reference), None)
    ref_dirs = ref["scores"]["directions"] if ref else {}
    ref_mi = (ref["scores"].get("model_info") or {}) if ref else {}
    rows = []
    for s in systems:
        sc, info = s["scores"], s["info"]
        mi, sp = sc.get("model_info") or {}, sc.get("speed") or {}
        row: dict[str, Any] = {
            "system": s["name"], "label": info.get("label") or "", "model": sc.get("model"), "split": sc.get("split"),
            "n": sc.get("n"), "shuffle_audio": bool(sc.get("shuffle_audio")),
            "removed_layers": info.get("removed_layers"), "removal": info.get("removal"),
            "healing": info.get("healing"), "storage": info.get("storage") or "",
            "storage_of": info.get("storage_of") or "", "notes": info.get("notes"),
            "audio_removal": info.get("audio_removal") or 0, "audio_of": info.get("audio_of") or "",
            "audio_removed_layers": info.get("audio_removed_layers") or [], "oneshot": info.get("oneshot") or "",
            "budget_of": info.get("budget_of") or "",
            "decoder_layers": mi.get("decoder_layers"), "params_total": mi.get("params_total"),
            "params_stored": mi.get("params_stored"), "storage_bytes": mi.get("storage_bytes"),
            "storage_mb": mi["storage_bytes"] / 1e6 if isinstance(mi.get("storage_bytes"), (int, float)) else None,
            "quant": mi.get("quant"), "dtype": mi.get("dtype"),
            "params_stored_pct": _pct(mi.get("params_stored"), ref_mi.get("params_stored")),
            "storage_pct": _pct(mi.get("storage_bytes"), ref_mi.get("storage_bytes")),
            **_speed_fields(sp), "speed_device": sp.get("device"), "world_size": sp.get("world_size"),
            "warnings": list(sc.get("warnings") or []), "directions": {},
        }
        for d in directions:
            dd = sc["directions"].get(d)
            if dd is None:
                continue
            rd = ref_dirs.get(d) or {}
            prim = dd.get("primary") or {}
            rprim = rd.get("primary") or {}
            same_metric = prim.get("metric") == rprim.get("metric")
            comet = dd.get("comet") or {}
            e = {"n": dd.get("n"), **{m: _score(dd, m) for m in METRICS}, "comet": _score(dd, "comet"),
                 "comet_skipped": comet.get("skipped"), "primary_metric": prim.get("metric"),
                 "primary": _score(dd, "primary"),
                 "copy_source_rate": dd.get("copy_source_rate"), "wrong_language_rate": dd.get("wrong_language_rate"),
                 "empty_rate": dd.get("empty_rate"),
                 **{f"{k}_count": _count(dd.get("n"), dd.get(f"{k}_rate"))
                    for k in ("copy_source", "wrong_language", "empty")},
                 "signatures": {m: (dd.get(m) or {})["signature"] for m in METRICS
                                if (dd.get(m) or {}).get("signature")}}
            e["retained"] = _pct(e["primary"], _score(rd, "primary")) if same_metric else None
            e["retained_by_metric"] = {m: _pct(e[m], _score(rd, m)) for m in (*METRICS, "comet")}
            row["directions"][d] = e
        rows.append(row)
    return directions, rows


# ------------------------------------------------------------------------------------------- bars

def parse_bars(bars: Sequence[str]) -> list[dict]:
    """Parse every bar; all problems raised at once, naming report.bars[i]."""
    out, problems = [], []
    for i, text in enumerate(bars):
        m = _BAR.match(text)
        if not m:
            problems.append(f"report.bars[{i}]: {text!r} is not 'system[@direction]:field>=value' "
                            f"(operators >= <= > < ==)")
            continue
        system, direction, field, op, value = m.groups()
        field = {"chrf++": "chrfpp", "params_pct": "params_stored_pct"}.get(field, field)
        if field not in DIR_FIELDS and field not in SYS_FIELDS:
            problems.append(f"report.bars[{i}]: unknown field {field!r} in {text!r}; one of "
                            f"{', '.join(DIR_FIELDS + SYS_FIELDS)}")
            continue
        if direction and field in SYS_FIELDS:
            problems.append(f"report.bars[{i}]: {field!r} is a per-system field; drop '@{direction}' in {text!r}")
            continue
        out.append({"bar": text.strip(), "system": system, "direction": direction, "field": field, "op": op,
                    "threshold": float(value)})
    if problems:
        raise cfg.ConfigError(problems)
    return out


def evaluate_bars(bars: list[dict], rows: list[dict], directions: list[str]) -> list[dict]:
    by_name = {r["system"]: r for r in rows}
    results = []
    for b in bars:
        row = by_name.get(b["system"])
        res = dict(b, status="n/a", values={})
        if row is None:
            res["why"] = f"no system {b['system']!r} in the evaluation"
            results.append(res)
            continue
        if b["field"] in SYS_FIELDS:
            cells = {"": row.get(b["field"])}
        else:
            dirs = [b["direction"]] if b["direction"] else [d for d in directions if d in row["directions"]]
            cells = {d: (row["directions"].get(d) or {}).get(b["field"]) for d in dirs}
        statuses = []
        for k, v in cells.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                statuses.append("n/a")
                res["values"][k] = None
            else:
                statuses.append("PASS" if _OPS[b["op"]](float(v), b["threshold"]) else "FAIL")
                res["values"][k] = float(v)
        res["status"] = "FAIL" if "FAIL" in statuses else ("n/a" if "n/a" in statuses or not statuses else "PASS")
        if res["status"] == "n/a" and not res.get("why"):
            res["why"] = "value missing" + (" (no reference system?)" if b["field"] in
                                            ("retained", "params_stored_pct", "storage_pct") else "")
        results.append(res)
    return results


# ------------------------------------------------------------------------------------------- device-hours

def _step_records(path: Path) -> list[dict] | None:
    """The records a pipeline keeps under ``<run>/pipeline/steps/`` (step, index, stage, out, ranks,
    seconds), in plan order (``index``); None when ``path`` is not such a folder."""
    if not path.is_dir() or path.name != "steps" or path.parent.name != "pipeline":
        return None
    recs = []
    for p in sorted(path.glob("*.json")):
        doc = _read_json(p)
        if isinstance(doc, dict) and doc.get("out") and doc.get("step"):
            recs.append(doc)
    recs.sort(key=lambda r: (r.get("index") if isinstance(r.get("index"), int) else 1 << 30, r["step"]))
    _STEP_TIME.update({str(Path(r["out"])): r for r in recs})
    return recs


_STEP_TIME: dict[str, dict] = {}   # out dir -> its pipeline step record (wall seconds and ranks, when known)


def _last_device_hours(metrics: Path) -> float | None:
    recs, _ = read_jsonl(metrics)
    vals = [float(r["device_hours"]) for r in recs if isinstance(r.get("device_hours"), (int, float))]
    return max(vals) if vals else None  # cumulative across resumes: the largest is the total


def stage_device_hours(label: str, d: Path) -> dict:
    """What ``d`` records about device time, as hours, with the rule used (or n/a and why)."""
    try:
        return _stage_device_hours(label, d)
    except (ReportError, OSError, TypeError, ValueError, AttributeError) as e:  # a bad file costs one cell only
        return {"stage": label, "dir": str(d), "device_hours": None, "source": f"n/a: {e}"}


def _stage_device_hours(label: str, d: Path) -> dict:
    row: dict[str, Any] = {"stage": label, "dir": str(d), "device_hours": None, "source": ""}
    if not d.exists():
        row["source"] = "not run (directory missing)"
        return row
    if (d / "metrics.jsonl").exists():
        h = _last_device_hours(d / "metrics.jsonl")
        if h is not None:
            row.update(device_hours=h, source="metrics.jsonl device_hours (optimizer-step seconds x world size; "
                                              "excludes loading and checkpoint saves)")
            return row
    rk = d / "ranking.json"
    if rk.exists():
        scan = (_read_json(rk).get("scan") or {})
        if isinstance(scan.get("seconds"), (int, float)):
            w = int(scan.get("world_size") or 1)
            row.update(device_hours=float(scan["seconds"]) * w / 3600,
                       source=f"ranking.json scan.seconds x world_size ({w}); the last run's scan only")
            return row
    scores = sorted(d.glob(f"*/{SCORES}")) or ([d / SCORES] if (d / SCORES).exists() else [])
    if scores:
        total, n = 0.0, 0
        for p in scores:
            sp = _read_json(p).get("speed") or {}
            if isinstance(sp.get("seconds"), (int, float)):
                total += float(sp["seconds"]) * int(sp.get("world_size") or 1)
                n += 1
        if n:
            row.update(device_hours=total / 3600,
                       source=f"{SCORES} speed.seconds x world_size, summed over {n} system(s)")
            return row
    mp = d / "meta.json"
    meta = _read_json(mp) if mp.exists() else {}
    if isinstance(meta, dict) and meta:
        if isinstance(meta.get("device_hours"), (int, float)):
            row.update(device_hours=float(meta["device_hours"]), source="meta.json device_hours")
            return row
        if isinstance(meta.get("seconds"), (int, float)):
            w = int(meta.get("world_size") or 1)
            row.update(device_hours=float(meta["seconds"]) * w / 3600, source=f"meta.json seconds x world_size ({w})")
            return row
        shards = meta.get("shards") if meta.get("kind") == "cache" else None
        if isinstance(shards, list) and shards:
            secs = [((s.get("seconds") or {}).get("total")) for s in shards if isinstance(s, dict)]
            if secs and all(isinstance(v, (int, float)) for v in secs):
                row.update(device_hours=sum(secs) / 3600,
                           source=f"meta.json: sum of {len(secs)} shards' seconds (each shard by one rank; "
                                  f"excludes teacher loading)")
                return row
    step = _STEP_TIME.get(str(d))
    if step and isinstance(step.get("seconds"), (int, float)):
        w = int(step.get("ranks") or 1)
        row.update(device_hours=float(step["seconds"]) * w / 3600,
                   source=f"pipeline step wall time x {w} rank(s) (includes start-up and loading)")
        return row
    row["source"] = "n/a: the stage records no device time"
    return row


def own_device_hours(rows: list[dict], out: Path, seconds: float) -> None:
    """The report's own row: its build time so far (reading, bootstrap, plots) on one process, replacing
    whatever the row for ``out`` said (a report cannot read the time of its own run from anywhere else);
    added when no row names ``out``."""
    row = {"stage": "report", "dir": str(out), "device_hours": seconds / 3600,
           "source": "this report's own build time (1 process)"}
    for h in rows:
        if Path(h["dir"]).resolve() == out.resolve():
            h.update(device_hours=row["device_hours"], source=row["source"])
            return
    rows.append(row)


# ------------------------------------------------------------------------------------------- importance

def importance_section(path: Path) -> dict:
    if not path.exists():
        return {"path": str(path), "missing": True}
    doc = _read_json(path)
    orig = dict(zip(doc.get("removed") or [], doc.get("removed_original") or []))
    steps = []
    for c in doc.get("forced") or []:
        steps.append({"iteration": 0, "layer": c, "original": orig.get(c), "score": None, "relative": None,
                      "forced": True})
    for it in doc.get("iterations") or []:
        for c in it.get("chosen") or []:
            one = len(it["chosen"]) == 1
            steps.append({"iteration": it.get("iteration"), "layer": c, "original": orig.get(c),
                          "score": (it.get("scores") or {}).get(str(c)),
                          "relative": it.get("relative") if one else None, "forced": False})
    if doc.get("block"):
        fin = doc.get("final") or {}
        steps += [{"iteration": 1, "layer": c, "original": orig.get(c), "score": fin.get("score"),
                   "relative": fin.get("relative"), "forced": False} for c in doc["block"]]
    return {"path": str(path), "missing": False, "method": doc.get("method"), "scorer": doc.get("scorer"),
            "metric": doc.get("metric"), "num_layers": doc.get("num_layers"), "n_samples": doc.get("n_samples"),
            "baseline": (doc.get("baseline") or {}).get("score"), "final": (doc.get("final") or {}).get("score"),
            "removed_original": doc.get("removed_original") or [], "steps": steps, "stopped": doc.get("stopped")}


# ------------------------------------------------------------------------------------------- significance

_HYP_CACHE: dict[str, dict[str, dict[str, tuple[str, str]]]] = {}


def read_hypotheses(path: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """``hypotheses.jsonl`` of one system as {direction: {key: (ref, hyp)}} (direction ``src-tgt``)."""
    k = str(path.resolve())
    if k not in _HYP_CACHE:
        recs, bad = read_jsonl(path)
        out: dict[str, dict[str, tuple[str, str]]] = {}
        for r in recs:
            if not isinstance(r, dict) or "key" not in r or "hyp" not in r or "ref" not in r:
                raise ReportError(f"{path}: a line lacks key/ref/hyp; rerun `stc evaluate` for this system")
            d = f"{r.get('src_lang')}-{r.get('tgt_lang')}"
            out.setdefault(d, {})[str(r["key"])] = (str(r["ref"]), str(r["hyp"]))
        _HYP_CACHE[k] = out
    return _HYP_CACHE[k]


def metric_object(metric: str, bleu_signature: str = "") -> Any:
    """The sacrebleu metric a direction's primary metric names (``chrf++``, ``chrf``, ``bleu``; BLEU with the
    tokenizer its signature records)."""
    from sacrebleu.metrics import BLEU, CHRF

    m = (metric or "").lower()
    if m in ("chrf++", "chrfpp"):
        return CHRF(word_order=2)
    if m == "chrf":
        return CHRF()
    if m == "bleu":
        tok = re.search(r"tok:([^|]+)", bleu_signature or "")
        return BLEU(tokenize=tok.group(1) if tok else "13a")
    raise ReportError(f"no paired bootstrap for metric {metric!r} (chrf++, chrf or bleu)")


def sentence_stats(metric: Any, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """sacrebleu's sufficient statistics, one row per sentence (their column sums give the corpus score)."""
    import numpy as np

    return np.asarray(metric._extract_corpus_statistics(list(hyps), [list(refs)]), dtype=np.float64)


def paired_bootstrap(metric: Any, refs: Sequence[str], base_hyps: Sequence[str], sys_hyps: Sequence[str],
                     resamples: int, seed: int) -> dict:
    """Paired bootstrap of ``score(system) - score(baseline)`` on the same test sentences, as sacrebleu's
    ``--paired-bs`` does it (:func:`sacrebleu.significance._paired_bs_test`): one seeded
    ``numpy.random.default_rng(seed).choice(n, (resamples, n))`` index matrix shared by both systems,
    each resample's corpus score recomputed by the metric from summed sentence statistics, and sacrebleu's
    p-value (:func:`sacrebleu.significance._compute_p_value`, two-sided: the share of centred resampled
    absolute differences above the observed one, with +1 smoothing). The 95% CI of the difference is the
    2.5 and 97.5 percentiles of the resampled differences. ``significant`` needs both the CI to exclude 0
    and p < 0.05; identical hypotheses give delta 0, CI [0, 0], p 1."""
    import numpy as np
    from sacrebleu.significance import _compute_p_value

    n = len(refs)
    sb, ss = sentence_stats(metric, base_hyps, refs), sentence_stats(metric, sys_hyps, refs)
    base = float(metric._compute_score_from_stats(list(sb.sum(0))).score)
    score = float(metric._compute_score_from_stats(list(ss.sum(0))).score)
    delta = score - base
    out = {"n": n, "baseline_score": base, "system_score": score, "delta": delta, "resamples": resamples,
           "seed": seed}
    if list(base_hyps) == list(sys_hyps):
        return {**out, "delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "significant": False}
    idx = np.random.default_rng(seed).choice(n, size=(resamples, n), replace=True)
    counts = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(resamples), n), idx.ravel()), 1.0)
    rb, rs = counts @ sb, counts @ ss        # integer statistics: the sums are exact
    bl = np.array([metric._compute_score_from_stats(list(r)).score for r in rb])
    sy = np.array([metric._compute_score_from_stats(list(r)).score for r in rs])
    diffs = sy - bl
    lo, hi = (float(x) for x in np.percentile(diffs, [2.5, 97.5]))
    absd = np.abs(diffs)
    p = float(_compute_p_value(absd - absd.mean(), abs(delta)))
    return {**out, "ci_low": lo, "ci_high": hi, "p_value": p, "significant": bool(p < 0.05 and not lo <= 0.0 <= hi)}


SIZE_PAIR_TOLERANCE = 0.10   # an equal-bytes comparison pairs students whose sizes differ by at most 10%


def comparison_pairs(rows: list[dict], reference: str) -> list[tuple[str, str, str]]:
    """(kind, baseline, system): every system against the reference (``reference``), and every healed
    variant against the CE-only system with the same removal (``healing``: the CE-only one is ``ce``, the
    variants every other system with that removal whose healing is neither ``none`` nor ``ce``, stored with the
    same levers: a vocabulary-trimmed export is compared with the teacher and on the frontier, not as a healing),
    and every other export of the same trained weights against the system it was exported from (``storage``:
    what a storage lever costs, e.g. an nf4 lm_head against the bf16 one).

    A student that lost audio-encoder layers too (``audio_removal`` > 0) is compared with the student
    that lost the same decoder layers only (``audio``: ``audio_of``, what the audio layers cost) and with
    the decoder-only student of the same healing and storage nearest to it in bytes on disk, when that one
    is within :data:`SIZE_PAIR_TOLERANCE` of its size (``size``: pruning the encoder against pruning more
    decoder layers at about equal bytes). A student pruned in steps (prune -> heal -> prune) is compared
    with the student that lost its share of layers at once (``steps``: ``oneshot``), and with the one that
    lost them at once and was healed as long in all (``steps``: the system whose ``budget_of`` names it)."""
    names = {r["system"] for r in rows}
    pairs = [("reference", reference, r["system"]) for r in rows if reference in names and r["system"] != reference]
    pairs += [("storage", r["storage_of"], r["system"]) for r in rows
              if r.get("storage_of") in names and r["storage_of"] != r["system"]]
    for ce in rows:
        if ce.get("healing") != "ce":
            continue
        for v in rows:
            if (v is not ce and v.get("removal") == ce.get("removal") and v.get("healing")
                    and v.get("healing") not in ("none", "ce") and (v.get("storage") or "") == (ce.get("storage") or "")
                    and (v.get("audio_removal") or 0) == (ce.get("audio_removal") or 0)):
                pairs.append(("healing", ce["system"], v["system"]))
    pairs += [("steps", r["oneshot"], r["system"]) for r in rows
              if r.get("oneshot") in names and r["oneshot"] != r["system"]]
    pairs += [("steps", r["system"], r["budget_of"]) for r in rows
              if r.get("budget_of") in names and r["budget_of"] != r["system"]]
    for a in rows:
        if not a.get("audio_removal"):
            continue
        if a.get("audio_of") in names and a["audio_of"] != a["system"]:
            pairs.append(("audio", a["audio_of"], a["system"]))
        size = a.get("storage_bytes")
        peers = [r for r in rows if r["system"] not in (a["system"], reference) and not r.get("audio_removal")
                 and r.get("healing") == a.get("healing") and (r.get("storage") or "") == (a.get("storage") or "")
                 and isinstance(r.get("storage_bytes"), (int, float)) and r.get("removal")]
        if isinstance(size, (int, float)) and size > 0 and peers:
            near = min(peers, key=lambda r: abs(r["storage_bytes"] - size))
            if abs(near["storage_bytes"] - size) <= SIZE_PAIR_TOLERANCE * size and near["system"] != a.get("audio_of"):
                pairs.append(("size", near["system"], a["system"]))
    return pairs


def significance(systems: list[dict], rows: list[dict], reference: str, resamples: int, seed: int,
                 warnings: list[str]) -> list[dict]:
    """Paired bootstrap of the primary metric, per direction, for every :func:`comparison_pairs` pair, on
    the two systems' ``hypotheses.jsonl`` aligned by key. Key sets (or references) that differ are an
    error naming both files; a system without hypotheses is skipped with a warning."""
    if resamples <= 0:
        return []
    by_name = {s["name"]: s for s in systems}
    row_by = {r["system"]: r for r in rows}
    missing: set[str] = set()
    out = []
    for kind, a, b in comparison_pairs(rows, reference):
        pa, pb = by_name[a]["dir"] / HYPOTHESES, by_name[b]["dir"] / HYPOTHESES
        lack = [n for n, p in ((a, pa), (b, pb)) if not p.is_file()]
        if lack:
            missing.update(lack)
            continue
        ha, hb = read_hypotheses(pa), read_hypotheses(pb)
        for d in row_by[b]["directions"]:
            if d not in row_by[a]["directions"] or d not in ha or d not in hb:
                continue
            ea, eb = row_by[a]["directions"][d], row_by[b]["directions"][d]
            if ea["primary_metric"] != eb["primary_metric"]:
                warnings.append(f"{b} vs {a} on {d}: primary metrics differ ({eb['primary_metric']!r} vs "
                                f"{ea['primary_metric']!r}): no paired bootstrap")
                continue
            ka, kb = set(ha[d]), set(hb[d])
            if ka != kb:
                raise ReportError(
                    f"paired bootstrap {b} vs {a} on {d}: {pa} and {pb} hold different sentences "
                    f"({len(ka - kb)} key(s) only in the first, {len(kb - ka)} only in the second, e.g. "
                    f"{sorted(ka ^ kb)[:3]}); evaluate both systems on the same split and settings "
                    f"(or set report.bootstrap=0)")
            keys = sorted(ka)
            bad_ref = [k for k in keys if ha[d][k][0] != hb[d][k][0]]
            if bad_ref:
                raise ReportError(f"paired bootstrap {b} vs {a} on {d}: {pa} and {pb} have different references "
                                  f"for {len(bad_ref)} key(s), e.g. {bad_ref[:3]}; re-evaluate on the same data")
            metric = metric_object(eb["primary_metric"], eb["signatures"].get("bleu", ""))
            res = paired_bootstrap(metric, [ha[d][k][0] for k in keys], [ha[d][k][1] for k in keys],
                                   [hb[d][k][1] for k in keys], resamples, seed)
            out.append({"kind": kind, "baseline": a, "system": b, "direction": d, "metric": eb["primary_metric"],
                        **res})
    if missing:
        warnings.append(f"no {HYPOTHESES} for {sorted(missing)}: their differences have no confidence interval")
    return out


def short_reference_warnings(systems: list[dict], rows: list[dict], directions: list[str]) -> list[dict]:
    """Directions on which BLEU-4 is meaningless: the references, tokenized by the direction's BLEU
    tokenizer (from its signature), have a median under 4 tokens or over half of them have fewer than 4
    (4-grams barely exist, so BLEU is 0 or near it for any system). One record per such direction
    with the share, the median and whether BLEU is 0 for every system."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    out = []
    for d in directions:
        refs = None
        for s in systems:
            p = s["dir"] / HYPOTHESES
            if p.is_file() and d in read_hypotheses(p):
                refs = [ref for ref, _ in read_hypotheses(p)[d].values()]
                break
        if not refs:
            continue
        sig = next((r["directions"][d]["signatures"].get("bleu", "") for r in rows if d in r["directions"]), "")
        tok = re.search(r"tok:([^|]+)", sig)
        try:
            tokenizer = BLEU(tokenize=tok.group(1) if tok else "13a").tokenizer
        except Exception:  # a tokenizer whose extra is not installed here: count on whitespace
            tokenizer = str
        lens = np.array([len(tokenizer(r).split()) for r in refs])
        share = float(np.mean(lens < 4))
        med = float(np.median(lens))
        if med < 4 or share > 0.5:
            bleus = [r["directions"][d]["bleu"] for r in rows if d in r["directions"]]
            zero = bool(bleus) and all(b is not None and b == 0 for b in bleus)
            head = f"BLEU is 0 for every system on {d}" if zero else f"BLEU is unreliable on {d}"
            out.append({"direction": d, "short_share": share, "median_tokens": med, "n": len(refs),
                        "bleu_all_zero": zero,
                        "message": f"{head}: {100 * share:.0f}% of the references have fewer than 4 tokens "
                                   f"(median {med:g}), so 4-grams barely exist; read chrF/chrF++"})
    return out


# ------------------------------------------------------------------------------------------- rankings

def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho: the Pearson correlation of the two samples' ranks, ties given their average rank.
    None when fewer than 2 pairs or one side is constant."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError("spearman: samples of different lengths")
    if len(a) < 2:
        return None

    def ranks(x: Sequence[float]) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                j += 1
            r[order[i:j + 1]] = (i + j) / 2 + 1
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
    return None if den == 0 else float((ra * rb).sum() / den)


def ranking_paths(recipe: cfg.Recipe) -> list[tuple[str, Path]]:
    """``report.rankings`` as (label, ranking.json path); a missing file is an error naming it and the key."""
    out, problems = [], []
    for i, entry in enumerate(recipe.report.rankings):
        label, _, path = entry.partition("=") if "=" in entry else ("", "", entry)
        p = Path(path.strip())
        p = p if p.suffix == ".json" else p / "ranking.json"
        if not p.is_file():
            problems.append(f"report.rankings[{i}]: {p} not found (entry {entry!r}); point it at a ranking.json "
                            f"written by `stc importance`, or its directory")
            continue
        out.append((label.strip() or p.parent.name, p))
    if problems:
        raise ReportError("; ".join(problems))
    return out


def first_iteration_importance(doc: Mapping[str, Any]) -> dict[int, float]:
    """{original layer index: importance} from the first iteration (every candidate scored with nothing
    removed), oriented so that larger means more important whatever the scorer: with a quality metric
    (``higher_is_better``) removing an important layer lowers the score, so importance = -score; with a
    loss-like metric importance = score."""
    its = doc.get("iterations") or []
    if not its:
        return {}
    mapping = dict(zip(list(doc.get("removed") or []) + list(doc.get("kept") or []),
                       list(doc.get("removed_original") or []) + list(doc.get("kept_original") or [])))
    sign = -1.0 if doc.get("higher_is_better", True) else 1.0
    return {int(mapping.get(int(c), int(c))): sign * float(v) for c, v in (its[0].get("scores") or {}).items()
            if isinstance(v, (int, float))}


def compare_rankings(named: list[tuple[str, Path]]) -> dict:
    """Spearman's rho per pair of rankings over the original layers both scored in their first iteration,
    plus each ranking's scorer, metric and removal order (original indices)."""
    docs = []
    for label, p in named:
        d = _read_json(p)
        docs.append({"label": label, "path": str(p), "scorer": d.get("scorer"), "metric": d.get("metric"),
                     "higher_is_better": d.get("higher_is_better"), "method": d.get("method"),
                     "removal_order": list(d.get("removed_original") or []),
                     "importance": first_iteration_importance(d)})
    pairs = []
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            a, b = docs[i], docs[j]
            common = sorted(set(a["importance"]) & set(b["importance"]))
            rho = spearman([a["importance"][c] for c in common], [b["importance"][c] for c in common]) \
                if len(common) >= 2 else None
            pairs.append({"a": a["label"], "b": b["label"], "layers": len(common), "rho": rho})
    for d in docs:
        d["importance"] = {str(k): v for k, v in sorted(d["importance"].items())}
    return {"rankings": docs, "pairs": pairs}


# ------------------------------------------------------------------------------------------- configs

def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _yaml_value(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v, ensure_ascii=False, default=str)


_ABSENT = object()


def config_diff(base: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """``key: base value -> other value`` for every dotted key whose value differs (absent on one side
    shown as ``(absent)``), sorted by key."""
    fb, fo = _flatten(base), _flatten(other)
    out = []
    for k in sorted(set(fb) | set(fo)):
        a, b = fb.get(k, _ABSENT), fo.get(k, _ABSENT)
        if a is _ABSENT or b is _ABSENT or a != b:
            out.append(f"{k}: {_yaml_value(a)} -> {_yaml_value(b)}")
    return out


def _load_yaml(p: Path) -> dict:
    import yaml

    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as e:
        raise ReportError(f"{p}: not valid YAML ({e})") from None
    return doc if isinstance(doc, dict) else {}


def pipeline_config(recipe: cfg.Recipe) -> Path | None:
    """``<run>/pipeline/config.yaml`` of the first ``report.runs`` entry that names ``<run>/pipeline/steps``."""
    for r in recipe.report.runs:
        p = Path(r.partition("=")[2] if "=" in r else r)
        if p.name == "steps" and p.parent.name == "pipeline" and (p.parent / "config.yaml").is_file():
            return p.parent / "config.yaml"
    return None


def config_diffs(runs: list[tuple[str, Path]], edir: Path, rank: Path, recipe_path: Path | None) -> dict:
    """The configs next to the outputs, as differences. With the pipeline's resolved config
    (``recipe_path``, the recipe) every stage's ``config.yaml`` is shown as the keys whose values differ
    from it; without one the first config found is the base. Configs with the same differences are
    grouped (every path listed once)."""
    cands: list[tuple[str, Path]] = [(label, d / "config.yaml") for label, d in runs]
    cands += [("importance", rank.parent / "config.yaml"), ("evaluate", edir / "config.yaml")]
    cands += [(f"evaluate {p.parent.name}", p) for p in sorted(edir.glob("*/config.yaml"))]
    seen: set[Path] = set()
    found: list[tuple[str, Path]] = []
    for label, p in cands:
        if not p.is_file() or p.resolve() in seen or (recipe_path and p.resolve() == recipe_path.resolve()):
            continue
        seen.add(p.resolve())
        found.append((label, p))
    base_path = recipe_path if recipe_path is not None else (found[0][1] if found else None)
    if base_path is None:
        return {"recipe": None, "base": None, "groups": []}
    base = _load_yaml(base_path)
    groups: dict[tuple[str, ...], dict] = {}
    for label, p in found:
        if recipe_path is None and p == base_path:
            continue
        diff = tuple(config_diff(base, _load_yaml(p)))
        g = groups.setdefault(diff, {"diff": list(diff), "configs": []})
        g["configs"].append({"stage": label, "path": str(p)})
    return {"recipe": str(recipe_path) if recipe_path else None, "base": str(base_path),
            "groups": list(groups.values())}


# ------------------------------------------------------------------------------------------- formatting

def _f(v: Any, digits: int = 2) -> str:
    return fmt_cell(v, digits)


def _rate(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{100 * v:.1f}%"


def _params(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v / 1e9:.2f}B" if v >= 1e8 else f"{v / 1e6:.2f}M"


def _hours(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _pct_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _ms(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{1000 * v:.1f}"


def table_markdown(directions: list[str], rows: list[dict], reference: str, has_ref: bool) -> list[str]:
    head = ["system", "decoder layers", "params stored", "storage MB"]
    for d in directions:
        head += [f"{d} BLEU", f"{d} chrF", f"{d} chrF++", f"{d} primary % of {reference}" if has_ref
                 else f"{d} primary", f"{d} copy-src", f"{d} wrong-lang"]
    bs = sorted({r["batch_size"] for r in rows if isinstance(r.get("batch_size"), int)})
    head += ["tokens/s", f"throughput at batch {bs[0]} (sentences/s)" if len(bs) == 1 else
             "throughput at eval batch (sentences/s)", "latency, batch 1 (ms/sentence)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        name = f"**{r['system']}**" if r["system"] == reference else r["system"]
        if r["shuffle_audio"]:
            name += " (shuffled audio)"
        cells = [name, _f(r["decoder_layers"]), _params(r["params_stored"]), _f(r["storage_mb"], 1)]
        for d in directions:
            e = r["directions"].get(d)
            if e is None:
                cells += ["-"] * 6
                continue
            prim = (f"{_pct_s(e['retained'])} ({_f(e['primary'])} {e['primary_metric']})" if has_ref
                    else f"{_f(e['primary'])} {e['primary_metric'] or ''}".strip())
            cells += [_f(e["bleu"]), _f(e["chrf"]), _f(e["chrfpp"]), prim, _rate(e["copy_source_rate"]),
                      _rate(e["wrong_language_rate"])]
        thr = _f(r["sentences_per_s"], 2)
        if len(bs) > 1 and r.get("batch_size"):
            thr += f" (batch {r['batch_size']})"
        cells += [_f(r["tokens_per_s"], 1), thr, _ms(r.get("latency_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def counts_markdown(directions: list[str], rows: list[dict]) -> list[str]:
    """Copy-of-source, wrong-language and empty outputs as sentence counts (of n) per system and direction."""
    head = ["system"] + [f"{d} {k}" for d in directions for k in ("copy-src", "wrong-lang", "empty")]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["system"]]
        for d in directions:
            e = r["directions"].get(d)
            if e is None:
                cells += ["-"] * 3
                continue
            n = e.get("n")
            cells += [f"{e[k]} / {n}" if e.get(k) is not None else "-"
                      for k in ("copy_source_count", "wrong_language_count", "empty_count")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def significance_markdown(sig: list[dict], resamples: int, seed: int) -> list[str]:
    L = ["## Are the differences real? (paired bootstrap, 95% CI)", ""]
    if resamples <= 0:
        return L + ["Off (`report.bootstrap=0`): differences below carry no confidence interval.", ""]
    if not sig:
        return L + ["No pair to compare (needs the reference system or a CE-only system, and their "
                    f"`{HYPOTHESES}`).", ""]
    L += [f"Primary metric of each direction; delta = system - baseline, on the same test sentences; "
          f"{resamples} paired resamples (sacrebleu's paired bootstrap, seed {seed}). A difference whose 95% "
          f"CI includes 0 (or p >= 0.05) is **not significant**: with one seed and this test set it cannot be "
          f"told from noise.", "",
          "| direction | system | baseline | metric | system score | baseline score | delta | 95% CI | p | verdict |",
          "|---|---|---|---|---:|---:|---:|---|---:|---|"]
    size = sorted({(c["system"], c["baseline"]) for c in sig if c["kind"] == "size"})
    if size:
        L[-2:-2] = [f"Audio encoder against decoder at about equal bytes: {', '.join(f'`{a}` vs `{b}`' for a, b in size)} "
                    f"(each student that lost audio-encoder layers against the decoder-only student nearest to it "
                    f"in bytes on disk, within {100 * SIZE_PAIR_TOLERANCE:.0f}%).", ""]
    for c in sig:
        L.append(f"| {c['direction']} | {c['system']} | {c['baseline']} | {c['metric']} | {_f(c['system_score'])} | "
                 f"{_f(c['baseline_score'])} | {c['delta']:+.2f} | [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | "
                 f"{c['p_value']:.3f} | {'significant' if c['significant'] else 'not significant'} |")
    return L + [""]


def markdown(doc: Mapping[str, Any], configs: Mapping[str, Any]) -> str:
    ref, dirs, rows = doc["reference"], doc["directions"], doc["systems"]
    has_ref = doc["reference_found"]
    L = [f"# {doc['title']}", "", f"Generated {doc['created']} from `{doc['eval_dir']}`"
         f" ({len(rows)} system(s); directions {', '.join(dirs)}).", ""]
    for w in doc["warnings"]:
        L.append(f"- **Warning:** {w}")
    if doc["warnings"]:
        L.append("")
    L += ["## Results", ""]
    if has_ref:
        L += [f"Primary metric (chrF++, or chrF for spaceless targets) as % of `{ref}`; rates are shares of "
              f"test sentences. Params counted as stored (4-bit weights packed two per byte); storage counts "
              f"only `*.safetensors` (MB = 10^6 bytes).", ""]
    L += table_markdown(dirs, rows, ref, has_ref)
    L += ["", "Speed: throughput = sentences per second of wall time when translating in batches of the "
          "evaluation's batch size; latency = mean milliseconds per sentence translated alone (batch 1, "
          "`evaluate.latency_samples` sentences after a warm-up); '-' where not measured.", ""]
    described = [r for r in rows if r["label"] or r["removed_layers"] or r["healing"]]
    if described:
        for r in described:
            bits = [r["label"]] if r["label"] else []
            if r["removed_layers"]:
                how = r["removal"]
                if isinstance(how, (int, float)) and not isinstance(how, bool):  # a fraction of the decoder layers
                    how = f"{100 * how:.0f}% of decoder layers" if how < 1 else f"{how:g} layers"
                bits.append(f"removed layers {r['removed_layers']}" + (f" ({how})" if how else ""))
            if r.get("audio_removed_layers"):
                ar = r.get("audio_removal")
                bits.append(f"removed audio-encoder layers {r['audio_removed_layers']}"
                            + (f" ({100 * ar:.0f}% of them)" if isinstance(ar, float) and 0 < ar < 1 else ""))
            if r["healing"]:
                bits.append(f"healing {r['healing']}")
            if r["notes"]:
                bits.append(str(r["notes"]))
            L.append(f"- `{r['system']}`: " + "; ".join(bits))
        L.append("")
    L += ["Copy-of-source, wrong-language and empty outputs, as sentence counts:", ""]
    L += counts_markdown(dirs, rows)
    L += [""]
    L += significance_markdown(doc.get("significance") or [], doc.get("bootstrap", 0), doc.get("seed", 0))
    L += ["Details per direction:", "", "| system | direction | n | COMET | empty | BLEU % | chrF % | chrF++ % |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for d, e in r["directions"].items():
            rb = e["retained_by_metric"]
            comet = _f(e["comet"], 4) if e["comet"] is not None else (f"skipped ({e['comet_skipped']})"
                                                                       if e["comet_skipped"] else "-")
            L.append(f"| {r['system']} | {d} | {_f(e['n'])} | {comet} | {_rate(e['empty_rate'])} | "
                     f"{_pct_s(rb['bleu'])} | {_pct_s(rb['chrf'])} | {_pct_s(rb['chrfpp'])} |")
    L.append("")
    if doc["plots"]:
        L += ["![quality retained vs params as stored](" + PLOT_SIZE + ")", "",
              "![primary metric per system](" + PLOT_PRIMARY + ")", ""]

    L += frontier_markdown(doc.get("frontier") or {})
    L += storage_agreement_markdown(doc.get("storage_agreement") or [])
    if doc["plots"] and doc.get("frontier"):
        L += ["![quality against bytes on disk](" + PLOT_FRONTIER + ")", ""]
    L += ["## Quality bars", ""]
    if not doc["bars"]:
        L += ["No bars configured (`report.bars`, e.g. `kd-25:retained>=97`).", ""]
    else:
        L += ["| check | status | value(s) |", "|---|---|---|"]
        for b in doc["bars"]:
            vals = ", ".join(f"{k + ' ' if k else ''}{_f(v)}" for k, v in b["values"].items()) or b.get("why", "")
            if b["status"] == "n/a" and b.get("why") and b["values"]:
                vals += f" ({b['why']})"
            L.append(f"| `{b['bar']}` | **{b['status']}** | {vals} |")
        L.append("")

    L += ["## Device-hours per stage", "", "| stage | device-hours | directory | how counted |", "|---|---:|---|---|"]
    for h in doc["device_hours"]:
        L.append(f"| {h['stage']} | {_hours(h['device_hours'])} | `{h['dir']}` | {h['source']} |")
    known = [h["device_hours"] for h in doc["device_hours"] if h["device_hours"] is not None]
    L += [f"| **total (known)** | {_hours(sum(known) if known else None)} | | |", ""]

    imp = doc["importance"]
    L += ["## Layer importance", ""]
    if imp["missing"]:
        L += [f"No `{Path(imp['path']).name}` at `{imp['path']}` (run `stc importance`, or set report.importance).", ""]
    else:
        L += [f"{imp['method']} search, scorer `{imp['scorer']}`, metric `{imp['metric']}`, {imp['n_samples']} dev "
              f"samples; {imp['num_layers']} decoder layers; unpruned {_f(imp['baseline'], 4)}, pruned "
              f"{_f(imp['final'], 4)}. Removed (original indices, in order): {imp['removed_original']}.", ""]
        if imp.get("stopped"):
            L += [f"Stopped early: {imp['stopped']}", ""]
        if doc["importance_plot"]:
            L += [f"![layer importance]({PLOT_IMPORTANCE})", ""]
        L += ["| step | iteration | layer | original layer | score | % of unpruned |",
              "|---:|---:|---:|---:|---:|---:|"]
        for k, s in enumerate(imp["steps"], 1):
            L.append(f"| {k} | {s['iteration']} | {s['layer']} | {s['original']} | "
                     f"{'forced' if s['forced'] else _f(s['score'], 4)} | "
                     f"{_pct_s(None if s['relative'] is None else 100 * s['relative'])} |")
        L.append("")
    L += rankings_markdown(doc.get("rankings"))

    L += ["## sacrebleu signatures", ""]
    if doc["signatures"]:
        for d, per in doc["signatures"].items():
            for m, sigs in per.items():
                for sig, who in sigs.items():
                    L.append(f"- {d} {m}: `{sig}`" + (f" ({', '.join(who)})" if len(sigs) > 1 else ""))
        L.append("")
    else:
        L += ["none recorded", ""]

    L += configs_markdown(configs)
    return "\n".join(L)


def configs_markdown(configs: Mapping[str, Any]) -> list[str]:
    L = ["## Configs", ""]
    if not configs.get("base"):
        return L + ["No config.yaml found next to the outputs.", ""]
    if configs.get("recipe"):
        L += [f"Recipe (the pipeline's resolved config): `{configs['recipe']}`. Each stage's `config.yaml` below "
              f"is shown only as the keys whose values differ from it (`key: recipe value -> stage value`).", ""]
    else:
        L += [f"No pipeline config: base `{configs['base']}` (the first config found); every other `config.yaml` "
              f"is shown as the keys whose values differ from it (`key: base value -> its value`).", ""]
    for g in configs["groups"]:
        who = ", ".join(f"{c['stage']} (`{c['path']}`)" for c in g["configs"])
        if not g["diff"]:
            L.append(f"- {who}: same as the {'recipe' if configs.get('recipe') else 'base'}")
            continue
        L.append(f"- {who}:")
        L += [f"  - `{line}`" for line in g["diff"]]
    return L + [""]


def rankings_markdown(cmp: Mapping[str, Any] | None) -> list[str]:
    if not cmp or len(cmp.get("rankings") or []) < 2:
        return []
    L = ["### Importance scorers compared", "",
         "Spearman's rho between the per-layer importances of the first iteration (every candidate scored with "
         "nothing removed; oriented so that larger = more important for every metric), over the original layers "
         "both scored; 1 = same order, 0 = unrelated, -1 = reversed.", "",
         "| ranking | ranking | layers | Spearman rho |", "|---|---|---:|---:|"]
    for pr in cmp["pairs"]:
        L.append(f"| {pr['a']} | {pr['b']} | {pr['layers']} | {_f(pr['rho'], 3)} |")
    L += ["", "| ranking | scorer | metric | removal order (original layers) | file |", "|---|---|---|---|---|"]
    for r in cmp["rankings"]:
        L.append(f"| {r['label']} | {r['scorer']} | {r['metric']} | {r['removal_order']} | `{r['path']}` |")
    return L + [""]


# ------------------------------------------------------------------------------------------- plots

def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def size_scale(values: Sequence[float], unit: str = "params") -> tuple[float, str]:
    """(divisor, axis label) that puts the largest of ``values`` between 1 and 1000: thousands, millions or
    billions of parameters (``unit="params"``), or kB/MB/GB of storage (``unit="bytes"``, 10^3 steps)."""
    top = max((abs(v) for v in values), default=0.0)
    steps = ([(1e9, "billions"), (1e6, "millions"), (1e3, "thousands"), (1.0, "")] if unit == "params"
             else [(1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "bytes")])
    for div, name in steps:
        if top >= div:
            break
    if unit == "params":
        return div, "params as stored" + (f" ({name})" if name else "")
    return div, f"storage ({name})"


def plot_quality_vs_size(directions: list[str], rows: list[dict], reference: str, has_ref: bool) -> bytes:
    """Quality (retained % of the reference, or the primary metric) against size, one panel per direction.
    The x axis is in the unit that fits the models (parameters as stored; storage bytes when no system
    has a parameter count). Each system is a numbered marker; the numbers are explained in one legend,
    so no label can cover another; systems of the same size are spread side by side by 2.5% of the
    axis's span (the x position is then approximate; report.json has the exact sizes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_params = any(isinstance(r["params_stored"], (int, float)) for r in rows)
    field = "params_stored" if use_params else "storage_bytes"
    div, xlabel = size_scale([float(r[field]) for r in rows if isinstance(r[field], (int, float))],
                             "params" if use_params else "bytes")
    number = {r["system"]: k for k, r in enumerate(rows, 1)}
    cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    n_dirs = max(1, len(directions))
    fig, axes = plt.subplots(1, n_dirs, figsize=(5.0 * n_dirs + 2.5, 4.5), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, d in zip(axes[0], directions):
        key = "retained" if has_ref else "primary"
        pts = [(r[field] / div, r["directions"][d][key], r["system"]) for r in rows
               if d in r["directions"] and isinstance(r[field], (int, float)) and r["directions"][d][key] is not None]
        same: dict[float, list[str]] = {}           # systems of the same size sit side by side, not on top
        for x, _, name in pts:
            same.setdefault(round(x, 3), []).append(name)
        xs = [x for x, _, _ in pts]
        step = 0.025 * (((max(xs) - min(xs)) or max(xs)) if xs else 1.0) or 0.025
        if not pts:  # e.g. a reference that scores 0: nothing is a share of it
            ax.text(0.5, 0.5, f"no {'retained share' if has_ref else 'score'} to plot", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        for x, y, name in pts:
            k = number[name]
            color = cmap((k - 1) % cmap.N)
            group = same[round(x, 3)]
            x = x + step * (group.index(name) - (len(group) - 1) / 2)
            h = ax.scatter([x], [y], s=150 if name == reference else 110, marker="*" if name == reference else "o",
                           color=color, edgecolors="black", linewidths=0.5, zorder=3)
            ax.annotate(str(k), (x, y), ha="center", va="center", fontsize=7, color="white", weight="bold",
                        zorder=4)
            handles.setdefault(name, h)
        if has_ref:
            ax.axhline(100, ls="--", color="grey", lw=1)
            ax.axhline(97, ls=":", color="tab:red", lw=1)
        ax.set_xlabel(xlabel)
        metric = next((r["directions"][d]["primary_metric"] for r in rows if d in r["directions"]), "primary")
        ax.set_ylabel(f"{metric}, % of {reference}" if has_ref else f"{metric}")
        ax.set_title(d)
        ax.margins(x=0.12, y=0.1)
        ax.grid(alpha=0.3)
    labels = [f"{number[n]}  {n}" for n in handles]
    extra = []
    if has_ref:
        from matplotlib.lines import Line2D

        extra = [Line2D([], [], ls="--", color="grey", lw=1), Line2D([], [], ls=":", color="tab:red", lw=1)]
        labels += [f"100% of {reference}", "97%"]
    if handles:
        fig.legend(list(handles.values()) + extra, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8, frameon=False)
    return _png(fig)


def size_bin(nbytes: float) -> str:
    """The track's bin of a size on disk (see ``SIZE_BINS``)."""
    names = ["< 200 MB", "200-500 MB", "0.5-1 GB", "1-2 GB", "2-4 GB"]
    for edge, name in zip(SIZE_BINS, names):
        if nbytes < edge:
            return name
    return "> 4 GB"


def frontier(directions: list[str], rows: list[dict], sig: list[dict], reference: str) -> dict[str, list[dict]]:
    """Per direction, every system with its bytes on disk, primary score, the 95% interval of its
    difference to the reference (from the paired bootstrap, placed around the reference's score) and its
    size bin; ``pareto`` marks the systems no other system beats on both size and score (the shuffled-audio
    control is left out: it is not a system anyone would ship)."""
    out: dict[str, list[dict]] = {}
    ci = {(g["system"], g["direction"]): g for g in sig if g["kind"] == "reference"}
    for d in directions:
        pts = []
        for r in rows:
            e = r["directions"].get(d)
            if not e or e.get("primary") is None or not isinstance(r.get("storage_bytes"), (int, float)) \
                    or r.get("shuffle_audio"):
                continue
            g = ci.get((r["system"], d))
            lo = hi = None
            if g is not None:
                lo, hi = g["baseline_score"] + g["ci_low"], g["baseline_score"] + g["ci_high"]
            pts.append({"system": r["system"], "bytes": int(r["storage_bytes"]), "score": float(e["primary"]),
                        "metric": e["primary_metric"], "ci_low": lo, "ci_high": hi, "bin": size_bin(r["storage_bytes"]),
                        "reference": r["system"] == reference})
        for p in pts:
            p["pareto"] = not any(q is not p and q["bytes"] <= p["bytes"] and q["score"] >= p["score"]
                                  and (q["bytes"] < p["bytes"] or q["score"] > p["score"]) for q in pts)
        out[d] = sorted(pts, key=lambda p: p["bytes"])
    return out


def storage_agreement(systems: list[dict], directions: list[str]) -> list[dict]:
    """For every system that is another export of a system in the report (``storage_of``: the same trained
    weights stored with other levers), per direction: how many test sentences get the same greedy
    translation from both (a lossless lever, such as a vocabulary trim that encodes every input as before,
    gives all of them), with up to three that differ."""
    by_name = {s["name"]: s for s in systems}
    out = []
    for s in systems:
        base = by_name.get(s["info"].get("storage_of") or "")
        if base is None:
            continue
        pa, pb = base["dir"] / HYPOTHESES, s["dir"] / HYPOTHESES
        if not (pa.is_file() and pb.is_file()):
            continue
        ha, hb = read_hypotheses(pa), read_hypotheses(pb)
        for d in directions:
            a, b = ha.get(d) or {}, hb.get(d) or {}
            keys = sorted(set(a) & set(b))
            if not keys:
                continue
            differ = [k for k in keys if a[k][1] != b[k][1]]
            out.append({"system": s["name"], "of": base["name"], "direction": d, "n": len(keys),
                        "same": len(keys) - len(differ),
                        "examples": [{"key": k, base["name"]: a[k][1], s["name"]: b[k][1]} for k in differ[:3]]})
    return out


def storage_agreement_markdown(agree: list[dict]) -> list[str]:
    if not agree:
        return []
    L = ["### The same weights, stored otherwise: identical greedy translations", "",
         "| system | export of | direction | identical | of |", "|---|---|---|---:|---:|"]
    for a in agree:
        L.append(f"| {a['system']} | {a['of']} | {a['direction']} | {a['same']} | {a['n']} |")
    ex = [(a, e) for a in agree for e in a["examples"][:1]]
    if ex:
        L += ["", "First difference per row:", ""]
        for a, e in ex:
            L.append(f"- {a['system']} {a['direction']} `{e['key']}`: {a['of']}: {_clip(e[a['of']])!r}; "
                     f"{a['system']}: {_clip(e[a['system']])!r}")
    return L + [""]


def _clip(t: str, n: int = 80) -> str:
    return t if len(t) <= n else t[: n - 1] + "…"


def plot_frontier(front: Mapping[str, list[dict]], reference: str) -> bytes:
    """Quality against bytes on disk (log axis), one panel per direction: each system a numbered point with
    the 95% interval of its difference to the reference drawn around the score, the Pareto front as a
    line, the track's bin edges (200 MB ... 4 GB) as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    dirs = list(front) or [""]
    names = list(dict.fromkeys(p["system"] for d in dirs for p in front.get(d, [])))
    number = {n: k for k, n in enumerate(names, 1)}
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(dirs), figsize=(5.5 * len(dirs) + 2.5, 4.5), squeeze=False)
    handles: dict[str, Any] = {}
    fmt = FuncFormatter(lambda v, _: f"{v / 1e9:g} GB" if v >= 1e9 else f"{v / 1e6:g} MB" if v >= 1e6
                        else f"{v / 1e3:g} kB")
    for ax, d in zip(axes[0], dirs):
        pts = front.get(d, [])
        if not pts:
            ax.text(0.5, 0.5, "no system with a size and a score", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
            continue
        xs = [p["bytes"] for p in pts]
        lo_x, hi_x = min(xs) / 1.6, max(xs) * 1.6
        for edge in SIZE_BINS:
            if lo_x <= edge <= hi_x:
                ax.axvline(edge, color="grey", lw=0.8, ls=":")
                ax.text(edge, 1.0, f" {fmt(edge, 0)}", transform=ax.get_xaxis_transform(), fontsize=7,
                        color="grey", va="top", rotation=90)
        par = [p for p in pts if p["pareto"]]
        ax.plot([p["bytes"] for p in par], [p["score"] for p in par], color="black", lw=1, alpha=0.5, zorder=1)
        for p in pts:
            k = number[p["system"]]
            color = cmap((k - 1) % cmap.N)
            if p["ci_low"] is not None:
                ax.plot([p["bytes"]] * 2, [p["ci_low"], p["ci_high"]], color=color, lw=2, alpha=0.6, zorder=2)
            h = ax.scatter([p["bytes"]], [p["score"]], s=150 if p["reference"] else 110,
                           marker="*" if p["reference"] else "o", color=color, edgecolors="black", linewidths=0.5,
                           zorder=3)
            ax.annotate(str(k), (p["bytes"], p["score"]), ha="center", va="center", fontsize=7, color="white",
                        weight="bold", zorder=4)
            handles.setdefault(p["system"], h)
        ax.set_xscale("log")
        ax.set_xlim(lo_x, hi_x)
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("bytes on disk (safetensors)")
        ax.set_ylabel(pts[0]["metric"])
        ax.set_title(d)
        ax.grid(alpha=0.3)
    labels = [f"{number[n]}  {n}" for n in handles]
    from matplotlib.lines import Line2D

    extra = [Line2D([], [], color="black", lw=1, alpha=0.5), Line2D([], [], color="grey", lw=2, alpha=0.6)]
    labels += ["Pareto front", f"95% CI of the difference to {reference}"]
    fig.legend(list(handles.values()) + extra, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    return _png(fig)


def frontier_markdown(front: Mapping[str, list[dict]]) -> list[str]:
    L = ["## Quality against bytes on disk", "",
         "Sizes are the safetensors bytes; bins are the IWSLT 2025 compression track's. The interval is the "
         "paired bootstrap's 95% interval of the difference to the reference, placed around the reference's "
         "score; Pareto: no other system is both smaller and better.", "",
         "| direction | system | bytes | bin | score | 95% interval | Pareto |", "|---|---|---:|---|---:|---|---|"]
    for d, pts in front.items():
        for p in pts:
            iv = f"[{_f(p['ci_low'])}, {_f(p['ci_high'])}]" if p["ci_low"] is not None else "-"
            L.append(f"| {d} | {p['system']} | {p['bytes']:,} | {p['bin']} | {_f(p['score'])} {p['metric']} | {iv} | "
                     f"{'yes' if p['pareto'] else ''} |")
    return L + [""]


def plot_primary(directions: list[str], rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["system"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) * max(1, len(directions)) ** 0.5 + 2), 4.5))
    width = 0.8 / max(1, len(directions))
    for k, d in enumerate(directions):
        ys = [(r["directions"].get(d) or {}).get("primary") for r in rows]
        xs = [i + (k - (len(directions) - 1) / 2) * width for i in range(len(names))]
        metric = next((r["directions"][d]["primary_metric"] for r in rows if d in r["directions"]), "")
        ax.bar(xs, [float("nan") if y is None else y for y in ys], width=width, label=f"{d} ({metric})")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("primary metric")
    ax.set_title("primary metric per system and direction")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# ------------------------------------------------------------------------------------------- stage

def _signatures(rows: list[dict]) -> dict:
    out: dict[str, dict[str, dict[str, list[str]]]] = {}
    for r in rows:
        for d, e in r["directions"].items():
            for m, sig in e["signatures"].items():
                out.setdefault(d, {}).setdefault(m, {}).setdefault(sig, []).append(r["system"])
    return out


def build(recipe: cfg.Recipe) -> tuple[dict, dict]:
    """Everything the report shows, as data (``report.json``), plus the config differences to show."""
    rc = recipe.report
    if rc.bootstrap < 0:
        raise cfg.ConfigError([f"report.bootstrap: must be >= 0 (0: off), got {rc.bootstrap}"])
    bars = parse_bars(rc.bars)
    extra_rankings = ranking_paths(recipe)
    warnings: list[str] = []
    edir = eval_dir(recipe)
    systems = load_systems(edir, rc.systems, rc.reference, warnings, plan_systems(recipe))
    has_ref = any(s["name"] == rc.reference for s in systems)
    if not has_ref:
        warnings.append(f"reference system {rc.reference!r} has no {SCORES} in {edir} (found: "
                        f"{[s['name'] for s in systems]}): no retained %; set report.reference")
    directions, rows = build_rows(systems, rc.reference)
    if has_ref:
        ref_row = next(r for r in rows if r["system"] == rc.reference)
        ref_metrics = {d: e["primary_metric"] for d, e in ref_row["directions"].items()}
        for r in rows:
            for d, e in r["directions"].items():
                if d in ref_metrics and e["primary_metric"] != ref_metrics[d]:
                    warnings.append(f"{r['system']} {d}: primary metric {e['primary_metric']!r} differs from the "
                                    f"reference's {ref_metrics[d]!r}: no retained %")
    sigs = _signatures(rows)
    for d, per in sigs.items():
        for m, s in per.items():
            if len(s) > 1:
                warnings.append(f"{d} {m}: systems were scored with different sacrebleu signatures")
    for r in rows:
        warnings += [f"{r['system']}: {w}" for w in r["warnings"]]
    metric_warnings = short_reference_warnings(systems, rows, directions)
    warnings += [m["message"] for m in metric_warnings]
    sig = significance(systems, rows, rc.reference, rc.bootstrap, recipe.run.seed, warnings)
    runs = run_dirs(recipe)
    rank = ranking_path(recipe)
    named = ([("main", rank)] if rank.is_file() else []) + extra_rankings
    rankings = compare_rankings(named) if extra_rankings else None
    doc = {"schema": 1, "kind": "report", "title": rc.title,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "eval_dir": str(edir), "reference": rc.reference, "reference_found": has_ref, "directions": directions,
           "systems": rows, "bars": evaluate_bars(bars, rows, directions),
           "device_hours": [stage_device_hours(label, d) for label, d in runs],
           "importance": importance_section(rank), "importance_plot": False, "plots": bool(rc.plots),
           "signatures": sigs, "warnings": warnings, "metric_warnings": metric_warnings,
           "bootstrap": rc.bootstrap, "seed": recipe.run.seed, "significance": sig, "rankings": rankings,
           "frontier": frontier(directions, rows, sig, rc.reference),
           "storage_agreement": storage_agreement(systems, directions)}
    return doc, config_diffs(runs, edir, rank, pipeline_config(recipe))


def run(recipe: cfg.Recipe) -> dict:
    """``stc report``: write report.md, report.json, plots, config.yaml and meta.json into report.out."""
    t0 = time.monotonic()
    doc, configs = build(recipe)
    out = out_dir(recipe)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    imp_png = Path(doc["importance"]["path"]).parent / PLOT_IMPORTANCE
    if not doc["importance"]["missing"] and imp_png.exists():
        if imp_png.resolve() != (out / PLOT_IMPORTANCE).resolve():
            atomic_write_bytes(out / PLOT_IMPORTANCE, imp_png.read_bytes())
        doc["importance_plot"] = True
        written.append(PLOT_IMPORTANCE)
    if doc["plots"]:
        atomic_write_bytes(out / PLOT_SIZE, plot_quality_vs_size(doc["directions"], doc["systems"], doc["reference"],
                                                                 doc["reference_found"]))
        atomic_write_bytes(out / PLOT_PRIMARY, plot_primary(doc["directions"], doc["systems"]))
        atomic_write_bytes(out / PLOT_FRONTIER, plot_frontier(doc["frontier"], doc["reference"]))
        written += [PLOT_SIZE, PLOT_PRIMARY, PLOT_FRONTIER]
    for stale in {PLOT_SIZE, PLOT_PRIMARY, PLOT_IMPORTANCE, PLOT_FRONTIER} - set(written):  # a rerun leaves no old plots
        p = out / stale
        if p.exists() and p.resolve() != imp_png.resolve():
            p.unlink()
    own_device_hours(doc["device_hours"], out, time.monotonic() - t0)
    atomic_write_json(out / REPORT_JSON, doc)
    atomic_write_text(out / REPORT_MD, markdown(doc, configs))
    cfg.save_resolved(recipe, out)
    write_meta(out, build_meta("report", config=recipe, files=[REPORT_MD, REPORT_JSON, *written],
                               eval_dir=doc["eval_dir"], systems=[r["system"] for r in doc["systems"]],
                               bars={b["bar"]: b["status"] for b in doc["bars"]}))
    doc["out"] = str(out)
    return doc


def print_summary(doc: Mapping[str, Any]) -> None:
    from rich.table import Table

    ref, has_ref = doc["reference"], doc["reference_found"]
    t = Table(title=doc["title"])
    for c in ("system", "layers", "params stored", "MB"):
        t.add_column(c, justify="left" if c == "system" else "right")
    for d in doc["directions"]:
        t.add_column(f"{d} primary", justify="right")
        if has_ref:
            t.add_column(f"{d} % {ref}", justify="right")
    t.add_column("tokens/s", justify="right")
    for r in doc["systems"]:
        cells = [r["system"] + (" (shuffled)" if r["shuffle_audio"] else ""), _f(r["decoder_layers"]),
                 _params(r["params_stored"]), _f(r["storage_mb"], 1)]
        for d in doc["directions"]:
            e = r["directions"].get(d) or {}
            cells.append(_f(e.get("primary")))
            if has_ref:
                cells.append(_pct_s(e.get("retained")))
        cells.append(_f(r["tokens_per_s"], 1))
        t.add_row(*cells)
    log.console.print(t)
    for b in doc["bars"]:
        color = {"PASS": "green", "FAIL": "red"}.get(b["status"], "yellow")
        vals = ", ".join(f"{k + ' ' if k else ''}{_f(v)}" for k, v in b["values"].items()) or b.get("why", "")
        log.console.print(f"[{color}]{b['status']:>4}[/{color}] {b['bar']}  ({vals})")
    for w in doc["warnings"]:
        log.console.print(f"[yellow]warning:[/yellow] {w}")
    known = [h["device_hours"] for h in doc["device_hours"] if h["device_hours"] is not None]
    log.console.print(f"device-hours (known stages): {_hours(sum(known) if known else None)}; "
                      f"wrote {Path(doc.get('out', '.')) / REPORT_MD}", soft_wrap=True)


def dry_run(recipe: cfg.Recipe) -> None:
    """Print what the report would read, without writing anything."""
    edir = eval_dir(recipe)
    found = sorted(p.parent.name for p in edir.glob(f"*/{SCORES}")) if edir.is_dir() else []
    parse_bars(recipe.report.bars)
    rank = ranking_path(recipe)
    print(f"eval_dir {edir}: systems {found or 'none'}; reference {recipe.report.reference!r}")
    print(f"ranking {rank} ({'found' if rank.exists() else 'missing'})")
    for label, d in run_dirs(recipe):
        print(f"run {label}: {d} ({'found' if d.exists() else 'missing'})")
    print(f"would write {out_dir(recipe) / REPORT_MD}")


def main(recipe: cfg.Recipe, args: Any) -> int:
    """``stc report``: 1 when ``report.strict_bars`` and a bar fails."""
    if getattr(args, "dry_run", False):
        dry_run(recipe)
        return 0
    doc = run(recipe)
    print_summary(doc)
    failed = recipe.report.strict_bars and any(b["status"] == "FAIL" for b in doc["bars"])
    return 1 if failed else 0
