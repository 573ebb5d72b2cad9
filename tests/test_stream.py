"""The planned stream: exactly-once, balance, determinism and resume (pure planner), then the real thing.

The planner tests need no tars. The end-to-end tests build uneven shards with
``engine.data.shards.build`` and run ``stc shards stream`` under torchrun with 2 ranks and workers.
"""
from __future__ import annotations

import json
import random
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.data import stream as st


def fake_shards(sizes: list[int], seed: int = 1) -> list[st.ShardInfo]:
    rng = random.Random(seed)
    out = []
    for k, n in enumerate(sizes):
        keys = tuple(f"s{k}-{i}" for i in range(n))
        lengths = tuple((round(rng.uniform(0.5, 20.0), 2), rng.randint(5, 200)) for _ in range(n))
        out.append(st.ShardInfo(name=f"train-{k:06d}.tar", n=n, bytes=0, sha256=f"h{k}", keys=keys,
                                lengths=lengths))
    return out


UNEVEN = [7, 3, 11, 1, 5]


def plan(shards, world, *, epoch=0, bs=3, window=8, shuffle=True, seed=0, exclude=()):
    return st.plan_epoch(shards, seed=seed, epoch=epoch, world_size=world, batch_size=bs, bucket_window=window,
                         shuffle=shuffle, exclude=exclude)


def real_refs(p: st.Plan, rank: int | None = None, start: int = 0) -> list:
    ranks = range(p.world_size) if rank is None else [rank]
    return [ref for r in ranks for b in p.batches[r][start:] if not b.pad for ref in b.refs]


def all_refs(shards):
    return {(si, i) for si, s in enumerate(shards) for i in range(s.n)}


# ============================================================================================ planner

@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("sizes", [UNEVEN, [4, 4, 4, 4], [1, 1, 30], [2, 9]])
@pytest.mark.parametrize("bs", [1, 3, 4])
def test_epoch_is_exactly_once_with_equal_batch_counts(world, sizes, bs):
    shards = fake_shards(sizes)
    p = plan(shards, world, bs=bs)
    got = real_refs(p)
    assert Counter(got).most_common(1)[0][1] == 1          # nothing twice
    assert set(got) == all_refs(shards)                    # nothing missing
    assert len({len(b) for b in p.batches}) == 1           # every rank the same number of batches
    per_rank = [len(real_refs(p, r)) for r in range(world)]
    assert max(per_rank) - min(per_rank) <= 1              # balanced to one sample
    for rank_batches in p.batches:                         # pads only at the end, real batches full but last
        kinds = [b.pad for b in rank_batches]
        assert kinds == sorted(kinds)
        real = [b for b in rank_batches if not b.pad]
        pads = [b for b in rank_batches if b.pad]
        assert len(pads) <= 1 and all(len(b.refs) == 1 for b in pads)
        if not p.batches[0] or not real:
            continue
        assert sum(len(b.refs) < bs for b in real) <= 1


def test_ranks_read_disjoint_shards_except_balancing_moves():
    shards = fake_shards(UNEVEN)
    for world in (2, 3):
        p = plan(shards, world)
        order = st.shard_order(len(shards), seed=0, epoch=0, shuffle=True)
        dealt = st.deal([[(si, i) for i in range(shards[si].n)] for si in order], world)
        balanced = st.balance(dealt)
        # the plan's ranks hold exactly the balanced lists
        for r in range(world):
            assert sorted(real_refs(p, r)) == sorted(balanced[r])
        # before balancing, whole shards per rank, disjoint
        owner = {}
        for r, refs in enumerate(dealt):
            for si, _ in refs:
                assert owner.setdefault(si, r) == r
        # balancing moves only tails of donors, appended to receivers, count = surplus
        moved = [(r, ref) for r in range(world) for ref in balanced[r] if owner[ref[0]] != r]
        total = sum(s.n for s in shards)
        q, rem = divmod(total, world)
        surplus = sum(max(0, len(d) - (q + 1 if k < rem else q)) for k, d in enumerate(
            sorted(dealt, key=len, reverse=True)))
        assert len(moved) == surplus
        for r in range(world):
            kept = [ref for ref in balanced[r] if owner[ref[0]] == r]
            assert balanced[r][:len(kept)] == kept                 # received samples come after own ones
            assert dealt[r][:len(kept)] == kept                    # donors lost a tail, not the middle


