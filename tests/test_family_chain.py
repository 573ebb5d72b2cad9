"""The audio-LM families beyond Qwen2-Audio through the engine, each on a tiny random model built from the
family's own config class: the processor against transformers' own audio path, the importance scorers
(decoder and audio encoder) against surgery references, LoRA targets, pruning with a reload in plain
transformers, and the whole plan (importance, prune, teacher cache, QLoRA + KD, nf4 export, evaluate,
report) with two ranks per step; the 7B recipes validate on config-only directories with public shapes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import DataConfig
from engine.importance import scorers as S
from engine.models import families, surgery

from sine_data import audio_prompt_batch
from test_importance import (build_env, dev_of, load, model_inputs, reference_batches, reference_model,
                             reference_nll, reference_translations)

KINDS = ["qwen2_5_omni", "phi4_multimodal", "granite_speech", "voxtral"]


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def env(tmp_path_factory, kind):
    return build_env(tmp_path_factory.mktemp(kind), kind=kind, layers=4, n_dev=4, n_test=3, audio_seconds=3)


# Phi-4-multimodal's and Granite Speech's Conformers see the padding of a batch: the audio embeddings of a padded
# row move by ~1e-3 against the same clip alone (their own code, the transformers processors batch the same way).
# The references run one sample at a time, so for them the engine's dev set is compared at batch 1; the Omni
# thinker's and Voxtral's encoders are padding-free and are compared batched (left-padded generation included).
BATCH = {"qwen2_5_omni": 4, "phi4_multimodal": 1, "granite_speech": 1, "voxtral": 4}


@pytest.fixture(scope="module")
def loaded(env, kind):
    model, proc = load(env)
    return model, proc, dev_of(env, model, proc, batch_size=BATCH[kind])


def test_family_detection_and_layers(env, loaded, kind):
    model, _, _ = loaded
    doc = json.loads((env["model"] / "config.json").read_text())
    assert families.detect(doc).kind == kind and type(model).__name__ == families.get(kind).model_class
    assert len(surgery.decoder_layers(model)) == 4 and len(surgery.audio_layers(model)) == 2
    assert families.get(kind).audio_layer_count_of(doc) == 2
    assert families.text_config_dict(doc)["num_hidden_layers"] == 4
    if kind != "qwen2_5_omni":
        return
    # the hub's full Omni config wraps the thinker's: detected by model_type, the thinker's part read
    wrapped = {"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniForConditionalGeneration"],
               "thinker_config": doc}
    assert families.detect(wrapped).kind == kind
    assert families.text_config_dict(wrapped)["num_hidden_layers"] == 4
    assert families.get(kind).audio_layer_count_of(wrapped) == 2


def test_processor_equals_transformers_audio_path(env, loaded, kind):
    """Audio inputs and the placeholder expansion equal the family's transformers processor's own audio code
    (its constructor needs torchvision for the image or video processor, so its audio methods are called
    on an instance built without it)."""
    from engine.importance import devset as D

    _, proc, _ = loaded
    samples, _ = D.read_dev(env["shards"], DataConfig(), 0, True)
    waves = [s.audio for s in samples]
    if kind == "qwen2_5_omni":
        from transformers import Qwen2_5OmniProcessor as Real
    elif kind == "voxtral":
        from transformers import VoxtralProcessor as Real
    elif kind == "granite_speech":
        from transformers import GraniteSpeechProcessor as Real
    else:
        from transformers import Phi4MultimodalProcessor as Real
    real = Real.__new__(Real)
    real.feature_extractor, real.tokenizer, real.audio_token = proc.feature_extractor, proc.tokenizer, proc.audio_token
    if kind == "qwen2_5_omni":
        feats, repl = real._process_audio(waves, sampling_rate=16000, return_attention_mask=True,
                                          return_tensors="pt")
    elif kind == "voxtral":
        # the features as transformers' VoxtralProcessor computes them (at the tiny model's chunk length), the
        # [AUDIO] count as mistral-common's audio encoder writes it for the tiny tekken.json
        fe = proc.feature_extractor
        feats = {"input_features": real._retrieve_input_features(
            waves, fe.nb_max_frames, sampling_rate=16000, padding=True, truncation=False,
            pad_to_multiple_of=fe.n_samples, return_tensors="pt")}
        repl = [proc.audio_token * (len(t) - 1) for t in mistral_audio_tokens(env["model"], waves)]
    elif kind == "granite_speech":
        # the transformers extractor needs torchaudio for its mel spectrogram: its token arithmetic is called on an
        # instance built without it, the features are compared with an independent numpy reference
        from transformers import GraniteSpeechFeatureExtractor as RealFE

        fe = RealFE.__new__(RealFE)
        fe.melspec_kwargs = dict(proc.feature_extractor.melspec_kwargs)
        fe.projector_window_size, fe.projector_downsample_rate = 15, 5
        sizes = fe._get_num_audio_features([len(w) for w in waves])
        feats = {"audio_embed_sizes": sizes, "input_features": granite_reference_features(waves),
                 "input_features_mask": torch.arange(max(sizes))[None] < torch.tensor(sizes)[:, None]}
        repl = [real.replace_audio_token(feats, audio_idx=i) for i in range(len(waves))]
    else:
        feats = proc.feature_extractor(waves, sampling_rate=16000, return_tensors="pt")
        repl = [real.replace_audio_token(feats, audio_idx=i) for i in range(len(waves))]
    text = f"a{proc.audio_token}x"
    ours = proc([text] * len(waves), audio=waves, sampling_rate=16000)
    for k in families.get(kind).audio_inputs:
        if ours[k].is_floating_point() and kind == "granite_speech":   # float32 against float64: rounding only
            err = (ours[k].double() - feats[k]).abs()
            assert err.max() < 1e-4 and err.mean() < 2e-6, (err.max(), err.mean())
        else:
            assert torch.equal(ours[k], feats[k]), k
    for i, r in enumerate(repl):
        want = proc.tokenizer("a" + r + "x", add_special_tokens=False)["input_ids"]
        got = ours["input_ids"][i][ours["attention_mask"][i].bool()].tolist()
        assert got == want


def mistral_audio_tokens(model_dir, waves):
    """The tokens mistral-common's own audio encoder writes for each clip ([BEGIN_AUDIO] + [AUDIO] x n)."""
    from mistral_common.protocol.instruct.chunk import AudioChunk
    from mistral_common.tokens.tokenizers.audio import Audio
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mt = MistralTokenizer.from_file(str(Path(model_dir) / "tekken.json"))
    enc = mt.instruct_tokenizer.audio_encoder
    out = []
    for w in waves:
        chunk = AudioChunk.from_audio(Audio(w, 16000, "wav"))
        toks = enc(chunk).tokens
        assert toks[0] == enc.begin_audio_token and set(toks[1:]) == {enc.audio_token}
        out.append(toks)
    return out


