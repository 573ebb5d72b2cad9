"""The teacher pass: what the teacher computes for one batch of one audio shard.

Two targets per sample (``cache.targets``): ``ref``, the teacher's top-k distribution at every label
position of the reference translation (word-level KD), and ``teacher``, its greedy translation
(sequence-level KD, the paper's) with, on request, the top-k on that translation too.

Only label rows go through ``lm_head``: the decoder's hidden states are sliced at the positions that
predict a label first (position ``t - 1`` for the label at ``t``), so full-vocabulary logits are never
materialised for the prompt and audio positions.

**ZeRO-3 teacher** (``cache.zero3=true``, bf16 or fp32 only). For a teacher that does not fit one
device, the teacher is loaded partitioned (``zero.Init`` through transformers' ``HfDeepSpeedConfig``:
no rank ever holds all its weights, on the host or the device) and wrapped by ``deepspeed.initialize``
(ZeRO-3, no optimizer: DeepSpeed's inference path). Each rank keeps ``1/world`` of every parameter
(``cache.zero3_persistence_threshold``: parameters smaller than it stay whole; 0 slices all of them)
and gathers each layer's weights for the moment its forward runs; weights a forward reads as
``.weight`` of a child module (the audio encoder's ``embed_positions``) are registered as external
parameters so they are gathered too. So every teacher forward is a collective, and the ranks must
make the same calls in lockstep (:mod:`engine.cache.build` runs padding batches for that): every batch
makes the same sequence of calls whatever its data (the word-level pass as one decoder forward plus one
``lm_head`` application with its weight gathered explicitly; ``generate`` with ``synced_gpus=True``;
with ``cache.teacher_topk`` always the teacher-target pass). The output is the same as unsharded: same
batches, same math (checked byte for byte in fp32 on CPU by the tests; bf16 on GPUs may round
differently). An nf4 teacher is refused under ZeRO-3 (DeepSpeed cannot partition bitsandbytes 4-bit
weights): use ``cache.quant=nf4`` on one device instead.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist, zero
from ..config import ModelConfig
from ..data.prompt import PromptError
from ..models import families
from ..models.load import load_model
from . import codec
from .format import IGNORE, CacheError, Target, encode_record

def _backbone_and_head(model: Any) -> tuple[Any, Any]:
    head = model.get_output_embeddings()
    base = getattr(model, "model", None)
    if base is None or head is None:
        raise CacheError(f"{type(model).__name__}: cannot find the decoder stack (.model) and lm_head")
    return base, head


MODEL_INPUTS = ("input_ids", "attention_mask") + families.audio_input_keys()


def model_inputs(batch: Mapping[str, Any], device: Any) -> dict[str, Any]:
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}


def label_positions(labels: Any) -> Any:
    """``(b, t)`` index pairs of label tokens (row-major, so per sample in sequence order)."""
    return torch.nonzero(labels != IGNORE, as_tuple=False)


def topk_from_hidden(hidden: Any, head: Any, k: int, vocab_size: int, chunk: int = 512) -> tuple[Any, Any, Any]:
    """hidden [N, H] -> (ids [N,k] int64, logprobs [N,k] fp32, tail [N] fp32) over the first V rows.

    The distribution is the softmax over all logit rows (fp32 logits); top-k among the first
    ``vocab_size``; the tail is the log of everything else (padded rows included). Chunked over N so
    at most ``chunk x rows`` fp32 logits exist at once.

    Why not ``log_softmax`` then ``topk`` then a masked ``logsumexp``: each of those walks the whole
    [N, rows] matrix, which on a small model costs more than the matmul that made the logits. Here:
    one ``topk`` on the raw logits (same order as the log-probs), the k winners set to -inf in place,
    one fused ``logsumexp`` of the rest; the normaliser is ``logaddexp`` of that and the top-k's own
    log-sum-exp. The rest is summed directly (not as total minus top-k), so the tiny tail of a peaked
    row keeps its full relative precision.
    """
    ids, lps, tails = [], [], []
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s:s + chunk]).float()
        pad_lse = None
        if logits.shape[1] > vocab_size:      # padded embedding rows: never a top-k id, mass -> tail
            pad_lse = torch.logsumexp(logits[:, vocab_size:], dim=-1)
            logits[:, vocab_size:] = float("-inf")
        top = logits.topk(k, dim=-1)
        logits.scatter_(-1, top.indices, float("-inf"))
        rest = torch.logsumexp(logits, dim=-1)
        if pad_lse is not None:
            rest = torch.logaddexp(rest, pad_lse)
        logz = torch.logaddexp(torch.logsumexp(top.values, dim=-1), rest)
        ids.append(top.indices)
        lps.append(top.values - logz[:, None])
        tails.append(rest - logz)
    if not ids:
        e = hidden.new_zeros((0, k))
        return e.long(), e.float(), e.new_zeros(0).float()
    return torch.cat(ids), torch.cat(lps), torch.cat(tails)


@contextlib.contextmanager
def _gathered_head(head: Any, zero3: bool):
    """``lm_head`` as a callable. Under ZeRO-3 its weight is gathered once (one collective, whatever
    the number of rows) and applied with ``F.linear`` (what ``nn.Linear.forward`` computes), so the
    number of collectives does not depend on the data."""
    if not zero3:
        yield head
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
        yield lambda x: F.linear(x, head.weight, head.bias)


def word_level(model: Any, batch: Mapping[str, Any], k: int, vocab_size: int, device: Any,
               zero3: bool = False) -> list[codec.TopK]:
    """The teacher's top-k at every label position of a featurized batch, one TopK per sample.

    The label at position t is predicted from the hidden state at t-1, so hidden states are
    gathered at (b, t-1) for every label (b, t), then ``lm_head`` runs on those rows only.
    """
    base, head = _backbone_and_head(model)
    labels = batch["labels"]
    with torch.inference_mode():
        out = base(**model_inputs(batch, device), use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pos = label_positions(labels)
        if (pos[:, 1] == 0).any():
            raise CacheError("a label at position 0 has no preceding hidden state")
        h = hidden[pos[:, 0].to(hidden.device), (pos[:, 1] - 1).to(hidden.device)]
        with _gathered_head(head, zero3) as fn:
            ids, lp, tail = topk_from_hidden(h, families.head_fn(model, fn), k, vocab_size)
    ids, lp, tail = ids.cpu().numpy(), lp.cpu().numpy(), tail.cpu().numpy()
    counts = (labels != IGNORE).sum(1).tolist()
    res, s = [], 0
    for n in counts:
        res.append(codec.TopK(ids[s:s + n], lp[s:s + n], tail[s:s + n]))
        s += n
    return res


def _left_padded_prompts(featurizer: Any, samples: list[dict]) -> tuple[dict[str, Any], list[list[int]]]:
    """Generation inputs built exactly as the featurizer builds its prompts, padded on the left."""
    b = featurizer.builder
    with_audio = [featurizer.use_audio and s.get("audio") is not None for s in samples]
    texts = [b.prompt_text(s["meta"], audio=a) for s, a in zip(samples, with_audio)]
    prompt_ids: list[list[int]] = [[] for _ in samples]
    feats: dict[str, Any] = {}
    rows = [i for i, a in enumerate(with_audio) if a]
    if rows:
        ids, feats = featurizer._prompt_ids_audio([texts[i] for i in rows], [samples[i]["audio"] for i in rows],
                                                  int(samples[rows[0]].get("sample_rate", 16000)))
        for i, p in zip(rows, ids):
            prompt_ids[i] = p
    for i, a in enumerate(with_audio):
        if not a:
            prompt_ids[i] = b.tokenize(texts[i])
    t = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(samples), t), b.pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), t), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        input_ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": mask, **feats}, prompt_ids


def greedy(model: Any, featurizer: Any, samples: list[dict], max_new_tokens: int, device: Any,
           zero3: bool = False) -> tuple[list[str], list[list[int]]]:
    """The teacher's greedy translations (text, prompt ids) for decoded samples (``zero3``: generate with
    ``synced_gpus=True``, so every rank steps until all ranks' batches are done)."""
    inputs, prompt_ids = _left_padded_prompts(featurizer, samples)
    tok = featurizer.builder.tokenizer
    with torch.inference_mode():
        out = model.generate(**model_inputs(inputs, device), max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=featurizer.builder.pad_id,
                             **({"synced_gpus": True} if zero3 else {}))
    new = out[:, inputs["input_ids"].shape[1]:].cpu()
    texts = [tok.decode(row.tolist(), skip_special_tokens=True).strip() for row in new]
    return texts, prompt_ids


