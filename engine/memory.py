"""What one training or inference step holds per rank, and what its ranks send per optimizer step.

Pure functions of shapes (no torch, no ranks): :mod:`engine.zero` picks the ZeRO stage and gradient
checkpointing with them, :mod:`engine.preflight` prints them for every step of a plan. Symbols: ``P``
all parameters, ``P_t`` trainable ones, ``W`` ranks, ``d`` bytes of the compute dtype (2 for bf16/fp16,
4 for fp32), ``B`` the micro batch, ``R`` the ds_config's ``reduce_bucket_size`` (elements).

**Weights.** The model as held during training: every floating-point parameter in ``d`` bytes
(``deepspeed.initialize`` casts them all to the ds_config's bf16/fp16, LoRA adapters and QLoRA's
upcast norms included), the frozen nf4 linears packed at half a byte per weight plus their quant
constants (:func:`engine.models.counts.param_counts`). ZeRO-3 shards them: ``/ W``.

**Gradients, DeepSpeed's buffers, optimizer** (read from DeepSpeed 0.19's ``engine.py``,
``zero/stage_1_and_2.py``, ``zero/stage3.py``; ``grad_accum_dtype`` unset, so gradients are kept in
``d``; the engine's torch AdamW keeps two fp32 moments):

=======  ====================================  =========================================  ==============
stage    gradients                             DeepSpeed buffers                          optimizer
=======  ====================================  =========================================  ==============
0        ``d P_t`` (param.grad)                ``4 P_t`` fp32 flat gradient at the step   ``12 P_t``
         (bf16/fp16: ``FP16_Optimizer`` with                                              (fp32 master
         fp32 master; fp32 model: none)                                                   + 2 moments)
1        ``d P_t`` (full, kept over the        ``4 P_t / W`` fp32 gradient partition at   ``12 P_t / W``
         accumulation)                         the step + ``2 d R`` reduce buckets
                                               (two with ``overlap_comm``)
2        ``d P_t / W`` (``grads_in_partition``) as stage 1                                 ``12 P_t / W``
3        ``d P_t / W``                         ``4 min(P_t/W, 1e9)`` fp32 sub-group        ``12 P_t / W``
                                               gradient + ``d R`` reduce bucket + ``d G``
                                               gathered weights
=======  ====================================  =========================================  ==============

With an fp32 model (``d = 4``) there is no separate master copy: the optimizer column is ``8 P_t``
(``/ W``). ``G`` (ZeRO-3's gathered, not yet released weights) is taken as two decoder layers (the
one computing and the prefetched next) plus ``stage3_prefetch_bucket_size``, capped by
``stage3_max_live_parameters``. CPU offload moves the master weights, moments and fp32 gradients to
the host.

**Activations** (bytes saved for backward, per sample; measured against
``torch.autograd.graph.saved_tensors_hooks`` on a tiny Qwen2-Audio in ``tests/test_memory.py``).
Sequence: ``S`` encoder positions (Qwen2-Audio pads every clip to 30 s = 3000 mel frames, two convs
halve that to 1500), ``A`` audio tokens (the encoder's output pooled by 2: 750 for 30 s), ``T = A +
prompt + labels`` decoder tokens, ``N`` label tokens (the only rows the output layer sees, see
:func:`engine.train.trainer.head_at_label_rows`). Decoder dims ``h`` hidden, ``i`` intermediate,
``q = heads * head_dim``, ``k = kv_heads * head_dim``, ``V`` vocabulary rows; encoder ``D``, ``F``
(ffn), ``a`` heads. ``full`` trains every weight; ``adapters`` (LoRA/QLoRA, rank ``r``, all linear
layers) freezes the base, so a frozen op saves only what the gradient of its *input* needs. Per
decoder layer and token (HF ``Qwen2DecoderLayer`` with SDPA/flash attention, no dropout):

* two RMSNorms: the fp32 upcast of the input ``4h`` (saved by ``pow``), ``4`` (rsqrt), and in
  ``full`` the normalised ``d h`` for the weight's gradient;
* q/k/v input ``d h``; rotated q, k and v ``d (q + 2k)``; attention output ``d q`` (shared with
  ``o_proj``'s input); log-sum-exp ``4 * heads``;
* MLP input ``d h``, gate, SiLU output, up and their product ``4 d i``;
* ``adapters``: the rank-``r`` output of each of the 7 ``lora_A`` (``7 r d``).

Per encoder layer and position (Whisper-style, LayerNorm + GELU): ``9 d D + 2 d F + 4 a + 16`` (two
LayerNorm inputs with mean/rstd, q/k/v input, q/k/v/output, out_proj's input (a copy), fc1 input,
GELU input, fc2 input), plus
``6 r d`` with adapters. Around them: the conv stem in ``full`` (``d (128 * 2S + 2D * 2S + D S)``:
conv1 input, GELU and conv2 input, GELU), the pooling input ``d D S``, the post-LayerNorm and
projector input ``(2 d D + 8) S/2``, the audio merge's masks (a byte per token), the rotary tables
``2 d head_dim`` per token, the final RMSNorm, the selected label rows ``d h N`` (``full``; their mask: a byte per token) and the
loss: logits ``d V N`` plus the chunked loss's saved gradient, ``d V N`` per term (CE, and KD
when distilling). An eager attention adds ``(4 + d) * heads * T^2`` per decoder layer (``a S^2`` for
the encoder), not modelled further.

Gradient checkpointing (HF, non-reentrant, per decoder and encoder layer) keeps only each layer's
input (``d h`` per token, ``d D`` per position) and recomputes one layer at a time in backward:
``saved = outside-layer terms + L d h T + L_a d D S``, and the larger of one decoder or encoder
layer comes back during backward (counted in the transient).

Transient peak on top of the saved bytes, the larger of the forward's and the backward's: the
loss's fp32 chunk (``16 c V``, ``c = min(N, 1024)``), or in backward the gradient of the logits
(``d V N``), the recomputed layer (checkpointing) and a layer's gradient working set
(``d T (2 h + i)``). The online KD teacher (bf16, frozen, outside DeepSpeed) adds its weights
plus a forward's working set (no grad): its label-row logits ``d V N`` and one layer.

**Fit.** A choice fits when ``weights + grads + buffers + optimizer + activations + teacher <=
(1 - FRAGMENTATION) * device - CUDA_CONTEXT`` (5% for the caching allocator's fragmentation, 1 GiB
for the CUDA context and NCCL's buffers).

**Inference** (importance, cache build, evaluate): weights plus the batch's KV cache ``2 L k d B
(A + prompt + max_new_tokens)``, one layer's prefill working set ``d B T (4 h + 2 i)``, one encoder
layer's ``d B S (4 D + F)`` and the logits of the scored rows (fp32).

**Communication** per optimizer step and rank, with the standard ring algorithms over ``N`` ranks
(NCCL's ring: a rank sends ``2 (N-1)/N * S`` bytes for an all-reduce of ``S`` bytes, ``(N-1)/N * S``
for a reduce-scatter or an all-gather of ``S`` bytes in total), ``G = d P_t`` (gradients), ``M``
micro steps per optimizer step (the accumulation):

* ZeRO-0: one all-reduce of the gradients at the step: ``2 (N-1)/N * G``;
* ZeRO-1: reduce-scatter of the gradients at the step, all-gather of the updated weights:
  ``2 (N-1)/N * G``;
* ZeRO-2: reduce-scatter at every micro step (the gradient is kept partitioned), all-gather once:
  ``(M + 1) (N-1)/N * G``;
* ZeRO-3: all-gather of every weight in forward and again in backward, reduce-scatter of the
  gradients, every micro step: ``M (N-1)/N * (2 d P + G)``.

Time = bytes / bandwidth: across nodes a ring's every link carries the same bytes, so a node's
interconnect (``run.interconnect_gbps``, default 400 Gb/s per node) bounds it; on one node the
NVLink bus (``INTRA_NODE_GBPS``) does. Latency and overlap with compute are not modelled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .models import families

GIB = 2**30
FRAGMENTATION = 0.05            # share of the device the caching allocator loses to fragmentation
CUDA_CONTEXT_BYTES = 1.0 * GIB  # CUDA context, cuBLAS workspace, NCCL buffers per rank
INTRA_NODE_GBPS = 2400.0        # NVLink bus bandwidth within one 8-GPU node (300 GB/s), conservative
DEFAULT_INTERCONNECT_GBPS = 400.0
PROMPT_TOKENS = 48              # chat template, system turn and instruction around the audio (default prompts)
LABEL_TOKENS_PER_S = 6.0        # translation tokens per second of speech, incl. the end token (planning bound)
MEL_FRAMES_PER_S = 100          # Whisper features: 10 ms hop
LOSS_CHUNK = 1024               # rows per chunk of engine.train.losses
STAGE3_SUBGROUP = 1_000_000_000  # DeepSpeed's sub_group_size default (elements)
LORA_LINEARS_DECODER = 7        # q, k, v, o, gate, up, down
LORA_LINEARS_ENCODER = 6        # q, k, v, out, fc1, fc2


@dataclass(frozen=True)
class Dims:
    """Shapes that activations depend on (from ``config.json``; ``audio_d = 0`` for a text model)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    audio_d: int = 0
    audio_ffn: int = 0
    audio_layers: int = 0
    audio_heads: int = 0
    audio_positions: int = 0      # encoder positions after the convs (max_source_positions)
    mel_bins: int = 128
    audio_tokens_per_s: float = 0.0   # the family's decoder tokens per second of audio (0: Whisper + pooling, 25)
    audio_chunk_s: float = 0.0        # audio padded to whole chunks of this many seconds first (0: no padding)

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (for ZeRO-3's gathered set)."""
        h, q, k = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * (q + 2 * k) + q * h + 3 * h * self.intermediate


def dims_of(config: Any) -> Dims:
    """:class:`Dims` of a transformers config (an audio-LM, or a causal LM). The activation estimates model
    the audio encoder as Whisper-shaped (layers over ``audio_positions`` frames); for another encoder they
    are an estimate of the same order, not a measurement."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    try:
        fam = families.detect(config.to_dict()) if hasattr(config, "to_dict") else None
    except families.UnsupportedModel:
        fam = None
    if fam is not None and fam.audio_config:
        audio = getattr(config, fam.audio_config, None)
    else:
        audio = next((getattr(config, f.audio_config) for f in families.registry().values()
                      if f.audio_config and getattr(config, f.audio_config, None) is not None), None)
    extra: dict[str, Any] = {}
    if audio is not None:
        def first(*names: str, default: int = 0) -> int:
            for n in names:
                v = getattr(audio, n, None)
                if isinstance(v, int) and v > 0:
                    return v
            return default

        # Whisper-style names (Qwen2-Audio, the Omni thinker), else Conformer-style ones (Phi-4-multimodal,
        # whose 30 s of 100 mel frames per second shrink by its time reduction; Granite Speech, which stacks
        # two frames and widens its feed-forward by feedforward_mult)
        positions = first("max_source_positions") or 3000 // first("time_reduction", default=2)
        d = first("d_model", "hidden_size", "hidden_dim")
        extra = dict(audio_d=d, audio_ffn=first("encoder_ffn_dim", "intermediate_size") or d * first("feedforward_mult"),
                     audio_layers=first("encoder_layers", "num_blocks", "num_hidden_layers", "num_layers"),
                     audio_heads=first("encoder_attention_heads", "num_attention_heads", "num_heads"),
                     audio_positions=positions, mel_bins=first("num_mel_bins", "input_size", "input_dim", default=128))
        if fam is not None:
            extra.update(audio_tokens_per_s=fam.audio_tokens_per_s,
                         audio_chunk_s=2 * positions / MEL_FRAMES_PER_S if fam.audio_chunked else 0.0)
    return Dims(hidden=h, intermediate=int(text.intermediate_size), layers=int(text.num_hidden_layers),
                heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
                vocab=int(text.vocab_size), **extra)


@dataclass(frozen=True)
class Seq:
    """One sample as the model sees it: ``audio_tokens`` + ``prompt_tokens`` + ``label_tokens`` decoder
    tokens; the encoder runs over ``dims.audio_positions`` whenever there is audio."""
    audio_tokens: int
    prompt_tokens: int
    label_tokens: int

    @property
    def tokens(self) -> int:
        return self.audio_tokens + self.prompt_tokens + self.label_tokens


def audio_tokens(seconds: float, dims: Dims) -> int:
    """The decoder tokens of a clip of ``seconds``: at the family's rate (``Family.audio_tokens_per_s``, after padding
    to whole chunks where it pads), else Whisper-style (Qwen2-Audio, the Omni thinker): mel frames -> conv stride 2
    -> pooling stride 2."""
    if not dims.audio_d:
        return 0
    if dims.audio_tokens_per_s:
        if dims.audio_chunk_s:
            seconds = math.ceil(max(seconds, 1e-9) / dims.audio_chunk_s) * dims.audio_chunk_s
        return int(math.ceil(seconds * dims.audio_tokens_per_s))
    frames = min(int(math.ceil(seconds * MEL_FRAMES_PER_S)), 2 * dims.audio_positions)
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def training_seq(max_audio_s: float, dims: Dims) -> Seq:
    """The longest sample a training step plans for: ``max_audio_s`` of speech, the default prompt,
    ``LABEL_TOKENS_PER_S`` label tokens per second (at least 32)."""
    return Seq(audio_tokens(max_audio_s, dims), PROMPT_TOKENS, max(32, int(math.ceil(max_audio_s * LABEL_TOKENS_PER_S))))


# ----------------------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class Activations:
    saved: float          # bytes autograd holds at the end of the forward
    transient: float      # working set on top of it at the peak (loss chunk / logits gradient, a layer's backward)
    parts: dict = field(default_factory=dict, compare=False)

    @property
    def peak(self) -> float:
        return self.saved + self.transient


def decoder_layer_bytes(dims: Dims, d: int, *, adapters: bool, lora_r: int) -> float:
    """Saved bytes of one decoder layer per token (module docstring)."""
    h, i = dims.hidden, dims.intermediate
    q, k = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    norm = 4 * h + 4 + (0 if adapters else d * h)
    b = 2 * norm + d * h + d * (2 * q + 2 * k) + 4 * dims.heads + d * h + 4 * d * i
    if adapters:
        b += LORA_LINEARS_DECODER * lora_r * d
    return float(b)


def encoder_layer_bytes(dims: Dims, d: int, *, adapters: bool, lora_r: int) -> float:
    """Saved bytes of one audio-encoder layer per position (module docstring)."""
    D = dims.audio_d
    b = 9 * d * D + 2 * d * dims.audio_ffn + 4 * dims.audio_heads + 16
    if adapters:
        b += LORA_LINEARS_ENCODER * lora_r * d
    return float(b)


def activation_bytes(dims: Dims, seq: Seq, *, batch: int, dtype_bytes: int, adapters: bool, lora_r: int = 0,
                     checkpointing: bool = False, kd: bool = False, audio_trainable: bool = True) -> Activations:
    """Activation memory of one micro batch of ``batch`` samples like ``seq`` (module docstring).

    ``adapters``: LoRA/QLoRA (frozen base); ``audio_trainable``: the encoder has trainable weights (full,
    or adapters on the audio tower): without, the encoder saves nothing."""
    d, T, N = dtype_bytes, seq.tokens, seq.label_tokens
    h = dims.hidden
    S = dims.audio_positions if (dims.audio_d and seq.audio_tokens) else 0
    dec_layer = decoder_layer_bytes(dims, d, adapters=adapters, lora_r=lora_r) * T
    enc_layer = encoder_layer_bytes(dims, d, adapters=adapters, lora_r=lora_r) * S if audio_trainable else 0.0
    D = dims.audio_d
    p: dict[str, float] = {}
    if S and audio_trainable:
        p["encoder stem"] = 0.0 if adapters else d * (dims.mel_bins * 2 * S + 2 * D * 2 * S + D * S)
        p["encoder tail"] = d * D * S + (2 * d * D + 8) * (S // 2)
        if adapters:
            p["encoder tail"] += lora_r * d * (S // 2)       # the projector's adapter
            p["encoder tail"] -= (d * D + 8) * S             # the first layer's input needs no gradient
    p["decoder stem"] = (0 if adapters else 8 * T) + (T + seq.audio_tokens if S else 0) + 2 * d * dims.head_dim * T
    p["decoder tail"] = (4 * h + 4 + (0 if adapters else d * h)) * T + (0 if adapters else d * h * N) + T
    recompute = 0.0
    if checkpointing:
        p["decoder layers"] = dims.layers * d * h * T
        p["encoder layers"] = dims.audio_layers * d * D * S if audio_trainable else 0.0
        recompute = max(dec_layer, enc_layer)       # one layer recomputed at a time in backward
    else:
        p["decoder layers"] = dims.layers * dec_layer
        p["encoder layers"] = dims.audio_layers * enc_layer
    p["logits + loss"] = d * dims.vocab * N * (2 + (1 if kd else 0))
    per_sample = sum(p.values())
    c = min(N * batch, LOSS_CHUNK)
    backward = batch * (d * dims.vocab * N + recompute + d * T * (2 * h + dims.intermediate))
    transient = max(16.0 * c * dims.vocab, backward)
    return Activations(per_sample * batch, float(transient), {k: v * batch for k, v in p.items()})


# ----------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainMemory:
    stage: int
    offload: bool
    checkpointing: bool
    weights: float
    grads: float          # gradients + DeepSpeed's fp32 gradient / bucket / gather buffers
    optimizer: float
    activations: float
    teacher: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.teacher


@dataclass(frozen=True)
class Buckets:
    """DeepSpeed sizes (elements) that allocate buffers; defaults are the engine's ds_configs."""
    reduce: int = 200_000_000          # ds_configs/zero2.json reduce_bucket_size
    reduce_stage3: int = 500_000_000   # DeepSpeed's default (ds_configs/zero3.json leaves it unset)
    overlap_comm: bool = True
    prefetch: int = 50_000_000         # stage3_prefetch_bucket_size (the engine sets 0.9 h^2)
    max_live: int = 1_000_000_000      # stage3_max_live_parameters


