"""`--dry-run` on every stage that writes: it validates, prints what it would do, and writes nothing.

Each stage runs through the real CLI (a subprocess, as a user runs it) on tiny inputs; the whole
directory tree (names, sizes, modification times) is compared before and after. A dry run that
would be refused by the real run is refused too (exit != 0, one line, no traceback).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def stc(*argv, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, argv)], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny model, its 2-layer pruned copy (a real `stc prune` output), shards with train/dev/test, a
    MuST-C and a CoVoST corpus, a recipe pointing at them."""
    from engine.models.tiny import build_tiny

    from sine_data import build_split_shards
    from test_importers import make_covost, make_mustc

    root = tmp_path_factory.mktemp("dry")
    build_tiny("qwen2audio", root / "model", num_layers=4, hidden_size=64, dtype="fp32", seed=0)
    build_split_shards(root)
    r = stc("prune", "--layers", "1", f"model.path={root / 'model'}", "model.dtype=fp32",
            f"prune.out={root / 'pruned'}")
    assert r.returncode == 0, r.stderr
    make_mustc(root / "mustc")
    make_covost(root / "covost")
    (root / "recipe.yaml").write_text(
        f"model: {{path: {root / 'model'}, dtype: fp32}}\n"
        f"data: {{shards: {root / 'sh'}, batch_size: 2}}\n"
        f"run: {{out_dir: {root / 'run'}, device: cpu}}\n"
        f"shards: {{manifest: {root / 'm.jsonl'}, out: {root / 'sh2'}}}\n"
        "distill: {mode: lora, epochs: 1, global_batch: 4, lora: {r: 4}, teacher_mode: online, seq_kd: false}\n"
        "finetune: {global_batch: 4, epochs: 1}\n")
    return root


def cases(ws: Path) -> dict[str, list]:
    rec = ["--config", ws / "recipe.yaml"]
    return {
        "shards build": ["shards", "build", *rec],
        "shards stream": ["shards", "stream", *rec, "--split", "train"],
        "import mustc": ["import", "mustc", ws / "mustc", "--split", "tst-COMMON", "--src", "en", "--tgt", "de",
                         "--out", ws / "imported.jsonl"],
        "import covost": ["import", "covost", "--tsv", ws / "covost" / "covost_v2.en_de.test.tsv", "--clips",
                          ws / "covost" / "cv" / "clips", "--out", ws / "covost.jsonl"],
        "finetune": ["finetune", *rec],
        "importance": ["importance", *rec, "importance.remove=1"],
        "prune": ["prune", *rec, "--layers", "2", "--out", ws / "p2"],
        "cache build": ["cache", "build", *rec],
        "distill": ["distill", *rec, f"distill.student={ws / 'pruned'}"],
        "export": ["export", *rec, f"export.source={ws / 'pruned'}"],
        "evaluate": ["evaluate", *rec, "--models", f"t={ws / 'model'},s={ws / 'pruned'}"],
        "report": ["report", *rec],
        "pipeline": ["pipeline", *rec, "pipeline.students=[0.25]", "shards.manifest="],
        "demo": ["demo", "--config", ws / "recipe.yaml", "shards.manifest="],
        "submit": ["submit", "--dry-run", "pipeline", *rec, "pipeline.students=[0.25]", "shards.manifest="],
    }


STAGES = ["shards build", "shards stream", "import mustc", "import covost", "finetune", "importance", "prune",
          "cache build", "distill", "export", "evaluate", "report", "pipeline", "demo", "submit"]


def test_every_writing_stage_is_covered():
    from engine import stages

    writing = {s.name for s in stages.REGISTRY if s.dry_run}
    assert writing <= set(STAGES), f"stages with --dry-run but no test here: {writing - set(STAGES)}"


@pytest.mark.parametrize("name", STAGES)
def test_dry_run_validates_prints_and_writes_nothing(ws, name, stc_inproc):
    argv = cases(ws)[name]
    if name not in ("submit",):
        argv = [*argv, "--dry-run"]
    before = tree(ws)
    code, out, err = _run(stc_inproc, argv)
    assert code == 0, f"{name}: {out[-2000:]}{err[-3000:]}"
    assert out.strip(), name                                        # it says what it would do, on stdout
    assert tree(ws) == before, f"{name} --dry-run wrote: {set(tree(ws)) ^ set(before)}"


def test_dry_run_through_the_real_program(ws):
    """One dry run as a user starts it (a new process): stdout has the plan, nothing is written."""
    before = tree(ws)
    r = stc(*cases(ws)["distill"], "--dry-run")
    assert r.returncode == 0 and "distill (dry run):" in r.stdout and "Traceback" not in r.stderr, r.stderr
    assert tree(ws) == before


@pytest.mark.parametrize("name, extra, want", [
    ("distill", ["distill.global_batch=3"], "global_batch"),
    ("finetune", ["model.path=/nonexistent/model"], "does not exist"),
    ("prune", ["--layers", "9"], "9"),
    ("evaluate", ["--split", "nope"], "splits there"),
    ("cache build", ["cache.split=nope"], "splits there"),
])
def test_dry_run_refuses_what_the_run_would_refuse(ws, name, extra, want, stc_inproc):
    before = tree(ws)
    code, out, err = _run(stc_inproc, [*cases(ws)[name], *extra, "--dry-run"])
    assert code != 0 and want in err and f"stc {name}: error:" in err, err[-2000:]
    assert tree(ws) == before


def _run(stc_inproc, argv) -> tuple[int, str, str]:
    r = stc_inproc(*argv)
    return r.returncode, r.stdout, r.stderr
