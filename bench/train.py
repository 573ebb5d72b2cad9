"""What does the trainer cost per step? One run, one table (CPU part).

1. **DeepSpeed tax.** A LoRA ``distill`` step through the engine (``Trainer.train_step``: global-token
   normalisation, ``deepspeed.initialize`` with the ZeRO stage the engine picks, torch AdamW over the
   adapters) against a plain peft step (same model built by the same loader, same LoRA config, same
   precision, same batches: forward, mean CE over label tokens, backward, clip, torch AdamW step). CE
   only (kd_weight 0) so both do the same maths. Both run in one process, alternating step by step
   on the same micro batch (CPU timings on a shared machine drift by 2x over a minute; separate runs
   would measure the drift). Target: ratio <= 1.1.
2. **Cached vs online KD**, teacher twice the student's depth: step time and peak RSS of a LoRA
   distill step with ``teacher_mode=cache`` (a cache built by ``engine.cache.build`` beforehand) and
   ``teacher_mode=online`` (frozen teacher forward in the loop).
3. **ZeRO-2 vs ZeRO-3 vs ZeRO-3 + CPU offload**, 2 ranks (gloo, one thread each): step time and peak
   RSS per rank, same LoRA step.
4. **ZeRO-3 loading: zero.Init vs whole copies**, 2 ranks, LoRA on the 16-layer model: the trainer
   loads partitioned under ``deepspeed.zero.Init`` (default) or, with ``STC_ZERO3_INIT=0``, a whole copy
   per rank that ``deepspeed.initialize`` then partitions. Shown: the peak RSS per rank that setup
   (load + LoRA + ``deepspeed.initialize``) adds over the process after its imports, and the step time.

Model: tiny-config Qwen2-Audio, student hidden 512 x 8 decoder layers (intermediate 1408, 8 heads, 4
KV heads; small audio tower), fp32 (CPU), LoRA r=64 alpha=128 rsLoRA all-linear; batch 4 samples of
2-4 s sine audio with ~3-sentence targets. Every configuration runs in its own process (peak RSS is a
per-process high-water mark); the median of the timed steps after ``--warmup`` untimed ones is shown.

Usage: ``python bench/train.py [--steps 4] [--warmup 1] [--out runs/bench-train] [--skip zero zinit]``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))

N_SAMPLES = 32
MODEL = dict(hidden_size=512, intermediate_size=1408, num_heads=8, num_kv_heads=4, audio_layers=2,
             audio_d_model=64, audio_heads=4)


# ============================================================================================ setup

def prepare(root: Path, cache: bool = True) -> None:
    import numpy as np
    import soundfile as sf

    from engine import config as cfg
    from engine.data import shards
    from engine.models.tiny import build_tiny

    if (root / "ready").exists() or (not cache and (root / "models_ready").exists()):
        return
    if (root / "models_ready").exists():
        return _prepare_cache(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    words = "Hallo Welt, wie geht es dir heute? Mir geht es gut, danke. "
    for i in range(N_SAMPLES):
        sr, dur = 16000, 2.0 + 0.25 * (i % 9)
        t = np.arange(int(dur * sr)) / sr
        sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * (180 + 15 * i) * t)).astype("float32"), sr)
        rows.append({"id": f"u{i:03d}", "audio": f"a{i}.wav", "src_text": "hello", "tgt_text": words * (2 + i % 2),
                     "src_lang": "en", "tgt_lang": "de", "split": "train"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards.build(cfg.load(None, [f"shards.manifest={root / 'm.jsonl'}", f"shards.out={root / 'sh'}",
                                 "shards.samples_per_shard=8"]), workers=1)
    build_tiny("qwen2audio", root / "student", num_layers=8, dtype="fp32", seed=1, **MODEL)
    build_tiny("qwen2audio", root / "teacher", num_layers=16, dtype="fp32", seed=0, **MODEL)
    (root / "models_ready").write_text("ok")
    if cache:
        _prepare_cache(root)


def _prepare_cache(root: Path) -> None:
    """The teacher cache for the KD rows (the slow part of the preparation)."""
    from engine import config as cfg
    from engine.cache import build as cb
    from engine.cache import format as cf

    t0 = time.perf_counter()
    cb.build(cfg.load(None, [f"data.shards={root / 'sh'}", f"cache.teacher={root / 'teacher'}",
                             f"cache.out={root / 'cache'}", "cache.k=64", "cache.targets=[ref]", "cache.batch_size=4",
                             "model.dtype=fp32", "run.device=cpu"]))
    (root / "cache_build_s").write_text(f"{time.perf_counter() - t0:.1f}")
    (root / "ready").write_text("ok")


def overrides(root: Path, out: Path, *, batch: int, **kw) -> list[str]:
    a = {"model.path": root / "teacher", "model.dtype": "fp32", "data.shards": root / "sh", "data.batch_size": batch,
         "data.dev_split": "none", "distill.student": root / "student", "distill.mode": "lora",
         "distill.teacher_mode": "online", "distill.kd_weight": 0.0, "distill.seq_kd": "false",
         "distill.global_batch": 4, "distill.epochs": 100, "distill.out": out, "distill.lr": "1e-4",
         "distill.lora.r": 64, "distill.lora.alpha": 128, "distill.save_every": 0, "distill.resume": "never",
         "cache.k": 64, "run.log_level": "warning"}
    a.update(kw)
    return [f"{k}={v}" for k, v in a.items()]


def rss_peak() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ============================================================================================ workers

def worker_engine(argv: list[str], steps: int, warmup: int) -> dict:
    from engine import config as cfg
    from engine import dist
    from engine.train import trainer as train

    import deepspeed  # noqa: F401  (imports before the baseline: setup's peak is then the model's)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    recipe = cfg.load(None, argv)
    t = train.Trainer(recipe, "distill")
    before = rss_peak()
    t.setup()
    setup_peak = rss_peak()
    windows = t._windows()
    times, ms = [], []
    for i in range(warmup + steps):
        w = next(windows)
        t0 = time.perf_counter()
        m = t.train_step(w)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            ms.append(m)
    res = {"step_s": statistics.median(times), "loss": ms[-1]["loss"], "zero_stage": t.zero.stage,
           "offload": t.zero.offload, "tokens": statistics.median(m["label_tokens"] for m in ms),
           "rss_per_rank": dist.all_gather_object(rss_peak()),
           "setup_rss_per_rank": dist.all_gather_object(setup_peak - before), "zero_init": t.zero_init}
    dist.barrier()
    return res


def worker_tax(argv: list[str], steps: int, warmup: int) -> dict:
    """Engine step and plain peft step alternated in one process on the same batches (this machine's
    timings drift with other load, so A/B/A/B and medians, not two separate runs)."""
    import torch

    from engine import config as cfg
    from engine.train import trainer as train
    from engine.models.load import apply_lora, load_model

    recipe = cfg.load(None, argv)
    c = recipe.distill
    t = train.Trainer(recipe, "distill")
    t.setup()
    torch.manual_seed(recipe.run.seed)
    # the plain step: the same loader and LoRA config (= peft), no DeepSpeed, torch AdamW, mean CE
    model = apply_lora(load_model(t.spec.model, for_training=True, device="cpu"), c.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, foreach=False)

    def plain(b: dict) -> float:
        inputs = {k: b[k] for k in train.MODEL_KEYS if k in b}
        logits = model(**inputs).logits
        labels = b["labels"]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    windows = t._windows()
    te, tp, le, lp = [], [], [], []
    for i in range(warmup + steps):
        w = next(windows)
        assert len(w) == 1, "the tax bench runs accumulation 1"
        t0 = time.perf_counter()
        m = t.train_step(w)
        t1 = time.perf_counter()
        lp.append(plain(w[0]))
        t2 = time.perf_counter()
        if i >= warmup:
            te.append(t1 - t0)
            tp.append(t2 - t1)
            le.append(m["loss"])
    return {"engine_s": statistics.median(te), "plain_s": statistics.median(tp), "engine_steps": te,
            "plain_steps": tp, "engine_loss": le, "plain_loss": lp[warmup:], "zero_stage": t.zero.stage,
            "ratio_of_medians": statistics.median(te) / statistics.median(tp),
            "median_of_ratios": statistics.median(a / b for a, b in zip(te, tp)),
            "rss_per_rank": [rss_peak()]}


def worker_main() -> None:
    kind, steps, warmup, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    argv = sys.argv[6:]
    res = worker_engine(argv, steps, warmup) if kind == "engine" else worker_tax(argv, steps, warmup)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(res))
    from engine import dist

    dist.end_process(0)     # as stc ends a rank (engine.dist): without the interpreter's finalization


# ============================================================================================ driver

def launch(kind: str, argv: list[str], *, steps: int, warmup: int, nproc: int, tmp: Path, threads: int,
           env_extra: dict | None = None) -> dict:
    out = tmp / f"res-{time.monotonic_ns()}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), **(env_extra or {}))
    argv = [*argv, f"run.threads={threads}"]
    me = [str(Path(__file__).resolve()), "--worker", kind, str(steps), str(warmup), str(out), *argv]
    if nproc > 1:
        from launchers.local import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), *me]
    else:
        cmd = [sys.executable, *me]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        err = [x for x in r.stderr.splitlines() if "Error" in x or "Exception" in x]
        print(f"{kind} {argv} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        return {"failed": (err[-1] if err else r.stderr[-300:])[:300]}
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main()
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-train"))
    ap.add_argument("--skip", nargs="*", default=[], choices=["tax", "kd", "zero", "zinit"])
    a = ap.parse_args()
    root = Path(a.out)
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    prepare(root / "ws", cache="kd" not in a.skip)
    ws = root / "ws"
    threads = os.cpu_count() or 1
    kw = dict(steps=a.steps, warmup=a.warmup, tmp=tmp)
    rows: list[tuple[str, ...]] = []
    results: dict[str, dict] = {}

    if "tax" not in a.skip:
        r = launch("tax", overrides(ws, tmp / "e", batch=4), nproc=1, threads=threads, **kw)
        results["tax"] = r
        if "failed" in r:
            raise SystemExit(f"tax bench failed: {r['failed']}")
        rows.append(("plain peft LoRA step (no DeepSpeed)", f"{r['plain_s']:.3f}", "1.00", "-",
                     f"same batches, alternated; losses {r['plain_loss'][0]:.4f} ..."))
        rows.append((f"engine LoRA distill step (ZeRO-{r['zero_stage']} auto)", f"{r['engine_s']:.3f}",
                     f"{r['ratio_of_medians']:.2f}", gib(r["rss_per_rank"][0]),
                     f"median of per-step ratios {r['median_of_ratios']:.2f}; losses {r['engine_loss'][0]:.4f} ..."))
    if "kd" not in a.skip:
        common = {"distill.kd_weight": 1.0}
        online = launch("engine", overrides(ws, tmp / "on", batch=4, **common), nproc=1, threads=threads, **kw)
        cached = launch("engine", overrides(ws, tmp / "ca", batch=4, **common, **{"distill.teacher_mode": "cache",
                                                                                  "distill.cache": ws / "cache"}),
                        nproc=1, threads=threads, **kw)
        results.update(kd_online=online, kd_cached=cached)
        if "failed" in online or "failed" in cached:
            raise SystemExit(f"KD bench failed: {online.get('failed') or cached.get('failed')}")
        build_s = (ws / "cache_build_s").read_text()
        rows.append(("KD online (teacher 16 layers in the loop)", f"{online['step_s']:.3f}", "1.00",
                     gib(online["rss_per_rank"][0]), "student 8 layers"))
        rows.append(("KD cached (top-64 from `cache build`)", f"{cached['step_s']:.3f}",
                     f"{cached['step_s'] / online['step_s']:.2f}", gib(cached["rss_per_rank"][0]),
                     f"one-off cache build {build_s} s for {N_SAMPLES} samples"))
    if "zero" not in a.skip:
        base = None
        for name, extra in (("ZeRO-2", {"distill.zero_stage": 2}), ("ZeRO-3", {"distill.zero_stage": 3}),
                            ("ZeRO-3 + offload", {"distill.zero_stage": 3, "distill.offload": "true"})):
            r = launch("engine", overrides(ws, tmp / name.replace(" ", ""), batch=2, **extra), nproc=2,
                       threads=max(1, threads // 2), **kw)
            results[name] = r
            if "failed" in r:
                rows.append((f"{name}, 2 ranks x batch 2 (LoRA)", "-", "-", "-", "failed: " + r["failed"][:80]))
                continue
            base = base or r["step_s"]
            rows.append((f"{name}, 2 ranks x batch 2 (LoRA)", f"{r['step_s']:.3f}", f"{r['step_s'] / base:.2f}",
                         "/".join(gib(x) for x in r["rss_per_rank"]), f"stage {r['zero_stage']}"
                         f"{' offload' if r['offload'] else ''}"))
    if "zinit" not in a.skip:
        base = None
        for name, init in (("ZeRO-3 loaded whole per rank", "0"), ("ZeRO-3 loaded under zero.Init", "1")):
            extra = {"distill.zero_stage": 3, "distill.student": ws / "teacher"}
            r = launch("engine", overrides(ws, tmp / f"zinit{init}", batch=2, **extra), nproc=2,
                       threads=max(1, threads // 2), env_extra={"STC_ZERO3_INIT": init}, **kw)
            results[name] = r
            if "failed" in r:
                rows.append((f"{name}, 2 ranks (LoRA, 16 layers)", "-", "-", "-", "failed: " + r["failed"][:80]))
                continue
            base = base or r["step_s"]
            rows.append((f"{name}, 2 ranks (LoRA, 16 layers)", f"{r['step_s']:.3f}", f"{r['step_s'] / base:.2f}",
                         "/".join(gib(x) for x in r["rss_per_rank"]),
                         "setup adds " + "/".join(f"{x / 2**20:.0f}" for x in r["setup_rss_per_rank"]) + " MiB/rank"))
    head = ("configuration", "step s", "ratio", "peak RSS GiB/rank", "note")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