def usable_bytes(device_bytes: float) -> float:
    return device_bytes * (1 - FRAGMENTATION) - CUDA_CONTEXT_BYTES


def train_memory(stage: int, *, n_params: int, n_trainable: int, weight_bytes: float, world_size: int,
                 dtype_bytes: int, activations: Activations, checkpointing: bool, offload: bool = False,
                 teacher_bytes: float = 0.0, buckets: Buckets = Buckets(), layer_params: int = 0) -> TrainMemory:
    """Per-rank bytes of one training step under ZeRO-``stage`` (module docstring's table).

    ``weight_bytes``: all weights as held (dtype; nf4 packed + constants), not per parameter."""
    w = max(1, world_size)
    d = dtype_bytes
    pt = float(n_trainable)
    mixed = d < 4
    weights = weight_bytes / (w if stage >= 3 else 1)
    shard = w if stage >= 1 else 1
    master = (4.0 if mixed else 0.0) * pt / shard
    moments = 8.0 * pt / shard
    if stage == 0:
        grads = d * pt + (4.0 * pt if mixed else 0.0)
    elif stage in (1, 2):
        kept = d * pt if stage == 1 else d * pt / w
        nbuf = 2 if buckets.overlap_comm else 1
        grads = kept + 4.0 * pt / w + nbuf * d * min(buckets.reduce, max(pt, 1.0)) * (1 if pt else 0)
    else:
        gathered = min(buckets.max_live, 2 * layer_params + buckets.prefetch) * d if layer_params else 0.0
        grads = d * pt / w + 4.0 * min(pt / w, STAGE3_SUBGROUP) + d * buckets.reduce_stage3 + gathered
    optimizer = master + moments
    if offload:
        # master weights, moments and fp32 gradients live on the host
        optimizer = 0.0
        grads = d * pt / w + (d * buckets.reduce_stage3 if stage >= 3 else 0.0)
        if stage >= 3:
            weights = 0.0
            grads += min(buckets.max_live, 2 * layer_params + buckets.prefetch) * d if layer_params else 0.0
    return TrainMemory(stage, offload, checkpointing, weights, grads, optimizer, activations.peak, teacher_bytes)


