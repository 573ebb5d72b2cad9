"""`stc importance` then `stc prune` end to end on a tiny Qwen2-Audio; the pruned model reloads with plain
transformers; prune's own bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import config as cfg
from engine.importance import ImportanceError, run_prune
from engine.models import surgery

RELOAD = r"""
import json, sys, torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
m = Qwen2AudioForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
AutoProcessor.from_pretrained(sys.argv[1])
batch = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    logits = m(**batch).logits
    gen = m.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
torch.save({"logits": logits, "gen": gen}, sys.argv[2] + ".out")
print(json.dumps(m.config.text_config.to_dict()))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    import soundfile as sf

    from engine.data import shards
    from engine.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("prune_e2e")
    build_tiny("qwen2audio", root / "model", num_layers=6, dtype="fp32", seed=5)
    rows = []
    for i in range(7):
        t = np.arange(int(0.4 * 16000)) / 16000
        sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * (210 + 30 * i) * t)).astype("float32"), 16000)
        rows.append({"id": f"s{i}", "audio": f"a{i}.wav", "src_text": f"Sentence number {i} is here.",
                     "tgt_text": f"Satz Nummer {i} ist hier.", "src_lang": "en", "tgt_lang": "de",
                     "split": "dev" if i < 5 else "test"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards.build(cfg.load(None, [f"shards.manifest={root / 'm.jsonl'}", f"shards.out={root / 'sh'}"]), workers=1)
    (root / "recipe.yaml").write_text(
        f"model: {{path: {root / 'model'}, dtype: fp32}}\n"
        f"data: {{shards: {root / 'sh'}}}\n"
        f"run: {{out_dir: {root / 'run'}, threads: 1}}\n"
        f"importance: {{scorer: nll, remove: 2, decode_batch_size: 4}}\n")
    return {"root": root, "model": root / "model", "recipe": root / "recipe.yaml"}


def _run(cmd, stc_env, ok=True):
    r = subprocess.run(cmd, env=stc_env, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def ranking(env) -> Path:
    env_vars = dict(__import__("os").environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    _run([sys.executable, "-m", "engine.cli", "importance", "--config", str(env["recipe"])], env_vars)
    return env["root"] / "run" / "importance"


@pytest.mark.slow
def test_importance_then_prune_end_to_end(env, ranking, tmp_path, stc_cmd, stc_env):
    for f in ("ranking.json", "ranking.md", "importance.png", "meta.json", "config.yaml", "journal.rank000.jsonl"):
        assert (ranking / f).exists(), f
    doc = json.loads((ranking / "ranking.json").read_text())
    assert len(doc["removed"]) == 2 and set(doc["removed"]) <= {1, 2, 3, 4} and doc["metric"] == "nll"
    assert "| step | layer |" in (ranking / "ranking.md").read_text()

    out = tmp_path / "student"
    _run([*stc_cmd, "prune", "--config", str(env["recipe"]), "--from", str(ranking), "--out", str(out)], stc_env)
    meta = json.loads((out / "meta.json").read_text())
    kept = [i for i in range(6) if i not in doc["removed"]]
    assert meta["kind"] == "model" and meta["pruned"]["removed_original"] == doc["removed"]
    assert meta["pruned"]["kept_original"] == kept
    before, after = meta["params"]["before"], meta["params"]["after"]
    assert after["total"] < before["total"] and after["stored"] < before["stored"]
    assert 0 < after["storage_bytes"] < before["storage_bytes"]
    assert (out / "config.yaml").exists() and meta["fingerprints"]["model"].startswith("sha256:")

    # plain transformers (no engine on the path) reloads it and equals the in-memory pruned model
    from sine_data import audio_prompt_batch
    from transformers import Qwen2AudioForConditionalGeneration

    ref = Qwen2AudioForConditionalGeneration.from_pretrained(env["model"], dtype=torch.float32).eval()
    surgery.drop_layers(ref, doc["removed"])
    batch = audio_prompt_batch(env["model"])
    torch.save(batch, tmp_path / "b.pt")
    (tmp_path / "reload.py").write_text(RELOAD)
    plain = {k: v for k, v in stc_env.items() if k != "PYTHONPATH"}
    r = _run([sys.executable, str(tmp_path / "reload.py"), str(out), str(tmp_path / "b.pt")], plain)
    tc = json.loads(r.stdout.strip().splitlines()[-1])
    assert tc["num_hidden_layers"] == 4 and tc[surgery.ORIGINAL_KEY] == kept
    got = torch.load(tmp_path / "b.pt.out", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], ref(**batch).logits)
        assert torch.equal(got["gen"], ref.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False))

    # --layers instead of a ranking, and the first N of a ranking
    out2 = tmp_path / "by_layers"
    _run([*stc_cmd, "prune", "--config", str(env["recipe"]), "--layers", "1,3", "--out", str(out2)], stc_env)
    assert json.loads((out2 / "meta.json").read_text())["pruned"]["kept_original"] == [0, 2, 4, 5]
    rp = run_prune(cfg.load(env["recipe"], [f"prune.ranking={ranking / 'ranking.json'}", "prune.count=1",
                                            f"prune.out={tmp_path / 'one'}"]))
    assert rp["removed"] == doc["removed"][:1]


@pytest.mark.slow
def test_prune_bad_inputs(env, ranking, tmp_path, stc_cmd, stc_env):
    from engine.models.tiny import build_tiny

    other = build_tiny("qwen2audio", tmp_path / "other", num_layers=6, dtype="fp32", seed=99)
    with pytest.raises(ImportanceError, match="another model"):
        run_prune(cfg.load(env["recipe"], [f"model.path={other}", f"prune.ranking={ranking}",
                                           f"prune.out={tmp_path / 'x'}"]))
    with pytest.raises(ImportanceError, match="not both"):
        run_prune(cfg.load(env["recipe"], [f"prune.ranking={ranking}", "prune.layers=[1]", f"prune.out={tmp_path / 'x'}"]))
    with pytest.raises(ImportanceError, match="nothing to prune"):
        run_prune(cfg.load(env["recipe"], [f"prune.out={tmp_path / 'x'}"]))
    with pytest.raises(ImportanceError, match="does not exist"):
        run_prune(cfg.load(env["recipe"], ["prune.layers=[9]", f"prune.out={tmp_path / 'x'}"]))
    with pytest.raises(ImportanceError, match="removes only 2"):
        run_prune(cfg.load(env["recipe"], [f"prune.ranking={ranking}", "prune.count=5", f"prune.out={tmp_path / 'x'}"]))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ImportanceError, match="not an earlier `stc prune` output"):
        run_prune(cfg.load(env["recipe"], ["prune.layers=[1]", f"prune.out={tmp_path / 'busy'}"]))
    with pytest.raises(ImportanceError, match="quantised"):  # prune bf16, then quantise
        run_prune(cfg.load(env["recipe"], ["prune.layers=[1]", "model.quant=nf4", "model.dtype=bf16",
                                           f"prune.out={tmp_path / 'q'}"]))
    assert not (tmp_path / "q").exists()
    r = _run([*stc_cmd, "prune", "--config", str(env["recipe"]), "--layers", "0,1,2,3,4,5", "--out",
              str(tmp_path / "none")], stc_env, ok=False)
    assert r.returncode == 1 and "leaves no model" in r.stderr


def _stored_dtypes(model_dir: Path) -> set[str]:
    """The dtypes of the tensors in the safetensors files, from their headers."""
    import struct

    out = set()
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            head = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        out |= {t["dtype"] for k, t in head.items() if k != "__metadata__"}
    return out


def test_prune_keeps_the_source_dtype(tmp_path):
    """A bf16 checkpoint scanned and pruned with model.dtype=fp32 stays bf16 on disk (smaller than its
    source), unless prune.dtype says otherwise."""
    from engine.models.counts import storage_bytes
    from engine.models.tiny import build_tiny

    src = build_tiny("qwen2audio", tmp_path / "bf16", num_layers=6, dtype="bf16", seed=7)
    assert _stored_dtypes(src) == {"BF16"}
    base = [f"model.path={src}", "model.dtype=fp32", "prune.layers=[1,2]", f"run.out_dir={tmp_path / 'run'}"]
    rp = run_prune(cfg.load(None, [*base, f"prune.out={tmp_path / 'auto'}"]))
    out = Path(rp["out"])
    assert _stored_dtypes(out) == {"BF16"}
    assert 0 < storage_bytes(out) < storage_bytes(src)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["params"]["after"]["storage_bytes"] < meta["params"]["before"]["storage_bytes"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert rp["dtype"] == "bf16" and "safetensors" in rp["dtype_from"]
    assert meta["dtype"] == "bf16" and meta["pruned"]["dtype"] == "bf16"
    m = __import__("transformers").Qwen2AudioForConditionalGeneration.from_pretrained(out)
    assert m.dtype == torch.bfloat16 and len(surgery.decoder_layers(m)) == 4

    rp32 = run_prune(cfg.load(None, [*base, "prune.dtype=fp32", f"prune.out={tmp_path / 'fp32'}"]))
    assert rp32["dtype"] == "fp32" and _stored_dtypes(Path(rp32["out"])) == {"F32"}
    # no safetensors header to read: config.json's dtype decides
    from engine.importance.stage import source_dtype

    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text(json.dumps({"torch_dtype": "float16", "text_config": {}}))
    assert source_dtype(cfg_only) == ("fp16", "config.json torch_dtype")
    assert source_dtype(src) == ("bf16", "its safetensors")
