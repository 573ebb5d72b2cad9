"""Vocabulary trimming (engine.models.vocab) on tiny models built here: the real Qwen vocabulary for a
text LM, the tiny byte-level BPE for Qwen2-Audio, tied embeddings, and the refusals.

Reference checks: every trimmed encoding is compared with the original tokenizer's encoding mapped
through the kept ids, and every trimmed model's logits with the original's logits gathered at the
kept ids.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.models import vocab as V
from engine.models.tiny import build_tiny

SYSTEM = "You are a professional translator."
TEXT_INSTRUCTION = "Translate the following {src} text into {tgt}:"
SPEECH_INSTRUCTION = "Translate the {src} speech into {tgt}:"
NAMES = {"en": "English", "de": "German", "zh": "Chinese"}

# (en, de, zh) triples, written for this test
SENTENCES = [
    ("The conference room is on the second floor.", "Der Konferenzraum befindet sich im zweiten Stock.",
     "会议室在二楼。"),
    ("Could you repeat the last sentence more slowly?", "Könnten Sie den letzten Satz langsamer wiederholen?",
     "你能把最后一句话说得慢一点吗？"),
    ("Our flight was delayed by two hours because of the storm.",
     "Unser Flug hatte wegen des Sturms zwei Stunden Verspätung.",
     "由于暴风雨，我们的航班延误了两个小时。"),
]
# unseen scripts, accents and an emoji: must still encode (smaller pieces) and decode exactly
HELD_OUT = "Žluťoučký kůň úpěl ďábelské ódy; ещё 42 ℃ в Токио 🚀 東京タワー!"


def _corpus_and_prompts(tok) -> tuple[list[str], list[str]]:
    """Plain sentences, and the chat sequences (prompt + translation) the engine's prompt renders."""
    plain = [s for triple in SENTENCES for s in triple]
    chats = []
    for triple in SENTENCES:
        row = dict(zip(("en", "de", "zh"), triple))
        for tgt in ("de", "zh"):
            user = TEXT_INSTRUCTION.format(src=NAMES["en"], tgt=NAMES[tgt]) + "\n" + row["en"]
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                    {"role": "assistant", "content": row[tgt]}]
            chats.append(tok.apply_chat_template(msgs, tokenize=False))
    return plain, chats


def _generation_prompts(tok) -> list[str]:
    out = []
    for en, _, _ in SENTENCES:
        user = TEXT_INSTRUCTION.format(src="English", tgt="German") + "\n" + en
        out.append(tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                           tokenize=False, add_generation_prompt=True))
    return out