def test_balance_rule_is_the_documented_one():
    a = [(0, i) for i in range(7)]
    b = [(1, i) for i in range(2)]
    c = [(2, i) for i in range(3)]
    out = st.balance([a, b, c])
    assert [len(x) for x in out] == [4, 4, 4]
    assert out[1] == b + [(0, 4), (0, 5)] and out[2] == c + [(0, 6)]
    # 13 samples on 3 ranks: the rank that holds most keeps the extra one
    out = st.balance([a, b, c + [(2, 3)]])
    assert [len(x) for x in out] == [5, 4, 4]


def test_refuses_fewer_samples_than_ranks():
    with pytest.raises(st.StreamError, match="2 samples for 3 ranks"):
        plan(fake_shards([1, 1]), 3)


def test_plan_is_deterministic_and_changes_per_epoch():
    shards = fake_shards(UNEVEN)
    assert plan(shards, 2) == plan(shards, 2)
    assert plan(shards, 2, epoch=0).batches != plan(shards, 2, epoch=1).batches
    assert plan(shards, 2, seed=0).batches != plan(shards, 2, seed=5).batches
    # without shuffle the epoch does not matter
    assert plan(shards, 2, epoch=0, shuffle=False).batches == plan(shards, 2, epoch=3, shuffle=False).batches


def test_batches_are_length_bucketed_within_a_window():
    shards = fake_shards([40])
    p = plan(shards, 1, bs=4, window=40, shuffle=False)
    spans = [[shards[0].lengths[i][0] for _, i in b.refs] for b in p.batches[0]]
    flat = [x for s in spans for x in s]
    assert flat == sorted(flat)  # one window, unshuffled: globally sorted
    p = plan(shards, 1, bs=4, window=40, shuffle=True)
    for b in p.batches[0]:
        d = [shards[0].lengths[i][0] for _, i in b.refs]
        assert d == sorted(d)


def test_window_rounds_up_to_batch_multiple():
    shards = fake_shards([23])
    p = plan(shards, 1, bs=4, window=6)  # effective window 8: only the very last batch is short
    sizes = [len(b.refs) for b in p.batches[0]]
    assert sorted(sizes) == [3] + [4] * 5
    assert 3 in sizes[-2:]  # the short batch belongs to the last window (of 7 samples: 4 + 3)


def test_pad_batch_uses_the_ranks_shortest_sample():
    shards = fake_shards([5, 4])
    p = plan(shards, 2, bs=2)  # 5 vs 4 samples -> 3 vs 2 batches -> one pad on the short rank
    counts = [sum(b.pad for b in rb) for rb in p.batches]
    assert sorted(counts) == [0, 1]
    r = counts.index(1)
    pad = p.batches[r][-1]
    mine = real_refs(p, r)
    assert pad.refs[0] == min(mine, key=lambda ref: (*shards[ref[0]].lengths[ref[1]], ref))


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (2, 3), (3, 2), (1, 2)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_replan_on_another_world_is_exactly_once(old_world, new_world, k):
    shards = fake_shards(UNEVEN)
    p = plan(shards, old_world)
    k = min(k, p.n_batches)
    first = [ref for r in range(old_world) for b in p.batches[r][:k] if not b.pad for ref in b.refs]
    done = p.delivered(k)
    assert done == set(first)
    q = plan(shards, new_world, exclude=done, bs=2)
    rest = real_refs(q)
    assert Counter(first + rest).most_common(1)[0][1] == 1
    assert set(first + rest) == all_refs(shards)
    assert len({len(b) for b in q.batches}) == 1


def test_replan_with_fewer_samples_left_than_ranks_pads_empty_ranks():
    shards = fake_shards([3, 3])
    p = plan(shards, 1, bs=1)
    done = p.delivered(5)  # one sample left
    q = plan(shards, 3, bs=1, exclude=done)
    assert [len(rb) for rb in q.batches] == [1, 1, 1]
    assert sum(not b.pad for rb in q.batches for b in rb) == 1
    everything_done = p.delivered(6)
    assert plan(shards, 3, bs=1, exclude=everything_done).n_batches == 0


def test_ranges_roundtrip():
    assert st.to_ranges([5, 1, 2, 3, 7, 8]) == [[1, 4], [5, 6], [7, 9]]
    assert st.from_ranges([[1, 4], [7, 9]]) == {1, 2, 3, 7, 8}
    shards = fake_shards([3, 4])
    refs = {(0, 0), (0, 2), (1, 1), (1, 2), (1, 3)}
    r = st.refs_to_ranges(refs, shards)
    assert r == {"train-000000.tar": [[0, 1], [2, 3]], "train-000001.tar": [[1, 4]]}
    assert st.ranges_to_refs(r, shards) == refs
    with pytest.raises(st.StreamError, match="not in this shard set"):
        st.ranges_to_refs({"other.tar": [[0, 1]]}, shards)


