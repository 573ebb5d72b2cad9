"""`stc report` statistics and honesty checks on small hand-made inputs: the paired bootstrap against a
numpy reference and sacrebleu's own test, significance verdicts, the short-reference BLEU warning,
Spearman's rho and the comparison of importance rankings, config differences, size axes, the
importance plot's original indices and the report's own device time."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import config as cfg
from engine import report
from engine.importance import report as ireport

WORDS = "the cat sat on a mat while two red dogs ran over green hills near old blue houses".split()


def _corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 10)))) for _ in range(n)]


def _damage(sents: list[str], share: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(w[::-1] if rng.random() < share else w for w in s.split()) for s in sents]


def _reference_bootstrap(metric, refs, a, b, resamples, seed):
    """Plain numpy: resample sentence indices, sum the sentence statistics, score, take the differences."""
    sa = np.array(metric._extract_corpus_statistics(a, [refs]), dtype=float)
    sb = np.array(metric._extract_corpus_statistics(b, [refs]), dtype=float)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, len(refs), size=len(refs))
        diffs.append(metric._compute_score_from_stats(list(sb[idx].sum(0))).score
                     - metric._compute_score_from_stats(list(sa[idx].sum(0))).score)
    return np.percentile(diffs, [2.5, 97.5])


def test_paired_bootstrap_matches_numpy_reference_and_sacrebleu():
    from sacrebleu.metrics import CHRF
    from sacrebleu.significance import Result, _paired_bs_test

    refs = _corpus(120, 1)
    base, system = _damage(refs, 0.30, 2), _damage(refs, 0.20, 3)
    metric = CHRF(word_order=2)
    got = report.paired_bootstrap(metric, refs, base, system, 1000, seed=7)
    assert got["delta"] == pytest.approx(metric.corpus_score(system, [refs]).score
                                         - metric.corpus_score(base, [refs]).score)
    lo, hi = _reference_bootstrap(metric, refs, base, system, 1000, seed=123)  # another seed: tolerance
    assert got["ci_low"] == pytest.approx(lo, abs=0.6) and got["ci_high"] == pytest.approx(hi, abs=0.6)
    assert got["ci_low"] < got["delta"] < got["ci_high"]
    # sacrebleu's own paired bootstrap (the --paired-bs test) with the same seed gives the same p-value
    bl_stats = metric._extract_corpus_statistics(base, [refs])
    bl = Result(metric._aggregate_and_compute(bl_stats).score)
    _, res = _paired_bs_test({"chrF2++": (bl_stats, bl)}, "sys", system, [refs], {"chrF2++": CHRF(word_order=2)},
                             n_samples=1000, seed=7)
    assert got["p_value"] == pytest.approx(res["chrF2++"].p_value, abs=2e-3)
    assert got["significant"] is True


def test_identical_systems_not_significant_and_clear_difference_significant():
    from sacrebleu.metrics import CHRF

    refs = _corpus(60, 4)
    hyp = _damage(refs, 0.3, 5)
    same = report.paired_bootstrap(CHRF(), refs, hyp, list(hyp), 200, seed=0)
    assert same["delta"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["significant"] is False
    assert same["p_value"] == 1.0
    far = report.paired_bootstrap(CHRF(), refs, _damage(refs, 0.9, 6), refs, 200, seed=0)
    assert far["delta"] > 30 and far["ci_low"] > 0 and far["p_value"] < 0.05 and far["significant"] is True
    # a tiny difference on a few sentences: the CI includes 0 -> not significant
    near = list(hyp)
    near[0] = refs[0]
    small = report.paired_bootstrap(CHRF(), refs, hyp, near, 500, seed=0)
    assert 0 < small["delta"] < 2 and small["ci_low"] <= 0 <= small["ci_high"] and small["significant"] is False


# ------------------------------------------------------------------------------------------ end to end

def _write_system(ev: Path, name: str, rows: list[dict], healing: str | None = None, removal=None,
                  storage_of: str = "") -> None:
    from sacrebleu.metrics import BLEU, CHRF

    d = ev / name
    d.mkdir(parents=True)
    (d / "hypotheses.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    dirs = {}
    for direction in sorted({f"{r['src_lang']}-{r['tgt_lang']}" for r in rows}):
        rs = [r for r in rows if f"{r['src_lang']}-{r['tgt_lang']}" == direction]
        h, rr = [r["hyp"] for r in rs], [[r["ref"] for r in rs]]
        zh = direction.endswith("zh")
        ms = {"bleu": BLEU(tokenize="zh" if zh else "13a"), "chrf": CHRF(), "chrfpp": CHRF(word_order=2)}
        dd = {k: {"score": m.corpus_score(h, rr).score, "signature": str(m.get_signature())} for k, m in ms.items()}
        dd.update(n=len(rs), primary={"metric": "chrf" if zh else "chrf++",
                                      "score": dd["chrf" if zh else "chrfpp"]["score"]},
                  copy_source_rate=0.0, wrong_language_rate=0.0, empty_rate=0.0, comet={"skipped": "x"})
        dirs[direction] = dd
    (d / "scores.json").write_text(json.dumps({
        "schema": 1, "system": name, "n": len(rows), "directions": dirs,
        "model_info": {"decoder_layers": 4, "params_total": 2_000_000, "params_stored": 2_000_000,
                       "storage_bytes": 8_000_000},
        "speed": {"seconds": 1.0, "world_size": 1}}))
    if healing:
        (d / "system.json").write_text(json.dumps({"healing": healing, "removal": removal, "storage_of": storage_of,
                                                   "storage": "lm_head" if storage_of else ""}))


def _rows(refs: list[str], hyps: list[str], tgt: str = "de") -> list[dict]:
    return [{"key": f"k{i:03d}", "src_lang": "en", "tgt_lang": tgt, "src_text": "x", "ref": r, "hyp": h}
            for i, (r, h) in enumerate(zip(refs, hyps))]


def test_report_significance_pairs_short_refs_and_key_mismatch(tmp_path):
    refs = [" ".join(s.split()[:3]) for s in _corpus(80, 8)]  # 3-word references: BLEU-4 is meaningless
    ev = tmp_path / "eval"
    _write_system(ev, "teacher", _rows(refs, refs))
    _write_system(ev, "ce-25", _rows(refs, _damage(refs, 0.5, 1)), "ce", 0.25)
    _write_system(ev, "kd-25", _rows(refs, _damage(refs, 0.2, 2)), "ce+kd", 0.25)
    _write_system(ev, "kd-50", _rows(refs, _damage(refs, 0.2, 2)), "ce+kd", 0.5)
    # another export of kd-25's weights (a storage lever): against kd-25, not as a healing against ce-25
    _write_system(ev, "kd-25-lm_head", _rows(refs, _damage(refs, 0.25, 2)), "ce+kd", 0.25, storage_of="kd-25")
    recipe = cfg.load(None, [f"report.eval_dir={ev}", f"report.out={tmp_path / 'rep'}", f"run.out_dir={tmp_path}",
                             "report.bootstrap=300", "run.seed=3", "report.plots=false"])
    doc = report.run(recipe)
    pairs = [(c["kind"], c["baseline"], c["system"]) for c in doc["significance"] if c["direction"] == "en-de"]
    assert sorted(pairs) == sorted([("reference", "teacher", "ce-25"), ("reference", "teacher", "kd-25"),
                                    ("reference", "teacher", "kd-50"), ("reference", "teacher", "kd-25-lm_head"),
                                    ("healing", "ce-25", "kd-25"),   # kd-50 has another removal: not against ce-25
                                    ("storage", "kd-25", "kd-25-lm_head")])
    c = next(x for x in doc["significance"] if x["system"] == "kd-25" and x["baseline"] == "ce-25")
    assert c["metric"] == "chrf++" and c["delta"] > 0 and c["resamples"] == 300 and c["seed"] == 3
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| en-de | kd-25 | ce-25 | chrf++ |" in md and "significant" in md
    again = report.build(recipe)[0]["significance"]
    assert again == doc["significance"]  # seeded: reproducible
    # BLEU warning: every reference is 3 tokens
    mw = doc["metric_warnings"]
    assert [m["direction"] for m in mw] == ["en-de"] and mw[0]["short_share"] == 1.0
    assert "100% of the references have fewer than 4 tokens" in mw[0]["message"]
    assert any("read chrF/chrF++" in w for w in doc["warnings"]) and "read chrF/chrF++" in md
    # different key sets: refused, naming both files
    p = ev / "kd-50" / "hypotheses.jsonl"
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:-1]) + "\n")
    report._HYP_CACHE.clear()
    with pytest.raises(report.ReportError, match=r"teacher/hypotheses\.jsonl.*kd-50/hypotheses\.jsonl"):
        report.build(recipe)
    assert report.build(cfg.replace(recipe, report={"bootstrap": 0}))[0]["significance"] == []


def test_long_references_give_no_bleu_warning(tmp_path):
    refs = _corpus(20, 9)
    ev = tmp_path / "eval"
    _write_system(ev, "teacher", _rows(refs, refs))
    recipe = cfg.load(None, [f"report.eval_dir={ev}", f"run.out_dir={tmp_path}", "report.plots=false"])
    assert report.build(recipe)[0]["metric_warnings"] == []


# ------------------------------------------------------------------------------------------ rankings

def test_spearman_by_hand_and_ties():
    assert report.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / np.sqrt(95))  # tie: ranks 3.5
    assert report.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert report.spearman([1, 2, 3], [2, 2, 2]) is None and report.spearman([1], [2]) is None
    # monotone transforms do not change it
    x = [0.3, 1.2, -4.0, 7.5, 2.2, 2.2]
    assert report.spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)


def _ranking(path: Path, scores: dict[int, float], hib: bool, removed_orig: list[int], kept=None, kept_orig=None,
             removed=None, metric="chrf++") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    doc = {"method": "iterative", "scorer": "task" if hib else "nll", "metric": metric, "higher_is_better": hib,
           "removed": removed if removed is not None else removed_orig, "removed_original": removed_orig,
           "kept": kept or [], "kept_original": kept_orig or [],
           "iterations": [{"iteration": 1, "scores": {str(k): v for k, v in scores.items()}, "chosen": [0]}]}
    (path / "ranking.json").write_text(json.dumps(doc))
    return path / "ranking.json"


def test_rankings_compared_with_orientation(tmp_path):
    # task (chrF++ after removal: higher = less important) and nll (loss after removal: higher = more important)
    # that agree on the order of importance: rho = +1 once both are oriented
    task = _ranking(tmp_path / "task", {1: 90.0, 2: 50.0, 3: 80.0, 4: 10.0}, True, [1, 3], kept=[0, 2, 4, 5],
                    kept_orig=[0, 2, 4, 5])
    nll = _ranking(tmp_path / "nll", {1: 1.0, 2: 3.0, 3: 2.0, 4: 9.0}, False, [1], kept=[0, 2, 3, 4, 5],
                   kept_orig=[0, 2, 3, 4, 5], metric="nll")
    cmp = report.compare_rankings([("task", task), ("nll", nll)])
    assert cmp["pairs"] == [{"a": "task", "b": "nll", "layers": 4, "rho": pytest.approx(1.0)}]
    assert [r["removal_order"] for r in cmp["rankings"]] == [[1, 3], [1]]
    md = "\n".join(report.rankings_markdown(cmp))
    assert "| task | nll | 4 | 1.000 |" in md and "[1, 3]" in md
    # a scan of an already pruned model: its indices 0..2 are original layers 0, 2, 5
    pruned = _ranking(tmp_path / "pruned", {1: 50.0, 2: 10.0}, True, [], kept=[0, 1, 2], kept_orig=[0, 2, 5])
    assert report.first_iteration_importance(json.loads(pruned.read_text())) == {2: -50.0, 5: -10.0}


def test_missing_ranking_names_file_and_key(tmp_path):
    recipe = cfg.load(None, [f"run.out_dir={tmp_path}", f"report.rankings=[nll={tmp_path / 'nowhere'}]"])
    with pytest.raises(report.ReportError, match=r"report\.rankings\[0\].*nowhere/ranking\.json"):
        report.ranking_paths(recipe)


# ------------------------------------------------------------------------------------------ configs, plots, time

def test_config_diff_against_pipeline_recipe(tmp_path):
    steps = tmp_path / "run" / "pipeline" / "steps"
    steps.mkdir(parents=True)
    (tmp_path / "run" / "pipeline" / "config.yaml").write_text("distill: {kd_weight: 1.0, lr: 0.001}\nrun: {seed: 0}\n")
    st = tmp_path / "run" / "ce"
    st.mkdir()
    (st / "config.yaml").write_text("distill: {kd_weight: 0.0, lr: 0.001}\nrun: {seed: 0}\n")
    (steps / "distill-ce.json").write_text(json.dumps({"step": "distill-ce", "index": 0, "out": str(st)}))
    recipe = cfg.load(None, [f"run.out_dir={tmp_path}", f"report.runs=[{steps}]"])
    rp = report.pipeline_config(recipe)
    assert rp == tmp_path / "run" / "pipeline" / "config.yaml"
    c = report.config_diffs(report.run_dirs(recipe), tmp_path / "eval", tmp_path / "imp" / "ranking.json", rp)
    assert c["recipe"] == str(rp)
    assert c["groups"] == [{"diff": ["distill.kd_weight: 1.0 -> 0.0"],
                            "configs": [{"stage": "distill-ce", "path": str(st / "config.yaml")}]}]
    md = "\n".join(report.configs_markdown(c))
    assert f"`{rp}`" in md and "`distill.kd_weight: 1.0 -> 0.0`" in md and "lr" not in md


def test_size_axis_fits_the_model():
    assert report.size_scale([2_000_000, 1_500_000]) == (1e6, "params as stored (millions)")
    assert report.size_scale([8.4e9, 4e9]) == (1e9, "params as stored (billions)")
    assert report.size_scale([900_000.0]) == (1e3, "params as stored (thousands)")
    assert report.size_scale([8e6], "bytes") == (1e6, "storage (MB)")


def test_quality_plot_renders_for_small_models():
    rows = [{"system": f"s{i}", "params_stored": 2_000_000 - 1000 * i, "storage_bytes": 1,
             "directions": {"en-de": {"retained": 99.0 + 0.01 * i, "primary_metric": "chrf++"}}} for i in range(8)]
    png = report.plot_quality_vs_size(["en-de"], rows, "s0", True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_importance_plot_uses_original_indices(tmp_path, monkeypatch):
    doc = {"removed": [1], "removed_original": [5], "kept": [0, 2], "kept_original": [0, 7]}
    f = ireport.original_index(doc)
    assert [f(0), f(1), f(2)] == [0, 5, 7]
    import matplotlib.axes

    seen: list = []
    orig_plot = matplotlib.axes.Axes.plot

    def spy(self, *a, **k):
        seen.append(list(a[0]))
        return orig_plot(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    full = dict(doc, method="iterative", scorer="task", metric="chrf++", higher_is_better=True, n_samples=3,
                iterations=[{"iteration": 1, "scores": {"1": 50.0, "2": 40.0}, "chosen": [1]}], baseline=None)
    ireport.plot(full, tmp_path / "p.png")
    assert seen[0] == [5, 7] and seen[1] == [5]
    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda self, s, **k: labels.append(s))
    ireport.plot(full, tmp_path / "p.png")
    assert labels == ["decoder layer removed (original layer index)"]


def test_report_own_device_time_replaces_its_row(tmp_path):
    rows = [{"stage": "report", "dir": str(tmp_path / "rep"), "device_hours": None, "source": "n/a"}]
    report.own_device_hours(rows, tmp_path / "rep", 36.0)
    assert rows == [{"stage": "report", "dir": str(tmp_path / "rep"), "device_hours": 0.01,
                     "source": "this report's own build time (1 process)"}]
    # prune/export record seconds x world_size in their meta.json
    d = tmp_path / "pruned"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"kind": "model", "seconds": 72.0, "world_size": 1}))
    h = report.stage_device_hours("prune", d)
    assert h["device_hours"] == pytest.approx(0.02) and "meta.json seconds" in h["source"]
