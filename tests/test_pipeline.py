"""`stc pipeline`: the plan, refusals before anything runs, skip/resume logic with a fake runner, and one
end-to-end run through the CLI on a tiny Qwen2-Audio (4 decoder layers, hidden 64) with sine-wave shards."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine import config as cfg
from engine import pipeline as P
from slurm_fixture import slurm_cluster  # noqa: F401  (fixture: a real one-node SLURM)

CMD = [sys.executable, "-m", "engine.cli"]
SYSTEMS = ["teacher", "teacher-shuffled", "kd-25", "pruned-25", "ce-25", "middle-25", "kd-50"]
# The end-to-end runs: one student (half the layers) with every ablation, 18 real steps
E2E = ["pipeline.students=[0.5]"]
E2E_SYSTEMS = ["teacher", "teacher-shuffled", "kd-50", "pruned-50", "ce-50", "middle-50"]
ORDER = ["eval-teacher", "eval-teacher-shuffled", "importance", "prune-25", "cache", "distill-kd-25", "export-kd-25",
         "eval-kd-25", "eval-pruned-25", "distill-ce-25", "export-ce-25", "eval-ce-25", "importance-middle-25",
         "prune-middle-25", "distill-middle-25", "export-middle-25", "eval-middle-25", "prune-50", "distill-kd-50",
         "export-kd-50", "eval-kd-50", "report"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from sine_data import write_plan_recipe

    from engine.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("pipeline")
    build_tiny("qwen2audio", root / "model", num_layers=4, hidden_size=64, dtype="fp32", seed=0)
    recipe = write_plan_recipe(root, distill="mode: lora, zero_stage: 2")
    return {"root": root, "recipe": recipe}


def _env() -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["COLUMNS"] = "250"
    return env


def stc(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*CMD, *map(str, argv)], env=_env(), capture_output=True, text=True, timeout=timeout)


def plan_for(tiny, *ovs) -> P.Plan:
    return P.build_plan(cfg.load(tiny["recipe"], [f"run.out_dir={tiny['root'] / 'run'}", *ovs]))


# ============================================================================================ plan

def test_plan_steps_dirs_and_overrides(tiny):
    plan = plan_for(tiny)
    assert [s.name for s in plan.steps] == ORDER
    run = tiny["root"] / "run"
    by = {s.name: s for s in plan.steps}
    assert "importance.remove=2" in by["importance"].overrides            # the largest fraction: 0.5 of 4
    assert "prune.count=1" in by["prune-25"].overrides and "prune.count=2" in by["prune-50"].overrides
    assert by["prune-25"].out == run / "students" / "r25" / "pruned"
    assert by["distill-kd-25"].out == run / "students" / "r25" / "kd" / "distill"
    assert by["export-kd-50"].out == run / "students" / "r50" / "kd" / "export"
    assert by["eval-kd-25"].marker == run / "eval" / "kd-25" / "scores.json"
    # CE-only healing reads no cache; the KD students do
    ce = by["distill-ce-25"]
    assert {"distill.kd_weight=0", "distill.seq_kd=false", "distill.cache="} <= set(ce.overrides)
    assert "cache" not in ce.deps and "cache" in by["distill-kd-25"].deps
    mid = by["importance-middle-25"]
    assert "importance.method=middle_block" in mid.overrides and "importance.remove=1" in mid.overrides
    assert by["eval-teacher-shuffled"].overrides[-1] == "evaluate.shuffle_audio=true"
    assert by["eval-pruned-25"].deps == ("prune-25",)
    assert [i.made_by for i in by["report"].inputs] == [f"eval-{s}" for s in SYSTEMS]
    # every step's command is the stage through the engine CLI with the pipeline's resolved config
    for s in plan.steps:
        argv = P.command(plan, s)
        assert argv[1:3] == ["-m", "engine.cli"] and argv[3:3 + len(s.stage.split())] == s.stage.split()
        assert argv[argv.index("--config") + 1] == str(run / "pipeline" / "config.yaml")
        cfg.resolve(plan.tree, list(s.overrides))                          # every override is a valid key
    two = P.build_plan(plan.recipe, nproc=2)
    assert P.command(two, two.steps[2])[3:6] == ["run", "--nproc", "2"]    # importance on 2 ranks
    assert "run" not in P.command(two, next(s for s in two.steps if s.stage == "prune"))  # one process
    assert P.check(plan) == []


def test_plan_options(tiny):
    plan = plan_for(tiny, "pipeline.finetune=true", "pipeline.ablations=false", "pipeline.shuffle_check=false",
                    "pipeline.students=[0.5]", "pipeline.report=false")
    assert [s.name for s in plan.steps] == ["finetune", "eval-teacher", "importance", "prune-50", "cache",
                                            "distill-kd-50", "export-kd-50", "eval-kd-50"]
    teacher = tiny["root"] / "run" / "teacher" / "final"
    assert f"model.path={teacher}" in plan.steps[2].overrides and plan.steps[2].deps == ("finetune",)
    bad = plan_for(tiny, "pipeline.students=[0.25, 1.5]", "pipeline.nproc=0", "pipeline.finetune=true",
                   "finetune.mode=qlora", "pipeline.variants=[word, both]", "pipeline.scorers=[task, bleu]")
    text = "\n".join(P.check(bad))
    assert "pipeline.students" in text and "pipeline.nproc" in text and "finetune.mode=qlora" in text
    assert "unknown healing 'both'" in text and "unknown scorer 'bleu'" in text
    assert "'task' is importance.scorer already" in text


def test_plan_lora_teacher_healing_variants_and_scorer_comparison(tiny):
    """A LoRA teacher is merged by an export step every later step reads; pipeline.variants adds word-only
    and sequence-only KD students of the first fraction; pipeline.scorers adds oneshot rankings the
    report compares."""
    plan = plan_for(tiny, "pipeline.finetune=true", "finetune.mode=lora", "pipeline.variants=[word, seq]",
                    "pipeline.scorers=[nll, block_influence]", "pipeline.students=[0.25, 0.5]")
    by = {s.name: s for s in plan.steps}
    run = tiny["root"] / "run"
    merged = run / "teacher-merged"
    exp = by["export-teacher"]
    assert exp.deps == ("finetune",) and {"export.quant=none", "export.merge_lora=true",
                                          f"export.source={run / 'teacher' / 'final'}"} <= set(exp.overrides)
    assert f"model.path={merged}" in by["importance"].overrides and by["importance"].deps == ("export-teacher",)
    assert by["eval-teacher"].deps == ("export-teacher",)
    word, seq = by["distill-kdword-25"], by["distill-seqkd-25"]
    assert "distill.seq_kd=false" in word.overrides and "distill.kd_weight=0" not in word.overrides
    assert {"distill.kd_weight=0", "distill.seq_kd=true"} <= set(seq.overrides)
    assert word.out == run / "students" / "r25" / "word" / "distill" and "cache" in seq.deps
    assert "distill-kdword-50" not in by                                 # variants: the first fraction only
    assert by["eval-kdword-25"].system["healing"] == "ce+kd" and by["eval-seqkd-25"].system["healing"] == "ce+seq"
    assert by["eval-kd-25"].system["label"].endswith("CE+word KD+seq KD")
    for sc in ("nll", "block_influence"):
        st = by[f"importance-{sc}"]
        assert {f"importance.scorer={sc}", "importance.method=oneshot", "importance.remove=2"} <= set(st.overrides)
    rep = by["report"].overrides
    assert any(o.startswith("report.rankings=") and "nll=" in o and "block_influence=" in o for o in rep)
    assert {f"eval-{n}" for n in ("kdword-25", "seqkd-25")} <= {i.made_by for i in by["report"].inputs}
    assert P.check(plan) == []


def test_plan_storage_levers_export_each_kd_student_again(tiny):
    """pipeline.storage: every kd-R student is exported again with the named size levers, each export its own
    system evaluated beside the others (the report's frontier); the healing comparison leaves them out."""
    plan = plan_for(tiny, "pipeline.storage=[trim, trim+lm_head, int8]", "pipeline.students=[0.25, 0.5]")
    by = {s.name: s for s in plan.steps}
    run = tiny["root"] / "run"
    for p in (25, 50):
        final = run / "students" / f"r{p}" / "kd" / "distill" / "final"
        t = by[f"export-kd-{p}-trim"]
        assert t.deps == (f"distill-kd-{p}",) and t.out == run / "students" / f"r{p}" / "kd" / "export-trim"
        assert {f"export.source={final}", "export.trim_vocab=true"} <= set(t.overrides)
        tl = by[f"export-kd-{p}-trim-lm_head"]
        assert 'export.quantize=["encoder","projector","decoder","lm_head"]' in tl.overrides
        assert "export.quant=int8" in by[f"export-kd-{p}-int8"].overrides
        ev = by[f"eval-kd-{p}-trim"]
        assert ev.deps == (f"export-kd-{p}-trim",) and ev.system["storage"] == "trim"
        assert ev.system["storage_of"] == f"kd-{p}" and "storage_of" not in by[f"eval-kd-{p}"].system
        assert ev.system["healing"] == by[f"eval-kd-{p}"].system["healing"]
        assert by[f"eval-kd-{p}-int8"].system["quant"] == "int8" and by[f"eval-kd-{p}-trim"].system["quant"] == "nf4"
        for s in (t, tl, ev):
            cfg.resolve(plan.tree, list(s.overrides))
    assert {"eval-kd-25-trim", "eval-kd-50-int8"} <= {i.made_by for i in by["report"].inputs}
    assert P.check(plan) == []
    rows = [{"system": "ce-25", "removal": 0.25, "healing": "ce"},
            {"system": "kd-25", "removal": 0.25, "healing": "ce+kd+seq", "storage": ""},
            {"system": "kd-25-trim", "removal": 0.25, "healing": "ce+kd+seq", "storage": "trim"}]
    from engine.report import comparison_pairs

    assert [p for p in comparison_pairs(rows, "teacher") if p[0] == "healing"] == [("healing", "ce-25", "kd-25")]
    bad = plan_for(tiny, "pipeline.storage=[trim+fp8, int8+bf16, trim, trim, scripts]")
    text = "\n".join(P.check(bad))
    assert "unknown levers ['fp8']" in text and "int8 and bf16" in text and "'trim' is listed twice" in text
    assert "export.trim_languages, which is empty" in text                 # scripts needs the languages
    assert "two vocabulary trims" in "\n".join(P.check(plan_for(tiny, "pipeline.storage=[trim+scripts]",
                                                               "export.trim_languages=[en, de]")))
    both = plan_for(tiny, "pipeline.storage=[trim, scripts]", "export.trim_languages=[en, de]")
    by = {s.name: s for s in both.steps}
    assert P.check(both) == []
    assert {"export.trim_vocab=true", 'export.trim_languages=["en","de"]'} <= set(by["export-kd-25-scripts"].overrides)
    assert "export.trim_languages=[]" in by["export-kd-25-trim"].overrides  # the train split's tokens only
    for name in ("export-kd-25-scripts", "export-kd-25-trim"):
        r = cfg.resolve(both.tree, list(by[name].overrides))
        assert r.export.trim_vocab and r.export.trim_languages == (("en", "de") if "scripts" in name else ())
    with pytest.raises(cfg.ConfigError, match="export.trim_languages"):
        cfg.resolve({}, ["export.trim_languages=[en, xx]"])


def test_plan_refuses_an_audio_encoder_ranking(tiny):
    """The pipeline's students are fractions of decoder layers: an audio-encoder main scan is refused, naming the
    key and pipeline.audio, the way to prune the encoder too."""
    text = "\n".join(P.check(plan_for(tiny, "importance.component=audio")))
    assert "importance.component=audio" in text and "pipeline.audio" in text


def test_plan_audio_encoder_students(tiny):
    """pipeline.audio: the first fraction's student again with audio-encoder layers removed too: one scan of the
    teacher's encoder, one prune step that takes the decoder layers of the main ranking and the audio layers of
    the encoder's, healed and evaluated like kd-R; the report learns what to compare it with."""
    plan = plan_for(tiny, "pipeline.audio=[0.5]", "pipeline.students=[0.25, 0.5]")
    by = {s.name: s for s in plan.steps}
    run = tiny["root"] / "run"
    ai = by["importance-audio"]
    assert {"importance.component=audio", "importance.remove=1", "importance.protect=[]",
            f"importance.out={run / 'importance-audio'}"} <= set(ai.overrides)
    r = cfg.resolve(plan.tree, list(ai.overrides))
    assert r.importance.component == "audio" and r.importance.protect == ()
    pr = by["prune-25-a50"]
    assert pr.deps == ("importance", "importance-audio") and pr.removed == 1 and pr.audio_removed == 1
    r = cfg.resolve(plan.tree, list(pr.overrides))
    assert (r.prune.ranking, r.prune.count) == (str(run / "importance"), 1)
    assert (r.prune.audio_ranking, r.prune.audio_count) == (str(run / "importance-audio"), 1)
    assert r.prune.out == str(run / "students" / "r25-a50" / "pruned")
    d = by["distill-kd-25-a50"]
    assert d.deps == ("prune-25-a50", "cache") and d.audio_removed == 1
    ev = by["eval-kd-25-a50"]
    assert ev.deps == ("export-kd-25-a50",) and ev.system["removed_from"] == "prune-25-a50"
    assert ev.system["audio_removal"] == 0.5 and ev.system["audio_of"] == "kd-25" and ev.system["removal"] == 0.25
    assert "audio_removal" not in by["eval-kd-25"].system and "prune-50-a50" not in by   # the first fraction only
    assert "eval-kd-25-a50" in {i.made_by for i in by["report"].inputs}
    assert P.check(plan) == []
    # the validation's size of that export lacks the audio layer: smaller than kd-25's by about one layer
    from engine import preflight

    a = preflight.estimate(plan, by["export-kd-25-a50"]).size.total
    b = preflight.estimate(plan, by["export-kd-25"]).size.total
    assert 0 < b - a < 0.5 * b
    # bad fractions, a model without an audio encoder, all layers
    assert "must be in (0, 1)" in "\n".join(P.check(plan_for(tiny, "pipeline.audio=[1.5]")))
    assert "remove all 2 audio-encoder layers" in "\n".join(P.check(plan_for(tiny, "pipeline.audio=[0.9]")))
    assert "same student twice" in "\n".join(P.check(plan_for(tiny, "pipeline.audio=[0.5, 0.501]")))


def test_report_pairs_an_audio_pruned_student_with_its_twin_and_its_equal_size_peer():
    """An audio-pruned student is compared with the student of the same decoder layers and with the
    decoder-only student nearest in bytes (within 10%), never as a healing variant of the CE-only one."""
    from engine.report import comparison_pairs

    def row(name, removal, healing, mb, audio=0.0, audio_of=""):
        return {"system": name, "removal": removal, "healing": healing, "storage": "", "storage_bytes": mb * 1e6,
                "audio_removal": audio, "audio_of": audio_of}

    rows = [row("teacher", 0.0, "none", 10.0), row("ce-25", 0.25, "ce", 8.0), row("kd-25", 0.25, "kd", 8.0),
            row("kd-38", 0.375, "kd", 7.1), row("kd-50", 0.5, "kd", 6.0),
            row("kd-25-a50", 0.25, "kd", 7.0, 0.5, "kd-25")]
    pairs = comparison_pairs(rows, "teacher")
    assert ("audio", "kd-25", "kd-25-a50") in pairs and ("size", "kd-38", "kd-25-a50") in pairs
    assert [p for p in pairs if p[0] == "healing"] == [("healing", "ce-25", "kd-25")]
    rows[3]["storage_bytes"] = 9e6                                     # no decoder-only peer within 10%
    assert not [p for p in comparison_pairs(rows, "teacher") if p[0] == "size"]
    rows.append({**row("loop-50", 0.5, "kd", 6.0), "oneshot": "kd-50"})  # in steps against at once
    rows.append({**row("kd-50-x2", 0.5, "kd", 6.0), "budget_of": "loop-50"})  # ... healed as long
    pairs = comparison_pairs(rows, "teacher")
    assert ("steps", "kd-50", "loop-50") in pairs and ("steps", "kd-50-x2", "loop-50") in pairs


def test_plan_progressive_prunes_the_healed_student_again(tiny):
    """pipeline.progressive: the 50% student is also reached in steps: the healed 25% student merged,
    scanned again, pruned by the layers still missing, healed with the same teacher cache."""
    plan = plan_for(tiny, "pipeline.progressive=true", "pipeline.students=[0.25, 0.5]", "pipeline.ablations=false")
    by = {s.name: s for s in plan.steps}
    run = tiny["root"] / "run"
    loop = run / "students" / "loop-r50"
    m = by["merge-50"]
    assert m.deps == ("distill-kd-25",) and m.removed == 1
    assert {f"export.source={run / 'students/r25/kd/distill/final'}", "export.quant=none",
            "export.merge_lora=true", "export.max_gb=0"} <= set(m.overrides)
    imp = by["importance-loop-50"]
    assert imp.deps == ("merge-50",) and {f"model.path={loop / 'from'}", "importance.remove=1"} <= set(imp.overrides)
    pr = by["prune-loop-50"]
    assert pr.deps == ("merge-50", "importance-loop-50") and "prune.count=1" in pr.overrides and pr.removed == 2
    d = by["distill-loop-50"]
    assert d.deps == ("prune-loop-50", "cache") and f"distill.student={loop / 'pruned'}" in d.overrides
    assert f"model.path={plan.steps[0].overrides[0].split('=', 1)[1]}" in d.overrides    # the teacher
    ev = by["eval-loop-50"]
    assert ev.system["removed_from"] == ["prune-25", "prune-loop-50"] and ev.system["removal"] == 0.5
    assert ev.system["oneshot"] == "kd-50" and "oneshot" not in by["eval-kd-50"].system
    # the same 50% at once, healed as long as loop-50 was in all (kd-25's healing and its own)
    dx = by["distill-kd-50-x2"]
    assert dx.deps == ("prune-50", "cache") and dx.out == run / "students" / "r50" / "kd-x2" / "distill"
    rx = cfg.resolve(plan.tree, list(dx.overrides))
    assert rx.distill.epochs == 2 * plan.recipe.distill.epochs and rx.distill.max_steps == 2 * plan.recipe.distill.max_steps
    assert by["eval-kd-50-x2"].system["budget_of"] == "loop-50"
    assert "eval-kd-50" in by                                     # the one-shot student stays beside it
    names = [s.name for s in plan.steps]
    assert names.index("distill-kd-25") < names.index("merge-50") < names.index("report")
    for s in (m, imp, pr, d, ev):
        cfg.resolve(plan.tree, list(s.overrides))
    assert P.check(plan) == []
    three = plan_for(tiny, "pipeline.progressive=true", "pipeline.students=[0.25, 0.5, 0.75]")
    b3 = {s.name: s for s in three.steps}
    assert b3["merge-75"].deps == ("distill-loop-50",) and "importance.remove=1" in b3["importance-loop-75"].overrides
    assert b3["eval-loop-75"].system["removed_from"] == ["prune-25", "prune-loop-50", "prune-loop-75"]
    assert "distill.epochs=%g" % (3 * three.recipe.distill.epochs) in b3["distill-kd-75-x3"].overrides
    bad = plan_for(tiny, "pipeline.progressive=true", "pipeline.students=[0.5, 0.25]")
    assert any("list pipeline.students in increasing order" in p for p in P.check(bad))


def test_dry_run_prints_the_table_and_runs_nothing(tiny):
    r = stc("pipeline", "--config", tiny["recipe"], "--dry-run", "--nproc", "2")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert max(len(line) for line in r.stdout.splitlines()) <= 80 or "report.systems" in r.stdout
    out = re.sub(r" \\\n +", " ", r.stdout)                          # the wrapped commands, unwrapped
    for name in ORDER:
        assert name in out
    assert "todo" in out and "run --nproc 2 importance" in out
    assert not (tiny["root"] / "run").exists()


# ============================================================================================ refusals

def test_missing_model_dir_is_refused_naming_path_and_step(tiny, tmp_path):
    r = stc("pipeline", "--config", tiny["recipe"], f"model.path={tmp_path / 'nope'}", f"run.out_dir={tmp_path / 'r'}")
    assert r.returncode == 2, r.stderr
    assert str(tmp_path / "nope") in r.stderr and "model.path" in r.stderr and "eval-teacher" in r.stderr
    assert not (tmp_path / "r").exists()                                   # refused before running anything


def test_missing_shards_refused(tiny, tmp_path):
    r = stc("pipeline", "--config", tiny["recipe"], f"data.shards={tmp_path / 'none'}", f"run.out_dir={tmp_path / 'r'}")
    assert r.returncode == 2 and "data.shards" in r.stderr and "stc shards build" in r.stderr


@pytest.mark.parametrize("ovs, names", [(["evaluate.split=leak"], ["'dev'", "'leak'"]),
                                        (["evaluate.split=dev"], ["'dev'"])])
def test_test_split_overlapping_dev_split_is_refused(tiny, tmp_path, ovs, names):
    r = stc("pipeline", "--config", tiny["recipe"], f"run.out_dir={tmp_path / 'r'}", *ovs)
    assert r.returncode == 2, r.stderr
    for n in names:
        assert n in r.stderr
    assert "data.dev_split" in r.stderr and not (tmp_path / "r").exists()


# ============================================================================================ skip / resume

class FakeRunner:
    """Writes each step's marker as the stage would (meta.json with the resolved config), unless told to fail."""

    def __init__(self, plan: P.Plan, fail: dict[str, int] | None = None, write: bool = True):
        self.plan, self.fail, self.write, self.ran = plan, dict(fail or {}), write, []

    def __call__(self, step: P.Step, argv: list[str], log: Path, env: dict | None = None) -> int:
        self.ran.append(step.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(" ".join(argv))
        if step.name in self.fail:
            return self.fail.pop(step.name)
        if not self.write:
            return 0
        step.marker.parent.mkdir(parents=True, exist_ok=True)
        doc = {"schema": 1, "config": cfg.to_dict(cfg.resolve(self.plan.tree, list(step.overrides)))}
        if step.stage == "prune":
            doc["pruned"] = {"removed_original": [2] if "count=1" in " ".join(step.overrides) else [2, 1]}
        step.marker.write_text(json.dumps(doc))
        return 0


def _status(plan: P.Plan) -> dict:
    return json.loads(plan.status_path.read_text())


def test_runs_in_order_then_skips_everything(tiny, tmp_path):
    plan = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}")
    fake = FakeRunner(plan)
    assert P.run(plan, runner=fake, echo=lambda m: None) == 0
    assert fake.ran == ORDER
    st = _status(plan)
    assert st["state"] == "done" and all(s["state"] == "done" and s["exit"] == 0 for s in st["steps"])
    assert (tmp_path / "r" / "pipeline" / "config.yaml").exists()
    # what the report says of each system comes from the step records, the same for local runs and SLURM jobs
    from engine import report

    report_step = plan.step("report")
    described = report.plan_systems(plan.recipe_of(report_step))
    sysj = described["kd-25"]
    assert sysj["removed_layers"] == [2] and sysj["removal"] == 0.25 and sysj["healing"] == "ce+kd+seq"
    assert sysj["quant"] == "nf4" and sysj["label"] and sysj["step"] == "eval-kd-25"
    assert described["pruned-25"]["healing"] == "none" and described["teacher"]["removed_layers"] == []
    assert sorted(described) == sorted(SYSTEMS)

    again = FakeRunner(plan)
    assert P.run(P.build_plan(plan.recipe), runner=again, echo=lambda m: None) == 0
    assert again.ran == []
    assert {s["state"] for s in _status(plan)["steps"]} == {"skipped"}


@pytest.mark.parametrize("code, expect", [(1, 1), (75, 75)])
def test_failure_or_stop_then_rerun_resumes_at_the_first_unfinished_step(tiny, tmp_path, code, expect):
    plan = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}")
    first = FakeRunner(plan, fail={"distill-kd-25": code})
    assert P.run(plan, runner=first, echo=lambda m: None) == expect
    assert first.ran == ORDER[:ORDER.index("distill-kd-25") + 1]            # nothing after the failed step
    st = _status(plan)
    assert st["state"] == ("failed" if code == 1 else "stopped")
    rec = {s["name"]: s for s in st["steps"]}
    assert rec["distill-kd-25"]["exit"] == code and rec["export-kd-25"]["state"] == "todo"
    assert Path(rec["distill-kd-25"]["log"]).exists()
    second = FakeRunner(plan)
    assert P.run(P.build_plan(plan.recipe), runner=second, echo=lambda m: None) == 0
    assert second.ran == ORDER[ORDER.index("distill-kd-25"):]


