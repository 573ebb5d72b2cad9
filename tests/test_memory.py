"""The memory rule of engine/memory.py against measurements and hand-computed numbers.

* Activations: a tiny Qwen2-Audio (bf16, SDPA, 30 s of audio = 1500 encoder positions, 750 audio
  tokens, 48 prompt and 180 label tokens) runs forward + backward with the trainer's label-row head
  and loss. Measured: the bytes autograd saves and still holds at the end of the forward
  (``saved_tensors_hooks``, de-duplicated by storage, parameters left out, freed ones subtracted) and
  the peak of live tensor bytes over forward + backward (a dispatch mode that follows every storage
  an op creates until it is freed). Tolerances: saved within 5% (checkpointing off), peak within 15%
  (full and LoRA, checkpointing on and off).
* ZeRO memory table, ring communication bytes and times: against numbers computed by hand.
* The user's ds_config: its stage wins over auto, a conflict is refused, optimizer/scheduler blocks too.
"""
from __future__ import annotations

import json
import weakref

import pytest
import torch

from engine import memory as M
from engine import zero

GiB = 2**30


def _tiny(mode: str, ckpt: bool):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    c = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=32, encoder_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=64, num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=512, max_position_embeddings=4096,
                         tie_word_embeddings=False),
        audio_token_index=511)
    for cc in (c, c.text_config, c.audio_config):
        cc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = Qwen2AudioForConditionalGeneration(c).to(torch.bfloat16).train()
    if mode == "lora":
        from engine.config import LoraConfig
        from engine.models.load import apply_lora

        m = apply_lora(m, LoraConfig(r=8, alpha=16), gradient_checkpointing=ckpt)
        for p in m.parameters():          # what deepspeed.initialize does with bf16: adapters in bf16 too
            if p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
    elif ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seq = M.Seq(750, 48, 180)
    T = seq.tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (1, T), generator=g)
    ids[:, 5:5 + seq.audio_tokens] = 511
    labels = torch.full((1, T), -100)
    labels[:, T - seq.label_tokens:] = ids[:, T - seq.label_tokens:]
    inputs = dict(input_ids=ids, attention_mask=torch.ones(1, T, dtype=torch.long),
                  input_features=torch.randn(1, 128, 3000, generator=g),
                  feature_attention_mask=torch.ones(1, 3000, dtype=torch.long))
    return m, c, seq, inputs, labels


