"""Layer importance: the skip context, cached decoder inputs, the three scorers against references that
prune through surgery and reload with plain transformers, the search, the journal, bad inputs, and
real 1-/2-rank and SIGKILL-and-resume runs of `stc importance`."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine import config as cfg
from engine.config import DataConfig, ModelConfig
from engine.data.prompt import IGNORE, Featurizer
from engine.importance import devset as D
from engine.importance import journal as J
from engine.importance import layers as L
from engine.importance import scorers as S
from engine.importance import search as SR
from engine.importance import stage
from engine.importance.devset import ImportanceError
from engine.models import surgery

WORDS = ["morning", "meeting", "weather", "book", "train", "model", "layer", "river", "coffee", "music", "window",
         "garden", "bridge", "letter", "summer", "island"]


def build_env(root: Path, *, kind: str = "audio", layers: int = 6, n_dev: int = 6, n_test: int = 3, seed: int = 3,
              src_text: bool = True, test_copies_dev: bool = False, **tiny: Any) -> dict:
    """A tiny model (fp32 weights) and shards built by `stc shards build` from a synthetic manifest:
    short sine-wave WAVs (audio) or text-only rows (causal LM); ``tiny``: more arguments of
    ``build_tiny`` for the family (e.g. ``audio_layers``, ``audio_seconds``)."""
    import soundfile as sf

    from engine.data import shards
    from engine.models.tiny import build_tiny

    root.mkdir(parents=True, exist_ok=True)
    model = root / "model"
    if kind == "audio":
        build_tiny("qwen2audio", model, num_layers=layers, dtype="fp32", seed=seed, **tiny)
    elif kind == "text":
        build_tiny("causal_lm", model, num_layers=layers, dtype="fp32", seed=seed)
    else:                                   # another registered family (engine.models.families), with audio
        build_tiny(kind, model, num_layers=layers, dtype="fp32", seed=seed, **tiny)
    rows = []
    for i in range(n_dev + n_test):
        audio = ""
        if kind != "text":
            sr, dur = 16000, 0.3 + 0.05 * (i % 5)
            t = np.arange(int(dur * sr)) / sr
            sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 25 * i) * t)).astype("float32"), sr)
            audio = f"a{i}.wav"
        j = i - n_dev if (test_copies_dev and i >= n_dev) else i
        rows.append({"id": f"u{i:02d}", "audio": audio, "src_text": f"The {WORDS[j]} is nice." if src_text else "",
                     "tgt_text": "Hallo Welt " * (1 + i % 3) + WORDS[i], "src_lang": "en", "tgt_lang": "de",
                     "split": "dev" if i < n_dev else "test"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = cfg.load(None, [f"shards.manifest={root / 'm.jsonl'}", f"shards.out={root / 'sh'}",
                             "shards.samples_per_shard=4"])
    shards.build(recipe, workers=1)
    return {"root": root, "model": model, "shards": root / "sh"}


@pytest.fixture(scope="module")
def audio_env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("imp_audio"))


@pytest.fixture(scope="module")
def text_env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("imp_text"), kind="text", layers=5, n_dev=5)


def load(env: dict):
    from engine.models.load import load_model, load_processor

    model = load_model(ModelConfig(path=str(env["model"]), dtype="fp32"))
    return model, load_processor(env["model"])


def dev_of(env: dict, model, proc, *, batch_size: int = 4, max_samples: int = 0, audio: bool = True) -> D.DevSet:
    samples, skipped = D.read_dev(env["shards"], DataConfig(), max_samples, audio)
    assert samples and not skipped
    return D.prepare(model, proc, samples, DataConfig(), batch_size=batch_size, teacher_forced=True, prompt_only=True)


@pytest.fixture(scope="module")
def audio_loaded(audio_env):
    model, proc = load(audio_env)
    return model, proc, dev_of(audio_env, model, proc)


# ------------------------------------------------------------------------------------------ references
# Each reference prunes with surgery, saves, reloads with plain transformers and runs a fresh model.

def reference_model(env: dict, drop: list[int], tmp: Path):
    from engine.models import families

    cls = families.detect(json.loads((env["model"] / "config.json").read_text())).model_cls()
    m = cls.from_pretrained(env["model"], dtype=torch.float32)
    if drop:
        surgery.drop_layers(m, drop)
        out = tmp / ("pruned-" + "-".join(map(str, drop)))
        surgery.save_pruned(m, out)
        m = cls.from_pretrained(out, dtype=torch.float32)
        assert len(surgery.decoder_layers(m)) == len(surgery.decoder_layers(cls.from_pretrained(env["model"]))) - len(drop)
    return m.eval()


def reference_batches(env: dict, proc, audio: bool = True):
    """One unpadded Featurizer batch per dev sample (independent of the importance code's batching)."""
    samples, _ = D.read_dev(env["shards"], DataConfig(), 0, audio)
    feat = Featurizer(proc, DataConfig())
    for s in samples:
        yield s, feat([{"key": s.key, "meta": s.meta, "audio": s.audio, "sample_rate": s.sample_rate, "pad": False}])


def model_inputs(fb: dict) -> dict:
    from engine.models import families

    return {k: fb[k] for k in ("input_ids", "attention_mask", *families.audio_input_keys()) if k in fb}


@torch.no_grad()
def reference_nll(model, env, proc, audio=True) -> float:
    tot, n = 0.0, 0
    for _, fb in reference_batches(env, proc, audio):
        logits = model(**model_inputs(fb)).logits
        y = fb["labels"][:, 1:]
        m = y != IGNORE
        tot += float(torch.nn.functional.cross_entropy(logits[:, :-1][m].float(), y[m], reduction="sum"))
        n += int(m.sum())
    return tot / n


@torch.no_grad()
def reference_translations(model, env, proc, gen_cfg, audio=True) -> dict[str, str]:
    out = {}
    for s, fb in reference_batches(env, proc, audio):
        p = int((fb["labels"][0] != IGNORE).nonzero()[0])
        inp = model_inputs(fb)
        inp["input_ids"], inp["attention_mask"] = inp["input_ids"][:, :p], inp["attention_mask"][:, :p]
        g = model.generate(**inp, generation_config=copy.deepcopy(gen_cfg))
        out[s.key] = S.decode_new_tokens(getattr(proc, "tokenizer", proc), g[:, p:], gen_cfg.eos_token_id)[0]
    return out


# ------------------------------------------------------------------------------------------ skip context

def test_without_layers_swaps_and_restores_everything(audio_loaded):
    model, _, _ = audio_loaded
    layers = surgery.decoder_layers(model)
    tc = model.config.text_config
    before = (tc.num_hidden_layers, list(tc.layer_types), tc.max_window_layers, [l.self_attn.layer_idx for l in layers])
    with L.without_layers(model, [1, 3]) as kept:
        cur = surgery.decoder_layers(model)
        assert kept == [0, 2, 4, 5] and [id(m) for m in cur] == [id(layers[i]) for i in kept]  # same modules
        assert tc.num_hidden_layers == 4 and len(tc.layer_types) == 4
        assert [l.self_attn.layer_idx for l in cur] == [0, 1, 2, 3]
        with L.without_layers(model, [0]):  # nested: acts on the current list
            assert [id(m) for m in surgery.decoder_layers(model)] == [id(layers[i]) for i in (2, 4, 5)]
            assert [l.self_attn.layer_idx for l in surgery.decoder_layers(model)] == [0, 1, 2]
        assert [l.self_attn.layer_idx for l in cur] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        with L.without_layers(model, [2]):
            raise RuntimeError("boom")
    assert surgery.decoder_layers(model) is layers
    assert (tc.num_hidden_layers, list(tc.layer_types), tc.max_window_layers,
            [l.self_attn.layer_idx for l in layers]) == before
    assert not hasattr(tc, surgery.ORIGINAL_KEY)


def test_cached_decoder_inputs_give_the_full_forward(audio_env, audio_loaded):
    """Encoder once, then decoder from inputs_embeds == the model's own full forward."""
    model, proc, _ = audio_loaded
    samples, _ = D.read_dev(audio_env["shards"], DataConfig(), 3, True)
    fb = Featurizer(proc, DataConfig())([D._as_feature_sample(s) for s in samples])
    emb = D.decoder_inputs(model, fb)
    with torch.no_grad():
        full = model(**model_inputs(fb)).logits
        h = L.backbone(model)(inputs_embeds=emb, attention_mask=fb["attention_mask"]).last_hidden_state
        mine = model.get_output_embeddings()(h)
    m = fb["attention_mask"].bool()
    torch.testing.assert_close(mine[m], full[m], rtol=1e-5, atol=1e-5)
    assert emb.shape[:2] == fb["input_ids"].shape and (fb["input_ids"] == model.config.audio_token_id).any()


def test_prompt_only_view_is_left_padded_prompt(audio_loaded):
    _, _, dev = audio_loaded
    for b in dev.batches:
        plen = (b.labels != IGNORE).float().argmax(1)
        assert b.gen_mask.sum(1).tolist() == plen.tolist()
        for r in range(b.gen_embeds.shape[0]):
            n = int(plen[r])
            assert torch.equal(b.gen_embeds[r, -n:], b.embeds[r, :n]) and not b.gen_mask[r, :-n].any()


# ------------------------------------------------------------------------------------------ scorers vs references

def test_nll_matches_surgery_reference(audio_env, audio_loaded, tmp_path):
    model, proc, dev = audio_loaded
    got = S.nll_scores(model, dev, [None, 1, 4, 5])
    got_after = S.nll_scores(model, dev, [None, 3], removed=[2])
    assert got_after[None].score == pytest.approx(S.nll_scores(model, dev, [2])[2].score, rel=1e-6)
    for c, drop in [(None, []), (1, [1]), (5, [5])]:  # 5: the last layer (suffix = final norm only)
        ref = reference_nll(reference_model(audio_env, drop, tmp_path), audio_env, proc)
        assert got[c].score == pytest.approx(ref, rel=1e-5), c
    for c, drop in [(3, [2, 3])]:
        ref = reference_nll(reference_model(audio_env, drop, tmp_path), audio_env, proc)
        assert got_after[c].score == pytest.approx(ref, rel=1e-5), c
    assert got[None].n_tokens == sum(b.n_label_tokens for b in dev.batches) and got[1].n_samples == dev.n_samples


def test_nll_prefix_reuse_runs_fewer_layers_and_no_encoder(audio_loaded):
    """A full scan (baseline + every layer) runs L + L(L-1)/2 layer calls per batch instead of L*L, and
    never the audio encoder; streaming candidate by candidate gives the same scores in any order."""
    model, _, dev = audio_loaded
    calls = {"layers": 0, "encoder": 0}
    hooks = [l.register_forward_pre_hook(lambda *a: calls.__setitem__("layers", calls["layers"] + 1))
             for l in surgery.decoder_layers(model)]
    hooks.append(model.model.audio_tower.register_forward_pre_hook(
        lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1)))
    n = L.num_layers(model)
    nb = len(dev.batches)
    try:
        full = S.nll_scores(model, dev, [None, *range(n)])
        assert calls == {"layers": nb * (n + n * (n - 1) // 2), "encoder": 0}
        calls["layers"] = 0
        streamed = list(S.iter_nll_scores(model, dev, [4, 1, 2]))
        assert calls["layers"] == nb * (4 + (4 + 3 + 1))  # prefix up to layer 4, then each suffix
    finally:
        for h in hooks:
            h.remove()
    assert [c for c, _ in streamed] == [1, 2, 4]  # layer order, each yielded when it is final
    for c, sc in streamed:
        assert sc.score == pytest.approx(full[c].score, rel=1e-6)
    alone = S.nll_scores(model, dev, [4])  # a rank that got only this candidate: prefix from the start
    assert alone[4].score == pytest.approx(full[4].score, rel=1e-6)


def test_block_influence_matches_reference(audio_env, audio_loaded, tmp_path):
    model, proc, dev = audio_loaded

    def reference(m) -> tuple[list[float], list[float]]:
        n = len(surgery.decoder_layers(m))
        last = []
        h = surgery.decoder_layers(m)[-1].register_forward_hook(lambda mod, a, out: last.append(L.first_out(out)))
        bi, ang2, tok = [0.0] * n, [0.0] * (n - 1), 0
        try:
            for _, fb in reference_batches(audio_env, proc):
                with torch.no_grad():
                    hs = list(m(**model_inputs(fb), output_hidden_states=True).hidden_states[:n]) + [last.pop()]
                sel = fb["labels"][:, 1:] != IGNORE
                vs = [x[:, :-1][sel].float() for x in hs]
                for j in range(n):
                    bi[j] += float((1 - torch.nn.functional.cosine_similarity(vs[j], vs[j + 1], dim=-1)).sum())
                for j in range(n - 1):
                    c = torch.nn.functional.cosine_similarity(vs[j], vs[j + 2], dim=-1).clamp(-1, 1)
                    ang2[j] += float((torch.arccos(c) / np.pi).sum())
                tok += int(sel.sum())
        finally:
            h.remove()
        return [x / tok for x in bi], [x / tok for x in ang2]

    got = S.block_influence(model, dev, block_sizes=[2])
    ref_bi, ref_ang = reference(reference_model(audio_env, [], tmp_path))
    assert list(got.layer) == list(range(6))
    np.testing.assert_allclose([got.layer[i] for i in range(6)], ref_bi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([got.angular[2][i] for i in range(5)], ref_ang, rtol=1e-4, atol=1e-6)
    # after removing layer 2: layers keep their original numbers
    got2 = S.block_influence(model, dev, removed=[2])
    ref2, _ = reference(reference_model(audio_env, [2], tmp_path))
    assert list(got2.layer) == [0, 1, 3, 4, 5]
    np.testing.assert_allclose([got2.layer[i] for i in (0, 1, 3, 4, 5)], ref2, rtol=1e-4, atol=1e-6)


def test_task_matches_surgery_reference(audio_env, audio_loaded, tmp_path):
    """Batched, left-padded greedy decoding from cached embeddings == per-sample generate of the pruned,
    saved and reloaded model; metrics are sacrebleu's."""
    model, proc, dev = audio_loaded
    tok = proc.tokenizer
    gen = S.generation_config(model, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id, 12)
    got = dict(S.task_scores(model, tok, dev, [None, 3], removed=[1], metric="chrf++", gen_cfg=gen))
    refs_by_key = {k: r for b in dev.batches for k, r in zip(b.keys, b.refs)}
    for c, drop in [(None, [1]), (3, [1, 3])]:
        ref = reference_translations(reference_model(audio_env, drop, tmp_path), audio_env, proc, gen)
        assert dict(zip(dev.keys, got[c].hypotheses)) == ref
        mets = S.corpus_metrics([ref[k] for k in dev.keys], [refs_by_key[k] for k in dev.keys], ["de"])
        assert got[c].metrics == mets and got[c].score == mets["chrf++"]


def test_text_lm_scorers_match_reference(text_env, tmp_path):
    model, tok = load(text_env)
    dev = dev_of(text_env, model, tok, batch_size=2, audio=False)
    got = S.nll_scores(model, dev, [2])
    ref = reference_nll(reference_model(text_env, [2], tmp_path), text_env, tok, audio=False)
    assert got[2].score == pytest.approx(ref, rel=1e-5)
    gen = S.generation_config(model, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id, 8)
    (c, sc), = S.task_scores(model, tok, dev, [3], metric="chrf", gen_cfg=gen)
    refh = reference_translations(reference_model(text_env, [3], tmp_path), text_env, tok, gen, audio=False)
    assert dict(zip(dev.keys, sc.hypotheses)) == refh


def test_metrics_and_selector():
    m = S.corpus_metrics(["Hallo Welt, wie geht es dir heute?"], ["Hallo Welt, wie geht es dir heute?"], ["de"])
    assert m["chrf++"] == pytest.approx(100) and m["bleu"] == pytest.approx(100)
    zh = S.corpus_metrics(["今天天气很好我们去公园"], ["今天天气很好，我们去公园"], ["zh"])  # "zh": per character
    assert zh["bleu"] > 0
    assert S.resolve_metric("task", "auto", ["de"]) == "chrf++"
    assert S.resolve_metric("task", "auto", ["zh"]) == "chrf"
    assert S.resolve_metric("nll", "chrf", ["de"]) == "nll"
    with pytest.raises(ImportanceError, match="unknown metric 'comet'"):
        S.resolve_metric("task", "comet", ["de"])
    assert S.resolve_metric("task", "auto", ["de", "zh"]) == "primary"
    hyps, refs, tl = ["Hallo Welt", "今天天气很好"], ["Hallo Welt!", "今天天气很好，我们去公园"], ["de", "zh"]
    from sacrebleu.metrics import CHRF
    want = (CHRF(word_order=2).corpus_score(hyps[:1], [refs[:1]]).score
            + CHRF().corpus_score(hyps[1:], [refs[1:]]).score) / 2
    assert S.corpus_metrics(hyps, refs, tl)["primary"] == pytest.approx(want)
    with pytest.raises(ImportanceError, match="unknown metric"):
        S.check_metric("wer")
    with pytest.raises(cfg.ConfigError, match="importance.selector"):
        cfg.load(None, ["importance.selector=comet"])


# ------------------------------------------------------------------------------------------ plan and search

def icfg(**kw) -> cfg.ImportanceConfig:
    return cfg.load(None, [f"importance.{k}={json.dumps(v)}" for k, v in kw.items()]).importance


@pytest.mark.parametrize("kw,n,forced", [
    ({"remove": 0.25}, 8, ()), ({"remove": 3}, 3, ()), ({"target_layers": 24}, 8, ()),
    ({"remove": 0, "force_remove": [3, 13]}, 2, (3, 13)), ({"remove": 4, "force_remove": [-2]}, 4, (30,)),
])
def test_plan_targets(kw, n, forced):
    p = SR.make_plan(icfg(**kw), 32, "chrf++")
    assert p.n_remove == n and p.forced == forced and p.protected == (0, 31) and 0 not in p.prunable


@pytest.mark.parametrize("kw,match", [
    ({"remove": 31}, "only 30 are prunable"),
    ({"target_layers": 32}, "below 32"),
    ({"remove": 2, "force_remove": [0]}, "protected"),
    ({"remove": 2, "force_remove": [-1]}, "protected"),
    ({"remove": 2, "protect": [0, -1, 40]}, "does not exist"),
    ({"remove": 1, "force_remove": [3, 4]}, "removes only 1"),
    ({"remove": 2.5}, "whole number"),
    ({"remove": 0}, "nothing to remove"),
    ({"remove": 2, "stop_below": 1.5}, "stop_below"),
    ({"remove": 2, "method": "middle_block", "protect": [0, -1, 16]}, "protected layer"),
])
def test_plan_refuses_bad_targets(kw, match):
    with pytest.raises(ImportanceError, match=match):
        SR.make_plan(icfg(**kw), 32, "chrf++")


def test_plan_refuses_unknown_metric_and_floor_without_score():
    with pytest.raises(ImportanceError, match="unknown metric"):
        SR.make_plan(icfg(remove=2), 8, "comet")
    with pytest.raises(ImportanceError, match="block_influence has none"):
        SR.make_plan(icfg(remove=2, stop_below=0.9), 8, "block_influence")


@pytest.mark.parametrize("world", [1, 2, 3, 7, 12])
def test_assign_any_world_size(world):
    units = [SR.Unit(0, (), c) for c in range(1, 9)] + [SR.Unit(0, (), None)]
    a = SR.assign(units, world, lambda u: 1.0)
    assert sorted(u.key for r in a for u in r) == sorted(u.key for u in units)
    assert a == SR.assign(list(reversed(units)), world, lambda u: 1.0)  # deterministic
    sizes = [len(r) for r in a]
    assert max(sizes) - min(sizes) <= 1


class FakeRunner:
    """A Runner stand-in: scores from a table keyed by the set of removed layers."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def run(self, units):
        out = {}
        for u in units:
            self.calls.append(u)
            s = self.fn(set(u.removed) | ({u.candidate} if u.candidate is not None else set()))
            out[u.key] = {"score": s, "metrics": {"x": s}, "n_samples": 1, "seconds": 0.0, "rank": 0}
        return out


def fake_score(gone: set) -> float:
    """chrF-like: each removed layer costs a layer-specific amount; layers 3 and 5 interact."""
    cost = {1: 5.0, 2: 1.0, 3: 2.0, 4: 2.0, 5: 1.5, 6: 4.0}
    s = 50.0 - sum(cost[g] for g in gone)
    return s - (10.0 if {3, 5} <= gone else 0.0)


def test_iterative_oneshot_middle_block_and_ties():
    p = SR.make_plan(icfg(remove=3), 8, "chrf++")
    r = SR.run_search(p, FakeRunner(fake_score))
    # it0: 2 (49); it1: 5 (47.5); it2: 3 and 4 tie at 45.5 only if no interaction: 3 costs 10 more -> 4
    assert r.removed == [2, 5, 4] and r.baseline["score"] == 50.0 and r.final["score"] == 50 - 1 - 1.5 - 2
    assert [it["chosen"] for it in r.iterations] == [[2], [5], [4]]
    o = SR.run_search(SR.make_plan(icfg(remove=3, method="oneshot"), 8, "chrf++"), FakeRunner(fake_score))
    assert o.removed == [2, 5, 3] and o.final["score"] == 50 - 1 - 1.5 - 2 - 10  # one-shot misses the interaction
    m = SR.run_search(SR.make_plan(icfg(remove=3, method="middle_block"), 8, "chrf++"), FakeRunner(fake_score))
    assert m.removed == [2, 3, 4] and m.block == [2, 3, 4]
    # ties go to the lower layer index; a tiny float difference is a tie too
    tie = SR.run_search(SR.make_plan(icfg(remove=1), 8, "chrf++"),
                        FakeRunner(lambda g: 40.0 + (1e-12 if g == {4} else 0.0)))
    assert tie.removed == [1]
    low = SR.run_search(SR.make_plan(icfg(remove=1), 8, "nll"), FakeRunner(lambda g: 3.0 - 0.1 * len(g & {6})))
    assert low.removed == [6]  # lower is better for nll


def test_shortlist_rescores_only_the_least_harmful_candidates():
    """shortlist=N: the first iteration scores every candidate, later ones only the N that hurt least in the
    iteration before; with no interactions between layers it removes what the full search removes."""
    full = SR.run_search(SR.make_plan(icfg(remove=3), 8, "chrf++"), FakeRunner(fake_score))
    fr = FakeRunner(fake_score)
    short = SR.run_search(SR.make_plan(icfg(remove=3, shortlist=2), 8, "chrf++"), fr)
    # it0 scores 1..6 (+ baseline); ranks 2 (49), 5 (48.5), 3/4 (48), 6, 1 -> it1 re-scores {5, 3}; it2 the best
    # two left of it1's order + it0's tail: 3 was scored in it1 (with 2, 5 gone: 50-1-1.5-2-10), 4 comes from it0
    scored = [sorted(u.candidate for u in fr.calls if u.iteration == i and u.candidate is not None) for i in range(3)]
    assert scored == [[1, 2, 3, 4, 5, 6], [3, 5], [3, 4]]
    assert short.removed == [2, 5, 4] == full.removed
    with pytest.raises(ImportanceError, match="importance.shortlist"):
        SR.make_plan(icfg(remove=3, shortlist=-1), 8, "chrf++")


def test_stop_below_and_forced_layers():
    p = SR.make_plan(icfg(remove=4, stop_below=0.93), 8, "chrf++")
    r = SR.run_search(p, FakeRunner(fake_score))
    assert r.removed == [2, 5] and "stop_below" in r.stopped  # the 3rd removal would keep 45.5/50 = 91%
    f = SR.run_search(SR.make_plan(icfg(remove=3, force_remove=[6]), 8, "chrf++"), FakeRunner(fake_score))
    assert f.removed == [6, 2, 5] and f.iterations[0]["removed_before"] == [6]
    only = SR.run_search(SR.make_plan(icfg(remove=0, force_remove=[6, 1]), 8, "chrf++"), FakeRunner(fake_score))
    assert only.removed == [6, 1] and only.final["score"] == 41.0 and not only.iterations


def test_runner_stops_at_a_unit_or_batch_boundary_and_keeps_finished_units(tmp_path):
    """A stop request ends the iteration after the unit in flight (or inside it, between dev batches):
    the finished units are journaled and every rank raises Resumable (exit 75)."""
    from engine.errors import Resumable

    class Score:
        metric, metrics, n_samples, n_tokens, seconds = "nll", {"nll": 1.0}, 1, 1, 0.0

        def __init__(self, v):
            self.score = v

    def runner(out, reason_after, interrupt_at=None):
        state = {"n": 0, "closed": False}

        def compute(units):
            try:
                for u in units:
                    if state["n"] == interrupt_at:
                        raise SR.StopScan("SIGTERM")
                    state["n"] += 1
                    yield u, Score(float(u.candidate))
            finally:
                state["closed"] = True

        r = SR.Runner(compute=compute, writer=J.Writer(out, 0, J.header({}, {})), done={}, cost=lambda u: 1.0,
                      stop=lambda: "SIGTERM" if state["n"] >= reason_after else None)
        return r, state

    units = [SR.Unit(0, (), c) for c in range(1, 6)]
    r, state = runner(tmp_path / "a", reason_after=2)
    with pytest.raises(Resumable, match="stopped by SIGTERM") as e:
        r.run(units)
    assert e.value.exit_code == 75 and state["closed"] and r.computed == 2
    assert [u["candidate"] for u in units_of(tmp_path / "a")] == [1, 2]
    r, state = runner(tmp_path / "b", reason_after=99, interrupt_at=3)  # inside the 4th unit
    with pytest.raises(Resumable):
        r.run(units)
    assert [u["candidate"] for u in units_of(tmp_path / "b")] == [1, 2, 3]
    r, _ = runner(tmp_path / "c", reason_after=99)
    assert len(r.run(units)) == 5 and len(units_of(tmp_path / "c")) == 5


# ------------------------------------------------------------------------------------------ dev set

def test_dev_test_overlap_refused(tmp_path):
    env = build_env(tmp_path / "dup", n_dev=3, n_test=2, test_copies_dev=True, layers=3)
    samples, _ = D.read_dev(env["shards"], DataConfig(), 0, True)
    with pytest.raises(ImportanceError, match="source text that is also in the test split"):
        D.check_disjoint(env["shards"], "dev", "test", [s.key for s in samples], [s.meta["src_text"] for s in samples])
    with pytest.raises(ImportanceError, match="shares 1 key"):
        D.check_disjoint(env["shards"], "dev", "test", ["u03"], ["something else"])
    with pytest.raises(ImportanceError, match="both 'dev'"):
        D.check_disjoint(env["shards"], "dev", "dev", [], [])
    r = recipe_for(env, tmp_path / "o", "importance.scorer=nll", "importance.remove=1")
    with pytest.raises(ImportanceError, match="test split"):
        stage.run_importance(r)


def test_dev_set_without_usable_samples(tmp_path, text_env):
    env = build_env(tmp_path / "nosrc", n_dev=2, n_test=1, src_text=False, layers=3)
    # a text LM cannot translate audio rows that have no source text
    r = recipe_for(env, tmp_path / "o", "importance.scorer=nll", "importance.remove=1",
                   f"model.path={text_env['model']}")
    with pytest.raises(ImportanceError, match="no usable samples"):
        stage.run_importance(r)
    r = recipe_for(env, tmp_path / "o", "data.dev_split=valid", "importance.remove=1")
    with pytest.raises(ImportanceError, match="no shards of split 'valid'"):
        stage.run_importance(r)


# ------------------------------------------------------------------------------------------ stage, journal

def recipe_for(env: dict, out: Path, *ovs: str) -> cfg.Recipe:
    return cfg.load(None, [f"model.path={env['model']}", "model.dtype=fp32", f"data.shards={env['shards']}",
                           f"importance.out={out}", f"run.out_dir={out.parent / 'run'}", "importance.decode_batch_size=4",
                           *ovs])


def units_of(out: Path) -> list[dict]:
    recs = []
    for p in sorted(out.glob(J.JOURNAL_GLOB)):
        for line in p.read_text().splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if d.get("type") == "unit":
                recs.append(d)
    return recs


def test_stage_in_process_writes_outputs_and_resumes(audio_env, tmp_path):
    out = tmp_path / "imp"
    r = recipe_for(audio_env, out, "importance.scorer=nll", "importance.remove=2", "importance.max_dev_samples=4")
    doc = stage.run_importance(r)
    for f in ("ranking.json", "ranking.md", "importance.png", "meta.json", "config.yaml", "journal.rank000.jsonl"):
        assert (out / f).exists(), f
    assert json.loads((out / "ranking.json").read_text())["removed"] == doc["removed"]
    assert json.loads((out / "meta.json").read_text())["kind"] == "journal"
    assert len(doc["removed"]) == 2 and doc["n_samples"] == 4 and doc["scan"]["computed_this_run"] == 4 + 1 + 3
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun computes nothing
    again = stage.run_importance(r)
    assert again["scan"]["computed_this_run"] == 0 and again["removed"] == doc["removed"]
    assert again["iterations"] == doc["iterations"]

    # a corrupt line and a line cut by a kill: reported, and only their units recomputed
    j = out / "journal.rank000.jsonl"
    lines = j.read_text().splitlines(keepends=True)
    victim = json.loads(lines[2])
    lines[2] = '{"type": "unit", "iteration": 0, "remov\n'
    j.write_text("".join(lines) + '{"type": "unit", "iter')
    (out / "journal.rank001.jsonl").write_text('{"type": "header", "sch')  # a rank killed while starting
    third = stage.run_importance(r)
    assert third["scan"]["computed_this_run"] == 1 and third["removed"] == doc["removed"]
    assert third["iterations"][0]["scores"] == doc["iterations"][0]["scores"]
    problems = json.loads((out / "meta.json").read_text())["journal_problems"]
    assert any("line 3" in p for p in problems) and any("unfinished header" in p for p in problems)
    assert len(problems) == 3
    keys = [J.record_key(u) for u in units_of(out)]
    assert keys.count(J.record_key(victim)) == 1 and len(keys) == len(set(keys))


def test_journal_of_another_scan_is_refused(audio_env, tmp_path):
    out = tmp_path / "imp"
    base = ["importance.scorer=nll", "importance.remove=1", "importance.max_dev_samples=3"]
    stage.run_importance(recipe_for(audio_env, out, *base))
    with pytest.raises(ImportanceError, match=r"dev data .* differs"):
        stage.run_importance(recipe_for(audio_env, out, *base, "importance.max_dev_samples=2"))
    with pytest.raises(ImportanceError, match="scorer/metric config differs"):
        stage.run_importance(recipe_for(audio_env, out, *base, "importance.scorer=task"))
    other = build_env(tmp_path / "other", layers=6, seed=11, n_dev=3, n_test=1)
    with pytest.raises(ImportanceError, match=r"model weights \(sampled content\) differs"):
        stage.run_importance(recipe_for({**audio_env, "model": other["model"]}, out, *base))
    # a damaged header cannot be matched to any scan
    j = out / "journal.rank000.jsonl"
    j.write_text("garbage\n" + j.read_text().split("\n", 1)[1])
    with pytest.raises(ImportanceError, match="journal header"):
        stage.run_importance(recipe_for(audio_env, out, *base))


def test_stage_refuses_bad_targets_before_loading(audio_env, tmp_path):
    with pytest.raises(ImportanceError, match="prunable"):
        stage.run_importance(recipe_for(audio_env, tmp_path / "o", "importance.remove=5"))
    with pytest.raises(ImportanceError, match="protected"):
        stage.run_importance(recipe_for(audio_env, tmp_path / "o", "importance.force_remove=[5]"))
    assert not (tmp_path / "o").exists()


def test_oneshot_middle_block_and_dry_run_stage(audio_env, tmp_path):
    base = ["importance.scorer=nll", "importance.remove=2", "importance.max_dev_samples=3"]
    assert stage.run_importance(recipe_for(audio_env, tmp_path / "dry", *base), dry_run=True) is None
    assert not (tmp_path / "dry").exists()
    one = stage.run_importance(recipe_for(audio_env, tmp_path / "one", *base, "importance.method=oneshot"))
    first = {int(c): v for c, v in one["iterations"][0]["scores"].items()}
    assert one["removed"] == sorted(first, key=lambda c: (first[c], c))[:2]
    assert one["final"]["score"] > 0 and one["scan"]["computed_this_run"] == 4 + 1 + 1
    mid = stage.run_importance(recipe_for(audio_env, tmp_path / "mid", *base, "importance.method=middle_block"))
    assert mid["removed"] == [2, 3] and mid["iterations"] == [] and mid["final"]["relative"] is not None
    assert "| 1..2 |" in (tmp_path / "mid" / "ranking.md").read_text()


def test_block_influence_stage_reports_angular_distance(audio_env, tmp_path):
    doc = stage.run_importance(recipe_for(audio_env, tmp_path / "bi", "importance.scorer=block_influence",
                                          "importance.remove=2", "importance.max_dev_samples=3"))
    assert doc["metric"] == "block_influence" and doc["baseline"] is None and len(doc["removed"]) == 2
    first = doc["iterations"][0]["scores"]
    assert int(min(first, key=lambda c: (first[c], int(c)))) == doc["removed"][0]
    assert set(doc["block_angular_distance"]["2"]) == {"0", "1", "2", "3", "4"}


def test_nll_journals_each_candidate_at_once_and_resumes_after_a_crash(audio_env, tmp_path, monkeypatch):
    """Every nll candidate is journaled when it is scored (not at the end of its iteration): a crash in
    the middle of the 3rd candidate leaves the first two in the journal, and the rerun computes only the
    rest and ranks exactly as an uninterrupted scan."""
    base = ["importance.scorer=nll", "importance.remove=2", "importance.max_dev_samples=4",
            "importance.decode_batch_size=2"]
    whole = stage.run_importance(recipe_for(audio_env, tmp_path / "whole", *base))
    assert whole["scan"]["computed_this_run"] == 4 + 1 + 3

    out = tmp_path / "crashed"
    real, calls = S._nll_sum, {"n": 0}

    def crashing(head, hidden, labels):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:  # first dev batch (of 2) of the 3rd candidate
            raise RuntimeError("injected crash")
        return real(head, hidden, labels)

    monkeypatch.setattr(S, "_nll_sum", crashing)
    with pytest.raises(RuntimeError, match="injected crash"):
        stage.run_importance(recipe_for(audio_env, out, *base))
    monkeypatch.setattr(S, "_nll_sum", real)
    kept = units_of(out)
    assert [(u["iteration"], u["candidate"]) for u in kept] == [(0, 1), (0, 2)]
    kept_lines = [line for line in (out / "journal.rank000.jsonl").read_text().splitlines() if '"unit"' in line]

    again = stage.run_importance(recipe_for(audio_env, out, *base))
    assert again["scan"]["computed_this_run"] == 8 - 2
    units = check_once(out)
    assert len(units) == 8
    lines = [line for line in (out / "journal.rank000.jsonl").read_text().splitlines() if '"unit"' in line]
    assert lines[:2] == kept_lines  # the finished candidates were kept, not recomputed
    assert again["removed"] == whole["removed"] and again["baseline"]["score"] == whole["baseline"]["score"]
    assert [it["scores"] for it in again["iterations"]] == [it["scores"] for it in whole["iterations"]]


def test_task_scorer_keeps_hypotheses_per_candidate(audio_env, tmp_path):
    out = tmp_path / "task"
    doc = stage.run_importance(recipe_for(audio_env, out, "importance.scorer=task", "importance.remove=1",
                                          "importance.max_dev_samples=3", "importance.max_new_tokens=8"))
    units = units_of(out)
    assert len(units) == 4 + 1
    samples, _ = D.read_dev(audio_env["shards"], DataConfig(), 3, True)
    refs = {s.key: s.meta["tgt_text"] for s in samples}
    names = set()
    for u in units:
        name = u["hypotheses"]
        names.add(name)
        rows = [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]
        assert [r["key"] for r in rows] == [s.key for s in samples]
        assert all(r["ref"] == refs[r["key"]] and r["tgt_lang"] == "de" and isinstance(r["hyp"], str) for r in rows)
        # the file holds the very translations the unit was scored by
        assert S.corpus_metrics([r["hyp"] for r in rows], [r["ref"] for r in rows], ["de"]) == u["metrics"]
    assert len(names) == len(units)  # one file per unit
    assert "hypotheses/it0-model.jsonl" in names and "hypotheses/it0-layer3.jsonl" in names
    assert doc["baseline"]["hypotheses"] == "hypotheses/it0-model.jsonl"
    assert doc["iterations"][0]["hypotheses"] == {str(c): f"hypotheses/it0-layer{c}.jsonl" for c in range(1, 5)}
    assert "hypotheses/" in (out / "ranking.md").read_text()
    assert SR.Unit(2, (5, 3), 1) != SR.Unit(2, (3,), 1)
    assert stage.hypotheses_name(SR.Unit(2, (5, 3), 1)) == "hypotheses/it2-layer1-without-3.5.jsonl"


def test_another_method_or_scorer_into_the_same_out_is_refused(audio_env, tmp_path):
    """One ranking per importance.out: a later `stc prune --from <out>` must not pick up another
    method's layers."""
    out = tmp_path / "imp"
    base = ["importance.scorer=nll", "importance.remove=2", "importance.max_dev_samples=3"]
    first = stage.run_importance(recipe_for(audio_env, out, *base))
    before = (out / "ranking.json").read_bytes()
    for extra in (["importance.method=oneshot"], ["importance.method=middle_block"]):
        for dry in (True, False):
            with pytest.raises(ImportanceError, match=r"already holds a ranking \(ranking.json: method=iterative, "
                                                      r"scorer=nll, metric=nll\).*importance\.out=.*imp-") as e:
                stage.run_importance(recipe_for(audio_env, out, *base, *extra), dry_run=dry)
    assert "stc prune --from" in str(e.value)
    assert (out / "ranking.json").read_bytes() == before
    # without the journal (deleted), another scorer is refused by the ranking alone
    for j in out.glob(J.JOURNAL_GLOB):
        j.unlink()
    with pytest.raises(ImportanceError, match="scorer=nll.*this scan .*scorer=block_influence"):
        stage.run_importance(recipe_for(audio_env, out, *base, "importance.scorer=block_influence"))
    assert (out / "ranking.json").read_bytes() == before
    # the same method again (e.g. more layers) is the same ranking, extended
    more = stage.run_importance(recipe_for(audio_env, out, "importance.scorer=nll", "importance.remove=3",
                                           "importance.max_dev_samples=3"))
    assert more["removed"][:2] == first["removed"]
    # the directory the message proposes works
    other = stage.run_importance(recipe_for(audio_env, tmp_path / "imp-oneshot-nll", *base, "importance.method=oneshot"))
    assert other["method"] == "oneshot"


def test_summary_prints_every_value_whole_at_80_columns(audio_env, tmp_path, monkeypatch):
    from io import StringIO

    from rich.console import Console

    from engine import log

    def printed(doc: dict, out: Path) -> str:
        buf = StringIO()
        monkeypatch.setattr(log, "console", Console(width=80, file=buf, highlight=False))
        stage._print_summary(doc, out)
        return buf.getvalue()

    def table_rows(text: str) -> list[tuple[str, ...]]:
        return [tuple(c.strip() for c in line.split("│")[1:-1]) for line in text.splitlines() if line.count("│") == 6]

    long_out = tmp_path / ("a-rather-long-directory-name-" * 3) / "importance"
    mid = stage.run_importance(recipe_for(audio_env, tmp_path / "mid", "importance.scorer=nll", "importance.remove=2",
                                          "importance.max_dev_samples=3", "importance.method=middle_block"))
    text = printed(mid, long_out)
    fin = mid["final"]
    assert table_rows(text) == [("1", "2", "2", "block", "-"),  # the removed block, one row per layer
                                ("2", "3", "3", f"{fin['score']:.4f}", f"{100 * fin['relative']:.1f}%")]
    assert str(long_out / "ranking.json") in text

    # a long scan: a forced layer, two-digit layers, a long metric name, many steps
    chosen = [13, 20, 5, 17, 9, 22, 11, 14]
    its = [{"iteration": k, "chosen": [c], "relative": 0.98765 - 0.01 * k, "scores": {str(c): 0.123456 * (k + 1)}}
           for k, c in enumerate(chosen)]
    orig = {27: 31, 13: 15, 20: 22, 5: 5, 17: 19, 9: 9, 22: 24, 11: 12, 14: 16}
    doc = {"method": "iterative", "metric": "block_influence", "forced": [27], "removed": list(orig),
           "removed_original": list(orig.values()), "iterations": its, "baseline": {"score": 56.123456789},
           "final": {"score": 50.1234567891, "relative": 0.8931}, "scan": {"seconds": 1234.567, "world_size": 8},
           "block": None}
    text = printed(doc, long_out)
    for line in text.splitlines()[:-1]:
        assert len(line) <= 80, line
    want = [("1", "27", "31", "forced", "-")] + [
        (str(k + 2), str(c), str(orig[c]), f"{0.123456 * (k + 1):.4f}", f"{100 * (0.98765 - 0.01 * k):.1f}%")
        for k, c in enumerate(chosen)]
    assert table_rows(text) == want
    assert "block_influence" in text and str(long_out / "ranking.json") in text
    assert "unpruned 56.1235, pruned 50.1235 (89.3% of unpruned)" in text


# ------------------------------------------------------------------------------------------ real ranks, kills

SCAN = ["importance.scorer=task", "importance.remove=3", "importance.max_new_tokens=40", "importance.decode_batch_size=4"]


def stc_importance(stc_cmd, stc_env, env, out, *extra, nproc=1, timeout=240):
    head = [*stc_cmd, "run", "--nproc", str(nproc)] if nproc > 1 else list(stc_cmd)
    cmd = [*head, "importance", f"model.path={env['model']}", "model.dtype=fp32", f"data.shards={env['shards']}",
           f"importance.out={out}", f"run.out_dir={out.parent / 'run'}", *SCAN, *extra]
    return cmd


def run_ok(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def one_rank_scan(audio_env, tmp_path_factory, stc_cmd_mod, stc_env_mod):
    out = tmp_path_factory.mktemp("scan1") / "imp"
    run_ok(stc_importance(stc_cmd_mod, stc_env_mod, audio_env, out), stc_env_mod)
    return out


@pytest.fixture(scope="module")
def stc_cmd_mod():
    import sys

    return [sys.executable, "-m", "engine.cli"]


@pytest.fixture(scope="module")
def stc_env_mod():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # same threads per rank in every run: bit-identical scores
    return env


def check_once(out: Path) -> list[dict]:
    units = units_of(out)
    keys = [J.record_key(u) for u in units]
    assert len(keys) == len(set(keys)), "a unit was computed twice"
    return units


@pytest.mark.slow
def test_two_ranks_same_ranking_each_unit_once_both_ranks_work(audio_env, one_rank_scan, tmp_path, stc_cmd_mod,
                                                               stc_env_mod):
    out2 = tmp_path / "imp2"
    run_ok(stc_importance(stc_cmd_mod, stc_env_mod, audio_env, out2, nproc=2), stc_env_mod)
    one = json.loads((one_rank_scan / "ranking.json").read_text())
    two = json.loads((out2 / "ranking.json").read_text())
    assert two["removed"] == one["removed"] and len(one["removed"]) == 3
    assert [it["scores"] for it in two["iterations"]] == [it["scores"] for it in one["iterations"]]
    assert two["baseline"] == one["baseline"]
    units = check_once(out2)
    assert len(units) == 1 + 4 + 3 + 2  # baseline + candidates of three iterations, each once
    assert {u["rank"] for u in units} == {0, 1} and len({u["pid"] for u in units}) == 2
    for it in (0, 1, 2):  # both ranks worked in every iteration
        assert {u["rank"] for u in units if u["iteration"] == it} == {0, 1}
    assert sorted(p.name for p in out2.glob(J.JOURNAL_GLOB)) == ["journal.rank000.jsonl", "journal.rank001.jsonl"]


@pytest.mark.slow
def test_sigkill_mid_scan_resumes_without_recomputing(audio_env, one_rank_scan, tmp_path, stc_cmd_mod, stc_env_mod):
    out = tmp_path / "killed"
    proc = subprocess.Popen(stc_importance(stc_cmd_mod, stc_env_mod, audio_env, out), env=stc_env_mod,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(units_of(out)) >= 1:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    done_before = {J.record_key(u): u for u in units_of(out)}
    assert 1 <= len(done_before) < 10 and not (out / "ranking.json").exists()  # killed mid-scan
    r = run_ok(stc_importance(stc_cmd_mod, stc_env_mod, audio_env, out), stc_env_mod)
    units = check_once(out)
    assert len(units) == 10
    for k, u in done_before.items():  # finished units kept, not recomputed (same pid, same line)
        assert next(x for x in units if J.record_key(x) == k)["pid"] == u["pid"]
    one = json.loads((one_rank_scan / "ranking.json").read_text())
    resumed = json.loads((out / "ranking.json").read_text())
    assert resumed["removed"] == one["removed"]
    assert [it["scores"] for it in resumed["iterations"]] == [it["scores"] for it in one["iterations"]]
    assert resumed["scan"]["computed_this_run"] == 10 - len(done_before), r.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_exits_75_and_the_rerun_keeps_the_journal(audio_env, one_rank_scan, tmp_path, stc_cmd_mod,
                                                          stc_env_mod):
    """The documented contract through the real CLI: SIGTERM mid-scan -> exit 75 (not 143), the finished
    units stay in the journal, the rerun computes only the rest and ranks as an uninterrupted scan."""
    out = tmp_path / "termed"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{path: {audio_env['model']}, dtype: fp32}}\n"
                      f"data: {{shards: {audio_env['shards']}}}\n"
                      f"run: {{out_dir: {tmp_path / 'run'}}}\n"
                      f"importance: {{out: {out}, scorer: task, remove: 3, max_new_tokens: 40, decode_batch_size: 4}}\n")
    cmd = [*stc_cmd_mod, "importance", "--config", str(recipe)]
    # the process signals itself after its 3rd unit (the test hook), as a scheduler would
    r = subprocess.run(cmd, env={**stc_env_mod, "STC_SIGNAL_AFTER_UNITS": "3"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 75, r.stderr[-3000:]
    assert "stopped by SIGTERM" in r.stderr and "rerun the same command" in r.stderr
    first = {J.record_key(u): u for u in check_once(out)}
    assert len(first) == 3 and not (out / "ranking.json").exists()
    # SIGTERM from outside while a unit is being computed
    proc = subprocess.Popen(cmd, env=stc_env_mod, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None and len(units_of(out)) < 4:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    second = {J.record_key(u): u for u in check_once(out)}
    assert 4 <= len(second) < 10 and not (out / "ranking.json").exists()
    r = subprocess.run(cmd, env=stc_env_mod, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    units = check_once(out)
    assert len(units) == 10
    for k, u in second.items():  # kept, not recomputed
        assert next(x for x in units if J.record_key(x) == k)["pid"] == u["pid"]
    resumed = json.loads((out / "ranking.json").read_text())
    one = json.loads((one_rank_scan / "ranking.json").read_text())
    assert resumed["scan"]["computed_this_run"] == 10 - len(second)
    assert resumed["removed"] == one["removed"]
    assert [it["scores"] for it in resumed["iterations"]] == [it["scores"] for it in one["iterations"]]