# ============================================================================================ the Stream

def write_shards(root: Path, sizes: list[int], split: str = "train", sr: int = 16000) -> Path:
    """A shard directory in the fixed format, written directly (tarfile + soundfile) to stay fast."""
    import hashlib
    import io
    import tarfile

    import numpy as np
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    recs = []
    rng = random.Random(7)
    for k, n in enumerate(sizes):
        name = f"{split}-{k:06d}.tar"
        samples = []
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(n):
                key = f"utt{k}x{i}"
                dur = round(rng.uniform(0.1, 0.6), 3)
                t = np.arange(int(dur * sr)) / sr
                buf = io.BytesIO()
                sf.write(buf, (0.3 * np.sin(2 * np.pi * (200 + 10 * i) * t)).astype("float32"), sr,
                         format="FLAC")
                tgt = "Hallo Welt " * rng.randint(1, 4)
                js = {"id": key, "src_text": "hello world", "tgt_text": tgt.strip(), "src_lang": "en",
                      "tgt_lang": "de", "duration_s": dur, "corpus": "t", "split": split, "truncated_s": 0.0}
                for ext, data in (("audio.flac", buf.getvalue()), ("json", json.dumps(js).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
                samples.append([key, dur, len(js["tgt_text"])])
        data = (root / name).read_bytes()
        recs.append({"name": name, "split": split, "n": n, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "seconds": sum(s[1] for s in samples),
                     "samples": samples})
    (root / "meta.json").write_text(json.dumps({"schema": 1, "kind": "shards", "shards": recs}))
    return root


@dataclass(frozen=True)
class Cfg:
    batch_size: int = 3
    bucket_window: int = 8
    num_workers: int = 0
    shuffle: bool = True
    max_audio_s: float = 30.0


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), UNEVEN)


def run_keys(stream: st.Stream, n: int | None = None) -> list[tuple[int, int, tuple[str, ...], tuple[bool, ...]]]:
    out = []
    for b in stream:
        out.append((b["epoch"], b["batch"], tuple(b["keys"]), tuple(b["pad"])))
        if n is not None and len(out) >= n:
            break
    return out


def test_stream_reads_what_the_plan_says(shard_dir):
    s = st.Stream(shard_dir, "train", Cfg())
    got = run_keys(s)
    want = [tuple(s.keys_of(b)) for b in st.plan_epoch(s.shards, seed=0, epoch=0, world_size=1, batch_size=3,
                                                        bucket_window=8, shuffle=True).batches[0]]
    assert [g[2] for g in got] == want
    assert [g[1] for g in got] == list(range(len(want)))
    assert s.epoch == 1 and s.consumed == 0  # rolled over after the last batch
    b = next(iter(s))
    assert b["epoch"] == 1 and b["audio"][0].dtype.name == "float32"


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_same_batches_whatever_the_workers(shard_dir, workers):
    ref = run_keys(st.Stream(shard_dir, "train", Cfg(), rank=1, world_size=2, num_workers=0))
    got = run_keys(st.Stream(shard_dir, "train", Cfg(), rank=1, world_size=2, num_workers=workers))
    assert got == ref


