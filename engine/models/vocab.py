"""Vocabulary trimming of a byte-level BPE model (Qwen2 / Qwen2-Audio): keep only the tokens a task uses.

Why: in a 4-bit student the input embedding and the untied ``lm_head`` stay in the compute dtype and
dominate the bytes on disk (156,032 x 4096 rows each at the 7B shape, ~2.5 GB in bf16). A speech
translation student only ever reads and writes the tokens of its languages, so the rows of every
other token can go. Trim *before* quantizing (a quantized directory is refused).

API::

    keep_ids(tokenizer, texts, *, extra_ids=()) -> KeepSet
        The old ids to keep (see "What is kept"), in ascending order = the new order.
    script_ids(tokenizer, scripts) -> set[int]
        Every token written in the given Unicode scripts (see "Trimming by script").
    trim_tokenizer_json(tokenizer_json: dict, keep: KeepSet) -> dict
        tokenizer.json with only the kept tokens, re-indexed 0..n-1 in their old order.
    template_texts(tokenizer) -> list[str]
        The model's chat template rendered with empty contents (roles, "Audio 1: ", newlines).
    trim_model_dir(src, dst, texts, *, verify=None, multiple_of=1, template=True,
                   overwrite=False) -> dict
        A whole Hugging Face model directory; returns a summary (rows, bytes, verification counts).

What is kept (:func:`keep_ids`):

* every id that encoding ``texts`` produces (no special tokens added; texts may contain special
  token strings such as ``<|im_start|>``, which encode to their ids);
* every added/special token of ``tokenizer.json`` (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ``<|AUDIO|>``, ``<|audio_bos|>``, ``<|audio_eos|>``, ...);
* the 256 byte-level base symbols, so any UTF-8 text still encodes (it falls back to smaller pieces,
  down to single bytes) and decodes back;
* the merge closure: for each kept token, every intermediate token of the merge tree by which BPE
  builds it (see below), so BPE can still build it.

Why the trimmed tokenizer segments the corpus exactly as the original does. Hugging Face's BPE on
one pre-token repeatedly applies the adjacent pair whose merge rule has the lowest rank (leftmost
first on equal rank) until no adjacent pair has a rule. The trimmed merge list is a subsequence of
the original (a rule stays when its two halves and its result are kept), so ranks keep their order.
Suppose every rule the original applied on a pre-token is still present. At each step the original's
choice is the minimum over the applicable rules; the trimmed applicable rules are a subset that
contains that choice, so the trimmed run makes the same choice, and it stops when the original stops.
So it is enough to keep the rules actually *used*. Those are the rules of each final token's merge
tree, and that tree does not depend on the pre-token around it: no merge ever crosses a final token's
boundary, so the merges inside its span are exactly BPE run on the token's own symbols. We therefore
run a small pure-Python BPE (:func:`bpe_trace`, the same algorithm) on each corpus token alone and keep
every intermediate it creates. When the run does not end in the token itself, BPE can never build
that token and it was produced whole by ``ignore_merges`` (a pre-token that is a vocabulary entry is
emitted as it is); kept in the vocabulary, it is still emitted whole, and a pre-token that was not in
the old vocabulary is not in the new one either. This is what makes the closure correct for
:mod:`engine.models.qwen_vocab`, which writes *every* split of a token as a rule: keeping the halves
of all rules would drag in many unused tokens, keeping the first rule's halves could miss the one
used. The argument is checked anyway: :func:`trim_model_dir` re-encodes every corpus sentence with
both tokenizers and raises, naming the sentences, if one differs.

Trimming by script (``scripts``, from ``export.trim_languages``): the corpus rule is exact for the corpus
only. Keeping, in addition, every token whose bytes are text in the languages' scripts (plus the common
characters: ASCII, digits, punctuation, spaces, combining marks, symbols) or a piece of a multi-byte character makes
it exact for *any* text in those scripts (:func:`script_ids` has the argument). It keeps far more rows (for
the Qwen2 vocabulary, Latin 104,849 of 151,649 tokens, Latin + CJK 130,271) in exchange for no change to
any input or output in those languages.

Sentences outside the corpus (``verify`` groups: train/dev/test) may need a token that was dropped;
they then encode to smaller pieces (more tokens), never to an unknown token. They are counted, and
each must decode to what the original tokenizer decodes (the text itself for NFC input).

Weights: input-embedding and ``lm_head`` rows are gathered by old id (new row ``i`` = old row
``keep.ids[i]``); the modules are found through ``get_input_embeddings`` / ``get_output_embeddings``,
so Qwen2ForCausalLM and Qwen2AudioForConditionalGeneration (either transformers layout) work alike.
Tied embeddings (``tie_word_embeddings``, as Qwen2.5-0.5B) stay one matrix.

Padding (``multiple_of``): default 1, i.e. the table has exactly as many rows as tokens. Qwen pads
its table to a multiple (151,646 tokens in 156,032 rows), but its unused rows are trained weights,
while new padding rows would be zero, and a zero ``lm_head`` row gives logit 0, which beats a real
token whenever all real logits are negative: greedy decoding would emit an id that is no token.
transformers' Qwen2 does not need a padded table. With ``multiple_of`` > 1 (for matmul alignment)
the padding rows are zero and their ids are added to ``generation_config.suppress_tokens``, so
``generate`` masks them; any other decoding loop has to mask them itself.

Config ids: every ``*_token_id`` / ``*_token_ids`` / ``*_token_index`` field of config.json and of its
sub-configs, and of generation_config.json, is mapped to the new ids (``eos_token_id`` may be a list);
``suppress_tokens`` / ``begin_suppress_tokens`` drop ids that are gone. A field naming an id that is not
kept is an error that names the field. Sub-configs count because placeholders live there too
(Phi-4-multimodal's ``audio_config.audio_token_id``); a sub-config with its own ``vocab_size`` other than
``text_config`` (a Q-Former's, a talker's) indexes its own vocabulary and is left alone.

Files written: ``tokenizer.json`` (vocabulary, merges, added tokens, padding and post-processor ids;
normalizer, pre-tokenizer and decoder unchanged), ``tokenizer_config.json`` (``added_tokens_decoder``
re-keyed), ``vocab.json`` / ``merges.txt`` / ``added_tokens.json`` rewritten when the source has
them, the weights (``save_pretrained``, safetensors), config.json, generation_config.json,
``vocab_map.json`` (old/new sizes, ``kept``: old ids in new order, corpus size), and a copy of every
other top-level file (chat template, processor and feature extractor configs), except the engine's
``meta.json``, which describes the source and is the caller's to write.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .. import compat
from ..errors import StcError

_EXAMPLES = 3            # differing sentences quoted per group (in errors and in the summary)
_SUPPRESS_FIELDS = ("suppress_tokens", "begin_suppress_tokens")
_UNSUPPORTED_FIELDS = ("bad_words_ids", "force_words_ids", "forced_decoder_ids", "sequence_bias")
# Files this module writes itself; every other top-level file of the source is copied.
_OWN_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "added_tokens.json", "vocab_map.json", "meta.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth")


class VocabTrimError(StcError):
    """Trimming refused or failed its verification; the message names the field, file or sentence."""


# --------------------------------------------------------------------------------------------------
# Tokenizer side
# --------------------------------------------------------------------------------------------------

@dataclass
class KeepSet:
    """The old token ids to keep, ascending; position in ``ids`` is the new id.

    ``old_size``: ids in the old tokenizer (highest id + 1, added tokens included). ``reasons``: how
    many ids each rule contributed (an id counts under the first rule that kept it, in the order
    special, bytes, corpus, extra, merges).
    """
    ids: tuple[int, ...]
    old_size: int
    reasons: dict[str, int]
    old_to_new: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.old_to_new = {old: new for new, old in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def map(self, old_ids: Iterable[int]) -> list[int]:
        """Old ids -> new ids; ``KeyError`` for an id that was not kept."""
        return [self.old_to_new[int(i)] for i in old_ids]


def _load_tokenizer(tokenizer: Any) -> tuple[dict, Any]:
    """(tokenizer.json as a dict, ``tokenizers.Tokenizer``) from a dict, a path (file or model
    directory), a ``tokenizers.Tokenizer`` or a transformers fast tokenizer."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Mapping):
        return dict(tokenizer), Tokenizer.from_str(json.dumps(tokenizer))
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise VocabTrimError(f"{path} does not exist; vocabulary trimming needs the fast tokenizer's "
                                 "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            return json.load(f), Tokenizer.from_file(str(path))
    raw = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(raw, "to_str"):
        raise VocabTrimError(f"cannot read a tokenizer.json from {type(tokenizer).__name__}; pass a fast "
                             "tokenizer, a tokenizers.Tokenizer, a tokenizer.json dict or its path")
    return json.loads(raw.to_str()), raw


def _has_byte_level(pre: Any) -> bool:
    if not isinstance(pre, Mapping):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretokenizers") or [])


def _check_model(tj: Mapping[str, Any]) -> dict:
    """The BPE model section, after checking this is a byte-level BPE this module can trim."""
    from tokenizers import pre_tokenizers

    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabTrimError(f"the tokenizer model is {model.get('type')!r}; vocabulary trimming handles "
                             "byte-level BPE (Qwen2) only")
    problems = [f"{k}={model.get(k)!r}" for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix")
                if model.get(k)]
    if model.get("byte_fallback"):
        problems.append("byte_fallback=True")
    if problems:
        raise VocabTrimError(f"the BPE model sets {', '.join(problems)}; vocabulary trimming handles plain "
                             "byte-level BPE (Qwen2) only")
    if not _has_byte_level(tj.get("pre_tokenizer")):
        raise VocabTrimError("the tokenizer has no ByteLevel pre-tokenizer; without byte-level symbols a "
                             "trimmed vocabulary could not encode every text, so it is not trimmed")
    missing = [s for s in pre_tokenizers.ByteLevel.alphabet() if s not in model["vocab"]]
    if missing:
        raise VocabTrimError(f"{len(missing)} of the 256 byte-level symbols are not in the vocabulary "
                             f"(e.g. {missing[:3]}); byte fallback would be impossible after trimming")
    return model


def _merge_pairs(merges: Sequence[Any]) -> list[tuple[str, str]]:
    """Merge rules as pairs; tokenizer.json writes ``["a", "b"]`` (tokenizers >= 0.20) or ``"a b"``."""
    out = []
    for m in merges:
        if isinstance(m, str):
            left, right = m.split(" ")   # byte-level symbols never contain a raw space
            out.append((left, right))
        else:
            out.append((m[0], m[1]))
    return out


def bpe_trace(symbols: Sequence[str], ranks: Mapping[tuple[str, str], int]) -> tuple[list[str], list[str]]:
    """Reference BPE on one word: (final tokens, every token created by a merge, in merge order).

    Same algorithm as ``tokenizers``' BPE without dropout: apply the applicable pair of lowest rank,
    leftmost on a tie, until none applies. O(n^2) per merge; meant for single tokens.
    """
    syms = list(symbols)
    made: list[str] = []
    while len(syms) > 1:
        best, at = None, -1
        for i in range(len(syms) - 1):
            r = ranks.get((syms[i], syms[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        syms[at:at + 2] = [syms[at] + syms[at + 1]]
        made.append(syms[at])
    return syms, made


def _unicode_script(ch: str) -> str:
    import unicodedata

    return unicodedata.name(ch, "").split(" ", 1)[0]


def text_in_scripts(text: str, scripts: Iterable[str]) -> bool:
    """Whether every character of ``text`` is common (ASCII, digits, punctuation, spaces, combining marks,
    symbols such as currency signs and emoji: Unicode categories N, P, Z, M, S) or belongs to one of
    ``scripts`` (the first word of its Unicode name: ``LATIN``,
    ``CJK``, ``CYRILLIC``, ``HIRAGANA``, ...)."""
    import unicodedata

    allowed = set(scripts)
    for ch in text:
        if ch < "\x80" or unicodedata.category(ch)[0] in "NPZMS":
            continue
        if _unicode_script(ch) not in allowed:
            return False
    return True


def script_ids(tokenizer: Any, scripts: Iterable[str]) -> set[int]:
    """Ids of every vocabulary token whose bytes are text in ``scripts`` (:func:`text_in_scripts`) or no whole
    UTF-8 text at all (a piece of a multi-byte character, which any script may need).

    Kept together with the merge closure, they guarantee that **every** text written in those scripts
    encodes exactly as with the untrimmed tokenizer: BPE only ever creates tokens (and merge halves) that
    are contiguous byte spans of a pre-token of that text, and such a span is either text in the same
    scripts or a piece of a character, both kept; so every merge the original applies is still there."""
    tj, _ = _load_tokenizer(tokenizer)
    vocab: dict[str, int] = _check_model(tj)["vocab"]
    from .qwen_vocab import byte_symbols

    sym_to_byte = {s: i for i, s in enumerate(byte_symbols())}
    scripts = tuple(scripts)
    out = set()
    for tok, i in vocab.items():
        try:
            raw = bytes(sym_to_byte[c] for c in tok)
        except KeyError:
            continue                    # not a byte-level symbol string (an added token spelled as is)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.add(i)                  # a piece of a multi-byte character
            continue
        if text_in_scripts(text, scripts):
            out.add(i)
    return out


def keep_ids(tokenizer: Any, texts: Iterable[str], *, extra_ids: Iterable[int] = ()) -> KeepSet:
    """The ids to keep for ``texts`` (see the module docstring): corpus ids, added tokens, the 256
    byte symbols, ``extra_ids`` and the merge closure. ``tokenizer``: a tokenizer.json dict or path, a
    ``tokenizers.Tokenizer`` or a transformers fast tokenizer."""
    tj, raw = _load_tokenizer(tokenizer)
    return _keep_ids(tj, raw, texts, extra_ids)


def _keep_ids(tj: Mapping[str, Any], raw: Any, texts: Iterable[str], extra_ids: Iterable[int]) -> KeepSet:
    from tokenizers import pre_tokenizers

    model = _check_model(tj)
    vocab: dict[str, int] = model["vocab"]
    added = {int(t["id"]) for t in tj.get("added_tokens") or []}
    old_size = max(list(vocab.values()) + list(added)) + 1
    unique = sorted(set(texts))
    corpus = {i for enc in raw.encode_batch(unique, add_special_tokens=False) for i in enc.ids} if unique else set()
    extra = {int(i) for i in extra_ids}
    bad = sorted(i for i in extra if not 0 <= i < old_size)
    if bad:
        raise VocabTrimError(f"extra ids {bad[:5]} are outside the tokenizer's 0..{old_size - 1}")

    ranks = {pair: r for r, pair in enumerate(_merge_pairs(model["merges"]))}
    id_to_tok = {i: t for t, i in vocab.items()}
    closure: set[int] = set()
    for i in corpus | extra:
        tok = id_to_tok.get(i)
        if tok is None or len(tok) < 2 or any(ch not in vocab for ch in tok):
            continue   # an added token, a single symbol, or a token BPE cannot start from
        final, made = bpe_trace(list(tok), ranks)
        if final == [tok]:
            closure.update(vocab[t] for t in made)
        # else: BPE never builds it; it only appears whole through ignore_merges and needs no tree

    byte_ids = {vocab[s] for s in pre_tokenizers.ByteLevel.alphabet()}
    reasons, seen = {}, set()
    for name, ids in (("special", added), ("bytes", byte_ids), ("corpus", corpus), ("extra", extra),
                      ("merges", closure)):
        reasons[name] = len(ids - seen)
        seen |= ids
    return KeepSet(tuple(sorted(seen)), old_size, reasons)


def _remap_post_processor(pp: Any, keep: KeepSet) -> Any:
    """Ids inside a post-processor (TemplateProcessing special tokens, Roberta/Bert sep and cls)."""
    if isinstance(pp, list):
        return [_remap_post_processor(p, keep) for p in pp]
    if not isinstance(pp, dict):
        return pp
    out = dict(pp)
    for key in ("sep", "cls"):
        if isinstance(out.get(key), list) and len(out[key]) == 2:
            out[key] = [out[key][0], _map_one(out[key][1], keep, f"tokenizer.json post_processor.{key}")]
    if isinstance(out.get("special_tokens"), dict):
        out["special_tokens"] = {
            name: dict(spec, ids=[_map_one(i, keep, f"tokenizer.json post_processor special token {name!r}")
                                  for i in spec.get("ids", [])])
            for name, spec in out["special_tokens"].items()}
    if isinstance(out.get("processors"), list):
        out["processors"] = [_remap_post_processor(p, keep) for p in out["processors"]]
    return out


def _map_one(old: Any, keep: KeepSet, where: str) -> int:
    new = keep.old_to_new.get(int(old))
    if new is None:
        raise VocabTrimError(f"{where} is token id {old}, which the trimmed vocabulary does not keep; add "
                             f"that token to the corpus (or pass it in extra_ids)")
    return new


def trim_tokenizer_json(tokenizer_json: Mapping[str, Any], keep: KeepSet) -> dict:
    """tokenizer.json keeping only ``keep``: vocabulary and added tokens re-indexed by
    ``keep.old_to_new``, merges kept where both halves and the result are kept (order unchanged).
    Normalizer, pre-tokenizer, decoder and model options (``ignore_merges``, ...) stay as they are."""
    tj = json.loads(json.dumps(tokenizer_json))   # deep copy
    model = _check_model(tj)
    kept = keep.old_to_new
    model["vocab"] = {t: kept[i] for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if i in kept}
    vocab = model["vocab"]
    model["merges"] = [[a, b] for a, b in _merge_pairs(model["merges"])
                       if a in vocab and b in vocab and a + b in vocab]
    tj["added_tokens"] = [dict(t, id=_map_one(t["id"], keep, f"added token {t['content']!r}"))
                          for t in tj.get("added_tokens") or []]
    if isinstance(tj.get("padding"), dict) and tj["padding"].get("pad_id") is not None:
        tj["padding"]["pad_id"] = _map_one(tj["padding"]["pad_id"], keep, "tokenizer.json padding.pad_id")
    if tj.get("post_processor") is not None:
        tj["post_processor"] = _remap_post_processor(tj["post_processor"], keep)
    return tj


_TEMPLATE_CONVERSATIONS: list[tuple[list[dict[str, Any]], bool]] = [
    ([{"role": "system", "content": ""}, {"role": "user", "content": ""},
      {"role": "assistant", "content": ""}], False),
    ([{"role": "system", "content": ""}, {"role": "user", "content": ""}], True),
    # no system turn: Qwen's template writes its default one
    ([{"role": "user", "content": [{"type": "audio", "audio_url": "audio"}, {"type": "text", "text": ""}]}], True),
    ([{"role": "user", "content": ""}], True),
]


def template_texts(tokenizer: Any) -> list[str]:
    """The chat template of ``tokenizer`` (or a processor) rendered for a few conversations with empty
    contents: role names, newlines, ``Audio 1: `` and the default system turn. A conversation the
    template cannot render (e.g. no audio parts) is skipped; no template gives ``[]``."""
    owner = tokenizer if getattr(tokenizer, "chat_template", None) else getattr(tokenizer, "tokenizer", None)
    if owner is None or not getattr(owner, "chat_template", None):
        return []
    out = []
    for messages, gen in _TEMPLATE_CONVERSATIONS:
        try:
            text = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception:   # templates differ in what content they accept; skipping one loses nothing
            continue
        if isinstance(text, str) and text:
            out.append(text)
    return out


def _compare(old: Any, new: Any, keep: KeepSet, texts: Sequence[str], group: str, *, strict: bool) -> dict:
    """Encode ``texts`` with both raw tokenizers; count same / differing segmentations (new ids vs old
    ids mapped), check that every new encoding decodes to the old decoding. ``strict``: a differing
    sentence is an error (the trimming corpus)."""
    texts = list(texts)
    if not texts:
        return {"sentences": 0, "same": 0, "differ": 0, "tokens_old": 0, "tokens_new": 0, "examples": []}
    olds = old.encode_batch(texts, add_special_tokens=False)
    news = new.encode_batch(texts, add_special_tokens=False)
    differ: list[str] = []
    n_old = n_new = 0
    for text, o, n in zip(texts, olds, news):
        n_old, n_new = n_old + len(o.ids), n_new + len(n.ids)
        mapped = [keep.old_to_new.get(i, -1) for i in o.ids]
        if mapped != list(n.ids):
            differ.append(text)
        if mapped != list(n.ids) or strict:
            back_old = old.decode(o.ids, skip_special_tokens=False)
            back_new = new.decode(n.ids, skip_special_tokens=False)
            if back_new != back_old:
                raise VocabTrimError(f"{group}: the trimmed tokenizer does not round-trip {text!r}: decodes to "
                                     f"{back_new!r}, the original to {back_old!r}")
    if strict and differ:
        raise VocabTrimError(f"{group}: {len(differ)} sentence(s) of the trimming corpus encode differently "
                             f"after trimming (a bug in the merge closure), e.g. "
                             f"{'; '.join(repr(t) for t in differ[:_EXAMPLES])}")
    return {"sentences": len(texts), "same": len(texts) - len(differ), "differ": len(differ),
            "tokens_old": n_old, "tokens_new": n_new, "examples": differ[:_EXAMPLES]}


# --------------------------------------------------------------------------------------------------
# Config ids
# --------------------------------------------------------------------------------------------------

def _is_id_field(key: str) -> bool:
    return key.endswith(("_token_id", "_token_ids", "_token_index"))


def _remap_ids(d: dict, keep: KeepSet, where: str) -> dict:
    """A flat config dict with its token-id fields mapped (see the module docstring)."""
    out = dict(d)
    for key, value in d.items():
        name = f"{where}:{key}"
        if _is_id_field(key) and value is not None:
            if isinstance(value, (list, tuple)):
                out[key] = [_map_one(v, keep, name) for v in value]
            elif isinstance(value, int) and not isinstance(value, bool):
                out[key] = _map_one(value, keep, name) if value >= 0 else value   # -1: "none" in some configs
        elif key in _SUPPRESS_FIELDS and value:
            out[key] = [keep.old_to_new[int(v)] for v in value if int(v) in keep.old_to_new]
        elif key in _UNSUPPORTED_FIELDS and value:
            raise VocabTrimError(f"{name} is set; trimming does not remap it: remove it, trim, and set it "
                                 "again with the new ids (vocab_map.json)")
    return out


def _own_vocabulary(key: str, has_vocab_size: bool) -> bool:
    """A sub-config whose ids index a vocabulary of its own (module docstring), not the language model's."""
    return has_vocab_size and key != "text_config"


def _id_dicts(cfg: dict, where: str) -> Iterator[tuple[dict, str]]:
    """config.json's dicts whose token-id fields index the language model's vocabulary, with their names."""
    yield cfg, where
    for key, value in cfg.items():
        if isinstance(value, dict) and not _own_vocabulary(key, "vocab_size" in value):
            yield from _id_dicts(value, f"{where}:{key}")


def _check_config_ids(cfg: dict, keep: KeepSet, where: str) -> None:
    """Raise, naming the field, if config.json (or a sub-config, see :func:`_id_dicts`) names an id not kept."""
    for d, name in _id_dicts(cfg, where):
        _remap_ids(d, keep, name)


def _id_objects(obj: Any, where: str, seen: set[int] | None = None) -> Iterator[tuple[Any, str]]:
    """The loaded-config counterpart of :func:`_id_dicts` (each object once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj, where
    for key, value in list(vars(obj).items()):
        if not key.startswith("_") and hasattr(value, "to_dict") and hasattr(value, "__dict__") \
                and not _own_vocabulary(key, "vocab_size" in vars(value)):
            yield from _id_objects(value, f"{where}:{key}", seen)


def _remap_object(obj: Any, keep: KeepSet, where: str) -> None:
    """The same mapping on a loaded config (with its sub-configs) / generation config, in place, so that
    ``save_pretrained`` writes the new ids (and transformers' own checks see ids inside the new table)."""
    for o, name in list(_id_objects(obj, where)):
        fields = {k: v for k, v in vars(o).items() if not k.startswith("_")}
        for key, value in _remap_ids(fields, keep, name).items():
            if value is not fields[key]:
                setattr(o, key, value)


def _saved_ids_in_range(path: Path, rows: int) -> None:
    """Every token-id field of a saved config lies in the new table (a field missed by the mapping
    would still hold an old, usually larger, id)."""
    data = _read_json(path)
    for d, where in _id_dicts(data, path.name):
        for key, value in d.items():
            values = value if isinstance(value, list) else [value]
            if _is_id_field(key) and any(isinstance(v, int) and v >= rows for v in values):
                raise VocabTrimError(f"{where}:{key} = {value} is outside the trimmed table of {rows} "
                                     "rows; this field was not remapped")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise VocabTrimError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def _write_json(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=sort_keys, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

def _replace_module(model: Any, old: Any, new: Any) -> None:
    """Put ``new`` wherever ``old`` sits in ``model`` (found by identity, so any layout works)."""
    names = [n for n, m in model.named_modules() if m is old]
    if not names:
        raise VocabTrimError(f"cannot find the {type(old).__name__} to replace in {type(model).__name__}")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _trim_weights(model: Any, keep: KeepSet, rows: int, pad_id: int | None) -> dict:
    """Replace the input embedding and ``lm_head`` by ``rows``-row copies holding the kept rows
    (new row i = old row keep.ids[i]; rows past len(keep) are zero). Returns byte counts."""
    import torch
    from torch import nn

    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding) or not isinstance(out, nn.Linear):
        raise VocabTrimError(f"{type(model).__name__}: expected an nn.Embedding input and an nn.Linear output "
                             f"embedding, found {type(emb).__name__} and {type(out).__name__} (a quantized or "
                             "adapter-wrapped model? trim the plain merged model before quantizing)")
    tied = out.weight is emb.weight
    old_rows = emb.weight.shape[0]
    if keep.ids[-1] >= old_rows or out.weight.shape[0] != old_rows:
        raise VocabTrimError(f"the tokenizer has ids up to {keep.ids[-1]} but the embedding has {old_rows} rows "
                             f"and lm_head {out.weight.shape[0]}; tokenizer and weights do not belong together")
    index = torch.tensor(keep.ids, dtype=torch.long, device=emb.weight.device)
    n = len(keep.ids)

    def gathered(w: Any) -> Any:
        new = torch.zeros((rows,) + tuple(w.shape[1:]), dtype=w.dtype, device=w.device)
        new[:n] = w.detach()[index]
        return new

    before = emb.weight.numel() * emb.weight.element_size() * (1 if tied else 2)
    new_emb = nn.Embedding(rows, emb.embedding_dim, padding_idx=pad_id, dtype=emb.weight.dtype,
                           device=emb.weight.device)
    with torch.no_grad():
        new_emb.weight.copy_(gathered(emb.weight))
    new_out = nn.Linear(out.in_features, rows, bias=out.bias is not None, dtype=out.weight.dtype,
                        device=out.weight.device)
    with torch.no_grad():
        if tied:
            new_out.weight = new_emb.weight
        else:
            new_out.weight.copy_(gathered(out.weight))
        if out.bias is not None:
            new_out.bias.copy_(gathered(out.bias))
    _replace_module(model, emb, new_emb)
    _replace_module(model, out, new_out)
    if model.get_input_embeddings() is not new_emb or model.get_output_embeddings() is not new_out:
        raise VocabTrimError(f"{type(model).__name__}: the replaced embeddings are not the ones the model uses")
    text_cfg = model.config.get_text_config()
    text_cfg.vocab_size = rows
    if getattr(model.config, "vocab_size", None) == old_rows:
        model.config.vocab_size = rows
    after = new_emb.weight.numel() * new_emb.weight.element_size() * (1 if tied else 2)
    return {"tied": tied, "old_rows": old_rows, "hidden_size": emb.embedding_dim,
            "dtype": str(emb.weight.dtype).replace("torch.", ""), "bytes_before": before, "bytes_after": after}


def _model_class(config: Mapping[str, Any]) -> Any:
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


# --------------------------------------------------------------------------------------------------
# Tokenizer side files
# --------------------------------------------------------------------------------------------------

def _write_tokenizer_files(src: Path, tmp: Path, new_tj: dict, keep: KeepSet) -> Any:
    """tokenizer.json (validated by loading it), tokenizer_config.json, and the slow-tokenizer files
    when the source has them; returns the new raw tokenizer."""
    from tokenizers import Tokenizer

    new_raw = Tokenizer.from_str(json.dumps(new_tj))
    new_raw.save(str(tmp / "tokenizer.json"))
    if (src / "tokenizer_config.json").is_file():
        tc = _read_json(src / "tokenizer_config.json")
        if isinstance(tc.get("added_tokens_decoder"), dict):
            tc["added_tokens_decoder"] = {
                str(_map_one(k, keep, f"tokenizer_config.json added_tokens_decoder[{k}]")): v
                for k, v in tc["added_tokens_decoder"].items()}
        _write_json(tmp / "tokenizer_config.json", tc)
    model = new_tj["model"]
    if (src / "vocab.json").is_file():
        _write_json(tmp / "vocab.json", model["vocab"], sort_keys=False)
    if (src / "merges.txt").is_file():
        with open(tmp / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in model["merges"])
    if (src / "added_tokens.json").is_file():
        at = _read_json(src / "added_tokens.json")
        _write_json(tmp / "added_tokens.json",
                    {t: _map_one(i, keep, f"added_tokens.json {t!r}") for t, i in at.items()})
    return new_raw


def _copy_other_files(src: Path, tmp: Path) -> list[str]:
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in _OWN_FILES or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if not (tmp / p.name).exists():
            shutil.copy2(p, tmp / p.name)
            copied.append(p.name)
    return copied


# --------------------------------------------------------------------------------------------------
# The whole directory
# --------------------------------------------------------------------------------------------------

def _check_source(src: Path) -> dict:
    if not (src / "config.json").is_file():
        raise VocabTrimError(f"{src} has no config.json; vocabulary trimming needs a Hugging Face model directory")
    if not (src / "tokenizer.json").is_file():
        raise VocabTrimError(f"{src} has no tokenizer.json; vocabulary trimming needs the fast tokenizer file")
    if (src / "tekken.json").is_file():
        raise VocabTrimError(f"{src / 'tekken.json'}: this model's vocabulary is also a Tekken file for mistral-common, "
                             "which the trim does not rewrite; a trimmed tokenizer.json beside it would give "
                             "mistral-common users other ids. Leave out the trim (export.trim_vocab=false, no "
                             "trim/scripts storage) for this model")
    config = _read_json(src / "config.json")
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise VocabTrimError(f"{src} holds a quantized model (quantization_config, {method}); trim the vocabulary "
                             "of the unquantized model first, then quantize the trimmed one")
    if (src / "adapter_config.json").is_file() and not [p for p in src.glob("*.safetensors")
                                                        if not p.name.startswith("adapter_")]:
        raise VocabTrimError(f"{src} holds a LoRA adapter only; merge it into its base, then trim")
    return config


def trim_model_dir(src: str | os.PathLike, dst: str | os.PathLike, texts: Sequence[str], *,
                   verify: Mapping[str, Sequence[str]] | None = None, multiple_of: int = 1,
                   template: bool = True, overwrite: bool = False, scripts: Sequence[str] = ()) -> dict:
    """Write a vocabulary-trimmed copy of the model directory ``src`` to ``dst`` (see module docstring).

    ``texts``: the trimming corpus (sources, targets and rendered prompts the model will see).
    ``verify``: named sentence groups (e.g. train/dev/test) checked and counted, not kept.
    ``multiple_of``: table rows rounded up to this multiple (padding rows zero and suppressed in
    generation). ``template``: also keep what the chat template renders (:func:`template_texts`).
    ``scripts``: also keep every token written in these Unicode scripts (:func:`script_ids`), so any text in
    them encodes exactly as before, in or out of the corpus.
    ``dst`` is written to a temporary sibling and renamed, so it is complete or absent; an existing
    ``dst`` is an error unless ``overwrite``.

    Returns ``{"old_rows", "new_rows", "old_tokens", "new_tokens", "padded_rows", "tied", "dtype",
    "embedding_bytes_before", "embedding_bytes_after", "reasons", "corpus": counts, "verify": {group:
    counts}, "dst"}``; counts are ``sentences``, ``same``, ``differ``, ``tokens_old``, ``tokens_new``,
    ``examples`` (first differing sentences).
    """
    from transformers import AutoTokenizer

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if multiple_of < 1:
        raise VocabTrimError(f"multiple_of must be >= 1, got {multiple_of}")
    if src.resolve() == dst.resolve():
        raise VocabTrimError(f"the trimmed model must go to a new directory, not over its source {src}")
    if dst.exists() and not overwrite:
        raise VocabTrimError(f"{dst} exists; remove it or pass overwrite=True")
    texts = [str(t) for t in texts]
    if not texts:
        raise VocabTrimError("the trimming corpus is empty; pass the sentences the model must keep encoding")
    config = _check_source(src)
    gen_path = src / "generation_config.json"
    tj, old_raw = _load_tokenizer(src / "tokenizer.json")
    _check_model(tj)

    rendered = template_texts(AutoTokenizer.from_pretrained(src, local_files_only=True)) if template else []
    corpus = texts + rendered
    keep = _keep_ids(tj, old_raw, corpus, script_ids(tj, scripts) if scripts else ())
    # Fail on an unkept config id before the (slow) weight load.
    _check_config_ids(config, keep, "config.json")
    if gen_path.is_file():
        _remap_ids(_read_json(gen_path), keep, "generation_config.json")

    n = len(keep)
    rows = -(-n // multiple_of) * multiple_of
    new_tj = trim_tokenizer_json(tj, keep)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        new_raw = _write_tokenizer_files(src, tmp, new_tj, keep)
        corpus_counts = _compare(old_raw, new_raw, keep, corpus, "trimming corpus", strict=True)
        verify_counts = {g: _compare(old_raw, new_raw, keep, list(v), g, strict=False)
                         for g, v in (verify or {}).items()}

        model = _model_class(config).from_pretrained(src, local_files_only=True, **compat.dtype_kwargs("auto"))
        pad = model.config.get_text_config().pad_token_id
        pad_new = keep.old_to_new.get(int(pad)) if isinstance(pad, int) and pad >= 0 else None
        weights = _trim_weights(model, keep, rows, pad_new)
        _remap_object(model.config, keep, "config.json")       # with text_config and the other sub-configs
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            _remap_object(gen, keep, "generation_config.json")
            if rows > n:
                gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | set(range(n, rows)))
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        for name in ("config.json", "generation_config.json"):
            if (tmp / name).is_file():
                _saved_ids_in_range(tmp / name, rows)
        copied = _copy_other_files(src, tmp)

        # The directory as transformers will load it must encode like the raw trimmed tokenizer.
        hf_tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        hf_ids = hf_tok(corpus, add_special_tokens=False)["input_ids"]
        for text, got, enc in zip(corpus, hf_ids, new_raw.encode_batch(corpus, add_special_tokens=False)):
            if list(got) != list(enc.ids):
                raise VocabTrimError(f"the saved tokenizer ({type(hf_tok).__name__}) encodes {text!r} as {got}, "
                                     f"tokenizer.json as {enc.ids}; tokenizer_config.json disagrees with it")

        summary = {
            "old_rows": weights["old_rows"], "new_rows": rows, "old_tokens": keep.old_size, "new_tokens": n,
            "padded_rows": rows - n, "multiple_of": multiple_of, "tied": weights["tied"],
            "dtype": weights["dtype"], "hidden_size": weights["hidden_size"],
            "embedding_bytes_before": weights["bytes_before"], "embedding_bytes_after": weights["bytes_after"],
            "reasons": dict(keep.reasons), "template_texts": len(rendered), "copied": copied,
            "scripts": list(scripts),
            "corpus": corpus_counts, "verify": verify_counts,
        }
        _write_json(tmp / "vocab_map.json", dict(
            {k: v for k, v in summary.items() if k not in ("copied",)},
            old_vocab_size=weights["old_rows"], new_vocab_size=rows, corpus_sentences=len(texts),
            source=str(src.resolve()), kept=list(keep.ids)))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(summary, dst=str(dst))
