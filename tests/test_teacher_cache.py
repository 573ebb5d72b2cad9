"""Teacher cache: build on 1 and 2 ranks (same bytes), kill and resume, records vs a fresh forward,
verify, and every bad input of the issue. The stream join has its own file (test_stream_cache.py).

Setup: tiny audio shards from a synthetic manifest of short sine WAVs (``shards.build``) and a tiny
random Qwen2-Audio teacher (fp32, byte-level BPE tokenizer). Random weights are fine here: these
tests check plumbing and exactness, not compression (bench/cache.py measures that on a trained teacher).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from engine import config as cfg
from engine.cache import build as cb
from engine.cache import format as cf
from engine.cache import teacher as ct
from engine.cache import verify as cv
from engine.cache import codec as topk_codec

N = 10           # samples; 3 per shard -> shards of 3, 3, 3, 1


def make_inputs(root: Path) -> tuple[Path, Path]:
    import soundfile as sf

    from engine.data import shards
    from engine.models.tiny import build_tiny

    rows = []
    for i in range(N):
        sr, dur = 16000, 0.2 + 0.05 * (i % 5)
        t = np.arange(int(dur * sr)) / sr
        sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 20 * i) * t)).astype("float32"), sr)
        rows.append({"id": f"u{i:02d}", "audio": f"a{i}.wav", "src_text": "hello",
                     "tgt_text": "Hallo Welt " * (1 + i % 3), "src_lang": "en", "tgt_lang": "de", "split": "train"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards.build(cfg.load(None, [f"shards.manifest={root / 'm.jsonl'}", f"shards.out={root / 'sh'}",
                                 "shards.samples_per_shard=3"]), workers=1)
    build_tiny("qwen2audio", root / "teacher", dtype="fp32")
    return root / "sh", root / "teacher"


def overrides(shards: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"cache.teacher={teacher}", f"cache.out={out}", "cache.max_new_tokens=6",
            "cache.batch_size=2", "model.dtype=fp32", "run.threads=1", "run.device=cpu", *extra]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return make_inputs(tmp_path_factory.mktemp("tc"))


@pytest.fixture(scope="module")
def cache1(inputs, tmp_path_factory) -> Path:
    sh, teacher = inputs
    out = tmp_path_factory.mktemp("c1") / "cache"
    cb.build(cfg.load(None, overrides(sh, teacher, out)))
    return out


def tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def cli(stc_cmd, stc_env, *argv, nproc: int = 1, env_extra: dict | None = None, check=True):
    head = [*stc_cmd, "run", "--nproc", str(nproc)] if nproc > 1 else list(stc_cmd)
    env = dict(stc_env, **(env_extra or {}))
    r = subprocess.run([*head, *argv], env=env, capture_output=True, text=True, timeout=180)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# ============================================================================================ records

def test_record_roundtrip_and_label_packing():
    rng = np.random.default_rng(0)
    V, n, k = 151_646, 7, 16
    lab = rng.integers(0, V, n)
    assert np.array_equal(cf.unpack_ids(cf.pack_ids(lab, V), n, V), lab)
    assert len(cf.pack_ids(lab, V)) == (n * 18 + 7) // 8
    logits = rng.normal(size=(n, 64)) * 3
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.stack([rng.choice(V, k, replace=False) for _ in range(n)])
    top = np.sort(lp, 1)[:, ::-1][:, :k]
    tail = np.log1p(-np.exp(top).sum(1))
    recs = [cf.Target("ref", lab, topk_codec.TopK(ids, top.astype(np.float32), tail.astype(np.float32))),
            cf.Target("teacher", lab[:3], text="Grüß Gott", equals_ref=False)]
    buf = cf.encode_record(recs, V)
    out = cf.decode_record(buf, V)
    assert set(out) == {"ref", "teacher"} and out["teacher"].text == "Grüß Gott" and out["teacher"].topk is None
    r = out["ref"]
    assert np.array_equal(r.label_ids, lab)
    for j in range(n):   # canonical order may differ: compare by id
        want = dict(zip(ids[j].tolist(), top[j].tolist()))
        for i, v in zip(r.topk.ids[j].tolist(), r.topk.logprobs[j].tolist()):
            assert abs(want[i] - v) <= topk_codec.max_logprob_error() + 1e-6
    with pytest.raises(cf.CacheError, match="u01: corrupt cache record"):
        cf.decode_record(buf[:-5], V, name="u01")


def test_tar_is_deterministic_and_readable(tmp_path):
    from engine.data import tario

    data = cf.tar_bytes([("a.kd", b"x" * 10), ("b.kd", b"")])
    assert data == cf.tar_bytes([("a.kd", b"x" * 10), ("b.kd", b"")])
    assert len(data) == 512 + 512 + 512 + 1024      # no padding to tar's 10 KB record size
    p = tmp_path / "t.tar"
    p.write_bytes(data)
    assert [s.key for s in tario.index_tar(p)] == ["a", "b"]
    with tarfile.open(p) as tf:
        assert {m.mtime for m in tf.getmembers()} == {0} and {m.uname for m in tf.getmembers()} == {""}


def test_packed_shard_layout_and_refusals(tmp_path):
    """Records of consecutive samples share one ``<first key>.kdpack`` member; the index finds every key;
    a truncated or corrupt pack is refused naming the shard."""
    from engine.data import tario

    keys = [f"k{i:02d}" for i in range(7)]
    recs = [bytes([i]) * (5 + 37 * i) for i in range(7)]
    data = cf.shard_bytes(keys, recs, group=3)
    assert data == cf.shard_bytes(keys, recs, group=3)
    p = tmp_path / "s.tar"
    p.write_bytes(data)
    assert [(s.key, set(s.members)) for s in tario.index_tar(p)] == [
        ("k00", {"kdpack"}), ("k03", {"kdpack"}), ("k06", {"kdpack"})]
    idx = cf.index_shard(p)
    assert [e.key for e in idx] == keys
    assert [cf.read_entry(p, e) for e in idx] == recs
    assert cf.read_shard(p) == list(zip(keys, recs))
    # the default group: one pack for a small shard, 512-byte header + padding once, not per sample
    one = cf.shard_bytes(keys, recs)
    (only,) = tario.index_tar(_w(tmp_path / "o.tar", one))
    size = only.members["kdpack"][1]
    assert size < sum(map(len, recs)) + 150 and len(one) == 512 + (size + 511) // 512 * 512 + 1024

    long = [f"{i:03d}" + "x" * 90 for i in range(60)]      # a pack index longer than the first read
    r = _w(tmp_path / "long.tar", cf.shard_bytes(long, [b"r"] * 60, group=60))
    assert [e.key for e in cf.index_shard(r)] == long and {cf.read_entry(r, e) for e in cf.index_shard(r)} == {b"r"}

    q = tmp_path / "trunc.tar"
    q.write_bytes(data[:-1500])
    with pytest.raises(cf.CacheError, match="trunc.tar"):
        [cf.read_entry(q, e) for e in cf.index_shard(q)]
    for name, at in (("crc.tar", 512 + 12), ("magic.tar", 512)):    # a byte of the first pack's index/magic
        bad = bytearray(data)
        bad[at] ^= 0x55
        r = tmp_path / name
        r.write_bytes(bytes(bad))
        with pytest.raises(cf.CacheError, match=f"{name}: pack k00.kdpack: .*(CRC|magic)"):
            cf.index_shard(r)
    old = tmp_path / "old.tar"                      # format 1: one .kd member per sample
    old.write_bytes(cf.tar_bytes([(f"{k}.kd", r) for k, r in zip(keys, recs)]))
    with pytest.raises(cf.CacheError, match=r"old.tar: pack k00.kdpack: member\(s\) .kd where a .kdpack"):
        cf.index_shard(old)


def _w(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


# ============================================================================================ build

def test_cache_meta_counts_and_verify(cache1, inputs):
    sh, _ = inputs
    meta = json.loads((cache1 / "meta.json").read_text())
    assert meta["kind"] == "cache" and meta["k"] == 64 and meta["split"] == "train"
    for f in ("teacher", "tokenizer", "prompt", "feature_extractor", "data"):
        assert meta["fingerprints"][f].startswith("sha256:"), f
    smeta = json.loads((sh / "meta.json").read_text())
    from engine.data.stream import shards_fingerprint, shards_from_meta

    assert meta["fingerprints"]["data"] == shards_fingerprint(shards_from_meta(smeta, "train"))
    assert [s["name"] for s in meta["shards"]] == [s["name"] for s in smeta["shards"]]
    assert meta["counts"]["samples"] == N and meta["counts"]["label_tokens"] > 0
    assert meta["counts"]["bytes"] == sum(len(b) for b in tars(cache1).values())
    assert {"host", "rank", "pid"} <= set(meta["shards"][0])
    assert cv.verify(cache1, deep=True)["problems"] == []


def test_records_equal_a_fresh_teacher_forward(cache1, inputs):
    """Every stored top-k row is the teacher's distribution at that label (full-vocab reference)."""
    import torch

    from engine.data.prompt import Featurizer
    from engine.data.stream import ShardReader, shards_from_meta
    from engine.models.load import load_processor
    from transformers import Qwen2AudioForConditionalGeneration

    sh, teacher = inputs
    model = Qwen2AudioForConditionalGeneration.from_pretrained(teacher, dtype=torch.float32).eval()
    feat = Featurizer(load_processor(teacher), cfg.DataConfig())
    shards = shards_from_meta(json.loads((sh / "meta.json").read_text()), "train")
    reader = ShardReader(sh, shards)
    V = len(feat.builder.tokenizer)
    bound = topk_codec.max_logprob_error() + 1e-4
    checked = 0
    for si in (0, 3):
        idx = cf.index_shard(cache1 / shards[si].name)
        for i in range(shards[si].n):
            s = dict(reader.read((si, i)), pad=False)
            b = feat([s])
            with torch.no_grad():
                lp = torch.log_softmax(model(**ct.model_inputs(b, "cpu")).logits.float(), -1)[0]
            pos = torch.nonzero(b["labels"][0] != -100)[:, 0]
            full = lp[pos - 1]                                    # [n, rows]: one sample alone, no padding
            assert idx[i].key == s["key"]
            rec = cf.decode_record(cf.read_entry(cache1 / shards[si].name, idx[i]), V)["ref"]
            assert np.array_equal(rec.label_ids, b["labels"][0, pos].numpy())
            ids = torch.from_numpy(rec.topk.ids)
            ref_top = full[:, :V].topk(64).values
            got = full.gather(1, ids)
            assert (got - torch.from_numpy(rec.topk.logprobs)).abs().max() <= bound
            # the stored ids are the top k (up to ties at the k-th value)
            assert (got.min(1).values >= ref_top[:, -1] - 1e-5).all()
            rest = full.scatter(1, ids, float("-inf")).logsumexp(1)
            assert (rest - torch.from_numpy(rec.topk.tail_logmass)).abs().max() <= bound
            checked += 1
    assert checked == 4


