"""Can the data stream feed training? Samples/s of the stream against samples/s of a training step.

Measures, on one shard directory (default: the demo shards at ``shards/built/demo``; without them a
small synthetic set is built in a temporary folder):

* the stream with 0, 1 and 2 DataLoader workers, decode only (FLAC -> float32, json) and decode +
  prompt + Whisper features + padding (what a trainer receives), in samples/s; "startup" is the time
  to the first batch (worker start-up and the first shard index), "steady" excludes it;
* a training step of the tiny Qwen2-Audio (forward + backward on a batch from the same stream, fp32,
  same batch size), in samples/s;
* the ratio stream / step: above 1 the stream keeps up with the step.

The tiny model's step is a floor, not a real workload: a 7B step on a GPU consumes far fewer samples/s
than the tiny model on a CPU, so a ratio above 1 here means the stream will keep up there as well.
On a 2-core machine the workers compete with the main process; the step is timed alone.

Usage: ``python bench/stream.py [--shards DIR] [--split train] [--batch-size 8] [--batches 24]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def synthetic_shards(root: Path, n: int = 96) -> Path:
    """Sine-wave utterances of 1-8 s through `stc shards build` (the real writer)."""
    import numpy as np
    import soundfile as sf

    from engine import config as cfg
    from engine.data import shards

    rows = []
    for i in range(n):
        sr, dur = 16000, 1.0 + (i * 7 % 71) / 10
        t = np.arange(int(dur * sr)) / sr
        sf.write(root / f"a{i}.wav", (0.2 * np.sin(2 * np.pi * (150 + 5 * i) * t)).astype("float32"), sr)
        rows.append({"id": f"b{i:04d}", "audio": f"a{i}.wav", "src_text": "The train leaves at nine.",
                     "tgt_text": "Der Zug fährt um neun Uhr ab." * (1 + i % 3), "src_lang": "en", "tgt_lang": "de",
                     "split": "train"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = cfg.load(None, [f"shards.manifest={root / 'm.jsonl'}", f"shards.out={root / 'sh'}",
                             "shards.samples_per_shard=24"])
    shards.build(recipe)
    return root / "sh"


def time_stream(shard_dir: Path, split: str, data_cfg, featurizer, workers: int, batches: int) -> dict:
    from engine.data.stream import Stream

    s = Stream(shard_dir, split, data_cfg, featurizer, seed=0, rank=0, world_size=1, num_workers=workers)
    n = samples = first_samples = 0
    t0 = time.perf_counter()
    t_first = None
    it = iter(s)
    for b in it:
        n += 1
        samples += sum(not p for p in b["pad"])
        if t_first is None:
            t_first, first_samples = time.perf_counter(), samples
        if n >= batches:
            break
    it.close()
    t1 = time.perf_counter()
    steady = (samples - first_samples) / (t1 - t_first) if t1 > t_first and samples > first_samples else float("nan")
    return {"batches": n, "samples": samples, "total": samples / (t1 - t0), "steady": steady,
            "startup": t_first - t0}


def time_step(model, batch, reps: int = 5) -> float:
    """Samples/s of forward+backward+update; the median step, since the machine may be shared."""
    import statistics

    import torch

    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    times = []
    for r in range(reps + 1):  # the first step warms up and is not timed
        t0 = time.perf_counter()
        model(**tensors).loss.backward()
        opt.step()
        opt.zero_grad()
        if r:
            times.append(time.perf_counter() - t0)
    return len(batch["keys"]) / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", help="shard directory (default: shards/built/demo, else a synthetic set)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=24, help="batches timed per configuration")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from engine.config import DataConfig
    from engine.data.prompt import Featurizer
    from engine.data.stream import Stream
    from engine.models.tiny import make_tiny

    console = Console()
    tmp = None
    shard_dir = Path(args.shards) if args.shards else ROOT / "shards/built/demo"
    if not (shard_dir / "meta.json").exists():
        tmp = tempfile.TemporaryDirectory(prefix="stc-bench-stream-")
        console.print(f"[dim]no shards at {shard_dir}: building a synthetic set in {tmp.name}[/dim]")
        shard_dir = synthetic_shards(Path(tmp.name))
    data_cfg = DataConfig(batch_size=args.batch_size)
    model, proc = make_tiny("qwen2audio", dtype="fp32")
    feat = Featurizer(proc, data_cfg)

    rows = []
    for workers in (0, 1, 2):
        dec = time_stream(shard_dir, args.split, data_cfg, None, workers, args.batches)
        full = time_stream(shard_dir, args.split, data_cfg, feat, workers, args.batches)
        rows.append((workers, dec, full))

    batch = next(iter(Stream(shard_dir, args.split, data_cfg, feat, seed=0, rank=0, world_size=1, num_workers=0)))
    step = time_step(model, batch)
    n_params = sum(p.numel() for p in model.parameters())

    t = Table(title=f"stream vs tiny training step: {shard_dir} ({args.split}), batch {args.batch_size}, "
                    f"{args.batches} batches, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    for c in ("workers", "decode/s", "full/s", "full steady/s", "1st batch s", "step/s", "full / step"):
        t.add_column(c, justify="right")
    for workers, dec, full in rows:
        t.add_row(str(workers), f"{dec['total']:.1f}", f"{full['total']:.1f}", f"{full['steady']:.1f}",
                  f"{full['startup']:.2f}", f"{step:.1f}", f"{full['total'] / step:.2f}")
    console.print(t)
    console.print("samples/s: decode = FLAC + json only; full = decode + prompt + Whisper features + padding "
                  "(what a trainer receives); steady = after the first batch; step = tiny model forward+backward")
    console.print(f"step: tiny Qwen2-Audio ({n_params / 1e6:.2f} M params, fp32) forward+backward on a batch of "
                  f"{len(batch['keys'])} ({tuple(batch['input_ids'].shape)} tokens, features "
                  f"{tuple(batch['input_features'].shape)})")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
