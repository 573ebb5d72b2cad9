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
  ``world_size``. A stage that records none of these is shown as "n/a", never guessed.
* ``config.yaml`` files found next to those outputs, embedded verbatim.

Writes into ``report.out`` (every file atomically, so a rerun replaces a report whole): ``report.md``,
``report.json`` (the same table, machine-readable), ``quality_vs_size.png``, ``primary_by_system.png``,
``importance.png``, ``config.yaml`` and last ``meta.json`` (kind ``report``: the finished marker).

Bars (``report.bars``) are data: ``system[@direction]:field OP value`` with OP one of ``>= <= > < ==``.
Per-direction fields (every direction of the system must pass unless ``@direction`` names one):
``primary``, ``retained`` (primary metric as % of the reference), ``bleu``, ``chrf``, ``chrfpp``,
``comet``, ``copy_source_rate``, ``wrong_language_rate``, ``empty_rate``. System fields:
``tokens_per_s``, ``sentences_per_s``, ``latency_s``, ``storage_mb``, ``params_stored``,
``decoder_layers``, ``params_stored_pct`` and ``storage_pct`` (of the reference). A bar whose system
or value is missing is "n/a", not FAIL.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import operator
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import config as cfg
from . import log, stages
from .errors import StcError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from .meta import build_meta, write_meta
from .importance.report import fmt_cell

SCORES = "scores.json"
SYSTEM = "system.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PLOT_SIZE = "quality_vs_size.png"
PLOT_PRIMARY = "primary_by_system.png"
PLOT_IMPORTANCE = "importance.png"
METRICS = ("bleu", "chrf", "chrfpp")
DIR_FIELDS = ("primary", "retained", "bleu", "chrf", "chrfpp", "comet", "copy_source_rate",
              "wrong_language_rate", "empty_rate")
SYS_FIELDS = ("tokens_per_s", "sentences_per_s", "latency_s", "storage_mb", "params_stored", "decoder_layers",
              "params_stored_pct", "storage_pct")
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
        info = {k: sysd.get(k) for k in ("name", "label", "removal", "healing", "quant", "model")}
        info["step"] = s["step"]
        removed: list = []
        prune = by_step.get(sysd.get("removed_from") or "")
        if prune:
            meta = _read_json(Path(prune["out"]) / "meta.json") if (Path(prune["out"]) / "meta.json").exists() else {}
            removed = list(((meta or {}).get("pruned") or {}).get("removed_original") or [])
        info["removed_layers"] = removed
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
            "healing": info.get("healing"), "notes": info.get("notes"),
            "decoder_layers": mi.get("decoder_layers"), "params_total": mi.get("params_total"),
            "params_stored": mi.get("params_stored"), "storage_bytes": mi.get("storage_bytes"),
            "storage_mb": mi["storage_bytes"] / 1e6 if isinstance(mi.get("storage_bytes"), (int, float)) else None,
            "quant": mi.get("quant"), "dtype": mi.get("dtype"),
            "params_stored_pct": _pct(mi.get("params_stored"), ref_mi.get("params_stored")),
            "storage_pct": _pct(mi.get("storage_bytes"), ref_mi.get("storage_bytes")),
            "tokens_per_s": sp.get("tokens_per_s"), "sentences_per_s": sp.get("sentences_per_s"),
            "latency_s": sp.get("latency_s"), "speed_device": sp.get("device"), "world_size": sp.get("world_size"),
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


def table_markdown(directions: list[str], rows: list[dict], reference: str, has_ref: bool) -> list[str]:
    head = ["system", "decoder layers", "params stored", "storage MB"]
    for d in directions:
        head += [f"{d} BLEU", f"{d} chrF", f"{d} chrF++", f"{d} primary % of {reference}" if has_ref
                 else f"{d} primary", f"{d} copy-src", f"{d} wrong-lang"]
    head.append("tokens/s")
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
        cells.append(_f(r["tokens_per_s"], 1))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _configs(runs: list[tuple[str, Path]], edir: Path, rank: Path) -> list[dict]:
    """config.yaml files next to the outputs, identical ones shown once with every path."""
    cands: list[Path] = []
    for _, d in runs:
        cands.append(d / "config.yaml")
    cands += [rank.parent / "config.yaml", edir / "config.yaml", *sorted(edir.glob("*/config.yaml"))]
    seen: dict[str, dict] = {}
    done: set[Path] = set()
    for p in cands:
        rp = p.resolve()
        if rp in done or not p.is_file():
            continue
        done.add(rp)
        text = p.read_text(encoding="utf-8", errors="replace")
        h = hashlib.sha256(text.encode()).hexdigest()
        seen.setdefault(h, {"paths": [], "text": text})["paths"].append(str(p))
    return list(seen.values())


