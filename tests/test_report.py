"""`stc report` on fake stage outputs: table numbers (retained %), bars, plots, report.json, device-hours,
missing inputs, reruns. No model: every input is a small JSON file written here."""
from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from engine import config as cfg
from engine import report

SIG = {"bleu": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
       "chrf": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0",
       "chrfpp": "nrefs:1|case:mixed|eff:yes|nc:6|nw:2|space:no|version:2.6.0"}

# (system, {direction: (bleu, chrf, chrfpp, primary, copy, wrong)}, decoder layers, params stored, bytes, tok/s)
SYSTEMS = {
    "teacher": ({"en-de": (30.0, 60.0, 50.0, 50.0, 0.0, 0.0), "en-zh": (40.0, 40.0, 35.0, 40.0, 0.0, 0.01)},
                32, 8_397_094_912, 16_800_000_000, 100.0),
    "teacher-shuffled": ({"en-de": (1.0, 20.0, 15.0, 15.0, 0.02, 0.1), "en-zh": (2.0, 10.0, 9.0, 10.0, 0.0, 0.2)},
                         32, 8_397_094_912, 16_800_000_000, 100.0),
    "kd-25": ({"en-de": (29.0, 58.0, 48.5, 48.5, 0.01, 0.0), "en-zh": (38.0, 38.0, 33.0, 38.0, 0.0, 0.0)},
              24, 4_120_000_000, 5_600_000_000, 120.0),
}


def _scores(name: str, dirs: dict, layers: int, params: int, size: int, tps: float) -> dict:
    out = {}
    for d, (bleu, chrf, chrfpp, prim, copy, wrong) in dirs.items():
        zh = d.endswith("zh")
        bleu_sig = SIG["bleu"].replace("13a", "zh") if zh else SIG["bleu"]
        out[d] = {"n": 50, "bleu": {"score": bleu, "signature": bleu_sig},
                  "chrf": {"score": chrf, "signature": SIG["chrf"]},
                  "chrfpp": {"score": chrfpp, "signature": SIG["chrfpp"]},
                  "comet": {"skipped": "no evaluate.comet_model"},
                  "primary": {"metric": "chrf" if zh else "chrf++", "score": prim},
                  "copy_source_rate": copy, "wrong_language_rate": wrong, "empty_rate": 0.0}
    return {"schema": 1, "system": name, "model": f"/models/{name}", "split": "test", "n": 100,
            "shuffle_audio": name.endswith("shuffled"), "directions": out,
            "model_info": {"decoder_layers": layers, "params_total": params, "params_stored": params,
                           "storage_bytes": size, "quant": "nf4" if layers < 32 else "none", "dtype": "bfloat16"},
            "speed": {"seconds": 36.0, "latency_s": 0.2, "sentences_per_s": 5.0, "tokens_per_s": tps,
                      "device": "cuda:0", "world_size": 2},
            "hypotheses": "hypotheses.jsonl", "warnings": []}