def _norm(text: str) -> str:
    return " ".join(text.split())


def teacher_vocab_rows(model: Any) -> int:
    w = model.get_output_embeddings().weight
    return int(getattr(w, "ds_shape", w.shape)[0])          # ds_shape: the full shape of a ZeRO-3 slice


def load_teacher(recipe: Any, teacher: Path, device: Any, zero3: bool = False) -> Any:
    """The teacher, eval mode, on ``device`` (``zero3``: left on the host; :func:`_zero3_teacher` shards it)."""
    c, m = recipe.cache, recipe.model
    mc = ModelConfig(path=str(teacher), kind="auto", dtype=c.dtype if c.dtype != "auto" else m.dtype,
                     quant=c.quant if c.quant != "auto" else m.quant, double_quant=m.double_quant,
                     trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation)
    model = load_model(mc, device=device if mc.quant == "nf4" else None)
    if mc.quant != "nf4" and not zero3:
        model.to(device)
    return model.eval()


def zero3_teacher(recipe: Any, teacher: Path, vocab: int, env: Any, device: Any) -> tuple[Any, dict[str, int]]:
    """Load the teacher partitioned (``zero.Init`` through transformers' ``HfDeepSpeedConfig``: no rank
    ever holds all weights) and wrap it with ``deepspeed.initialize`` (ZeRO-3, no optimizer): the module
    (its ZeRO hooks gather each layer's weights around its forward) and the partitioning counts."""
    import deepspeed  # heavy (JIT ops, CUDA probing): only when a ZeRO-3 teacher is asked for
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    c = recipe.cache
    dtype = c.dtype if c.dtype != "auto" else recipe.model.dtype
    mcfg = AutoConfig.from_pretrained(teacher, local_files_only=True,
                                      trust_remote_code=recipe.model.trust_remote_code)
    text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    ds = zero.fill_config(zero.load_template(3, False), stage=3, micro_batch=c.batch_size, accum=1,
                          world_size=env.world_size, dtype=dtype, grad_clip=1.0, offload=False,
                          hidden_size=int(getattr(text_cfg, "hidden_size", 0)),
                          param_persistence_threshold=c.zero3_persistence_threshold
                          if c.zero3_persistence_threshold >= 0 else None, on_cpu=device.type == "cpu")
    dist.deepspeed_bootstrap()
    hf_ds = HfDeepSpeedConfig(ds)       # while alive, from_pretrained loads under zero.Init
    model = load_teacher(recipe, teacher, device, zero3=True)
    rows = teacher_vocab_rows(model)
    if rows < vocab:
        raise CacheError(f"teacher {teacher}: its output layer has {rows} rows but the tokenizer has "
                         f"{vocab} tokens: tokenizer and model do not belong together")
    zero_init = all(hasattr(p, "ds_id") for p in model.parameters())   # partitioned while loading
    engine, *_ = deepspeed.initialize(model=model, config=ds, dist_init_required=True)
    del hf_ds
    module = engine.module.eval()
    # Weights read as ``.weight`` in the parent's forward, outside their own module's forward (the audio
    # encoder's ``embed_positions.weight`` in Qwen2-Audio/Whisper): ZeRO-3 would hand the parent an
    # empty slice. Registered as the parent's external parameters, they are gathered with it.
    for sub in list(module.modules()):
        for child_name, child in sub.named_children():
            if child_name == "embed_positions" and isinstance(getattr(child, "weight", None), torch.nn.Parameter):
                deepspeed.zero.register_external_parameter(sub, child.weight)
    z3 = [(int(p.ds_tensor.numel()), int(p.ds_numel)) for p in module.parameters() if hasattr(p, "ds_numel")]
    stats = {"params": len(z3), "partitioned": sum(loc < full for loc, full in z3),
             "local_numel": sum(loc for loc, _ in z3), "numel": sum(f for _, f in z3), "world_size": env.world_size,
             "zero_init": bool(zero_init)}
    return module, stats