def markdown(doc: Mapping[str, Any], configs: list[dict]) -> str:
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
    L += [""]
    described = [r for r in rows if r["label"] or r["removed_layers"] or r["healing"]]
    if described:
        for r in described:
            bits = [r["label"]] if r["label"] else []
            if r["removed_layers"]:
                how = r["removal"]
                if isinstance(how, (int, float)) and not isinstance(how, bool):  # a fraction of the decoder layers
                    how = f"{100 * how:.0f}% of decoder layers" if how < 1 else f"{how:g} layers"
                bits.append(f"removed layers {r['removed_layers']}" + (f" ({how})" if how else ""))
            if r["healing"]:
                bits.append(f"healing {r['healing']}")
            if r["notes"]:
                bits.append(str(r["notes"]))
            L.append(f"- `{r['system']}`: " + "; ".join(bits))
        L.append("")
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

    L += ["## sacrebleu signatures", ""]
    if doc["signatures"]:
        for d, per in doc["signatures"].items():
            for m, sigs in per.items():
                for sig, who in sigs.items():
                    L.append(f"- {d} {m}: `{sig}`" + (f" ({', '.join(who)})" if len(sigs) > 1 else ""))
        L.append("")
    else:
        L += ["none recorded", ""]

    L += ["## Resolved configs", ""]
    if not configs:
        L += ["No config.yaml found next to the outputs.", ""]
    for c in configs:
        L += ["<details><summary>" + ", ".join(f"<code>{p}</code>" for p in c["paths"]) + "</summary>", "",
              "```yaml", c["text"].rstrip("\n"), "```", "", "</details>", ""]
    return "\n".join(L)


# ------------------------------------------------------------------------------------------- plots

def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def plot_quality_vs_size(directions: list[str], rows: list[dict], reference: str, has_ref: bool) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(directions)), figsize=(5.5 * max(1, len(directions)), 4.5), squeeze=False)
    for ax, d in zip(axes[0], directions):
        pts = [(r["params_stored"] / 1e9, r["directions"][d]["retained" if has_ref else "primary"], r["system"])
               for r in rows if d in r["directions"] and isinstance(r["params_stored"], (int, float))
               and r["directions"][d]["retained" if has_ref else "primary"] is not None]
        for x, y, name in pts:
            ax.scatter([x], [y], s=40, marker="*" if name == reference else "o", zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if has_ref:
            ax.axhline(100, ls="--", color="grey", lw=1)
            ax.axhline(97, ls=":", color="tab:red", lw=1, label="97%")
            ax.legend(fontsize=7)
        ax.set_xlabel("params as stored (billions)")
        metric = next((r["directions"][d]["primary_metric"] for r in rows if d in r["directions"]), "primary")
        ax.set_ylabel(f"{metric}, % of {reference}" if has_ref else f"{metric}")
        ax.set_title(d)
        ax.margins(x=0.2, y=0.1)  # room for the names written beside the points
        ax.grid(alpha=0.3)
    return _png(fig)


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


def build(recipe: cfg.Recipe) -> tuple[dict, list[dict]]:
    """Everything the report shows, as data (``report.json``), plus the configs to embed."""
    rc = recipe.report
    bars = parse_bars(rc.bars)
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
    runs = run_dirs(recipe)
    rank = ranking_path(recipe)
    doc = {"schema": 1, "kind": "report", "title": rc.title,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "eval_dir": str(edir), "reference": rc.reference, "reference_found": has_ref, "directions": directions,
           "systems": rows, "bars": evaluate_bars(bars, rows, directions),
           "device_hours": [stage_device_hours(label, d) for label, d in runs],
           "importance": importance_section(rank), "importance_plot": False, "plots": bool(rc.plots),
           "signatures": sigs, "warnings": warnings}
    return doc, _configs(runs, edir, rank)


def run(recipe: cfg.Recipe) -> dict:
    """``stc report``: write report.md, report.json, plots, config.yaml and meta.json into report.out."""
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
        written += [PLOT_SIZE, PLOT_PRIMARY]
    for stale in {PLOT_SIZE, PLOT_PRIMARY, PLOT_IMPORTANCE} - set(written):  # a rerun leaves no old plots
        p = out / stale
        if p.exists() and p.resolve() != imp_png.resolve():
            p.unlink()
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