def granite_reference_features(waves, sr=16000, n_fft=512, win=400, hop=160, n_mels=80):
    """Granite Speech's features from their definition, in float64 numpy: the power spectrum of reflect-padded,
    centred frames under a periodic Hann window of ``win`` samples centred in ``n_fft``; triangular filters
    spaced on the HTK mel scale (2595 log10(1 + f / 700)) from 0 Hz to Nyquist; log10 floored at 1e-10 and
    8 decades below the clip's maximum, then /4 + 1; an odd last frame dropped; frame pairs stacked."""
    import numpy as np

    length = max(len(w) for w in waves)
    x = np.zeros((len(waves), length))
    for i, w in enumerate(waves):
        x[i, :len(w)] = w
    window = np.zeros(n_fft)
    off = (n_fft - win) // 2
    window[off:off + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    xp = np.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    frames = 1 + length // hop
    spec = np.stack([np.abs(np.fft.rfft(xp[:, t * hop:t * hop + n_fft] * window, axis=-1)) ** 2
                     for t in range(frames)], axis=1)                                  # (B, frames, F)

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, sr // 2, n_fft // 2 + 1)
    pts = hz(np.linspace(mel(0.0), mel(sr / 2), n_mels + 2))
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        rise = (freqs - pts[m]) / (pts[m + 1] - pts[m])
        fall = (pts[m + 2] - freqs) / (pts[m + 2] - pts[m + 1])
        fb[:, m] = np.maximum(0.0, np.minimum(rise, fall))
    logmel = np.log10(np.maximum(spec @ fb, 1e-10))
    top = logmel.max(axis=(1, 2), keepdims=True)
    logmel = np.maximum(logmel, top - 8.0) / 4 + 1
    if logmel.shape[1] % 2:
        logmel = logmel[:, :-1]
    return torch.from_numpy(logmel.reshape(len(waves), -1, 2 * n_mels))


def test_nll_and_task_match_surgery_reference(env, loaded, tmp_path):
    """The scans run the decoder from cached inputs (3-D rope positions rebuilt from the attention mask);
    a pruned, saved and reloaded thinker run by plain transformers gives the same numbers and words."""
    model, proc, dev = loaded
    got = S.nll_scores(model, dev, [None, 1, 3])
    for c, drop in [(None, []), (1, [1]), (3, [3])]:
        ref = reference_nll(reference_model(env, drop, tmp_path), env, proc)
        assert got[c].score == pytest.approx(ref, rel=1e-5), c
    tok = proc.tokenizer
    gen = S.generation_config(model, _end_id(proc), tok.pad_token_id, 8)
    task = dict(S.task_scores(model, tok, dev, [None, 2], metric="chrf++", gen_cfg=gen))
    for c, drop in [(None, []), (2, [2])]:
        ref = reference_translations(reference_model(env, drop, tmp_path), env, proc, gen)
        assert dict(zip(dev.keys, task[c].hypotheses)) == ref, c


# ============================================================================== the whole plan

def _stc(*argv, timeout=1800):
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plan_run(tmp_path_factory, kind):
    """`stc pipeline` on a tiny model of the family, two ranks per step: importance (task), prune to half the decoder,
    the teacher cache, QLoRA + KD healing, nf4 export, evaluation of teacher, pruned and healed student,
    the report (the ablations are the plan's own tests' business)."""
    from sine_data import write_plan_recipe

    from engine.models.tiny import build_tiny

    root = tmp_path_factory.mktemp(f"{kind}_plan")
    build_tiny(kind, root / "model", num_layers=4, dtype="fp32", seed=0, audio_seconds=3)
    recipe = write_plan_recipe(root, distill="mode: qlora", extra="pipeline: {students: [0.5], ablations: false, "
                                                                  "shuffle_check: false}\n")
    dry = _stc("pipeline", "--config", recipe, "--dry-run", "--nproc", "2", timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    r = _stc("pipeline", "--config", recipe, "--nproc", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    return root


@pytest.mark.slow
def test_whole_plan(plan_run, kind):
    from engine.models.load import load_processor

    cls = families.get(kind).model_cls()

    run = plan_run / "run"
    assert (run / "cache/meta.json").exists()
    ranking = json.loads((run / "importance/ranking.json").read_text())
    pruned = json.loads((run / "students/r50/pruned/meta.json").read_text())["pruned"]
    assert pruned["removed"] == ranking["removed"][:2]
    # the pruned student reloads in plain transformers and equals surgery on the teacher in memory
    teacher = cls.from_pretrained(plan_run / "model", dtype=torch.float32).eval()
    surgery.drop_layers(teacher, pruned["removed"])
    student = cls.from_pretrained(run / "students/r50/pruned", dtype=torch.float32).eval()
    assert len(surgery.decoder_layers(student)) == 2
    inp = audio_prompt_batch(run / "students/r50/pruned", load_processor(run / "students/r50/pruned"))
    with torch.no_grad():
        assert torch.equal(teacher(**inp).logits, student(**inp).logits)
        assert torch.equal(teacher.generate(**inp, max_new_tokens=5, do_sample=False),
                           student.generate(**inp, max_new_tokens=5, do_sample=False))
    # the healed nf4 export loads with plain transformers (+ bitsandbytes) and generates
    exp = run / "students/r50/kd/export"
    assert json.loads((exp / "meta.json").read_text())["exported"]["quant"] == "nf4"
    healed = cls.from_pretrained(exp).eval()
    from engine.models.load import bnb_cpu_workaround

    bnb_cpu_workaround(healed)
    with torch.no_grad():
        assert healed.generate(**inp, max_new_tokens=3, do_sample=False).shape[1] > inp["input_ids"].shape[1]
    if (plan_run / "model/tekken.json").is_file():      # Voxtral: every saved copy keeps the mistral-common vocabulary
        src = (plan_run / "model/tekken.json").read_text()
        assert all((d / "tekken.json").read_text() == src for d in (run / "students/r50/pruned", exp))
    rep = json.loads((run / "report/report.json").read_text())
    rows = {row["system"]: row for row in rep["systems"]}
    assert sorted(rows) == ["kd-50", "teacher"]
    assert rows["kd-50"]["decoder_layers"] == 2 and rows["teacher"]["decoder_layers"] == 4
    for name in ("teacher", "kd-50"):
        assert json.loads((run / "eval" / name / "scores.json").read_text())["n"] == 3


@pytest.mark.parametrize("recipe,writer,params,removed", [
    ("qwen25-omni-7b-en-de", "write_config_only_omni_7b", "8.93B", (7, 14)),          # 28 -> 21 and 28 -> 14
    ("phi4-multimodal-en-de", "write_config_only_phi4_multimodal", "4.74B", (8, 16)),  # 32 -> 24 and 32 -> 16
    ("granite-speech-8b-en-de", "write_config_only_granite_speech_8b", "8.65B", (10, 20)),  # 40 -> 30 / 20
    ("voxtral-mini-3b-en-de", "write_config_only_voxtral_mini_3b", "4.68B", (8, 15)),       # 30 -> 22 / 15
])
def test_dry_run_of_the_family_recipes_on_8_gpus(tmp_path, stc_inproc, recipe, writer, params, removed):
    """The shipped recipe of each family validates on a config-only directory with the public shapes (the
    Omni hub layout wraps the thinker; Phi-4-multimodal without its two LoRA adapters, which the public
    5.6B counts): parameters from the meta device, students from the decoder's layer count."""
    import re

    import qwen2audio_7b
    from sine_data import build_split_shards

    model = getattr(qwen2audio_7b, writer)(tmp_path / "model")
    shards = build_split_shards(tmp_path)
    root = Path(__file__).resolve().parents[1]
    r = stc_inproc("pipeline", "--config", root / "configs" / f"{recipe}.yaml", "--dry-run", "--nproc", "8",
                   f"model.path={model}", f"data.shards={shards}", f"run.out_dir={tmp_path / 'runs'}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "the plan validates: every step would start" in r.stdout
    out = re.sub(r"\s+", " ", r.stdout)
    assert f"est: {params} params, {params} trainable" in out
    assert all(f"prune.count={n}" in out for n in removed)
    assert not (tmp_path / "runs").exists()


def _end_id(proc) -> int:
    from engine.data.prompt import PromptBuilder

    return PromptBuilder(proc).end_id


def test_audio_encoder_scan_matches_surgery(env, loaded, kind):
    """importance.component=audio on the thinker: an audio candidate's nll equals the thinker with that
    encoder layer dropped by surgery; block influence runs over the packed frames its encoder layers see."""
    import copy

    from engine.importance import devset as D

    model, proc, _ = loaded
    samples, _ = D.read_dev(env["shards"], DataConfig(), 0, True)
    dev = D.prepare(model, proc, samples, DataConfig(), batch_size=min(3, BATCH[kind]), teacher_forced=True,
                    prompt_only=False, keep_features=True)
    got = dict(S.iter_audio_scores(model, None, dev, [None, 0, 1], scorer="nll", metric="nll"))
    for c in got:
        m = copy.deepcopy(model)
        if c is not None:
            surgery.drop_layers(m, [], audio_remove=[c])
            acfg, field = surgery.audio_config(m)
            assert getattr(acfg, field) == 1
            if kind == "granite_speech":      # the encoder's own cached count follows (it places the CTC branch)
                assert m.model.encoder.num_layers == 1
        assert got[c].score == pytest.approx(reference_nll(m.eval(), env, proc), rel=1e-6), c
    # an audio candidate changes the score (the scan is not scoring the unchanged model). Not every one must:
    # without tiny Granite's audio layer 0 its audio embeddings move by ~5e-4, yet its random decoder barely
    # attends to them and the label logits move by ~2e-6, under the fp32 resolution of a summed loss of ~190
    # (~1.5e-5); on an AVX512/AMX Xeon that rounds to a bit-identical nll, by the scan and surgery alike
    assert len({round(s.score, 7) for s in got.values()}) >= 2, {c: s.score for c, s in got.items()}
    bi = S.audio_block_influence(model, dev)
    assert sorted(bi.layer) == [0, 1] and all(v > 0 for v in bi.layer.values())
    if kind == "voxtral":                  # no mask: every frame of every chunk (a clip's zero padding included)
        chunks = sum(b.features["input_features"].shape[0] for b in dev.batches)
        assert bi.n_tokens == chunks * model.config.audio_config.max_source_positions
    if kind == "qwen2_5_omni":                                           # the Omni thinker packs valid frames
        frames = 0
        for b in dev.batches:
            after_conv, _ = model.model.audio_tower._get_feat_extract_output_lengths(
                b.features["feature_attention_mask"].sum(-1))
            frames += int(after_conv.sum())
        assert bi.n_tokens == frames                                     # every valid frame, no padding


def test_lora_trains_adapters_outside_the_vision_tower(env, loaded, kind):
    """all-linear LoRA wraps the decoder and the audio encoder but never the vision tower (speech never runs
    it); one backward of the label loss reaches every adapter on the audio path."""
    import copy

    from engine.config import LoraConfig
    from engine.data.prompt import IGNORE
    from engine.models.load import apply_lora, lora_targets

    fam = families.get(kind)
    model, proc, _ = loaded
    m = copy.deepcopy(model)

    def parts(n):
        return set(n.split("."))

    names = lora_targets(m, LoraConfig(r=4))
    assert names and not any(parts(n) & set(fam.unused_modules) for n in names)
    assert any(parts(n) & set(fam.encoder_modules) for n in names)
    assert any(not parts(n) & set(fam.encoder_modules) for n in names)          # the decoder's
    no_tower = lora_targets(m, LoraConfig(r=4, include_audio_tower=False))
    assert not any(parts(n) & set(fam.encoder_modules) for n in no_tower)
    peft = apply_lora(m, LoraConfig(r=4))
    peft.train()
    _, fb = next(reference_batches(env, proc))
    logits = peft(**model_inputs(fb)).logits
    y = fb["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][y != IGNORE].float(), y[y != IGNORE])
    loss.backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    assert grads and not any(parts(n) & set(fam.unused_modules) for n in grads)
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)

def _merged_on_load(cls, d, base, adapter, tmp_path):
    """The engine's model of ``d`` equals the model at ``base`` with the adapter at ``adapter`` switched on (peft),
    carries no LoRA layers (so surgery accepts it), and a pruned save reloads in plain transformers equal to the
    merged reference pruned alike. Returns (the engine's model, the model without the adapter, the pruned save)."""
    from peft import PeftModel

    from engine.config import ModelConfig
    from engine.models.load import load_model, load_processor

    proc = load_processor(d)
    inp = audio_prompt_batch(d, proc)
    on = PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32), adapter).eval()
    plain = cls.from_pretrained(base, dtype=torch.float32).eval()
    m = load_model(ModelConfig(path=str(d), dtype="fp32"))
    assert not any("lora_" in n for n, _ in m.named_modules())
    with torch.no_grad():
        want, got, without = on(**inp).logits, m(**inp).logits, plain(**inp).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - without).abs().max() > 1e-3                            # the adapter changes the model
    surgery.drop_layers(m, [1])
    out = surgery.save_pruned(m, tmp_path / "pruned", proc)
    re = cls.from_pretrained(out, dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32), adapter).merge_and_unload()
    surgery.drop_layers(ref, [1])
    with torch.no_grad():
        torch.testing.assert_close(re(**inp).logits, ref.eval()(**inp).logits, rtol=1e-5, atol=1e-5)
    return m, plain, out