class TimedRunner(FakeRunner):
    """A FakeRunner that takes a little time and records when each step ran and what GPUs it saw."""

    def __init__(self, plan, **kw):
        super().__init__(plan, **kw)
        self.spans: dict[str, tuple[float, float]] = {}
        self.gpus: dict[str, str | None] = {}
        import threading

        self.lock = threading.Lock()

    def __call__(self, step, argv, log, env=None):
        import time

        t0 = time.monotonic()
        time.sleep(0.05)
        with self.lock:
            code = super().__call__(step, argv, log)
            self.spans[step.name] = (t0, time.monotonic())
            self.gpus[step.name] = (env or {}).get("CUDA_VISIBLE_DEVICES")
        return code


def test_each_step_is_told_its_record_and_a_stage_adds_its_seconds_there(tiny, tmp_path, monkeypatch):
    """Locally and as SLURM jobs a step's stage gets ``$STC_STEP_RECORD`` (its record exists by then) and
    adds its wall seconds on success: the device time of stages that keep no timing of their own."""
    from engine import stages

    plan = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}")
    seen = {}

    class Recording(FakeRunner):
        def __call__(self, step, argv, log, env=None):
            seen[step.name] = (env or {}).get(stages.STEP_RECORD_ENV)
            assert json.loads(Path(seen[step.name]).read_text())["step"] == step.name
            return super().__call__(step, argv, log, env)

    assert P.run(plan, runner=Recording(plan), echo=lambda m: None) == 0
    assert seen["prune-25"] == str(plan.step_record(plan.step("prune-25")).resolve())
    monkeypatch.setenv(stages.STEP_RECORD_ENV, seen["prune-25"])
    stages.note_seconds(12.34)
    rec = json.loads(Path(seen["prune-25"]).read_text())
    assert rec["seconds"] == 12.3 and rec["step"] == "prune-25" and rec["ranks"] == 1
    monkeypatch.setenv("RANK", "1")                        # only rank 0 writes
    monkeypatch.setenv("WORLD_SIZE", "2")
    stages.note_seconds(99.0)
    assert json.loads(Path(seen["prune-25"]).read_text())["seconds"] == 12.3
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(stages.STEP_RECORD_ENV, str(tmp_path / "none.json"))   # no record: nothing written
    stages.note_seconds(1.0)
    assert not (tmp_path / "none.json").exists()