def _featurize(featurizer: Any, samples: list[dict], keys: list[str]) -> dict[str, Any]:
    try:
        return featurizer(samples)
    except PromptError as e:
        raise CacheError(f"cannot build the label sequence: {e}") from None


FAULT_ENV = "STC_FAULT_KILL_AT"   # tests only: "<shard name>:<batch>" -> SIGKILL self after that batch


def _fault_point(shard: str, batch: int) -> None:
    """Fault injection for the kill-and-resume test: a real SIGKILL in the middle of a shard."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{shard}:{batch}":
        os.kill(os.getpid(), signal.SIGKILL)


def process_shard(model: Any, featurizer: Any, samples: list[dict], recipe: Any, vocab: int, device: Any,
                  timings: dict[str, float], shard: str = "", zero3: bool = False,
                  on_batch: Any = None) -> list[bytes]:
    """Decoded samples of one audio shard -> one record per sample (in order; :func:`shard_bytes` packs them).

    ``zero3``: every batch makes the same teacher calls whatever its data (module docstring);
    ``on_batch(n)``: called after each batch with its sample count (progress)."""
    c = recipe.cache
    records: list[bytes] = []
    bs = c.batch_size
    for s0 in range(0, len(samples), bs):
        chunk = samples[s0:s0 + bs]
        keys = [s["key"] for s in chunk]
        t0 = time.perf_counter()
        batch = _featurize(featurizer, chunk, keys)
        t1 = time.perf_counter()
        labels = batch["labels"]
        per: list[list[Target]] = [[] for _ in chunk]
        ref_ids = [labels[i][labels[i] != IGNORE].numpy().astype(np.int64) for i in range(len(chunk))]
        if "ref" in c.targets:
            topks = word_level(model, batch, c.k, vocab, device, zero3)
            for i, tk in enumerate(topks):
                per[i].append(Target("ref", ref_ids[i], tk))
        t2 = time.perf_counter()
        timings["featurize"] += t1 - t0
        timings["word_level"] += t2 - t1
        if "teacher" in c.targets:
            t3 = time.perf_counter()
            texts, prompt_ids = greedy(model, featurizer, chunk, c.max_new_tokens, device,
                                       **({"zero3": True} if zero3 else {}))
            timings["generate"] += time.perf_counter() - t3
            tsamples, tidx = [], []
            teach: list[Target] = []
            for i, (s, text) in enumerate(zip(chunk, texts)):
                meta = dict(s["meta"], tgt_text=text)
                equal = _norm(text) == _norm(s["meta"].get("tgt_text", ""))
                try:
                    enc = featurizer.builder.encode(meta, prompt_ids[i], audio=featurizer.use_audio and
                                                    s.get("audio") is not None, key=s["key"])
                    ids = np.array([t for t in enc.labels if t != IGNORE], np.int64)
                    t = Target("teacher", ids, text=text, equals_ref=equal)
                    if c.teacher_topk and not equal:
                        tsamples.append(dict(s, meta=meta))
                        tidx.append(i)
                except PromptError:   # the teacher said nothing: no sequence-level sample for this key
                    t = Target("teacher", np.zeros(0, np.int64), text=text, equals_ref=equal, empty=True)
                teach.append(t)
            if tsamples:
                t4 = time.perf_counter()
                tb = _featurize(featurizer, tsamples, [s["key"] for s in tsamples])
                for j, tk in zip(tidx, word_level(model, tb, c.k, vocab, device, zero3)):
                    teach[j].topk = tk
                timings["word_level_teacher"] += time.perf_counter() - t4
            elif zero3 and c.teacher_topk:   # keep the collectives in lockstep: same call, result discarded
                word_level(model, batch, c.k, vocab, device, zero3)
            for i, t in enumerate(teach):
                per[i].append(t)
        for s, targets in zip(chunk, per):
            records.append(encode_record(targets, vocab))
        _fault_point(shard, s0 // bs)
        if on_batch is not None:
            on_batch(len(chunk))
    return records