def test_phi4_speech_lora_is_merged_on_load_and_pruning_keeps_it(tmp_path):
    """A Phi-4-multimodal directory with its speech LoRA in speech-lora/: merged when the engine loads it, and a
    pruned save holds the merged weights without the adapter folder."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    from engine.models.tiny import build_tiny

    d = build_tiny("phi4_multimodal", tmp_path / "phi", num_layers=3, dtype="fp32", seed=1)
    cls = families.get("phi4_multimodal").model_cls()
    base = cls.from_pretrained(d, dtype=torch.float32)
    torch.manual_seed(0)
    targets = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"
    lora = get_peft_model(base, PeftLora(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    lora.save_pretrained(d / "speech-lora")
    _, _, out = _merged_on_load(cls, d, d, d / "speech-lora", tmp_path)
    assert not (out / "speech-lora").exists()


def test_granite_audio_lora_beside_the_weights_is_merged_on_load(tmp_path):
    """A Granite Speech directory whose audio LoRA sits beside its weights (adapter_config.json next to
    config.json, as the hub ships it): transformers attaches it on load and the engine merges it (has_lora_adapter
    then False), and a pruned save holds the merged weights without adapter files. Without the adapter attached
    (no peft) the load is refused with the fix instead of silently dropping it."""
    import shutil

    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    from engine.models.families import granite_speech
    from engine.models.tiny import build_tiny

    d = build_tiny("granite_speech", tmp_path / "granite", num_layers=3, dtype="fp32", seed=1)
    plain_dir = tmp_path / "plain"
    shutil.copytree(d, plain_dir)
    cls = families.get("granite_speech").model_cls()
    torch.manual_seed(0)
    targets = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
    lora = get_peft_model(cls.from_pretrained(plain_dir, dtype=torch.float32),
                          PeftLora(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    lora.save_pretrained(d)                                   # adapter_config.json + weights beside config.json
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, has_lora_adapter=True)))
    m, plain, out = _merged_on_load(cls, d, plain_dir, d, tmp_path)
    assert m.config.has_lora_adapter is False and not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["has_lora_adapter"] is False
    with pytest.raises(RuntimeError, match=r"adapter_config.json.*install peft"):
        granite_speech.prepare(plain, d)                     # a model the adapter was not attached to


def test_processor_refuses_text_and_audio_that_do_not_pair(loaded):
    """A prompt without the audio placeholder (or with more placeholders than clips) is refused, naming both
    counts, instead of feeding the model audio it has no positions for."""
    _, proc, _ = loaded
    wave = torch.zeros(8000).numpy()
    with pytest.raises(ValueError, match=r"0 .* placeholders in the text but 1 audio clips"):
        proc(["no placeholder here"], audio=[wave], sampling_rate=16000)
    with pytest.raises(ValueError, match=r"2 .* placeholders in the text but 1 audio clips"):
        proc([f"a{proc.audio_token}b{proc.audio_token}"], audio=[wave], sampling_rate=16000)


def test_granite_features_refuse_another_sample_rate_and_pickle():
    """Granite's features need 16 kHz audio: another rate is refused naming both rates (resampling is the data
    stage's job); the extractor pickles by reference, as DataLoader workers may need it to."""
    import pickle

    import numpy as np

    from engine.models.families import granite_speech

    fe = granite_speech.GraniteMelFeatures()
    with pytest.raises(ValueError, match=r"16000 Hz audio, got 8000 Hz"):
        fe([np.zeros(8000, dtype=np.float32)], sampling_rate=8000)
    assert type(pickle.loads(pickle.dumps(fe))) is granite_speech.GraniteMelFeatures



