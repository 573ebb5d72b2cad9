"""Trainer pieces that need no DeepSpeed launch: batch arithmetic, the ZeRO rule, "auto" filling, the
lr schedule, the loss on cached-style targets built from a live teacher, run identity, checkpoint listing.

The end-to-end runs with real DeepSpeed on 2 ranks are in ``test_train_ds.py``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine import zero as tds
from engine.train import checkpoint as train_ckpt
from engine.train import trainer as train

GiB = 2 ** 30


def test_accumulation_and_refusal_names_the_numbers():
    assert tds.accumulation(8, 2, 2) == 2
    assert tds.accumulation(4, 2, 2) == 1
    with pytest.raises(tds.TrainConfigError, match=r"global batch 6 does not divide by micro batch 2 x world size 2 = 4"):
        tds.accumulation(6, 2, 2)


def test_zero_rule_lora_stays_replicated_full_shards_what_it_must():
    seven_b = dict(n_params=7_000_000_000, weight_bytes=2.0, device_bytes=80 * GiB)
    # LoRA: 1.7% trainable, base fits replicated -> ZeRO-0 (no gather of the frozen base)
    c = tds.choose_stage("auto", mode="lora", n_trainable=120_000_000, world_size=8, **seven_b)
    assert c.stage == 0 and not c.offload
    c = tds.choose_stage("auto", mode="qlora", n_trainable=120_000_000, world_size=8,
                         n_params=7_000_000_000, weight_bytes=0.56, device_bytes=80 * GiB)
    assert c.stage == 0
    # full 7B on 8 GPUs: 16 B/param replicated is 112 GB -> shard optimizer (1) or also grads (2)
    c = tds.choose_stage("auto", mode="full", n_trainable=7_000_000_000, world_size=8, **seven_b)
    assert c.stage in (1, 2)
    # full 13B on 8 GPUs of 48 GiB: ZeRO-2 needs 26 + 3.25 + 6.5 (fp32 grads) + 0.8 (buckets) + 19.5 GB
    # = 52.2 GiB of the 44.6 GiB usable -> ZeRO-3 (3.25 x 2 + 6.5 + 1 + 19.5 GB, ~30 GiB)
    c = tds.choose_stage("auto", mode="full", n_trainable=13e9, world_size=8, n_params=13e9, weight_bytes=2.0,
                         device_bytes=48 * GiB)
    assert c.stage == 3 and not c.offload
    # full 7B on 2 GPUs of 48 GiB: ~66 GiB even under ZeRO-3 (42 GB of it optimizer state) -> offload
    assert tds.choose_stage("auto", mode="full", n_trainable=7e9, world_size=2,
                            **dict(seven_b, device_bytes=48 * GiB)).offload
    # one 24 GB GPU: nothing fits -> ZeRO-3 + offload
    c = tds.choose_stage("auto", mode="full", n_trainable=7_000_000_000, world_size=1,
                         n_params=7_000_000_000, weight_bytes=2.0, device_bytes=24 * GiB)
    assert c.stage == 3 and c.offload
    # the base does not fit -> LoRA goes to 3; QLoRA is refused rather than sharded
    c = tds.choose_stage("auto", mode="lora", n_trainable=1e8, world_size=4, n_params=70e9, weight_bytes=2.0,
                         device_bytes=80 * GiB)
    assert c.stage == 3
    with pytest.raises(tds.TrainConfigError, match="qlora"):
        tds.choose_stage("auto", mode="qlora", n_trainable=1e8, world_size=4, n_params=400e9, weight_bytes=0.56,
                         device_bytes=80 * GiB)


def test_forced_and_unknown_stages():
    kw = dict(mode="lora", n_params=1000, n_trainable=10, weight_bytes=2.0, world_size=2, device_bytes=GiB)
    assert tds.choose_stage("3", **kw).stage == 3
    with pytest.raises(tds.TrainConfigError, match="unknown DeepSpeed ZeRO stage '5'"):
        tds.choose_stage("5", **kw)
    with pytest.raises(tds.TrainConfigError, match="qlora under ZeRO-3 is refused"):
        tds.choose_stage("3", **dict(kw, mode="qlora"))


def test_unknown_stage_in_the_config_is_refused(stc_cmd, stc_env):
    import subprocess

    r = subprocess.run([*stc_cmd, "distill", "distill.zero_stage=4"], env=stc_env, capture_output=True, text=True)
    assert r.returncode == 2 and "distill.zero_stage: 4 is not one of" in r.stderr


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (3, True)])
def test_fill_config_leaves_no_auto(stage, offload):
    t = tds.load_template(stage, offload)
    ds = tds.fill_config(t, stage=stage, micro_batch=2, accum=3, world_size=2, dtype="bf16", grad_clip=1.0,
                         offload=offload, hidden_size=64, on_cpu=True, param_persistence_threshold=0 if stage == 3 else None)
    assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == stage
    assert "auto" not in json.dumps(ds)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
        assert ("offload_param" in ds["zero_optimization"]) == offload
    else:
        assert not any(k.startswith("stage3_") for k in ds["zero_optimization"])


def test_lr_schedules():
    f = lambda s, sch, w=0: train.lr_factor(s, total=10, warmup=w, schedule=sch)  # noqa: E731
    assert f(0, "cosine") == 1.0 and f(5, "cosine") == pytest.approx(0.5) and f(10, "cosine") == pytest.approx(0.0)
    assert f(5, "linear") == pytest.approx(0.5) and f(7, "constant") == 1.0
    assert [f(s, "constant", 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cached_style_targets_from_a_live_teacher_match_full_vocab_kd():
    """kd_* built like the cache (row t = teacher distribution for labels[t]) with k = V give exactly the
    full-vocabulary KD, with the causal shift in the right place."""
    from engine.train import losses

    torch.manual_seed(0)
    b, t, v = 2, 7, 11
    s_logits = torch.randn(b, t, v, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(b, t, v, dtype=torch.float64)
    labels = torch.full((b, t), -100)
    labels[0, 3:6] = torch.tensor([1, 2, 3])
    labels[1, 5:7] = torch.tensor([4, 5])
    batch = {"labels": labels, **train.topk_targets(t_logits, labels, k=v, vocab_size=v)}
    assert batch["kd_mask"].sum() == 5 and batch["kd_ids"].shape == (b, t, v)
    ce, kd, n = train.micro_loss_sums(s_logits, batch, kd=True, kd_kind="forward_kl", temperature=1.0)
    assert n == 5
    pos = labels[:, 1:] != -100
    ref_kd = losses.forward_kl_full(s_logits[:, :-1][pos], t_logits[:, :-1][pos]).total
    ref_ce = torch.nn.functional.cross_entropy(s_logits[:, :-1][pos], labels[:, 1:][pos], reduction="sum")
    assert float(kd) == pytest.approx(float(ref_kd), rel=1e-6)
    assert float(ce) == pytest.approx(float(ref_ce), rel=1e-6)
    # a pad batch (all labels -100) contributes nothing but keeps the graph
    pad = {"labels": torch.full((1, 4), -100), **train.topk_targets(t_logits[:1, :4], torch.full((1, 4), -100), 3, v)}
    ce0, kd0, n0 = train.micro_loss_sums(s_logits[:1, :4], pad, kd=True, kd_kind="forward_kl", temperature=1.0)
    assert n0 == 0 and float(ce0) == 0.0 and ce0.requires_grad


def test_topk_tail_is_the_mass_outside():
    logits = torch.randn(1, 3, 20)
    labels = torch.tensor([[-100, 5, 6]])
    out = train.topk_targets(logits, labels, k=4, vocab_size=20)
    lp = torch.log_softmax(logits[0, 0], -1)
    top = lp.topk(4)
    assert torch.allclose(out["kd_logprobs"][0, 1], top.values)
    mass = top.values.exp().sum() + out["kd_tail"][0, 1].exp()
    assert float(mass) == pytest.approx(1.0, abs=1e-6)


def test_identity_diff_names_keys():
    d = train.identity_diff({"distill.lr": 1e-5, "mode": "lora"}, {"distill.lr": 1e-4, "mode": "lora"})
    assert d == ["distill.lr: checkpoint has 1e-05, this run 0.0001"]


def test_half_written_checkpoints_are_never_listed(tmp_path: Path):
    root = tmp_path / "checkpoints"
    good = root / "step-00000004"
    good.mkdir(parents=True)
    (good / "state.json").write_text(json.dumps({"step": 4}))
    (good / "meta.json").write_text("{}")
    (root / ".step-00000006.tmp-123").mkdir()                      # being written / killed mid-write
    (root / ".step-00000006.tmp-123" / "state.json").write_text(json.dumps({"step": 6}))
    nometa = root / "step-00000005"                                  # no meta.json: not finished
    nometa.mkdir()
    (nometa / "state.json").write_text(json.dumps({"step": 5}))
    assert [s for s, _ in train_ckpt.list_checkpoints(root)] == [4]
    for s in (8, 10):
        d = root / f"step-{s:08d}"
        d.mkdir()
        (d / "state.json").write_text(json.dumps({"step": s}))
        (d / "meta.json").write_text("{}")
    train_ckpt.prune(root, keep_last=2)
    assert [s for s, _ in train_ckpt.list_checkpoints(root)] == [8, 10]
    assert not (root / ".step-00000006.tmp-123").exists()


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    st = train_ckpt.rng_state()
    torch.save([st], tmp_path / "rng.pt")
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    train_ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)[0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    assert math.isfinite(a[0])


# ============================================================================================ label-row logits

def _reference_sums(logits, batch):
    """The plain full-logits reference: CE and forward KL over every label row of [B, T, V], the teacher
    distribution read back from the k = V top-k fields (so both sides see the same fp32 targets)."""
    from engine.train import losses

    pos = batch["labels"][:, 1:] != -100
    rows = logits[:, :-1][pos]
    ce = torch.nn.functional.cross_entropy(rows, batch["labels"][:, 1:][pos], reduction="sum")
    t_logp = torch.empty(rows.shape, dtype=torch.float64).scatter_(
        1, batch["kd_ids"][:, 1:][pos], batch["kd_logprobs"][:, 1:][pos].double())
    kd = losses.forward_kl_full(rows, t_logp).total
    return ce, kd


@pytest.mark.parametrize("kind,mode", [("causal_lm", "full"), ("qwen2audio", "lora")])
def test_label_row_logits_equal_full_logits_in_loss_and_gradient(kind, mode):
    """The trainer's forward (hidden states sliced at label positions before lm_head) gives the losses and
    gradients of full-sequence logits; the online teacher's top-k fields are the same from rows."""
    from engine.config import LoraConfig
    from engine.models.load import apply_lora
    from engine.models.tiny import make_tiny

    model, _ = make_tiny("causal_lm" if kind == "causal_lm" else "qwen2audio", num_layers=2, dtype="fp32", seed=0)
    model = model.double().train()
    if mode == "lora":
        torch.manual_seed(0)
        model = apply_lora(model, LoraConfig(r=4, alpha=8))
        for n, p in model.named_parameters():          # B = 0 would make the LoRA gradients trivial
            if ".lora_B." in n:
                torch.nn.init.normal_(p, std=0.1)
    head = model.get_output_embeddings()
    v = head.weight.shape[0]
    torch.manual_seed(1)
    b, t = 3, 9
    ids = torch.randint(5, 200, (b, t))
    labels = torch.full((b, t), -100)
    labels[0, 4:9] = ids[0, 4:9]
    labels[1, 7:9] = ids[1, 7:9]                      # sample 2: no labels at all
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "teacher_logits": torch.randn(b, t, v, dtype=torch.float64)}
    batch.update(train.topk_targets(batch["teacher_logits"], labels, k=v, vocab_size=v))
    trainable = [p for p in model.parameters() if p.requires_grad]

    full = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert full.shape == (b, t, v)
    ce_ref, kd_ref = _reference_sums(full, batch)
    # text-only input: the audio tower's adapters get no gradient on either path
    g_ref = torch.autograd.grad(ce_ref + 0.5 * kd_ref, trainable, allow_unused=True, materialize_grads=True)

    with train.head_at_label_rows(head, labels):
        rows = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert rows.shape == (7, v)                        # only the label rows reach lm_head
    ce, kd, n = train.micro_loss_sums(rows, batch, kd=True, kd_kind="forward_kl", temperature=1.0)
    assert n == 7
    assert float(ce) == pytest.approx(float(ce_ref), rel=1e-10)
    assert float(kd) == pytest.approx(float(kd_ref), rel=1e-9, abs=1e-12)
    g = torch.autograd.grad(ce + 0.5 * kd, trainable, allow_unused=True, materialize_grads=True)
    assert any(bool(r.abs().sum() > 0) for r in g_ref)
    for a, r in zip(g, g_ref):
        assert torch.allclose(a, r, rtol=1e-8, atol=1e-12)
    assert not head._forward_pre_hooks                # the hook is gone after the block

    # online teacher: top-k fields from label rows == from full logits
    k = 5
    with torch.no_grad(), train.head_at_label_rows(head, labels):
        t_rows = model(input_ids=ids).logits
    t_full = model(input_ids=ids).logits.detach()
    a, r = train.topk_targets(t_rows, labels, k, v), train.topk_targets(t_full, labels, k, v)
    assert torch.equal(a["kd_ids"], r["kd_ids"]) and torch.equal(a["kd_mask"], r["kd_mask"])
    assert torch.allclose(a["kd_logprobs"], r["kd_logprobs"]) and torch.allclose(a["kd_tail"], r["kd_tail"])