def _raw(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


def _kept(dst: Path) -> list[int]:
    return json.loads((dst / "vocab_map.json").read_text())["kept"]


# --------------------------------------------------------------------------------------------------
# The real Qwen vocabulary, text LM
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_trim(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vocab_qwen")
    src = build_tiny("causal_lm", root / "src", tokenizer="qwen", num_layers=2, hidden_size=32, intermediate_size=64,
                               dtype="fp32")
    tok = AutoTokenizer.from_pretrained(src)
    plain, chats = _corpus_and_prompts(tok)
    corpus = plain + chats
    summary = V.trim_model_dir(src, root / "dst", corpus, verify={"dev": [HELD_OUT, plain[0]]})
    return src, root / "dst", corpus, summary


def test_qwen_trim_tokenizer_and_config(qwen_trim):
    src, dst, corpus, summary = qwen_trim
    old, new = _raw(src), _raw(dst)
    kept = _kept(dst)
    n = len(kept)
    assert summary["old_tokens"] == 151649 and summary["new_tokens"] == n == new.get_vocab_size()
    assert n < 0.01 * summary["old_tokens"], summary
    assert summary["new_rows"] == n and summary["padded_rows"] == 0
    assert summary["embedding_bytes_after"] < summary["embedding_bytes_before"] / 100
    assert kept == sorted(kept)
    # the same token strings, in the old order
    assert [new.id_to_token(i) for i in range(n)] == [old.id_to_token(k) for k in kept]

    # reference: every corpus sentence = the old encoding mapped through the kept ids
    to_new = {o: i for i, o in enumerate(kept)}
    for text in corpus:
        o = old.encode(text, add_special_tokens=False).ids
        assert new.encode(text, add_special_tokens=False).ids == [to_new[i] for i in o], text

    # held out: some of its old tokens are gone; it still encodes, into more pieces, and decodes exactly
    o = old.encode(HELD_OUT, add_special_tokens=False).ids
    nw = new.encode(HELD_OUT, add_special_tokens=False).ids
    assert any(i not in to_new for i in o)
    assert len(nw) > len(o)
    assert new.decode(nw, skip_special_tokens=False) == HELD_OUT
    dev = summary["verify"]["dev"]
    assert (dev["sentences"], dev["same"], dev["differ"]) == (2, 1, 1) and dev["examples"] == [HELD_OUT]
    assert summary["corpus"]["differ"] == 0
    assert summary["corpus"]["sentences"] == len(corpus) + summary["template_texts"]

    # config and generation ids follow the tokens
    cfg = json.loads((dst / "config.json").read_text())
    gen = json.loads((dst / "generation_config.json").read_text())
    im_end, eot = new.token_to_id("<|im_end|>"), new.token_to_id("<|endoftext|>")
    assert cfg["vocab_size"] == n and cfg["eos_token_id"] == im_end and cfg["pad_token_id"] == eot
    assert gen["eos_token_id"] == [im_end, eot] and gen["pad_token_id"] == eot
    assert all(new.token_to_id(t) is not None for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                                                        "<|im_start|>"))
    vm = json.loads((dst / "vocab_map.json").read_text())
    assert (vm["old_vocab_size"], vm["new_vocab_size"]) == (151680, n)
    assert vm["corpus_sentences"] == len(corpus)
    assert not list(dst.parent.glob(".dst.tmp-*"))


def test_qwen_trimmed_model_logits_and_greedy(qwen_trim):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    src, dst, _, _ = qwen_trim
    kept = _kept(dst)
    to_new = {o: i for i, o in enumerate(kept)}
    old_m = AutoModelForCausalLM.from_pretrained(src).eval()
    new_m = AutoModelForCausalLM.from_pretrained(dst).eval()
    old_t, new_t = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(dst)
    assert new_m.get_input_embeddings().weight.shape[0] == len(kept) == len(new_t)
    index = torch.tensor(kept)

    class KeptOnly(LogitsProcessor):
        def __call__(self, input_ids, scores):
            mask = torch.full_like(scores, float("-inf"))
            mask[:, index] = 0
            return scores + mask

    unconstrained_same = unconstrained_other = 0
    for prompt in _generation_prompts(old_t):
        o_ids = old_t(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_ids = new_t(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert n_ids[0].tolist() == [to_new[i] for i in o_ids[0].tolist()]
        with torch.no_grad():
            lo, ln = old_m(o_ids).logits, new_m(n_ids).logits
        assert ln.shape[-1] == len(kept)
        assert torch.allclose(ln, lo[..., index], atol=1e-5, rtol=1e-5)

        gen = dict(max_new_tokens=4, do_sample=False)
        with torch.no_grad():
            o_free = old_m.generate(o_ids, **gen)[0, o_ids.shape[1]:].tolist()
            only_kept = LogitsProcessorList([KeptOnly()])
            o_kept = old_m.generate(o_ids, logits_processor=only_kept, **gen)[0, o_ids.shape[1]:]
            n_out = new_m.generate(n_ids, **gen)[0, n_ids.shape[1]:].tolist()
        # greedy over the kept ids of the original model = greedy of the trimmed model, same text
        assert n_out == [to_new[i] for i in o_kept.tolist()]
        assert new_t.decode(n_out) == old_t.decode(o_kept.tolist())
        if all(i in to_new for i in o_free):
            assert n_out == [to_new[i] for i in o_free]
            unconstrained_same += 1
        else:
            unconstrained_other += 1
    # a random model's free choice mostly lands outside the kept 0.3% of the vocabulary
    assert unconstrained_same + unconstrained_other == len(SENTENCES)
    print(f"unconstrained greedy: {unconstrained_same} identical, {unconstrained_other} chose an unkept token")


def _check_trace(raw, ranks: dict, texts: list[str]) -> int:
    """bpe_trace vs the `tokenizers` BPE model on every pre-token of ``texts`` that BPE has to build
    (a pre-token in the vocabulary is emitted whole under ignore_merges); returns how many."""
    vocab = raw.get_vocab()
    n = 0
    for text in texts:
        for word, _ in raw.pre_tokenizer.pre_tokenize_str(raw.normalizer.normalize_str(text)):
            if word in vocab and raw.model.ignore_merges:
                continue
            final, made = V.bpe_trace(list(word), ranks)
            assert final == [t.value for t in raw.model.tokenize(word)], word
            assert all(m in vocab for m in made)
            n += 1
    return n


def test_merge_closure_is_needed(qwen_trim):
    """The Qwen vocabulary writes every split of a token as a merge rule: the reference BPE still
    segments like `tokenizers`, and without the merge closure the corpus no longer encodes the same
    (the strict check says so)."""
    from tokenizers import pre_tokenizers

    src, dst, corpus, _ = qwen_trim
    tj, old = V._load_tokenizer(src / "tokenizer.json")
    ranks = {p: r for r, p in enumerate(V._merge_pairs(tj["model"]["merges"]))}
    assert _check_trace(old, ranks, corpus + [HELD_OUT]) > 20

    full = V.keep_ids(tj, corpus)
    assert full.reasons["merges"] > 0 and set(full.ids) <= set(_kept(dst))
    corpus_ids = {i for e in old.encode_batch(corpus, add_special_tokens=False) for i in e.ids}
    base = {tj["model"]["vocab"][s] for s in pre_tokenizers.ByteLevel.alphabet()}
    base |= {t["id"] for t in tj["added_tokens"]}
    no_closure = V.KeepSet(tuple(sorted(corpus_ids | base)), full.old_size, {})
    assert set(no_closure.ids) < set(full.ids)
    new = V._load_tokenizer(V.trim_tokenizer_json(tj, no_closure))[1]
    with pytest.raises(V.VocabTrimError, match="encode differently after trimming"):
        V._compare(old, new, no_closure, corpus, "corpus", strict=True)
    ok = V._load_tokenizer(V.trim_tokenizer_json(tj, full))[1]
    assert V._compare(old, ok, full, corpus, "corpus", strict=True)["differ"] == 0


def test_bpe_trace_matches_tokenizers_bpe():
    """Same check on the trained tiny BPE (one rule per token, no ignore_merges)."""
    from engine.models.tiny import build_bpe_tokenizer

    raw = build_bpe_tokenizer().backend_tokenizer
    tj = json.loads(raw.to_str())
    ranks = {p: r for r, p in enumerate(V._merge_pairs(tj["model"]["merges"]))}
    assert _check_trace(raw, ranks, [s for triple in SENTENCES for s in triple] + [HELD_OUT]) > 30


# --------------------------------------------------------------------------------------------------
# Qwen2-Audio (tiny BPE), tied embeddings, refusals
# --------------------------------------------------------------------------------------------------

def _audio_prompt(proc) -> str:
    user = [{"type": "audio", "audio_url": "a"},
            {"type": "text", "text": SPEECH_INSTRUCTION.format(src="English", tgt="German")}]
    return proc.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                    tokenize=False, add_generation_prompt=True)


def test_qwen2audio_trim_reload_and_audio_forward(tmp_path):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    src = build_tiny("qwen2audio", tmp_path / "src", tokenizer="bpe", num_layers=2, audio_layers=1,
                                audio_seconds=2, dtype="fp32")
    old_p = AutoProcessor.from_pretrained(src)
    plain, chats = _corpus_and_prompts(old_p.tokenizer)
    prompt = _audio_prompt(old_p)
    summary = V.trim_model_dir(src, tmp_path / "dst", plain + chats + [prompt])
    dst = tmp_path / "dst"
    kept = _kept(dst)
    to_new = {o: i for i, o in enumerate(kept)}
    assert summary["new_rows"] == len(kept) < summary["old_rows"]

    new_p = AutoProcessor.from_pretrained(dst)
    new_m = Qwen2AudioForConditionalGeneration.from_pretrained(dst).eval()
    old_m = Qwen2AudioForConditionalGeneration.from_pretrained(src).eval()
    cfg = json.loads((dst / "config.json").read_text())
    audio_id = new_p.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert cfg["audio_token_index"] == audio_id == new_m.config.audio_token_id
    assert audio_id == to_new[old_p.tokenizer.convert_tokens_to_ids("<|AUDIO|>")]
    assert cfg["text_config"]["vocab_size"] == len(kept)

    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    o_in = old_p(text=[prompt], audio=[wave], sampling_rate=16000, return_tensors="pt")
    n_in = new_p(text=[prompt], audio=[wave], sampling_rate=16000, return_tensors="pt")
    assert (n_in["input_ids"] == audio_id).sum() > 1   # expanded to one token per audio frame
    assert n_in["input_ids"][0].tolist() == [to_new[i] for i in o_in["input_ids"][0].tolist()]
    assert torch.equal(n_in["input_features"], o_in["input_features"])
    with torch.no_grad():
        lo, ln = old_m(**o_in).logits, new_m(**n_in).logits
    assert torch.allclose(ln, lo[..., torch.tensor(kept)], atol=1e-5, rtol=1e-5)


def _tie(src: Path) -> None:
    """Make a saved tiny LM tied like Qwen2.5-0.5B: no lm_head.weight in the checkpoint."""
    from safetensors.torch import load_file, save_file

    path = src / "model.safetensors"
    state = load_file(path)
    state.pop("lm_head.weight")
    save_file(state, path, metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))


def test_tied_embeddings(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_tiny("causal_lm", tmp_path / "src", tokenizer="bpe", num_layers=1, dtype="fp32")
    _tie(src)
    old_m = AutoModelForCausalLM.from_pretrained(src).eval()
    assert old_m.lm_head.weight is old_m.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(src)
    plain, chats = _corpus_and_prompts(tok)
    summary = V.trim_model_dir(src, tmp_path / "dst", plain + chats, multiple_of=64)
    dst = tmp_path / "dst"
    kept = _kept(dst)
    n, rows = len(kept), summary["new_rows"]
    assert summary["tied"] and rows % 64 == 0 and rows - n == summary["padded_rows"] > 0
    assert summary["embedding_bytes_after"] == rows * 64 * 4    # one fp32 matrix, hidden 64
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    new_m = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert new_m.lm_head.weight is new_m.model.embed_tokens.weight
    assert torch.count_nonzero(new_m.lm_head.weight[n:]) == 0
    gen = json.loads((dst / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(n, rows))   # padded rows can never be generated

    new_t = AutoTokenizer.from_pretrained(dst)
    ids_o = tok(chats[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids_n = new_t(chats[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lo, ln = old_m(ids_o).logits, new_m(ids_n).logits
    assert torch.allclose(ln[..., :n], lo[..., torch.tensor(kept)], atol=1e-5, rtol=1e-5)
    out = new_m.generate(ids_n, max_new_tokens=5, do_sample=False)[0, ids_n.shape[1]:]
    assert int(out.max()) < n


@pytest.fixture
def bpe_src(tmp_path) -> Path:
    return build_tiny("causal_lm", tmp_path / "src", tokenizer="bpe", num_layers=1, hidden_size=32,
                                intermediate_size=32, dtype="fp32")


def test_refuses_unkept_config_id(bpe_src, tmp_path):
    corpus = ["Der Zug fährt um neun Uhr."]
    keep = V.keep_ids(bpe_src / "tokenizer.json", corpus)
    vocab = json.loads((bpe_src / "tokenizer.json").read_text())["model"]["vocab"]
    dropped = max(i for i in vocab.values() if i not in set(keep.ids))
    cfg = json.loads((bpe_src / "config.json").read_text())
    cfg["bos_token_id"] = dropped
    (bpe_src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(V.VocabTrimError, match=rf"config\.json:bos_token_id is token id {dropped}, which the "
                                               r"trimmed vocabulary does not keep"):
        V.trim_model_dir(bpe_src, tmp_path / "dst", corpus)
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst.tmp-*"))


def test_refuses_quantized_and_existing_dst(bpe_src, tmp_path):
    q = tmp_path / "quant"
    shutil.copytree(bpe_src, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(V.VocabTrimError, match="quantized model .*trim the vocabulary of the unquantized model first"):
        V.trim_model_dir(q, tmp_path / "dst", ["hello"])
    (tmp_path / "dst").mkdir()
    with pytest.raises(V.VocabTrimError, match="exists; remove it or pass overwrite=True"):
        V.trim_model_dir(bpe_src, tmp_path / "dst", ["hello"])
    with pytest.raises(V.VocabTrimError, match="not over its source"):
        V.trim_model_dir(bpe_src, bpe_src, ["hello"], overwrite=True)


# --------------------------------------------------------------------------------------------------
# Trimming by script: exact for any text in the kept scripts
# --------------------------------------------------------------------------------------------------

def _random_texts(alphabet: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list(alphabet), size=int(rng.integers(1, 9)))) for _ in range(n * 6)]
    seps = [" ", ", ", ". ", " - ", "\n", "? ", " 42 ", "! "]
    return [" ".join(words[i:i + 6]) + seps[i % len(seps)] for i in range(0, len(words), 6)]


@pytest.fixture(scope="module")
def qwen_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_scripts")
    return build_tiny("causal_lm", root / "src", tokenizer="qwen", num_layers=1, hidden_size=32, intermediate_size=64,
                                dtype="fp32")


@pytest.mark.parametrize("scripts,exact,fallback", [
    (("LATIN",), "de", "zh"),
    (("LATIN", "CJK"), "zh", "ru"),
])
def test_script_trim_encodes_any_text_of_its_scripts_exactly(qwen_src, tmp_path, scripts, exact, fallback):
    """Trimmed to one English sentence plus the scripts' tokens (Qwen2's real vocabulary), text never seen in
    the corpus encodes to the same tokens (mapped ids) when it is written in those scripts, random strings
    included; text in another script still encodes (smaller pieces) and decodes back."""
    from transformers import AutoTokenizer

    corpus = [SENTENCES[0][0]]
    summary = V.trim_model_dir(qwen_src, tmp_path / "dst", corpus, scripts=scripts)
    assert summary["scripts"] == list(scripts)
    kept = _kept(tmp_path / "dst")
    old_to_new = {o: i for i, o in enumerate(kept)}
    only_corpus = len(V.keep_ids(AutoTokenizer.from_pretrained(qwen_src), corpus + V.template_texts(
        AutoTokenizer.from_pretrained(qwen_src))))
    assert only_corpus < 2000 < summary["new_tokens"] < summary["old_tokens"]
    old, new = _raw(qwen_src), _raw(tmp_path / "dst")
    alphabets = {"de": "abcdefghijklmnopqrstuvwxyzäöüßABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÜéèêçñ",
                 "zh": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴切"
                             "，。？！",
                 "ru": "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЭЮЯ"}
    texts = _random_texts(alphabets[exact], 60, seed=len(scripts)) + [s for t in SENTENCES
                                                                      for s in (t if exact == "zh" else t[:2])]
    for t in texts:
        want = old.encode(t, add_special_tokens=False).ids
        assert all(i in old_to_new for i in want), t
        assert new.encode(t, add_special_tokens=False).ids == [old_to_new[i] for i in want], t
    differ = 0
    for t in _random_texts(alphabets[fallback], 20, seed=7):
        got = new.encode(t, add_special_tokens=False).ids
        want = old.encode(t, add_special_tokens=False).ids
        differ += got != [old_to_new.get(i, -1) for i in want]
        assert new.decode(got) == t
    assert differ > 0                                   # the other script really lost its tokens


@pytest.mark.parametrize("kind", ["qwen2_5_omni", "phi4_multimodal", "granite_speech"])
def test_audio_family_trim_remaps_placeholders_in_sub_configs(tmp_path, kind):
    """The other audio families trim like Qwen2-Audio: the trimmed model's logits equal the kept rows of the
    source's on a prompt with audio. Their placeholders may sit in sub-configs (Phi-4-multimodal's
    audio_config.audio_token_id, vision_config.image_token_id): every token-id field, nested ones included, is
    remapped; a sub-config with its own vocabulary (Granite's Q-Former) is left alone."""
    from engine.data.prompt import PromptBuilder
    from engine.models import families
    from engine.models.load import load_processor

    src = build_tiny(kind, tmp_path / "src", num_layers=2, dtype="fp32", audio_seconds=2)
    old_p = load_processor(src)
    prompt = PromptBuilder(old_p).prompt_text({"src_lang": "en", "tgt_lang": "de"}, audio=True)
    summary = V.trim_model_dir(src, tmp_path / "dst", ["hallo welt", "hello world", prompt + "hallo welt"])
    dst = tmp_path / "dst"
    kept = _kept(dst)
    to_new = {o: i for i, o in enumerate(kept)}
    assert summary["new_rows"] == len(kept) < summary["old_rows"]
    new_p = load_processor(dst)
    audio_id = new_p.tokenizer.convert_tokens_to_ids(new_p.audio_token)
    assert audio_id == to_new[old_p.tokenizer.convert_tokens_to_ids(old_p.audio_token)]
    old_cfg, new_cfg = (json.loads((d / "config.json").read_text()) for d in (src, dst))

    def ids(cfg, where=""):
        for k, v in cfg.items():
            if isinstance(v, dict):
                yield from ids(v, f"{where}{k}.")
            elif k.endswith(("_token_id", "_token_index")) and isinstance(v, int) and v >= 0:
                yield f"{where}{k}", v

    old_ids, new_ids = dict(ids(old_cfg)), dict(ids(new_cfg))
    own_vocab = {k for k in old_ids if k.startswith("projector_config.")}     # the Q-Former's own ids
    for k, v in old_ids.items():
        assert new_ids[k] == (v if k in own_vocab else to_new[v]), k
    if kind == "phi4_multimodal":
        assert new_cfg["audio_config"]["audio_token_id"] == audio_id
    cls = families.get(kind).model_cls()
    old_m, new_m = cls.from_pretrained(src).eval(), cls.from_pretrained(dst).eval()
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    o_in = old_p(text=[prompt], audio=[wave], sampling_rate=16000)
    n_in = new_p(text=[prompt], audio=[wave], sampling_rate=16000)
    assert n_in["input_ids"][0].tolist() == [to_new[i] for i in o_in["input_ids"][0].tolist()]
    with torch.no_grad():
        lo, ln = old_m(**o_in).logits, new_m(**n_in).logits
    assert torch.allclose(ln, lo[..., torch.tensor(kept)], atol=1e-5, rtol=1e-5)