def test_voxtral_sequences_equal_mistral_common(tmp_path):
    """The engine renders Voxtral's v7 instruct format as text and re-tokenizes it with the fast tokenizer transformers
    converts from tekken.json; mistral-common encodes the same conversations from its own request objects. The ids
    agree for an audio prompt with its answer (no system turn: v7 refuses one beside audio), for the generation prompt,
    and for a text-only prompt with a system turn; the label mask covers exactly the answer and </s>."""
    import numpy as np
    from mistral_common.protocol.instruct.chunk import AudioChunk, TextChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.audio import Audio
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from engine.data.prompt import IGNORE, Featurizer
    from engine.models.load import load_processor
    from engine.models.tiny import build_tiny

    d = build_tiny("voxtral", tmp_path / "voxtral", num_layers=2, dtype="fp32")
    proc = load_processor(d)
    fz = Featurizer(proc)
    mt = MistralTokenizer.from_file(str(d / "tekken.json"), mode=ValidationMode.finetuning)   # with answers
    serve = MistralTokenizer.from_file(str(d / "tekken.json"))                                # generation prompts
    rng = np.random.RandomState(0)
    waves = [(rng.randn(n) * 0.1).astype(np.float32) for n in (12000, 32000, 50000)]
    rows = [("en", "de", "Guten Morgen, wie geht es dir?"), ("en", "zh", "今天天气很好。"), ("en", "de", "Danke!")]
    samples = [{"key": f"s{i}", "meta": {"src_lang": s, "tgt_lang": t, "tgt_text": y, "src_text": "Thank you!"},
                "audio": w, "sample_rate": 16000} for i, (w, (s, t, y)) in enumerate(zip(waves, rows))]
    batch = fz(samples)
    b = fz.builder
    for i, (w, (s, t, y)) in enumerate(zip(waves, rows)):
        audio = AudioChunk.from_audio(Audio(w, 16000, "wav"))
        user = UserMessage(content=[audio, TextChunk(text=b.user_text(s, t, audio=True))])
        want = mt.encode_chat_completion(ChatCompletionRequest(messages=[user, AssistantMessage(content=y)])).tokens
        prompt = serve.encode_chat_completion(ChatCompletionRequest(messages=[user])).tokens
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == want
        labels = batch["labels"][i, :n].tolist()
        assert labels[:len(prompt)] == [IGNORE] * len(prompt) and labels[len(prompt):] == want[len(prompt):]
        assert want[-1] == proc.tokenizer.convert_tokens_to_ids("</s>")
    # a text-only row keeps its system turn ([SYSTEM_PROMPT] ... [/SYSTEM_PROMPT])
    text = fz([dict(samples[0], audio=None)])
    msgs = [SystemMessage(content=b.cfg.system_prompt),
            UserMessage(content=b.user_text("en", "de", audio=False, src_text="Thank you!")),
            AssistantMessage(content=rows[0][2])]
    assert text["input_ids"][0].tolist() == mt.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens
    # transformers' own VoxtralProcessor (mistral-common tokenizer) loads the saved directory and gives the same prompt
    # ids and features (audio handed over as float wav: 16-bit PCM would round the samples)
    import base64
    import io

    import soundfile as sf
    from transformers import AutoProcessor

    real = AutoProcessor.from_pretrained(d)
    fe = proc.feature_extractor
    for i, w in enumerate(waves):
        buf = io.BytesIO()
        sf.write(buf, w, 16000, format="wav", subtype="FLOAT")
        conv = [{"role": "user", "content": [{"type": "audio", "base64": base64.b64encode(buf.getvalue()).decode()},
                                             {"type": "text", "text": b.user_text(*rows[i][:2], audio=True)}]}]
        out = real.apply_chat_template(conv, processor_kwargs={"audio_kwargs": {
            "max_source_positions": fe.nb_max_frames, "pad_to_multiple_of": fe.n_samples}})
        mine = fz([samples[i]])
        p = out["input_ids"].shape[1]
        assert out["input_ids"][0].tolist() == mine["input_ids"][0, :p].tolist()
        assert torch.equal(out["input_features"], mine["input_features"])


