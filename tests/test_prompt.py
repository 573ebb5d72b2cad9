"""The paper's prompt and label mask, with the tiny models' processors (and the real Qwen vocabulary)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import DataConfig
from engine.data.prompt import IGNORE, Featurizer, PromptBuilder, PromptError

SR = 16000
DE = {"src_lang": "en", "tgt_lang": "de", "src_text": "The train to Berlin leaves from platform four.",
      "tgt_text": "Der Zug nach Berlin fährt von Gleis vier ab."}
ZH = {"src_lang": "en", "tgt_lang": "zh", "src_text": "Please give me a cup of coffee.",
      "tgt_text": "请给我一杯咖啡和一杯水。"}


@pytest.fixture(scope="module")
def tiny_qa(tmp_path_factory):
    """A tiny Qwen2-Audio (fp32, in memory) and its processor saved and reloaded as a user would."""
    from engine.data.prompt import load_processor
    from engine.models.tiny import make_tiny

    model, proc = make_tiny("qwen2audio", num_layers=1, audio_layers=1, dtype="fp32")
    d = tmp_path_factory.mktemp("tiny_qa")
    proc.save_pretrained(d)
    model.config.save_pretrained(d)  # config.json tells the loader it is Qwen2-Audio
    return model, load_processor(str(d))


@pytest.fixture(scope="module")
def qa_processor(tiny_qa):
    return tiny_qa[1]


@pytest.fixture(scope="module")
def lm_tokenizer(tmp_path_factory):
    from engine.data.prompt import load_processor
    from engine.models.tiny import build_tiny

    d = build_tiny("causal_lm", tmp_path_factory.mktemp("tiny_lm"), num_layers=1)
    return load_processor(str(d))


@pytest.fixture(scope="module")
def qwen_processor(tmp_path_factory):
    """The real 151k Qwen2 vocabulary with the tiny chat template (in memory; no model weights)."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    from engine.models.tiny import build_qwen_tokenizer, CHAT_TEMPLATE

    tok = build_qwen_tokenizer(tmp_path_factory.mktemp("qwen_vocab"))
    return Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
                               chat_template=CHAT_TEMPLATE)


def sample(meta, seconds=1.0, key="k1", pad=False, audio=True):
    wav = (0.1 * np.sin(2 * np.pi * 300 * np.arange(int(seconds * SR)) / SR)).astype(np.float32) if audio else None
    return {"key": key, "shard": "train-000000.tar", "index": 0, "meta": meta, "audio": wav, "sample_rate": SR,
            "pad": pad}


def check_sample(proc, batch, i, meta, *, audio=True):
    tok = getattr(proc, "tokenizer", proc)
    b = PromptBuilder(proc)
    n = int(batch["attention_mask"][i].sum())
    ids = batch["input_ids"][i, :n].tolist()
    labels = batch["labels"][i, :n].tolist()
    p = labels.index(next(x for x in labels if x != IGNORE))
    assert all(x == IGNORE for x in labels[:p]) and labels[p:] == ids[p:]
    # the masked part is exactly system + user + assistant header, as the template renders it
    prompt = b.prompt_text(meta, audio=audio)
    if audio:
        prompt = prompt.replace("<|AUDIO|>", "<|AUDIO|>" * batch["n_audio_tokens"][i])
    assert tok.decode(ids[:p]) == prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "You are a professional translator." in prompt
    # the labels are the reference and the closing <|im_end|>, nothing after it
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids[p:-1]) == meta["tgt_text"]
    assert all(x == IGNORE for x in batch["labels"][i, n:].tolist())   # right padding is never a label
    return p


@pytest.mark.parametrize("which", ["qa_processor", "qwen_processor"])
def test_label_mask_and_targets_de_zh(which, request):
    proc = request.getfixturevalue(which)
    f = Featurizer(proc)
    batch = f([sample(DE, 1.0, "de1"), sample(ZH, 2.5, "zh1")])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_features"].shape == (2, 128, 3000)
    assert batch["feature_attention_mask"].shape == (2, 3000)
    assert batch["keys"] == ["de1", "zh1"] and batch["pad"] == [False, False]
    check_sample(proc, batch, 0, DE)
    check_sample(proc, batch, 1, ZH)
    assert int(batch["attention_mask"][0].sum()) < batch["input_ids"].shape[1]  # right padding
    assert "into German:" in PromptBuilder(proc).prompt_text(DE, audio=True)
    assert "into Chinese:" in PromptBuilder(proc).prompt_text(ZH, audio=True)


