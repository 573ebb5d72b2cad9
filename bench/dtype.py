"""bf16 against fp32 on this machine: speed and the quality tolerance, measured side by side in one run.

Why: a CPU recipe computes in bf16 only where that is faster and changes no result beyond noise. This
scores one evaluated system of a finished pipeline run twice with the engine's own ``stc evaluate`` (the
run's resolved config and that system's evaluate overrides from the plan, as the pipeline ran it), once
with ``model.dtype=fp32`` and once with ``model.dtype=bf16``, on the same test sentences with the same
greedy decoding, and prints one table:

- seconds of evaluation and sentences/s per dtype, and the bf16 speed-up (also a one-thread matmul at
  the benchmark model's width, which is what ``stc demo --real`` times to pick the dtype);
- per direction, the primary metric of each dtype, bf16 - fp32 with the paired bootstrap 95% interval
  (the report's own code: sacrebleu's resampling) and its verdict, and how many greedy translations are
  identical.

A difference inside the interval is the tolerance's evidence: bf16 changes single tokens of some
translations (different rounding of the logits picks another argmax at near ties), not the system's
quality. Outputs go under ``<run>/dtype/<system>/`` (``fp32/``, ``bf16/``, ``dtype.json``); an evaluation
that is already there is reused by ``stc evaluate`` (a rerun only prints the table).

Usage: ``python bench/dtype.py --run runs/real --system teacher [--max-samples N] [--resamples 1000]``
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from healing_curve import plan_overrides, primary  # noqa: E402  (same folder)

DTYPES = ("fp32", "bf16")


def evaluate(config: Path, ovs: list[str], out: Path, name: str, model: str, dtype: str, extra: list[str]) -> float:
    t0 = time.time()
    cmd = [sys.executable, "-m", "engine.cli", "evaluate", "--config", str(config), *ovs, f"evaluate.out={out}",
           f"evaluate.models=[{name}={model}]", f"model.dtype={dtype}", "evaluate.latency_samples=0", *extra]
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"dtype: stc evaluate ({dtype}) failed (exit {r.returncode})")
    return round(time.time() - t0, 1)


def matmul_ratio(rows: int = 256) -> dict:
    """What ``stc demo --real`` times to pick the dtype: one-thread (rows, 896) x (896, 896) matmuls."""
    from engine.demo.real import matmul_seconds

    f, b = matmul_seconds("fp32", n=rows), matmul_seconds("bf16", n=rows)
    return {"rows": rows, "fp32_s": f, "bf16_s": b, "bf16_speedup": f / b if b else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/real")
    ap.add_argument("--system", default="teacher", help="an evaluated system of the run")
    ap.add_argument("--max-samples", type=int, default=0, help="the first N test sentences, directions together (0: the run's)")
    ap.add_argument("--resamples", type=int, default=1000)
    a = ap.parse_args(argv)
    from engine.report import metric_object, paired_bootstrap, read_hypotheses

    run = Path(a.run)
    config = run / "pipeline" / "config.yaml"
    steps = plan_overrides(config)
    step = steps.get(f"eval-{a.system}")
    if step is None:
        raise SystemExit(f"dtype: the plan of {config} has no step eval-{a.system}; evaluated systems: "
                         + ", ".join(n[len("eval-"):] for n in steps if n.startswith("eval-")))
    models = next(o for o in step if o.startswith("evaluate.models="))
    model = models.split("=", 2)[2].rstrip("]").strip('"')
    ovs = [o for o in step if not o.startswith(("evaluate.models=", "evaluate.out=", "model.dtype="))]
    extra = [f"evaluate.max_samples={a.max_samples}"] if a.max_samples else []
    base = run / "dtype" / a.system
    res: dict[str, dict] = {}
    for dt in DTYPES:
        secs = evaluate(config, ovs, base / dt, dt, model, dt, extra)
        sc = json.loads((base / dt / dt / "scores.json").read_text())
        res[dt] = {"seconds": secs, "sentences_per_s": sc.get("speed", {}).get("sentences_per_s"),
                   "eval_seconds": sc.get("speed", {}).get("seconds"), "primary": primary(base / dt / dt / "scores.json"),
                   "metric": {k: v["primary"]["metric"] for k, v in sc["directions"].items()}}
    hyps = {dt: read_hypotheses(base / dt / dt / "hypotheses.jsonl") for dt in DTYPES}
    dirs = sorted(res["fp32"]["primary"])
    cmp = {}
    for d in dirs:
        keys = sorted(hyps["fp32"][d])
        refs = [hyps["fp32"][d][k][0] for k in keys]
        h32 = [hyps["fp32"][d][k][1] for k in keys]
        h16 = [hyps["bf16"][d].get(k, ("", ""))[1] for k in keys]
        bs = paired_bootstrap(metric_object(res["fp32"]["metric"][d]), refs, h32, h16, a.resamples, 0)
        cmp[d] = {**bs, "identical": sum(x == y for x, y in zip(h32, h16)), "n": len(keys)}
    mm = matmul_ratio()
    doc = {"run": str(run), "system": a.system, "model": model, "dtypes": res, "bf16_vs_fp32": cmp, "matmul": mm}
    (base / "dtype.json").write_text(json.dumps(doc, indent=1))
    sp = [res[dt]["eval_seconds"] for dt in DTYPES]
    print(f"bf16 against fp32: {a.system} of {run} ({model}), greedy decoding of the test split")
    print("| dtype | evaluate s | sentences/s | " + " | ".join(f"{d} {res['fp32']['metric'][d]}" for d in dirs) + " |")
    print("|---|---:|---:|" + "---:|" * len(dirs))
    for dt in DTYPES:
        r = res[dt]
        print(f"| {dt} | {r['eval_seconds']:.1f} | {r['sentences_per_s'] or 0:.2f} | "
              + " | ".join(f"{r['primary'][d]:.2f}" for d in dirs) + " |")
    print(f"bf16 speed-up: evaluate x{sp[0] / sp[1]:.2f}; one-thread matmul ({mm['rows']}x896)(896x896) "
          f"x{mm['bf16_speedup']:.2f}")
    print("| direction | bf16 - fp32 | 95% CI | verdict | identical translations |")
    print("|---|---:|---|---|---:|")
    for d in dirs:
        c = cmp[d]
        print(f"| {d} | {c['delta']:+.2f} | [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | "
              f"{'significant' if c['significant'] else 'not significant'} | {c['identical']}/{c['n']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