def test_voxtral_vocabulary_trim_is_refused(tmp_path):
    """A trimmed tokenizer.json beside the full tekken.json would give mistral-common users other ids: refused."""
    from engine.models.tiny import build_tiny
    from engine.models.vocab import VocabTrimError, trim_model_dir

    d = build_tiny("voxtral", tmp_path / "voxtral", num_layers=2, dtype="fp32")
    with pytest.raises(VocabTrimError, match="tekken.json"):
        trim_model_dir(d, tmp_path / "trimmed", ["Guten Morgen."])


def test_memory_counts_the_familys_audio_tokens(loaded, kind):
    """The memory estimates count a clip's decoder tokens at the family's own rate (Granite 10/s, Phi-4 12.5/s, Voxtral
    12.5/s over whole 30-s windows on the hub, the Omni thinker Whisper's 25/s): against what its processor writes."""
    import numpy as np

    from engine import memory

    model, proc, _ = loaded
    dims = memory.dims_of(model.config)
    for seconds in (0.7, 1.0, 2.5):
        wave = (np.random.RandomState(0).randn(int(seconds * 16000)) * 0.1).astype(np.float32)
        ids = proc([f"a{proc.audio_token}x"], audio=[wave], sampling_rate=16000)["input_ids"][0].tolist()
        got = ids.count(proc.audio_token_id)
        est = memory.audio_tokens(seconds, dims)
        tol = {"granite_speech": 3, "phi4_multimodal": 1}.get(kind, 0)   # rate estimates vs whole windows / rounding
        assert abs(est - got) <= tol, (seconds, est, got)