def test_jobs_run_independent_steps_side_by_side(tiny, tmp_path, monkeypatch):
    """`--jobs 2`: at most two steps at once, none before the steps it reads from finished; with GPUs
    each running step sees its own (--nproc of them for a multi-rank step, none for a host step)."""
    monkeypatch.setattr(P, "local_gpus", lambda: ["0", "1", "2", "3"])
    plan = P.build_plan(cfg.load(tiny["recipe"], [f"run.out_dir={tmp_path / 'r'}"]), nproc=2, jobs=2)
    fake = TimedRunner(plan)
    assert P.run(plan, runner=fake, echo=lambda m: None) == 0
    assert sorted(fake.ran) == sorted(ORDER)
    spans = fake.spans
    for s in plan.steps:
        for d in s.deps:
            assert spans[d][1] <= spans[s.name][0], (d, s.name)          # inputs first
    events = sorted([(a, 1) for a, _ in spans.values()] + [(b, -1) for _, b in spans.values()])
    live = peak = 0
    for _, e in events:
        live += e
        peak = max(peak, live)
    assert peak == 2                                                       # side by side, never more
    for name, ids in fake.gpus.items():
        st = plan.step(name)
        want = plan.ranks(st) if P.stages.get(st.stage).resources == "gpu" else 0     # export: one
        assert len([x for x in (ids or "").split(",") if x]) == want, (name, ids)
    overlapping = [(a, b) for a in spans for b in spans if a < b and spans[a][0] < spans[b][1]
                   and spans[b][0] < spans[a][1]]
    assert overlapping and all(not set(fake.gpus[a].split(",")) & set(fake.gpus[b].split(","))
                               for a, b in overlapping if fake.gpus[a] and fake.gpus[b])


