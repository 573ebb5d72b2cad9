"""`stc evaluate`: scores equal sacrebleu recomputed from the written hypotheses, per direction (en-de and
en-zh in one split), 1 rank == 2 ranks, rerun skips, audio shuffling, nf4 systems, the echo and
wrong-language heuristics on hand-made strings, and the bad inputs (missing model, dev/test overlap,
13a forced on Chinese, missing split)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import config as cfg
from engine import evaluate as E

WORDS = ["morning", "meeting", "weather", "book", "train", "model", "layer", "river", "coffee", "music", "window",
         "garden", "bridge", "letter", "summer", "island"]
ZH = ["早上好", "会议开始了", "天气很冷", "我读书", "火车来了", "模型很小"]


def build_env(root: Path, *, n_dev: int = 3, n_de: int = 4, n_zh: int = 3, copy_dev_source: bool = False,
              model: Path | None = None) -> dict:
    """A tiny Qwen2-Audio (fp32; or ``model``) and sine-wave shards: a dev split and a test split with
    en-de and en-zh rows."""
    import soundfile as sf

    from engine.data import shards
    from engine.models.tiny import build_tiny

    root.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = root / "model"
        build_tiny("qwen2audio", model, num_layers=3, dtype="fp32", seed=5)
    rows = []
    for i in range(n_dev + n_de + n_zh):
        sr, dur = 16000, 0.25 + 0.05 * (i % 4)
        t = np.arange(int(dur * sr)) / sr
        sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * (210 + 30 * i) * t)).astype("float32"), sr)
        split = "dev" if i < n_dev else "test"
        zh = i >= n_dev + n_de
        src = f"The {WORDS[0 if (copy_dev_source and split == 'test') else i]} is nice."
        rows.append({"id": f"s{i:02d}", "audio": f"a{i}.wav", "src_text": src,
                     "tgt_text": ZH[i % len(ZH)] if zh else f"Das {WORDS[i]} ist schön.", "src_lang": "en",
                     "tgt_lang": "zh" if zh else "de", "split": split})
    (root / "m.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    shards.build(cfg.load(None, [f"shards.manifest={root / 'm.jsonl'}", f"shards.out={root / 'sh'}",
                                 "shards.samples_per_shard=3"]), workers=1)
    return {"root": root, "model": model, "shards": root / "sh"}


def recipe(env: dict, out: Path, *extra: str) -> cfg.Recipe:
    return cfg.load(None, base_overrides(env, out) + list(extra))


def base_overrides(env: dict, out: Path) -> list[str]:
    return [f"model.path={env['model']}", "model.dtype=fp32", f"data.shards={env['shards']}", f"evaluate.out={out}",
            "evaluate.batch_size=2", "evaluate.max_new_tokens=12", f"run.out_dir={out.parent / 'run'}"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("eval_env"))


@pytest.fixture(scope="module")
def first_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1") / "eval"
    res = E.run_evaluate(recipe(env, out))
    return out, res


def read_rows(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / E.HYPOTHESES).read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------ heuristics

def test_copy_source_rule():
    assert E.is_copy("The book is nice.", "the book is nice")            # case + punctuation
    assert E.is_copy("  The  book, is nice!", "The book is nice.")
    # near copies: a word dropped or changed in a longer sentence keeps chrF >= 80
    assert E.is_copy("The meeting starts at nine tomorrow", "The meeting starts at nine tomorrow morning.")
    assert E.is_copy("the meeting starts at nine o clock tomorrow morning.",
                     "The meeting starts at nine o'clock tomorrow morning.")
    assert not E.is_copy("The books is nice.", "The book is nice.")     # short: one changed word is 74
    assert not E.is_copy("Das Buch ist schön.", "The book is nice.")
    assert not E.is_copy("", "The book is nice.") and not E.is_copy("x", "")
    assert not E.is_copy("这本书很好", "The book is nice.")


def test_wrong_language_rule():
    assert E.is_wrong_language("The meeting starts at nine.", "zh")      # English for a Chinese target
    assert not E.is_wrong_language("会议九点开始。", "zh")
    assert not E.is_wrong_language("会议在9点开始 (AI)", "zh")       # mostly CJK letters
    assert E.is_wrong_language("会议九点开始。", "de")                      # CJK for a German target
    assert E.is_wrong_language("The meeting is at the station and it is cold.", "de")  # English stopwords win
    assert not E.is_wrong_language("Die Sitzung ist am Bahnhof und es ist kalt.", "de")
    assert not E.is_wrong_language("Berlin 2024", "de")                  # no stopword evidence: not flagged
    assert not E.is_wrong_language("", "de") and not E.is_wrong_language("123 !", "zh")
    assert E.is_wrong_language("Die Sitzung ist am Bahnhof und es ist kalt.", "en")
    assert not E.is_wrong_language("Привет мир", "ru")                   # other scripts: not checked


def test_bleu_tokenizer_choice():
    assert E.bleu_tokenizer("zh", "auto") == ("zh", None)
    assert E.bleu_tokenizer("de", "auto") == ("13a", None)
    tok, warn = E.bleu_tokenizer("zh", "13a")
    assert tok == "zh" and "evaluate.bleu_tokenize=13a" in warn and "zh" in warn
    assert E.bleu_tokenizer("de", "intl") == ("intl", None)
    assert E.bleu_tokenizer("zh", "char") == ("char", None)


def test_trimmed_vocabulary_warning_from_the_exports_check(tmp_path):
    """A trimmed export whose check found test texts encoding differently is scored with a warning naming
    the counts; an untrimmed model, or a trimmed one that encodes the split unchanged, has none."""
    assert E.trimmed_vocab_warning(tmp_path, "test") is None
    vm = {"old_vocab_size": 151936, "new_vocab_size": 6019,
          "verify": {"test": {"differ": 918, "sentences": 1200, "tokens_old": 23488, "tokens_new": 26474},
                     "dev": {"differ": 0, "sentences": 600, "tokens_old": 10, "tokens_new": 10}}}
    (tmp_path / "vocab_map.json").write_text(json.dumps(vm))
    w = E.trimmed_vocab_warning(tmp_path, "test")
    assert "918 of 1200" in w and "'test'" in w and "151,936 to 6,019" in w
    assert E.trimmed_vocab_warning(tmp_path, "dev") is None
    assert "did not check the 'valid' split" in E.trimmed_vocab_warning(tmp_path, "valid")


def test_derangement_and_batches_cover_every_sample_once():
    for n in (2, 3, 7, 20):
        p = E.derangement(n, seed=0)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
        assert p == E.derangement(n, seed=0)
    with pytest.raises(E.EvalError, match="at least 2"):
        E.derangement(1, 0)


# ------------------------------------------------------------------------------------------ end to end

def test_scores_equal_sacrebleu_recomputed_from_hypotheses(env, first_run):
    from sacrebleu.metrics import BLEU, CHRF

    out, res = first_run
    d = out / "model"
    doc = json.loads((d / E.SCORES).read_text())
    assert res["model"] == doc and doc["schema"] == 1 and doc["system"] == "model" and doc["split"] == "test"
    assert doc["n"] == 7 and doc["shuffle_audio"] is False and doc["hypotheses"] == E.HYPOTHESES
    rows = read_rows(d)
    assert [r["key"] for r in rows] == [f"s{i:02d}" for i in range(3, 10)]  # split order
    assert set(rows[0]) == {"key", "src_lang", "tgt_lang", "src_text", "ref", "hyp"}
    assert set(doc["directions"]) == {"en-de", "en-zh"}
    for direction, tok, primary in (("en-de", "13a", "chrf++"), ("en-zh", "zh", "chrf")):
        rs = [r for r in rows if f"{r['src_lang']}-{r['tgt_lang']}" == direction]
        hyps, refs = [r["hyp"] for r in rs], [[r["ref"] for r in rs]]
        got = doc["directions"][direction]
        assert got["n"] == len(rs) == (4 if direction == "en-de" else 3)
        bleu, chrf, chrfpp = BLEU(tokenize=tok), CHRF(), CHRF(word_order=2)
        assert got["bleu"]["score"] == bleu.corpus_score(hyps, refs).score
        assert got["chrf"]["score"] == chrf.corpus_score(hyps, refs).score
        assert got["chrfpp"]["score"] == chrfpp.corpus_score(hyps, refs).score
        assert got["bleu"]["signature"] == str(bleu.get_signature()) and f"tok:{tok}" in got["bleu"]["signature"]
        assert got["chrfpp"]["signature"] == str(chrfpp.get_signature()) and "nw:2" in got["chrfpp"]["signature"]
        assert got["primary"] == {"metric": primary, "score": got["chrf" if primary == "chrf" else "chrfpp"]["score"]}
        assert "skipped" in got["comet"]
        for k in ("copy_source_rate", "wrong_language_rate", "empty_rate"):
            assert 0.0 <= got[k] <= 1.0
        assert got["empty_rate"] == sum(not h for h in hyps) / len(hyps)
        assert got["copy_source_rate"] == sum(E.is_copy(r["hyp"], r["src_text"]) for r in rs) / len(rs)
    mi = doc["model_info"]
    assert mi["decoder_layers"] == 3 and mi["quant"] == "none" and mi["dtype"] == "float32"
    assert mi["storage_bytes"] == sum(p.stat().st_size for p in env["model"].glob("*.safetensors"))
    assert mi["params_total"] == mi["params_stored"] > 0
    sp = doc["speed"]
    assert sp["world_size"] == 1 and sp["device"] == "cpu" and sp["seconds"] > 0
    assert sp["sentences_per_s"] == pytest.approx(7 / sp["seconds"], rel=1e-3)
    assert sp["tokens_per_s"] == pytest.approx(sp["generated_tokens"] / sp["seconds"], rel=1e-3)
    # throughput at the configured batch and latency at batch 1 are separate figures
    assert sp["batch_size"] == 2 and 0 < sp["batch_seconds_per_sentence"] <= sp["seconds"]
    assert sp["latency_samples"] == 7  # evaluate.latency_samples=16, but the split has 7 samples
    assert sp["latency_s"] > 0 and sp["latency_p50_s"] > 0
    meta = json.loads((d / "meta.json").read_text())
    assert meta["kind"] == "eval" and meta["fingerprints"]["model"].startswith("sha256:")
    assert (d / "config.yaml").exists() and not list(d.glob("*.tmp-*"))


def test_rerun_skips_and_a_changed_setting_recomputes(env, first_run, tmp_path):
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(first_run[0], out)
    scores = out / "model" / E.SCORES
    before = scores.stat().st_mtime_ns
    res = E.run_evaluate(recipe(env, out, "evaluate.latency_samples=0"))  # timing only: not in the fingerprint
    assert scores.stat().st_mtime_ns == before and res["model"]["fingerprint"] == json.loads(scores.read_text())["fingerprint"]
    res2 = E.run_evaluate(recipe(env, out, "evaluate.max_new_tokens=6"))
    assert scores.stat().st_mtime_ns != before and res2["model"]["fingerprint"] != res["model"]["fingerprint"]
    assert res2["model"]["speed"]["generated_tokens"] <= 6 * 7
    assert json.loads(scores.read_text())["fingerprint"] == res2["model"]["fingerprint"]
    res3 = E.run_evaluate(recipe(env, out, "evaluate.max_new_tokens=5", "evaluate.latency_samples=0"))
    assert res3["model"]["speed"]["latency_s"] is None and res3["model"]["speed"]["latency_samples"] == 0


def test_shuffle_audio_pairs_text_with_other_audio(env, first_run, tmp_path):
    out = tmp_path / "eval"
    res = E.run_evaluate(recipe(env, out, "evaluate.shuffle_audio=true", "run.seed=3"))
    doc = res["model"]
    assert doc["shuffle_audio"] is True
    rows = read_rows(out / "model")
    assert all(r["audio_from"] != r["key"] for r in rows)
    assert sorted(r["audio_from"] for r in rows) == sorted(r["key"] for r in rows)
    assert doc["fingerprint"] != json.loads((first_run[0] / "model" / E.SCORES).read_text())["fingerprint"]


def test_named_systems_and_nf4_model(env, tmp_path):
    import torch

    from engine.config import ModelConfig
    from engine.models.load import load_model, load_processor

    q = tmp_path / "q"
    m = load_model(ModelConfig(path=str(env["model"]), dtype="fp32", quant="nf4"), device="cpu")
    with torch.inference_mode():
        m(input_ids=torch.tensor([[1, 2, 3]]))
    m.save_pretrained(q, safe_serialization=True)
    load_processor(env["model"]).save_pretrained(q)
    out = tmp_path / "eval"
    # 4-bit matmuls are slow on CPU: two batches, three new tokens
    res = E.run_evaluate(recipe(env, out, f"evaluate.models=[full={env['model']},student={q}]",
                                "evaluate.batch_size=4", "evaluate.max_new_tokens=3"))
    assert set(res) == {"full", "student"}
    full, st = res["full"]["model_info"], res["student"]["model_info"]
    assert st["quant"] == "nf4" and full["quant"] == "none"
    assert st["params_total"] == full["params_total"] and st["params_stored"] < full["params_stored"]
    assert st["storage_bytes"] < full["storage_bytes"]
    assert len(read_rows(out / "student")) == 7 and set(res["student"]["directions"]) == {"en-de", "en-zh"}


def test_hypotheses_equal_plain_generate_per_sample(env, tmp_path):
    """batch_size=1 through the stage == the model's own generate on the unpadded prompt ids (no cached
    embeddings, no engine batching); beam search runs too."""
    import torch

    from engine.config import DataConfig, ModelConfig
    from engine.data.prompt import IGNORE, Featurizer
    from engine.importance import devset as D
    from engine.importance import scorers as S
    from engine.models.load import load_model, load_processor

    out = tmp_path / "eval"
    E.run_evaluate(recipe(env, out, "evaluate.batch_size=1", "evaluate.max_samples=3"))
    rows = read_rows(out / "model")
    model = load_model(ModelConfig(path=str(env["model"]), dtype="fp32"))
    proc = load_processor(env["model"])
    b = D.prompt_builder(proc, DataConfig())
    gen = S.generation_config(model, b.end_id, b.pad_id, 12)
    samples, _ = D.read_dev(env["shards"], DataConfig(dev_split="test"), 3, True)
    feat = Featurizer(proc, DataConfig())
    for smp, row in zip(samples, rows):
        fb = feat([D._as_feature_sample(smp)])
        p = int((fb["labels"][0] != IGNORE).nonzero()[0])
        with torch.inference_mode():
            g = model.generate(input_ids=fb["input_ids"][:, :p], attention_mask=fb["attention_mask"][:, :p],
                               input_features=fb["input_features"], feature_attention_mask=fb["feature_attention_mask"],
                               generation_config=gen)
        assert row["key"] == smp.key and row["hyp"] == S.decode_new_tokens(proc.tokenizer, g[:, p:], gen.eos_token_id)[0]
    res = E.run_evaluate(recipe(env, tmp_path / "beam", "evaluate.num_beams=2", "evaluate.max_samples=3"))
    assert res["model"]["n"] == 3 and res["model"]["decoding"]["num_beams"] == 2


# ------------------------------------------------------------------------------------------ bad inputs

def test_missing_model_dir_names_the_key(env, tmp_path):
    with pytest.raises(E.EvalError, match=r"evaluate\.models\[1\].*does not exist.*name=/path"):
        E.run_evaluate(recipe(env, tmp_path / "e", f"evaluate.models=[{env['model']},{tmp_path / 'nope'}]"))
    with pytest.raises(E.EvalError, match=r"model\.path.*does not exist"):
        E.run_evaluate(recipe(env, tmp_path / "e", f"model.path={tmp_path / 'nope'}"))
    with pytest.raises(E.EvalError, match="two systems are named"):
        E.systems(recipe(env, tmp_path / "e", f"evaluate.models=[a={env['model']},a={env['model']}]"))


def test_missing_split_is_named(env, tmp_path):
    with pytest.raises(E.EvalError, match=r"no shards of the test split 'final'.*dev, test.*evaluate\.split"):
        E.run_evaluate(recipe(env, tmp_path / "e", "evaluate.split=final"))


def test_test_split_overlapping_dev_is_refused(env, tmp_path):
    env = build_env(tmp_path / "ov", n_dev=2, n_de=2, n_zh=1, copy_dev_source=True, model=env["model"])
    with pytest.raises(E.EvalError, match=r"test split 'test'.*dev split 'dev'.*test s02 = dev s00.*dev_split_check=false"):
        E.run_evaluate(recipe(env, tmp_path / "e"))
    with pytest.raises(E.EvalError, match=r"evaluate\.split 'dev' is also the dev split"):
        E.run_evaluate(recipe(env, tmp_path / "e", "evaluate.split=dev"))
    res = E.run_evaluate(recipe(env, tmp_path / "e", "evaluate.dev_split_check=false"))
    assert any("dev_split_check=false" in w for w in res["model"]["warnings"])


def test_zh_with_13a_warns_and_uses_zh(env, first_run, tmp_path):
    out = tmp_path / "eval"
    res = E.run_evaluate(recipe(env, out, "evaluate.bleu_tokenize=13a"))
    doc = res["model"]
    assert "tok:zh" in doc["directions"]["en-zh"]["bleu"]["signature"]
    assert "tok:13a" in doc["directions"]["en-de"]["bleu"]["signature"]
    assert any("evaluate.bleu_tokenize=13a" in w and "zh" in w for w in doc["warnings"])
    first = json.loads((first_run[0] / "model" / E.SCORES).read_text())
    assert doc["directions"]["en-zh"]["bleu"] == first["directions"]["en-zh"]["bleu"]


# ------------------------------------------------------------------------------------------ CLI, ranks

@pytest.fixture(scope="module")
def cli_env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"  # same threads per rank in every run: bit-identical outputs
    return e


def stc(args: list[str], env: dict, nproc: int = 1) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "engine.cli"] + (["run", "--nproc", str(nproc)] if nproc > 1 else [])
    return subprocess.run(head + args, env=env, capture_output=True, text=True, timeout=400)


def test_cli_missing_model_exits_1_with_message(env, tmp_path, cli_env):
    r = stc(["evaluate", *base_overrides(env, tmp_path / "e"), f"evaluate.models=[{tmp_path / 'gone'}]"], cli_env)
    assert r.returncode == 1 and "evaluate.models[0]" in r.stderr and "does not exist" in r.stderr, r.stderr


def test_cli_models_option_and_dry_run(env, tmp_path, cli_env):
    r = stc(["evaluate", "--models", f"teacher={env['model']},student={env['model']}", "--split", "test",
             "--dry-run", *base_overrides(env, tmp_path / "e")], cli_env)
    assert r.returncode == 0, r.stderr
    assert f"teacher={env['model']}" in r.stdout and f"student={env['model']}" in r.stdout and "'test'" in r.stdout
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_one_and_two_ranks_give_identical_hypotheses_and_scores(env, tmp_path, cli_env):
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        r = stc(["evaluate", *base_overrides(env, out)], cli_env, nproc=n)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outs[n] = out / "model"
    one, two = (json.loads((outs[n] / E.SCORES).read_text()) for n in (1, 2))
    assert (outs[1] / E.HYPOTHESES).read_bytes() == (outs[2] / E.HYPOTHESES).read_bytes()
    assert one["directions"] == two["directions"] and one["fingerprint"] == two["fingerprint"]
    assert one["speed"]["world_size"] == 1 and two["speed"]["world_size"] == 2
    per_rank = two["speed"]["per_rank"]
    assert [p["rank"] for p in per_rank] == [0, 1] and all(p["n"] > 0 for p in per_rank)
    assert sum(p["n"] for p in per_rank) == 7 and len({p["pid"] for p in per_rank}) == 2
    # a rerun on another world size finds the same fingerprint and skips
    before = (outs[1] / E.SCORES).stat().st_mtime_ns
    r = stc(["evaluate", *base_overrides(env, tmp_path / "r1")], cli_env, nproc=2)
    assert r.returncode == 0 and (outs[1] / E.SCORES).stat().st_mtime_ns == before, r.stderr[-2000:]