def test_voxtral_processor_refuses_bad_input_and_pickles(tmp_path):
    """Audio at another sample rate is refused naming both rates; a directory without tekken.json or tokenizer.json is
    refused naming the directory; the processor pickles (DataLoader workers started by spawn need it)."""
    import pickle
    import shutil

    import numpy as np

    from engine.models.families import voxtral
    from engine.models.load import load_processor
    from engine.models.tiny import build_tiny

    d = build_tiny("voxtral", tmp_path / "voxtral", num_layers=2, dtype="fp32")
    proc = load_processor(d)
    with pytest.raises(ValueError, match="16000 Hz audio, got 8000 Hz"):
        proc(["a[AUDIO]x"], audio=[np.zeros(8000, np.float32)], sampling_rate=8000)
    again = pickle.loads(pickle.dumps(proc))
    wave = np.zeros(16000, np.float32)
    assert again(["a[AUDIO]x"], audio=[wave], sampling_rate=16000)["input_ids"].tolist() == \
        proc(["a[AUDIO]x"], audio=[wave], sampling_rate=16000)["input_ids"].tolist()
    bare = tmp_path / "bare"
    shutil.copytree(d, bare)
    (bare / "tekken.json").unlink()
    (bare / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{bare}: a Voxtral checkpoint needs tekken.json"):
        voxtral.load_tokenizer(bare)
