"""The stream's teacher-cache join: by key, under any world size / worker count, exactly once also
with sequence-level KD samples, and refusals (missing key, other label ids, other tokenizer/prompt,
changed audio, truncated or non-mirroring cache shards)."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine import config as cfg
from engine.cache import build as cb
from engine.cache import format as cf
from engine.cache import teacher as ct
from engine.cache import verify as cv
from engine.cache.join import joiner
from engine.data import stream as st
from engine.data import tario
from test_teacher_cache import N, make_inputs, overrides, rewrite_shard


@dataclass(frozen=True)
class Cfg:
    batch_size: int = 3
    bucket_window: int = 6
    num_workers: int = 0
    shuffle: bool = True
    max_audio_s: float = 30.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from engine.data.prompt import Featurizer
    from engine.models.load import load_processor

    root = tmp_path_factory.mktemp("sc")
    sh, teacher = make_inputs(root)
    plain = root / "plain"
    cb.build(cfg.load(None, overrides(sh, teacher, plain)))
    # A second cache with the teacher's own top-k, where the teacher repeats the reference for u00
    # (de-duplicated) and says nothing for u01 (no sequence-level sample).
    orig = ct.greedy

    def scripted(model, featurizer, samples, max_new_tokens, device):
        texts, prompts = orig(model, featurizer, samples, max_new_tokens, device)
        for i, s in enumerate(samples):
            if s["key"] == "u00":
                texts[i] = s["meta"]["tgt_text"]
            elif s["key"] == "u01":
                texts[i] = ""
            elif not texts[i]:
                texts[i] = "ja"
        return texts, prompts

    # The same cache in packs of 2 samples (shards of 3 -> packs of 2 + 1): the join must not care.
    packed = root / "packed"
    group = cf.PACK_GROUP
    cf.PACK_GROUP = 2
    try:
        cb.build(cfg.load(None, overrides(sh, teacher, packed)))
    finally:
        cf.PACK_GROUP = group
    ct.greedy = scripted
    try:
        seq = root / "seq"
        cb.build(cfg.load(None, overrides(sh, teacher, seq, "cache.teacher_topk=true")))
    finally:
        ct.greedy = orig
    feat = Featurizer(load_processor(teacher), cfg.DataConfig())
    return {"shards": sh, "teacher": teacher, "plain": plain, "seq": seq, "packed": packed, "feat": feat}


def records(cache: Path) -> dict[tuple[str, str], cf.Target]:
    meta = json.loads((cache / "meta.json").read_text())
    out = {}
    for s in meta["shards"]:
        p = cache / s["name"]
        for e in cf.index_shard(p):
            for target, rec in cf.decode_record(cf.read_entry(p, e), meta["vocab_size"]).items():
                out[(e.key, target)] = rec
    return out


def run_all(stream: st.Stream) -> list[dict]:
    return list(stream)


def check_batch(b: dict, recs: dict) -> list[tuple[str, str]]:
    """kd_* aligned with labels and equal to the stored records; returns the real (key, target)s."""
    k = b["kd_ids"].shape[-1]
    assert b["kd_ids"].shape == (*b["labels"].shape, k) and b["kd_tail"].shape == b["labels"].shape
    assert b["kd_ids"].dtype.is_floating_point is False and str(b["kd_logprobs"].dtype) == "torch.float32"
    got = []
    for i, (key, target, pad) in enumerate(zip(b["keys"], b["targets"], b["pad"])):
        lab = b["labels"][i]
        if pad:
            assert not b["kd_mask"][i].any()
            continue
        rec = recs[(key, target)]
        pos = (lab != -100).nonzero()[:, 0]
        assert np.array_equal(lab[pos].numpy(), rec.label_ids)
        if rec.topk is None:
            assert not b["kd_mask"][i].any()
        else:
            assert (b["kd_mask"][i] == (lab != -100)).all()
            assert np.array_equal(b["kd_ids"][i, pos].numpy(), rec.topk.ids)
            assert np.array_equal(b["kd_logprobs"][i, pos].numpy(), rec.topk.logprobs)
            assert np.array_equal(b["kd_tail"][i, pos].numpy(), rec.topk.tail_logmass)
        got.append((key, target))
    return got


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_join_by_key_under_any_world_and_workers(setup, world, workers):
    recs = records(setup["plain"])
    got = []
    for r in range(world):
        s = st.Stream(setup["shards"], "train", Cfg(num_workers=workers), setup["feat"], rank=r, world_size=world,
                      join=joiner(setup["plain"]))
        for b in run_all(s):
            got += check_batch(b, recs)
    assert sorted(got) == sorted((f"u{i:02d}", "ref") for i in range(N))


@pytest.mark.parametrize("world", [1, 2])
def test_packed_layout_joins_by_key_under_another_world_size(setup, world):
    """Packs of 2 samples (several members per shard, keys still in the audio shard's order) join
    exactly like packs of 32, with the same records."""
    c = setup["packed"]
    name = "train-000000.tar"
    assert [s.key for s in tario.index_tar(c / name)] == ["u00", "u02"]           # <first key>.kdpack
    assert [e.key for e in cf.index_shard(c / name)] == ["u00", "u01", "u02"]
    assert len(tario.index_tar(setup["plain"] / name)) == 1
    recs = records(c)
    plain = records(setup["plain"])
    assert recs.keys() == plain.keys()
    for key in recs:
        assert recs[key].topk_bytes == plain[key].topk_bytes
        assert np.array_equal(recs[key].label_ids, plain[key].label_ids)
    got = []
    for r in range(world):
        s = st.Stream(setup["shards"], "train", Cfg(num_workers=1), setup["feat"], rank=r, world_size=world,
                      join=joiner(c))
        for b in run_all(s):
            got += check_batch(b, recs)
    assert sorted(got) == sorted((f"u{i:02d}", "ref") for i in range(N))
    assert cv.verify(c, deep=True)["problems"] == []


def test_corrupt_pack_is_refused_by_the_join_naming_the_shard(setup, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(setup["packed"], c)
    p = c / "train-000002.tar"
    data = bytearray(p.read_bytes())
    data[512 + 12] ^= 0x55                          # inside the first pack's index: CRC mismatch
    p.write_bytes(bytes(data))
    with pytest.raises(cf.CacheJoinError, match=r"train-000002.tar: pack u06.kdpack: pack index CRC mismatch"):
        run_all(st.Stream(setup["shards"], "train", Cfg(), join=joiner(c)))
    p.write_bytes(bytes(setup["packed"].joinpath(p.name).read_bytes()[:-900]))
    with pytest.raises(cf.CacheJoinError, match="train-000002.tar is truncated"):
        run_all(st.Stream(setup["shards"], "train", Cfg(), join=joiner(c)))


def test_seq_kd_adds_deduplicated_teacher_samples_exactly_once(setup):
    meta = json.loads((setup["seq"] / "meta.json").read_text())
    assert meta["counts"]["teacher_equal_ref"] == 1 and meta["counts"]["teacher_empty"] == 1
    recs = records(setup["seq"])
    assert recs[("u00", "teacher")].equals_ref and recs[("u01", "teacher")].empty
    want = sorted([(f"u{i:02d}", "ref") for i in range(N)] + [(f"u{i:02d}", "teacher") for i in range(2, N)])
    got = []
    for r in range(2):
        s = st.Stream(setup["shards"], "train", Cfg(num_workers=2), setup["feat"], rank=r, world_size=2,
                      join=joiner(setup["seq"], seq_kd=True))
        for b in run_all(s):
            got += check_batch(b, recs)
    assert sorted(got) == want
    # the teacher samples carry their own top-k (cache.teacher_topk) and the teacher's labels
    assert any(recs[(k, "teacher")].topk is not None for k, t in got if t == "teacher")


def test_seq_kd_resume_on_another_world_size_is_exactly_once(setup):
    recs = records(setup["seq"])
    first, states = [], []
    for r in range(2):
        s = st.Stream(setup["shards"], "train", Cfg(), setup["feat"], rank=r, world_size=2,
                      join=joiner(setup["seq"], seq_kd=True))
        it = iter(s)
        first += check_batch(next(it), recs)
        it.close()
        states.append(s.state_dict())
    assert states[0] == states[1]
    state = json.loads(json.dumps(states[0]))
    s = st.Stream(setup["shards"], "train", Cfg(batch_size=2), setup["feat"], rank=0, world_size=1,
                  join=joiner(setup["seq"], seq_kd=True), num_workers=1)
    s.load_state_dict(state)
    rest = [x for b in run_all(s) for x in check_batch(b, recs)]
    assert Counter(first + rest).most_common(1)[0][1] == 1
    assert len(first + rest) == 2 * N - 2
    # a state of a stream without the teacher samples belongs to another sample set
    plain = st.Stream(setup["shards"], "train", Cfg(), rank=0, world_size=1, join=joiner(setup["seq"]))
    with pytest.raises(st.StreamError, match="fingerprint"):
        plain.load_state_dict(state)


def test_seq_kd_needs_a_cache_with_teacher_targets(setup, tmp_path):
    ref_only = tmp_path / "ref-only"
    shutil.copytree(setup["plain"], ref_only)
    meta = json.loads((ref_only / "meta.json").read_text())
    meta["targets"] = ["ref"]
    (ref_only / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(cf.CacheJoinError, match="has no teacher translations"):
        st.Stream(setup["shards"], "train", Cfg(), join=joiner(ref_only, seq_kd=True))
    st.Stream(setup["shards"], "train", Cfg(), join=joiner(ref_only))   # word-level KD alone is fine


def test_label_ids_that_differ_are_refused_naming_the_key(setup):
    class Other:
        """Builds labels from another reference text (and has no builder, so only the ids can tell)."""

        def __init__(self, feat):
            self.feat = feat

        def __call__(self, samples):
            return self.feat([dict(s, meta=dict(s["meta"], tgt_text=s["meta"]["tgt_text"] + " nein"))
                              for s in samples])

    s = st.Stream(setup["shards"], "train", Cfg(shuffle=False), Other(setup["feat"]), rank=0, world_size=1,
                  join=joiner(setup["plain"]))
    with pytest.raises(cf.CacheJoinError, match=r"key 'u\d\d' \(ref\): the featurizer's label ids differ"):
        run_all(s)


def test_other_tokenizer_prompt_or_vocabulary_is_refused(setup):
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    from engine.data.prompt import Featurizer
    from engine.models.tiny import CHAT_TEMPLATE, build_bpe_tokenizer

    proc = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                               tokenizer=build_bpe_tokenizer(vocab_size=400), chat_template=CHAT_TEMPLATE)
    with pytest.raises(cf.CacheJoinError, match="tokenizer differs") as ei:
        st.Stream(setup["shards"], "train", Cfg(), Featurizer(proc), join=joiner(setup["plain"]))
    assert "vocabulary" in str(ei.value)
    other_prompt = Featurizer(setup["feat"].builder.processor, cfg.DataConfig(system_prompt="Be brief."))
    with pytest.raises(cf.CacheJoinError, match="prompt template"):
        st.Stream(setup["shards"], "train", Cfg(), other_prompt, join=joiner(setup["plain"]))
    meta = cf.read_cache_meta(setup["plain"])
    v = meta["vocab_size"]
    cf.check_compatible(meta, builder=setup["feat"].builder, teacher=setup["teacher"], student_rows=v + 64)
    with pytest.raises(cf.CacheJoinError, match=f"output layer has {v - 1} rows"):
        cf.check_compatible(meta, student_rows=v - 1)


def test_changed_audio_and_bad_cache_shards_are_refused(setup, tmp_path):
    def edit(key, ext, data):
        return data.replace(b"Hallo", b"Hello", 1) if ext == "json" else data

    changed = rewrite_shard(setup["shards"], tmp_path / "sh", "train-000001.tar", edit)
    with pytest.raises(cf.CacheJoinError, match="train-000001.tar: the audio shard changed since caching"):
        st.Stream(changed, "train", Cfg(), join=joiner(setup["plain"]))

    c = tmp_path / "trunc"
    shutil.copytree(setup["plain"], c)
    (c / "train-000002.tar").write_bytes((c / "train-000002.tar").read_bytes()[:-600])
    with pytest.raises(cf.CacheJoinError, match="train-000002.tar is truncated"):
        run_all(st.Stream(setup["shards"], "train", Cfg(), join=joiner(c)))

    c = tmp_path / "miss"
    shutil.copytree(setup["plain"], c)
    src = c / "train-000000.tar"
    idx = cf.index_shard(src)
    members = cf.read_shard(src)[:1] + cf.read_shard(src)[2:]
    src.write_bytes(cf.shard_bytes([k for k, _ in members], [r for _, r in members]))
    meta = json.loads((c / "meta.json").read_text())
    meta["shards"][0]["bytes"] = src.stat().st_size
    (c / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(cf.CacheJoinError, match=f"key {idx[1].key!r} is missing"):
        run_all(st.Stream(setup["shards"], "train", Cfg(), join=joiner(c)))

    meta["shards"] = meta["shards"][1:]
    (c / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(cf.CacheJoinError, match="train-000000.tar: not in the cache"):
        st.Stream(setup["shards"], "train", Cfg(), join=joiner(c))


def test_joined_targets_feed_the_sparse_kd_loss(setup):
    """The batch layout is the one engine.train.losses expects: the teacher distilled into itself costs ~0."""
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    from engine.cache import codec
    from engine.train import losses
    model = Qwen2AudioForConditionalGeneration.from_pretrained(setup["teacher"], dtype=torch.float32).eval()
    s = st.Stream(setup["shards"], "train", Cfg(shuffle=False), setup["feat"], rank=0, world_size=1,
                  join=joiner(setup["plain"]))
    b = next(iter(s))
    with torch.no_grad():
        logits = model(**ct.model_inputs(b, "cpu")).logits.float()
    m = b["kd_mask"][:, 1:]
    out = losses.sparse_kd_loss(logits[:, :-1][m], b["kd_ids"][:, 1:][m], b["kd_logprobs"][:, 1:][m],
                                b["kd_tail"][:, 1:][m], kind="forward_kl")
    assert int(out.count) == int((b["labels"] != -100).sum())
    assert float(out.total) / int(out.count) <= 2 * codec.kl_bound() + 1e-4
