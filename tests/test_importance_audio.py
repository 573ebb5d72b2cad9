"""Importance over the audio encoder's layers (importance.component=audio): the reversible audio-layer
skip, the nll / task / block_influence scores of audio candidates against references that drop the
layer permanently with surgery, the stage (component in journal, ranking and meta; mixing refused;
text-only models refused before loading), `stc importance` then `stc prune` through the real CLI with
a plain-transformers reload, and a 2-rank scan."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_importance import (build_env, check_once, load, model_inputs, recipe_for, reference_batches,
                             reference_nll, reference_translations, units_of)

from engine import config as cfg
from engine.config import DataConfig
from engine.importance import devset as D
from engine.importance import journal as J
from engine.importance import layers as L
from engine.importance import scorers as S
from engine.importance import stage
from engine.importance.devset import ImportanceError
from engine.models import surgery

AUDIO_LAYERS = 4


@pytest.fixture(scope="module")
def aenv(tmp_path_factory):
    """A tiny Qwen2-Audio with 4 audio-encoder layers (3 decoder layers) and a 2 s audio window (the encoder
    runs for every candidate: 100 frames instead of 1500), 4 dev + 2 test samples."""
    return build_env(tmp_path_factory.mktemp("imp_audio_enc"), layers=3, audio_layers=AUDIO_LAYERS, audio_seconds=2,
                     n_dev=4, n_test=2, seed=4)


@pytest.fixture(scope="module")
def text_env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("imp_audio_text"), kind="text", layers=3, n_dev=3, n_test=1)


def prepared(env: dict, model, proc, *, teacher_forced: bool, prompt_only: bool) -> D.DevSet:
    samples, skipped = D.read_dev(env["shards"], DataConfig(), 0, True)
    assert samples and not skipped
    return D.prepare(model, proc, samples, DataConfig(), batch_size=3, teacher_forced=teacher_forced,
                     prompt_only=prompt_only, keep_features=True)


@pytest.fixture(scope="module")
def loaded(aenv):
    model, proc = load(aenv)
    return model, proc, prepared(aenv, model, proc, teacher_forced=True, prompt_only=False)


def pruned_copy(model, audio_drop: list[int]):
    """The reference: a deep copy with the audio layers dropped for good by surgery."""
    m = copy.deepcopy(model)
    if audio_drop:
        surgery.drop_layers(m, [], audio_remove=audio_drop)
        assert len(surgery.audio_layers(m)) == AUDIO_LAYERS - len(audio_drop)
        assert m.config.audio_config.encoder_layers == AUDIO_LAYERS - len(audio_drop)
    return m.eval()


# ------------------------------------------------------------------------------------------ skip context

def test_without_audio_layers_swaps_and_restores_everything(aenv, loaded):
    model, proc, dev = loaded
    layers = surgery.audio_layers(model)
    dec = surgery.decoder_layers(model)
    ac = model.config.audio_config
    attn = [l.self_attn.layer_idx for l in layers]
    fb = dev.batches[0].features
    before = D.decoder_inputs(model, fb).clone()
    want = D.decoder_inputs(pruned_copy(model, [1, 3]), fb)
    with L.without_audio_layers(model, [1, 3]) as kept:
        cur = surgery.audio_layers(model)
        assert kept == [0, 2] and [id(m) for m in cur] == [id(layers[i]) for i in kept]  # same modules, no copy
        assert ac.encoder_layers == 2 and getattr(ac, surgery.ORIGINAL_AUDIO_KEY) == [0, 2]
        assert surgery.decoder_layers(model) is dec and model.config.text_config.num_hidden_layers == 3
        inside = D.decoder_inputs(model, fb)
        torch.testing.assert_close(inside, want, rtol=0, atol=0)
        assert not torch.equal(inside, before)  # the encoder ran without them
        with L.without_audio_layers(model, [0]):  # nested: positions of the current (outer) list
            assert [id(m) for m in surgery.audio_layers(model)] == [id(layers[2])]
            assert ac.encoder_layers == 1 and getattr(ac, surgery.ORIGINAL_AUDIO_KEY) == [2]
        assert [id(m) for m in surgery.audio_layers(model)] == [id(layers[i]) for i in kept]
        assert getattr(ac, surgery.ORIGINAL_AUDIO_KEY) == [0, 2]
    with pytest.raises(RuntimeError, match="boom"):
        with L.without_audio_layers(model, [2]):
            assert ac.encoder_layers == 3
            raise RuntimeError("boom")
    assert surgery.audio_layers(model) is layers and ac.encoder_layers == AUDIO_LAYERS
    assert not hasattr(ac, surgery.ORIGINAL_AUDIO_KEY)
    assert [l.self_attn.layer_idx for l in layers] == attn
    assert torch.equal(D.decoder_inputs(model, fb), before)
    with pytest.raises(surgery.SurgeryError, match="leaves no encoder"):
        with L.without_audio_layers(model, range(AUDIO_LAYERS)):
            pass
    assert surgery.audio_layers(model) is layers


def test_text_model_has_no_audio_layers_to_skip(text_env):
    model, _ = load(text_env)
    with pytest.raises(surgery.SurgeryError, match="no audio encoder"):
        with L.without_audio_layers(model, [0]):
            pass


# ------------------------------------------------------------------------------------------ scorers vs references

def test_audio_nll_matches_surgery_reference(aenv, loaded):
    """Each audio candidate's nll == the model with that audio layer dropped by surgery, full forward,
    summed NLL of the label tokens over their count (what the decoder nll scorer reports)."""
    model, proc, dev = loaded
    got = dict(S.iter_audio_scores(model, None, dev, [None, 0, 1, 2, 3], scorer="nll", metric="nll"))
    assert list(got) == [None, 0, 1, 2, 3]
    for c in got:
        ref = reference_nll(pruned_copy(model, [] if c is None else [c]), aenv, proc)
        assert got[c].score == pytest.approx(ref, rel=1e-6), c
        assert got[c].metric == "nll" and got[c].n_tokens == sum(b.n_label_tokens for b in dev.batches)
    # the candidates really differ (a scorer that ignored the audio encoder would tie them all)
    assert len({round(s.score, 7) for s in got.values()}) == 5
    after = dict(S.iter_audio_scores(model, None, dev, [None, 2], removed=[1], scorer="nll", metric="nll"))
    assert after[None].score == pytest.approx(got[1].score, rel=1e-9)
    assert after[2].score == pytest.approx(reference_nll(pruned_copy(model, [1, 2]), aenv, proc), rel=1e-6)
    assert surgery.audio_layers(model) is not None and len(surgery.audio_layers(model)) == AUDIO_LAYERS
    with pytest.raises(ImportanceError, match="candidate audio layer 1 is already removed"):
        list(S.iter_audio_scores(model, None, dev, [1], removed=[1], scorer="nll", metric="nll"))


def test_audio_task_matches_surgery_reference(aenv, loaded):
    """Greedy translations of an audio candidate == per-sample generate of the surgery-pruned copy."""
    model, proc, _ = loaded
    dev = prepared(aenv, model, proc, teacher_forced=False, prompt_only=True)
    tok = proc.tokenizer
    gen = S.generation_config(model, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id, 10)
    got = dict(S.iter_audio_scores(model, tok, dev, [None, 1, 3], removed=[2], scorer="task", metric="chrf++",
                                   gen_cfg=gen))
    refs_by_key = {k: r for b in dev.batches for k, r in zip(b.keys, b.refs)}
    seen = set()
    for c, drop in [(None, [2]), (1, [2, 1]), (3, [2, 3])]:
        ref = reference_translations(pruned_copy(model, drop), aenv, proc, gen)
        assert dict(zip(dev.keys, got[c].hypotheses)) == ref, c
        mets = S.corpus_metrics([ref[k] for k in dev.keys], [refs_by_key[k] for k in dev.keys], ["de"])
        assert got[c].metrics == mets and got[c].score == mets["chrf++"]
        seen.add(tuple(got[c].hypotheses))
    assert len(seen) > 1  # dropping audio layers changes what the model says


def test_audio_block_influence_matches_reference(aenv, loaded):
    """1 - cos(input, output) of each audio layer over the valid encoder frames, and the angular distance of
    2-layer blocks, == hooks on a surgery-pruned copy run sample by sample through the full model."""
    model, proc, dev = loaded

    def reference(m) -> tuple[list[float], list[float]]:
        layers = surgery.audio_layers(m)
        n = len(layers)
        bi, ang, frames = [0.0] * n, [0.0] * (n - 1), 0
        for _, fb in reference_batches(aenv, proc):
            hs: list[torch.Tensor] = []
            hooks = [l.register_forward_pre_hook(lambda mod, a: hs.append(a[0])) for l in layers]
            hooks.append(layers[-1].register_forward_hook(lambda mod, a, out: hs.append(L.first_out(out))))
            try:
                with torch.no_grad():
                    m(**model_inputs(fb))
            finally:
                for h in hooks:
                    h.remove()
            valid = int((fb["feature_attention_mask"].sum() - 1) // 2 + 1)  # frames after the stride-2 conv
            vs = [h[0, :valid].float() for h in hs]
            for j in range(n):
                bi[j] += float((1 - torch.nn.functional.cosine_similarity(vs[j], vs[j + 1], dim=-1)).sum())
            for j in range(n - 1):
                c = torch.nn.functional.cosine_similarity(vs[j], vs[j + 2], dim=-1).clamp(-1, 1)
                ang[j] += float((torch.arccos(c) / np.pi).sum())
            frames += valid
        return [x / frames for x in bi], [x / frames for x in ang]

    got = S.audio_block_influence(model, dev, block_sizes=[2])
    ref_bi, ref_ang = reference(pruned_copy(model, []))
    assert list(got.layer) == [0, 1, 2, 3]
    np.testing.assert_allclose([got.layer[i] for i in range(4)], ref_bi, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose([got.angular[2][i] for i in range(3)], ref_ang, rtol=1e-4, atol=1e-7)
    got2 = dict(S.iter_audio_scores(model, None, dev, [0, 2, 3], removed=[1], scorer="block_influence",
                                    metric="block_influence"))
    ref2, _ = reference(pruned_copy(model, [1]))
    np.testing.assert_allclose([got2[i].score for i in (0, 2, 3)], ref2, rtol=1e-4, atol=1e-7)
    with pytest.raises(ImportanceError, match="no baseline"):
        list(S.iter_audio_scores(model, None, dev, [None], scorer="block_influence", metric="block_influence"))


# ------------------------------------------------------------------------------------------ stage

AUDIO = ["importance.component=audio", "importance.scorer=nll", "importance.max_dev_samples=3"]


def test_audio_stage_records_the_component_and_resumes(aenv, loaded, tmp_path):
    out = tmp_path / "imp"
    r = recipe_for(aenv, out, *AUDIO, "importance.remove=2", "importance.protect=[0]")
    doc = stage.run_importance(r)
    assert doc["component"] == "audio" and doc["num_layers"] == AUDIO_LAYERS and doc["protected"] == [0]
    assert len(doc["removed"]) == 2 and set(doc["removed"]) <= {1, 2, 3}
    assert doc["removed_original"] == doc["removed"] and doc["kept_original"] == [
        i for i in range(AUDIO_LAYERS) if i not in doc["removed"]]
    assert doc["scan"]["computed_this_run"] == 1 + 3 + 2
    assert json.loads((out / "ranking.json").read_text())["component"] == "audio"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "journal" and meta["component"] == "audio" and meta["removed_original"] == doc["removed"]
    head = json.loads((out / "journal.rank000.jsonl").read_text().splitlines()[0])
    assert head["component"] == "audio" and head["num_layers"] == AUDIO_LAYERS
    assert {u["component"] for u in units_of(out)} == {"audio"}
    md = (out / "ranking.md").read_text()
    assert md.startswith("# Audio-encoder layer importance") and "4 audio-encoder layers" in md
    # the scores are the scorer's: iteration 0 == the model without each audio layer
    model, proc, _ = loaded
    samples, _ = D.read_dev(aenv["shards"], DataConfig(), 3, True)
    dev = D.prepare(model, proc, samples, DataConfig(), batch_size=4, teacher_forced=True, prompt_only=False,
                    keep_features=True)
    want = dict(S.iter_audio_scores(model, None, dev, [None, 1, 2, 3], scorer="nll", metric="nll"))
    assert doc["baseline"]["score"] == pytest.approx(want[None].score, rel=1e-9)
    assert {int(c): v for c, v in doc["iterations"][0]["scores"].items()} == pytest.approx(
        {c: want[c].score for c in (1, 2, 3)}, rel=1e-9)
    again = stage.run_importance(r)  # a rerun computes nothing
    assert again["scan"]["computed_this_run"] == 0 and again["removed"] == doc["removed"]
    assert again["iterations"] == doc["iterations"]


def test_audio_oneshot_task_and_middle_block(aenv, loaded, tmp_path):
    """The other methods on audio layers: oneshot with the task scorer (translations per unit, named as
    audio layers) and a middle block whose final score is the model without that block."""
    base = ["importance.component=audio", "importance.max_dev_samples=2", "importance.remove=2"]
    one = stage.run_importance(recipe_for(aenv, tmp_path / "one", *base, "importance.scorer=task",
                                          "importance.method=oneshot", "importance.max_new_tokens=6"))
    assert one["component"] == "audio" and one["method"] == "oneshot" and sorted(one["removed"]) == [1, 2]
    names = {u["hypotheses"] for u in units_of(tmp_path / "one")}
    assert names == {"hypotheses/it0-model.jsonl", "hypotheses/it0-audiolayer1.jsonl",
                     "hypotheses/it0-audiolayer2.jsonl", "hypotheses/it1-model-without-1.2.jsonl"}
    mid = stage.run_importance(recipe_for(aenv, tmp_path / "mid", *base, "importance.scorer=nll",
                                          "importance.method=middle_block"))
    assert mid["removed"] == [1, 2] and mid["block"] == [1, 2] and mid["iterations"] == []
    model, proc, _ = loaded
    samples, _ = D.read_dev(aenv["shards"], DataConfig(), 2, True)
    dev = D.prepare(model, proc, samples, DataConfig(), batch_size=4, teacher_forced=True, prompt_only=False,
                    keep_features=True)
    want = dict(S.iter_audio_scores(model, None, dev, [None], removed=[1, 2], scorer="nll", metric="nll"))
    assert mid["final"]["score"] == pytest.approx(want[None].score, rel=1e-9)
    assert mid["final"]["score"] != pytest.approx(mid["baseline"]["score"], rel=1e-9)


def test_audio_and_decoder_scans_never_mix(aenv, tmp_path):
    dec, aud = tmp_path / "dec", tmp_path / "aud"
    base = ["importance.scorer=nll", "importance.remove=1", "importance.max_dev_samples=2"]
    stage.run_importance(recipe_for(aenv, dec, *base))
    stage.run_importance(recipe_for(aenv, aud, *base, "importance.component=audio"))
    with pytest.raises(ImportanceError, match=r"journals a scan of the decoder layers .*importance\.component=audio"):
        stage.run_importance(recipe_for(aenv, dec, *base, "importance.component=audio"))
    with pytest.raises(ImportanceError, match=r"journals a scan of the audio layers .*component=decoder"):
        stage.run_importance(recipe_for(aenv, aud, *base))
    # without the journals, the rankings alone refuse (a dry run too), and nothing is replaced
    for d in (dec, aud):
        for j in d.glob(J.JOURNAL_GLOB):
            j.unlink()
    before = (dec / "ranking.json").read_bytes()
    for dry in (True, False):
        with pytest.raises(ImportanceError, match=r"ranking of the decoder layers .*component=decoder.*"
                                                  r"audio-encoder layers \(importance\.component=audio\).*"
                                                  r"importance\.out=.*dec-audio"):
            stage.run_importance(recipe_for(aenv, dec, *base, "importance.component=audio"), dry_run=dry)
    with pytest.raises(ImportanceError, match=r"ranking of the audio-encoder layers"):
        stage.run_importance(recipe_for(aenv, aud, *base))
    assert (dec / "ranking.json").read_bytes() == before
    # an audio record in a decoder journal is reported and recomputed, not used
    rec = {"type": "unit", "iteration": 0, "removed": [], "candidate": 1, "metric": "nll", "score": 1.0,
           "metrics": {"nll": 1.0}, "component": "audio"}
    assert "audio" in J._unit_problem(rec, "nll") and J._unit_problem(rec, "nll", "audio") is None


def test_text_model_refused_before_loading(text_env, aenv, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(stage, "load_model", no_load)
    for dry in (True, False):
        with pytest.raises(ImportanceError, match=r"importance\.component=audio .*causal_lm model without an audio "
                                                  r"encoder.*importance\.component=decoder"):
            stage.run_importance(recipe_for(aenv, tmp_path / "o", *AUDIO, "importance.remove=1",
                                            f"model.path={text_env['model']}"), dry_run=dry)
    assert not (tmp_path / "o").exists()
    # prune: audio layers of a model without an audio encoder, refused from config.json
    with pytest.raises(ImportanceError, match=r"prune\.prune_audio_layers needs audio-encoder layers.*no audio enc"):
        stage.run_prune(cfg.load(None, [f"model.path={text_env['model']}", "prune.layers=[1]",
                                        "prune.prune_audio_layers=[0]", f"prune.out={tmp_path / 'p'}"]))
    with pytest.raises(ImportanceError, match=r"prune\.prune_audio_layers: audio layer 7 does not exist"):
        stage.run_prune(cfg.load(None, [f"model.path={aenv['model']}", "prune.layers=[1]",
                                        "prune.prune_audio_layers=[7]", f"prune.out={tmp_path / 'p'}"]))
    assert not (tmp_path / "p").exists()
    # plan errors count audio layers
    with pytest.raises(ImportanceError, match="removes 3 of 4 audio-encoder layers but only 2 are prunable"):
        stage.run_importance(recipe_for(aenv, tmp_path / "o", *AUDIO, "importance.remove=3"), dry_run=True)


# ------------------------------------------------------------------------------------------ CLI, prune, 2 ranks

SCAN = ["importance.component=audio", "importance.scorer=nll", "importance.remove=2", "importance.protect=[0]",
        "importance.decode_batch_size=4"]

RELOAD = r"""
import json, sys, torch
from transformers import Qwen2AudioForConditionalGeneration
m = Qwen2AudioForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
batch = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    logits = m(**batch).logits
torch.save({"logits": logits, "audio_layers": len(m.model.audio_tower.layers)}, sys.argv[2] + ".out")
print(json.dumps(m.config.audio_config.to_dict()))
"""


def reload_plain(model_dir: Path, batch: dict, env: dict, tmp: Path) -> tuple[dict, dict]:
    """``model_dir`` reloaded by plain transformers in a fresh process without the engine on the path: its
    audio config and ``{"logits", "audio_layers"}`` for ``batch``."""
    torch.save(batch, tmp / "b.pt")
    (tmp / "reload.py").write_text(RELOAD)
    plain = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(tmp / "reload.py"), str(model_dir), str(tmp / "b.pt")], env=plain,
                       capture_output=True, text=True, timeout=300, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), torch.load(tmp / "b.pt.out", weights_only=True)


@pytest.fixture(scope="module")
def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # same threads per rank in every run: bit-identical scores
    return env


def stc(*args: str, env: dict, nproc: int = 1) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "engine.cli"] + (["run", "--nproc", str(nproc)] if nproc > 1 else [])
    r = subprocess.run([*head, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def scan_args(env: dict, out: Path) -> list[str]:
    return ["importance", f"model.path={env['model']}", "model.dtype=fp32", f"data.shards={env['shards']}",
            f"importance.out={out}", f"run.out_dir={out.parent / 'run'}", *SCAN]


@pytest.fixture(scope="module")
def cli_scan(aenv, tmp_path_factory, cli_env) -> Path:
    out = tmp_path_factory.mktemp("audio_cli") / "imp"
    stc(*scan_args(aenv, out), env=cli_env)
    return out


@pytest.mark.slow
def test_cli_audio_scan_then_prune_reloads_in_plain_transformers(aenv, cli_scan, cli_env, tmp_path):
    from sine_data import audio_prompt_batch
    from transformers import Qwen2AudioForConditionalGeneration

    from engine.models import storage

    doc = json.loads((cli_scan / "ranking.json").read_text())
    assert doc["component"] == "audio" and len(doc["removed"]) == 2 and set(doc["removed"]) <= {1, 2, 3}
    assert check_once(cli_scan) and len(units_of(cli_scan)) == 1 + 3 + 2
    # a rerun skips every unit
    again = stage.run_importance(cfg.load(None, scan_args(aenv, cli_scan)[1:]))
    assert again["scan"]["computed_this_run"] == 0 and again["removed"] == doc["removed"]

    out = tmp_path / "student"
    stc("prune", f"model.path={aenv['model']}", f"prune.ranking={cli_scan}", f"prune.out={out}",
        f"run.out_dir={tmp_path / 'run'}", env=cli_env)
    meta = json.loads((out / "meta.json").read_text())
    pr = meta["pruned"]
    kept = [i for i in range(AUDIO_LAYERS) if i not in doc["removed"]]
    assert pr["audio_removed"] == doc["removed"] and pr["audio_removed_original"] == doc["removed"]
    assert pr["audio_kept_original"] == kept and pr["ranking_component"] == "audio"
    assert pr["removed"] == [] and pr["kept_original"] == [0, 1, 2]  # no decoder layer removed
    before, after = meta["params"]["before"], meta["params"]["after"]
    assert after["total"] < before["total"] and 0 < after["storage_bytes"] < before["storage_bytes"]
    cj = json.loads((out / "config.json").read_text())
    assert cj["audio_config"]["encoder_layers"] == 2 and cj["audio_config"][surgery.ORIGINAL_AUDIO_KEY] == kept
    assert cj["text_config"]["num_hidden_layers"] == 3
    # bytes on disk per component: only the encoder shrank, and config.json predicts the files
    src_b, out_b = storage.measure(aenv["model"]), storage.measure(out)
    assert out_b.bytes["encoder"] < src_b.bytes["encoder"]
    assert {c: b for c, b in out_b.bytes.items() if c != "encoder"} == \
        {c: b for c, b in src_b.bytes.items() if c != "encoder"}
    assert storage.predict(str(out), dtype="fp32").bytes == out_b.bytes

    # plain transformers (engine not importable) reloads it == surgery's in-memory pruned model
    ref = Qwen2AudioForConditionalGeneration.from_pretrained(aenv["model"], dtype=torch.float32).eval()
    full = copy.deepcopy(ref)
    surgery.drop_layers(ref, [], audio_remove=doc["removed"])
    batch = audio_prompt_batch(aenv["model"])
    ac, got = reload_plain(out, batch, cli_env, tmp_path)
    assert ac["encoder_layers"] == 2 and ac[surgery.ORIGINAL_AUDIO_KEY] == kept
    assert got["audio_layers"] == 2
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], ref(**batch).logits)
        assert not torch.allclose(got["logits"], full(**batch).logits)  # the audio layers mattered

    # the first N of an audio ranking; an audio ranking plus explicit audio layers is refused
    one = stage.run_prune(cfg.load(None, [f"model.path={aenv['model']}", f"prune.ranking={cli_scan}",
                                          "prune.count=1", f"prune.out={tmp_path / 'one'}"]))
    assert one["audio_removed"] == doc["removed"][:1] and one["removed"] == []
    assert json.loads((tmp_path / "one" / "config.json").read_text())["audio_config"]["encoder_layers"] == 3
    with pytest.raises(ImportanceError, match=r"ranks audio-encoder layers .*prune_audio_layers.*not both"):
        stage.run_prune(cfg.load(None, [f"model.path={aenv['model']}", f"prune.ranking={cli_scan}",
                                        "prune.prune_audio_layers=[1]", f"prune.out={tmp_path / 'x'}"]))
    with pytest.raises(ImportanceError, match="removes only 2 audio-encoder layers"):
        stage.run_prune(cfg.load(None, [f"model.path={aenv['model']}", f"prune.ranking={cli_scan}",
                                        "prune.count=3", f"prune.out={tmp_path / 'x'}"]))


@pytest.mark.slow
def test_cli_prunes_decoder_and_audio_layers_in_one_step(aenv, cli_scan, cli_env, tmp_path):
    """`stc prune --layers ... --audio-from <audio ranking>`: decoder layers and the audio ranking's first
    prune.audio_count audio layers go in one step; the saved model reloads in plain transformers equal to
    surgery's, and config.json predicts its bytes exactly (storage.predict with both counts)."""
    from sine_data import audio_prompt_batch
    from transformers import Qwen2AudioForConditionalGeneration

    from engine.models import storage

    doc = json.loads((cli_scan / "ranking.json").read_text())
    out = tmp_path / "both"
    stc("prune", f"model.path={aenv['model']}", "--layers", "1", "--audio-from", str(cli_scan),
        "prune.audio_count=1", f"prune.out={out}", f"run.out_dir={tmp_path / 'run'}", env=cli_env)
    pr = json.loads((out / "meta.json").read_text())["pruned"]
    assert pr["removed_original"] == [1] and pr["kept_original"] == [0, 2]
    assert pr["audio_removed_original"] == doc["removed"][:1] and pr["audio_ranking"] == str(cli_scan)
    cj = json.loads((out / "config.json").read_text())
    assert cj["audio_config"]["encoder_layers"] == AUDIO_LAYERS - 1 and cj["text_config"]["num_hidden_layers"] == 2
    assert storage.predict(aenv["model"], removed=1, audio_removed=1, dtype="fp32").bytes == storage.measure(out).bytes
    ref = Qwen2AudioForConditionalGeneration.from_pretrained(aenv["model"], dtype=torch.float32).eval()
    surgery.drop_layers(ref, [1], audio_remove=doc["removed"][:1])
    batch = audio_prompt_batch(aenv["model"])
    _, got = reload_plain(out, batch, cli_env, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], ref(**batch).logits)

    def prune(*ovs):
        return stage.run_prune(cfg.load(None, [f"model.path={aenv['model']}", f"prune.out={tmp_path / 'x'}", *ovs]))

    # only audio layers, from the audio ranking given as audio_ranking
    only = stage.run_prune(cfg.load(None, [f"model.path={aenv['model']}", f"prune.audio_ranking={cli_scan}",
                                           f"prune.out={tmp_path / 'only'}"]))
    assert only["removed"] == [] and only["audio_removed"] == doc["removed"]
    with pytest.raises(ImportanceError, match=r"prune\.audio_ranking=.*prune\.ranking \(component=audio\).*one of"):
        prune(f"prune.ranking={cli_scan}", f"prune.audio_ranking={cli_scan}")
    with pytest.raises(cfg.ConfigError, match="prune.audio_ranking and prune.prune_audio_layers"):
        cfg.load(None, [f"prune.audio_ranking={cli_scan}", "prune.prune_audio_layers=[1]"])
    with pytest.raises(ImportanceError, match="removes only 2 audio-encoder layers"):
        prune("prune.layers=[1]", f"prune.audio_ranking={cli_scan}", "prune.audio_count=3")
    dec = tmp_path / "dec"
    dec.mkdir()
    (dec / "ranking.json").write_text(json.dumps({**doc, "component": "decoder"}))
    with pytest.raises(ImportanceError, match=r"prune\.audio_ranking=.* ranks decoder layers"):
        prune("prune.layers=[1]", f"prune.audio_ranking={dec}")


@pytest.mark.slow
def test_two_ranks_audio_scan_same_ranking_each_unit_once(aenv, cli_scan, cli_env, tmp_path):
    out2 = tmp_path / "imp2"
    stc(*scan_args(aenv, out2), env=cli_env, nproc=2)
    one = json.loads((cli_scan / "ranking.json").read_text())
    two = json.loads((out2 / "ranking.json").read_text())
    assert two["component"] == "audio" and two["removed"] == one["removed"]
    assert [it["scores"] for it in two["iterations"]] == [it["scores"] for it in one["iterations"]]
    assert two["baseline"] == one["baseline"]
    units = check_once(out2)
    assert len(units) == 1 + 3 + 2 and {u["component"] for u in units} == {"audio"}
    for it in (0, 1):  # both ranks worked in every iteration
        assert {u["rank"] for u in units if u["iteration"] == it} == {0, 1}