@pytest.mark.slow
def test_two_ranks_write_the_same_cache_each_shard_once(cache1, inputs, tmp_path, stc_cmd, stc_env):
    sh, teacher = inputs
    out = tmp_path / "c2"
    cli(stc_cmd, stc_env, "cache", "build", *overrides(sh, teacher, out), nproc=2)
    assert tars(out) == tars(cache1)                                 # content-identical, byte for byte
    meta = json.loads((out / "meta.json").read_text())
    ranks = {s["name"]: s["rank"] for s in meta["shards"]}
    assert ranks == {"train-000000.tar": 0, "train-000001.tar": 1, "train-000002.tar": 0, "train-000003.tar": 1}
    assert len({s["pid"] for s in meta["shards"]}) == 2               # two processes
    assert sorted(p.name for p in (out / "done").iterdir()) == sorted(f"{n}.json" for n in ranks)
    r = cli(stc_cmd, stc_env, "cache", "verify", str(out), "--verify")
    assert "OK" in r.stdout + r.stderr


@pytest.mark.slow
def test_sigkill_mid_shard_then_rerun_gives_the_same_cache(cache1, inputs, tmp_path, stc_cmd, stc_env):
    sh, teacher = inputs
    out = tmp_path / "ck"
    argv = ("cache", "build", *overrides(sh, teacher, out))
    r = cli(stc_cmd, stc_env, *argv, env_extra={ct.FAULT_ENV: "train-000001.tar:0"}, check=False)
    assert r.returncode == -9, r.stderr[-2000:]                        # killed inside shard 1
    assert sorted(p.name for p in (out / "done").iterdir()) == ["train-000000.tar.json"]
    assert not (out / "meta.json").exists()
    first_pid = json.loads((out / "done" / "train-000000.tar.json").read_text())["pid"]
    (out / f"train-000001.tar.tmp-{first_pid}").write_bytes(b"half a shard")   # a writer's leftover
    v = cli(stc_cmd, stc_env, "cache", "verify", str(out), check=False)
    assert v.returncode == 1 and "unfinished build" in v.stdout + v.stderr
    cli(stc_cmd, stc_env, *argv)
    assert tars(out) == tars(cache1)
    assert not list(out.glob("*.tmp-*"))
    meta = json.loads((out / "meta.json").read_text())
    pids = {s["name"]: s["pid"] for s in meta["shards"]}
    assert pids["train-000000.tar"] == first_pid                      # skipped on the rerun, not redone
    assert len({pids[n] for n in pids if n != "train-000000.tar"} - {first_pid}) == 1
    assert cv.verify(out, deep=True)["problems"] == []               # no duplicate or missing keys