@pytest.mark.parametrize("workers_before,workers_after", [(2, 1), (0, 2)])
def test_resume_same_plan_continues_batch_for_batch(shard_dir, workers_before, workers_after):
    full = [run_keys(st.Stream(shard_dir, "train", Cfg(), rank=r, world_size=2)) for r in range(2)]
    k = 2
    states = []
    for r in range(2):
        s = st.Stream(shard_dir, "train", Cfg(), rank=r, world_size=2, num_workers=workers_before)
        assert run_keys(s, k) == full[r][:k]
        states.append(s.state_dict())
    assert states[0] == states[1]  # every rank knows what every rank delivered
    state = json.loads(json.dumps(states[0]))
    for r in range(2):
        s = st.Stream(shard_dir, "train", Cfg(), rank=r, world_size=2, num_workers=workers_after)
        s.load_state_dict(state)
        assert run_keys(s) == full[r][k:]


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_world_size_is_exactly_once(shard_dir, new_world):
    k = 2
    first = []
    states = []
    for r in range(2):
        s = st.Stream(shard_dir, "train", Cfg(), rank=r, world_size=2, num_workers=1)
        first += [(key, p) for b in run_keys(s, k) for key, p in zip(b[2], b[3])]
        states.append(s.state_dict())
    state = json.loads(json.dumps(states[0]))
    rest, lens = [], set()
    for r in range(new_world):
        s = st.Stream(shard_dir, "train", Cfg(batch_size=2), rank=r, world_size=new_world)
        s.load_state_dict(state)
        got = run_keys(s)
        lens.add(len(got))
        assert all(g[0] == 0 for g in got)
        rest += [(key, p) for b in got for key, p in zip(b[2], b[3])]
    assert len(lens) == 1
    real = [key for key, p in first + rest if not p]
    assert sorted(real) == sorted(k for sh in st.Stream(shard_dir, "train", Cfg()).shards for k in sh.keys)
    # a re-planned run can itself be saved and resumed batch for batch
    s = st.Stream(shard_dir, "train", Cfg(batch_size=2), rank=0, world_size=new_world)
    s.load_state_dict(state)
    whole = run_keys(s)
    s = st.Stream(shard_dir, "train", Cfg(batch_size=2), rank=0, world_size=new_world)
    s.load_state_dict(state)
    run_keys(s, 1)
    again = st.Stream(shard_dir, "train", Cfg(batch_size=2), rank=0, world_size=new_world)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert run_keys(again) == whole[1:]


def test_state_at_epoch_end_starts_next_epoch(shard_dir):
    s = st.Stream(shard_dir, "train", Cfg())
    run_keys(s)
    state = s.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 0 and state["delivered"] == {}
    t = st.Stream(shard_dir, "train", Cfg())
    t.load_state_dict(state)
    assert run_keys(t, 1)[0][0] == 1
    t.set_epoch(1)  # same epoch: keeps its position
    assert t.consumed == 1
    t.set_epoch(4)
    assert t.consumed == 0 and t.epoch == 4


def test_state_from_other_shards_is_refused(shard_dir, tmp_path):
    other = write_shards(tmp_path / "o", [3, 3])
    s = st.Stream(other, "train", Cfg())
    with pytest.raises(st.StreamError, match="fingerprint"):
        s.load_state_dict(st.Stream(shard_dir, "train", Cfg()).state_dict())


