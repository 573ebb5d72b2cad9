"""bench/gpu.py, the one-call GPU check, kept working on a CPU: its ``--tiny`` run goes through the same
engine functions as the 7B run (every row must succeed here, where every package is installed), and
its failure isolation, dependency skips and time guard are checked in-process."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
ITEMS = ("environment", "teacher", "dev set preparation", "importance task scan", "importance nll scan",
         "cache build", "evaluate throughput", "student", "QLoRA step", "plain peft LoRA step",
         "DeepSpeed ZeRO-2 LoRA step")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod        # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_run_fills_every_row(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("PYTHONPATH", None)          # the script finds the engine itself (no install needed)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    rows = doc["rows"]
    assert [any(r["item"].startswith(i) for r in rows) for i in ITEMS] == [True] * len(ITEMS), \
        [r["item"] for r in rows]
    for row in rows:
        assert row["value"] or row["reason"], row
        assert row["status"] == "ok", f"{row['item']}: {row['status']}: {row['reason']}\n" \
                                      f"{row['data'].get('traceback', '')}"
        assert row["peak"]["rss_bytes"] > 0, row
    by = {r["item"].split(" (")[0]: r for r in rows}
    assert by["cache build"]["data"]["label_tokens"] > 0 and by["cache build"]["data"]["bytes"] > 0
    assert by["DeepSpeed ZeRO-2 LoRA step"]["data"]["ds_config"]["zero_optimization"]["stage"] == 2
    assert "x plain LoRA" in by["QLoRA step"]["value"]
    md = (tmp_path / "gpu.md").read_text()
    assert md.count("\n| ") == len(rows) + 1 and "H100 anchor" in md and "6.45 h" in md
    assert "| item |" in r.stdout            # the table is printed too
    print(f"bench/gpu.py --tiny: {wall:.0f} s")   # a figure for the log: timing belongs to benchmarks, not tests


@pytest.fixture
def bench(tmp_path):
    import torch

    g = _bench_module()
    table = g.Table(tmp_path / "out", {"device": "cpu", "shape": "tiny", "versions": {}})
    args = SimpleNamespace(budget_s=60.0, tmp=str(tmp_path), model="")
    b = g.Bench(args, table, g.TINY, torch.device("cpu"))
    yield g, b
    b.close()


def test_failure_dependency_and_guard_rows(bench):
    g, b = bench
    ok = b.run_item("a", "works", "anchor", lambda row: setattr(row, "value", "1 s"))
    assert ok.status == "ok" and ok.peak["rss_bytes"] > 0

    def boom(row):
        raise RuntimeError("out of memory, pretend")

    bad = b.run_item("b", "fails", "", boom)
    assert bad.status == "failed" and "RuntimeError: out of memory, pretend" in bad.reason
    assert "Traceback" in bad.data["traceback"]
    dep = b.run_item("c", "after the failure", "", lambda row: None, after=("b",))
    assert dep.status == "skipped" and "needs b" in dep.reason
    gone = b.run_item("d", "needs a package", "", lambda row: None, needs=("no_such_package_stc",))
    assert gone.status == "not installed" and "no_such_package_stc" in gone.reason
    b.budget = 0.0                       # the guard: nothing fits any more
    late = b.run_item("e", "too late", "", lambda row: setattr(row, "value", "ran"))
    assert late.status == "skipped" and "time budget" in late.reason and not late.value
    doc = json.loads((b.table.out / "gpu.json").read_text())      # written after every row
    assert [r["status"] for r in doc["rows"]] == ["ok", "failed", "skipped", "not installed", "skipped"]
    assert all(r["value"] or r["reason"] for r in doc["rows"])


def test_item_alarm_interrupts_python_code(bench):
    g, b = bench
    b.item_limit_s = 1.0

    def spin(row):
        while True:
            time.sleep(0.05)

    t0 = time.monotonic()
    row = b.run_item("x", "hangs", "", spin)
    assert row.status == "failed" and "TimeoutError" in row.reason and time.monotonic() - t0 < 10


def test_full_shape_is_the_anchor_model(bench):
    """The 7B config the GPU run builds has the anchors' parameter counts (built on the meta device)."""
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    from engine.models import surgery

    g, tiny_bench = bench
    b = g.Bench(SimpleNamespace(budget_s=0.0, tmp="", model=""), tiny_bench.table, g.FULL, torch.device("cpu"))
    try:
        b.build_tokenizer_and_processor()
        with torch.device("meta"):
            m = Qwen2AudioForConditionalGeneration._from_config(b.config(), dtype=torch.bfloat16)
        assert sum(p.numel() for p in m.parameters()) == g.A_TEACHER_PARAMS
        n = len(surgery.decoder_layers(m))
        surgery.drop_layers(m, list(range(n - 1 - (n - g.FULL.student_layers), n - 1)))
        assert sum(p.numel() for p in m.parameters()) == g.A_STUDENT_PARAMS
    finally:
        b.close()


def test_missing_packages_come_from_the_wheel_dir(bench, tmp_path, monkeypatch):
    """A package the engine needs but this Python lacks is installed from .whl/ into a temporary
    site directory put first on sys.path (the GPU machine's case)."""
    import zipfile

    g, _ = bench
    wheels = tmp_path / "whl"
    wheels.mkdir()
    name = "stc_gpu_fake_dep"
    with zipfile.ZipFile(wheels / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                 "Tag: py3-none-any\n")
        z.writestr(f"{name}-1.0.dist-info/RECORD", "")
    monkeypatch.setattr(g, "WHEEL_DIR", wheels)
    monkeypatch.setattr(g, "NEEDED", (name,))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    said = g.install_wheels(str(tmp_path))
    assert said.startswith(f"installed 1 wheels from whl/ for {name}") and "still missing" not in said, said
    mod = importlib.import_module(name)
    assert mod.VALUE == 42
    sys.modules.pop(name, None)
    monkeypatch.setattr(g, "NEEDED", ("stc_gpu_never_there",))
    # the one wheel there is installed now: nothing to add, and the table says what is missing
    assert g.install_wheels(str(tmp_path)).startswith("missing stc_gpu_never_there; no whl/ wheels to install")