class _Live(torch.utils._python_dispatch.TorchDispatchMode):
    """Live bytes of the storages ops create (followed until freed) and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.cur = self.peak = 0

    def _free(self, ptr: int) -> None:
        self.cur -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                ptr = s.data_ptr()
                if ptr and ptr not in self.live:
                    self.live[ptr] = s.nbytes()
                    self.cur += s.nbytes()
                    self.peak = max(self.peak, self.cur)
                    weakref.finalize(s, self._free, ptr)
        return out


def _step(m, inputs, labels):
    from engine.train.trainer import head_at_label_rows, micro_loss_sums

    with head_at_label_rows(m.get_output_embeddings(), labels):
        logits = m(**inputs).logits
    ce, _, _ = micro_loss_sums(logits, {"labels": labels}, kd=False, kd_kind="forward_kl", temperature=1.0)
    return logits, ce


def _saved_at_end_of_forward(m, inputs, labels) -> int:
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    held: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in params and ptr not in held:
            held[ptr] = s.nbytes()
            weakref.finalize(s, held.pop, ptr, None)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, ce = _step(m, inputs, labels)
    return sum(held.values()) + logits.numel() * logits.element_size(), ce


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_estimate_against_the_measured_peak(mode, ckpt):
    m, c, seq, inputs, labels = _tiny(mode, ckpt)
    est = M.activation_bytes(M.dims_of(c), seq, batch=1, dtype_bytes=2, adapters=mode == "lora", lora_r=8,
                             checkpointing=ckpt)
    if not ckpt:
        saved, _ = _saved_at_end_of_forward(m, inputs, labels)
        assert abs(est.saved / saved - 1) <= 0.05, (est.saved, saved, est.parts)
        m.zero_grad(set_to_none=True)
    live = _Live()
    with live:
        _, ce = _step(m, inputs, labels)
        ce.backward()
    grads = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
    assert abs((est.peak + grads) / live.peak - 1) <= 0.15, (est.peak + grads, live.peak, est.parts)


def test_checkpointing_keeps_only_layer_inputs():
    d7 = M.Dims(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=156032,
                audio_d=1280, audio_ffn=5120, audio_layers=32, audio_heads=20, audio_positions=1500)
    seq = M.training_seq(30.0, d7)
    assert (seq.audio_tokens, seq.prompt_tokens, seq.label_tokens) == (750, 48, 180)
    off = M.activation_bytes(d7, seq, batch=1, dtype_bytes=2, adapters=False, checkpointing=False)
    on = M.activation_bytes(d7, seq, batch=1, dtype_bytes=2, adapters=False, checkpointing=True)
    # per decoder layer and token, full bf16: 16h + 4q + 4k + 8i + 4 heads + 8 bytes (module docstring)
    assert M.decoder_layer_bytes(d7, 2, adapters=False, lora_r=0) == 16 * 4096 + 8 * 4096 + 8 * 11008 + 4 * 32 + 8
    assert on.parts["decoder layers"] == 32 * 2 * 4096 * seq.tokens
    assert on.saved < off.saved / 3
    two = M.activation_bytes(d7, seq, batch=2, dtype_bytes=2, adapters=False, checkpointing=False)
    assert two.saved == 2 * off.saved


def test_zero_memory_table_by_hand():
    act = M.Activations(1.0 * GiB, 0.0)
    kw = dict(n_params=8_000_000_000, n_trainable=8_000_000_000, weight_bytes=16e9, world_size=8, dtype_bytes=2,
              activations=act, checkpointing=False)
    b = M.Buckets()
    s0 = M.train_memory(0, **kw)
    assert (s0.weights, s0.grads, s0.optimizer) == (16e9, 16e9 + 32e9, 96e9)
    s1 = M.train_memory(1, **kw)
    assert s1.grads == 16e9 + 4e9 + 2 * 2 * b.reduce and s1.optimizer == 12e9
    s2 = M.train_memory(2, **kw)
    assert s2.grads == 2e9 + 4e9 + 2 * 2 * b.reduce and s2.optimizer == 12e9
    s3 = M.train_memory(3, **dict(kw, layer_params=200_000_000))
    assert s3.weights == 2e9 and s3.optimizer == 12e9
    assert s3.grads == 2e9 + 4e9 + 2 * b.reduce_stage3 + 2 * (2 * 200_000_000 + b.prefetch)
    assert s1.total == s1.weights + s1.grads + s1.optimizer + GiB
    fp32 = M.train_memory(1, **dict(kw, dtype_bytes=4, weight_bytes=32e9))
    assert fp32.optimizer == 8e9                       # no separate fp32 master


def test_ring_communication_by_hand():
    P, Pt = 8_000_000_000, 100_000_000
    # all-reduce of 0.2 GB over 8 ranks: 2 * 7/8 * 0.2e9
    assert M.comm_bytes(0, n_params=P, n_trainable=Pt, dtype_bytes=2, ranks=8) == pytest.approx(0.35e9)
    assert M.comm_bytes(1, n_params=P, n_trainable=Pt, dtype_bytes=2, ranks=8) == pytest.approx(0.35e9)
    # ZeRO-2 with 4 micro steps: 4 reduce-scatters + 1 all-gather, each 7/8 * 0.2e9
    assert M.comm_bytes(2, n_params=P, n_trainable=Pt, dtype_bytes=2, ranks=8, accumulation=4) == pytest.approx(0.875e9)
    # ZeRO-3, 2 micro steps over 16 ranks: 2 * (2 gathers of 16e9 + a reduce-scatter of 0.2e9) * 15/16
    assert M.comm_bytes(3, n_params=P, n_trainable=Pt, dtype_bytes=2, ranks=16, accumulation=2) == \
        pytest.approx(2 * 15 / 16 * (32e9 + 0.2e9))
    assert M.comm_bytes(1, n_params=P, n_trainable=Pt, dtype_bytes=2, ranks=1) == 0
    # 50 GB at 400 Gb/s = 1 s between nodes; on one node NVLink (2400 Gb/s)
    assert M.comm_seconds(50e9, 2, 400) == pytest.approx(1.0)
    assert M.comm_seconds(50e9, 1, 400) == pytest.approx(50e9 * 8 / 2400e9)


def test_checkpointing_auto_turns_on_only_when_needed():
    d = M.Dims(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=156032)
    seq = M.Seq(0, 48, 180)

    def acts(batch):
        return lambda ck: M.activation_bytes(d, seq, batch=batch, dtype_bytes=2, adapters=True, lora_r=64,
                                             checkpointing=ck)

    kw = dict(mode="lora", n_params=7_000_000_000, n_trainable=160_000_000, weight_bytes=2.0, world_size=8,
              device_bytes=80 * GiB, dtype="bf16")
    c = zero.choose_stage("auto", activations=acts(1), **kw)
    assert (c.stage, c.checkpointing) == (1, False) and c.memory.total <= M.usable_bytes(80 * GiB)
    big = zero.choose_stage("auto", activations=acts(64), **kw)
    assert big.checkpointing and big.stage == 1, big.reason
    assert not zero.choose_stage("auto", activations=acts(64), checkpointing=False, **kw).checkpointing
    assert zero.choose_stage("auto", activations=acts(1), checkpointing=True, **kw).checkpointing


def test_user_ds_config_stage_wins_and_conflicts_are_refused(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert zero.requested_stage("auto", str(p), "distill") == "2"
    assert zero.requested_stage("2", str(p), "distill") == "2"
    with pytest.raises(zero.TrainConfigError, match=r"distill\.zero_stage=3 conflicts with zero_optimization\.stage=2 "
                                                    r"in .*ds\.json \(distill\.ds_config\)"):
        zero.requested_stage("3", str(p), "distill")
    q = tmp_path / "nostage.json"
    q.write_text(json.dumps({"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 1000}}))
    assert zero.requested_stage("auto", str(q), "finetune") == "auto"
    assert zero.buckets_of(str(q)).reduce == 1000 and not zero.buckets_of(str(q)).overlap_comm


def test_user_optimizer_and_scheduler_blocks_are_refused(tmp_path):
    p = tmp_path / "opt.json"
    p.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                             "scheduler": {"type": "WarmupLR"}, "zero_optimization": {"stage": 1}}))
    with pytest.raises(zero.TrainConfigError) as e:
        zero.load_template(1, False, str(p), "finetune")
    msg = str(e.value)
    assert str(p) in msg and "'optimizer' and 'scheduler'" in msg and "finetune.lr" in msg and "finetune.schedule" in msg
    with pytest.raises(zero.TrainConfigError, match="optimizer"):
        zero.requested_stage("auto", str(p), "finetune")
    with pytest.raises(zero.TrainConfigError, match="optimizer"):
        zero.fill_config({"optimizer": {}}, stage=1, micro_batch=1, accum=1, world_size=1, dtype="bf16",
                         grad_clip=1.0, offload=False)