def test_with_jobs_a_failure_starts_nothing_more_but_lets_running_steps_finish(tiny, tmp_path):
    plan = P.build_plan(cfg.load(tiny["recipe"], [f"run.out_dir={tmp_path / 'r'}"]), jobs=2)
    fake = TimedRunner(plan, fail={"importance": 1})
    assert P.run(plan, runner=fake, echo=lambda m: None) == 1
    st = {s["name"]: s for s in _status(plan)["steps"]}
    assert st["importance"]["state"] == "failed" and _status(plan)["failed_step"] == "importance"
    assert all(st[n]["state"] == "todo" for n in ("prune-25", "distill-kd-25", "report"))
    assert all(st[n]["state"] in ("done", "todo") for n in st if n != "importance")


def test_a_step_that_writes_no_marker_fails(tiny, tmp_path):
    plan = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}")
    fake = FakeRunner(plan, write=False)
    assert P.run(plan, runner=fake, echo=lambda m: None) == 1 and fake.ran == ["eval-teacher"]


def test_changed_config_reruns_that_step_and_what_reads_it(tiny, tmp_path):
    plan = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}")
    assert P.run(plan, runner=FakeRunner(plan), echo=lambda m: None) == 0
    plan2 = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}", "distill.lr=0.5", "distill.save_every=7")
    st = P.states(plan2)
    assert st["distill-kd-25"].startswith("stale: distill.lr") and st["importance"] == "done"
    assert st["export-kd-25"].startswith("todo (after distill-kd-25")
    fake = FakeRunner(plan2)
    assert P.run(plan2, runner=fake, echo=lambda m: None) == 0
    assert fake.ran == [n for n in ORDER if n.split("-")[0] in ("distill", "export") or
                        n in ("eval-kd-25", "eval-ce-25", "eval-middle-25", "eval-kd-50", "report")]


