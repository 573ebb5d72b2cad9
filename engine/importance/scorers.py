"""Importance scorers: plain functions over (model, prepared dev set, candidate layers).

Layer indices are positions in the decoder of the model as loaded (for a model that was never pruned
these are the original layer numbers). ``removed`` names layers already taken out in earlier
iterations; a candidate ``None`` scores the model with just ``removed`` taken out (the baseline when
``removed`` is empty). The model is never copied: layers are skipped with
:func:`engine.importance.layers.without_layers` and everything is restored on return.

* :func:`nll_scores` / :func:`iter_nll_scores`: teacher-forced NLL per reference token without the
  candidate. The hidden states before layer i are the same with and without layer i, so candidate i
  only runs layers i+1.. from the input of layer i. Candidates are scored one after the other in layer
  order (each is final, and can be journaled, as soon as it is yielded): every dev batch keeps one
  hidden state, the input of the layer the scan has reached, and moving on to the next candidate runs
  only the layers in between. Logits are computed only at positions that predict a label token. A
  scan over L candidates and the baseline runs L + L(L-1)/2 layers instead of L^2 (plus no audio
  encoder and no full-sequence logits); the price is one (B, T, H) hidden state per dev batch.
* :func:`block_influence`: one forward; for every layer 1 - cos(input, output) of its hidden states at
  label positions (ShortGPT's Block Influence), and for n-layer blocks the angular distance
  arccos(cos(h_l, h_{l+n})) / pi (the "unreasonable ineffectiveness of deeper layers" criterion).
* :func:`task_scores`: the paper's scorer: greedy-translate the dev set without the candidate and
  score with sacrebleu (chrF++ with word_order=2, chrF, BLEU with the target's tokenizer).

Audio-encoder candidates (``importance.component=audio``): :func:`iter_audio_scores`. Indices are then
positions in the audio encoder's layer list of the model as loaded. A candidate changes the encoder's
output, so for each scored model (``removed`` + candidate skipped with
:func:`engine.importance.layers.without_audio_layers`) the dev set's decoder inputs are recomputed
(:func:`engine.importance.devset.reembed`: the model's own encoder, projector and merge) and the
unchanged decoder is scored by ``nll`` or ``task`` exactly as above with no decoder layer removed; so a
candidate's score is the score of the model with those audio layers permanently dropped. There is no
prefix reuse (each candidate runs the encoder and the whole decoder once per dev batch); the baseline
with nothing removed uses the decoder inputs :func:`engine.importance.devset.prepare` cached.
``block_influence`` on audio layers (:func:`audio_block_influence`) is 1 - cos(input, output) of each
audio layer over the valid (unpadded) encoder frames of the dev audio, from one encoder pass per batch.

Every scorer takes ``interrupt``, a function called between dev batches: it raises (the scan's stop
request, :class:`engine.importance.search.StopScan`) to abandon the unit in flight.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .. import compat, langs
from ..data.prompt import IGNORE
from ..models import families, surgery
from . import layers as L
from . import devset as D
from .devset import DevSet, ImportanceError

# metric -> higher is better
METRICS: dict[str, bool] = {"chrf++": True, "chrf": True, "bleu": True, "primary": True, "nll": False,
                            "block_influence": False}
TASK_METRICS = ("chrf++", "chrf", "bleu", "primary")
SCORERS = ("task", "nll", "block_influence")
_HEAD_CHUNK = 2048  # label positions per lm_head call: (chunk, V) fp32 logits, 1.3 GB at V=156k
Interrupt = Callable[[], None] | None


@dataclass
class Score:
    metric: str
    score: float
    metrics: dict[str, float]
    n_samples: int
    n_tokens: int = 0
    seconds: float = 0.0
    hypotheses: list[str] | None = field(default=None, repr=False)


def resolve_metric(scorer: str, selector: str, tgt_langs: Sequence[str]) -> str:
    """The metric a scorer ranks by. ``auto`` for ``task``: chrF for spaceless targets (zh, ja), chrF++
    otherwise, as the paper; for a dev set mixing both (one model serving en->de and en->zh),
    ``primary``: each direction's own paper metric, averaged with the directions' sample counts as
    weights (one chrF++ over German and Chinese together would score Chinese by word n-grams it has
    no spaces for)."""
    if scorer not in SCORERS:
        raise ImportanceError(f"unknown scorer {scorer!r}; one of {', '.join(SCORERS)}")
    if scorer != "task":
        return scorer
    if selector != "auto":
        if selector not in TASK_METRICS:
            raise ImportanceError(f"unknown metric {selector!r} for the task scorer; one of auto, "
                                  f"{', '.join(TASK_METRICS)}")
        return selector
    spaceless = {langs.get(t).spaceless for t in set(tgt_langs)}
    if len(spaceless) > 1:
        return "primary"
    return "chrf" if spaceless == {True} else "chrf++"


def check_metric(metric: str) -> bool:
    """Whether higher is better; an unknown metric name is an error."""
    if metric not in METRICS:
        raise ImportanceError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    return METRICS[metric]


def _positions(n: int, removed: Sequence[int]) -> tuple[list[int], dict[int, int]]:
    rem = surgery.normalise_indices(removed, n)
    cur = [i for i in range(n) if i not in set(rem)]
    return rem, {orig: j for j, orig in enumerate(cur)}


def _check_candidates(cands: Sequence[int | None], pos: dict[int, int], n: int, what: str = "layer") -> None:
    for c in cands:
        if c is not None and c not in pos:
            raise ImportanceError(f"candidate {what} {c} is already removed or does not exist (0..{n - 1})")


# ---------------------------------------------------------------------------------------------- nll

def _nll_sum(head: Any, hidden: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed NLL of the label tokens: hidden (B, T, H) final-normed, labels (B, T) unshifted."""
    tgt = labels[:, 1:]
    m = tgt != IGNORE
    hs = hidden[:, :-1][m]
    ys = tgt[m]
    total = 0.0
    for a in range(0, hs.shape[0], _HEAD_CHUNK):
        logits = head(hs[a:a + _HEAD_CHUNK]).float()
        total += float(F.cross_entropy(logits, ys[a:a + _HEAD_CHUNK], reduction="sum"))
    return total