def test_rerun_is_a_no_op_and_other_inputs_are_refused(cache1, inputs, tmp_path):
    sh, teacher = inputs
    out = tmp_path / "c"
    shutil.copytree(cache1, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    cb.build(cfg.load(None, overrides(sh, teacher, out)))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    with pytest.raises(cf.CacheError, match=r"cache of other inputs(.|\n)*k: 64 then, 8 now"):
        cb.build(cfg.load(None, overrides(sh, teacher, out, "cache.k=8")))


# ============================================================================================ bad input

def rewrite_shard(src_dir: Path, dst_dir: Path, name: str, edit) -> Path:
    """Copy a shard directory, rewrite shard ``name``'s members with ``edit(key, ext, data) -> data``,
    and update meta.json's size and sha256 as a rebuild would."""
    shutil.copytree(src_dir, dst_dir)
    p = dst_dir / name
    out = io.BytesIO()
    with tarfile.open(p) as tf, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as w:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            data = edit(key, ext, tf.extractfile(m).read())
            ti = tarfile.TarInfo(m.name)
            ti.size = len(data)
            w.addfile(ti, io.BytesIO(data))
    p.write_bytes(out.getvalue())
    meta = json.loads((dst_dir / "meta.json").read_text())
    for s in meta["shards"]:
        if s["name"] == name:
            s["bytes"], s["sha256"] = p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()
    (dst_dir / "meta.json").write_text(json.dumps(meta))
    return dst_dir


def test_audio_shards_changed_since_caching(cache1, inputs, tmp_path):
    sh, _ = inputs

    def louder(key, ext, data):
        return data.replace(b"Hallo", b"Hello", 1) if ext == "json" else data

    changed = rewrite_shard(sh, tmp_path / "sh2", "train-000002.tar", louder)
    c = tmp_path / "c"
    shutil.copytree(cache1, c)
    meta = json.loads((c / "meta.json").read_text())
    meta["source"]["shards_dir"] = str(changed)
    (c / "meta.json").write_text(json.dumps(meta))
    problems = cv.verify(c)["problems"]
    assert any("changed since caching" in p and "data fingerprint" in p for p in problems)
    assert any(p.startswith("train-000002.tar: the audio shard changed") for p in problems)


def test_truncated_cache_shard(cache1, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(cache1, c)
    p = c / "train-000001.tar"
    p.write_bytes(p.read_bytes()[:-700])
    problems = cv.verify(c)["problems"]
    assert problems and "train-000001.tar" in problems[0] and "truncated" in problems[0]


def test_corrupt_pack_is_refused_by_verify(cache1, tmp_path):
    """A pack whose index no longer holds (meta.json made consistent, so only the framing is wrong)."""
    c = tmp_path / "c"
    shutil.copytree(cache1, c)
    p = c / "train-000001.tar"
    data = bytearray(p.read_bytes())
    data[512 + 12] ^= 0x55                          # inside the first pack's index
    p.write_bytes(bytes(data))
    meta = json.loads((c / "meta.json").read_text())
    for s in meta["shards"]:
        if s["name"] == p.name:
            s["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (c / "meta.json").write_text(json.dumps(meta))
    problems = cv.verify(c)["problems"]
    assert problems and "train-000001.tar" in problems[0] and "CRC" in problems[0], problems


def test_cache_of_another_format_is_refused(cache1, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(cache1, c)
    meta = json.loads((c / "meta.json").read_text())
    meta["format"] = "stc-kd/1"
    (c / "meta.json").write_text(json.dumps(meta))
    assert "this engine reads 'stc-kd/2'" in cv.verify(c)["problems"][0]


def test_key_present_twice_and_missing_key(cache1, tmp_path):
    def fix_meta(c: Path, name: str) -> None:    # a consistent meta: only the keys are wrong
        meta = json.loads((c / "meta.json").read_text())
        for s in meta["shards"]:
            if s["name"] == name:
                s["bytes"] = (c / name).stat().st_size
                s["sha256"] = hashlib.sha256((c / name).read_bytes()).hexdigest()
        (c / "meta.json").write_text(json.dumps(meta))

    src = cache1 / "train-000000.tar"
    members = cf.read_shard(src)
    idx = cf.index_shard(src)
    c = tmp_path / "dup"
    shutil.copytree(cache1, c)
    m = members[:2] + [members[0]]
    (c / src.name).write_bytes(cf.shard_bytes([k for k, _ in m], [r for _, r in m]))
    fix_meta(c, src.name)
    problems = cv.verify(c)["problems"]
    assert problems and idx[0].key in problems[0] and ("twice" in problems[0] or "comes back" in problems[0] or
                                                         "again" in problems[0]), problems
    c = tmp_path / "miss"
    shutil.copytree(cache1, c)
    m = members[:1] + members[2:]
    (c / src.name).write_bytes(cf.shard_bytes([k for k, _ in m], [r for _, r in m]))
    fix_meta(c, src.name)
    problems = cv.verify(c)["problems"]
    assert problems and f"key {idx[1].key!r} is missing" in problems[0]


def test_sample_without_label_tokens(inputs, tmp_path):
    sh, teacher = inputs

    def empty(key, ext, data):
        if ext == "json" and key == "u04":
            d = json.loads(data)
            d["tgt_text"] = ""
            return json.dumps(d).encode()
        return data

    bad = rewrite_shard(sh, tmp_path / "sh", "train-000001.tar", empty)
    with pytest.raises(cf.CacheError, match="u04: no label tokens"):
        cb.build(cfg.load(None, overrides(bad, teacher, tmp_path / "c")))


def test_k_larger_than_the_vocabulary(inputs, tmp_path):
    sh, teacher = inputs
    with pytest.raises(cf.CacheError, match=r"cache.k=100000 is larger than the vocabulary \(\d+ tokens\)"):
        cb.build(cfg.load(None, overrides(sh, teacher, tmp_path / "c", "cache.k=100000")))


def test_teacher_directory_without_weights(inputs, tmp_path):
    sh, teacher = inputs
    t = tmp_path / "t"
    shutil.copytree(teacher, t, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(cf.CacheError, match="no weights"):
        cb.build(cfg.load(None, overrides(sh, t, tmp_path / "c")))


def test_zero3_is_refused_with_nf4_and_fp16(inputs, tmp_path):
    sh, teacher = inputs
    with pytest.raises(cf.CacheError, match="nf4 teacher is not supported"):
        cb.build(cfg.load(None, overrides(sh, teacher, tmp_path / "c", "cache.zero3=true", "cache.quant=nf4")))
    with pytest.raises(cf.CacheError, match="fp16 teacher"):
        cb.build(cfg.load(None, overrides(sh, teacher, tmp_path / "c", "cache.zero3=true", "cache.dtype=fp16")))
    assert not (tmp_path / "c").exists()           # refused before anything was written


@pytest.mark.slow
def test_zero3_teacher_on_two_ranks_writes_the_same_cache(cache1, inputs, tmp_path, stc_cmd, stc_env):
    """The teacher partitioned over 2 ranks (ZeRO-3, every parameter sliced) writes the bytes of the
    unsharded 1-rank build. Rank 0 has 4 batches (shards 0, 2), rank 1 has 3 (shards 1, 3): rank 1
    runs one padding batch so that both make the same collectives."""
    sh, teacher = inputs
    out = tmp_path / "z3"
    cli(stc_cmd, stc_env, "cache", "build",
        *overrides(sh, teacher, out, "cache.zero3=true", "cache.zero3_persistence_threshold=0"), nproc=2)
    assert tars(out) == tars(cache1)                                 # byte for byte, fp32 on CPU
    meta = json.loads((out / "meta.json").read_text())
    assert {s["name"]: s["rank"] for s in meta["shards"]} == {
        "train-000000.tar": 0, "train-000001.tar": 1, "train-000002.tar": 0, "train-000003.tar": 1}
    for p in (out / "done").iterdir():
        z = json.loads(p.read_text())["zero3"]
        assert z["world_size"] == 2 and z["params"] > 0 and z["zero_init"]   # loaded partitioned
        assert z["partitioned"] == z["params"]                      # threshold 0: every parameter sliced
        assert z["local_numel"] * 2 <= z["numel"] + z["params"]     # about half of the elements per rank
    assert cv.verify(out, deep=True)["problems"] == []


def test_cli_verify_and_build_errors(cache1, inputs, tmp_path, stc_cmd, stc_env):
    sh, teacher = inputs
    r = cli(stc_cmd, stc_env, "cache", "verify", str(cache1))
    assert "OK" in r.stdout + r.stderr
    r = cli(stc_cmd, stc_env, "cache", "build", *overrides(sh, teacher, tmp_path / "c", "cache.k=100000"), check=False)
    assert r.returncode == 1 and "larger than the vocabulary" in r.stderr
    r = cli(stc_cmd, stc_env, "cache", "verify", str(tmp_path / "nothing"), check=False)
    assert r.returncode == 1