@pytest.mark.parametrize("seconds,tokens", [(1.0, 25), (2.0, 50), (12.34, 308), (30.0, 750), (31.0, 750)])
def test_audio_token_expansion_matches_audio_length(qa_processor, seconds, tokens):
    batch = Featurizer(qa_processor)([sample(DE, seconds)])
    frames = int(batch["feature_attention_mask"][0].sum())
    assert frames == min(3000, int(np.ceil(seconds * SR / 160)))  # 10 ms hop, 30 s window
    assert batch["n_audio_tokens"] == [tokens]
    audio_id = qa_processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert int((batch["input_ids"][0] == audio_id).sum()) == tokens


def test_text_only_prompt_for_a_causal_lm(lm_tokenizer):
    f = Featurizer(lm_tokenizer)
    batch = f([sample(DE, audio=False, key="t1"), sample(ZH, audio=False, key="t2")])
    assert "input_features" not in batch
    for i, meta in enumerate((DE, ZH)):
        check_sample(lm_tokenizer, batch, i, meta, audio=False)
    text = PromptBuilder(lm_tokenizer).prompt_text(DE, audio=False)
    assert "Translate the following English text into German:\n" + DE["src_text"] in text
    assert "<|AUDIO|>" not in text


def test_audio_model_with_a_text_row_and_any_language(qa_processor):
    fr = dict(DE, tgt_lang="fr", tgt_text="Le train pour Berlin part du quai quatre.")
    batch = Featurizer(qa_processor)([sample(fr, 1.0, "a"), sample(DE, key="b", audio=False)])
    assert batch["input_features"].shape[0] == 1      # features only for the rows with audio
    assert batch["n_audio_tokens"] == [25, 0]
    check_sample(qa_processor, batch, 0, fr)
    check_sample(qa_processor, batch, 1, DE, audio=False)
    assert "Translate the English speech into French:" in PromptBuilder(qa_processor).prompt_text(fr, audio=True)


def test_config_drives_the_prompt(qa_processor):
    cfg = DataConfig(system_prompt="Be brief.", instruction="{src} -> {tgt}:")
    text = PromptBuilder(qa_processor, cfg).prompt_text(ZH, audio=True)
    assert "Be brief." in text and "English -> Chinese:" in text


def test_pad_sample_has_no_labels_and_empty_target_is_an_error(qa_processor):
    f = Featurizer(qa_processor)
    batch = f([sample(DE, key="real"), sample(DE, key="copy", pad=True)])
    assert batch["pad"] == [False, True]
    assert (batch["labels"][1] == IGNORE).all() and (batch["labels"][0] != IGNORE).any()
    with pytest.raises(PromptError, match="bad-key.*no label tokens"):
        f([sample(dict(DE, tgt_text=""), key="bad-key")])


def test_prefix_mismatch_is_refused(qa_processor, monkeypatch):
    b = PromptBuilder(qa_processor)
    ids = b.tokenize(b.prompt_text(DE, audio=False))
    real = b.tokenize
    monkeypatch.setattr(b, "tokenize", lambda text: [ids[0] + 1] + real(text)[1:])
    with pytest.raises(PromptError, match="k9.*does not start with the prompt ids"):
        b.encode(DE, ids, audio=False, key="k9")


def test_unknown_language_is_named(qa_processor):
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        Featurizer(qa_processor)([sample(dict(DE, tgt_lang="xx"))])


def test_batch_trains_the_tiny_model(tiny_qa):
    """The batch is what Qwen2AudioForConditionalGeneration takes; a pad sample changes no gradient."""
    from transformers import Qwen2AudioForConditionalGeneration

    model, proc = tiny_qa
    f = Featurizer(proc)

    def grads(samples):
        batch = f(samples)
        model.zero_grad()
        out = model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        (out.loss * n).backward()   # summed over label tokens, as the trainer normalises globally
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert isinstance(model, Qwen2AudioForConditionalGeneration)
    alone = grads([sample(DE, 1.0, "a")])
    with_pad = grads([sample(DE, 1.0, "a"), sample(ZH, 2.0, "p", pad=True)])
    assert torch.allclose(alone, with_pad, atol=1e-5)