def _span(model: torch.nn.Module, bb: torch.nn.Module, batch: Any, start: int, stop: int,
          hidden: torch.Tensor | None, norm: torch.nn.Module | None, capture: bool = False) -> torch.Tensor:
    """Run the backbone over the current decoder layers ``start .. stop-1`` only, ``hidden`` (the input
    of layer ``start``) fed to layer ``start`` (to the final norm when the span is empty). ``hidden``
    None: the backbone's own embedding of the batch, which is the input of layer 0, so it is only
    valid with ``start`` 0 or a span that starts right after layer 0 was skipped. Returns the
    final-normed hidden states, or with ``capture`` the output of layer ``stop-1``."""
    layers = surgery.decoder_layers(model)
    nc = len(layers)
    target = layers[start] if start < stop else norm
    got: list[torch.Tensor] = []
    hook = None
    if capture:
        hook = layers[stop - 1].register_forward_hook(lambda mod, args, out: got.append(L.first_out(out)))
    feed = L.replace_input(target, hidden) if hidden is not None else contextlib.nullcontext()
    try:
        with L.without_layers(model, [i for i in range(nc) if not start <= i < stop]), feed:
            h = bb(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    finally:
        if hook is not None:
            hook.remove()
    return got[0] if capture else h


@torch.inference_mode()
def iter_nll_scores(model: torch.nn.Module, dev: DevSet, candidates: Sequence[int | None],
                    removed: Sequence[int] = (), *, interrupt: Interrupt = None) -> Iterator[tuple[int | None, Score]]:
    """Yields (candidate, Score) as each candidate finishes: per-token NLL of the references without
    it (lower keeps more), with prefix reuse (module docstring). Candidates in layer order, the
    baseline (``None``) last, from the deepest prefix."""
    n = L.num_layers(model)
    rem, pos = _positions(n, removed)
    cands = list(dict.fromkeys(candidates))
    _check_candidates(cands, pos, n)
    if any(b.embeds is None for b in dev.batches):
        raise ImportanceError("the dev set was prepared without the teacher-forced view")
    n_tok = sum(b.n_label_tokens for b in dev.batches)
    if n_tok == 0:
        raise ImportanceError("the dev set has no label tokens to score")
    order = sorted((c for c in cands if c is not None), key=lambda c: pos[c]) + ([None] if None in cands else [])
    bb, head = L.backbone(model), families.head_fn(model)
    with L.without_layers(model, rem):
        nc = len(surgery.decoder_layers(model))
        norm = L.final_norm(model)
        if norm is None and any(c is not None and pos[c] == nc - 1 for c in cands):
            raise ImportanceError(f"{type(model).__name__}: no final norm module found, so the last layer "
                                  "cannot be scored by prefix reuse; protect it")
        # per dev batch: the layer the scan has reached and its input (None: the embedded batch, layer 0)
        front = [0] * len(dev.batches)
        hid: list[torch.Tensor | None] = [None] * len(dev.batches)
        for c in order:
            t0 = time.perf_counter()
            total = 0.0
            for k, batch in enumerate(dev.batches):
                if interrupt is not None:
                    interrupt()
                if c is None:
                    h = _span(model, bb, batch, front[k], nc, hid[k], norm)
                else:
                    j = pos[c]
                    if j > front[k]:
                        hid[k] = _span(model, bb, batch, front[k], j, hid[k], norm, capture=True)
                        front[k] = j
                    h = _span(model, bb, batch, j + 1, nc, hid[k], norm)
                total += _nll_sum(head, h, batch.labels)
                del h
            v = total / n_tok
            yield c, Score("nll", v, {"nll": v}, dev.n_samples, n_tok, time.perf_counter() - t0)


def nll_scores(model: torch.nn.Module, dev: DevSet, candidates: Sequence[int | None],
               removed: Sequence[int] = ()) -> dict[int | None, Score]:
    """:func:`iter_nll_scores` collected: {candidate: Score}."""
    return dict(iter_nll_scores(model, dev, candidates, removed))


# ---------------------------------------------------------------------------------------------- block influence

@dataclass
class BlockInfluence:
    """``layer``: original layer -> mean 1 - cos(input, output); ``angular``: n -> {first layer of the
    block: mean arccos(cos(h_in(first), h_out(last))) / pi} over blocks of n consecutive current layers."""
    layer: dict[int, float]
    angular: dict[int, dict[int, float]]
    n_tokens: int
    seconds: float


class _Influence:
    """Accumulates 1 - cos(input, output) per layer and the angular distance of n-layer blocks over the
    rows that :meth:`add` selects, one forward per call; :meth:`result` divides by the rows seen."""

    def __init__(self, layers: torch.nn.ModuleList, block_sizes: Sequence[int]):
        self.layers = layers
        self.nc = nc = len(layers)
        self.sizes = [s for s in dict.fromkeys(int(b) for b in block_sizes) if 1 <= s <= nc]
        self.bi = [0.0] * nc
        self.ang = {s: [0.0] * (nc - s + 1) for s in self.sizes}
        self.rows = 0

    def add(self, forward: Callable[[], Any], pick: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Runs ``forward()`` once with hooks that keep ``pick(hidden)`` (rows x hidden) of every layer's
        input and of the last layer's output."""
        nc, layers = self.nc, self.layers
        ins: list[torch.Tensor | None] = [None] * (nc + 1)   # ins[nc] = output of the last layer

        def pre_for(j: int):
            def pre(mod, args, kwargs):
                ins[j] = pick(L.first_arg(args, kwargs)).float()
            return pre

        def post(mod, args, out):
            ins[nc] = pick(L.first_out(out)).float()

        hooks = [layers[j].register_forward_pre_hook(pre_for(j), with_kwargs=True) for j in range(nc)]
        hooks.append(layers[nc - 1].register_forward_hook(post))
        try:
            forward()
        finally:
            for hk in hooks:
                hk.remove()
        for j in range(nc):
            self.bi[j] += float((1 - F.cosine_similarity(ins[j], ins[j + 1], dim=-1)).sum())
        for s in self.sizes:
            for j in range(nc - s + 1):
                cos = F.cosine_similarity(ins[j], ins[j + s], dim=-1).clamp(-1.0, 1.0)
                self.ang[s][j] += float((torch.arccos(cos) / math.pi).sum())
        self.rows += int(ins[0].shape[0])

    def result(self, orig: dict[int, int], seconds: float, empty: str) -> BlockInfluence:
        if self.rows == 0:
            raise ImportanceError(empty)
        n = self.rows
        return BlockInfluence(layer={orig[j]: self.bi[j] / n for j in range(self.nc)},
                              angular={s: {orig[j]: v / n for j, v in enumerate(vals)} for s, vals in self.ang.items()},
                              n_tokens=n, seconds=seconds)


@torch.inference_mode()
def block_influence(model: torch.nn.Module, dev: DevSet, removed: Sequence[int] = (),
                    block_sizes: Sequence[int] = (), *, interrupt: Interrupt = None) -> BlockInfluence:
    n = L.num_layers(model)
    rem, pos = _positions(n, removed)
    orig = {j: o for o, j in pos.items()}
    bb = L.backbone(model)
    t0 = time.perf_counter()
    with L.without_layers(model, rem):
        acc = _Influence(surgery.decoder_layers(model), block_sizes)
        for batch in dev.batches:
            if interrupt is not None:
                interrupt()
            if batch.embeds is None:
                raise ImportanceError("the dev set was prepared without the teacher-forced view")
            m = batch.labels[:, 1:] != IGNORE
            acc.add(lambda: bb(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, use_cache=False),
                    lambda h: h[:, :-1][m])
    return acc.result(orig, time.perf_counter() - t0, "the dev set has no label tokens to score")


def block_influence_scores(model: torch.nn.Module, dev: DevSet, candidates: Sequence[int | None],
                           removed: Sequence[int] = (), *, interrupt: Interrupt = None) -> dict[int | None, Score]:
    """Block influence of each candidate in the current model (lower: the layer changes its input less)."""
    if any(c is None for c in candidates):
        raise ImportanceError("block_influence scores layers, not a whole model: it has no baseline")
    n = L.num_layers(model)
    _, pos = _positions(n, removed)
    _check_candidates(candidates, pos, n)
    res = block_influence(model, dev, removed, interrupt=interrupt)
    share = res.seconds / max(1, len(candidates))
    return {c: Score("block_influence", res.layer[c], {"block_influence": res.layer[c]}, dev.n_samples,
                     res.n_tokens, share) for c in candidates}


# ---------------------------------------------------------------------------------------------- task

def corpus_metrics(hyps: Sequence[str], refs: Sequence[str], tgt_langs: Sequence[str]) -> dict[str, float]:
    """chrF++ (word_order=2), chrF and BLEU (tokenize "zh" for Chinese, the language table's otherwise)."""
    from sacrebleu.metrics import BLEU, CHRF

    codes = set(tgt_langs)
    tok = langs.get(next(iter(codes))).bleu_tokenize if len(codes) == 1 else "13a"
    hyps, refs = list(hyps), [list(refs)]
    try:
        bleu = BLEU(tokenize=tok).corpus_score(hyps, refs).score
    except Exception as e:  # e.g. ja-mecab without its dictionary installed
        raise ImportanceError(f"sacrebleu BLEU with tokenize={tok!r} failed ({e}); install its extra or "
                              f"select chrf/chrf++") from None
    out = {"chrf++": CHRF(word_order=2).corpus_score(hyps, refs).score,
           "chrf": CHRF().corpus_score(hyps, refs).score, "bleu": bleu}
    out["primary"] = primary_metric(hyps, refs[0], tgt_langs)
    return out


def primary_metric(hyps: Sequence[str], refs: Sequence[str], tgt_langs: Sequence[str]) -> float:
    """Per target language its paper metric (chrF for spaceless targets, chrF++ otherwise), averaged
    over languages weighted by their sample counts."""
    from sacrebleu.metrics import CHRF

    if len(set(tgt_langs)) == 1:  # one language for the whole corpus
        tgt_langs = [next(iter(tgt_langs))] * len(hyps)
    if len(tgt_langs) != len(hyps):
        raise ValueError(f"{len(hyps)} hypotheses but {len(tgt_langs)} target languages")
    total = 0.0
    for lang in sorted(set(tgt_langs)):
        idx = [i for i, t in enumerate(tgt_langs) if t == lang]
        metric = CHRF() if langs.get(lang).spaceless else CHRF(word_order=2)
        total += len(idx) * metric.corpus_score([hyps[i] for i in idx], [[refs[i] for i in idx]]).score
    return total / max(1, len(tgt_langs))


def generation_config(model: torch.nn.Module, end_id: int, pad_id: int, max_new_tokens: int) -> Any:
    """Plain greedy decoding (the paper's), stopping at ``<|im_end|>`` or the model's own eos ids.
    A fresh config on purpose: a checkpoint's sampling defaults (top_p, repetition penalty) must not
    leak into the selection."""
    from transformers import GenerationConfig

    eos = [end_id]
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (own if isinstance(own, (list, tuple)) else [own]):
        if e is not None and e not in eos:
            eos.append(int(e))
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                            pad_token_id=pad_id)


def decode_new_tokens(tokenizer: Any, seqs: torch.Tensor, eos: Sequence[int]) -> list[str]:
    """Generated ids (B, N) -> text, cut at the first stop token."""
    out = []
    stop = set(int(e) for e in eos)
    for row in seqs.tolist():
        cut = next((k for k, t in enumerate(row) if t in stop), len(row))
        out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return out


@torch.inference_mode()
def translate(model: torch.nn.Module, tokenizer: Any, dev: DevSet, gen_cfg: Any, *,
              interrupt: Interrupt = None) -> list[str]:
    """Greedy translations of the dev set (in dev order) from the cached prompt embeddings."""
    hyps: list[str] = []
    for batch in dev.batches:
        if interrupt is not None:
            interrupt()
        if batch.gen_embeds is None:
            raise ImportanceError("the dev set was prepared without the prompt-only view")
        seqs = compat.generate_from_embeds(model, batch.gen_embeds, batch.gen_mask, generation_config=gen_cfg)
        # With inputs_embeds only, generate returns just the new tokens (B, N).
        hyps.extend(decode_new_tokens(tokenizer, seqs, gen_cfg.eos_token_id))
    return hyps


def task_scores(model: torch.nn.Module, tokenizer: Any, dev: DevSet, candidates: Sequence[int | None],
                removed: Sequence[int] = (), *, metric: str, gen_cfg: Any,
                interrupt: Interrupt = None) -> Iterator[tuple[int | None, Score]]:
    """Yields (candidate, Score) as each candidate finishes (so a journal can record it at once)."""
    if metric not in TASK_METRICS:
        raise ImportanceError(f"unknown metric {metric!r} for the task scorer; one of {', '.join(TASK_METRICS)}")
    n = L.num_layers(model)
    rem, pos = _positions(n, removed)
    _check_candidates(candidates, pos, n)
    refs = [r for b in dev.batches for r in b.refs]
    for c in dict.fromkeys(candidates):
        t0 = time.perf_counter()
        drop = rem + ([c] if c is not None else [])
        with L.without_layers(model, drop):
            hyps = translate(model, tokenizer, dev, gen_cfg, interrupt=interrupt)
        mets = corpus_metrics(hyps, refs, dev.tgt_langs)
        yield c, Score(metric, mets[metric], mets, dev.n_samples, 0, time.perf_counter() - t0, hyps)


# ---------------------------------------------------------------------------------------------- audio encoder

def audio_dev(model: torch.nn.Module, dev: DevSet, drop: Sequence[int], *, interrupt: Interrupt = None) -> DevSet:
    """The dev set as the model without the audio layers at positions ``drop`` hands it to its decoder
    (``dev`` itself when nothing is dropped: its cached decoder inputs are the unpruned model's)."""
    if not drop:
        return dev
    with L.without_audio_layers(model, drop):
        return D.reembed(model, dev, interrupt=interrupt)


def iter_audio_scores(model: torch.nn.Module, tokenizer: Any, dev: DevSet, candidates: Sequence[int | None],
                      removed: Sequence[int] = (), *, scorer: str, metric: str, gen_cfg: Any = None,
                      interrupt: Interrupt = None) -> Iterator[tuple[int | None, Score]]:
    """Yields (candidate, Score) for audio-encoder candidates (module docstring), each as it finishes, in
    the order given; ``None`` scores the model with just ``removed`` taken out. ``scorer``: ``nll``,
    ``task`` (``metric`` and ``gen_cfg`` as for :func:`task_scores`) or ``block_influence``."""
    n = L.num_audio_layers(model)
    rem, pos = _positions(n, removed)
    cands = list(dict.fromkeys(candidates))
    _check_candidates(cands, pos, n, "audio layer")
    if scorer == "block_influence":
        if any(c is None for c in cands):
            raise ImportanceError("block_influence scores layers, not a whole model: it has no baseline")
        res = audio_block_influence(model, dev, rem, interrupt=interrupt)
        share = res.seconds / max(1, len(cands))
        for c in cands:
            yield c, Score("block_influence", res.layer[c], {"block_influence": res.layer[c]}, dev.n_samples,
                           res.n_tokens, share)
        return
    if scorer not in ("nll", "task"):
        raise ImportanceError(f"unknown scorer {scorer!r}; one of {', '.join(SCORERS)}")
    for c in cands:
        t0 = time.perf_counter()
        d = audio_dev(model, dev, rem + ([c] if c is not None else []), interrupt=interrupt)
        if scorer == "nll":
            ((_, sc),) = iter_nll_scores(model, d, [None], interrupt=interrupt)
        else:
            ((_, sc),) = task_scores(model, tokenizer, d, [None], metric=metric, gen_cfg=gen_cfg, interrupt=interrupt)
        del d
        sc.seconds = time.perf_counter() - t0
        yield c, sc


@torch.inference_mode()
def audio_block_influence(model: torch.nn.Module, dev: DevSet, removed: Sequence[int] = (),
                          block_sizes: Sequence[int] = (), *, interrupt: Interrupt = None) -> BlockInfluence:
    """:func:`block_influence` of the audio-encoder layers (those left after ``removed``, keyed by their
    positions in the model as loaded): mean 1 - cos(input, output) per layer, and the angular
    distance of n-layer blocks, over the encoder frames that hold audio (frame t of a row is valid
    when t < its feature length after the encoder's stride-2 convolution; padding is left out).
    ``n_tokens`` counts those frames. An encoder that packs the valid frames of all rows into one
    (frames, width) sequence before its layers has no padding to leave out. The forward stops before the
    decoder."""
    n = L.num_audio_layers(model)
    rem, pos = _positions(n, removed)
    orig = {j: o for o, j in pos.items()}
    t0 = time.perf_counter()
    with L.without_audio_layers(model, rem):
        layers = L.audio_layer_list(model)
        tower = next(m for m in model.modules() if any(c is layers for c in m.children()))
        acc = _Influence(layers, block_sizes)
        for batch in dev.batches:
            if interrupt is not None:
                interrupt()
            fb = batch.features
            if fb is None or not any(k in fb for k in families.audio_input_keys()):
                raise ImportanceError("the dev set was prepared without its audio features (keep_features=True)")
            lens = None
            if "feature_attention_mask" in fb and hasattr(tower, "_get_feat_extract_output_lengths"):
                lens, _ = tower._get_feat_extract_output_lengths(fb["feature_attention_mask"].sum(-1))

            def valid(h: torch.Tensor, lens: Any = lens) -> torch.Tensor:
                if h.dim() == 2:   # a packing encoder (the Omni thinker's) hands its layers valid frames only
                    return h
                if lens is None:   # no per-row feature lengths: every frame counts
                    return h.reshape(-1, h.shape[-1])
                t = torch.arange(h.shape[1], device=h.device)[None, :]
                return h[t < lens.to(h.device)[:, None]]

            acc.add(lambda: D.decoder_inputs(model, fb), valid)
    return acc.result(orig, time.perf_counter() - t0, "the dev set has no audio frames to score")