def test_split_by_node_check(shard_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(st.StreamError, match="ranks would read the same samples"):
        st.Stream(shard_dir, "train", Cfg(), rank=0, world_size=1)
    s = st.Stream(shard_dir, "train", Cfg())
    assert (s.rank, s.world_size) == (1, 2)
    st.Stream(shard_dir, "train", Cfg(), rank=0, world_size=1, allow_unsplit=True)


def test_truncated_and_changed_shards_are_named(tmp_path):
    d = write_shards(tmp_path / "t", [4, 4])
    p = d / "train-000001.tar"
    p.write_bytes(p.read_bytes()[:-1024])
    s = st.Stream(d, "train", Cfg(shuffle=False, batch_size=4))
    with pytest.raises(st.StreamError, match="train-000001.tar is truncated"):
        run_keys(s)
    d = write_shards(tmp_path / "c", [4])
    p = d / "train-000000.tar"
    p.write_bytes(p.read_bytes().replace(b"Hallo", b"Hullo", 1))
    run_keys(st.Stream(d, "train", Cfg()))  # same size: only sha256 notices
    with pytest.raises(st.StreamError, match="sha256"):
        run_keys(st.Stream(d, "train", Cfg(), verify_sha256=True))


# ============================================================================================ end to end
# `stc shards build` output, `stc run --nproc 2 shards stream` under torchrun (gloo) with workers.

N_TRAIN = 19  # samples_per_shard=4 -> shards of 4, 4, 4, 4, 3: uneven; 10 vs 9 samples per rank


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    import numpy as np
    import soundfile as sf

    from engine import config as cfg
    from engine.data import shards

    root = tmp_path_factory.mktemp("e2e")
    rows = []
    for i in range(N_TRAIN + 3):
        sr, dur = 16000, 0.2 + 0.05 * (i % 7)
        t = np.arange(int(dur * sr)) / sr
        sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 20 * i) * t)).astype("float32"), sr)
        rows.append({"id": f"u{i:02d}", "audio": f"a{i}.wav", "src_text": "hello", "tgt_text": "Hallo Welt " * (1 + i % 3),
                     "src_lang": "en", "tgt_lang": "de", "split": "train" if i < N_TRAIN else "dev"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = cfg.load(None, [f"shards.manifest={root / 'm.jsonl'}", f"shards.out={root / 'sh'}",
                             "shards.samples_per_shard=4"])
    shards.build(recipe, workers=1)
    return root / "sh"


def stc_stream(stc_cmd, stc_env, shard_dir: Path, dump: Path, *extra: str, nproc: int = 2, workers: int = 2,
               overrides: tuple[str, ...] = ()) -> dict[int, list[dict]]:
    head = [*stc_cmd, "run", "--nproc", str(nproc)] if nproc > 1 else list(stc_cmd)
    cmd = [*head, "shards", "stream", "--shards", str(shard_dir), "--split", "train", "--dump", str(dump), *extra,
           "data.batch_size=3", "data.bucket_window=6", f"data.num_workers={workers}", *overrides]
    r = subprocess.run(cmd, env=stc_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return {rank: [json.loads(x) for x in (dump / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in range(nproc)}


def delivered(runs: list[dict[int, list[dict]]]) -> list[str]:
    return [k for run in runs for lines in run.values() for b in lines for k, p in zip(b["keys"], b["pad"]) if not p]


@pytest.mark.slow
def test_e2e_two_ranks_exactly_once_and_resume(built, tmp_path, stc_cmd, stc_env):
    keys = sorted(f"u{i:02d}" for i in range(N_TRAIN))
    full = stc_stream(stc_cmd, stc_env, built, tmp_path / "full")
    assert sorted(delivered([full])) == keys                              # exactly once across ranks
    assert len(full[0]) == len(full[1]) == 4                               # 10 vs 9 samples: 4 batches each
    pads = sorted([any(b["pad"]) for b in lines] for lines in full.values())
    assert pads == [[False] * 4, [False, False, False, True]]             # the short rank's pad batch
    assert {b["rank"] for r in full.values() for b in r} == {0, 1}         # both ranks worked...
    assert len({b["pid"] for r in full.values() for b in r}) == 2          # ...in two processes

    k = 2
    state = tmp_path / "state.json"
    first = stc_stream(stc_cmd, stc_env, built, tmp_path / "first", "--max-batches", str(k), "--state-out", str(state))
    assert {r: [b["keys"] for b in lines] for r, lines in first.items()} == \
        {r: [b["keys"] for b in lines[:k]] for r, lines in full.items()}
    # same world size, other worker count: the uninterrupted run's batches from k on
    rest = stc_stream(stc_cmd, stc_env, built, tmp_path / "rest", "--state-in", str(state), workers=0)
    for r in (0, 1):
        assert [(b["batch"], b["keys"], b["pad"]) for b in rest[r]] == \
            [(b["batch"], b["keys"], b["pad"]) for b in full[r][k:]]
    assert sorted(delivered([first, rest])) == keys
    # the 2-rank state resumed on 1 rank (another world size and worker count): exactly once
    one = stc_stream(stc_cmd, stc_env, built, tmp_path / "one", "--state-in", str(state), nproc=1, workers=1)
    assert sorted(delivered([first, one])) == keys


def test_stream_with_featurizer_in_workers(tmp_path):
    """Prompts and features are built in the workers; the pad batch has no label tokens."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    from engine.data.prompt import IGNORE, Featurizer
    from engine.models.tiny import CHAT_TEMPLATE, build_bpe_tokenizer

    proc = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                               tokenizer=build_bpe_tokenizer(), chat_template=CHAT_TEMPLATE)
    d = write_shards(tmp_path / "f", [3, 2])
    cfg = Cfg(batch_size=2)
    p = st.Stream(d, "train", cfg, rank=0, world_size=2).plan
    short = next(r for r in range(2) if p.batches[r][-1].pad)
    s = st.Stream(d, "train", cfg, Featurizer(proc), rank=short, world_size=2, num_workers=2)
    plain = run_keys(st.Stream(d, "train", cfg, rank=short, world_size=2))
    batches = list(s)
    assert [(b["epoch"], b["batch"], tuple(b["keys"]), tuple(b["pad"])) for b in batches] == plain
    assert len(batches) == 2 and batches[-1]["pad"] == [True]   # 3 vs 2 samples in batches of 2
    assert (batches[-1]["labels"] == IGNORE).all()
    for b in batches[:-1]:
        assert b["input_features"].shape == (len(b["keys"]), 128, 3000)
        assert ((b["labels"] != IGNORE).sum(1) > 0).all()