def teacher_bytes(teacher_weight_bytes: float, dims: Dims, seq: Seq, *, batch: int, dtype_bytes: int) -> float:
    """The online KD teacher on every rank: weights plus a no-grad forward's working set."""
    d, T = dtype_bytes, seq.tokens
    return teacher_weight_bytes + d * dims.vocab * seq.label_tokens * batch \
        + d * batch * T * (4 * dims.hidden + 2 * dims.intermediate)


# ----------------------------------------------------------------------------------------- inference

@dataclass(frozen=True)
class InferMemory:
    weights: float
    kv_cache: float
    working: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.working


def inference_memory(weight_bytes: float, dims: Dims, *, batch: int, dtype_bytes: int, audio_tokens_: int,
                     new_tokens: int, scored_rows: int = 1) -> InferMemory:
    """Weights + KV cache + working set of one generate / scoring call of ``batch`` samples."""
    d = dtype_bytes
    T = audio_tokens_ + PROMPT_TOKENS + new_tokens
    kv = 2.0 * dims.layers * dims.kv_heads * dims.head_dim * d * batch * T
    layer = d * batch * T * (4 * dims.hidden + 2 * dims.intermediate)
    enc = d * batch * dims.audio_positions * (4 * dims.audio_d + dims.audio_ffn) if audio_tokens_ else 0.0
    logits = 4.0 * batch * max(1, scored_rows) * dims.vocab
    return InferMemory(weight_bytes, kv, max(layer, enc) + logits)


