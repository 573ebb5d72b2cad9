"""The ``peak_memory`` field of meta.json: measured per process (host RSS always, CUDA peaks where CUDA
was used), reduced to the maximum over ranks, written into the outputs of the run that measured it."""
from __future__ import annotations

import json
import os
import time

import torch

from engine import dist, meta
from sine_data import write_sine_manifest


def test_cpu_process_records_its_peak_rss():
    p = meta.peak_memory()
    assert p["device"] == "cpu" and p["ranks"] == 1
    assert p["rss_bytes"] > 50 * 2**20          # this interpreter with torch loaded
    assert "allocated_bytes" not in p and "reserved_bytes" not in p
    big = torch.ones(64 * 2**20 // 4)           # 64 MiB more, touched: the high-water mark rises
    assert meta.peak_memory()["rss_bytes"] >= p["rss_bytes"]
    del big


def test_cuda_process_records_allocator_peaks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 7 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 9 * 2**30)
    p = meta.peak_memory()
    assert p["device"] == "cuda" and p["allocated_bytes"] == 7 * 2**30 and p["reserved_bytes"] == 9 * 2**30
    assert p["rss_bytes"] > 0


def test_merge_takes_the_maximum_over_ranks():
    a = {"device": "cuda", "ranks": 1, "rss_bytes": 5, "allocated_bytes": 10, "reserved_bytes": 12}
    b = {"device": "cuda", "ranks": 1, "rss_bytes": 8, "allocated_bytes": 3, "reserved_bytes": 20}
    assert meta.merge_peak_memory([a, b]) == {"device": "cuda", "ranks": 2, "rss_bytes": 8,
                                              "allocated_bytes": 10, "reserved_bytes": 20}
    assert meta.merge_peak_memory([{"device": "cpu", "ranks": 1, "rss_bytes": 4}]) == \
        {"device": "cpu", "ranks": 1, "rss_bytes": 4}


def test_build_meta_always_has_it_and_record_replaces_it(tmp_path):
    m = meta.build_meta("report")
    assert m["peak_memory"]["rss_bytes"] > 0 and m["peak_memory"]["ranks"] == 1
    meta.write_meta(tmp_path, m)
    peak = {"device": "cpu", "ranks": 4, "rss_bytes": 123}
    assert not meta.record_peak_memory(tmp_path, peak, since=time.time() + 60)   # older than the run: kept
    assert meta.read_meta(tmp_path)["peak_memory"]["ranks"] == 1
    assert meta.record_peak_memory(tmp_path, peak, since=time.time() - 60)
    got = meta.read_meta(tmp_path)
    assert got["peak_memory"] == peak and got["kind"] == "report"
    assert not meta.record_peak_memory(tmp_path / "missing", peak)


def test_stage_run_writes_the_max_over_ranks(tmp_path, stc_inproc, monkeypatch):
    """`stc shards build` through stages.invoke; a second rank is simulated at the gather (the real
    collective is dist.all_gather_object, tested with gloo elsewhere) with a larger RSS and CUDA peaks."""
    manifest = write_sine_manifest(tmp_path, 3, 3)
    other = {"device": "cuda", "ranks": 1, "rss_bytes": 2**45, "allocated_bytes": 3 * 2**30,
             "reserved_bytes": 4 * 2**30}
    gathered = []

    def gather(obj):
        gathered.append(obj)
        return [obj, other]

    monkeypatch.setattr(dist, "all_gather_object", gather)
    r = stc_inproc("shards", "build", "-m", manifest, "-o", tmp_path / "sh")
    assert r.returncode == 0, r.stderr
    assert len(gathered) == 1 and gathered[0]["rss_bytes"] > 0
    pk = json.loads((tmp_path / "sh" / "meta.json").read_text())["peak_memory"]
    assert pk == {"device": "cuda", "ranks": 2, "rss_bytes": 2**45, "allocated_bytes": 3 * 2**30,
                  "reserved_bytes": 4 * 2**30}
    # a rerun that finds the output finished leaves the figures of the run that wrote it
    os.utime(tmp_path / "sh" / "meta.json", (time.time() - 30, time.time() - 30))
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj])
    r = stc_inproc("shards", "build", "-m", manifest, "-o", tmp_path / "sh")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "sh" / "meta.json").read_text())["peak_memory"]["ranks"] == 2
