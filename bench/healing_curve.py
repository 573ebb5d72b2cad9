"""The healing curve: test score of one healed student against the number of healing steps.

Why: a student that misses a quality goal after N steps may only need more of them, or may have
stopped improving; one number cannot tell. This reruns one distill step of a finished pipeline run
(its overrides in the plan that the run's resolved config ``<run>/pipeline/config.yaml`` makes) with ``distill.max_steps`` set to
each value of ``--steps``, each a fresh run (``distill.resume=never``: its own cosine schedule, as a
run of that length would have), then exports it (the run's export settings: nf4) and scores it on
the run's test split with ``stc evaluate``. Every command is the engine's own CLI with the run's
resolved config; outputs go under ``<run>/curves/<system>/s<N>/``, and a finished point is skipped
on a rerun (the stages' own done markers).

Prints a table (steps, per-direction primary metric and % of the reference system) and writes
``<run>/curves/<system>/curve.json`` and ``curve.png``.

Usage: ``python bench/healing_curve.py --run runs/real --system kd-25 --steps 10,30,60,90
[--reference teacher] [--set key=value ...]`` (``--set``: extra overrides for every distill run, e.g.
``distill.lr=1e-4``, to show what a setting changes; they name the curve's folder).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plan_overrides(config: Path) -> dict[str, list[str]]:
    """Each step's overrides, from the one plan the run's resolved config makes (as the pipeline ran it)."""
    sys.path.insert(0, str(ROOT))
    from engine import config as cfg
    from engine import pipeline

    if not config.is_file():
        raise SystemExit(f"healing_curve: {config} is missing: run the pipeline first")
    plan = pipeline.build_plan(cfg.load(config))
    return {s.name: list(s.overrides) for s in plan.steps}


def stc(*argv: str) -> None:
    cmd = [sys.executable, "-m", "engine.cli", *argv]
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"healing_curve: {' '.join(cmd[3:5])} failed (exit {r.returncode})")


def primary(scores: Path) -> dict[str, float]:
    d = json.loads(scores.read_text())
    return {k: v["primary"]["score"] for k, v in d["directions"].items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/real")
    ap.add_argument("--system", default="kd-25", help="an evaluated system of the run with a distill step")
    ap.add_argument("--steps", default="10,30,60,90")
    ap.add_argument("--reference", default="teacher")
    ap.add_argument("--set", action="append", default=[], help="extra distill override (repeatable)")
    a = ap.parse_args(argv)
    run = Path(a.run)
    config = run / "pipeline" / "config.yaml"
    steps = plan_overrides(config)
    if f"distill-{a.system}" not in steps:
        raise SystemExit(f"healing_curve: the plan of {config} has no step distill-{a.system}; healed systems: "
                         + ", ".join(n[len("distill-"):] for n in steps if n.startswith("distill-")))
    dist_ovs = steps[f"distill-{a.system}"]
    exp_ovs = [o for o in steps[f"export-{a.system}"] if not o.startswith(("export.source=", "export.out="))]
    eval_ovs = [o for o in steps[f"eval-{a.system}"] if not o.startswith(("evaluate.models=", "evaluate.out="))]
    tag = a.system + ("-" + hashlib.sha1(" ".join(a.set).encode()).hexdigest()[:6] if a.set else "")
    base = run / "curves" / tag
    base.mkdir(parents=True, exist_ok=True)
    ref = primary(run / "eval" / a.reference / "scores.json")
    points = []
    for n in [int(s) for s in a.steps.split(",") if s.strip()]:
        d = base / f"s{n}"
        ovs = [o for o in dist_ovs if not o.startswith("distill.out=")]
        t0 = time.time()
        stc("distill", "--config", str(config), *ovs, f"distill.out={d / 'distill'}", f"distill.max_steps={n}",
            "distill.resume=never", "distill.save_every=0", *a.set)
        stc("export", "--config", str(config), *exp_ovs, f"export.source={d / 'distill' / 'final'}",
            f"export.out={d / 'export'}")
        stc("evaluate", "--config", str(config), *eval_ovs, f"evaluate.out={d / 'eval'}",
            f"evaluate.models=[s{n}={d / 'export'}]", "evaluate.latency_samples=0")
        sc = primary(d / "eval" / f"s{n}" / "scores.json")
        points.append({"steps": n, "primary": sc, "retained": {k: 100 * v / ref[k] for k, v in sc.items() if ref.get(k)},
                       "seconds": round(time.time() - t0, 1)})
    doc = {"system": a.system, "set": a.set, "reference": a.reference, "reference_primary": ref, "points": points}
    (base / "curve.json").write_text(json.dumps(doc, indent=1))
    dirs = sorted(ref)
    print(f"healing curve of {a.system} ({' '.join(a.set) or 'the run settings'}), % of {a.reference}:")
    print("| steps | " + " | ".join(f"{d} primary | {d} % of {a.reference}" for d in dirs) + " |")
    print("|---:|" + "---:|---:|" * len(dirs))
    for p in points:
        print(f"| {p['steps']} | " + " | ".join(f"{p['primary'][d]:.2f} | {p['retained'].get(d, float('nan')):.1f}"
                                                 for d in dirs) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for d in dirs:
            ax.plot([p["steps"] for p in points], [p["retained"].get(d) for p in points], marker="o", label=d)
        ax.axhline(100, ls="--", color="grey", lw=1)
        ax.set_xlabel("healing steps (optimizer steps)")
        ax.set_ylabel(f"primary metric, % of {a.reference}")
        ax.set_title(f"healing curve: {a.system}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(base / "curve.png", dpi=110)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