# ----------------------------------------------------------------------------------------- communication

def ring_allreduce(nbytes: float, ranks: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``."""
    return 2.0 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def ring_gather(nbytes: float, ranks: int) -> float:
    """Bytes one rank sends in a ring reduce-scatter or all-gather of ``nbytes`` in total."""
    return (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def comm_bytes(stage: int, *, n_params: int, n_trainable: int, dtype_bytes: int, ranks: int, accumulation: int = 1,
               weight_bytes: float | None = None) -> float:
    """Bytes each rank sends per optimizer step (module docstring). ``weight_bytes``: what ZeRO-3 gathers
    (default ``d P``)."""
    g = float(dtype_bytes) * n_trainable
    m = max(1, accumulation)
    if stage == 0:
        return ring_allreduce(g, ranks)
    if stage == 1:
        return ring_gather(g, ranks) + ring_gather(g, ranks)
    if stage == 2:
        return m * ring_gather(g, ranks) + ring_gather(g, ranks)
    wb = float(dtype_bytes) * n_params if weight_bytes is None else weight_bytes
    return m * (2 * ring_gather(wb, ranks) + ring_gather(g, ranks))


def comm_seconds(nbytes: float, nodes: int, interconnect_gbps: float) -> float:
    """Seconds to move ``nbytes`` per rank: the node's interconnect across nodes, NVLink within one."""
    gbps = INTRA_NODE_GBPS if nodes <= 1 else interconnect_gbps
    return nbytes * 8 / (gbps * 1e9)


def fmt_gib(n: float) -> str:
    return f"{n / GIB:.1f}"