def test_a_key_the_recorded_config_lacks_counts_as_its_default(tiny, tmp_path):
    """A finished step whose config was recorded by an engine without some key (added since) stays done while
    this run keeps that key's default, and is stale once this run sets another value."""
    plan = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}")
    assert P.run(plan, runner=FakeRunner(plan), echo=lambda m: None) == 0
    step = plan.step("prune-25")
    meta = json.loads(step.marker.read_text())
    del meta["config"]["prune"]["audio_count"], meta["config"]["prune"]["audio_ranking"]
    step.marker.write_text(json.dumps(meta))
    assert P.states(plan)["prune-25"] == "done"
    st = P.states(plan_for(tiny, f"run.out_dir={tmp_path / 'r'}", "prune.audio_count=2"))
    assert st["prune-25"] == "stale: prune.audio_count was 0, now 2"


def test_a_kept_step_record_takes_the_plans_description_of_its_system(tiny, tmp_path):
    """An evaluation that stays done keeps its record's config and seconds, but its system description (what
    the report labels and pairs it by) follows the plan, e.g. after an engine that describes systems more fully."""
    plan = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}")
    assert P.run(plan, runner=FakeRunner(plan), echo=lambda m: None) == 0
    path = plan.step_record(plan.step("eval-kd-25"))
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "seconds": 12.5, "system": {"name": "kd-25", "label": "older words"}}))
    fake = FakeRunner(plan)
    assert P.run(plan, runner=fake, echo=lambda m: None) == 0 and fake.ran == []
    new = json.loads(path.read_text())
    assert new["system"] == old["system"] and new["seconds"] == 12.5 and new["config"] == old["config"]


