"""Progress that works in batch logs: with stderr not a terminal (a SLURM job, a pipe, `stc pipeline`'s
step logs) every long stage prints one plain line every `run.progress_s` seconds, on rank 0, and writes
it to `<out>/logs/rank0.log` too (the stages' lines are checked in test_pipeline's end-to-end run)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine import log

ROOT = Path(__file__).resolve().parents[1]
LINE = r"\d\d:\d\d:\d\d INFO {what}: \d+/\d+ {unit} \(\d+%\)"


def test_plain_lines_are_throttled_and_end_with_the_final_count(monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr(log.time, "monotonic", lambda: now[0])
    lines: list[str] = []
    monkeypatch.setattr(log, "get", lambda: type("L", (), {"info": lambda self, m, **k: lines.append(m)})())
    with log.progress(enabled=True, every_s=30) as p:
        t = p.task("distill", total=10, unit="steps")
        for step in range(1, 11):
            now[0] += 7                                   # a step every 7 s: a line every 30 s at most
            t.update(completed=step, loss=2.0 / step, **{"tok/s": 1234.0})
    assert [re.match(r"distill: (\d+)/10", ln).group(1) for ln in lines] == ["1", "6", "10"]  # t=7, 42, end
    assert lines[0] == "distill: 1/10 steps (10%) | loss 2 | 1,234 tok/s | elapsed 0m07s | ETA 1m03s"
    assert "ETA" not in lines[-1] and "(100%)" in lines[-1]


def test_no_lines_on_other_ranks(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(log, "get", lambda: type("L", (), {"info": lambda self, m, **k: lines.append(m)})())
    with log.progress(enabled=False, every_s=0) as p:
        p.task("x", total=3, unit="u").advance(3)
    assert lines == []


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    from sine_data import write_sine_manifest

    root = tmp_path_factory.mktemp("prog")
    (root / "m2").mkdir()
    write_sine_manifest(root / "m2", 6, 6)
    return root


def stc(*argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_shards_build_prints_plain_progress_when_stderr_is_not_a_terminal(ws):
    """The other long stages (importance, cache build, evaluate, finetune/distill) are checked in the
    step logs of the pipeline's end-to-end test."""
    r = stc("shards", "build", "--manifest", ws / "m2" / "m.jsonl", "--out", ws / "sh2", "run.progress_s=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(LINE.format(what="shards build", unit="rows"), r.stderr), r.stderr[-3000:]
    assert "\x1b[" not in r.stderr and "\r" not in r.stderr                # no bar drawing in a log


def test_library_messages_repeated_at_every_call_are_shown_once(caplog):
    """bitsandbytes' int8 matmul logs its cast at every layer and decoding step: the first one is kept, the
    repeats dropped; known spurious messages are dropped, anything else passes every time."""
    import logging

    log.quiet_third_party()
    log.quiet_third_party()          # stc and setup both call it: still one filter, one memory of what was seen
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            lg.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
            lg.warning("something actionable")
        logging.getLogger("transformers").warning("Setting accelerator to CPU")
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("MatMul8bitLt" in m for m in msgs) <= 1
    assert msgs.count("something actionable") == 3
    assert not any("Setting accelerator" in m for m in msgs)
    assert sum(isinstance(f, log._Spurious) for f in lg.filters) == 1