def test_label_rows_refuse_unaligned_hidden_states():
    head = torch.nn.Linear(4, 6)
    with pytest.raises(train.TrainError, match="expected \\[B, T, H\\] aligned with the labels"):
        with train.head_at_label_rows(head, torch.zeros(2, 5, dtype=torch.long)):
            head(torch.zeros(2, 4, 4))


def test_meta_param_counts_match_the_loaded_model(tmp_path):
    """The ZeRO stage is chosen before loading, from counts on the meta device: they equal the real ones."""
    from engine.config import LoraConfig, ModelConfig
    from engine.models.load import apply_lora, load_model
    from engine.models.tiny import build_tiny

    path = build_tiny("qwen2audio", tmp_path / "m", num_layers=2, dtype="fp32")
    mc = ModelConfig(path=str(path), dtype="fp32")
    lora = LoraConfig(r=4)
    n_all, n_train, text_cfg = train.meta_param_counts(mc, "lora", lora)
    real = apply_lora(load_model(mc), lora)
    assert n_all == sum(p.numel() for p in real.parameters())
    assert n_train == sum(p.numel() for p in real.parameters() if p.requires_grad) > 0
    assert text_cfg.hidden_size == 64
    n_full, n_full_train, _ = train.meta_param_counts(mc, "full", lora)
    full = load_model(mc, for_training=True)
    assert n_full == sum(p.numel() for p in full.parameters()) == n_all - n_train
    assert n_full_train == sum(p.numel() for p in full.parameters() if p.requires_grad)


def test_total_steps_from_epochs_capped_by_max_steps():
    """distill/finetune.max_steps caps the optimizer steps epochs would give (0: no cap): healings whose data
    differ in size (sequence-level KD adds the teacher's translations) get the same budget."""
    from types import SimpleNamespace

    from engine.train.trainer import Trainer

    def total(n, accum, epochs, cap):
        return Trainer._plan_total_steps(SimpleNamespace(stream=[0] * n, accum=accum,
                                                         cfg=SimpleNamespace(epochs=epochs, max_steps=cap)))

    assert total(10, 2, 3.0, 0) == 15 and total(10, 2, 3.0, 4) == 4 and total(10, 2, 0.5, 40) == 3
    assert total(11, 2, 1.0, 0) == 6