def test_stale_step_sets_its_old_output_aside_and_a_failure_says_why_in_one_line(tiny, tmp_path):
    run = tmp_path / "r"
    plan = plan_for(tiny, f"run.out_dir={run}")
    assert P.run(plan, runner=FakeRunner(plan), echo=lambda m: None) == 0
    d = plan.step("distill-kd-25").out
    (d / "checkpoints" / "step-00000002").mkdir(parents=True)            # what a trainer leaves
    plan2 = plan_for(tiny, f"run.out_dir={run}", "distill.lr=0.5")
    said: list[str] = []
    assert P.run(plan2, runner=FakeRunner(plan2), echo=said.append) == 0
    (aside,) = d.parent.glob("distill.stale-*")
    assert (aside / "checkpoints" / "step-00000002").exists() and not (d / "checkpoints").exists()
    assert any("distill-kd-25: stale: distill.lr was 1.0e-03" in m.replace("0.001", "1.0e-03") and "set aside" in m
               for m in said), said

    # an unfinished run of another config (no marker) is set aside too, never resumed
    class Failing(FakeRunner):
        def __call__(self, step, argv, log, env=None):
            if step.name == "distill-kd-25":
                self.ran.append(step.name)
                (step.out / "checkpoints" / "step-00000001").mkdir(parents=True)
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text("[rank0] loading...\nstc distill: error: checkpoint x belongs to another run or config; "
                               "refusing to resume it:\n  - distill.lr: checkpoint has 0.5, this run 0.7\n")
                return 1
            return super().__call__(step, argv, log)

    plan3 = plan_for(tiny, f"run.out_dir={run}", "distill.lr=0.7")
    said = []
    assert P.run(plan3, runner=Failing(plan3), echo=said.append) == 1
    fail = [m for m in said if "failed" in m]
    assert fail and "step distill-kd-25 failed (exit 1)" in fail[0]
    assert "stc distill: error: checkpoint x belongs to another run or config" in fail[0] and "distill.lr" in fail[0]
    rec = {s["name"]: s for s in json.loads(plan3.status_path.read_text())["steps"]}
    assert rec["distill-kd-25"]["error"].startswith("stc distill: error:")
    plan4 = plan_for(tiny, f"run.out_dir={run}", "distill.lr=0.9")
    st = P.states(plan4)
    assert st["distill-kd-25"].startswith("stale: an unfinished run of another config is there (distill.lr")
    said = []
    assert P.run(plan4, runner=FakeRunner(plan4), echo=said.append) == 0
    assert len(list(d.parent.glob("distill.stale-*"))) == 3 and not (d / "checkpoints").exists()  # 0.5, 0.7 set aside too


def test_moved_run_and_inputs_stay_done_but_changed_content_is_stale(tiny, tmp_path):
    """Paths are not compared (a run dir moved, shards staged elsewhere); what they hold is."""
    import shutil

    run = tmp_path / "r"
    plan = plan_for(tiny, f"run.out_dir={run}")
    assert P.run(plan, runner=FakeRunner(plan), echo=lambda m: None) == 0
    sh2 = tmp_path / "sh2"
    shutil.copytree(tiny["root"] / "sh", sh2)
    moved = P.build_plan(cfg.load(tiny["recipe"], [f"run.out_dir={run}", f"data.shards={sh2}"]))
    assert set(P.states(moved).values()) == {"done"}
    meta = json.loads((sh2 / "meta.json").read_text())
    meta["fingerprints"]["data"] = "sha256:" + "0" * 64                  # other shards at the same place
    (sh2 / "meta.json").write_text(json.dumps(meta))
    st = P.states(moved)
    assert st["importance"].startswith("stale: the content of data.shards changed")
    assert st["prune-25"].startswith("stale: the content of data.shards changed")   # reads it through importance


def test_shards_built_from_another_manifest_are_stale(tiny, tmp_path):
    """Shards built (by hand, before any pipeline run) from other manifest bytes are rebuilt."""
    import shutil

    m = tmp_path / "manifest.jsonl"
    shutil.copy(_manifest_path(tiny), m)
    sh = tmp_path / "sh"
    shutil.copytree(tiny["root"] / "sh", sh)
    plan = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}", f"shards.manifest={m}", f"shards.out={sh}",
                    f"data.shards={sh}", "shards.samples_per_shard=4")
    assert P.states(plan)["shards"] == "done"
    m.write_text(m.read_text() + m.read_text().splitlines()[0].replace('"train"', '"extra"') + "\n")
    assert P.states(plan)["shards"] == f"stale: {m} changed since the shards were built from it"


def _manifest_path(tiny) -> Path:
    meta = json.loads((tiny["root"] / "sh" / "meta.json").read_text())
    return Path(meta["source"]["manifest"])


def test_missing_input_of_a_step_names_the_step_that_makes_it(tiny, tmp_path):
    plan = plan_for(tiny, f"run.out_dir={tmp_path / 'r'}")
    step = next(s for s in plan.steps if s.name == "distill-kd-25")
    msgs = P.missing_inputs(plan, step)
    assert any("students/r25/pruned/meta.json" in m and "'prune-25'" in m for m in msgs)
    assert any("cache/meta.json" in m and "'cache'" in m for m in msgs)


def test_subprocess_runner_logs_streams_and_passes_the_exit_code(tmp_path, capsys):
    step = P.Step("fake", "prune", (), tmp_path, tmp_path / "meta.json")
    code = P.subprocess_runner(step, [sys.executable, "-c", "print('hello from the step'); raise SystemExit(75)"],
                               tmp_path / "logs" / "fake.log")
    assert code == 75
    assert "hello from the step" in (tmp_path / "logs" / "fake.log").read_text()
    assert "[fake] hello from the step" in capsys.readouterr().err