def _png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def _jsonl(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture
def runs(tmp_path) -> dict:
    run = tmp_path / "run"
    ev = run / "eval"
    for name, spec in SYSTEMS.items():
        (ev / name).mkdir(parents=True)
        (ev / name / "scores.json").write_text(json.dumps(_scores(name, *spec)))
        (ev / name / "config.yaml").write_text("evaluate: {split: test}  # EVAL-CONFIG-MARK\n")
    kd = json.loads((ev / "kd-25" / "scores.json").read_text())  # a current scores.json: batch-1 latency apart
    kd["speed"].update(batch_size=8, batch_seconds_per_sentence=0.1, latency_s=0.05, latency_p50_s=0.04,
                       latency_samples=16)
    (ev / "kd-25" / "scores.json").write_text(json.dumps(kd))
    (ev / "kd-25" / "system.json").write_text(json.dumps(
        {"label": "student 25% removed, CE+KD, nf4", "removed_layers": [13, 3, 20, 9, 29, 1, 19, 27],
         "removal": "iterative", "healing": "ce+kd", "notes": "paper recipe"}))
    # finetune: resumed once (device_hours is cumulative: the largest is the total)
    _jsonl(run / "finetune" / "metrics.jsonl", [{"event": "start", "world_size": 4}, {"step": 1, "device_hours": 0.25},
                                               {"step": 2, "device_hours": 0.5}, {"event": "start", "world_size": 2},
                                               {"step": 3, "device_hours": 0.75},
                                               {"event": "done", "step": 3, "device_hours": 0.75}])
    (run / "finetune" / "config.yaml").write_text("finetune: {epochs: 3.0}  # FINETUNE-CONFIG-MARK\n")
    _jsonl(run / "distill" / "metrics.jsonl", [{"step": 1, "device_hours": 1.5}])
    imp = run / "importance"
    imp.mkdir(parents=True)
    (imp / "ranking.json").write_text(json.dumps({
        "schema": 1, "method": "iterative", "scorer": "task", "metric": "chrf++", "higher_is_better": True,
        "num_layers": 32, "protected": [0, 31], "forced": [], "n_samples": 100,
        "removed": [13, 3], "removed_original": [13, 3],
        "baseline": {"score": 50.0}, "final": {"score": 47.0, "relative": 0.94}, "stopped": None, "block": None,
        "iterations": [{"iteration": 1, "scores": {"3": 48.0, "13": 49.0}, "chosen": [13], "relative": 0.98},
                       {"iteration": 2, "scores": {"3": 47.0}, "chosen": [3], "relative": 0.94}],
        "scan": {"seconds": 1800.0, "world_size": 4}}))
    (imp / "importance.png").write_bytes(_png_1x1())
    (run / "cache").mkdir()
    (run / "cache" / "meta.json").write_text(json.dumps(
        {"schema": 1, "kind": "cache", "shards": [{"name": "a.tar", "seconds": {"total": 1800.0}},
                                                  {"name": "b.tar", "seconds": {"total": 3600.0}}]}))
    (run / "export").mkdir()
    (run / "export" / "meta.json").write_text(json.dumps({"schema": 1, "kind": "model", "exported": {}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"run: {{out_dir: {run}}}\n"
        "report:\n"
        "  title: Test report\n"
        "  systems: [teacher, kd-25, teacher-shuffled]\n"
        "  bars: ['teacher:primary>=40', 'teacher-shuffled:primary<=30', 'kd-25:retained>=97',\n"
        "         'kd-25@en-de:retained>=97', 'ghost:retained>=97', 'kd-25:params_stored_pct<=55']\n")
    return {"run": run, "eval": ev, "recipe": recipe, "out": run / "report"}


def _stc(stc_cmd, stc_env, *argv, code=0):
    r = subprocess.run([*stc_cmd, *argv], env=stc_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stdout + r.stderr
    return r


def _row(md: str, system: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {system} |") or ln.startswith(f"| **{system}** |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _is_png(p: Path) -> bool:
    from PIL import Image

    with Image.open(p) as im:
        im.verify()
        return im.format == "PNG"


def test_report_table_bars_plots_and_json(runs, stc_cmd, stc_env):
    r = _stc(stc_cmd, stc_env, "report", "--config", str(runs["recipe"]))
    out = runs["out"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Test report")
    # paper-style table: order from report.systems; kd-25 keeps 48.5/50 = 97.0% (de), 38/40 = 95.0% (zh)
    kd = _row(md, "kd-25")
    assert kd[:4] == ["kd-25", "24", "4.12B", "5600.0"]
    assert kd[4:10] == ["29.00", "58.00", "48.50", "97.0% (48.50 chrf++)", "1.0%", "0.0%"]
    assert kd[10:16] == ["38.00", "38.00", "33.00", "95.0% (38.00 chrf)", "0.0%", "0.0%"]
    assert kd[16:19] == ["120.0", "5.00", "50.0"]  # tokens/s, throughput at batch 8, latency ms at batch 1
    assert "throughput at batch 8 (sentences/s)" in md and "latency, batch 1 (ms/sentence)" in md
    assert _row(md, "teacher")[18] == "-"  # an older scores.json: its latency_s was the batched figure
    assert _row(md, "teacher")[7] == "100.0% (50.00 chrf++)"
    assert "teacher-shuffled (shuffled audio)" in md
    rows = [ln.split("|")[1].strip() for ln in md.split("## Results")[1].split("Copy-of-source")[0].splitlines()
            if ln.startswith("| ") and not ln.startswith("| system")]
    assert rows == ["**teacher**", "kd-25", "teacher-shuffled (shuffled audio)"]
    assert "`kd-25`: student 25% removed, CE+KD, nf4; removed layers [13, 3, 20, 9, 29, 1, 19, 27] (iterative)" in md
    # bars
    bars = {b["bar"]: b for b in json.loads((out / "report.json").read_text())["bars"]}
    assert {k: v["status"] for k, v in bars.items()} == {
        "teacher:primary>=40": "PASS", "teacher-shuffled:primary<=30": "PASS", "kd-25:retained>=97": "FAIL",
        "kd-25@en-de:retained>=97": "PASS", "ghost:retained>=97": "n/a", "kd-25:params_stored_pct<=55": "PASS"}
    assert bars["kd-25:retained>=97"]["values"] == pytest.approx({"en-de": 97.0, "en-zh": 95.0})
    assert "| `kd-25:retained>=97` | **FAIL** | en-de 97.00, en-zh 95.00 |" in md
    assert "| `ghost:retained>=97` | **n/a** |" in md
    assert "FAIL" in r.stderr and "kd-25:retained>=97" in r.stderr  # rich summary on the terminal
    # report.json: same numbers, machine-readable
    doc = json.loads((out / "report.json").read_text())
    assert doc["reference"] == "teacher" and doc["reference_found"] and doc["directions"] == ["en-de", "en-zh"]
    s = {x["system"]: x for x in doc["systems"]}
    assert s["kd-25"]["directions"]["en-de"]["retained"] == pytest.approx(97.0)
    assert s["kd-25"]["directions"]["en-zh"]["retained_by_metric"]["bleu"] == pytest.approx(95.0)
    assert s["kd-25"]["params_stored_pct"] == pytest.approx(100 * 4.12e9 / 8_397_094_912)
    assert s["kd-25"]["storage_mb"] == pytest.approx(5600.0) and s["kd-25"]["healing"] == "ce+kd"
    assert s["teacher-shuffled"]["shuffle_audio"] is True
    # device-hours from what each stage records
    dh = {h["stage"]: h["device_hours"] for h in doc["device_hours"]}
    own = dh.pop("report")
    assert 0 < own < 0.1  # the report's own build time
    assert dh == pytest.approx({"finetune": 0.75, "importance": 2.0, "prune": None, "cache": 1.5, "distill": 1.5,
                                "export": None, "evaluate": 3 * 36.0 * 2 / 3600})
    assert "| export | n/a |" in md and "| prune | n/a |" in md
    assert "this report's own build time" in md
    # importance: order, plot copied
    steps = doc["importance"]["steps"]
    assert [(x["iteration"], x["layer"], x["relative"]) for x in steps] == [(1, 13, 0.98), (2, 3, 0.94)]
    assert "| 1 | 1 | 13 | 13 | 49.0000 | 98.0% |" in md and "![layer importance](importance.png)" in md
    # plots, signatures, configs, meta
    for name in ("quality_vs_size.png", "primary_by_system.png", "importance.png", "frontier.png"):
        assert _is_png(out / name), name
    # quality against bytes on disk: the shuffled control is no system to ship; the student is smaller
    # and worse than the teacher, so both are on the Pareto front; bins are the track's
    front = {p["system"]: p for p in doc["frontier"]["en-de"]}
    assert set(front) == {"teacher", "kd-25"}
    assert front["kd-25"]["bin"] == "> 4 GB" and front["kd-25"]["pareto"] and front["teacher"]["pareto"]
    assert "## Quality against bytes on disk" in md and "![quality against bytes on disk](frontier.png)" in md
    assert SIG["chrfpp"] in md and "tok:zh" in md
    # configs: no pipeline config, so the first one found (finetune's) is the base; the three identical eval
    # configs are one group, shown as their differences only
    assert f"base `{runs['run'] / 'finetune' / 'config.yaml'}`" in md and "MARK" not in md
    groups = doc_groups = report.config_diffs(report.run_dirs(cfg.load(runs["recipe"])), runs["eval"],
                                              runs["run"] / "importance" / "ranking.json", None)["groups"]
    assert len(doc_groups) == 1 and len(groups[0]["configs"]) == 3
    assert groups[0]["diff"] == ['evaluate.split: (absent) -> "test"', "finetune.epochs: 3.0 -> (absent)"]
    assert '  - `evaluate.split: (absent) -> "test"`' in md
    # counts beside the rates: 2% of 50 en-de sentences copied the source, 10% were in another language
    counts = _row(md.split("sentence counts:")[1], "teacher-shuffled")
    assert counts[1:4] == ["1 / 50", "5 / 50", "0 / 50"]
    assert s["teacher-shuffled"]["directions"]["en-de"]["copy_source_count"] == 1
    # no hypotheses.jsonl in this fixture: no CI, said so
    assert doc["significance"] == [] and any("hypotheses.jsonl" in w for w in doc["warnings"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "report" and meta["systems"] == ["teacher", "kd-25", "teacher-shuffled"]
    assert (out / "config.yaml").exists()


def test_frontier_marks_the_pareto_systems_bins_and_intervals():
    def row(name, nbytes, score, shuffled=False):
        return {"system": name, "storage_bytes": nbytes, "shuffle_audio": shuffled,
                "directions": {"en-de": {"primary": score, "primary_metric": "chrf++"}}}

    rows = [row("teacher", 16.8e9, 50.0), row("kd-25", 5.4e9, 49.0), row("kd-41", 3.8e9, 49.5),
            row("tiny", 150e6, 20.0), row("bad", 6e9, 30.0), row("shuffled", 16.8e9, 5.0, True)]
    sig = [{"kind": "reference", "system": "kd-41", "direction": "en-de", "baseline_score": 50.0,
            "ci_low": -1.5, "ci_high": 0.5}]
    f = {p["system"]: p for p in report.frontier(["en-de"], rows, sig, "teacher")["en-de"]}
    assert "shuffled" not in f
    assert {n for n, p in f.items() if p["pareto"]} == {"teacher", "kd-41", "tiny"}   # kd-25, bad: beaten by kd-41
    assert (f["kd-41"]["ci_low"], f["kd-41"]["ci_high"]) == (48.5, 50.5) and f["kd-25"]["ci_low"] is None
    assert [f[n]["bin"] for n in ("tiny", "kd-41", "kd-25")] == ["< 200 MB", "2-4 GB", "> 4 GB"]
    assert report.size_bin(200e6) == "200-500 MB" and report.size_bin(999e6) == "0.5-1 GB"
    png = report.plot_frontier(report.frontier(["en-de"], rows, sig, "teacher"), "teacher")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_overwrites_and_plots_off(runs, stc_cmd, stc_env):
    _stc(stc_cmd, stc_env, "report", "--config", str(runs["recipe"]))
    first = json.loads((runs["out"] / "report.json").read_text())
    _stc(stc_cmd, stc_env, "report", "--config", str(runs["recipe"]), "report.plots=false", "report.title=Again")
    out = runs["out"]
    doc = json.loads((out / "report.json").read_text())
    assert doc["title"] == "Again" and (out / "report.md").read_text().startswith("# Again")
    def same(d: dict) -> dict:  # the report's own build time differs between runs
        return {k: v for k, v in d.items() if k not in ("title", "created", "plots", "device_hours")}
    assert same(doc) == same(first)
    assert [h for h in doc["device_hours"] if h["stage"] != "report"] == \
        [h for h in first["device_hours"] if h["stage"] != "report"]
    assert not (out / "quality_vs_size.png").exists() and not (out / "primary_by_system.png").exists()
    assert not (out / "frontier.png").exists()
    assert (out / "importance.png").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_missing_reference_gives_table_without_retained(runs, stc_cmd, stc_env):
    _stc(stc_cmd, stc_env, "report", "--config", str(runs["recipe"]), "report.reference=nobody")
    md = (runs["out"] / "report.md").read_text()
    assert "**Warning:** reference system 'nobody'" in md
    assert "% of" not in md.split("## Results")[1].split("\n\n")[1]
    assert _row(md, "kd-25")[7] == "48.50 chrf++"
    doc = json.loads((runs["out"] / "report.json").read_text())
    assert doc["reference_found"] is False
    assert all(e["retained"] is None for x in doc["systems"] for e in x["directions"].values())
    assert {b["bar"]: b["status"] for b in doc["bars"]}["kd-25:retained>=97"] == "n/a"
    assert _is_png(runs["out"] / "quality_vs_size.png")


def test_no_scores_is_a_clear_error(tmp_path, stc_cmd, stc_env):
    (tmp_path / "empty").mkdir()
    r = _stc(stc_cmd, stc_env, "report", f"report.eval_dir={tmp_path / 'empty'}", f"report.out={tmp_path / 'rep'}",
             code=1)
    assert str(tmp_path / "empty") in r.stderr and "stc evaluate" in r.stderr
    assert not (tmp_path / "rep" / "report.md").exists()


def test_bad_bar_is_a_config_error_and_strict_bars_fails(runs, stc_cmd, stc_env):
    r = _stc(stc_cmd, stc_env, "report", "--config", str(runs["recipe"]), "report.bars=[teacher:primry>=1, nonsense]",
             code=2)
    assert "report.bars[0]" in r.stderr and "primry" in r.stderr and "report.bars[1]" in r.stderr
    _stc(stc_cmd, stc_env, "report", "--config", str(runs["recipe"]), "report.strict_bars=true", "report.plots=false",
         code=1)
    assert (runs["out"] / "report.md").exists()  # the report is still written; the exit code carries the verdict


def test_missing_optional_inputs_and_runs_override(runs):
    import shutil

    shutil.rmtree(runs["run"] / "importance")
    (runs["eval"] / "kd-25" / "scores.json").unlink()
    recipe = cfg.load(runs["recipe"], [f"report.runs=[ft={runs['run'] / 'finetune'}, {runs['run'] / 'nowhere'}]"])
    doc, configs = report.build(recipe)
    assert doc["importance"]["missing"] and [x["system"] for x in doc["systems"]] == ["teacher", "teacher-shuffled"]
    assert any("kd-25" in w for w in doc["warnings"])
    assert [(h["stage"], h["device_hours"]) for h in doc["device_hours"]] == [("ft", 0.75), ("nowhere", None)]
    assert "not run" in doc["device_hours"][1]["source"]
    assert {b["bar"]: b["status"] for b in doc["bars"]}["kd-25:retained>=97"] == "n/a"
    md = report.markdown(doc, configs)
    assert "No `ranking.json`" in md and "stc importance" in md
    (runs["run"] / "cache" / "meta.json").write_text("{not json")
    doc, _ = report.build(cfg.replace(recipe, report={"systems": [], "runs": [str(runs["run"] / "cache")]}))
    assert [x["system"] for x in doc["systems"]] == ["teacher", "teacher-shuffled"]  # reference first
    assert doc["device_hours"][0]["device_hours"] is None and "not valid JSON" in doc["device_hours"][0]["source"]


def test_parse_bars_forms():
    bars = report.parse_bars(["a:chrf++>=1.5", "b@en-de:copy_source_rate<0.05", "c:tokens_per_s>10"])
    assert [(b["system"], b["direction"], b["field"], b["op"], b["threshold"]) for b in bars] == [
        ("a", None, "chrfpp", ">=", 1.5), ("b", "en-de", "copy_source_rate", "<", 0.05),
        ("c", None, "tokens_per_s", ">", 10.0)]
    with pytest.raises(cfg.ConfigError, match="per-system field"):
        report.parse_bars(["c@en-de:tokens_per_s>10"])


def test_storage_agreement_counts_identical_greedy_translations(tmp_path):
    """Another export of the same weights (storage_of) is compared sentence by sentence with its source
    system: identical hypotheses counted per direction, the first differences shown."""
    from engine import report as R

    def system(name, hyps, **info):
        d = tmp_path / name
        d.mkdir()
        (d / R.HYPOTHESES).write_text("".join(
            json.dumps({"key": f"k{i}", "src_lang": "en", "tgt_lang": t, "ref": "r", "hyp": h}) + "\n"
            for i, (t, h) in enumerate(hyps)))
        return {"name": name, "dir": d, "info": info}

    base = system("kd-25", [("de", "a"), ("de", "b"), ("zh", "c")])
    trim = system("kd-25-trim", [("de", "a"), ("de", "x"), ("zh", "c")], storage_of="kd-25")
    other = system("ce-25", [("de", "q"), ("de", "q"), ("zh", "q")])
    agree = R.storage_agreement([base, trim, other], ["en-de", "en-zh"])
    assert [(a["system"], a["of"], a["direction"], a["same"], a["n"]) for a in agree] == \
        [("kd-25-trim", "kd-25", "en-de", 1, 2), ("kd-25-trim", "kd-25", "en-zh", 1, 1)]
    assert agree[0]["examples"] == [{"key": "k1", "kd-25": "b", "kd-25-trim": "x"}]
    md = "\n".join(R.storage_agreement_markdown(agree))
    assert "| kd-25-trim | kd-25 | en-de | 1 | 2 |" in md and "'x'" in md