def test_refuses_to_run_under_a_launcher(tiny, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(P.PipelineError, match="--nproc"):
        P.main(cfg.load(tiny["recipe"]), argparse.Namespace(dry_run=True))


# ============================================================================================ end to end

@pytest.fixture(scope="module")
def local_run(tiny) -> Path:
    """`stc pipeline` on the tiny recipe, once for the module: one rank per step (the stages' own tests run
    them on two ranks; here the plan is what is tested), two independent steps at once on the two cores
    of the test machine, as SLURM runs them below."""
    r = stc("pipeline", "--config", tiny["recipe"], "--nproc", "1", "--jobs", "2", *E2E, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    return tiny["root"] / "run"


@pytest.mark.slow
def test_pipeline_end_to_end(tiny, local_run):
    import sacrebleu

    run = local_run
    plan = P.build_plan(cfg.load(run / "pipeline" / "config.yaml"))
    order = [s.name for s in plan.steps]
    assert len(order) == 18 and order[-1] == "report"
    for s in plan.steps:
        assert s.marker.exists(), s.name
        assert (run / "pipeline" / "logs" / f"{s.name}.log").exists(), s.name
    st = _status(plan)
    assert st["state"] == "done" and [s["name"] for s in st["steps"]] == order
    assert all(s["exit"] == 0 and s["seconds"] is not None for s in st["steps"])
    for d in ("students/r50/pruned", "students/middle-r50/pruned", "cache", "students/r50/kd/export",
              "students/r50/ce/export", "students/middle-r50/kd/export", "importance",
              "students/middle-r50/importance"):
        assert (run / d / "meta.json").exists(), d
    assert json.loads((run / "students/r50/kd/export/meta.json").read_text())["exported"]["quant"] == "nf4"
    prune50 = json.loads((run / "students/r50/pruned/meta.json").read_text())["pruned"]
    ranking = json.loads((run / "importance/ranking.json").read_text())
    assert prune50["removed"] == ranking["removed"][:2]                   # the first two of the removal order
    middle = json.loads((run / "students/middle-r50/pruned/meta.json").read_text())["pruned"]
    assert len(middle["removed"]) == 2 and middle["removed"][1] == middle["removed"][0] + 1

    for name in E2E_SYSTEMS:
        d = run / "eval" / name
        scores = json.loads((d / "scores.json").read_text())
        rows = [json.loads(x) for x in (d / "hypotheses.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and scores["n"] == 3
        hyps, refs = [x["hyp"] for x in rows], [[x["ref"] for x in rows]]
        de = scores["directions"]["en-de"]
        assert de["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs, tokenize="13a").score)
        assert de["chrf"]["score"] == pytest.approx(sacrebleu.CHRF().corpus_score(hyps, refs).score)
        assert de["chrfpp"]["score"] == pytest.approx(sacrebleu.CHRF(word_order=2).corpus_score(hyps, refs).score)
    assert json.loads((run / "eval/teacher-shuffled/scores.json").read_text())["shuffle_audio"] is True
    rep = json.loads((run / "report" / "report.json").read_text())
    rows = {row["system"]: row for row in rep["systems"]}
    assert sorted(rows) == sorted(E2E_SYSTEMS) and rep["reference"] == "teacher"
    assert rows["kd-50"]["removed_layers"] == prune50["removed_original"]
    assert rows["middle-50"]["removed_layers"] == middle["removed_original"]
    for name in E2E_SYSTEMS:                                               # described by the plan's steps
        assert rows[name]["label"] and rows[name]["healing"] in ("none", "ce", "ce+kd+seq"), name
        assert rows[name]["removal"] == (0.0 if "teacher" in name else 0.5), name
    assert rows["kd-50"]["decoder_layers"] == 2 and rows["teacher"]["decoder_layers"] == 4
    assert (run / "report" / "report.md").exists() and (run / "report" / "meta.json").exists()

    # each step's log is a batch log (not a terminal): the long stages wrote plain progress lines there,
    # and rank 0 wrote them to its own log file too
    line = r"\d\d:\d\d:\d\d INFO {}: \d+/\d+ {} \(\d+%\)"
    for step, what, unit, out in (("importance", "importance iteration 0", "candidates", "importance"),
                                  ("cache", r"cache build \(rank 0's shards\)", "samples", "cache"),
                                  ("eval-teacher", "evaluate teacher", "batches", "eval"),
                                  ("distill-kd-50", "distill", "steps", "students/r50/kd/distill")):
        text = (run / "pipeline" / "logs" / f"{step}.log").read_text()
        assert re.search(line.format(what, unit), text), (step, text[-2000:])
        assert "\x1b[" not in text, step                                   # no bar drawing in a log
        assert re.search(line.format(what, unit).split("INFO ", 1)[1], (run / out / "logs" / "rank0.log").read_text())

    again = stc("pipeline", "--config", tiny["recipe"], "--nproc", "1", *E2E)   # everything done: nothing runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert {s["state"] for s in _status(plan)["steps"]} == {"skipped"}


@pytest.mark.slow
def test_submit_pipeline_on_slurm_equals_the_local_run(tiny, local_run, slurm_cluster, tmp_path):
    """`stc submit pipeline` on a real one-node SLURM runs the same plan as `stc pipeline` (the same
    steps, command lines and rank counts) to the report, with the same hypotheses, scores and report
    rows for every system; independent steps run as jobs side by side."""
    from launchers import slurm
    from slurm_fixture import wait_job

    run = tmp_path / "run"
    env = dict(_env(), SLURM_CONF=slurm_cluster.env()["SLURM_CONF"],
               STC_TORCH_EXTENSIONS_DIR=_env().get("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1]
                                                                             / ".torch_extensions")))
    r = subprocess.run([*CMD, "submit", "pipeline", "--config", str(tiny["recipe"]), "--ntasks-per-node", "1",
                        *E2E, f"run.out_dir={run}"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = r.stdout.split()
    order = [s.name for s in P.build_plan(cfg.load(local_run / "pipeline" / "config.yaml")).steps]
    assert len(jobs) == len(order)
    assert wait_job(jobs[-1], timeout=1500).get("JobState", "COMPLETED") == "COMPLETED", \
        subprocess.run([*CMD, "jobs", "--ledger", str(run)], env=env, capture_output=True, text=True).stdout[-4000:]
    views = {v.step: v for v in slurm.job_views(run / "slurm" / "ledger.jsonl")}
    assert sorted(views) == sorted(order) and {v.state for v in views.values()} == {"COMPLETED"}
    ev = [e for e in slurm.read_ledger(run / "slurm" / "ledger.jsonl") if e["event"] in ("started", "finished")]
    span = {}
    for e in ev:
        span.setdefault(e["step"], {})[e["event"]] = e["time"]
    overlap = [(a, b) for a in span for b in span if a < b and span[a]["started"] < span[b]["finished"]
               and span[b]["started"] < span[a]["finished"]]
    assert overlap, span                                                   # independent branches ran side by side
    for name in E2E_SYSTEMS:
        a, b = local_run / "eval" / name, run / "eval" / name
        assert (a / "hypotheses.jsonl").read_text() == (b / "hypotheses.jsonl").read_text(), name
        sa, sb = json.loads((a / "scores.json").read_text()), json.loads((b / "scores.json").read_text())
        assert sa["directions"] == sb["directions"], name
    ra, rb = (json.loads((d / "report" / "report.json").read_text()) for d in (local_run, run))
    timing = ("tokens_per_s", "sentences_per_s", "latency_s", "latency_p50_s", "batch_seconds_per_sentence",
              "seconds", "model", "dir")                                   # clocks and paths
    assert [x["system"] for x in ra["systems"]] == [y["system"] for y in rb["systems"]]
    for x, y in zip(ra["systems"], rb["systems"]):
        assert {k: v for k, v in x.items() if k not in timing} == {k: v for k, v in y.items() if k not in timing}
    assert ra["bars"] == rb["bars"] and ra["importance"]["removed_original"] == rb["importance"]["removed_original"]
    # device time comes from the same sources: the stages without timing of their own (prune, export)
    # recorded their wall seconds in the step record as jobs too
    assert [(x["stage"], x["source"]) for x in ra["device_hours"]] == [(y["stage"], y["source"]) for y in rb["device_hours"]]
    assert all(isinstance(y["device_hours"], float) for y in rb["device_hours"] if y["stage"] != "report"), rb["device_hours"]


@pytest.mark.slow
def test_progressive_pipeline_end_to_end(tiny, tmp_path):
    """Prune -> heal -> prune on the tiny model: the 50% student reached in steps is a real model that lacks
    the first round's layers and the second round's, and the report lists every removed layer."""
    out = tmp_path / "run"
    r = stc("pipeline", "--config", tiny["recipe"], "--nproc", "1", f"run.out_dir={out}", "pipeline.progressive=true",
            "pipeline.students=[0.25, 0.5]", "pipeline.ablations=false", "pipeline.shuffle_check=false", timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    first = json.loads((out / "students/r25/pruned/meta.json").read_text())["pruned"]
    second = json.loads((out / "students/loop-r50/pruned/meta.json").read_text())["pruned"]
    ranking = json.loads((out / "students/loop-r50/importance/ranking.json").read_text())
    assert second["removed"] == ranking["removed"][:1]
    assert not set(first["removed_original"]) & set(second["removed_original"])
    assert sorted(second["kept_original"]) == sorted(set(range(4)) - set(first["removed_original"])
                                                     - set(second["removed_original"]))
    conf = json.loads((out / "students/loop-r50/kd/export/config.json").read_text())
    assert (conf.get("text_config") or conf)["num_hidden_layers"] == 2
    rows = {row["system"]: row for row in json.loads((out / "report/report.json").read_text())["systems"]}
    assert rows["loop-50"]["removed_layers"] == sorted(first["removed_original"] + second["removed_original"])
    assert rows["loop-50"]["decoder_layers"] == 2 and "in steps" in rows["loop-50"]["label"]
    rep = json.loads((out / "report/report.json").read_text())
    assert {g["baseline"] for g in rep["significance"] if g["system"] == "loop-50" and g["kind"] == "steps"} == \
        {"kd-50", "kd-50-x2"}
    # the equal-budget one-shot student trained twice as many steps as kd-50
    steps_of = {n: next(json.loads(line)["total_steps"] for line in
                        (out / f"students/r50/{n}/distill/metrics.jsonl").read_text().splitlines()
                        if '"start"' in line) for n in ("kd", "kd-x2")}
    assert steps_of["kd"] > 0 and abs(steps_of["kd-x2"] - 2 * steps_of["kd"]) <= 1, steps_of


@pytest.mark.slow
def test_audio_encoder_student_end_to_end(tiny, tmp_path):
    """pipeline.audio on the tiny model: the encoder is scanned on the teacher, the student lacks the main
    ranking's decoder layers and the encoder ranking's audio layer, reloads as a smaller model, and the report
    names both and compares it with the student of the same decoder layers."""
    out = tmp_path / "run"
    r = stc("pipeline", "--config", tiny["recipe"], "--nproc", "1", f"run.out_dir={out}", "pipeline.audio=[0.5]",
            "pipeline.students=[0.5]", "pipeline.ablations=false", "pipeline.shuffle_check=false", timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    audio = json.loads((out / "importance-audio/ranking.json").read_text())
    dec = json.loads((out / "importance/ranking.json").read_text())
    assert audio["component"] == "audio" and len(audio["removed"]) == 1
    pr = json.loads((out / "students/r50-a50/pruned/meta.json").read_text())["pruned"]
    assert pr["audio_removed_original"] == audio["removed"] and pr["removed"] == dec["removed"][:2]
    conf = json.loads((out / "students/r50-a50/kd/export/config.json").read_text())
    assert conf["audio_config"]["encoder_layers"] == 1 and conf["text_config"]["num_hidden_layers"] == 2
    rep = json.loads((out / "report/report.json").read_text())
    rows = {row["system"]: row for row in rep["systems"]}
    a, k = rows["kd-50-a50"], rows["kd-50"]
    assert a["audio_removed_layers"] == audio["removed"] and a["removed_layers"] == k["removed_layers"]
    assert 0 < a["storage_bytes"] < k["storage_bytes"]
    assert {(g["kind"], g["baseline"]) for g in rep["significance"] if g["system"] == "kd-50-a50"} == \
        {("reference", "teacher"), ("audio", "kd-50")}
    assert "removed audio-encoder layers" in (out / "report/report.md").read_text()
